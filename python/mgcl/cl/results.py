"""The one results schema (SPEC.md section 7): what ``ContinualTrainer.run``,
``mgcl run`` and ``mgcl demo`` write as ``results.json`` and what ``mgcl
report`` reads. Percentages throughout::

    {"format": "mgcl.mgtil.results", "version": 1,
     "kind": "trainer" | "run" | "demo" | "report",
     "benchmark": "mgtil-synth", "synthetic": true,
     "tasks": [T names], "domains": [T domains],
     "methods": {name: {"transfer", "avg", "last", "bwt", "forgetting", "auc",
                        "R": T x T (accuracy on task j after task t),
                        "zero_shot": z (T, the untouched model),
                        "auc_matrix": T x T (macro AUC, like R), "zero_shot_auc": (T),
                        "strategy_options": {...}, "seconds": float, ...}},
     "config": {"trainer": {...}, ...}, "versions": {...}}

A trainer run holds one method; ``mgcl run`` adds ``config.run`` (the checked
config file), the demo several methods and its own keys (settings, machine,
timings); a method may carry more keys (the demo's ``reference_sets``).
"""
from __future__ import annotations

from typing import Optional

from .metrics import summarize

FORMAT = "mgcl.mgtil.results"
VERSION = 1
KINDS = ("trainer", "run", "demo", "report")
METRICS = ("transfer", "avg", "last", "bwt", "forgetting", "auc")


def method_entry(R, z, auc_matrix, z_auc, *, strategy_options: Optional[dict] = None,
                 seconds: Optional[float] = None) -> dict:
    """One ``methods[name]`` entry: the metrics of R (AUC after the last task) and the matrices."""
    m = summarize(R, z, auc_matrix[-1] if auc_matrix else None)
    return {**{k: m[k] for k in METRICS}, "R": R, "zero_shot": z, "auc_matrix": auc_matrix, "zero_shot_auc": z_auc,
            "strategy_options": strategy_options, "seconds": seconds}


def results(kind: str, methods: dict, *, tasks, domains=None, benchmark: str = "", synthetic: bool = False,
            config: Optional[dict] = None, versions: Optional[dict] = None, **extra) -> dict:
    """A results dict of ``kind`` (``extra``: the kind's own top-level keys)."""
    if kind not in KINDS:
        raise ValueError(f"results: kind must be one of {KINDS}, got {kind!r}")
    return {"format": FORMAT, "version": VERSION, "kind": kind, "benchmark": benchmark, "synthetic": bool(synthetic),
            "tasks": tasks, "domains": domains, "methods": methods, "config": config or {},
            "versions": versions or {}, **extra}


def validate(res, where: str = "results") -> dict:
    """The shape of a results dict (format, every method with T x T R and z of T); returns it."""
    if not isinstance(res, dict) or not isinstance(res.get("methods"), dict) or not res["methods"]:
        raise ValueError(f"{where}: not an mgcl results file (no 'methods')")
    if res.get("format") != FORMAT:
        raise ValueError(f"{where}: format {res.get('format')!r}, expected {FORMAT!r}")
    for name, m in res["methods"].items():
        missing = [k for k in (*METRICS[:5], "R", "zero_shot") if not isinstance(m, dict) or k not in m]
        if missing:
            raise ValueError(f"{where}: method {name!r} lacks {missing}")
        R, z = m["R"], m["zero_shot"]
        if not isinstance(R, list) or not isinstance(z, list):
            raise ValueError(f"{where}: method {name!r}: R and zero_shot must be lists")
        T = len(z)
        if len(R) != T or any(not isinstance(row, list) or len(row) != T for row in R):
            raise ValueError(f"{where}: method {name!r}: R must be {T} x {T} (the length of zero_shot)")
    return res


__all__ = ["FORMAT", "VERSION", "KINDS", "METRICS", "method_entry", "results", "validate"]
