"""Learning without Forgetting and iCaRL as ZSCL's code runs them (``mtil/``:
``scripts/lwf.sh``; ``src/models/icarl.py`` with ``src/dynamic_dataset.py``).
Both add to the task's CE a distillation against the teacher's text
embeddings of the CURRENT task's class prompts (``parts.teacher_text_kd``:
KD at T = 2 over the prompts of each image plus over the images of each
prompt, each direction weight ``lam``): LwF on images of the current task,
iCaRL on a batch of exemplars from its memory."""
from __future__ import annotations

import torch

from ..evaluate import _Transformed
from .base import Loss, Strategy, TaskBatch, check_choice, frozen_copy
from .parts import teacher_text_kd

ICARL_TEACHERS = ("initial", "previous")


def _check(name, lam, temperature):
    for key, v, ok in (("lam", lam, lambda x: x >= 0), ("temperature", temperature, lambda x: x > 0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise ValueError(f"{name}: {key} must be a number {'>= 0' if key == 'lam' else '> 0'}, got {v!r}")
    return float(lam), float(temperature)


class _TextKD(Strategy):
    """Holds a teacher and its unit text embeddings of the current task's class prompts."""

    teacher = teacher_text = None

    def set_teacher(self, trainer, t, model) -> None:
        self.teacher = frozen_copy(model)
        with torch.no_grad():
            self.teacher_text = trainer.text_features(trainer.class_tokens(t), model=self.teacher)

    def kd(self, trainer, images) -> torch.Tensor:
        return teacher_text_kd(trainer, images.to(trainer.device, non_blocking=True), self.teacher,
                               self.teacher_text, self.temperature)

    def after_task(self, trainer, t):
        self.teacher = self.teacher_text = None


class LwF(_TextKD):
    """ZSCL's LwF (``--method ZSCL --image_loss --text_loss --fair --ref-dataset
    <current> --ref-model <previous>``): CE + lam * KD on the current task, the
    teacher the model at the task's start (the pre-trained model for the first
    task, where the script passes no ``--ref-model``), the KD images a second,
    independently shuffled stream over the current task's training set
    through the eval transform (ZSCL's reference loader with its test
    preprocessing), the texts the current task's class prompts, T = 2.

    Deviation: none in the loss; the second stream is seeded from the task's
    seed (``task_seed + 5``) so runs repeat."""

    name = "lwf"

    def __init__(self, lam: float = 1.0, temperature: float = 2.0):
        self.lam, self.temperature = _check("lwf", lam, temperature)
        self.stream = None

    def before_task(self, trainer, t):
        self.set_teacher(trainer, t, trainer.model)
        self.stream = trainer.loader(trainer.tasks[t].train, train=False, seed=trainer.task_seed(t) + 5,
                                     iters=trainer.train_config.iters_per_task)

    def training_loss(self, trainer, batch: TaskBatch) -> Loss:
        ce = trainer.ce(trainer.task_logits(batch.images, batch.task), batch.labels)
        kd = self.kd(trainer, next(self.stream)[0])
        return Loss([ce + self.lam * kd], {"ce": ce, "kd": kd})

    def after_task(self, trainer, t):
        super().after_task(trainer, t)
        self.stream = None


class _Memory(torch.utils.data.Dataset):
    """Exemplars: rows (task, index) into the tasks' training sets."""

    def __init__(self, tasks, entries: torch.Tensor):
        self.tasks, self.entries = tasks, entries.tolist()

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        task, index = self.entries[i]
        return self.tasks[task].train[index]


class _InOrder:
    """Batches of ``dataset`` in its order, the last one short, cycled forever (ZSCL's
    ``batch``). A pass's loader iterator is made at its first batch, as a generator's
    ``yield from`` would; ``skip(steps)`` puts a fresh stream where ``steps`` batches
    would have left it without decoding them (a mid-task resume)."""

    def __init__(self, dataset, transform, batch_size: int):
        self.data, self.batch_size = _Transformed(dataset, transform), batch_size
        self.loader = torch.utils.data.DataLoader(self.data, batch_size=batch_size, shuffle=False)
        self.it = None

    def __iter__(self):
        return self

    def __next__(self):
        if self.it is not None:
            try:
                return next(self.it)
            except StopIteration:
                pass
        self.it = iter(self.loader)
        return next(self.it)

    def skip(self, steps: int) -> None:
        within = steps % len(self.loader)
        self.it = None if within == 0 else iter(torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.data, range(within * self.batch_size, len(self.data))),
            batch_size=self.batch_size, shuffle=False))  # the rest of the pass: the same batches


class ICaRL(_TextKD):
    """ZSCL's iCaRL (``--method icarl --memory_size 10000``).

    - Task 1: plain fine-tuning; its memory is its first ``memory`` training
      images, in order (no herding, as ZSCL's first round).
    - Task t > 1: CE + lam * KD on the next batch of exemplars, the memory
      read in order in batches of ``replay_batch_size`` (None: the task batch
      size) and cycled; the teacher is the pre-trained model
      (``teacher="initial"``: the script passes no ``--ref-model``;
      "previous": the model at the task's start), the texts the current
      task's class prompts, T = 2.
    - After task t > 1 (the memory policy, per dataset, not per class): with
      t datasets seen, each earlier dataset keeps its first ``memory // t``
      exemplars, and the new one gets ``memory - memory // t`` (or all its
      images), chosen by herding on the just-trained model's image features
      of its first ``herding_pool`` training images (ZSCL reads 30,000). As in
      ZSCL's code the memory can then exceed ``memory`` (from the third task
      on: 2 x 3,333 + 6,667 for 10,000).

    Deviations, and why: ZSCL's scripts leave the exemplar loss terms
    unstated (``icarl.sh`` passes neither ``--image_loss`` nor ``--text_loss``,
    which would make it plain fine-tuning); mgcl adds both directions, as
    ZSCL's ZSCL and LwF runs do. Exemplars are stored as indices into the
    training sets and decoded through the eval transform when read (ZSCL
    stores the preprocessed tensors)."""

    name = "icarl"

    def __init__(self, memory: int = 10000, lam: float = 1.0, temperature: float = 2.0,
                 replay_batch_size: int | None = None, herding_pool: int = 30000, teacher: str = "initial"):
        self.lam, self.temperature = _check("icarl", lam, temperature)
        for key, v in (("memory", memory), ("herding_pool", herding_pool), ("replay_batch_size", replay_batch_size)):
            if not (v is None and key == "replay_batch_size") and (isinstance(v, bool) or not isinstance(v, int)
                                                                  or v < 1):
                raise ValueError(f"icarl: {key} must be an integer >= 1, got {v!r}")
        self.teacher_kind = check_choice(self.name, "teacher", teacher, ICARL_TEACHERS)
        self.memory, self.replay_batch_size, self.herding_pool = memory, replay_batch_size, herding_pool
        self.entries = torch.zeros((0, 2), dtype=torch.int64)  # (task, index), each task's in its stored order
        self.initial = None
        self.replay = None

    def setup(self, trainer):
        if self.teacher_kind == "initial":
            self.initial = frozen_copy(trainer.model)

    def before_task(self, trainer, t):
        self.replay = None
        if len(self.entries) == 0:
            return
        self.set_teacher(trainer, t, self.initial if self.teacher_kind == "initial" else trainer.model)
        self.replay = _InOrder(_Memory(trainer.tasks, self.entries), trainer.model.transform(False),
                               self.replay_batch_size or trainer.train_config.batch_size)

    def fast_forward(self, trainer, steps):
        super().fast_forward(trainer, steps)
        if self.replay is not None:
            self.replay.skip(steps)

    def training_loss(self, trainer, batch: TaskBatch) -> Loss:
        ce = trainer.ce(trainer.task_logits(batch.images, batch.task), batch.labels)
        if self.replay is None:
            return Loss([ce], {"ce": ce})
        kd = self.kd(trainer, next(self.replay)[0])
        return Loss([ce + self.lam * kd], {"ce": ce, "kd": kd})

    @torch.no_grad()
    def after_task(self, trainer, t):
        super().after_task(trainer, t)
        self.replay = None
        n = len(trainer.tasks[t].train)
        if t == 0:
            chosen = torch.arange(min(self.memory, n))
            kept = []
        else:
            seen = len({int(x) for x in self.entries[:, 0]}) + 1
            share = self.memory // seen
            kept = [self.entries[self.entries[:, 0] == j][:share] for j in torch.unique(self.entries[:, 0])]
            pool = list(range(min(n, self.herding_pool)))
            feats = trainer.features_of(torch.utils.data.Subset(trainer.tasks[t].train, pool))
            chosen = herding(feats, min(self.memory - share, len(pool))).cpu()
        new = torch.stack([torch.full_like(chosen, t), chosen], 1)
        self.entries = torch.cat(kept + [new])

    def state_dict(self):
        sd = {"entries": self.entries.clone()}
        if self.initial is not None:
            sd.update({f"initial.{k}": v for k, v in self.initial.state_dict().items()})
        return sd

    def load_state_dict(self, sd):
        self.entries = sd["entries"].to(torch.int64).clone()
        if self.initial is not None:
            self.initial.load_state_dict({k[len("initial."):]: v for k, v in sd.items() if k.startswith("initial.")})


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
