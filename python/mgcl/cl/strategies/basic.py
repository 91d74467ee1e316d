"""Zero-shot, continual fine-tuning, l2, EWC and WiSE-FT."""
from __future__ import annotations

import torch

from ...guard import FisherGuard
from .base import Loss, Strategy, TaskBatch, check_lam, check_normalize


class ZeroShot(Strategy):
    """No training: every row of R is the zero-shot vector z."""

    name = "zero-shot"
    trains = False

    def __init__(self):
        pass


class Finetune(Strategy):
    """Continual full fine-tuning with cross-entropy (the base behaviour)."""

    name = "finetune"

    def __init__(self):
        pass


class _Guarded(Strategy):
    """CE plus a FisherGuard gradient added after the CE backward (``guard.apply()``)."""

    mode = "l2"

    def setup(self, trainer):
        self.guard = FisherGuard(trainer.params, lam=self.lam, mode=self.mode, normalize=self.normalize)

    def training_loss(self, trainer, batch: TaskBatch) -> Loss:
        ce = trainer.ce(trainer.task_logits(batch.images, batch.task), batch.labels)
        return Loss([ce], {"ce": ce})

    def after_backward(self, trainer, part):
        if self.mode == "ewc" and self.guard.fisher is None:
            return  # first task: no Fisher yet
        trainer.record(self.mode, self.guard.apply())

    def state_dict(self):
        return {k: v for k, v in self.guard.state_dict().items()}

    def load_state_dict(self, sd):
        self.guard.load_state_dict(sd)


class L2(_Guarded):
    """CE + lam * sum (theta - theta*)^2, theta* = the weights after the previous
    task (the initial weights during the first task); lam = 1."""

    name = "l2"
    mode = "l2"

    def __init__(self, lam: float = 1.0, normalize=None):
        self.lam, self.normalize = check_lam(self.name, lam), check_normalize(self.name, normalize)

    def after_task(self, trainer, t):
        self.guard.consolidate()


class EWC(_Guarded):
    """CE + lam * sum F (theta - theta*)^2 with F the Fisher diagonal from CE
    gradients at the end of each task, accumulated over tasks (none during the
    first task). ``normalize="mean"`` divides F by its per-tensor mean, so
    lam = 1 weighs like the l2 baseline; ``normalize=None`` uses the raw Fisher."""

    name = "ewc"
    mode = "ewc"

    def __init__(self, lam: float = 1.0, normalize="mean", fisher_batches: int = 10):
        if fisher_batches < 1:
            raise ValueError(f"ewc: fisher_batches must be >= 1, got {fisher_batches}")
        self.lam, self.normalize = check_lam(self.name, lam), check_normalize(self.name, normalize)
        self.fisher_batches = int(fisher_batches)

    def after_task(self, trainer, t):
        batches = trainer.loader(trainer.tasks[t].train, train=False, seed=trainer.task_seed(t) + 1,
                                 iters=self.fisher_batches)

        def ce(batch):
            images, labels = batch
            with trainer.autocast():
                logits = trainer.task_logits(images.to(trainer.device), t)
            return trainer.ce(logits, labels.to(trainer.device))

        self.guard.estimate_fisher(ce, batches, accumulate=True)
        self.guard.consolidate()


class WiseFT(Strategy):
    """Fine-tune, then theta <- alpha * theta_new + (1 - alpha) * theta_prev after each task."""

    name = "wise-ft"

    def __init__(self, alpha: float = 0.8):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"wise-ft: alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.prev = None

    @torch.no_grad()
    def before_task(self, trainer, t):
        self.prev = [p.detach().clone() for p in trainer.params]

    @torch.no_grad()
    def after_task(self, trainer, t):
        for p, q in zip(trainer.params, self.prev):
            p.mul_(self.alpha).add_(q, alpha=1.0 - self.alpha)
        self.prev = None
