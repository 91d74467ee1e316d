"""mgcl: retrieval-guided continual learning for medical vision-language models.

The drop-in pieces for any PyTorch training loop:

- :class:`mgcl.FisherGuard`: the Dynamic Fisher Guard (dfg | ewc | l2);
- :class:`mgcl.nn.ContrastiveDistillLoss` and :class:`mgcl.nn.PrimedLoss`
  (also ``mgcl.ContrastiveDistillLoss``, ``mgcl.PrimedLoss``): the losses;
- :class:`mgcl.ContinualTrainer` (:mod:`mgcl.cl`): whole continual-learning
  runs with the strategies of :mod:`mgcl.cl.strategies`; VLM adapters in
  :mod:`mgcl.models`;
- :mod:`mgcl.ops`: the fused ops (``fisher_guard``, ``contrastive_distill``,
  ``similarity_topk``), each with a PyTorch reference and compiled fast paths.

``import mgcl`` loads the ops, the losses and the guard only; ``mgcl.ContinualTrainer``,
``mgcl.Task`` and the subpackages load on first use.

Importing mgcl never initialises CUDA and never fails for a missing compiled
extension (see ``mgcl info``).
"""
from ._version import __version__
from . import _native  # noqa: F401  (sets the extension flags, warns once if _C is missing)
from .guard import FisherGuard
from .nn import ContrastiveDistillLoss, PrimedLoss
from .ops.contrastive_distill import contrastive_distill
from .ops.fisher_guard import fisher_guard

# The other rooms (cl, retrieval, models, mgtil, bench) load on first use.
_LAZY = {"ContinualTrainer": "cl", "Task": "cl"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib  # noqa: PLC0415

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mgcl' has no attribute {name!r}")


__all__ = ["__version__", "FisherGuard", "fisher_guard", "contrastive_distill", "ContrastiveDistillLoss", "PrimedLoss",
           "ContinualTrainer", "Task"]
