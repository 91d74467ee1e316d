"""Learning without Forgetting and iCaRL: distillation from the previous model
(LwF on the current task's images, iCaRL on a herded exemplar memory)."""
from __future__ import annotations

import torch

from .base import Loss, Strategy, TaskBatch, frozen_copy, kd_loss


def _old_classes(trainer, t):
    """Tokens of every class prompt of tasks 0..t-1 (template 0), concatenated."""
    return torch.cat([trainer.class_tokens(j) for j in range(t)])


class _Distilling(Strategy):
    """Holds the previous model (the teacher) and its text features of the old classes."""

    def before_task(self, trainer, t):
        self.teacher, self.old_tokens, self.teacher_text = None, None, None
        if t == 0 or not self.active(trainer, t):
            return
        self.teacher = frozen_copy(trainer.model)
        self.old_tokens = _old_classes(trainer, t)
        with torch.no_grad():
            self.teacher_text = trainer.text_features(self.old_tokens, model=self.teacher)

    def active(self, trainer, t) -> bool:
        return True

    def distill(self, trainer, images, img_s=None) -> torch.Tensor:
        """KD between the previous and the current model over the old classes on ``images``."""
        if img_s is None:
            img_s = trainer.image_features(images)
        s = trainer.logits(img_s, trainer.text_features(self.old_tokens))
        with torch.no_grad():
            img_t = trainer.image_features(images, model=self.teacher)
            tl = trainer.logits(img_t, self.teacher_text, model=self.teacher)
        return kd_loss(s, tl, self.temperature)

    def after_task(self, trainer, t):
        self.teacher = self.teacher_text = None


class LwF(_Distilling):
    """CE + lam * KD(previous model -> current model) on the current task's
    images, over the class prompts of all earlier tasks (temperature T)."""

    name = "lwf"

    def __init__(self, lam: float = 1.0, temperature: float = 2.0):
        if lam < 0 or temperature <= 0:
            raise ValueError(f"lwf: need lam >= 0 and temperature > 0, got lam={lam}, temperature={temperature}")
        self.lam, self.temperature = float(lam), float(temperature)

    def training_loss(self, trainer, batch: TaskBatch) -> Loss:
        img = trainer.image_features(batch.images)
        ce = trainer.ce(trainer.logits(img, trainer.text_features(trainer.class_tokens(batch.task))), batch.labels)
        if self.teacher is None:
            return Loss([ce], {"ce": ce})
        kd = self.distill(trainer, batch.images, img_s=img)
        return Loss([ce + self.lam * kd], {"ce": ce, "kd": kd})


class _Memory(torch.utils.data.Dataset):
    """Exemplars: rows (task, index, label) into the tasks' training sets."""

    def __init__(self, tasks, entries: torch.Tensor):
        self.tasks, self.entries = tasks, entries.tolist()

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        task, index, _ = self.entries[i]
        return self.tasks[task].train[index]


class ICaRL(_Distilling):
    """CE on the current task + lam * KD(previous -> current model) on a batch of
    exemplars from a memory of at most ``memory`` images, chosen per class by
    herding on the image features (the class mean approximated greedily),
    split evenly over all classes seen; older classes keep their first
    herded exemplars. ``herding_pool`` caps the candidates per class (a seeded
    random subset; None = all)."""

    name = "icarl"
    mid_task_checkpoints = False  # the exemplar loader's position is not in state_dict

    def __init__(self, memory: int = 10000, lam: float = 1.0, temperature: float = 2.0,
                 replay_batch_size: int | None = None, herding_pool: int | None = None):
        if memory < 1 or lam < 0 or temperature <= 0:
            raise ValueError(f"icarl: need memory >= 1, lam >= 0, temperature > 0; got {memory}, {lam}, {temperature}")
        if replay_batch_size is not None and replay_batch_size < 1:
            raise ValueError(f"icarl: replay_batch_size must be >= 1, got {replay_batch_size}")
        self.memory, self.lam, self.temperature = int(memory), float(lam), float(temperature)
        self.replay_batch_size, self.herding_pool = replay_batch_size, herding_pool
        self.entries = torch.zeros((0, 3), dtype=torch.int64)  # (task, index, label), herding order per class
        self.replay = None

    def active(self, trainer, t):
        return len(self.entries) > 0

    def before_task(self, trainer, t):
        super().before_task(trainer, t)
        self.replay = None
        if self.teacher is not None:
            self.replay = trainer.loader(_Memory(trainer.tasks, self.entries), train=True,
                                         batch_size=self.replay_batch_size or trainer.train_config.batch_size,
                                         seed=trainer.task_seed(t) + 7, iters=trainer.train_config.iters_per_task)

    def training_loss(self, trainer, batch: TaskBatch) -> Loss:
        ce = trainer.ce(trainer.task_logits(batch.images, batch.task), batch.labels)
        if self.replay is None:
            return Loss([ce], {"ce": ce})
        images, _ = next(self.replay)
        kd = self.distill(trainer, images.to(trainer.device, non_blocking=True))
        return Loss([ce + self.lam * kd], {"ce": ce, "kd": kd})

    @torch.no_grad()
    def after_task(self, trainer, t):
        super().after_task(trainer, t)
        self.replay = None
        task = trainer.tasks[t]
        n_classes = sum(len(trainer.tasks[j].classnames) for j in range(t + 1))
        per_class = max(1, self.memory // n_classes)
        labels = torch.tensor([int(task.train[i][1]) for i in range(len(task.train))]) \
            if not hasattr(task.train, "labels") else torch.as_tensor(task.train.labels)
        g = torch.Generator().manual_seed(trainer.task_seed(t) + 11)
        new = []
        for c in range(len(task.classnames)):
            idx = torch.nonzero(labels == c).flatten()
            if self.herding_pool is not None and len(idx) > self.herding_pool:
                idx = idx[torch.randperm(len(idx), generator=g)[: self.herding_pool]]
            if len(idx) == 0:
                continue
            feats = trainer.features_of(torch.utils.data.Subset(task.train, idx.tolist()))
            order = herding(feats, min(per_class, len(idx)))
            chosen = idx[order.cpu()]
            new.append(torch.stack([torch.full_like(chosen, t), chosen, torch.full_like(chosen, c)], 1))
        kept = []
        for key in torch.unique(self.entries[:, [0, 2]], dim=0) if len(self.entries) else []:
            rows = self.entries[(self.entries[:, 0] == key[0]) & (self.entries[:, 2] == key[1])]
            kept.append(rows[:per_class])
        self.entries = torch.cat(kept + new) if kept or new else self.entries

    def state_dict(self):
        return {"entries": self.entries.clone()}

    def load_state_dict(self, sd):
        self.entries = sd["entries"].to(torch.int64).clone()


def herding(features: torch.Tensor, m: int) -> torch.Tensor:
    """iCaRL's herding: indices of ``m`` rows of unit-norm ``features`` [n, d]
    whose running mean tracks the class mean best, in the order chosen."""
    n = features.shape[0]
    mu = features.mean(0)
    chosen = torch.zeros(n, dtype=torch.bool, device=features.device)
    total = torch.zeros_like(mu)
    order = []
    for k in range(1, m + 1):
        dist = ((mu - (total + features) / k) ** 2).sum(1)
        dist[chosen] = float("inf")
        i = int(torch.argmin(dist))
        order.append(i)
        chosen[i] = True
        total += features[i]
    return torch.tensor(order, dtype=torch.int64)
