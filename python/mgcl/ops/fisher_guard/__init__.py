"""fisher_guard: the Dynamic Fisher Guard update, fused over all tensors.

    penalty = fisher_guard(grads, params, anchors, lam=..., mode="dfg")

updates every ``grads[i]`` in place with ``2*lam*W*(params[i] - anchors[i])``
and returns ``lam * sum(W*(params - anchors)**2)`` (0-d float32). The math is
in ``reference.py``; see also ``mgcl.FisherGuard`` for the training-loop API.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ... import _backend
from ..._backend import Entry
from . import native, reference

MODES = ("dfg", "ewc", "l2")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The dispatch table, in order of preference (see mgcl._backend): every entry
# has the signature (grads, params, anchors, fisher, lam, mode, ema, normalize).
BACKENDS = {
    "cuda": Entry(native.fisher_guard_cuda, devices=("cuda",), dtypes=DTYPES),
    "cpp": Entry(native.fisher_guard_cpu, devices=("cpu",), dtypes=DTYPES),
    "torch": Entry(reference.fisher_guard, devices=("cpu", "cuda"), dtypes=DTYPES),
}


def _check(grads, params, anchors, fisher, lam, mode, ema, normalize):
    if mode not in MODES:
        raise ValueError(f"fisher_guard: unknown mode {mode!r}; expected one of {MODES}")
    if normalize not in (None, "mean"):
        raise ValueError(f"fisher_guard: normalize must be None or 'mean', got {normalize!r}")
    if not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"fisher_guard: lam must be a finite number >= 0, got {lam!r}")
    if not isinstance(ema, (int, float)) or not (0.0 <= ema < 1.0):
        raise ValueError(f"fisher_guard: ema must be in [0, 1), got {ema!r}")
    if ema > 0 and mode != "dfg":
        raise ValueError(f"fisher_guard: ema applies to mode 'dfg' only (mode={mode!r})")
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
    dev, dt = grads[0].device, grads[0].dtype
    if dt not in DTYPES:
        raise ValueError(f"fisher_guard: grads[0] has dtype {dt}; supported: float32, float16, bfloat16")
    for i, g in enumerate(grads):
        trio = (("grads", g), ("params", params[i]), ("anchors", anchors[i]))
        if fisher is not None:
            trio += (("fisher", fisher[i]),)
        for name, t in trio:
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"fisher_guard: {name}[{i}] is {type(t).__name__}, not a tensor")
            if t.device != dev:
                raise ValueError(f"fisher_guard: {name}[{i}] is on {t.device}, grads[0] on {dev} (mixed devices)")
            if t.shape != g.shape:
                raise ValueError(f"fisher_guard: {name}[{i}] has shape {tuple(t.shape)}, grads[{i}] {tuple(g.shape)}")
            if not t.is_contiguous():
                raise ValueError(f"fisher_guard: {name}[{i}] is not contiguous")
            if name == "fisher":
                if t.dtype not in (torch.float32, dt):
                    raise ValueError(f"fisher_guard: fisher[{i}] has dtype {t.dtype}; expected float32 or {dt}")
            elif t.dtype != dt:
                raise ValueError(f"fisher_guard: {name}[{i}] has dtype {t.dtype}, grads[0] {dt} (mixed dtypes)")
        if fisher is not None and fisher[i].dtype != fisher[0].dtype:
            raise ValueError(f"fisher_guard: fisher[{i}] has dtype {fisher[i].dtype}, fisher[0] {fisher[0].dtype}")


@torch.library.custom_op("mgcl::fisher_guard", mutates_args=("grads", "fisher"))
def _fisher_guard_op(
    grads: list[torch.Tensor],
    params: list[torch.Tensor],
    anchors: list[torch.Tensor],
    fisher: list[torch.Tensor],
    lam: float,
    mode: str,
    ema: float,
    normalize: str,
    backend: str,
) -> torch.Tensor:
    # fisher is [] when the mode does not read it (the schema has no optional list).
    return BACKENDS[backend](grads, params, anchors, fisher or None, lam, mode, ema, normalize or None)


@_fisher_guard_op.register_fake
def _(grads, params, anchors, fisher, lam, mode, ema, normalize, backend):
    device = grads[0].device if grads else torch.device("cpu")
    return torch.empty((), dtype=torch.float32, device=device)


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
        grads, params, anchors: equal-length lists; each triple shares shape,
            dtype (float32, float16 or bfloat16) and device, contiguous.
        lam: guard strength (>= 0).
        mode: ``"dfg"`` (W = grad**2, grad holding the distillation gradient),
            ``"ewc"`` (W = ``fisher[i]``) or ``"l2"`` (W = 1).
        fisher: per-tensor importance (float32 or the grads' dtype); read by
            ewc, updated in place by dfg with ``ema > 0``.
        ema: dfg only: ``fisher = ema*fisher + (1-ema)*grad**2``, W = fisher.
        normalize: ``"mean"`` divides W by its per-tensor mean.
        backend: ``"torch"``, ``"cpp"`` or ``"cuda"``; default by device
            (see ``mgcl._backend``).

    Returns:
        0-d float32 tensor ``lam * sum(W*(param-anchor)**2)`` on the grads' device.

    Raises ValueError (naming the offending index) before touching anything.
    """
    grads, params, anchors = list(grads), list(params), list(anchors)
    fisher = list(fisher) if fisher is not None else None
    _check(grads, params, anchors, fisher, lam, mode, ema, normalize)
    device = grads[0].device if grads else torch.device("cpu")
    name = _backend.select("fisher_guard", BACKENDS, device, backend, dtypes=(grads[0].dtype,) if grads else ())
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    if fisher is not None and not (mode == "ewc" or ema > 0):
        fisher = None  # not read: keep it out of the op's mutation set
    return _fisher_guard_op(
        [g.detach() for g in grads],
        [p.detach() for p in params],
        [a.detach() for a in anchors],
        [f.detach() for f in fisher] if fisher is not None else [],
        float(lam), mode, float(ema), normalize or "", name,
    )


__all__ = ["fisher_guard", "BACKENDS", "MODES"]
