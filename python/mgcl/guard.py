"""FisherGuard: the Dynamic Fisher Guard for any PyTorch training loop."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from .ops.fisher_guard import MODES, fisher_guard


class FisherGuard:
    """The Dynamic Fisher Guard (SPEC.md section 6) for any training loop.

    The order inside one step (DFG)::

        guard = mgcl.FisherGuard(model.parameters(), lam=1e3, mode="dfg")
        ...
        for batch, ref_batch in loader:
            opt.zero_grad()
            out = loss_fn(model, batch, ref_batch)     # e.g. mgcl.nn.PrimedLoss
            out.distill.backward(retain_graph=True)    # 1. p.grad = g_kd
            penalty = guard.apply()                    # 2. p.grad += 2*lam*g_kd**2*(p - p*)
            out.ce.backward()                          # 3. CE accumulates on top
            opt.step()
        guard.consolidate()                            # end of task: p* <- p

    ``mode="l2"`` uses W = 1 and ``mode="ewc"`` a Fisher diagonal fixed at the end
    of the previous task (``estimate_fisher``). The anchors start as the weights
    at construction. ``apply`` runs the fused :func:`mgcl.ops.fisher_guard.fisher_guard`
    over every parameter whose ``.grad`` is set, one call per (device, dtype) group.
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
    ):
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("FisherGuard: no parameters given")
        for i, p in enumerate(self.params):
            if not isinstance(p, torch.Tensor):
                raise ValueError(f"FisherGuard: params[{i}] is {type(p).__name__}, not a tensor")
        if mode not in MODES:
            raise ValueError(f"FisherGuard: unknown mode {mode!r}; expected one of {MODES}")
        if lam < 0:
            raise ValueError(f"FisherGuard: lam must be >= 0, got {lam}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"FisherGuard: ema must be in [0, 1), got {ema}")
        if ema > 0 and mode != "dfg":
            raise ValueError("FisherGuard: ema applies to mode 'dfg' only")
        if normalize not in (None, "mean"):
            raise ValueError(f"FisherGuard: normalize must be None or 'mean', got {normalize!r}")
        self.lam, self.mode, self.ema, self.normalize, self.backend = float(lam), mode, float(ema), normalize, backend
        self.anchors: list[torch.Tensor] = []
        # fisher: the EWC diagonal, or the DFG moving average (ema > 0); float32.
        self.fisher: Optional[list[torch.Tensor]] = None
        if ema > 0:
            self.fisher = [torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                           for p in self.params]
        self.consolidate()

    @torch.no_grad()
    def consolidate(self) -> None:
        """Snapshot the current weights as the anchors theta* (call at the end of a task)."""
        self.anchors = [p.detach().clone(memory_format=torch.contiguous_format) for p in self.params]

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
        est = [torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format) for p in self.params]
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
        return self.fisher

    @torch.no_grad()
    def apply(self) -> torch.Tensor:
        """Add the guard gradient to every ``p.grad`` that is set; return the penalty (0-d float32)."""
        uses_fisher = self.mode == "ewc" or self.ema > 0
        if uses_fisher and self.fisher is None:
            raise RuntimeError("FisherGuard(mode='ewc'): call estimate_fisher() before apply()")
        groups: dict = {}
        for i, p in enumerate(self.params):
            if p.grad is not None:
                groups.setdefault((p.grad.device, p.grad.dtype), []).append(i)
        total = None
        for idx in groups.values():
            pen = fisher_guard(
                [self.params[i].grad for i in idx],
                [self.params[i] for i in idx],
                [self.anchors[i] for i in idx],
                lam=self.lam,
                mode=self.mode,
                fisher=[self.fisher[i] for i in idx] if uses_fisher else None,
                ema=self.ema,
                normalize=self.normalize,
                backend=self.backend,
            )
            total = pen if total is None else total + pen.to(total.device)
        return total if total is not None else torch.zeros((), dtype=torch.float32)

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
        n = len(self.params)
        anchors = [sd.get(f"anchor.{i}") for i in range(n)]
        if any(a is None for a in anchors) or f"anchor.{n}" in sd:
            raise ValueError(f"FisherGuard.load_state_dict: expected anchors anchor.0..anchor.{n - 1}")
        for i, (a, p) in enumerate(zip(anchors, self.params)):
            if a.shape != p.shape:
                raise ValueError(f"FisherGuard.load_state_dict: anchor.{i} has shape {tuple(a.shape)}, param {tuple(p.shape)}")
        self.anchors = [a.to(p.device, p.dtype).contiguous().clone() for a, p in zip(anchors, self.params)]
        if "fisher.0" in sd:
            self.fisher = [sd[f"fisher.{i}"].to(p.device, torch.float32).contiguous().clone()
                           for i, p in enumerate(self.params)]
        if "lam" in sd:
            self.lam = float(sd["lam"])
        if "ema" in sd:
            self.ema = float(sd["ema"])
