"""ContinualTrainer: fine-tune a CLIP-style model task after task and measure
what it keeps (SPEC.md sections 1 and 7).

Per task: AdamW (lr, weight decay; the logit scale frozen), linear warmup then
a cosine (or constant) schedule over ``iters_per_task`` steps of
``batch_size`` images, the training set cycled as often as needed;
cross-entropy with label smoothing over the task's class prompts (template
0), plus whatever the strategy adds. The settings are one ``TrainConfig``
(``mgcl.cl.config``). Every task is evaluated after every task (R) and once
before training (z). After each task a checkpoint is written
(``mgcl.cl.checkpoint``); ``resume=True`` continues after the last finished
task.

Files under ``out_dir``: ``results.json`` (``mgcl.cl.results``, one method),
``train_log.jsonl`` (one line per log step), ``checkpoint/``.
"""
from __future__ import annotations

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
from .evaluate import _Transformed, autocast, evaluate_all
from .strategies import Strategy, create as create_strategy
from .strategies.base import Loss, TaskBatch
from .tasks import Task


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
        resume: continue after the last finished task found in ``out_dir``.
        progress: progress bars and log lines on stderr.
    """

    def __init__(self, model, strategy, tasks: Sequence[Task], *, device, out_dir: str,
                 train_config: Optional[TrainConfig] = None, resume: bool = False, progress: bool = True,
                 **settings):
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
        self._tokens: dict[int, torch.Tensor] = {}
        self._terms: dict[str, torch.Tensor] = {}
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.t, self.step = 0, 0
        model.logit_scale.requires_grad_(False)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        if not self.params:
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

    def loader(self, dataset, *, train: bool, seed: int, iters: int, batch_size: Optional[int] = None) -> Iterator:
        """``iters`` batches of (images, labels) from ``dataset``, reshuffled every
        pass and cycled as often as needed (a batch may span two passes)."""
        bs = batch_size or self.train_config.batch_size
        g = torch.Generator().manual_seed(seed)
        order: list[int] = []
        while len(order) < bs * iters:
            order.extend(torch.randperm(len(dataset), generator=g).tolist())
        batches = [order[i * bs:(i + 1) * bs] for i in range(iters)]
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

    def lr_at(self, step: int) -> float:
        c = self.train_config
        if step < c.warmup:
            return c.lr * (step + 1) / c.warmup
        if c.schedule == "constant":
            return c.lr
        span = max(1, c.iters_per_task - c.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * (step - c.warmup) / span)) * c.lr

    def new_optimizer(self):
        return torch.optim.AdamW(self.params, lr=self.train_config.lr, weight_decay=self.train_config.weight_decay,
                                 fused=self.device.type == "cuda")

    def _seed_all(self, s: int) -> None:
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)

    def _evaluate(self):
        return evaluate_all(self.model, self.tasks, self.device, batch_size=self.train_config.eval_batch_size,
                            num_workers=self.num_workers, amp=self.amp, prompts=self.train_config.prompts)

    def run(self) -> dict:
        """Train on every task in order; returns (and writes results.json) the
        results of this one method (``mgcl.cl.results``)."""
        os.makedirs(self.out_dir, exist_ok=True)
        T = len(self.tasks)
        self.start()
        state = checkpoint.load(self) if self.resume else None
        if self.resume and state is None:
            self.log(f"resume: no checkpoint in {os.path.join(self.out_dir, 'checkpoint')}; starting from the start")
        finished = state["finished"] if state is not None else -1
        checkpoint.trim_log(self.out_dir, finished)
        t0 = time.time()
        if state is not None:
            z, z_auc, R, A = state["z"], state["z_auc"], state["R"], state["auc"]
            self.log(f"resuming after task {finished + 1}/{T} ({self.tasks[finished].name})"
                     + ("; every task is finished: only the results are written" if finished == T - 1 else ""))
        else:
            z, z_auc = self._zero_shot_row()
            R, A = [], []
        for t in range(finished + 1, T):
            self.begin_task(t)
            if self.strategy.trains:
                self._train_task(t)
            self.strategy.after_task(self, t)
            if self.strategy.trains:
                acc, auc = self._evaluate()
            else:
                acc, auc = list(z), list(z_auc)
            R.append(acc)
            A.append(auc)
            self.log(f"after task {t + 1}/{T} ({self.tasks[t].name}): "
                     + " ".join(f"{n}={a:.2f}" for n, a in zip((x.name for x in self.tasks), acc)))
            checkpoint.save(self, t, z=z, z_auc=z_auc, R=R, auc=A)
        entry = results_mod.method_entry(R, z, A, z_auc, strategy_options=self.strategy.options(),
                                         seconds=time.time() - t0)
        benchmarks = {t.meta.get("benchmark") or "" for t in self.tasks}
        res = results_mod.results(
            "trainer", {self.strategy.name: entry}, tasks=[t.name for t in self.tasks],
            domains=[t.domain for t in self.tasks], benchmark=benchmarks.pop() if len(benchmarks) == 1 else "",
            synthetic=all(t.meta.get("synthetic") for t in self.tasks), config={"trainer": self.config()},
            versions=_env.versions())
        atomic_write_json(os.path.join(self.out_dir, "results.json"), res)
        return res

    def _zero_shot_row(self):
        names = [t.name for t in self.tasks]
        saved = checkpoint.load_zero_shot(self.out_dir, names) if self.resume else None
        if saved is not None:
            return saved
        z, z_auc = self._evaluate()
        checkpoint.save_zero_shot(self.out_dir, names, z, z_auc)
        self.log("zero-shot: " + " ".join(f"{t.name}={a:.2f}" for t, a in zip(self.tasks, z)))
        return z, z_auc

    def start(self) -> None:
        """Move the model, seed, ``strategy.setup`` (``run`` calls it; a bench may call it directly)."""
        self.model.to(self.device)
        self._seed_all(self.train_config.seed)
        self.strategy.setup(self)

    def begin_task(self, t: int) -> None:
        """Seed task t, ``strategy.before_task``, the optimizer for the task."""
        self.t = t
        self._seed_all(self.task_seed(t))
        self.strategy.before_task(self, t)
        if self.strategy.trains and (self.optimizer is None or self.train_config.reset_optimizer):
            self.optimizer = self.new_optimizer()

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, t: int, step: int = 0) -> Loss:
        """One optimisation step on a task batch (already on the device): the
        strategy's loss, its parts backwarded in order with ``after_backward``
        after each, the optimizer step, ``after_step``. Returns the Loss."""
        lr = self.lr_at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
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
            self.strategy.after_backward(self, k)
        self.optimizer.step()
        self.strategy.after_step(self, step)
        return loss

    def _train_task(self, t: int) -> None:
        from tqdm.auto import tqdm  # noqa: PLC0415

        task, T, iters = self.tasks[t], len(self.tasks), self.train_config.iters_per_task
        batches = self.loader(task.train, train=True, seed=self.task_seed(t), iters=iters)
        self.model.train()
        bar = tqdm(total=iters, desc=f"task {t + 1}/{T} {task.name}", disable=not self.progress,
                   dynamic_ncols=True, leave=False)
        log_path = os.path.join(self.out_dir, checkpoint.LOG)
        for step in range(iters):
            images, labels = next(batches)
            loss = self.train_step(images.to(self.device, non_blocking=True),
                                   labels.to(self.device, non_blocking=True), t, step)
            bar.update(1)
            if (step + 1) % self.train_config.log_every == 0 or step == iters - 1:
                terms = {"loss": float(sum(p.detach().float() for p in loss.parts))}
                terms.update({k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
                              for k, v in {**loss.terms, **self._terms}.items()})
                if not all(math.isfinite(v) for v in terms.values()):
                    raise FloatingPointError(f"task {task.name!r} step {step + 1}: non-finite loss {terms}")
                bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items()})
                lr = self.lr_at(step)
                line = {"task": t, "task_name": task.name, "step": step + 1, "lr": lr, **terms}
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(line) + "\n")
                self.log(f"task {t + 1}/{T} {task.name} step {step + 1}/{iters} lr {lr:.3g} "
                         + " ".join(f"{k} {v:.4g}" for k, v in terms.items()))
        bar.close()

    def log(self, msg: str) -> None:
        if self.progress:
            from tqdm.auto import tqdm  # noqa: PLC0415

            tqdm.write(msg, file=sys.stderr)
