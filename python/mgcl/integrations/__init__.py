"""The guarded step (``mgcl.FisherGuard``) and the PRIMED losses inside other trainers.

- ``mgcl.integrations.transformers``: ``PrimedTrainer``, a ``transformers.Trainer``;
- ``mgcl.integrations.lightning``: ``GuardedModule``, a LightningModule mixin
  (manual optimisation).

Both take the losses of one micro-batch from a callable (``PrimedLosses``
gives PRIMED's for a CLIP-like model) and run ``guard.backward(distill, ce)``
per micro-batch and ``guard.apply()`` before the optimizer step, so
gradient accumulation gives W from the step's whole distillation gradient.
Neither submodule is imported by ``import mgcl`` (nor by this package): each
imports its framework when it is imported.
"""
from ._primed import PrimedLosses

__all__ = ["PrimedLosses"]
