"""SnD, Select and Distill (Yu et al., ECCV 2024: selective dual-teacher
knowledge transfer), as its public code (``chu0802/SnD``:
``src/trainer/snd_trainer.py``, ``configs/snd_config_*.yaml``,
``src/models/clip.py``) does it.

Two frozen teachers: the initial model (``pretrained``) and the model after
the previous task (``prev``; during the first task the two are the same
weights). On a batch of reference images, with f the unit-norm image
features of the student (s), the initial (pre) and the previous (prev)
model::

    d_i   = ||f_pre_i - f_prev_i||                         (the teachers' disagreement)
    w_i   = sigmoid(scale * (d_i - threshold))              (scale 6, threshold 0.2)
    L     = CE + ratio_prev * mean_i(w_i * ||f_s_i - f_prev_i||^2)
               + ratio_pretrained * mean_i((1 - w_i) * ||f_s_i - f_pre_i||^2)   (9 and 0.5)

An image the two teachers see alike (small d) is one the previous tasks did
not change: it is distilled mostly from the initial model (keeping zero-shot
ability); one they see differently carries what the previous tasks taught and
is distilled from the previous model. The text tower is frozen (SnD's
``freeze_classification_head``: only ``visual`` parameters train, the text
transformer in eval mode); here the image tower is found by a probe (the
parameters ``encode_image`` depends on), so every adapter works.

Reference images: SnD's code distils on unlabelled images of a fixed general
dataset, the same for every task (``ref_dataset: imagenet``, 100,000 sampled
train images, batch 64, shuffled); here the Siphon's uniform set (one fixed
general set over the domain keywords, ``uniform_size`` pairs, the images only;
captions are not used), through the ``ReferenceDistillation`` part, which also
supplies the previous-model teacher and the batches (its own loss is not
used). Deviation: the reference images go through the student's eval
transform (every mgcl reference set does), where SnD's loader uses its train
transform. SnD's config trains with label smoothing 0, weight decay 5e-4 and
no warmup; those are run settings here (the ``train`` section), so methods
compare under one protocol.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import Loss, ParamGroup, Strategy, TaskBatch, frozen_copy
from .parts import ReferenceDistillation


@torch.no_grad()
def _blank_batch(model, device) -> torch.Tensor:
    from PIL import Image  # noqa: PLC0415

    return model.transform(False)(Image.new("RGB", (32, 32))).unsqueeze(0).to(device)


def image_tower(model, device) -> list:
    """Names (``model.named_parameters()``) of the parameters ``encode_image``
    depends on: one forward and backward of a blank image, in eval mode."""
    x = _blank_batch(model, device)
    named = list(model.named_parameters())
    flags, was = [p.requires_grad for _, p in named], model.training
    try:
        model.eval()
        for _, p in named:
            p.requires_grad_(True)
        with torch.enable_grad():
            f = model.encode_image(x)
            grads = torch.autograd.grad(f.float().sum(), [p for _, p in named], allow_unused=True)
    finally:
        for (_, p), r in zip(named, flags):
            p.requires_grad_(r)
        model.train(was)
    return [n for (n, _), g in zip(named, grads) if g is not None]


def frozen_modules(model, trainable: set) -> list:
    """The largest submodules of ``model`` none of whose parameters is in ``trainable``."""
    out = []

    def visit(prefix: str, mod: torch.nn.Module):
        names = [prefix + n for n, _ in mod.named_parameters()]
        if names and not any(n in trainable for n in names):
            out.append(mod)
            return
        for n, child in mod.named_children():
            visit(f"{prefix}{n}.", child)

    visit("", model)
    return out


def selection_weights(f_pre: torch.Tensor, f_prev: torch.Tensor, threshold: float, scale: float) -> torch.Tensor:
    """SnD's per-sample weight of the previous teacher: sigmoid(scale * (||f_pre - f_prev|| - threshold))."""
    return torch.sigmoid(scale * (torch.linalg.vector_norm(f_pre - f_prev, dim=-1) - threshold))


class SnD(Strategy):
    name = "snd"

    def __init__(self, siphon=None, bank: Optional[str] = None, siphon_options: Optional[dict] = None,
                 uniform_size: int = 10000, uniform_keywords: Optional[list] = None,
                 ref_batch_size: Optional[int] = None, ratio_prev: float = 9.0, ratio_pretrained: float = 0.5,
                 threshold: float = 0.2, scale: float = 6.0, prefetch: int = 2):
        for key, v in (("ratio_prev", ratio_prev), ("ratio_pretrained", ratio_pretrained), ("scale", scale),
                       ("threshold", threshold)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                raise ValueError(f"snd: {key} must be a finite number >= 0, got {v!r}")
        self.reference = ReferenceDistillation(
            self.name, siphon=siphon, bank=bank, siphon_options=siphon_options, source="uniform",
            uniform_size=uniform_size, uniform_keywords=uniform_keywords, teacher="last", alpha=0.0, beta=0.0,
            batch_size=ref_batch_size, prefetch=prefetch)
        self.ratio_prev, self.ratio_pretrained = float(ratio_prev), float(ratio_pretrained)
        self.threshold, self.scale = float(threshold), float(scale)
        self.pretrained = None      # the initial model, frozen
        self.trainable = None       # names of the image tower's parameters
        self.text_tower = []        # the frozen submodules, kept in eval mode

    def check(self, trainer):
        self.reference.check(trainer)

    def param_groups(self, trainer, t):
        if self.trainable is None:
            allowed = {n for g in super().param_groups(trainer, t) for n in g.names}
            self.trainable = [n for n in image_tower(trainer.model, trainer.device) if n in allowed]
            if not self.trainable:
                raise ValueError("snd: the model's image tower has no trainable parameter")
            self.text_tower = frozen_modules(trainer.model, set(self.trainable))
        return [ParamGroup(list(self.trainable))]

    def setup(self, trainer):
        self.reference.setup(trainer)
        self.pretrained = frozen_copy(trainer.model)

    def before_task(self, trainer, t):
        self.reference.before_task(trainer, t)   # the previous-model teacher, the batches

    def training_loss(self, trainer, batch: TaskBatch) -> Loss:
        for m in self.text_tower:
            m.eval()
        ce = trainer.ce(trainer.task_logits(batch.images, batch.task), batch.labels)
        images = next(self.reference.batches).images.to(trainer.device, non_blocking=True)
        f_s = trainer.image_features(images)
        with torch.no_grad():
            f_pre = trainer.image_features(images, self.pretrained)
            f_prev = trainer.image_features(images, self.reference.teacher_model)
        with trainer.fp32():
            w = selection_weights(f_pre, f_prev, self.threshold, self.scale)
            prev_kd = (w * (f_s - f_prev).pow(2).sum(dim=-1)).mean()
            pre_kd = ((1 - w) * (f_s - f_pre).pow(2).sum(dim=-1)).mean()
            total = ce + self.ratio_prev * prev_kd + self.ratio_pretrained * pre_kd
        selected = (torch.linalg.vector_norm(f_pre - f_prev, dim=-1) > self.threshold).float().mean()
        return Loss([total], {"ce": ce, "prev_kd": prev_kd, "pretrained_kd": pre_kd, "w_prev": w.mean(),
                              "selected": selected})

    def after_task(self, trainer, t):
        self.reference.after_task(trainer, t)
