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
checkpoints is ``state_dict()``: tensors and JSON-able values. Mid-task
checkpoints (``TrainConfig.checkpoint_every``) save it during a task too; a
run resumed from one calls ``fast_forward(trainer, steps)`` after
``before_task`` to skip per-step streams. A strategy whose state during a
task is not all in ``state_dict`` sets ``mid_task_checkpoints = False``.

What a strategy may change besides the loss (each hook has a default that is
plain full fine-tuning, so a strategy overrides only what it changes):

- ``wrap_model(trainer, model) -> model``: once, at the start of the run,
  before ``setup`` and the zero-shot row: wrap the model (adapters, prompts,
  experts). What it returns is ``trainer.model`` from then on, for training,
  evaluation and checkpoints; it keeps the VLM protocol (``encode_image``,
  ``encode_text``, ``tokenize``, ``transform``, ``logit_scale``) and is an
  ``nn.Module`` whose ``state_dict`` holds what the strategy trains.
- ``param_groups(trainer, t) -> [ParamGroup]``: the trainable parameters, by
  name in ``trainer.model.named_parameters()``, in groups with their own
  learning rate and weight decay (None: the run's ``TrainConfig``). Asked once
  at the start (t = 0, before ``setup``) and again after every
  ``before_task(t)``; everything not named is frozen. The default: one group
  of every parameter that requires grad, the logit scale left out.
- ``optimizer(trainer, t) -> OptimizerSpec``: "adamw" (default) or "sgd" with
  its momentum. A new optimizer is made for a task when the config's
  ``reset_optimizer`` says so, or when the groups or the spec changed.
- evaluation: ``eval_head(trainer, task)`` gives the ``[C, d]`` class
  embeddings task ``task`` is scored against (default: the zero-shot head of
  ``trainer.model``, every template) and ``eval_logits(trainer, images, task,
  head)`` the logits of a test batch among that task's classes (default:
  ``scale * normalise(encode_image(images)) @ head.T``). ``task`` is the index
  of the task being evaluated, for task-aware methods; a method that routes
  without it (MoE-Adapters' DDAS, DIKI's prompt selection) ignores it and
  routes on ``images``: it picks the image and text encoders per image (or
  per batch) and scores with ``mgcl.cl.evaluate.head_logits(features, head,
  logit_scale)``, building heads with ``zero_shot_head(encoder, ...)``. Both
  run under no_grad with the model in eval mode, for the zero-shot row
  (before the first task) as after each task.

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
from typing import Optional

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


@dataclass
class ParamGroup:
    """Trainable parameters by name (``model.named_parameters()``), with their own
    ``lr`` and ``weight_decay`` (None: the run's ``TrainConfig``). The schedule
    (warmup, cosine) scales every group's lr by the same factor."""

    names: list
    lr: Optional[float] = None
    weight_decay: Optional[float] = None


OPTIMIZERS = ("adamw", "sgd")


@dataclass
class OptimizerSpec:
    """The optimizer of a task: ``kind`` "adamw" (``betas``, ``eps``) or "sgd"
    (``momentum``, ``nesterov``); lr and weight decay come from the groups."""

    kind: str = "adamw"
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self):
        if self.kind not in OPTIMIZERS:
            raise ValueError(f"OptimizerSpec: kind must be one of {list(OPTIMIZERS)}, got {self.kind!r}")
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, (int, float)) \
                or not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"OptimizerSpec: momentum must be in [0, 1), got {self.momentum!r}")
        if self.nesterov and (self.kind != "sgd" or self.momentum == 0):
            raise ValueError("OptimizerSpec: nesterov needs kind 'sgd' and momentum > 0")
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"OptimizerSpec: betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.eps > 0:
            raise ValueError(f"OptimizerSpec: eps must be > 0, got {self.eps!r}")

    def build(self, groups: list, *, fused: bool) -> torch.optim.Optimizer:
        """The optimizer over ``groups`` (torch param-group dicts with lr and weight_decay)."""
        if self.kind == "sgd":
            return torch.optim.SGD(groups, momentum=self.momentum, nesterov=self.nesterov)
        return torch.optim.AdamW(groups, betas=self.betas, eps=self.eps, fused=fused)


class Strategy:
    """Continual fine-tuning: cross-entropy over the task's class prompts, nothing else."""

    name = "finetune"
    trains = True
    reference = None  # a parts.ReferenceDistillation when the strategy distils on a reference set
    # whether state_dict() holds all the strategy's state during a task (mid-task checkpoints are exact)
    mid_task_checkpoints = True

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

    def wrap_model(self, trainer, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train and evaluate (module doc); default: ``model`` itself."""
        return model

    def param_groups(self, trainer, t: int) -> list:
        """The trainable parameters of task ``t`` as ``[ParamGroup]`` (module doc)."""
        return [ParamGroup([n for n, p in trainer.model.named_parameters()
                            if p.requires_grad and n != "logit_scale"])]

    def optimizer(self, trainer, t: int) -> OptimizerSpec:
        """The optimizer of task ``t`` (module doc); default AdamW."""
        return OptimizerSpec()

    def eval_head(self, trainer, task: int) -> torch.Tensor:
        """``[C, d]`` unit-norm class embeddings of task ``task`` for evaluation (module doc)."""
        from ..evaluate import zero_shot_head  # noqa: PLC0415

        return zero_shot_head(trainer.model, trainer.tasks[task], trainer.device, amp=trainer.amp,
                              prompts=trainer.train_config.prompts)

    def eval_logits(self, trainer, images: torch.Tensor, task: int, head: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` of a test batch (on the device) among task ``task``'s classes (module doc)."""
        from ..evaluate import image_logits  # noqa: PLC0415

        return image_logits(trainer.model, images, head, trainer.device, trainer.amp)

    def training_loss(self, trainer, batch: TaskBatch) -> Loss:
        ce = trainer.ce(trainer.task_logits(batch.images, batch.task), batch.labels)
        return Loss([ce], {"ce": ce})

    def after_backward(self, trainer, part: int) -> None:
        pass

    def after_step(self, trainer, step: int) -> None:
        pass

    def after_task(self, trainer, t: int) -> None:
        pass

    def fast_forward(self, trainer, steps: int) -> None:
        """A run resumes ``steps`` steps into the current task (after ``before_task``;
        the RNG states are restored afterwards): skip the strategy's own per-step
        streams by that many steps. Default: the reference batches, if any."""
        if self.reference is not None:
            for _ in range(steps):
                next(self.reference.batches)

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
