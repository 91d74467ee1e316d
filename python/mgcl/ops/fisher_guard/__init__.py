"""fisher_guard: the Dynamic Fisher Guard update, fused over all tensors.

    penalty = fisher_guard(grads, params, anchors, lam=..., mode="dfg")

updates every ``grads[i]`` in place with ``2*lam*W*(params[i] - anchors[i])``
and returns ``lam * sum(W*(params - anchors)**2)`` (0-d float32). The math is
in ``reference.py``; see also ``mgcl.FisherGuard`` for the training-loop API,
which calls :class:`Prepared` (validated once, a pointer check per step).
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Optional, Sequence

import numpy as np
import torch

from ... import _backend
from ..._backend import Entry
from . import native, reference

MODES = ("dfg", "ewc", "l2")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The dispatch table, in order of preference (see mgcl._backend): every entry
# has the signature (grads, params, anchors, fisher, lam, mode, ema, normalize).
BACKENDS = {
    "cuda": Entry(native.fisher_guard, devices=("cuda",), dtypes=DTYPES),
    "cpp": Entry(native.fisher_guard, devices=("cpu",), dtypes=DTYPES),
    "torch": Entry(reference.fisher_guard, devices=("cpu", "cuda"), dtypes=DTYPES),
}


def check_settings(lam, mode, ema, normalize, who: str = "fisher_guard") -> None:
    """lam a finite number >= 0, mode one of MODES, ema a number in [0, 1) (dfg only), normalize None or 'mean'."""
    def number(x):
        return isinstance(x, numbers.Real) and not isinstance(x, bool)

    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"{who}: unknown mode {mode!r}; expected one of {MODES}")
    if normalize not in (None, "mean"):
        raise ValueError(f"{who}: normalize must be None or 'mean', got {normalize!r}")
    if not number(lam) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"{who}: lam must be a finite number >= 0, got {lam!r}")
    if not number(ema) or not 0.0 <= ema < 1.0:
        raise ValueError(f"{who}: ema must be a number in [0, 1), got {ema!r}")
    if ema > 0 and mode != "dfg":
        raise ValueError(f"{who}: ema applies to mode 'dfg' only (mode={mode!r})")


def dense_layout(t: torch.Tensor) -> Optional[tuple]:
    """The strides of ``t``'s dims of size > 1 when ``t`` is dense (its elements
    fill numel consecutive slots from ``data_ptr()``), else None. Two dense
    tensors with one shape and one layout line up element for element in memory."""
    if t.layout != torch.strided:
        return None
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1)
    expect = 1
    for st, sz in dims:
        if st != expect:
            return None
        expect *= sz
    return tuple(st for sz, st in zip(t.shape, t.stride()) if sz > 1)


def describe_layout(t: torch.Tensor) -> str:
    if t.layout != torch.strided:
        return f"layout {t.layout}"
    return f"shape {tuple(t.shape)}, strides {t.stride()}"


def check_no_overlap(named: list[tuple[str, torch.Tensor]], who: str = "fisher_guard") -> None:
    """No two of the (dense) tensors share memory; the error names a pair, in list order."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), k)
                   for k, (_, t) in enumerate(named) if t.numel())
    reach, owner = 0, None
    for start, end, k in spans:
        if start < reach:
            a, b = sorted((owner, k))
            raise ValueError(f"{who}: {named[a][0]} and {named[b][0]} overlap in memory (aliased tensors); the op "
                             "writes grads (and fisher) in place, so every tensor needs memory of its own")
        if end > reach:
            reach, owner = end, k


def _python_addresses_equal(tensors, addresses, indices) -> bool:
    return [tensors[i].data_ptr() for i in indices] == [addresses[i] for i in indices]


# tensors[i].data_ptr() == addresses[i] for every i in indices, in one C++ loop
# (torch's, used by its CUDA-graph trees; present since torch 2.1). The Python
# loop above is the same test where a torch lacks it.
_addresses_equal = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", _python_addresses_equal)


def _check(grads, params, anchors, fisher, lam, mode, ema, normalize):
    check_settings(lam, mode, ema, normalize)
    if len(params) != len(grads) or len(anchors) != len(grads):
        raise ValueError(
            f"fisher_guard: list lengths differ: {len(grads)} grads, {len(params)} params, {len(anchors)} anchors"
        )
    need_fisher = mode == "ewc" or ema > 0
    if need_fisher and fisher is None:
        raise ValueError(f"fisher_guard: mode={mode!r} with ema={ema} needs fisher tensors (fisher=None)")
    if fisher is not None and len(fisher) != len(grads):
        raise ValueError(f"fisher_guard: {len(fisher)} fisher tensors for {len(grads)} grads")
    if not grads:
        return
    if not isinstance(grads[0], torch.Tensor):
        raise ValueError(f"fisher_guard: grads[0] is {type(grads[0]).__name__}, not a tensor")
    dev, dt = grads[0].device, grads[0].dtype
    if dt not in DTYPES:
        raise ValueError(f"fisher_guard: grads[0] has dtype {dt}; supported: float32, float16, bfloat16")
    named = []
    for i, g in enumerate(grads):
        group = (("grads", g), ("params", params[i]), ("anchors", anchors[i]))
        if fisher is not None:
            group += (("fisher", fisher[i]),)
        layout = None
        for name, t in group:
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"fisher_guard: {name}[{i}] is {type(t).__name__}, not a tensor")
            if t.device != dev:
                raise ValueError(f"fisher_guard: {name}[{i}] is on {t.device}, grads[0] on {dev} (mixed devices)")
            if t.shape != g.shape:
                raise ValueError(f"fisher_guard: {name}[{i}] has shape {tuple(t.shape)}, grads[{i}] {tuple(g.shape)}")
            if name == "fisher":
                if t.dtype not in (torch.float32, dt):
                    raise ValueError(f"fisher_guard: fisher[{i}] has dtype {t.dtype}; expected float32 or {dt}")
                if t.dtype != fisher[0].dtype:
                    raise ValueError(f"fisher_guard: fisher[{i}] has dtype {t.dtype}, fisher[0] {fisher[0].dtype}")
            elif t.dtype != dt:
                raise ValueError(f"fisher_guard: {name}[{i}] has dtype {t.dtype}, grads[0] {dt} (mixed dtypes)")
            here = dense_layout(t)
            if here is None:
                raise ValueError(f"fisher_guard: {name}[{i}] is not dense ({describe_layout(t)}): the fused paths walk "
                                 "each tensor as one flat array")
            if layout is not None and here != layout:
                raise ValueError(f"fisher_guard: {name}[{i}] has strides {t.stride()}, grads[{i}] {g.stride()}: "
                                 "grad, param, anchor and fisher of one index must share one memory layout")
            layout = here
            named.append((f"{name}[{i}]", t))
    if not torch.compiler.is_compiling():  # fake tensors have no addresses
        check_no_overlap(named)


@torch.library.custom_op("mgcl::fisher_guard", mutates_args=("grads", "fisher"))
def _fisher_guard_op(
    grads: list[torch.Tensor],
    params: list[torch.Tensor],
    anchors: list[torch.Tensor],
    fisher: list[torch.Tensor],
    lam: float,
    importance: str,
    ema: float,
    normalize: Optional[str],
    backend: str,
) -> torch.Tensor:
    # ``importance`` is fisher_guard's ``mode``: an argument named "mode" collides
    # with torch's own in compiled and AOT-dispatched graphs. ``fisher`` is [] when
    # the mode reads none: torch's schemas have no optional list of tensors.
    return BACKENDS[backend](grads, params, anchors, fisher or None, lam, importance, ema, normalize)


@_fisher_guard_op.register_fake
def _(grads, params, anchors, fisher, lam, importance, ema, normalize, backend):
    return torch.empty((), dtype=torch.float32, device=grads[0].device if grads else "cpu")


def fisher_guard(
    grads: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    *,
    lam: float,
    mode: str = "dfg",
    fisher: Optional[Sequence[torch.Tensor]] = None,
    ema: float = 0.0,
    normalize: Optional[str] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Add ``2*lam*W*(param - anchor)`` to every grad in place; return the penalty.

    Args:
        grads, params, anchors: equal-length lists; the tensors of one index
            share shape, dtype (float32, float16 or bfloat16), device and one
            dense memory layout (contiguous, channels_last, a transpose, ...);
            no two tensors may overlap in memory.
        lam: guard strength (a finite number >= 0).
        mode: ``"dfg"`` (W = grad**2, grad holding the distillation gradient),
            ``"ewc"`` (W = ``fisher[i]``) or ``"l2"`` (W = 1).
        fisher: per-tensor importance (float32 or the grads' dtype); read by
            ewc, updated in place by dfg with ``ema > 0``.
        ema: dfg only: ``fisher = ema*fisher + (1-ema)*grad**2``, W = fisher.
        normalize: ``"mean"`` divides W by its per-tensor mean.
        backend: ``"cuda"``, ``"cpp"`` or ``"torch"``; default by device
            (the table above, see ``mgcl._backend``).

    Returns:
        0-d float32 tensor ``lam * sum(W*(param-anchor)**2)`` on the grads' device.

    Raises ValueError (naming the offending index) before touching anything.
    """
    grads, params, anchors = list(grads), list(params), list(anchors)
    fisher = list(fisher) if fisher is not None else None
    _check(grads, params, anchors, fisher, lam, mode, ema, normalize)
    if not grads:  # no device to run on: nothing to do, whichever backend was asked for
        if backend is not None:
            _backend.offered("fisher_guard", BACKENDS, backend)
        return torch.zeros((), dtype=torch.float32)
    name = _backend.select("fisher_guard", BACKENDS, grads[0].device, backend, dtypes=(grads[0].dtype,))
    if fisher is not None and not (mode == "ewc" or ema > 0):
        fisher = None  # not read: keep it out of the op's mutation set
    return _fisher_guard_op(
        [g.detach() for g in grads],
        [p.detach() for p in params],
        [a.detach() for a in anchors],
        [] if fisher is None else [f.detach() for f in fisher],
        float(lam), mode, float(ema), normalize, name,
    )


class Prepared:
    """fisher_guard over fixed ``params``, ``anchors`` and ``fisher`` lists, for a
    training loop that calls it once a step with that step's grads.

    The first call validates everything (as :func:`fisher_guard`) and packs the
    native metadata. Later calls compare the grads' and params' addresses with
    the validated ones (two C-level loops, :meth:`if_unchanged`): equal
    addresses cost nothing more. New grads (a loop that sets grads to None
    allocates new ones; ``FisherGuard.backward``'s g_kd is new every step) cost
    one C-level pass for their addresses, one for their layout, and the
    overlap re-check over the packed spans (``native.Spans``), then are
    re-pointed. torch guarantees that ``p.grad`` has p's shape, dtype and
    device, so those need no re-check. The settings (mode, ema, normalize, and
    lam unless a call gives its own) are the object's; the backend is selected
    again when MGCL_BACKEND changes.
    """

    def __init__(self, params, anchors, fisher, *, lam, mode, ema, normalize, backend=None):
        check_settings(lam, mode, ema, normalize)
        self.params, self.anchors = list(params), list(anchors)
        self.fisher = list(fisher) if fisher is not None and (mode == "ewc" or ema > 0) else None
        self.lam, self.mode, self.ema, self.normalize, self.backend = float(lam), mode, float(ema), normalize, backend
        self._gp = self._pp = None  # the validated grad and param addresses (lists, for _addresses_equal)
        self._ga = None             # the validated grad addresses as the int64 array the kernel's metadata takes
        self._idx = list(range(len(self.params)))
        self._env = self._name = None

    def __call__(self, grads: list[torch.Tensor], lam: Optional[float] = None,
                 ga: Optional[np.ndarray] = None) -> torch.Tensor:
        """The op on ``grads``; ``lam`` for this call only (FisherGuard under a GradScaler);
        ``ga``: the grads' addresses (``native.addresses``) when the caller has just read them."""
        lam = self.lam if lam is None else float(lam)
        if not self.params:
            return fisher_guard([], [], [], lam=lam, backend=self.backend)
        if ga is None:
            if self._unchanged(grads):
                return self._run(grads, lam, self._ga)
            try:
                ga = native.addresses(grads)
            except TypeError:
                raise ValueError("fisher_guard: every grad must be a tensor (a grad is None)") from None
        if self._pp is None or len(grads) != len(self.params) or \
                not _addresses_equal(self.params, self._pp, self._idx):  # first call, or params moved
            self._prepare(grads)
        elif not self._grads_look_valid(grads, ga):
            # something is off: the full check names it
            _check(grads, self.params, self.anchors, self.fisher, self.lam, self.mode, self.ema, self.normalize)
        self._ga, self._gp = ga, ga.tolist()
        return self._run(grads, lam, ga)

    def if_unchanged(self, grads: list, lam: Optional[float] = None) -> Optional[torch.Tensor]:
        """The op when every grad and param sits at its validated address (the
        step that needs no re-check), else None (a grad is None, or an address
        moved: call the object, which re-checks)."""
        if not self.params or not self._unchanged(grads):
            return None
        return self._run(grads, self.lam if lam is None else float(lam), self._ga)

    def _unchanged(self, grads: list) -> bool:
        """Two C-level sweeps (torch's own pointer comparison over a list) in
        place of two Python-level ``data_ptr`` sweeps."""
        if self._gp is None or len(grads) != len(self._gp):
            return False
        try:
            # the first grad alone first: where a backward allocated new grads, it moved too,
            # and the answer costs no list conversion
            return grads[0].data_ptr() == self._gp[0] and _addresses_equal(grads, self._gp, self._idx) and \
                _addresses_equal(self.params, self._pp, self._idx)
        except (TypeError, RuntimeError, AttributeError):  # a grad is None (or not a tensor): the full path says so
            return False

    def _run(self, grads, lam: float, ga: np.ndarray) -> torch.Tensor:
        env = os.environ.get("MGCL_BACKEND")
        if self._name is None or env != self._env:
            p0 = self.params[0]
            self._name = _backend.select("fisher_guard", BACKENDS, p0.device, self.backend, dtypes=(p0.dtype,))
            self._env = env
        run = BACKENDS[self._name]
        if self._name == "torch":
            return run(grads, self.params, self.anchors, self.fisher, lam, self.mode, self.ema, self.normalize)
        return run(grads, self.params, self.anchors, self.fisher, lam, self.mode, self.ema, self.normalize,
                   prepared=(self._meta, ga, self._rest))

    def _prepare(self, grads):
        """Everything checked (as fisher_guard), and what later calls re-check against packed."""
        _check(grads, self.params, self.anchors, self.fisher, self.lam, self.mode, self.ema, self.normalize)
        self._pp = list(map(native._ptr, self.params))
        self._rest = native.pointers(self.params, self.anchors, self.fisher)
        self._meta = native.Meta([p.numel() for p in self.params], self.params[0].device)
        # the fixed memory (params, anchors, fisher) as sorted disjoint spans, and each
        # param's layout rule, for the cheap re-check of new grads
        self._spans = native.Spans([t for ts in (self.params, self.anchors, self.fisher or ()) for t in ts],
                                   [p.numel() * p.element_size() for p in self.params])
        contiguous = [i for i, p in enumerate(self.params) if p.is_contiguous()]
        self._contiguous = None if len(contiguous) == len(self.params) else contiguous  # None: all
        self._other = [(i, dense_layout(p)) for i, p in enumerate(self.params) if not p.is_contiguous()]

    def _grads_look_valid(self, grads, ga: np.ndarray) -> bool:
        """Layout and overlap of new grads, in bulk (False: let the full check say what is wrong)."""
        contiguous = grads if self._contiguous is None else [grads[i] for i in self._contiguous]
        if not all(map(torch.Tensor.is_contiguous, contiguous)):
            return False
        if any(dense_layout(grads[i]) != layout for i, layout in self._other):
            return False
        return self._spans.first_overlap(ga) < 0


__all__ = ["fisher_guard", "Prepared", "BACKENDS", "MODES", "check_settings", "dense_layout", "describe_layout"]
