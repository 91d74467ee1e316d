"""MoE-Adapters (Yu et al., CVPR 2024, "Boosting Continual Learning of
Vision-Language Models via Mixture-of-Experts Adapters"), as its public code
(JiazuoYu/MoE-Adapters4CL, ``mtil/``) does it.

- Model (``mgcl.models.surgery``): every transformer block of both towers
  gets ``n_experts`` = 22 bottleneck adapters (width 64, ReLU, dropout 0.1,
  output x 0.1, up-projection zero-initialised) in parallel with its MLP,
  reading the residual stream after attention, and one noisy top-k router
  (k = 2) per task, gating each sample from its first token. The backbone is
  frozen: only the current task's routers (clean and noise weights) and the
  experts not yet frozen train.
- Experts frozen per task: after a task, in every block of each tower, the
  ``freeze_per_task`` = 2 experts that its router chose most often during the
  task's training (counted over samples, image and text calls alike) are
  frozen for every later task (they still serve every router).
- The distribution-discriminative auto-selector (DDAS): after each task an
  autoencoder (``d -> 100`` ReLU ``-> d`` sigmoid) learns to reconstruct
  ``sigmoid(features)`` of the task's training images (MSE; Adam, lr 0.01
  decayed x0.1 every 10 epochs, weight decay 1e-4, ``ddas_iters`` = 300
  steps). At evaluation the task id is not used: a test batch goes to the
  task whose autoencoder reconstructs it best, or, when even the best error
  is above ``ddas_threshold`` (0.0655 in the scripts), to the untouched
  pre-trained model (no experts). The chosen route runs both towers: the
  image features and the class head are computed with that task's router.
- Optimisation: AdamW over those parameters, weight decay from the run
  config (0 in the scripts), and a learning rate per dataset, as the scripts
  set one per MTIL dataset (``lr``: one number, a list with one per task in
  order, or a ``{task name: lr}`` mapping naming every task).

Where mgcl differs from the code, and why:
- the code's DDAS reads features of a pretrained AlexNet (ImageNet
  weights, a second network); mgcl reads the frozen backbone's own image
  features (the model with no experts), which need no download. The
  threshold therefore sits on a different error scale; it is a setting;
- the code also trains an extra autoencoder on TinyImageNet as a stand-in
  for the pre-training distribution (best there -> zero-shot); mgcl has no
  such set, so only the threshold sends data to the pre-trained model;
- the code computes the routers' load-balancing loss (cv^2 of importance and
  load, x 1e-2) but never adds it to the training loss; mgcl follows the code
  and leaves it out;
- ``ddas_route="batch"`` (default) routes a whole test batch by its mean
  error, as the code does (its test batches hold one dataset); "sample"
  routes each image by its own error.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Loss, OptimizerSpec, ParamGroup, Strategy, TaskBatch, check_choice

ROUTES = ("batch", "sample")


def _positive(who: str, name: str, v, *, integer: bool = False):
    kind = int if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kind) or not v > 0 or (not integer and not math.isfinite(v)):
        raise ValueError(f"{who}: {name} must be {'an integer' if integer else 'a finite number'} > 0, got {v!r}")
    return v


def per_task_lr(who: str, lr, tasks) -> list:
    """``lr`` (a number, one per task in order, or ``{task name: lr}`` naming every task) as a list per task."""
    names = [t.name for t in tasks]
    if isinstance(lr, dict):
        missing, unknown = [n for n in names if n not in lr], [k for k in lr if k not in names]
        if missing or unknown:
            raise ValueError(f"{who}: lr maps task names to learning rates; "
                             + (f"missing {missing}" if missing else f"unknown task(s) {unknown}"))
        lrs = [lr[n] for n in names]
    elif isinstance(lr, (list, tuple)):
        if len(lr) != len(names):
            raise ValueError(f"{who}: lr has {len(lr)} entries for {len(names)} tasks")
        lrs = list(lr)
    else:
        lrs = [lr] * len(names)
    return [float(_positive(who, "lr", v)) for v in lrs]


class AutoEncoder(nn.Module):
    """DDAS's autoencoder: ``sigmoid(W_2 relu(W_1 x))``, trained to reconstruct x in [0, 1]."""

    def __init__(self, dim: int, code: int = 100):
        super().__init__()
        self.encoder = nn.Linear(dim, code)
        self.decoder = nn.Linear(code, dim)

    def forward(self, x):
        return torch.sigmoid(self.decoder(F.relu(self.encoder(x))))

    def errors(self, x):
        """Per-sample reconstruction MSE ``[B]``."""
        return (self(x) - x).pow(2).mean(1)


class MoEAdapters(Strategy):
    """MoE-Adapters (module doc)."""

    name = "moe-adapters"
    needs_transformer_towers = True  # its model surgery needs ViT / text transformer blocks

    def __init__(self, lr=1e-3, n_experts: int = 22, top_k: int = 2, bottleneck: int = 64,
                 freeze_per_task: int = 2, ddas_threshold: float = 0.0655, ddas_code: int = 100,
                 ddas_iters: int = 300, ddas_lr: float = 0.01, ddas_weight_decay: float = 1e-4,
                 ddas_route: str = "batch"):
        who = self.name
        if not isinstance(lr, (dict, list, tuple)):
            _positive(who, "lr", lr)
        for k, v in (("n_experts", n_experts), ("top_k", top_k), ("bottleneck", bottleneck),
                     ("ddas_code", ddas_code), ("ddas_iters", ddas_iters)):
            _positive(who, k, v, integer=True)
        if top_k > n_experts:
            raise ValueError(f"{who}: top_k {top_k} is larger than n_experts {n_experts}")
        if isinstance(freeze_per_task, bool) or not isinstance(freeze_per_task, int) \
                or not 0 <= freeze_per_task <= n_experts:
            raise ValueError(f"{who}: freeze_per_task must be an integer in [0, n_experts], got {freeze_per_task!r}")
        _positive(who, "ddas_threshold", ddas_threshold)
        _positive(who, "ddas_lr", ddas_lr)
        if isinstance(ddas_weight_decay, bool) or not isinstance(ddas_weight_decay, (int, float)) \
                or not 0 <= ddas_weight_decay < math.inf:
            raise ValueError(f"{who}: ddas_weight_decay must be a finite number >= 0, got {ddas_weight_decay!r}")
        self.lr, self.n_experts, self.top_k, self.bottleneck = lr, n_experts, top_k, bottleneck
        self.freeze_per_task = freeze_per_task
        self.ddas_threshold, self.ddas_code, self.ddas_iters = float(ddas_threshold), ddas_code, ddas_iters
        self.ddas_lr, self.ddas_weight_decay = float(ddas_lr), float(ddas_weight_decay)
        self.ddas_route = check_choice(who, "ddas_route", ddas_route, ROUTES)
        self.lrs: list = []
        self.frozen: set = set()          # (tower, block, expert)
        self.autoencoders = nn.ModuleList()
        self._heads: dict = {}

    # ---- the model -------------------------------------------------------------------------

    def check(self, trainer):
        from ...models.surgery import tower_blocks  # noqa: PLC0415

        self.lrs = per_task_lr(self.name, self.lr, trainer.tasks)
        tower_blocks(trainer.model)  # a clear error now for a model without transformer towers

    def wrap_model(self, trainer, model):
        from ...models.surgery import Adapted, Experts, depth_count, widths  # noqa: PLC0415

        w, d, T = widths(model), depth_count(model), len(trainer.tasks)
        experts = {tower: [Experts(w[tower], T, self.n_experts, self.top_k, self.bottleneck) for _ in range(d[tower])]
                   for tower in w}
        return Adapted(model, experts=experts)

    def _experts(self, trainer):
        for tower in ("image", "text"):
            for i, block in enumerate(trainer.model.blocks(tower)):
                yield tower, i, block.experts

    def param_groups(self, trainer, t):
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        chosen = []
        for tower, i, ex in self._experts(trainer):
            chosen += [names[id(ex.routers[t])], names[id(ex.noise[t])]]
            for e, adapter in enumerate(ex.adapters):
                if (tower, i, e) not in self.frozen:
                    chosen += [names[id(p)] for p in adapter.parameters()]
        return [ParamGroup(chosen, lr=self.lrs[t])]

    def optimizer(self, trainer, t):
        return OptimizerSpec("adamw")

    # ---- training ----------------------------------------------------------------------------

    def before_task(self, trainer, t):
        for _, _, ex in self._experts(trainer):
            ex.counts.zero_()

    def training_loss(self, trainer, batch: TaskBatch) -> Loss:
        with trainer.model.routing(batch.task):
            ce = trainer.ce(trainer.task_logits(batch.images, batch.task), batch.labels)
        return Loss([ce], {"ce": ce})

    def after_task(self, trainer, t):
        if self.freeze_per_task:
            for tower, i, ex in self._experts(trainer):
                top = torch.topk(ex.counts, self.freeze_per_task).indices.tolist()
                self.frozen.update((tower, i, e) for e in top)
        trainer.log(f"{self.name}: task {t + 1}: {len(self.frozen)} experts frozen; training its DDAS autoencoder")
        self._train_autoencoder(trainer, t)

    # ---- DDAS ----------------------------------------------------------------------------------

    @torch.no_grad()
    def ddas_inputs(self, trainer, images):
        """``sigmoid`` of the frozen backbone's image features (no experts)."""
        with trainer.model.routing(-1), trainer.autocast():
            f = trainer.model.encode_image(images)
        return torch.sigmoid(f.float())

    def _train_autoencoder(self, trainer, t):
        from tqdm.auto import tqdm  # noqa: PLC0415

        task, bs = trainer.tasks[t], trainer.train_config.batch_size
        per_epoch = max(1, math.ceil(len(task.train) / bs))
        batches = trainer.loader(task.train, train=True, seed=trainer.task_seed(t) + 2, iters=self.ddas_iters)
        ae, opt = None, None
        was = trainer.model.training
        trainer.model.eval()
        for it in tqdm(range(self.ddas_iters), desc=f"DDAS autoencoder {t + 1}", disable=not trainer.progress,
                       leave=False):
            images, _ = next(batches)
            x = self.ddas_inputs(trainer, images.to(trainer.device))
            if ae is None:
                ae = AutoEncoder(x.shape[1], self.ddas_code).to(trainer.device)
                opt = torch.optim.Adam(ae.parameters(), lr=self.ddas_lr, weight_decay=self.ddas_weight_decay)
            for g in opt.param_groups:
                g["lr"] = self.ddas_lr * 0.1 ** ((it // per_epoch) // 10)
            loss = F.mse_loss(ae(x), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        trainer.model.train(was)
        trainer.log(f"{self.name}: task {t + 1}: DDAS autoencoder reconstruction MSE {float(loss.detach()):.4g} "
                    f"(threshold {self.ddas_threshold:g})")
        self.autoencoders.append(ae.eval().requires_grad_(False))

    @torch.no_grad()
    def routes(self, trainer, images) -> torch.Tensor:
        """The task each test image is routed to (``[B]``; -1: the pre-trained model)."""
        B = images.shape[0]
        if not len(self.autoencoders):
            return torch.full((B,), -1, dtype=torch.long, device=images.device)
        x = self.ddas_inputs(trainer, images)
        err = torch.stack([ae.errors(x) for ae in self.autoencoders], 1)  # [B, tasks]
        if self.ddas_route == "batch":
            err = err.mean(0, keepdim=True)
        best, idx = err.min(1)
        idx = torch.where(best > self.ddas_threshold, torch.full_like(idx, -1), idx)
        return idx.expand(B) if self.ddas_route == "batch" else idx

    # ---- evaluation ----------------------------------------------------------------------------

    def eval_head(self, trainer, task):
        self._heads = {-1: self._head(trainer, task, -1)}
        return self._heads[-1]

    def _head(self, trainer, task, route):
        from ..evaluate import zero_shot_head  # noqa: PLC0415

        with trainer.model.routing(route):
            return zero_shot_head(trainer.model, trainer.tasks[task], trainer.device, amp=trainer.amp)

    @torch.no_grad()
    def eval_logits(self, trainer, images, task, head):
        ids = self.routes(trainer, images)
        with trainer.model.routing(ids), trainer.autocast():
            f = trainer.image_features(images)
        out = None
        for r in ids.unique().tolist():
            if r not in self._heads:
                self._heads[r] = self._head(trainer, task, r)
            rows = (ids == r).nonzero().flatten()
            lg = trainer.logits(f[rows], self._heads[r])
            out = torch.empty(len(ids), lg.shape[1], device=lg.device) if out is None else out
            out[rows] = lg
        return out

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self):
        sd = {"frozen": sorted([list(k) for k in self.frozen])}
        for k, ae in enumerate(self.autoencoders):
            sd.update({f"ddas.{k}.{n}": p for n, p in ae.state_dict().items()})
        return sd

    def load_state_dict(self, sd):
        self.frozen = {(tw, int(i), int(e)) for tw, i, e in sd.get("frozen", [])}
        self.autoencoders = nn.ModuleList()
        k = 0
        while f"ddas.{k}.encoder.weight" in sd:
            w = sd[f"ddas.{k}.encoder.weight"]
            ae = AutoEncoder(w.shape[1], w.shape[0])
            ae.load_state_dict({n[len(f"ddas.{k}."):]: v for n, v in sd.items() if n.startswith(f"ddas.{k}.")})
            self.autoencoders.append(ae.to(w.device).eval().requires_grad_(False))
            k += 1
