"""ZSCL (Zheng et al., ICCV 2023) as its public code runs it (``mtil/``,
``scripts/ZSCL.sh``: ``--image_loss --text_loss --we --avg_freq 100 --l2 1
--ref-dataset ImageNet --ref-sentences conceptual_captions``, each task loading
the previous one's weights), composed of three parts:

- reference distillation (``parts.ReferenceDistillation`` for the set, the
  teacher and the batches) on the Siphon's uniform set (a fixed general set;
  ``uniform_size`` pairs), the initial (zero-shot) model as the teacher (the
  script passes no ``--ref-model``). The loss (``texts="fixed"``, ZSCL's): the
  student's and the teacher's image features of each reference batch scored
  against the TEACHER's text embeddings of a fixed caption set, KD at
  ``temperature`` T = 2 over the captions of each image plus over the images
  of each caption (``parts.teacher_text_kd``), weight ``kd``; the student's
  text tower gets no gradient from it;
- an l2 guard term, coefficient ``lam`` = 1 (ZSCL's ``l2_loss``: the sum of
  squared distances, gradient 2 (theta - theta*)), anchored at the weights at
  the start of each task (``anchor="previous"``: ``--load`` of the previous
  task's checkpoint, the ensemble's merged weights); ``anchor="initial"`` keeps
  it at the pre-trained weights;
- a weight ensemble with ZSCL's membership: the weights at the task's start,
  after the first step and after every ``we_every``-th step from there (ZSCL
  merges at iterations 0, 100, ..., 1000), and after the last step when it is
  not one of those: 12 members for 1,000 steps and ``we_every`` 100. The
  merged weights are the task's result and the next task's start.

Deviations from ZSCL's code, and why:

- the reference images and the fixed captions come from one set, the Siphon's
  uniform set (its distinct captions, in the set's order), where ZSCL pairs
  ImageNet images with the captions of Conceptual Captions' validation split:
  mgcl has one corpus, the bank; the pairing is not used by the loss;
- mgcl trains ``iters_per_task`` steps; ZSCL's loop runs ``iterations + 1``
  (1,001), so its last member is one step later;
- the logit scale of each model scores its own features (ZSCL uses the
  student's for both); both are the frozen pre-trained scale, so they agree.

``texts="paired"`` keeps mgcl's earlier variant: CKT (``mgcl.nn.PrimedLoss``,
T = 1) between the student's and the teacher's B x B image-caption
similarities of the reference batch, the student's text features included.
"""
from __future__ import annotations

import torch

from ..evaluate import text_features
from .base import Loss, Strategy, TaskBatch, check_choice
from .parts import ANCHORS, GuardTerm, ReferenceDistillation, WeightEnsemble, prefixed, teacher_text_kd

TEXTS = ("fixed", "paired")


def captions_of(refset) -> list[str]:
    """The distinct captions of a reference set, in its order (a ``ReferenceSet``'s
    rows, or a dataset of ``(image, caption, weight)`` items)."""
    rows = getattr(refset, "rows", None)
    caps = [r["caption"] for r in rows] if rows is not None else [refset[i][1] for i in range(len(refset))]
    return list(dict.fromkeys(caps))


class ZSCL(Strategy):
    name = "zscl"

    def __init__(self, siphon=None, bank: str | None = None, siphon_options: dict | None = None,
                 uniform_size: int = 10000, uniform_keywords: list | None = None, ref_batch_size: int | None = None,
                 kd: float = 1.0, lam: float = 1.0, we_every: int = 100, texts: str = "fixed",
                 temperature: float = 2.0, anchor: str = "previous", prefetch: int = 2, backend: str | None = None):
        if isinstance(we_every, bool) or not isinstance(we_every, int) or we_every < 1:
            raise ValueError(f"zscl: we_every must be an integer >= 1, got {we_every!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"zscl: temperature must be a number > 0, got {temperature!r}")
        self.texts = check_choice(self.name, "texts", texts, TEXTS)
        check_choice(self.name, "anchor", anchor, ANCHORS)
        self.reference = ReferenceDistillation(
            self.name, siphon=siphon, bank=bank, siphon_options=siphon_options, source="uniform",
            uniform_size=uniform_size, uniform_keywords=uniform_keywords, teacher="initial", alpha=kd, beta=0.0,
            batch_size=ref_batch_size, prefetch=prefetch, backend=backend)
        self.guard = GuardTerm(self.name, "l2", lam=lam, anchor=anchor)
        self.ensemble = WeightEnsemble()
        self.kd, self.we_every, self.temperature = self.reference.alpha, we_every, float(temperature)
        self.teacher_text = None

    def check(self, trainer):
        self.reference.check(trainer)

    def setup(self, trainer):
        self.guard.setup(trainer)
        self.reference.setup(trainer)

    def before_task(self, trainer, t):
        self.reference.before_task(trainer, t)
        if self.texts == "fixed":
            teacher = self.reference.teacher_model
            with torch.no_grad():
                self.teacher_text = text_features(teacher, trainer.model.tokenize(captions_of(self.reference.refset)),
                                                  trainer.device, batch_size=trainer.train_config.eval_batch_size,
                                                  amp=trainer.amp)
        self.ensemble.start(trainer)

    def training_loss(self, trainer, batch: TaskBatch) -> Loss:
        logits = trainer.task_logits(batch.images, batch.task)
        if self.texts == "paired":
            out = self.reference(trainer, logits, batch.labels)
            return Loss([out.total], {"ce": out.ce, "kd": out.distill})
        ce = trainer.ce(logits, batch.labels)
        images = next(self.reference.batches).images.to(trainer.device, non_blocking=True)
        kd = teacher_text_kd(trainer, images, self.reference.teacher_model, self.teacher_text, self.temperature)
        return Loss([ce + self.kd * kd], {"ce": ce, "kd": kd})

    def after_backward(self, trainer, part):
        self.guard.apply(trainer)

    def after_step(self, trainer, step):
        if step % self.we_every == 0:
            self.ensemble.add(trainer)

    def after_task(self, trainer, t):
        self.reference.after_task(trainer, t)
        self.teacher_text = None
        if (trainer.train_config.iters_per_task - 1) % self.we_every:
            self.ensemble.add(trainer)  # the last step joins the ensemble
        self.ensemble.merge(trainer)
        self.guard.after_task(trainer, t)  # anchor "previous": the merged weights

    def state_dict(self):
        return {**{f"guard.{k}": v for k, v in self.guard.state_dict().items()},
                **{f"reference.{k}": v for k, v in self.reference.state_dict().items()},
                **{f"ensemble.{k}": v for k, v in self.ensemble.state_dict().items()}}  # mid-task: its running mean

    def load_state_dict(self, sd):
        self.guard.load_state_dict(prefixed(sd, "guard."))
        self.reference.load_state_dict(prefixed(sd, "reference."))
        self.ensemble.load_state_dict(prefixed(sd, "ensemble."))
