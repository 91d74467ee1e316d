"""PRIMED-style training with the Fisher guard in Lightning: a LightningModule mixin.

::

    import lightning as L
    from mgcl.integrations.lightning import GuardedModule

    class Primed(GuardedModule, L.LightningModule):
        def __init__(self, student, losses):
            super().__init__()
            self.student, self.primed = student, losses          # e.g. mgcl.integrations.PrimedLosses
            self.guard = {"lam": 1.0, "mode": "dfg"}             # or a mgcl.FisherGuard
            self.accumulate = 4                                  # micro-batches per optimizer step

        def compute_losses(self, batch):
            return self.primed(self.student, batch)              # distill, ce (+ ckt, cmc)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.student.parameters(), lr=1e-5)

    L.Trainer(max_steps=1000).fit(Primed(student, losses), loader)

The mixin turns on manual optimisation and owns ``training_step``: per batch
``guard.backward(distill / n, ce / n)``; on the last batch of each group of
``accumulate`` (or of the epoch) ``guard.apply()``, then optional clipping
(``clip_grad_norm``), ``optimizer.step()``, ``zero_grad()`` and the LR
schedulers' ``step()``. W therefore comes from the distillation gradient
accumulated over the whole group: ``accumulate`` batches give the step of
their concatenation. Under DDP the earlier batches of a group run inside the
strategy's ``block_backward_sync()`` (no gradient all-reduce) and
``guard.apply()`` averages g_kd over the ranks. Under ``precision="16-mixed"``
the guard is given Lightning's GradScaler. Logged with ``self.log`` each
batch: ``ce``, ``ckt``, ``cmc``, ``distill``; each step: ``penalty``.
(Lightning's own ``accumulate_grad_batches`` and ``gradient_clip_val`` do not
apply to manual optimisation: use ``accumulate`` and ``clip_grad_norm``.)
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import lightning  # noqa: F401 - the framework this module serves; fails early when it is missing

from ._primed import LOGGED, make_guard, parts

__all__ = ["GuardedModule"]


class GuardedModule:
    """Mixin for a ``LightningModule`` (put it first: ``class M(GuardedModule, L.LightningModule)``).

    Set in ``__init__``: ``self.guard`` (a ``mgcl.FisherGuard``, or a dict of its
    options, built at the first step over the module's trainable parameters),
    optionally ``self.accumulate`` (batches per optimizer step, default 1) and
    ``self.clip_grad_norm`` (None: no clipping). Implement
    ``compute_losses(batch)`` -> ``mgcl.nn.PrimedLossOutput`` or a mapping with
    ``distill`` and ``ce`` (0-d, with gradient) and optional ``ckt`` / ``cmc``.
    """

    accumulate: int = 1
    clip_grad_norm: Optional[float] = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def compute_losses(self, batch):
        raise NotImplementedError("GuardedModule: implement compute_losses(batch) -> losses with distill and ce")

    def _fisher_guard(self):
        guard = getattr(self, "guard", None)
        if guard is None:
            raise ValueError("GuardedModule: set self.guard (a mgcl.FisherGuard or a dict of its options) in __init__")
        if not hasattr(guard, "apply"):
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            self.guard = guard = make_guard(guard, self.parameters(), scaler, "GuardedModule")
        return guard

    def _group(self, batch_idx: int) -> tuple[int, bool]:
        """(batches in this batch's accumulation group, whether it is the group's last)."""
        n = self.accumulate
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"GuardedModule: accumulate must be an integer >= 1, got {n!r}")
        total = self.trainer.num_training_batches
        start = batch_idx - batch_idx % n
        if math.isfinite(total):
            n = min(n, int(total) - start)
        return n, batch_idx == start + n - 1

    def training_step(self, batch, batch_idx):
        guard = self._fisher_guard()
        n, last = self._group(batch_idx)
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        with contextlib.nullcontext() if last or block is None else block():
            losses = parts(self.compute_losses(batch), "GuardedModule")
            distill, ce = losses["distill"] / n, losses["ce"] / n
            guard.backward(distill, ce)
        self.log_dict({k: losses[k].detach().float() for k in LOGGED if k in losses}, on_step=True)
        if last:
            self.log("penalty", guard.apply().float(), on_step=True)
            opt = self.optimizers()
            if self.clip_grad_norm is not None:
                self.clip_gradients(opt, gradient_clip_val=self.clip_grad_norm, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad()
            schedulers = self.lr_schedulers()
            for s in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers is not None else []:
                s.step()
        return (distill + ce).detach()
