"""The MGTIL metrics of SPEC.md section 7 (the ZSCL protocol).

R[t][j]: accuracy on task j after training on task t (t, j = 0..T-1).

- transfer: for each j >= 1 the mean of R[t][j] over t < j, then the mean over j;
- avg: for each j the mean of column j over all rows, then the mean over j;
- last: the mean of the last row;
- bwt: (1/(T-1)) * sum over j < T-1 of (R[T-1][j] - R[j][j]);
- forgetting: the mean over j < T-1 of max over t in [j, T-2] of (R[t][j] - R[T-1][j]);
- auc: the mean over tasks of the per-task AUC after the last task.

Undefined values (transfer, bwt, forgetting when T = 1; auc when not given)
are None. Worked example: [[80,45,35],[70,85,32],[60,75,90]] -> transfer 39.25,
avg 63.556, last 75, bwt -15, forgetting 15.
"""
from __future__ import annotations

from typing import Optional, Sequence


def _matrix(R) -> list[list[float]]:
    rows = [[float(v) for v in row] for row in R]
    T = len(rows)
    if T == 0:
        raise ValueError("summarize: R is empty")
    for t, row in enumerate(rows):
        if len(row) != T:
            raise ValueError(f"summarize: R must be square (T x T); row {t} has {len(row)} entries for T = {T}")
    return rows


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def summarize(R: Optional[Sequence[Sequence[float]]], z: Optional[Sequence[float]] = None,
              auc: Optional[Sequence] = None) -> dict:
    """Metrics of an accuracy matrix.

    ``z`` (the zero-shot vector) stands in for R when R is None: the zero-shot
    baseline copies z into every row. ``auc``: per-task AUC after the last
    task (a list of T), or the per-task AUC after every task (T x T; its last
    row is used).
    """
    if R is None:
        if z is None:
            raise ValueError("summarize: give R, or z for the zero-shot baseline")
        R = [list(z) for _ in z]
    R = _matrix(R)
    T = len(R)
    if z is not None and len(z) != T:
        raise ValueError(f"summarize: z has {len(z)} entries for T = {T}")
    out = {
        "transfer": _mean(_mean(R[t][j] for t in range(j)) for j in range(1, T)) if T > 1 else None,
        "avg": _mean(_mean(R[t][j] for t in range(T)) for j in range(T)),
        "last": _mean(R[T - 1]),
        "bwt": _mean(R[T - 1][j] - R[j][j] for j in range(T - 1)) if T > 1 else None,
        "forgetting": _mean(max(R[t][j] - R[T - 1][j] for t in range(j, T - 1)) for j in range(T - 1))
        if T > 1 else None,
        "auc": None,
    }
    if auc is not None:
        auc = list(auc)
        if auc and (isinstance(auc[0], (list, tuple)) or getattr(auc[0], "ndim", 0) > 0):
            auc = list(auc[-1])  # T x T (a list, array or tensor): the last row
        if len(auc) != T:
            raise ValueError(f"summarize: auc has {len(auc)} entries for T = {T}")
        out["auc"] = _mean(float(a) for a in auc)
    return out
