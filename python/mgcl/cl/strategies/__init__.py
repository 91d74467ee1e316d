"""Continual-learning strategies, by name.

    available()                      -> the names
    create("primed", lam=1.0, ...)   -> a Strategy (unknown names / options: ValueError)

Each strategy fills in the hooks of :class:`~mgcl.cl.strategies.base.Strategy`;
the trainer owns the loop.
"""
from __future__ import annotations

import importlib
import inspect

from .base import Loss, Strategy, TaskBatch

# name -> (module, class); imported when created.
REGISTRY = {
    "zero-shot": ("basic", "ZeroShot"),
    "finetune": ("basic", "Finetune"),
    "l2": ("basic", "L2"),
    "ewc": ("basic", "EWC"),
    "lwf": ("replay", "LwF"),
    "wise-ft": ("basic", "WiseFT"),
    "zscl": ("zscl", "ZSCL"),
    "icarl": ("replay", "ICaRL"),
    "primed": ("primed", "Primed"),
    "moe-adapters": ("moe_adapters", "MoEAdapters"),
    "diki": ("diki", "DIKI"),
}


def available() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> type:
    if name not in REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def create(name: str, **options) -> Strategy:
    cls = get(name)
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"strategy {name!r}: unknown option(s) {unknown}; options: {params or 'none'}")
    return cls(**options)


__all__ = ["available", "create", "get", "Strategy", "Loss", "TaskBatch", "REGISTRY"]
