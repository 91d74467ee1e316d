"""ContinualTrainer: fine-tune a CLIP-style model task after task and measure
what it keeps (SPEC.md sections 1 and 7).

Per task: AdamW (lr, weight decay; the logit scale frozen), linear warmup then
a cosine (or constant) schedule over ``iters_per_task`` steps of
``batch_size`` images, the training set cycled as often as needed;
cross-entropy with label smoothing over the task's class prompts (template
0), plus whatever the strategy adds. Every task is evaluated after every task
(R) and once before training (z). After each task a checkpoint (model,
optimizer, strategy state, RNG states, R so far; safetensors + JSON) is written
atomically; ``resume=True`` continues after the last finished task.

Files under ``out_dir``: ``results.json``, ``train_log.jsonl`` (one line per
log step), ``checkpoint/`` (``latest.json`` -> ``task-XXX/``).
"""
from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import sys
import time
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .._io import atomic_write_json, atomic_write_tensors
from .evaluate import _Transformed, autocast, evaluate_all
from .metrics import summarize
from .strategies import Strategy, create as create_strategy
from .strategies.base import Loss, TaskBatch
from .tasks import Task

FORMAT = "mgcl.cl.results"
CKPT_FORMAT = "mgcl.cl.checkpoint"
SCHEDULES = ("cosine", "constant")
# Settings that may change between a run and its resumption.
RESUME_FREE = ("log_every", "eval_batch_size", "num_workers", "progress")


def _split_state(sd: dict) -> tuple[dict, dict]:
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
    return tensors, rest


def versions() -> dict:
    from importlib import metadata  # noqa: PLC0415

    from .. import __version__  # noqa: PLC0415

    out = {"mgcl": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "numpy": np.__version__}
    for pkg in ("open_clip_torch", "transformers", "timm", "torchvision"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


class ContinualTrainer:
    """Runs ``strategy`` over ``tasks`` on ``model`` (a :class:`mgcl.models.VLM`).

    Args:
        model: the VLM (an ``nn.Module``); trained in place.
        strategy: a :class:`mgcl.cl.strategies.Strategy` or a name from
            ``mgcl.cl.strategies.available()`` (default options).
        tasks: the task sequence (each with at least 2 classes).
        iters_per_task, batch_size, lr, weight_decay, warmup, schedule,
        label_smoothing: the optimisation settings (SPEC.md section 1).
        amp: "bf16" (autocast), "off"/False, or None = bf16 on a GPU that has
            it, off otherwise. fp16 is refused: loss scaling would scale the
            gradients the Fisher guard squares.
        device, seed, out_dir: where, how seeded, where files go.
        resume: continue after the last finished task found in ``out_dir``.
        log_every: a log line (every loss term) every N steps.
        reset_optimizer: a fresh AdamW for each task (ZSCL's protocol); False
            keeps the moments across tasks.
        num_workers: DataLoader workers for decoding images (None: 0 on the
            CPU, up to 8 with a GPU); batches and augmentation stay seeded.
    """

    def __init__(self, model, strategy, tasks: Sequence[Task], *, iters_per_task: int = 1000, batch_size: int = 64,
                 lr: float = 1e-5, weight_decay: float = 0.0, warmup: int = 100, schedule: str = "cosine",
                 label_smoothing: float = 0.2, amp=None, device, seed: int = 42, out_dir: str,
                 resume: bool = False, log_every: int = 50, eval_batch_size: int = 256,
                 num_workers: Optional[int] = None, reset_optimizer: bool = True, progress: bool = True):
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
        if num_workers is None:
            num_workers = min(8, os.cpu_count() or 1) if torch.device(device).type == "cuda" else 0
        for name, v, lo in (("iters_per_task", iters_per_task, 1), ("batch_size", batch_size, 1),
                            ("warmup", warmup, 0), ("log_every", log_every, 1), ("eval_batch_size", eval_batch_size, 1),
                            ("num_workers", num_workers, 0)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"ContinualTrainer: {name} must be an int >= {lo}, got {v!r}")
        if not lr > 0 or not weight_decay >= 0:
            raise ValueError(f"ContinualTrainer: need lr > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
        if schedule not in SCHEDULES:
            raise ValueError(f"ContinualTrainer: schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"ContinualTrainer: label_smoothing must be in [0, 1), got {label_smoothing}")
        if amp not in (None, False, "off", "bf16"):
            raise ValueError(f"ContinualTrainer: amp must be None, 'bf16' or 'off', got {amp!r} "
                             "(fp16 loss scaling would distort the squared gradients of the Fisher guard)")
        if out_dir is None:
            raise ValueError("ContinualTrainer: out_dir is required")
        self.device = torch.device(device)
        if amp is None:
            amp = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
        self.amp = "off" if amp is False else amp
        self.model, self.strategy, self.tasks = model, strategy, tasks
        self.iters_per_task, self.batch_size, self.lr, self.weight_decay = iters_per_task, batch_size, lr, weight_decay
        self.warmup, self.schedule, self.label_smoothing, self.seed = warmup, schedule, label_smoothing, seed
        self.out_dir, self.resume, self.log_every = out_dir, resume, log_every
        self.eval_batch_size, self.num_workers = eval_batch_size, num_workers
        self.reset_optimizer, self.progress = reset_optimizer, progress
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
        strategy.check(self)

    # ---- helpers for strategies ------------------------------------------------------------

    def config(self) -> dict:
        return {
            "strategy": self.strategy.name, "strategy_options": self.strategy.options(),
            "tasks": [t.name for t in self.tasks], "model": type(self.model).__name__,
            "iters_per_task": self.iters_per_task, "batch_size": self.batch_size, "lr": self.lr,
            "weight_decay": self.weight_decay, "warmup": self.warmup, "schedule": self.schedule,
            "label_smoothing": self.label_smoothing, "amp": self.amp, "device": str(self.device), "seed": self.seed,
            "reset_optimizer": self.reset_optimizer, "log_every": self.log_every,
            "eval_batch_size": self.eval_batch_size, "num_workers": self.num_workers, "progress": self.progress,
        }

    def task_seed(self, t: int) -> int:
        return self.seed * 1000 + t

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
            return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def record(self, name: str, value) -> None:
        """Log a term from a hook (e.g. the guard penalty)."""
        if value is not None:
            self._terms[name] = value

    def loader(self, dataset, *, train: bool, seed: int, iters: int, batch_size: Optional[int] = None) -> Iterator:
        """``iters`` batches of (images, labels) from ``dataset``, reshuffled every
        pass and cycled as often as needed (a batch may span two passes)."""
        bs = batch_size or self.batch_size
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
                                             batch_size=self.eval_batch_size, num_workers=self.num_workers)
        for images, _ in loader:
            with self.autocast():
                out.append(self.image_features(images.to(self.device), m))
        m.train(was)
        return torch.cat(out)

    # ---- the run -----------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "constant":
            return self.lr
        span = max(1, self.iters_per_task - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * (step - self.warmup) / span)) * self.lr

    def _new_optimizer(self):
        return torch.optim.AdamW(self.params, lr=self.lr, weight_decay=self.weight_decay,
                                 fused=self.device.type == "cuda")

    def _seed_all(self, s: int) -> None:
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)

    def _evaluate(self):
        return evaluate_all(self.model, self.tasks, self.device, batch_size=self.eval_batch_size,
                            num_workers=self.num_workers, amp=self.amp)

    def run(self) -> dict:
        """Train on every task in order; returns (and writes results.json) R, z, AUC, metrics, config, versions."""
        os.makedirs(self.out_dir, exist_ok=True)
        T = len(self.tasks)
        self.start()
        state = self._load_checkpoint() if self.resume else None
        t0 = time.time()
        if state is not None:
            z, z_auc, R, A, start = state["z"], state["z_auc"], state["R"], state["auc"], state["finished"] + 1
            self.log(f"resuming after task {start}/{T} ({self.tasks[start - 1].name})")
        else:
            z, z_auc = self._zero_shot_row()
            R, A, start = [], [], 0
        for t in range(start, T):
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
            self._save_checkpoint(t, z, z_auc, R, A)
        results = {
            "format": FORMAT, "version": 1, "tasks": [t.name for t in self.tasks],
            "R": R, "z": z, "auc": A[-1], "auc_matrix": A, "z_auc": z_auc,
            "metrics": summarize(R, z, A[-1]), "zero_shot_metrics": summarize(None, z, z_auc),
            "config": self.config(), "versions": versions(), "seconds": time.time() - t0,
        }
        atomic_write_json(os.path.join(self.out_dir, "results.json"), results)
        return results

    def _zero_shot_row(self):
        path = os.path.join(self.out_dir, "checkpoint", "zero_shot.json")
        if self.resume and os.path.isfile(path):
            with open(path) as fh:
                d = json.load(fh)
            if d.get("tasks") == [t.name for t in self.tasks]:
                return d["z"], d["z_auc"]
        z, z_auc = self._evaluate()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_json(path, {"tasks": [t.name for t in self.tasks], "z": z, "z_auc": z_auc})
        self.log("zero-shot: " + " ".join(f"{t.name}={a:.2f}" for t, a in zip(self.tasks, z)))
        return z, z_auc

    def start(self) -> None:
        """Move the model, seed, ``strategy.setup`` (``run`` calls it; a bench may call it directly)."""
        self.model.to(self.device)
        self._seed_all(self.seed)
        self.strategy.setup(self)

    def begin_task(self, t: int) -> None:
        """Seed task t, ``strategy.before_task``, the optimizer for the task."""
        self.t = t
        self._seed_all(self.task_seed(t))
        self.strategy.before_task(self, t)
        if self.strategy.trains and (self.optimizer is None or self.reset_optimizer):
            self.optimizer = self._new_optimizer()

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

        task, T = self.tasks[t], len(self.tasks)
        batches = self.loader(task.train, train=True, seed=self.task_seed(t), iters=self.iters_per_task)
        self.model.train()
        bar = tqdm(total=self.iters_per_task, desc=f"task {t + 1}/{T} {task.name}", disable=not self.progress,
                   dynamic_ncols=True, leave=False)
        log_path = os.path.join(self.out_dir, "train_log.jsonl")
        for step in range(self.iters_per_task):
            images, labels = next(batches)
            loss = self.train_step(images.to(self.device, non_blocking=True),
                                   labels.to(self.device, non_blocking=True), t, step)
            bar.update(1)
            if (step + 1) % self.log_every == 0 or step == self.iters_per_task - 1:
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
                self.log(f"task {t + 1}/{T} {task.name} step {step + 1}/{self.iters_per_task} lr {lr:.3g} "
                         + " ".join(f"{k} {v:.4g}" for k, v in terms.items()))
        bar.close()

    def log(self, msg: str) -> None:
        if self.progress:
            from tqdm.auto import tqdm  # noqa: PLC0415

            tqdm.write(msg, file=sys.stderr)

    # ---- checkpoints -------------------------------------------------------------------------

    def _ckpt_root(self) -> str:
        return os.path.join(self.out_dir, "checkpoint")

    def _save_checkpoint(self, t: int, z, z_auc, R, A) -> None:
        root = self._ckpt_root()
        name = f"task-{t:03d}"
        d = os.path.join(root, name)
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)
        atomic_write_tensors(os.path.join(d, "model.safetensors"), self.model.state_dict())
        opt_tensors, opt_json = {}, None
        if self.optimizer is not None:
            osd = self.optimizer.state_dict()
            for i, st in osd["state"].items():
                for k, v in st.items():
                    if isinstance(v, torch.Tensor):
                        opt_tensors[f"state.{i}.{k}"] = v
            opt_json = {"param_groups": osd["param_groups"],
                        "scalars": {f"{i}.{k}": v for i, st in osd["state"].items() for k, v in st.items()
                                    if not isinstance(v, torch.Tensor)}}
        atomic_write_tensors(os.path.join(d, "optimizer.safetensors"), opt_tensors)
        s_tensors, s_json = _split_state(self.strategy.state_dict())
        atomic_write_tensors(os.path.join(d, "strategy.safetensors"), s_tensors)
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        np_state = np.random.get_state()
        rng["numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
        atomic_write_tensors(os.path.join(d, "rng.safetensors"), rng)
        py_state = random.getstate()
        atomic_write_json(os.path.join(d, "state.json"), {
            "format": CKPT_FORMAT, "version": 1, "finished": t, "config": self.config(),
            "z": z, "z_auc": z_auc, "R": R, "auc": A, "optimizer": opt_json, "strategy": s_json,
            "rng": {"python": [py_state[0], list(py_state[1]), py_state[2]],
                    "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]},
        })
        atomic_write_json(os.path.join(root, "latest.json"), {"dir": name, "finished": t})
        for other in os.listdir(root):
            if other.startswith("task-") and other != name:
                shutil.rmtree(os.path.join(root, other), ignore_errors=True)

    def _load_checkpoint(self) -> Optional[dict]:
        from safetensors.torch import load_file  # noqa: PLC0415

        root = self._ckpt_root()
        latest = os.path.join(root, "latest.json")
        if not os.path.isfile(latest):
            self.log(f"resume: no checkpoint in {root}; starting from the beginning")
            return None
        with open(latest) as fh:
            d = os.path.join(root, json.load(fh)["dir"])
        with open(os.path.join(d, "state.json")) as fh:
            state = json.load(fh)
        if state.get("format") != CKPT_FORMAT:
            raise ValueError(f"resume: {d} is not an mgcl checkpoint")
        saved, now = state["config"], self.config()
        diff = {k: (saved.get(k), now[k]) for k in now if k not in RESUME_FREE and saved.get(k) != now[k]}
        if diff:
            raise ValueError(f"resume: the checkpoint in {d} was made with other settings (saved, now): {diff}")
        if state["finished"] >= len(self.tasks) - 1:
            self.log("resume: every task is already finished; recomputing nothing but the results")
        self.model.load_state_dict(load_file(os.path.join(d, "model.safetensors"), device=str(self.device)))
        opt_tensors = load_file(os.path.join(d, "optimizer.safetensors"), device=str(self.device))
        if state["optimizer"] is not None:
            self.optimizer = self._new_optimizer()
            st: dict = {}
            for key, v in opt_tensors.items():
                _, i, k = key.split(".", 2)
                st.setdefault(int(i), {})[k] = v
            for key, v in state["optimizer"]["scalars"].items():
                i, k = key.split(".", 1)
                st.setdefault(int(i), {})[k] = v
            self.optimizer.load_state_dict({"state": st, "param_groups": state["optimizer"]["param_groups"]})
        s_tensors = load_file(os.path.join(d, "strategy.safetensors"), device=str(self.device))
        self.strategy.load_state_dict({**state["strategy"], **s_tensors})
        rng = load_file(os.path.join(d, "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda":
            states = [rng[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in rng]
            torch.cuda.set_rng_state_all(states)
        py = state["rng"]["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        npn = state["rng"]["numpy"]
        np.random.set_state((npn[0], rng["numpy"].numpy().astype(np.uint32), npn[1], npn[2], npn[3]))
        return state
