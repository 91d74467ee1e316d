"""PRIMED (SPEC.md sections 4-6): distillation on retrieved reference pairs
plus the Dynamic Fisher Guard.

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
"""
from __future__ import annotations

import torch

from ...guard import FisherGuard
from .base import Loss, Strategy, TaskBatch, check_choice, check_lam, check_normalize, frozen_copy
from .refdata import Prefetch, endless, open_siphon

TEACHERS = ("last", "initial", "avg")
REGULARIZERS = ("dfg", "l2", "ewc", "none")
DIRECTIONS = {"both": (1.0, 1.0), "image": (1.0, 0.0), "text": (0.0, 1.0)}
RETRIEVALS = ("dynamic", "uniform")


class Primed(Strategy):
    name = "primed"

    def __init__(self, siphon=None, bank: str | None = None, siphon_options: dict | None = None,
                 retrieval: str = "dynamic", uniform_size: int = 10000, uniform_keywords: list | None = None,
                 ref_batch_size: int | None = None,
                 level_weights: dict | None = None, alpha: float = 1.0, beta: float = 0.25, ckt: bool = True,
                 cmc: bool = True, direction: str = "both", teacher: str = "last", regularizer: str = "dfg",
                 lam: float = 1.0, normalize: str | None = "mean", ema: float = 0.0, fisher_batches: int = 10,
                 prefetch: int = 2, backend: str | None = None):
        n = self.name
        self.siphon, self.bank, self.siphon_options = siphon, bank, siphon_options
        self.retrieval = check_choice(n, "retrieval", retrieval, RETRIEVALS)
        self.teacher = check_choice(n, "teacher", teacher, TEACHERS)
        self.regularizer = check_choice(n, "regularizer", regularizer, REGULARIZERS)
        self.direction = check_choice(n, "direction", direction, tuple(DIRECTIONS))
        self.lam, self.normalize = check_lam(n, lam), check_normalize(n, normalize)
        if alpha < 0 or beta < 0:
            raise ValueError(f"primed: alpha and beta must be >= 0, got {alpha}, {beta}")
        if not 0.0 <= ema < 1.0 or (ema > 0 and regularizer != "dfg"):
            raise ValueError(f"primed: ema must be in [0, 1) and applies to regularizer 'dfg' only, got {ema}")
        if ref_batch_size is not None and ref_batch_size < 2:
            raise ValueError(f"primed: ref_batch_size must be >= 2, got {ref_batch_size}")
        if uniform_size < 1 or fisher_batches < 1 or prefetch < 0:
            raise ValueError("primed: uniform_size and fisher_batches must be >= 1, prefetch >= 0")
        self.alpha, self.beta, self.ckt, self.cmc = float(alpha), float(beta), bool(ckt), bool(cmc)
        if self.regularizer == "dfg" and not self.distills:
            raise ValueError("primed: regularizer 'dfg' needs a distillation loss (ckt or cmc on, weight > 0)")
        self.uniform_size, self.ref_batch_size, self.level_weights = int(uniform_size), ref_batch_size, level_weights
        self.uniform_keywords = uniform_keywords
        self.ema, self.fisher_batches, self.prefetch, self.backend = float(ema), int(fisher_batches), prefetch, backend
        self.guard = None
        self.initial = None
        self.teacher_model = None
        self.refset = None
        self.refs = None
        self.loss = None

    @property
    def distills(self) -> bool:
        return (self.ckt and self.alpha > 0) or (self.cmc and self.beta > 0)

    def check(self, trainer):
        if self.distills:
            if self.siphon is None and self.bank is None:
                raise ValueError("primed: needs a reference set: pass siphon=mgcl.retrieval.Siphon(...) or bank=<dir>")
            if self.retrieval == "dynamic" and self.siphon is not None and not hasattr(self.siphon, "reference_set"):
                raise ValueError("primed: siphon has no reference_set(history)")

    def setup(self, trainer):
        from ...nn import PrimedLoss  # noqa: PLC0415

        i2t, t2i = DIRECTIONS[self.direction]
        self.loss = PrimedLoss(alpha=self.alpha if self.ckt else 0.0, beta=self.beta if self.cmc else 0.0,
                               label_smoothing=trainer.label_smoothing, i2t=i2t, t2i=t2i, backend=self.backend)
        if self.distills:
            self.siphon = open_siphon(self.siphon, self.bank, self.siphon_options, self.name)
        if self.regularizer != "none":
            mode = "l2" if self.regularizer == "l2" else self.regularizer
            self.guard = FisherGuard(trainer.params, lam=self.lam, mode=mode, normalize=self.normalize, ema=self.ema)
        if self.teacher in ("initial", "avg"):
            self.initial = [p.detach().clone() for p in trainer.params]
        if self.distills and self.retrieval == "uniform":
            self.refset = self.siphon.uniform_set(self.uniform_size, self.uniform_keywords)

    @torch.no_grad()
    def before_task(self, trainer, t):
        if not self.distills:
            return
        self.teacher_model = frozen_copy(trainer.model)
        if self.teacher != "last":
            named = dict(self.teacher_model.named_parameters())
            for name, p, p0 in zip(trainer.param_names, trainer.params, self.initial):
                named[name].copy_(p0 if self.teacher == "initial" else 0.5 * (p0 + p))
        if self.retrieval == "dynamic":
            self.refset = self.siphon.reference_set(trainer.tasks[:t])
        trainer.log(f"primed: task {t + 1}: {len(self.refset)} reference pairs {self.refset.level_counts()}")
        stream = endless(self.refset, trainer.model, self.ref_batch_size or trainer.batch_size,
                         seed=trainer.task_seed(t), level_weights=self.level_weights)
        self.refs = Prefetch(stream, self.prefetch) if self.prefetch else stream

    def training_loss(self, trainer, batch: TaskBatch) -> Loss:
        logits = trainer.task_logits(batch.images, batch.task)
        if not self.distills:
            ce = trainer.ce(logits, batch.labels)
            return Loss([ce], {"ce": ce})
        ref = next(self.refs)
        dev = trainer.device
        images, tokens = ref.images.to(dev, non_blocking=True), ref.tokens.to(dev, non_blocking=True)
        m, tm = trainer.model, self.teacher_model
        img_s, txt_s = m.encode_image(images).float(), m.encode_text(tokens).float()
        with torch.no_grad():
            img_t, txt_t = tm.encode_image(images).float(), tm.encode_text(tokens).float()
        with trainer.fp32():
            out = self.loss(logits.float(), batch.labels, img_s, txt_s, img_t, txt_t, m.logit_scale.exp().float(),
                            tm.logit_scale.exp().float(), ref.weights.to(dev))
        terms = {"ce": out.ce, "ckt": out.ckt, "cmc": out.cmc, "distill": out.distill}
        if self.regularizer == "dfg":
            return Loss([out.distill, out.ce], terms)
        return Loss([out.total], terms)

    def after_backward(self, trainer, part):
        if self.guard is None or part != 0:
            return
        if self.regularizer == "ewc" and self.guard.fisher is None:
            return  # first task: no Fisher yet
        trainer.record(self.regularizer, self.guard.apply())

    def after_task(self, trainer, t):
        if isinstance(self.refs, Prefetch):
            self.refs.close()
        self.refs = self.teacher_model = None
        if self.guard is None:
            return
        if self.regularizer == "ewc":
            batches = trainer.loader(trainer.tasks[t].train, train=False, seed=trainer.task_seed(t) + 1,
                                     iters=self.fisher_batches)

            def ce(batch):
                images, labels = batch
                with trainer.autocast():
                    logits = trainer.task_logits(images.to(trainer.device), t)
                return trainer.ce(logits, labels.to(trainer.device))

            self.guard.estimate_fisher(ce, batches, accumulate=True)
        self.guard.consolidate()

    def state_dict(self):
        sd = {}
        if self.guard is not None:
            sd.update({f"guard.{k}": v for k, v in self.guard.state_dict().items()})
        if self.initial is not None:
            sd.update({f"initial.{i}": p for i, p in enumerate(self.initial)})
        return sd

    def load_state_dict(self, sd):
        if self.guard is not None:
            self.guard.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("guard.")})
        if self.initial is not None:
            self.initial = [sd[f"initial.{i}"].to(p.device, p.dtype).clone() for i, p in enumerate(self.initial)]
