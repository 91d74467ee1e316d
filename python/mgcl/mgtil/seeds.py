"""Several training seeds of one method as one results entry, and the tables
that say which differences exceed the seed spread (``mgcl demo``, ``mgcl
ablate``).

``over_seeds(entries, seeds)``: the ``methods[name]`` entry of the results
schema (``mgcl.cl.results``) for runs of one method that differ only in the
training seed. Each metric is the mean of the per-seed values and ``std``
holds their sample standard deviation (n - 1; 0 for one seed); ``R`` and
``auc_matrix`` are the element-wise means (what the plots draw; the metrics
are linear in R except Forgetting, a max, whose mean over seeds is not the
Forgetting of the mean R); ``per_seed`` keeps every run's metrics and R.

A difference of two means "exceeds the seed spread" when it is larger than
the sum of their standard deviations (the mean +- one std intervals do not
overlap). With 3 seeds this is a coarse screen, not a significance test.
"""
from __future__ import annotations

import csv
import io
import statistics
from typing import Optional, Sequence

from ..cl.results import METRICS
from .report import HEADERS

COMPARED = ("transfer", "avg", "last", "bwt")


def _mean(rows):
    return [[statistics.fmean(v) for v in zip(*r)] for r in zip(*rows)]


def over_seeds(entries: Sequence[dict], seeds: Sequence[int]) -> dict:
    """One entry from per-seed entries of one method (module doc)."""
    if not entries or len(entries) != len(seeds):
        raise ValueError(f"over_seeds: {len(entries)} entries for {len(seeds)} seeds")
    first = entries[0]
    mean, std = {}, {}
    for k in METRICS:
        vals = [e.get(k) for e in entries]
        if any(v is None for v in vals):
            mean[k] = std[k] = None
            continue
        mean[k] = statistics.fmean(vals)
        std[k] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    per_seed = [{"seed": s, **{k: e.get(k) for k in METRICS}, "R": e["R"], "auc_matrix": e.get("auc_matrix"),
                 "seconds": e.get("seconds"), **({"reference_sets": e["reference_sets"]}
                                                  if "reference_sets" in e else {})}
                for s, e in zip(seeds, entries)]
    auc = [e.get("auc_matrix") for e in entries]
    return {**mean, "std": std, "R": _mean([e["R"] for e in entries]), "zero_shot": first["zero_shot"],
            "auc_matrix": _mean(auc) if all(auc) else None, "zero_shot_auc": first.get("zero_shot_auc"),
            "strategy_options": first.get("strategy_options"), "seeds": list(seeds),
            "seconds": sum(e.get("seconds") or 0.0 for e in entries), "per_seed": per_seed}


def _pm(m: dict, k: str) -> str:
    v, s = m.get(k), (m.get("std") or {}).get(k)
    if v is None:
        return "-"
    sign = "+" if k == "bwt" else ""
    return f"{v:{sign}.1f} ± {s:.1f}" if s is not None else f"{v:{sign}.1f}"


def exceeds(a: dict, b: dict, k: str) -> Optional[tuple[float, float, bool]]:
    """(mean_a - mean_b, std_a + std_b, whether the difference exceeds the spread), or None."""
    if a.get(k) is None or b.get(k) is None:
        return None
    spread = (a.get("std") or {}).get(k, 0.0) + (b.get("std") or {}).get(k, 0.0)
    d = a[k] - b[k]
    return d, spread, abs(d) > spread


def table_md(methods: dict, label: str = "method") -> str:
    """Mean ± std of every metric, one row per entry."""
    lines = [f"| {label} | seeds | " + " | ".join(HEADERS[k] for k in METRICS) + " |",
             "|---|---:|" + "---:|" * len(METRICS)]
    for name, m in methods.items():
        lines.append(f"| {name} | {len(m.get('seeds') or [1])} | " + " | ".join(_pm(m, k) for k in METRICS) + " |")
    return "\n".join(lines) + "\n"


def differences_md(methods: dict, pairs: Sequence[tuple[str, str]]) -> str:
    """For each pair (a, b): mean_a - mean_b of Transfer / Avg / Last / BWT, in bold
    where it exceeds the seed spread (module doc), and a one-line summary per pair."""
    lines = ["| a − b | " + " | ".join(HEADERS[k] for k in COMPARED) + " |", "|---|" + "---:|" * len(COMPARED)]
    beyond = []
    for a, b in pairs:
        cells, big = [], []
        for k in COMPARED:
            r = exceeds(methods[a], methods[b], k)
            if r is None:
                cells.append("-")
                continue
            d, spread, out = r
            cells.append(f"**{d:+.1f}**" if out else f"{d:+.1f}")
            if out:
                big.append(f"{HEADERS[k]} {d:+.1f} (spread {spread:.1f})")
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
        beyond.append(f"- {a} vs {b}: " + ("; ".join(big) if big else "no difference exceeds the seed spread"))
    return "\n".join(lines) + "\n\n" + "\n".join(beyond) + "\n"


def to_csv(methods: dict, label: str = "method", extra: Optional[dict] = None) -> str:
    """One row per entry: the mean and std of every metric and the seeds
    (``extra``: name -> {column: value} for more columns, e.g. the ablation group)."""
    extra = extra or {}
    cols = sorted({c for v in extra.values() for c in v})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([label, *cols, "seeds", *METRICS, *(f"{k}_std" for k in METRICS)])
    for name, m in methods.items():
        std = m.get("std") or {}
        w.writerow([name, *(extra.get(name, {}).get(c, "") for c in cols),
                    " ".join(str(s) for s in m.get("seeds") or []),
                    *("" if m.get(k) is None else f"{m[k]:.4f}" for k in METRICS),
                    *("" if std.get(k) is None else f"{std[k]:.4f}" for k in METRICS)])
    return buf.getvalue()


__all__ = ["over_seeds", "exceeds", "table_md", "differences_md", "to_csv", "COMPARED"]
