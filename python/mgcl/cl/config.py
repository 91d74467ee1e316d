"""The training settings of a continual run: one dataclass, one set of
defaults (SPEC.md section 1's protocol), one validator, shared by
``ContinualTrainer``, ``mgcl run`` (the config's ``train`` section) and
``mgcl demo``.

Rules, checked at construction (``ConfigError`` naming ``train.<key>``):

- sizes (``iters_per_task``, ``batch_size``, ``log_every``,
  ``eval_batch_size``) are integers in [1, 2**31 - 1]; ``warmup`` and
  ``num_workers`` in [0, 2**31 - 1] (``num_workers`` None: 0 on a CPU, up to
  8 with a GPU); ``seed`` an integer in [0, 2**32 - 1] (numpy's seed range;
  each task and each reference pass derives its own seed from it);
- ``lr`` a finite number > 0, ``weight_decay`` a finite number >= 0;
- ``label_smoothing`` in [0, 1): at 1 the target is uniform over the classes
  whatever the label, so the task loss carries no label at all, which no
  fine-tuning run wants (``torch``'s cross-entropy, and so
  ``mgcl.nn.PrimedLoss`` as a drop-in loss, accept 1);
- ``schedule`` "cosine" or "constant"; ``amp`` None (bf16 on a GPU that has
  it), "off" (YAML's ``off`` / ``false`` read as False count too) or "bf16";
  fp16 is refused: loss scaling would scale the gradients the Fisher guard
  squares;
- ``reset_optimizer`` true or false;
- ``checkpoint_every``: None (checkpoints at task ends only) or an integer
  >= 1: a mid-task checkpoint every that many steps, so a killed run resumes
  at the last one (``mgcl.cl.checkpoint``);
- ``loggers``: a list of names from ``mgcl.cl.logging.LOGGERS`` ("csv",
  "tensorboard", "wandb"; default ["csv"]; [] for none); the trainer's
  ``loggers=`` argument takes logger objects instead.
- ``prompts``: the evaluation heads, "ensemble" (default: every template of
  a class embedded and averaged, as ZSCL's evaluation and today's mgcl do) or
  "first" (one prompt per class, the first template, SPEC.md section 1's
  wording).

``check_fits`` bounds ``batch_size`` by what a run can hold (the largest
task's training set, and the memory one input batch takes); the trainer
calls it on its tasks and model, ``mgcl run --check`` on the benchmark's
definition.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from ..nn import LABEL_SMOOTHING_RULE, label_smoothing_ok

SCHEDULES = ("cosine", "constant")
PROMPTS = ("ensemble", "first")
AMP = (None, "off", "bf16")
LOGGERS = ("csv", "tensorboard", "wandb")   # mgcl.cl.logging's adapters
MAX_SIZE = 2**31 - 1
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A setting or a config file that cannot run; the message names the key or the file."""


def check_keys(where: str, given, allowed) -> None:
    """ConfigError naming every key of ``given`` not in ``allowed`` (with a close match when there is one)."""
    bad = [k for k in given if k not in allowed]
    if bad:
        hints = []
        for k in bad:
            close = difflib.get_close_matches(str(k), [str(a) for a in allowed], n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{where}: unknown key(s) {', '.join(hints)}; allowed: {', '.join(map(str, allowed))}")


def output_dir_problem(path) -> Optional[str]:
    """Why ``path`` cannot be (made) an output directory, or None: it must be a
    directory, or its nearest existing ancestor a writable directory."""
    path = os.path.abspath(os.fspath(path))
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent == path and not os.path.isdir(path):
        return f"{path} is a file, not a directory"
    if not os.path.isdir(parent):
        return f"{path} cannot be made ({parent} is a file)"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path} cannot be written ({parent} is not writable)"
    return None


def _int(key: str, v, lo: int, hi: int, optional: bool = False):
    if v is None and optional:
        return v
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"train.{key}: expected an integer >= {lo} and <= {hi:,}, got {v!r}")
    return v


def _num(key: str, v, lo: float, *, open_lo: bool) -> float:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and (v > lo if open_lo
                                                                                          else v >= lo)
    if not ok:
        raise ConfigError(f"train.{key}: expected a finite number {'>' if open_lo else '>='} {lo}, got {v!r}")
    return float(v)


@dataclass
class TrainConfig:
    """Optimisation settings of a run (module doc); the defaults are SPEC.md's protocol."""

    iters_per_task: int = 1000
    batch_size: int = 64
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup: int = 100
    schedule: str = "cosine"
    label_smoothing: float = 0.2
    amp: Optional[str] = None
    seed: int = 42
    reset_optimizer: bool = True
    log_every: int = 50
    eval_batch_size: int = 256
    num_workers: Optional[int] = None
    checkpoint_every: Optional[int] = None
    loggers: list = field(default_factory=lambda: ["csv"])
    prompts: str = "ensemble"

    def __post_init__(self):
        for key in ("iters_per_task", "batch_size", "log_every", "eval_batch_size"):
            _int(key, getattr(self, key), 1, MAX_SIZE)
        _int("warmup", self.warmup, 0, MAX_SIZE)
        _int("num_workers", self.num_workers, 0, MAX_SIZE, optional=True)
        _int("checkpoint_every", self.checkpoint_every, 1, MAX_SIZE, optional=True)
        if not isinstance(self.loggers, (list, tuple)) or any(x not in LOGGERS for x in self.loggers) \
                or len(set(self.loggers)) != len(self.loggers):
            raise ConfigError(f"train.loggers: expected a list of distinct names from {list(LOGGERS)}, "
                              f"got {self.loggers!r}")
        self.loggers = list(self.loggers)
        _int("seed", self.seed, 0, MAX_SEED)
        self.lr = _num("lr", self.lr, 0.0, open_lo=True)
        self.weight_decay = _num("weight_decay", self.weight_decay, 0.0, open_lo=False)
        if not label_smoothing_ok(self.label_smoothing):
            raise ConfigError(f"train.label_smoothing: expected {LABEL_SMOOTHING_RULE}, got {self.label_smoothing!r}")
        self.label_smoothing = float(self.label_smoothing)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule: expected one of {list(SCHEDULES)}, got {self.schedule!r}")
        if self.amp is False:
            self.amp = "off"
        if self.amp not in AMP:
            raise ConfigError(f"train.amp: expected null, 'off' or 'bf16', got {self.amp!r} (fp16 loss scaling "
                              "would distort the squared gradients of the Fisher guard)")
        if self.prompts not in PROMPTS:
            raise ConfigError(f"train.prompts: expected one of {list(PROMPTS)}, got {self.prompts!r}")
        if not isinstance(self.reset_optimizer, bool):
            raise ConfigError(f"train.reset_optimizer: expected true or false, got {self.reset_optimizer!r}")

    @classmethod
    def from_dict(cls, d: Optional[dict], where: str = "train") -> "TrainConfig":
        """From a mapping (a config's ``train`` section); unknown keys are errors."""
        d = {} if d is None else d
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping, got {d!r}")
        check_keys(where, d, [f.name for f in dataclasses.fields(cls)])
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes`` (unknown keys are errors)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def check_fits(self, *, largest_train_set: Optional[int] = None, image_bytes: Optional[int] = None,
                   memory: Optional[int] = None, where: str = "train") -> None:
        """``batch_size`` must not exceed the largest task's training set (a batch
        larger than every dataset only repeats its images), and one input batch
        of ``batch_size`` (and of ``eval_batch_size``) images of ``image_bytes``
        must fit in ``memory``. This bounds the input alone; the activations of
        training need more, which depends on the model."""
        if largest_train_set is not None and self.batch_size > largest_train_set:
            raise ConfigError(f"{where}.batch_size: {self.batch_size:,} is larger than every task's training set "
                              f"(the largest holds {largest_train_set:,} images)")
        if image_bytes and memory:
            for key in ("batch_size", "eval_batch_size"):
                need = getattr(self, key) * image_bytes
                if need > memory:
                    raise ConfigError(f"{where}.{key}: one batch of {getattr(self, key):,} input images takes "
                                      f"{need / 2**30:,.1f} GiB, more than the device's {memory / 2**30:,.1f} GiB")


__all__ = ["TrainConfig", "ConfigError", "check_keys", "output_dir_problem", "SCHEDULES", "LOGGERS", "PROMPTS"]
