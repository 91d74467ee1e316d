"""ZSCL (Zheng et al., ICCV 2023), on mgcl's reference sets.

- distillation on reference image-caption pairs with the initial model as the
  teacher: the row (image -> text) and column (text -> image) KL between the
  teacher's and the student's similarity softmaxes (CKT, no CMC), weight
  ``kd``; the reference set is the Siphon's uniform set (a fixed general set,
  as ZSCL's), ``uniform_size`` pairs;
- l2 to the initial weights, coefficient ``lam`` = 1 (the fused guard, W = 1);
- weight ensembling: the weights after the task are the mean of the weights
  at the task's start and after every ``we_every``-th step (and after the
  last step when the task's length is not a multiple of ``we_every``, so a
  task shorter than ``we_every`` steps still keeps what it learned).
"""
from __future__ import annotations

import torch

from ...guard import FisherGuard
from .base import Loss, Strategy, TaskBatch, check_lam, frozen_copy, reference_features
from .refdata import Prefetch, endless, open_siphon


class ZSCL(Strategy):
    name = "zscl"

    def __init__(self, siphon=None, bank: str | None = None, siphon_options: dict | None = None,
                 uniform_size: int = 10000, uniform_keywords: list | None = None, ref_batch_size: int | None = None,
                 kd: float = 1.0, lam: float = 1.0,
                 we_every: int = 100, prefetch: int = 2, backend: str | None = None):
        if kd < 0 or uniform_size < 1 or we_every < 1 or prefetch < 0:
            raise ValueError("zscl: need kd >= 0, uniform_size >= 1, we_every >= 1, prefetch >= 0")
        if ref_batch_size is not None and ref_batch_size < 2:
            raise ValueError(f"zscl: ref_batch_size must be >= 2, got {ref_batch_size}")
        self.siphon, self.bank, self.siphon_options = siphon, bank, siphon_options
        self.uniform_size, self.ref_batch_size, self.kd = int(uniform_size), ref_batch_size, float(kd)
        self.uniform_keywords = uniform_keywords
        self.lam, self.we_every = check_lam(self.name, lam), int(we_every)
        self.prefetch, self.backend = prefetch, backend
        self.guard = self.teacher = self.refset = self.refs = self.loss = None
        self.avg, self.n_avg = None, 0

    def check(self, trainer):
        if self.siphon is None and self.bank is None:
            raise ValueError("zscl: needs a reference set: pass siphon=mgcl.retrieval.Siphon(...) or bank=<dir>")

    def setup(self, trainer):
        from ...nn import ContrastiveDistillLoss  # noqa: PLC0415

        self.loss = ContrastiveDistillLoss(kd=self.kd, cmc=0.0, backend=self.backend)
        self.guard = FisherGuard(trainer.params, lam=self.lam, mode="l2")  # anchors: the initial weights, kept
        self.siphon = open_siphon(self.siphon, self.bank, self.siphon_options, self.name)
        self.refset = self.siphon.uniform_set(self.uniform_size, self.uniform_keywords)

    @torch.no_grad()
    def before_task(self, trainer, t):
        self.teacher = frozen_copy(trainer.model)
        named = dict(self.teacher.named_parameters())
        for name, a in zip(trainer.param_names, self.guard.anchors):
            named[name].copy_(a)  # the initial model
        stream = endless(self.refset, trainer.model, self.ref_batch_size or trainer.batch_size,
                         seed=trainer.task_seed(t))
        self.refs = Prefetch(stream, self.prefetch) if self.prefetch else stream
        self.avg, self.n_avg = [p.detach().clone() for p in trainer.params], 1

    def training_loss(self, trainer, batch: TaskBatch) -> Loss:
        ce = trainer.ce(trainer.task_logits(batch.images, batch.task), batch.labels)
        feats = reference_features(trainer, next(self.refs), self.teacher)
        with trainer.fp32():
            kd = self.loss(*feats)
        return Loss([ce + kd], {"ce": ce, "kd": kd})

    def after_backward(self, trainer, part):
        trainer.record("l2", self.guard.apply())

    @torch.no_grad()
    def _ensemble(self, trainer):
        self.n_avg += 1
        for a, p in zip(self.avg, trainer.params):
            a.add_(p.detach() - a, alpha=1.0 / self.n_avg)

    def after_step(self, trainer, step):
        if (step + 1) % self.we_every == 0:
            self._ensemble(trainer)

    @torch.no_grad()
    def after_task(self, trainer, t):
        if isinstance(self.refs, Prefetch):
            self.refs.close()
        if trainer.iters_per_task % self.we_every:
            self._ensemble(trainer)  # the last step joins the ensemble
        for p, a in zip(trainer.params, self.avg):
            p.copy_(a)
        self.refs = self.teacher = self.avg = None

    def state_dict(self):
        return dict(self.guard.state_dict())

    def load_state_dict(self, sd):
        self.guard.load_state_dict(sd)
