"""The strategy interface: the trainer owns the loop, a strategy fills in hooks.

One training step, as the trainer runs it::

    loss = strategy.training_loss(trainer, batch)        # Loss(parts=[...], terms={...})
    for k, part in enumerate(loss.parts):                # backward each part in order
        part.backward(retain_graph=k < last)
        strategy.after_backward(trainer, k)              # e.g. guard.apply() between parts
    optimizer.step()
    strategy.after_step(trainer, step)

and around each task ``before_task(trainer, t)`` / ``after_task(trainer, t)``;
``setup(trainer)`` runs once before the zero-shot row, ``check(trainer)`` before
anything (bad settings fail there, before any training). A strategy's state for
checkpoints is ``state_dict()``: tensors and JSON-able values.

A strategy that distils on retrieved reference pairs holds its
``ReferenceDistillation`` part (``mgcl.cl.strategies.parts``) as ``reference``
(None for the others): ``needs_reference_set`` says so, and a runner that
opens the Siphon itself hands it over with ``strategy.reference.siphon = ...``.
Strategies are built from the parts of ``parts.py``.
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field

import torch


@dataclass
class Loss:
    """``parts``: tensors the trainer backwards in this order (``after_backward(k)``
    after part k); ``terms``: named values for the log (tensors or floats)."""

    parts: list
    terms: dict = field(default_factory=dict)


@dataclass
class TaskBatch:
    images: torch.Tensor
    labels: torch.Tensor
    task: int


class Strategy:
    """Continual fine-tuning: cross-entropy over the task's class prompts, nothing else."""

    name = "finetune"
    trains = True
    reference = None  # a parts.ReferenceDistillation when the strategy distils on a reference set

    @property
    def needs_reference_set(self) -> bool:
        return self.reference is not None

    def __new__(cls, *args, **kwargs):
        # the constructor arguments as given, defaults filled in: what ``options()`` reports
        # (copy / pickle call __new__ without them and restore ``_options`` with the rest)
        self = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        except TypeError:
            self._options = {}
            return self
        bound.apply_defaults()
        self._options = dict(list(bound.arguments.items())[1:])
        return self

    def options(self) -> dict:
        """The constructor arguments (for the run config; objects by their type name)."""
        plain = (int, float, str, bool, type(None), list, tuple, dict)
        return {k: v if isinstance(v, plain) else type(v).__name__ for k, v in self._options.items()}

    def check(self, trainer) -> None:
        pass

    def setup(self, trainer) -> None:
        pass

    def before_task(self, trainer, t: int) -> None:
        pass

    def training_loss(self, trainer, batch: TaskBatch) -> Loss:
        ce = trainer.ce(trainer.task_logits(batch.images, batch.task), batch.labels)
        return Loss([ce], {"ce": ce})

    def after_backward(self, trainer, part: int) -> None:
        pass

    def after_step(self, trainer, step: int) -> None:
        pass

    def after_task(self, trainer, t: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen (eval, no grad) deep copy, e.g. a teacher."""
    t = copy.deepcopy(model)
    t.eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def check_lam(name: str, lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam < math.inf:
        raise ValueError(f"{name}: lam must be a finite number >= 0, got {lam!r}")
    return float(lam)


def check_normalize(name: str, normalize):
    if normalize not in (None, "mean"):
        raise ValueError(f"{name}: normalize must be None or 'mean', got {normalize!r}")
    return normalize


def check_choice(name: str, option: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: {option} must be one of {list(choices)}, got {value!r}")
    return value


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2, mean over rows."""
    T = temperature
    s = torch.log_softmax(student_logits.float() / T, dim=-1)
    t = torch.softmax(teacher_logits.float() / T, dim=-1)
    return torch.nn.functional.kl_div(s, t, reduction="batchmean") * (T * T)
