"""DIKI (Tang et al., ECCV 2024, "Mind the Interference: Retaining Pre-trained
Knowledge in Parameter Efficient Continual Learning of Vision-Language
Models"), as its public code (lloongx/DIKI, ``configs/MTIL.yaml``,
``DIKI/DIKI.py``, ``clip/attention.py``) does it.

- Residual prefix-KV prompts (``mgcl.models.surgery.PrefixKV``): one prompt
  per task in the first ``depth`` = 8 blocks of each tower, ``length`` = 8
  key/value pairs each (keys uniform in [-1, 1], values zeros). The queries
  attend to them in a separate softmax whose output, times a weight w, is
  added to the block's own attention output before the output projection, so
  the frozen backbone's attention is never diluted and w = 0 is exactly the
  pre-trained model. Only the current task's prompts train.
- Per-task Gaussian statistics: before training a task, the mean and the
  covariance (unbiased, + 1e-7 I) of the frozen model's unit-norm image
  features of its training set.
- Task-id-free inference: each test image's frozen feature is scored under
  every learned task's Gaussian (log-density); its best task gives it the
  calibration weight ``w = sigmoid(log p / d - 1)`` (d = the feature width;
  the code writes 512, ViT-B/16's width). With ``batchwise_prompt`` (the
  config's choice) the batch uses its majority task's prompts, each image its
  own w in the image tower; the class head is encoded with the same prompts
  and the batch's mean w. Images far from every learned distribution get
  w near 0: the pre-trained model's answer.
- Training: plain cross-entropy (no label smoothing) with the task's prompts
  at w = 1; SGD, lr 5, no momentum, weight decay 0, cosine schedule, as in
  ``configs/MTIL.yaml`` (its warmup 0 and batch 128 are run settings:
  ``train.warmup`` / ``train.batch_size``).

Where mgcl differs from the code, and why:
- the code picks the best epoch on a validation split; mgcl's protocol has
  none and keeps the weights after the last step;
- the statistics are taken with the evaluation transform (the code reads the
  training loader, with its augmentation) so that they do not depend on
  augmentation noise;
- the class head averages every template of the task (mgcl's evaluation
  protocol), where the code encodes one template per dataset;
- with fewer than ``depth`` blocks (TinyCLIP) every block gets a prompt.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Loss, OptimizerSpec, ParamGroup, Strategy, TaskBatch


class DIKI(Strategy):
    """DIKI (module doc)."""

    name = "diki"
    needs_transformer_towers = True  # its model surgery needs ViT / text transformer blocks

    def __init__(self, lr: float = 5.0, momentum: float = 0.0, depth_image: int = 8, depth_text: int = 8,
                 length_image: int = 8, length_text: int = 8, batchwise_prompt: bool = True,
                 jitter: float = 1e-7):
        who = self.name
        for k, v in (("depth_image", depth_image), ("depth_text", depth_text), ("length_image", length_image),
                     ("length_text", length_text)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k.startswith("depth") else 1):
                raise ValueError(f"{who}: {k} must be an integer >= {0 if k.startswith('depth') else 1}, got {v!r}")
        if depth_image + depth_text == 0:
            raise ValueError(f"{who}: depth_image and depth_text are both 0 (no prompts)")
        for k, v in (("lr", lr), ("jitter", jitter)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"{who}: {k} must be a finite number > 0, got {v!r}")
        if not isinstance(batchwise_prompt, bool):
            raise ValueError(f"{who}: batchwise_prompt must be true or false, got {batchwise_prompt!r}")
        self.lr, self.momentum, self.jitter = float(lr), momentum, float(jitter)
        self.depth = {"image": depth_image, "text": depth_text}
        self.length = {"image": length_image, "text": length_text}
        self.batchwise_prompt = batchwise_prompt
        self.means: list = []     # per learned task: [d] float64
        self.covs: list = []      # per learned task: [d, d] float64
        self._dists = None
        OptimizerSpec("sgd", momentum=momentum)  # validates momentum

    # ---- the model -------------------------------------------------------------------------

    def check(self, trainer):
        from ...models.surgery import tower_blocks  # noqa: PLC0415

        tower_blocks(trainer.model)

    def wrap_model(self, trainer, model):
        from ...models.surgery import Adapted, PrefixKV, depth_count, widths  # noqa: PLC0415

        w, d, T = widths(model), depth_count(model), len(trainer.tasks)
        prefix = {tower: [PrefixKV(w[tower], T, self.length[tower]) if i < self.depth[tower] else None
                          for i in range(d[tower])] for tower in w}
        return Adapted(model, prefix=prefix)

    def param_groups(self, trainer, t):
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        chosen = [names[id(b.prefix.prompts[t])] for tower in ("image", "text")
                  for b in trainer.model.blocks(tower) if b.prefix is not None]
        return [ParamGroup(chosen, lr=self.lr, weight_decay=0.0)]

    def optimizer(self, trainer, t):
        return OptimizerSpec("sgd", momentum=self.momentum)

    # ---- training ----------------------------------------------------------------------------

    def before_task(self, trainer, t):
        """The Gaussian of task t's frozen image features (the model with no prompts)."""
        if len(self.means) > t:
            return  # resumed: already known
        f = trainer.features_of(trainer.tasks[t].train).double()
        mean = f.mean(0)
        delta = f - mean
        cov = delta.T @ delta / max(1, f.shape[0] - 1)
        cov += torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device) * self.jitter
        self.means.append(mean)
        self.covs.append(cov)
        self._dists = None

    def training_loss(self, trainer, batch: TaskBatch) -> Loss:
        with trainer.model.routing(batch.task):
            logits = trainer.task_logits(batch.images, batch.task)
        with trainer.fp32():
            ce = F.cross_entropy(logits.float(), batch.labels)
        return Loss([ce], {"ce": ce})

    # ---- selection and calibration -----------------------------------------------------------

    def log_densities(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, learned tasks]`` Gaussian log-densities of unit-norm frozen features."""
        if self._dists is None:
            self._dists = [torch.distributions.MultivariateNormal(m, covariance_matrix=c)
                           for m, c in zip(self.means, self.covs)]
        x = features.double()
        return torch.stack([d.log_prob(x.to(d.loc.device)) for d in self._dists], 1)

    @torch.no_grad()
    def select(self, trainer, images):
        """``(ids [B], weights [B], frozen features [B, d])``: each image's prompt
        (the batch's majority with ``batchwise_prompt``) and its calibration weight."""
        f0 = trainer.image_features(images)          # outside routing: the frozen model
        with trainer.fp32():
            logp = self.log_densities(f0).to(f0.device)
        best, ids = logp.max(1)
        weights = torch.sigmoid(best / f0.shape[1] - 1.0).float()
        if self.batchwise_prompt:
            ids = torch.bincount(ids).argmax().expand(len(ids))
        return ids, weights, f0

    def eval_head(self, trainer, task):
        from ..evaluate import zero_shot_head  # noqa: PLC0415

        return zero_shot_head(trainer.model, trainer.tasks[task], trainer.device, amp=trainer.amp)

    @torch.no_grad()
    def eval_logits(self, trainer, images, task, head):
        from ..evaluate import zero_shot_head  # noqa: PLC0415

        with trainer.autocast():
            if not self.means:
                return trainer.logits(trainer.image_features(images), head)
            ids, weights, _ = self.select(trainer, images)
            with trainer.model.routing(ids, weights):
                f = trainer.image_features(images)
            out = torch.empty(len(ids), head.shape[0], device=f.device)
            for r in ids.unique().tolist():
                with trainer.model.routing(r, weights.mean()):
                    h = zero_shot_head(trainer.model, trainer.tasks[task], trainer.device, amp=trainer.amp)
                rows = (ids == r).nonzero().flatten()
                out[rows] = trainer.logits(f[rows], h)
        return out

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self):
        return {**{f"mean.{k}": m for k, m in enumerate(self.means)},
                **{f"cov.{k}": c for k, c in enumerate(self.covs)}}

    def load_state_dict(self, sd):
        n = sum(1 for k in sd if k.startswith("mean."))
        self.means = [sd[f"mean.{k}"].double() for k in range(n)]
        self.covs = [sd[f"cov.{k}"].double() for k in range(n)]
        self._dists = None
