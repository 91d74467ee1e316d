"""PRIMED (SPEC.md sections 4-6): distillation on retrieved reference pairs
plus the Dynamic Fisher Guard, composed of two parts (``parts.py``): a
``ReferenceDistillation`` and a ``GuardTerm``.

One step (regularizer "dfg")::

    out = PrimedLoss(task logits, labels, reference-batch features of student and teacher)
    out.distill.backward(retain_graph=True)   # p.grad = d(alpha*CKT + beta*CMC)/dp
    guard.apply()                             # p.grad += 2*lam*p.grad**2*(p - p*)
    out.ce.backward()                         # CE on top
    optimizer.step()

p* = the weights after the previous task (the initial weights during the
first). The options cover the paper's ablations:

- ``retrieval``: "dynamic" (the Siphon's reference set, rebuilt before each
  task from the finished tasks) or "uniform" (one fixed set over the domain
  keywords, ``uniform_size`` pairs);
- ``stages``: the retrieval pipeline each query runs (SPEC.md section 3):
  "multi-stage" (dense with ties -> visual rerank -> group by caption -> BM25
  gate -> sort), "dense-only" (the dense stage alone) or "bm25-only" (BM25
  over the whole bank's captions); it combines with either ``retrieval``;
- ``teacher``: "last" (the model after the previous task), "initial", or
  "avg" (0.5 * (initial + last), parameter-wise);
- ``regularizer``: "dfg", "l2" (W = 1), "ewc" (Fisher from CE gradients at the
  end of each task, accumulated) or "none";
- ``ckt`` / ``cmc``: each term on or off (weights ``alpha`` / ``beta``);
- ``direction``: "both", "image" (row KL only: image -> text) or "text"
  (column KL only).

``normalize="mean"`` (default) divides the guard's W by its per-tensor mean
(as GIFT does), so ``lam = 1`` weighs like the l2 baseline's coefficient and
the regularizer ablation compares where the weight goes, not how much.
``level_weights`` weighs reference pairs by level (task / domain / general).
With both losses off PRIMED needs no reference set (``reference`` is None).
"""
from __future__ import annotations

from .base import Loss, Strategy, TaskBatch
from .parts import GuardTerm, ReferenceDistillation, prefixed


class Primed(Strategy):
    name = "primed"

    def __init__(self, siphon=None, bank: str | None = None, siphon_options: dict | None = None,
                 retrieval: str = "dynamic", uniform_size: int = 10000, uniform_keywords: list | None = None,
                 ref_batch_size: int | None = None,
                 level_weights: dict | None = None, alpha: float = 1.0, beta: float = 0.25, ckt: bool = True,
                 cmc: bool = True, direction: str = "both", teacher: str = "last", regularizer: str = "dfg",
                 lam: float = 1.0, normalize: str | None = "mean", ema: float = 0.0, fisher_batches: int = 10,
                 prefetch: int = 2, backend: str | None = None, stages: str = "multi-stage"):
        reference = ReferenceDistillation(
            self.name, siphon=siphon, bank=bank, siphon_options=siphon_options, source=retrieval,
            uniform_size=uniform_size, uniform_keywords=uniform_keywords, teacher=teacher,
            alpha=alpha if ckt else 0.0, beta=beta if cmc else 0.0, direction=direction, level_weights=level_weights,
            batch_size=ref_batch_size, prefetch=prefetch, backend=backend, stages=stages)
        self.guard = GuardTerm(self.name, regularizer, lam=lam, normalize=normalize, ema=ema,
                               fisher_batches=fisher_batches)
        distills = reference.alpha > 0 or reference.beta > 0
        if regularizer == "dfg" and not distills:
            raise ValueError("primed: regularizer 'dfg' needs a distillation loss (ckt or cmc on, weight > 0)")
        self.reference = reference if distills else None

    def check(self, trainer):
        if self.reference is not None:
            self.reference.check(trainer)

    def setup(self, trainer):
        self.guard.setup(trainer)
        if self.reference is not None:
            self.reference.setup(trainer)

    def before_task(self, trainer, t):
        if self.reference is not None:
            self.reference.before_task(trainer, t)

    def training_loss(self, trainer, batch: TaskBatch) -> Loss:
        logits = trainer.task_logits(batch.images, batch.task)
        if self.reference is None:
            ce = trainer.ce(logits, batch.labels)
            return Loss([ce], {"ce": ce})
        out = self.reference(trainer, logits, batch.labels)
        terms = {"ce": out.ce, "ckt": out.ckt, "cmc": out.cmc, "distill": out.distill}
        if self.guard.mode == "dfg":
            return Loss([out.distill, out.ce], terms)
        return Loss([out.total], terms)

    def after_backward(self, trainer, part):
        if part == 0:
            self.guard.apply(trainer)  # dfg: between the distillation and the CE backward

    def after_task(self, trainer, t):
        if self.reference is not None:
            self.reference.after_task(trainer, t)
        self.guard.after_task(trainer, t)

    def state_dict(self):
        sd = {f"guard.{k}": v for k, v in self.guard.state_dict().items()}
        if self.reference is not None:
            sd.update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})
        return sd

    def load_state_dict(self, sd):
        self.guard.load_state_dict(prefixed(sd, "guard."))
        if self.reference is not None:
            self.reference.load_state_dict(prefixed(sd, "reference."))
