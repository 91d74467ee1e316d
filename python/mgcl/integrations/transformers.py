"""PRIMED-style training with the Fisher guard inside a Hugging Face ``transformers.Trainer``.

::

    from mgcl.integrations.transformers import PrimedTrainer
    from mgcl.integrations import PrimedLosses   # or any callable (model, inputs) -> losses

    trainer = PrimedTrainer(model=student, args=TrainingArguments(..., gradient_accumulation_steps=4),
                            train_dataset=task_data,              # items {"images": [3,H,W], "labels": int}
                            losses=PrimedLosses(teacher, class_tokens, reference_batches(...)),
                            guard={"lam": 1.0, "mode": "dfg", "normalize": "mean"})
    trainer.train()

Each micro-batch runs ``guard.backward(distill, ce)`` (both divided by the
step's micro-batch count, as the Trainer divides its loss); the last one of a
step runs ``guard.apply()``, before the Trainer clips the gradients and steps
the optimizer. So W comes from the distillation gradient accumulated over the
whole step: N micro-batches give the step of their concatenation. The
Trainer's own log (``logging_steps``: the console, ``log_history``, every
``report_to`` integration) gets the means of ``ce``, ``ckt``, ``cmc``,
``distill`` and the guard ``penalty`` since its last log, beside ``loss``.

``guard``: a ``mgcl.FisherGuard``, or a dict of its options, built at the first
step over the model's trainable parameters (on their device; with the
accelerator's GradScaler under ``fp16=True``). ``input_columns``: the batch
keys ``losses`` reads (kept when ``remove_unused_columns`` drops the others).
The losses callable receives the model the Trainer trains (wrapped under
DataParallel / DDP): under DDP it must go through the model's ``forward``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import transformers

from ._primed import LOGGED, Terms, make_guard, parts

__all__ = ["PrimedTrainer"]


class PrimedTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose step is the guarded step (module doc).

    Args (besides the Trainer's own):
        losses: ``losses(model, inputs)`` -> ``mgcl.nn.PrimedLossOutput`` or a mapping
            with ``distill`` and ``ce`` (0-d tensors with gradient) and optional
            ``ckt`` / ``cmc``; e.g. ``mgcl.integrations.PrimedLosses``.
        guard: a ``mgcl.FisherGuard``, or a dict of its options (``lam`` required).
        input_columns: the batch keys ``losses`` reads.
    """

    def __init__(self, *args, losses: Callable, guard, input_columns: Sequence[str] = ("images", "labels"),
                 **kwargs):
        if not callable(losses):
            raise ValueError(f"PrimedTrainer: losses must be a callable (model, inputs) -> losses, got {losses!r}")
        super().__init__(*args, **kwargs)
        self.losses, self.guard, self.terms = losses, guard, Terms()
        self._signature_columns = list(input_columns)

    def _fisher_guard(self):
        if not hasattr(self.guard, "apply"):
            self.guard = make_guard(self.guard, self.model.parameters(), getattr(self.accelerator, "scaler", None),
                                    "PrimedTrainer")
        return self.guard

    def training_step(self, model, inputs, num_items_in_batch=None):
        guard = self._fisher_guard()
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            losses = parts(self.losses(model, inputs), "PrimedTrainer")
        n = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        distill, ce = losses["distill"] / n, losses["ce"] / n
        guard.backward(distill, ce)
        self.terms.add({k: losses[k] for k in LOGGED if k in losses})
        if self.accelerator.sync_gradients:  # the step's last micro-batch: the guard before clipping and stepping
            self.terms.add({"penalty": guard.apply()})
        return (distill + ce).detach()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """distill + ce (evaluation; training goes through ``training_step``)."""
        losses = parts(self.losses(model, inputs), "PrimedTrainer")
        total = losses["distill"] + losses["ce"]
        return (total, losses) if return_outputs else total

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: add the terms' means since the last one
            logs = {**logs, **self.terms.means()}
        super().log(logs, *args, **kwargs)
