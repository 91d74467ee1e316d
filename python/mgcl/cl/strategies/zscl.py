"""ZSCL (Zheng et al., ICCV 2023), on mgcl's reference sets, composed of three parts:

- reference distillation (``parts.ReferenceDistillation``) on the Siphon's
  uniform set (a fixed general set, as ZSCL's; ``uniform_size`` pairs) with the
  initial model as the teacher: the row (image -> text) and column (text ->
  image) KL between the teacher's and the student's similarity softmaxes (CKT,
  no CMC), weight ``kd``;
- an l2 guard term to the initial weights, coefficient ``lam`` = 1 (the fused
  guard, W = 1, anchors never moved);
- a weight ensemble: the weights after the task are the mean of the weights
  at the task's start and after every ``we_every``-th step (and after the
  last step when the task's length is not a multiple of ``we_every``, so a
  task shorter than ``we_every`` steps still keeps what it learned).
"""
from __future__ import annotations

from .base import Loss, Strategy, TaskBatch
from .parts import GuardTerm, ReferenceDistillation, WeightEnsemble, prefixed


class ZSCL(Strategy):
    name = "zscl"
    mid_task_checkpoints = False  # the weight ensemble's running mean is not in state_dict

    def __init__(self, siphon=None, bank: str | None = None, siphon_options: dict | None = None,
                 uniform_size: int = 10000, uniform_keywords: list | None = None, ref_batch_size: int | None = None,
                 kd: float = 1.0, lam: float = 1.0, we_every: int = 100, prefetch: int = 2, backend: str | None = None):
        if isinstance(we_every, bool) or not isinstance(we_every, int) or we_every < 1:
            raise ValueError(f"zscl: we_every must be an integer >= 1, got {we_every!r}")
        self.reference = ReferenceDistillation(
            self.name, siphon=siphon, bank=bank, siphon_options=siphon_options, source="uniform",
            uniform_size=uniform_size, uniform_keywords=uniform_keywords, teacher="initial", alpha=kd, beta=0.0,
            batch_size=ref_batch_size, prefetch=prefetch, backend=backend)
        self.guard = GuardTerm(self.name, "l2", lam=lam, anchor="initial")
        self.ensemble = WeightEnsemble()
        self.we_every = we_every

    def check(self, trainer):
        self.reference.check(trainer)

    def setup(self, trainer):
        self.guard.setup(trainer)
        self.reference.setup(trainer)

    def before_task(self, trainer, t):
        self.reference.before_task(trainer, t)
        self.ensemble.start(trainer)

    def training_loss(self, trainer, batch: TaskBatch) -> Loss:
        out = self.reference(trainer, trainer.task_logits(batch.images, batch.task), batch.labels)
        return Loss([out.total], {"ce": out.ce, "kd": out.distill})

    def after_backward(self, trainer, part):
        self.guard.apply(trainer)

    def after_step(self, trainer, step):
        if (step + 1) % self.we_every == 0:
            self.ensemble.add(trainer)

    def after_task(self, trainer, t):
        self.reference.after_task(trainer, t)
        if trainer.train_config.iters_per_task % self.we_every:
            self.ensemble.add(trainer)  # the last step joins the ensemble
        self.ensemble.merge(trainer)
        self.guard.after_task(trainer, t)

    def state_dict(self):
        return {**{f"guard.{k}": v for k, v in self.guard.state_dict().items()},
                **{f"reference.{k}": v for k, v in self.reference.state_dict().items()}}

    def load_state_dict(self, sd):
        self.guard.load_state_dict(prefixed(sd, "guard."))
        self.reference.load_state_dict(prefixed(sd, "reference."))
