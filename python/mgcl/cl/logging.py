"""Where a continual run reports while it trains: loggers and callbacks.

A **logger** receives numbers (``Logger`` protocol): ``log_step(row)`` every
``log_every`` steps, with ``task``, ``task_name``, ``step`` (1-based, within
the task), ``global_step``, ``lr`` (the first group's), ``throughput``
(training images per second since the previous row), ``loss`` and the
strategy's terms (``ce``, ``ckt``, ``cmc``, ...; ``penalty``: the guard's
penalty when the strategy has a guard term); ``log_task(row)`` after each
task, with ``task``, ``task_name`` and the R row (``acc/<task name>`` for
every task) and its mean ``acc_mean``; ``close()`` at the end of the run.
``resume(task, step)``, before anything is logged, tells a logger where the
run starts: after ``step`` of ``task`` (step None: after the whole task; task
-1: a fresh run), so a file logger drops what an earlier run in the same
folder had logged past that point.

The adapters: ``CSVLogger`` (the default: ``steps.csv`` and ``tasks.csv`` in
the run's folder), ``TensorBoardLogger`` (``tensorboard`` installed; event
files under ``tensorboard/``) and ``WandbLogger`` (``wandb`` installed;
``mode="offline"`` writes the run under ``wandb/`` for a later ``wandb
sync``). ``TrainConfig.loggers`` names them ("csv", "tensorboard",
"wandb"); ``ContinualTrainer(loggers=[...])`` takes logger objects instead.

A **callback** (``Callback``: override what you need) is called by the
trainer at ``on_task_start(trainer, t)``, ``on_step_end(trainer, t, step,
loss)`` (step 0-based; ``loss`` the strategy's ``Loss``, with its tensors),
``on_evaluate(trainer, t, acc, auc)`` (t = -1 for the zero-shot row) and
``on_task_end(trainer, t, acc, auc)``. Callbacks may read anything of the
trainer; what they change in the model or the optimizer changes the run.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Optional, Protocol, runtime_checkable

from .._io import atomic_write_bytes
from .config import LOGGERS
STEP_COLUMNS = ("task", "task_name", "step", "global_step", "lr", "throughput", "loss", "ce", "ckt", "cmc",
                "penalty")


@runtime_checkable
class Logger(Protocol):
    """What the trainer logs to (module doc)."""

    def log_step(self, row: dict) -> None: ...

    def log_task(self, row: dict) -> None: ...

    def resume(self, task: int, step: Optional[int]) -> None: ...

    def close(self) -> None: ...


class Callback:
    """Hooks of the training loop (module doc); each does nothing by default."""

    def on_task_start(self, trainer, t: int) -> None:
        pass

    def on_step_end(self, trainer, t: int, step: int, loss) -> None:
        pass

    def on_evaluate(self, trainer, t: int, acc: list, auc: list) -> None:
        pass

    def on_task_end(self, trainer, t: int, acc: list, auc: list) -> None:
        pass


def logged_before(row: dict, task: int, step: Optional[int]) -> bool:
    """Whether ``row`` (its task and step) was logged at or before step ``step``
    of ``task`` (None: the end of ``task``)."""
    t = int(row["task"])
    if step is None or t != task:
        return t <= task
    return "step" not in row or int(row["step"]) <= step


class _CSVFile:
    """One CSV file whose columns grow as new keys appear (then it is rewritten)."""

    def __init__(self, path: str, first: tuple):
        self.path, self.columns = path, list(first)
        self.rows: list[dict] = []
        if os.path.isfile(path):
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.columns = list(reader.fieldnames or first)
                self.rows = [r for r in reader if r.get("task") not in (None, "")]

    def append(self, row: dict) -> None:
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new or not os.path.isfile(self.path):
            self.columns += new
            self.rewrite()
            return
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, self.columns).writerow(row)

    def keep(self, task: int, step: Optional[int]) -> None:
        self.rows = [r for r in self.rows if logged_before(r, task, step)]
        self.rewrite()

    def rewrite(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, self.columns)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_bytes(self.path, buf.getvalue().encode())


class CSVLogger:
    """``steps.csv`` (one row per logged step) and ``tasks.csv`` (the R row after
    each task) in ``folder`` (default: the run's ``out_dir``, set by the trainer)."""

    def __init__(self, folder: Optional[str] = None):
        self.folder = folder
        self._steps: Optional[_CSVFile] = None
        self._tasks: Optional[_CSVFile] = None

    def bind(self, out_dir: str) -> None:
        self.folder = self.folder or out_dir
        os.makedirs(self.folder, exist_ok=True)
        self._steps = _CSVFile(os.path.join(self.folder, "steps.csv"), STEP_COLUMNS)
        self._tasks = _CSVFile(os.path.join(self.folder, "tasks.csv"), ("task", "task_name", "acc_mean"))

    def log_step(self, row: dict) -> None:
        self._steps.append(row)

    def log_task(self, row: dict) -> None:
        self._tasks.append(row)

    def resume(self, task: int, step: Optional[int]) -> None:
        self._steps.keep(task, step)
        self._tasks.keep(task if step is None else task - 1, None)

    def close(self) -> None:
        pass


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in ("task", "step", "global_step")}


class TensorBoardLogger:
    """Scalars to TensorBoard event files (``tensorboard`` installed): step rows
    as ``train/<key>`` at the global step, task rows as ``R/<key>`` at the task."""

    def __init__(self, log_dir: Optional[str] = None):
        self.log_dir = log_dir
        self.writer = None

    def bind(self, out_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
        except ImportError:
            raise ImportError("TensorBoardLogger needs the tensorboard package: pip install 'mgcl[logging]'") \
                from None
        self.log_dir = self.log_dir or os.path.join(out_dir, "tensorboard")
        self.writer = SummaryWriter(self.log_dir)

    def log_step(self, row: dict) -> None:
        for k, v in _numbers(row).items():
            self.writer.add_scalar(f"train/{k}", v, row["global_step"])

    def log_task(self, row: dict) -> None:
        for k, v in _numbers(row).items():
            self.writer.add_scalar(f"R/{k}", v, row["task"])
        self.writer.flush()

    def resume(self, task: int, step: Optional[int]) -> None:
        pass  # event files are append-only; TensorBoard shows the latest value at a repeated step

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbLogger:
    """A Weights & Biases run (``wandb`` installed). ``mode`` "online",
    "offline" (written under ``<out_dir>/wandb`` for ``wandb sync``) or
    "disabled"; ``project``, ``name`` and any ``wandb.init`` keyword. The run's
    config is the trainer's ``config()``."""

    def __init__(self, project: str = "mgcl", *, mode: str = "offline", name: Optional[str] = None, **init):
        self.project, self.mode, self.name, self.init = project, mode, name, init
        self.run = None

    def bind(self, out_dir: str, config: Optional[dict] = None) -> None:
        try:
            import wandb  # noqa: PLC0415
        except ImportError:
            raise ImportError("WandbLogger needs the wandb package: pip install 'mgcl[logging]'") from None
        self.run = wandb.init(project=self.project, name=self.name, mode=self.mode, dir=out_dir,
                              config=config or {}, reinit="create_new", **self.init)
        self.run.define_metric("global_step")
        self.run.define_metric("train/*", step_metric="global_step")
        self.run.define_metric("task")
        self.run.define_metric("R/*", step_metric="task")

    def log_step(self, row: dict) -> None:
        self.run.log({"global_step": row["global_step"], **{f"train/{k}": v for k, v in _numbers(row).items()}})

    def log_task(self, row: dict) -> None:
        self.run.log({"task": row["task"], **{f"R/{k}": v for k, v in _numbers(row).items()}})

    def resume(self, task: int, step: Optional[int]) -> None:
        pass

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def make(name: str):
    """A logger by its ``TrainConfig.loggers`` name."""
    return {"csv": CSVLogger, "tensorboard": TensorBoardLogger, "wandb": WandbLogger}[name]()


__all__ = ["Logger", "Callback", "CSVLogger", "TensorBoardLogger", "WandbLogger", "LOGGERS", "make", "logged_before"]
