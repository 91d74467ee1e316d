"""FisherGuard: the Dynamic Fisher Guard (SPEC.md section 6) for any PyTorch training loop.

The guarded step, the same in every setting::

    guard = mgcl.FisherGuard(model.parameters(), lam=1e3, mode="dfg")
    for batches in loader:                        # one step: one or more micro-batches
        for batch in batches:
            out = loss_fn(model, batch)           # e.g. mgcl.nn.PrimedLoss
            guard.backward(out.distill, out.ce)   # g_kd kept apart, CE backwarded into p.grad
        penalty = guard.apply()                   # p.grad += g_kd + 2*lam*W*(p - p*), W = g_kd**2
        opt.step()
        opt.zero_grad()
    guard.consolidate()                           # end of task: p* <- p

``guard.backward(distill, ce)`` accumulates the distillation gradient g_kd of
every micro-batch apart from ``p.grad`` (``torch.autograd.grad``) and
backwards ``ce`` as usual; ``guard.apply()`` makes W from the step's whole g_kd,
adds g_kd and the guard gradient to ``p.grad`` and returns the penalty
``lam * sum W (p - p*)**2``. Scale the losses for accumulation as you would
without the guard (``loss / N``). The settings:

- **gradient accumulation**: call ``guard.backward`` per micro-batch; W comes
  from the accumulated g_kd, so N micro-batches equal one step on their
  concatenation.
- **DDP**: as usual (``model.no_sync()`` on all but the last micro-batch, if
  accumulating). DDP all-reduces the CE gradient in the last backward;
  ``apply()`` all-reduces g_kd once (``process_group``, default: the world
  group when torch.distributed is initialised), so W comes from the globally
  averaged g_kd and the replicas stay identical. The CE loss must reach every
  parameter the distillation loss reaches (DDP's own rule for one backward).
- **fp16 with a GradScaler**: ``FisherGuard(..., scaler=scaler)`` and pass the
  *unscaled* losses: the guard scales them, unscales g_kd before squaring it,
  and on a step with inf/NaN gradients (which the scaler will skip) changes no
  state of its own (no EMA update).
- **bf16 autocast, torch.compile'd models**: nothing to do.

The original order still holds in a plain loop (one micro-batch, no DDP, no
scaler): ``out.distill.backward(retain_graph=True); guard.apply();
out.ce.backward()``, ``apply()`` then taking W from ``p.grad``. ``mode="l2"``
uses W = 1 and ``mode="ewc"`` a Fisher diagonal fixed at the end of the
previous task (``estimate_fisher``); for both, ``guard.backward`` is one
backward of ``distill + ce`` and ``apply()`` adds the guard gradient. Each
``apply()`` costs one pointer check of host time on the prepared path
(``mgcl.ops.fisher_guard.Prepared``); the anchors and the Fisher change only
through ``consolidate``, ``estimate_fisher`` and ``load_state_dict``.
"""
from __future__ import annotations

import operator
from typing import Callable, Iterable, Optional

import torch

from . import _backend
from .ops.fisher_guard import BACKENDS, Prepared, check_settings, dense_layout, describe_layout, fisher_guard
from .ops.fisher_guard.native import addresses

_grad = operator.attrgetter("grad")


class FisherGuard:
    """The Dynamic Fisher Guard (dfg | ewc | l2) around any optimizer step; see the module doc.

    Args:
        params: the parameters to guard (dense tensors; channels_last is fine).
        lam: guard strength, a finite number >= 0.
        mode: ``"dfg"`` (W = g_kd**2), ``"ewc"`` (W = the Fisher diagonal) or ``"l2"`` (W = 1).
        ema: dfg only: W is an exponential moving average of g_kd**2 with this factor.
        normalize: ``"mean"`` divides W by its per-tensor mean.
        backend: the fisher_guard backend (default by device).
        scaler: a ``torch.amp.GradScaler`` when training with one.
        process_group: the group over which ``apply()`` averages g_kd.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        lam: float,
        mode: str = "dfg",
        ema: float = 0.0,
        normalize: Optional[str] = None,
        backend: Optional[str] = None,
        scaler=None,
        process_group=None,
    ):
        self.params = list(params)
        if not self.params:
            raise ValueError("FisherGuard: no parameters given")
        for i, p in enumerate(self.params):
            if not isinstance(p, torch.Tensor):
                raise ValueError(f"FisherGuard: params[{i}] is {type(p).__name__}, not a tensor")
            if not p.is_floating_point():
                raise ValueError(f"FisherGuard: params[{i}] has dtype {p.dtype}; the guard needs floating parameters")
            if dense_layout(p) is None:
                raise ValueError(f"FisherGuard: params[{i}] is not dense ({describe_layout(p)}): the fused guard "
                                 "walks each tensor as one flat array")
        check_settings(lam, mode, ema, normalize, "FisherGuard")
        if backend is not None:
            _backend.offered("fisher_guard", BACKENDS, backend)
        if scaler is not None and not callable(getattr(scaler, "scale", None)):
            raise ValueError(f"FisherGuard: scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.lam, self.mode, self.ema, self.normalize = float(lam), mode, float(ema), normalize
        self.backend, self.scaler, self.process_group = backend, scaler, process_group
        self.anchors: list[torch.Tensor] = []
        # fisher: the EWC diagonal, or the DFG moving average (ema > 0); float32, the params' layout.
        self.fisher: Optional[list[torch.Tensor]] = None
        if self.ema > 0:
            self.fisher = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        # the key of the prepared groups when every grad is set; a frozenset caches its hash
        # (a 302-int tuple's is recomputed on each lookup, twice a step on the new-address path)
        self._all = frozenset(range(len(self.params)))
        self._kd: Optional[list] = None         # this step's accumulated g_kd (guard.backward)
        self._versions: Optional[list] = None   # the params' versions at the step's first backward
        self.consolidate()

    # ---- state: anchors, fisher ---------------------------------------------------------

    @torch.no_grad()
    def consolidate(self) -> None:
        """Snapshot the current weights as the anchors theta* (call at the end of a task)."""
        self.anchors = [p.detach().clone() for p in self.params]  # clone keeps each param's layout
        self._prepared: dict = {}

    def estimate_fisher(
        self,
        loss_fn: Callable[[object], torch.Tensor],
        batches: Iterable,
        *,
        accumulate: bool = False,
    ) -> list[torch.Tensor]:
        """EWC's Fisher diagonal: the mean over ``batches`` of ``grad(loss_fn(batch))**2``.

        ``accumulate=True`` adds it to the stored Fisher (EWC over several
        tasks) instead of replacing it. The parameters' ``.grad`` are restored.
        """
        saved = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        est = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        n = 0
        for batch in batches:
            for p in self.params:
                p.grad = None
            loss = loss_fn(batch)
            loss.backward()
            with torch.no_grad():
                for e, p in zip(est, self.params):
                    if p.grad is not None:
                        e.add_(p.grad.float() ** 2)
            n += 1
        if n == 0:
            raise ValueError("FisherGuard.estimate_fisher: no batches")
        for e in est:
            e.div_(n)
        for p, g in zip(self.params, saved):
            p.grad = g
        if accumulate and self.fisher is not None:
            for f, e in zip(self.fisher, est):
                f.add_(e)
        else:
            self.fisher = est
        self._prepared = {}
        return self.fisher

    # ---- the step -----------------------------------------------------------------------

    def backward(self, distill: torch.Tensor, ce: torch.Tensor, *, retain_graph: bool = False) -> None:
        """One micro-batch: keep the distillation gradient apart (dfg), backward ``ce``.

        Pass the losses unscaled by any GradScaler (give the guard ``scaler=``).
        """
        for name, loss in (("distill", distill), ("ce", ce)):
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(f"FisherGuard.backward: {name} must be a 0-d loss tensor")
            if self.scaler is not None and _scaled_by(loss, self.scaler):
                raise ValueError(f"FisherGuard.backward: {name} is already scaled by the guard's GradScaler; "
                                 "pass the unscaled loss (the guard scales it)")
        self._check_step()
        if self.scaler is not None:
            distill, ce = self.scaler.scale(distill), self.scaler.scale(ce)
        if self.mode != "dfg":  # W does not read g_kd: one backward of the sum, apply() as in the original order
            total = distill + ce
            if total.requires_grad:
                total.backward(retain_graph=retain_graph)
            return
        if self._kd is None:
            self._kd = [None] * len(self.params)
        if distill.requires_grad:  # (a first task without a teacher passes a constant)
            self._keep(distill)
        if ce.requires_grad:
            ce.backward(retain_graph=retain_graph)

    @torch.no_grad()
    def _keep(self, distill: torch.Tensor) -> None:
        """Add this micro-batch's g_kd to the step's (torch.autograd.grad: no .grad, no DDP hook)."""
        idx = [i for i, p in enumerate(self.params) if p.requires_grad]
        with torch.enable_grad():
            kd = torch.autograd.grad(distill, [self.params[i] for i in idx], retain_graph=True, allow_unused=True)
        into, more = [], []
        for i, g in zip(idx, kd):
            if g is None:
                continue
            if self._kd[i] is None:  # autograd.grad's layout is the graph's; the op wants the param's
                p = self.params[i]
                self._kd[i] = g if g.stride() == p.stride() or dense_layout(g) == dense_layout(p) \
                    else torch.empty_like(p).copy_(g)
            else:
                into.append(self._kd[i])
                more.append(g)
        if into:
            torch._foreach_add_(into, more)

    def _check_step(self) -> None:
        """A step's micro-batches must end with apply() before the optimizer moves the weights."""
        versions = [p._version for p in self.params]
        if self._kd is not None and self._versions is not None and versions != self._versions:
            self._kd = None
            raise RuntimeError("FisherGuard: the parameters changed since this step's first guard.backward(); "
                               "call guard.apply() before optimizer.step()")
        self._versions = versions

    def apply(self) -> torch.Tensor:
        """Add the guard gradient to the parameters' gradients; return the penalty (0-d float32).

        After ``guard.backward`` (dfg): ``p.grad += g_kd + 2*lam*W*(p - p*)`` with
        W from this step's g_kd. Otherwise (the original order, or ewc / l2): the
        guard gradient on every ``p.grad`` that is set, W from ``p.grad``.
        """
        # no_grad by hand: torch.no_grad() as a decorator builds a context object per call,
        # a few us of the ~100 us budget of this call (see mgcl bench fisher_guard)
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():
            with torch.no_grad():
                return self._apply()
        torch._C._set_grad_enabled(False)
        try:
            return self._apply()
        finally:
            torch._C._set_grad_enabled(True)

    def _apply(self) -> torch.Tensor:
        uses_fisher = self.mode == "ewc" or self.ema > 0
        if self.mode == "ewc" and self.fisher is None:
            raise RuntimeError("FisherGuard(mode='ewc'): call estimate_fisher() before apply()")
        kd, self._kd, self._versions = self._kd, None, None
        if kd is None:
            grads = list(map(_grad, self.params))
            if self.scaler is None or not _enabled(self.scaler):
                return self._guard(grads, uses_fisher)
            if self.mode == "dfg":
                raise RuntimeError("FisherGuard with a GradScaler: use guard.backward(distill, ce) then "
                                   "guard.apply(); in the original order p.grad holds the scaled g_kd")
            # l2 / ewc: W does not read p.grad; the guard gradient joins p.grad's scale
            scale = float(self.scaler.get_scale())
            return self._guard(grads, uses_fisher, self.lam * scale) / scale
        kd = self._all_reduce(kd)
        grads = list(map(_grad, self.params))
        scale = 1.0
        if self.scaler is not None and _enabled(self.scaler):
            scale, finite = _unscale(kd, grads, self.scaler)
            if not finite:  # the scaler skips this step: so does the guard's state
                _add(grads, kd, self.params, scale)
                return torch.full((), float("nan"))
        penalty = self._guard(kd, uses_fisher)
        _add(grads, kd, self.params, scale)
        return penalty

    def _guard(self, grads: list, uses_fisher: bool, lam: Optional[float] = None) -> torch.Tensor:
        """fisher_guard over the present ``grads``, one call per (device, dtype) group."""
        fisher = self.fisher if uses_fisher else None
        lam = self.lam if lam is None else lam
        if torch.compiler.is_compiling():  # the op itself; the prepared path reads addresses
            return self._unprepared(grads, fisher, lam)
        groups = self._prepared.get(self._all)
        if groups is not None and len(groups) == 1:  # the common case: nothing moved since the last step
            penalty = groups[0][1].if_unchanged(grads, lam)
            if penalty is not None:
                return penalty
        try:  # every grad set: their addresses, which the prepared path needs anyway
            ga = addresses(grads)
            key = self._all
        except TypeError:  # a grad is None
            ga, key = None, frozenset(i for i, g in enumerate(grads) if g is not None)
        groups = self._prepared.get(key)
        if groups is None:
            by: dict = {}
            for i in sorted(key):
                by.setdefault((grads[i].device, grads[i].dtype), []).append(i)
            groups = [(idx, Prepared([self.params[i] for i in idx], [self.anchors[i] for i in idx],
                                     None if fisher is None else [fisher[i] for i in idx], lam=self.lam,
                                     mode=self.mode, ema=self.ema, normalize=self.normalize, backend=self.backend))
                      for idx in by.values()]
            if len(self._prepared) >= 8:
                self._prepared.pop(next(iter(self._prepared)))
            self._prepared[key] = groups
        if not groups:
            return torch.zeros((), dtype=torch.float32)
        if len(groups) == 1 and ga is not None:
            return groups[0][1](grads, lam, ga)
        pens = [run([grads[i] for i in idx], lam) for idx, run in groups]
        return sum(p.to(pens[0].device) for p in pens[1:]) if len(pens) > 1 else pens[0]

    def _unprepared(self, grads, fisher, lam):
        total = torch.zeros((), dtype=torch.float32)
        by: dict = {}
        for i, g in enumerate(grads):
            if g is not None:
                by.setdefault((g.device, g.dtype), []).append(i)
        for idx in by.values():
            pen = fisher_guard([grads[i] for i in idx], [self.params[i] for i in idx],
                               [self.anchors[i] for i in idx], lam=lam, mode=self.mode,
                               fisher=None if fisher is None else [fisher[i] for i in idx], ema=self.ema,
                               normalize=self.normalize, backend=self.backend)
            total = total.to(pen.device) + pen
        return total

    def _all_reduce(self, kd: list) -> list:
        """g_kd averaged over the process group (one all-reduce per dtype, normally one)."""
        import torch.distributed as dist  # noqa: PLC0415

        if not (dist.is_available() and dist.is_initialized()):
            return kd
        group = self.process_group or dist.group.WORLD
        world = dist.get_world_size(group)
        if world == 1:
            return kd
        by: dict = {}
        for i, p in enumerate(self.params):
            by.setdefault(p.dtype, []).append(i)
        out = list(kd)
        for idx in by.values():
            # every rank sends every tensor (zeros where its distillation loss left one unset),
            # in the parameter order, in one flat buffer
            parts = [kd[i] if kd[i] is not None else torch.zeros_like(self.params[i]) for i in idx]
            flat = torch.cat([t.reshape(-1) for t in parts])
            dist.all_reduce(flat, group=group)
            flat.div_(world)
            views = flat.split([t.numel() for t in parts])
            for i, v in zip(idx, views):
                p = self.params[i]
                out[i] = v.view(p.shape) if p.is_contiguous() else torch.empty_like(p).copy_(v.view(p.shape))
        return out

    # ---- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors only (safetensors-friendly): anchors, fisher, and the settings."""
        sd = {f"anchor.{i}": a for i, a in enumerate(self.anchors)}
        if self.fisher is not None:
            sd.update({f"fisher.{i}": f for i, f in enumerate(self.fisher)})
        sd["lam"] = torch.tensor(self.lam, dtype=torch.float64)
        sd["ema"] = torch.tensor(self.ema, dtype=torch.float64)
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load anchors, fisher, lam and ema; everything is checked before anything changes."""
        who = "FisherGuard.load_state_dict"
        if not isinstance(sd, dict):
            raise ValueError(f"{who}: expected a dict of tensors, got {type(sd).__name__}")
        n = len(self.params)
        anchors = [f"anchor.{i}" for i in range(n)]
        fishers = [f"fisher.{i}" for i in range(n)]
        unknown = sorted(set(sd) - set(anchors) - set(fishers) - {"lam", "ema"})
        if unknown:
            raise ValueError(f"{who}: unexpected keys {unknown[:5]}; expected anchor.0..anchor.{n - 1}, "
                             f"optional fisher.0..fisher.{n - 1}, lam, ema")
        missing = [k for k in anchors if k not in sd]
        if missing:
            raise ValueError(f"{who}: missing {missing[:5]} (expected anchor.0..anchor.{n - 1} for {n} parameters)")
        has_fisher = [k in sd for k in fishers]
        if any(has_fisher) and not all(has_fisher):
            raise ValueError(f"{who}: fisher entries for {sum(has_fisher)} of {n} parameters; all or none")
        for key in anchors + [k for k, h in zip(fishers, has_fisher) if h]:
            t, p = sd[key], self.params[int(key.split(".")[1])]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"{who}: {key} must be a floating tensor, got "
                                 f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
            if t.shape != p.shape:
                raise ValueError(f"{who}: {key} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{who}: {key} holds inf or NaN")
        settings = {}
        for key in ("lam", "ema"):
            if key in sd:
                t = sd[key]
                if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point():
                    raise ValueError(f"{who}: {key} must be a one-element floating tensor")
                settings[key] = float(t)
        lam, ema = settings.get("lam", self.lam), settings.get("ema", self.ema)
        check_settings(lam, self.mode, ema, self.normalize, who)
        if ema > 0 and not all(has_fisher) and self.fisher is None:
            raise ValueError(f"{who}: ema={ema} needs the fisher.* entries")
        # all checked: build, then swap in
        new_anchors = [torch.empty_like(p).copy_(sd[k]) for k, p in zip(anchors, self.params)]
        new_fisher = self.fisher
        if all(has_fisher):
            new_fisher = [torch.empty_like(p, dtype=torch.float32).copy_(sd[k]) for k, p in zip(fishers, self.params)]
        self.anchors, self.fisher, self.lam, self.ema = new_anchors, new_fisher, lam, ema
        self._prepared = {}


# ---- helpers --------------------------------------------------------------------------


def _enabled(scaler) -> bool:
    return scaler.is_enabled() if hasattr(scaler, "is_enabled") else True


def _scaled_by(loss: torch.Tensor, scaler) -> bool:
    """Whether ``loss`` is ``scaler.scale(x)`` (its last op multiplies by the scaler's scale)."""
    scale = getattr(scaler, "_scale", None)
    other = getattr(loss.grad_fn, "_saved_other", None)
    return isinstance(scale, torch.Tensor) and isinstance(other, torch.Tensor) and \
        other.numel() == 1 and float(other) == float(scale)


def _unscale(kd: list, grads: list, scaler) -> tuple[float, bool]:
    """Unscale g_kd in place (W must see the true gradient); the scale, and whether
    every gradient (g_kd and the scaled CE gradient in p.grad) is finite."""
    scale = float(scaler.get_scale())
    kd = [k for k in kd if k is not None]
    rest = [g for g in grads if g is not None]
    if not kd:
        return scale, True
    found = torch.zeros(1, device=kd[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(kd, found, torch.full((1,), 1.0 / scale, device=found.device))
    if rest:
        norms = torch.stack([n.to(found.device) for n in torch._foreach_norm(rest)])
        found += (~torch.isfinite(norms)).any()
    return scale, not bool(found.item())


def _add(grads: list, kd: list, params: list, scale: float) -> None:
    """p.grad += scale * g_kd (p.grad is g_kd where the CE left it unset)."""
    pairs = [(g, k) for g, k in zip(grads, kd) if g is not None and k is not None]
    if pairs:
        torch._foreach_add_([g for g, _ in pairs], [k for _, k in pairs], alpha=scale)
    for p, g, k in zip(params, grads, kd):
        if g is None and k is not None:
            p.grad = k.mul_(scale) if scale != 1.0 else k
