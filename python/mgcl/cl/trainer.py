"""ContinualTrainer: fine-tune a CLIP-style model task after task and measure
what it keeps (SPEC.md sections 1 and 7).

Per task: AdamW (lr, weight decay; the logit scale frozen), linear warmup then
a cosine (or constant) schedule over ``iters_per_task`` steps of
``batch_size`` images, the training set cycled as often as needed;
cross-entropy with label smoothing over the task's class prompts (template
0), plus whatever the strategy adds. The strategy may wrap the model, choose
the trainable parameters in groups with their own learning rates, the
optimizer (AdamW or SGD) and how test images are scored
(``mgcl.cl.strategies.base``: ``wrap_model``, ``param_groups``,
``optimizer``, ``eval_head``, ``eval_logits``). The settings are one ``TrainConfig``
(``mgcl.cl.config``). Every task is evaluated after every task (R) and once
before training (z). After each task a checkpoint is written
(``mgcl.cl.checkpoint``); ``resume=True`` continues after the last finished
task.

Files under ``out_dir``: ``results.json`` (``mgcl.cl.results``, one method),
``train_log.jsonl`` (one line per log step), the loggers' files, ``checkpoint/``.

**Several processes** (``torch.distributed`` initialised by the caller, e.g.
``mgcl run`` under ``torchrun``): the replicas start from rank 0's weights;
each rank trains on its contiguous share of every global batch (``batch_size``
and the reference batch size must divide by the world size) and the
strategy's losses see the global batch where they gather (PRIMED's
``contrastive_distill(gather=True)``). After each part of the loss is
backwarded the gradients are averaged over the ranks (one all-reduce per
part), so every ``after_backward`` hook (the guard) reads the gradient of the
global batch, as in one process, and the replicas stay identical. Retrieval
runs on rank 0 only (``RankZeroSiphon``), its reference set broadcast;
evaluation runs on rank 0 and its rows are broadcast; only rank 0 writes
files and logs.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import random
import sys
import time
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import _env
from .._io import atomic_write_json
from . import checkpoint
from . import results as results_mod
from .config import TrainConfig
from .evaluate import _Transformed, autocast, evaluate
from .logging import Callback, Logger, make as make_logger
from .strategies import Strategy, create as create_strategy
from .strategies.base import Loss, OptimizerSpec, ParamGroup, TaskBatch
from .strategies.parts import GUARD_MODES
from .tasks import Task

PENALTY = "penalty"  # the log's name for the guard term a strategy records under its mode (dfg / ewc / l2)


def _world() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) without one."""
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _from_rank_zero(fn, rank: int):
    """``fn()`` run on rank 0 and its (picklable) result broadcast to every rank."""
    import torch.distributed as dist  # noqa: PLC0415

    box = [fn() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RankZeroSiphon:
    """A Siphon seen from every rank of a multi-process run: the retrieval runs
    on rank 0 (``siphon``: the real one there, None elsewhere) and its result is
    broadcast, so every rank trains on the same reference set."""

    def __init__(self, siphon, rank: int):
        if rank == 0 and siphon is None:
            raise ValueError("RankZeroSiphon: rank 0 needs the Siphon")
        self.siphon, self.rank = siphon, rank

    @property
    def bank(self):
        """The Siphon's bank on rank 0, None on the other ranks."""
        return getattr(self.siphon, "bank", None)

    def on_rank_zero(self, fn):
        """``fn()`` on rank 0, its result broadcast (the reference pairs' image check)."""
        return _from_rank_zero(fn, self.rank)

    def reference_set(self, finished, stages: str = "multi-stage"):
        return _from_rank_zero(lambda: self.siphon.reference_set(finished, stages=stages), self.rank)

    def uniform_set(self, size, keywords=None, stages: str = "multi-stage"):
        return _from_rank_zero(lambda: self.siphon.uniform_set(size, keywords, stages=stages), self.rank)


def _bind(logger, trainer) -> None:
    """Point a logger at the run (its folder; W&B also gets the run's config)."""
    bind = getattr(logger, "bind", None)
    if bind is None:
        return
    if "config" in inspect.signature(bind).parameters:
        bind(trainer.out_dir, config=trainer.config())
    else:
        bind(trainer.out_dir)


class ContinualTrainer:
    """Runs ``strategy`` over ``tasks`` on ``model`` (a :class:`mgcl.models.VLM`).

    Args:
        model: the VLM (an ``nn.Module``); trained in place.
        strategy: a :class:`mgcl.cl.strategies.Strategy` or a name from
            ``mgcl.cl.strategies.available()`` (default options).
        tasks: the task sequence (each with at least 2 classes).
        train_config: the settings (:class:`mgcl.cl.config.TrainConfig`;
            default: SPEC.md's protocol); ``**settings`` (``iters_per_task=``,
            ``lr=``, ...) override single fields. ``amp`` None means bf16 on a
            GPU that has it, off otherwise; ``num_workers`` None: 0 on the CPU,
            up to 8 with a GPU (batches and augmentation stay seeded).
        device, out_dir: where it runs and where its files go.
        resume: continue after the last finished task (or the last mid-task
            checkpoint, ``checkpoint_every``) found in ``out_dir``.
        progress: progress bars and log lines on stderr.
        loggers: ``mgcl.cl.logging.Logger`` objects (None: those named by
            ``train_config.loggers``, default a ``CSVLogger``).
        callbacks: ``mgcl.cl.logging.Callback`` objects, called in order at
            task start, step end, evaluation and task end.
    """

    def __init__(self, model, strategy, tasks: Sequence[Task], *, device, out_dir: str,
                 train_config: Optional[TrainConfig] = None, resume: bool = False, progress: bool = True,
                 loggers: Optional[Sequence] = None, callbacks: Sequence[Callback] = (), **settings):
        tasks = list(tasks) if tasks is not None else []
        if not tasks:
            raise ValueError("ContinualTrainer: the task list is empty")
        names = set()
        for i, t in enumerate(tasks):
            if not isinstance(t, Task):
                raise ValueError(f"ContinualTrainer: tasks[{i}] is {type(t).__name__}, not mgcl.cl.Task")
            if len(t.classnames) < 2:
                raise ValueError(f"ContinualTrainer: task {t.name!r} has {len(t.classnames)} class(es); needs >= 2")
            if t.name in names:
                raise ValueError(f"ContinualTrainer: two tasks are named {t.name!r}")
            names.add(t.name)
            for split in ("train", "test"):
                ds = getattr(t, split)
                if ds is None or len(ds) == 0:
                    raise ValueError(f"ContinualTrainer: task {t.name!r} has an empty {split} set")
        if isinstance(strategy, str):
            strategy = create_strategy(strategy)
        if not isinstance(strategy, Strategy):
            raise ValueError(f"ContinualTrainer: strategy must be a Strategy or a name, got {type(strategy).__name__}")
        if out_dir is None:
            raise ValueError("ContinualTrainer: out_dir is required")
        cfg = train_config if train_config is not None else TrainConfig()
        if not isinstance(cfg, TrainConfig):
            raise ValueError(f"ContinualTrainer: train_config must be a TrainConfig, got {type(cfg).__name__}")
        self.train_config = cfg = cfg.replace(**settings) if settings else cfg
        self.device = torch.device(device)
        self.amp = cfg.amp or ("bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "off")
        self.num_workers = cfg.num_workers if cfg.num_workers is not None else \
            (min(8, os.cpu_count() or 1) if self.device.type == "cuda" else 0)
        self.model, self.strategy, self.tasks = model, strategy, tasks
        self.out_dir, self.resume, self.progress = out_dir, resume, progress
        self.loggers = [make_logger(n) for n in cfg.loggers] if loggers is None else list(loggers)
        bad = [type(x).__name__ for x in self.loggers if not isinstance(x, Logger)]
        if bad:
            raise ValueError(f"ContinualTrainer: loggers must have log_step, log_task, resume and close; got {bad}")
        self.callbacks = list(callbacks)
        bad = [type(x).__name__ for x in self.callbacks if not isinstance(x, Callback)]
        if bad:
            raise ValueError(f"ContinualTrainer: callbacks must be mgcl.cl.logging.Callback objects; got {bad}")
        if cfg.checkpoint_every and not strategy.mid_task_checkpoints:
            raise ValueError(f"ContinualTrainer: strategy {strategy.name!r} keeps state during a task that its "
                             "checkpoints do not hold; train.checkpoint_every must be null for it")
        self.rows: dict = {}           # z, z_auc, R, auc so far (what a mid-task checkpoint saves)
        self.world, self.rank = _world()
        if cfg.batch_size % self.world:
            raise ValueError(f"ContinualTrainer: train.batch_size {cfg.batch_size} does not divide by the "
                             f"{self.world} processes")
        if self.rank:
            self.progress, self.loggers = False, []
        self._tokens: dict[int, torch.Tensor] = {}
        self._terms: dict[str, torch.Tensor] = {}
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.optimizer_made = None     # (OptimizerSpec, [ParamGroup]) the optimizer was made of
        self.t, self.step = 0, 0
        model.logit_scale.requires_grad_(False)
        # the trainable parameters (in the order of the strategy's groups); chosen at start() and per task
        self.param_names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.groups: list[ParamGroup] = []
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("ContinualTrainer: the model has no trainable parameters")
        cfg.check_fits(largest_train_set=max(len(t.train) for t in tasks), image_bytes=self._image_bytes(),
                       memory=_env.memory_bytes(self.device))
        strategy.check(self)

    def _image_bytes(self) -> int:
        """Bytes of one image as the model takes it (its eval transform of a small image)."""
        from PIL import Image  # noqa: PLC0415

        x = self.model.transform(False)(Image.new("RGB", (32, 32)))
        return int(x.numel()) * 4

    # ---- helpers for strategies ------------------------------------------------------------

    def config(self) -> dict:
        """What ran (results.json's ``config.trainer``; a resume must match it): the
        strategy and its options, the tasks, the model, the settings as resolved."""
        return {
            "strategy": self.strategy.name, "strategy_options": self.strategy.options(),
            "tasks": [t.name for t in self.tasks], "model": type(self.model).__name__,
            **self.train_config.to_dict(), "amp": self.amp, "num_workers": self.num_workers,
            "device": str(self.device), "progress": self.progress,
        }

    def task_seed(self, t: int) -> int:
        return self.train_config.seed * 1000 + t

    def autocast(self):
        return autocast(self.device, self.amp)

    def class_tokens(self, t: int) -> torch.Tensor:
        """Tokens of task t's class prompts from its first template (CPU, [C, L])."""
        if t not in self._tokens:
            self._tokens[t] = self.model.tokenize(self.tasks[t].prompts(0))
        return self._tokens[t]

    def fp32(self):
        """Autocast off: losses, similarities and normalisation run in float32."""
        return torch.autocast(self.device.type, enabled=False)

    def image_features(self, images: torch.Tensor, model=None) -> torch.Tensor:
        f = (model or self.model).encode_image(images)
        with self.fp32():
            return F.normalize(f.float(), dim=-1)

    def text_features(self, tokens: torch.Tensor, model=None) -> torch.Tensor:
        f = (model or self.model).encode_text(tokens.to(self.device))
        with self.fp32():
            return F.normalize(f.float(), dim=-1)

    def logits(self, img: torch.Tensor, txt: torch.Tensor, model=None) -> torch.Tensor:
        with self.fp32():
            return (model or self.model).logit_scale.exp().float() * img.float() @ txt.float().T

    def task_logits(self, images: torch.Tensor, t: int, model=None) -> torch.Tensor:
        """Scaled cosine logits of ``images`` against task t's class prompts (with gradient)."""
        return self.logits(self.image_features(images, model), self.text_features(self.class_tokens(t), model), model)

    def ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.fp32():
            return F.cross_entropy(logits.float(), labels, label_smoothing=self.train_config.label_smoothing)

    def record(self, name: str, value) -> None:
        """Log a term from a hook (e.g. the guard penalty)."""
        if value is not None:
            self._terms[name] = value

    def loader(self, dataset, *, train: bool, seed: int, iters: int, batch_size: Optional[int] = None,
               start: int = 0, share: bool = False) -> Iterator:
        """``iters`` batches of (images, labels) from ``dataset``, reshuffled every
        pass and cycled as often as needed (a batch may span two passes);
        ``start``: begin at that batch (the same batches from there on);
        ``share``: this rank's share of each batch (several processes)."""
        bs = batch_size or self.train_config.batch_size
        g = torch.Generator().manual_seed(seed)
        order: list[int] = []
        while len(order) < bs * iters:
            order.extend(torch.randperm(len(dataset), generator=g).tolist())
        batches = [order[i * bs:(i + 1) * bs] for i in range(start, iters)]
        if share and self.world > 1:
            k = bs // self.world
            batches = [b[self.rank * k:(self.rank + 1) * k] for b in batches]
        ds = _Transformed(dataset, self.model.transform(train))
        return iter(torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=self.num_workers,
                                                pin_memory=self.device.type == "cuda"))

    @torch.no_grad()
    def features_of(self, dataset, model=None) -> torch.Tensor:
        """Unit-norm image features of a whole dataset (eval transform), in order."""
        m = model or self.model
        was = m.training
        m.eval()
        out = []
        loader = torch.utils.data.DataLoader(_Transformed(dataset, self.model.transform(False)),
                                             batch_size=self.train_config.eval_batch_size,
                                             num_workers=self.num_workers)
        for images, _ in loader:
            with self.autocast():
                out.append(self.image_features(images.to(self.device), m))
        m.train(was)
        return torch.cat(out)

    # ---- the run -----------------------------------------------------------------------------

    def lr_at(self, step: int, base: Optional[float] = None) -> float:
        """The learning rate at ``step`` of a group of learning rate ``base`` (default: the config's)."""
        c = self.train_config
        lr = c.lr if base is None else base
        if step < c.warmup:
            return lr * (step + 1) / c.warmup
        if c.schedule == "constant":
            return lr
        span = max(1, c.iters_per_task - c.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * (step - c.warmup) / span)) * lr

    def select_params(self, t: int) -> None:
        """The strategy's ``param_groups(self, t)``: ``params`` / ``param_names`` in
        group order, everything else frozen. ValueError on an unknown or repeated
        name, or on no trainable parameter at all."""
        groups = list(self.strategy.param_groups(self, t))
        named = dict(self.model.named_parameters())
        names: list[str] = []
        for g in groups:
            if not isinstance(g, ParamGroup):
                raise ValueError(f"strategy {self.strategy.name!r}: param_groups must return ParamGroup objects, "
                                 f"got {type(g).__name__}")
            names.extend(g.names)
        unknown = [n for n in names if n not in named]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if unknown or repeated:
            raise ValueError(f"strategy {self.strategy.name!r}: param_groups names "
                             + (f"unknown parameter(s) {unknown[:5]}" if unknown else f"{repeated[:5]} twice"))
        if not names and self.strategy.trains:
            raise ValueError(f"strategy {self.strategy.name!r}: no trainable parameters (param_groups is empty)")
        chosen = set(names)
        for n, p in named.items():
            p.requires_grad_(n in chosen)
        self.groups, self.param_names, self.params = groups, names, [named[n] for n in names]

    def optimizer_spec(self, t: int) -> OptimizerSpec:
        spec = self.strategy.optimizer(self, t)
        if not isinstance(spec, OptimizerSpec):
            raise ValueError(f"strategy {self.strategy.name!r}: optimizer must return an OptimizerSpec, "
                             f"got {type(spec).__name__}")
        return spec

    def new_optimizer(self, spec: Optional[OptimizerSpec] = None, groups: Optional[list] = None):
        """An optimizer (default: the strategy's for the current task) over
        ``groups`` (default: the current ones), lr and weight decay per group.
        ``optimizer_made`` records what it was made of (checkpoints save it)."""
        c = self.train_config
        spec = self.optimizer_spec(self.t) if spec is None else spec
        groups = self.groups if groups is None else groups
        named = dict(self.model.named_parameters())
        torch_groups = []
        for g in groups:
            if g.names:
                lr = c.lr if g.lr is None else float(g.lr)
                torch_groups.append({"params": [named[n] for n in g.names], "lr": lr, "base_lr": lr,
                                     "weight_decay": c.weight_decay if g.weight_decay is None
                                     else float(g.weight_decay)})
        self.optimizer_made = (spec, [ParamGroup(list(g.names), g.lr, g.weight_decay) for g in groups])
        return spec.build(torch_groups, fused=self.device.type == "cuda")

    def _seed_all(self, s: int) -> None:
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)

    def _evaluate(self):
        """Accuracy and AUC of every task, scored through the strategy's
        ``eval_head`` / ``eval_logits`` (the model in eval mode); on rank 0, broadcast."""
        if self.world > 1:
            return _from_rank_zero(self._evaluate_here, self.rank)
        return self._evaluate_here()

    @torch.no_grad()
    def _evaluate_here(self):
        was = self.model.training
        self.model.eval()
        rows = []
        try:
            for j, task in enumerate(self.tasks):
                head = self.strategy.eval_head(self, j)
                rows.append(evaluate(self.model, task, self.device, batch_size=self.train_config.eval_batch_size,
                                     num_workers=self.num_workers, amp=self.amp,
                                     logits=lambda x, j=j, head=head: self.strategy.eval_logits(self, x, j, head)))
        finally:
            self.model.train(was)
        return [r["acc"] for r in rows], [r["auc"] for r in rows]

    def run(self) -> dict:
        """Train on every task in order; returns (and writes results.json) the
        results of this one method (``mgcl.cl.results``)."""
        os.makedirs(self.out_dir, exist_ok=True)
        T = len(self.tasks)
        self.start()
        state = checkpoint.load(self) if self.resume else None
        finished = state["finished"] if state is not None else -1
        mid = checkpoint.read_mid(self, finished) if self.resume else None
        if self.resume and state is None and mid is None:
            self.log(f"resume: no checkpoint in {os.path.join(self.out_dir, 'checkpoint')}; starting from the start")
        resumed_step = mid[0]["step"] if mid is not None else None
        if self.rank == 0:
            checkpoint.trim_log(self.out_dir, finished + 1 if mid else finished, resumed_step)
        for lg in self.loggers:
            _bind(lg, self)
            lg.resume(finished + 1 if mid else finished, resumed_step)     # a fresh run: finished -1, nothing kept
        t0 = time.time()
        try:
            if state is not None:
                z, z_auc, R, A = state["z"], state["z_auc"], state["R"], state["auc"]
                self.log(f"resuming after task {finished + 1}/{T} ({self.tasks[finished].name})"
                         + ("; every task is finished: only the results are written" if finished == T - 1 else ""))
            else:
                z, z_auc = self._zero_shot_row()
                R, A = [], []
            self.rows = {"z": z, "z_auc": z_auc, "R": R, "auc": A}
            for t in range(finished + 1, T):
                for cb in self.callbacks:
                    cb.on_task_start(self, t)
                self.begin_task(t)
                if self.strategy.trains:
                    self._train_task(t, mid if mid is not None and mid[0]["task"] == t else None)
                self.strategy.after_task(self, t)
                if self.strategy.trains:
                    acc, auc = self._evaluate()
                else:
                    acc, auc = list(z), list(z_auc)
                R.append(acc)
                A.append(auc)
                names = [x.name for x in self.tasks]
                self.log(f"after task {t + 1}/{T} ({self.tasks[t].name}): "
                         + " ".join(f"{n}={a:.2f}" for n, a in zip(names, acc)))
                for cb in self.callbacks:
                    cb.on_evaluate(self, t, acc, auc)
                if self.rank == 0:
                    checkpoint.save(self, t, z=z, z_auc=z_auc, R=R, auc=A)
                row = {"task": t, "task_name": self.tasks[t].name, "acc_mean": sum(acc) / len(acc),
                       **{f"acc/{n}": a for n, a in zip(names, acc)}}
                for lg in self.loggers:
                    lg.log_task(row)
                for cb in self.callbacks:
                    cb.on_task_end(self, t, acc, auc)
        finally:
            for lg in self.loggers:
                lg.close()
        entry = results_mod.method_entry(R, z, A, z_auc, strategy_options=self.strategy.options(),
                                         seconds=time.time() - t0)
        benchmarks = {t.meta.get("benchmark") or "" for t in self.tasks}
        res = results_mod.results(
            "trainer", {self.strategy.name: entry}, tasks=[t.name for t in self.tasks],
            domains=[t.domain for t in self.tasks], benchmark=benchmarks.pop() if len(benchmarks) == 1 else "",
            synthetic=all(t.meta.get("synthetic") for t in self.tasks), config={"trainer": self.config()},
            versions=_env.versions())
        if self.rank == 0:
            atomic_write_json(os.path.join(self.out_dir, "results.json"), res)
        return res

    def _zero_shot_row(self):
        names = [t.name for t in self.tasks]
        saved = checkpoint.load_zero_shot(self.out_dir, names) if self.resume else None
        if saved is not None:
            return saved
        z, z_auc = self._evaluate()
        if self.rank == 0:
            checkpoint.save_zero_shot(self.out_dir, names, z, z_auc)
        self.log("zero-shot: " + " ".join(f"{t.name}={a:.2f}" for t, a in zip(self.tasks, z)))
        for cb in self.callbacks:
            cb.on_evaluate(self, -1, z, z_auc)
        return z, z_auc

    def start(self) -> None:
        """Move the model, seed, ``strategy.wrap_model``, the trainable parameters
        of task 0, ``strategy.setup`` (``run`` calls it; a bench may call it directly)."""
        self.model.to(self.device)
        self._seed_all(self.train_config.seed)
        wrapped = self.strategy.wrap_model(self, self.model)
        if not isinstance(wrapped, torch.nn.Module):
            raise ValueError(f"strategy {self.strategy.name!r}: wrap_model must return an nn.Module, "
                             f"got {type(wrapped).__name__}")
        self.model = wrapped.to(self.device)
        self.select_params(0)
        if self.world > 1:
            import torch.distributed as dist  # noqa: PLC0415

            with torch.no_grad():
                for x in [*self.model.parameters(), *self.model.buffers()]:
                    dist.broadcast(x.data, src=0)    # every replica starts from rank 0's weights
            ref = self.strategy.reference
            if ref is not None and not isinstance(ref.siphon, RankZeroSiphon):
                ref.siphon = RankZeroSiphon(ref.siphon, self.rank)
        self.strategy.setup(self)

    def begin_task(self, t: int) -> None:
        """Seed task t, ``strategy.before_task``, the task's trainable parameters,
        and a new optimizer when the config resets it per task or the groups or
        the optimizer changed."""
        self.t = t
        self._seed_all(self.task_seed(t))
        self.strategy.before_task(self, t)
        self.select_params(t)
        if self.strategy.trains and (self.optimizer is None or self.train_config.reset_optimizer
                                     or self.optimizer_made != (self.optimizer_spec(t), self.groups)):
            self.optimizer = self.new_optimizer()

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, t: int, step: int = 0) -> Loss:
        """One optimisation step on a task batch (already on the device): the
        strategy's loss, its parts backwarded in order with ``after_backward``
        after each, the optimizer step, ``after_step``. Returns the Loss."""
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(step, g["base_lr"])
        self.step = step
        self.optimizer.zero_grad(set_to_none=True)
        self._terms = {}
        with self.autocast():
            loss = self.strategy.training_loss(self, TaskBatch(images, labels, t))
        if not isinstance(loss, Loss) or not loss.parts:
            raise RuntimeError(f"strategy {self.strategy.name!r}: training_loss must return a Loss with parts")
        last = len(loss.parts) - 1
        for k, part in enumerate(loss.parts):
            if part.requires_grad:
                part.backward(retain_graph=k < last)
            if self.world > 1:
                self._average_grads()
            self.strategy.after_backward(self, k)
        self.optimizer.step()
        self.strategy.after_step(self, step)
        return loss

    @torch.no_grad()
    def _average_grads(self) -> None:
        """Every trainable parameter's gradient averaged over the ranks (one
        flat all-reduce per dtype; a gradient a rank left unset counts as zeros)."""
        import torch.distributed as dist  # noqa: PLC0415

        by: dict = {}
        for p in self.params:
            by.setdefault(p.dtype, []).append(p)
        for ps in by.values():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])
            dist.all_reduce(flat)
            flat.div_(self.world)
            for p, v in zip(ps, flat.split([p.numel() for p in ps])):
                if p.grad is None:
                    p.grad = torch.empty_like(p)
                p.grad.copy_(v.view(p.shape))

    def shard(self, x):
        """This rank's contiguous share of a global batch (dim 0 of a tensor, or of
        every tensor field of a dataclass / tuple); ``x`` itself in one process."""
        if self.world == 1:
            return x
        if isinstance(x, torch.Tensor):
            n = x.shape[0]
            if n % self.world:
                raise ValueError(f"a global batch of {n} does not divide by the {self.world} processes")
            k = n // self.world
            return x[self.rank * k:(self.rank + 1) * k]
        if dataclasses.is_dataclass(x):
            return dataclasses.replace(x, **{f.name: self.shard(getattr(x, f.name)) for f in dataclasses.fields(x)})
        return type(x)(self.shard(v) for v in x)

    def _train_task(self, t: int, mid: Optional[tuple] = None) -> None:
        """Task t's steps; from a mid-task checkpoint ``mid`` (``checkpoint.read_mid``):
        the data streams skipped to its step, then its states restored."""
        from tqdm.auto import tqdm  # noqa: PLC0415

        task, T, c = self.tasks[t], len(self.tasks), self.train_config
        iters, first = c.iters_per_task, (mid[0]["step"] if mid is not None else 0)
        batches = self.loader(task.train, train=True, seed=self.task_seed(t), iters=iters, start=first, share=True)
        if mid is not None:
            self.strategy.fast_forward(self, first)
            checkpoint.restore(self, mid)
            self.log(f"resuming task {t + 1}/{T} ({task.name}) after step {first}")
        self.model.train()
        bar = tqdm(total=iters, initial=first, desc=f"task {t + 1}/{T} {task.name}", disable=not self.progress,
                   dynamic_ncols=True, leave=False)
        log_path = os.path.join(self.out_dir, checkpoint.LOG)
        clock, seen = time.perf_counter(), 0
        for step in range(first, iters):
            images, labels = next(batches)
            loss = self.train_step(images.to(self.device, non_blocking=True),
                                   labels.to(self.device, non_blocking=True), t, step)
            seen += len(images) * self.world     # the global batch
            bar.update(1)
            for cb in self.callbacks:
                cb.on_step_end(self, t, step, loss)
            if (step + 1) % c.log_every == 0 or step == iters - 1:
                terms = {"loss": float(sum(p.detach().float() for p in loss.parts))}
                terms.update({PENALTY if k in GUARD_MODES else k: float(v.detach()) if isinstance(v, torch.Tensor)
                              else float(v) for k, v in {**loss.terms, **self._terms}.items()})
                if not all(math.isfinite(v) for v in terms.values()):
                    raise FloatingPointError(f"task {task.name!r} step {step + 1}: non-finite loss {terms}")
                bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items()})
                now = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                line = {"task": t, "task_name": task.name, "step": step + 1, "global_step": t * iters + step + 1,
                        "lr": lr, "throughput": seen / max(now - clock, 1e-9), **terms}
                clock, seen = now, 0
                if self.rank == 0:
                    with open(log_path, "a") as fh:
                        fh.write(json.dumps(line) + "\n")
                for lg in self.loggers:
                    lg.log_step(line)
                self.log(f"task {t + 1}/{T} {task.name} step {step + 1}/{iters} lr {lr:.3g} "
                         + " ".join(f"{k} {v:.4g}" for k, v in terms.items()))
            if c.checkpoint_every and (step + 1) % c.checkpoint_every == 0 and step + 1 < iters and self.rank == 0:
                checkpoint.save_mid(self, t, step + 1, **self.rows)
        bar.close()

    def log(self, msg: str) -> None:
        if self.progress:
            from tqdm.auto import tqdm  # noqa: PLC0415

            tqdm.write(msg, file=sys.stderr)
