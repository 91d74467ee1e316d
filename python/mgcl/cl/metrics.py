"""The MGTIL metrics of SPEC.md section 7 (the ZSCL protocol).

R[t][j]: accuracy on task j after training on task t (t, j = 0..T-1).

- transfer: for each j >= 1 the mean of R[t][j] over t < j, then the mean over j;
- avg: for each j the mean of column j over all rows, then the mean over j;
- last: the mean of the last row;
- bwt: (1/(T-1)) * sum over j < T-1 of (R[T-1][j] - R[j][j]);
- forgetting: the mean over j < T-1 of max over t in [j, T-2] of (R[t][j] - R[T-1][j]);
- auc: the mean over tasks of the per-task AUC after the last task
  (:func:`macro_auc`, one task's macro one-vs-rest ROC-AUC).

Undefined values (transfer, bwt, forgetting when T = 1; auc when not given)
are None. Worked example: [[80,45,35],[70,85,32],[60,75,90]] -> transfer 39.25,
avg 63.556, last 75, bwt -15, forgetting 15.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


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


def macro_auc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Macro one-vs-rest ROC-AUC of ``probs`` [n, C] against ``labels`` [n].

    Per class c, the Mann-Whitney U of column c (ties count half):
    AUC_c = (sum of the positives' midranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg).
    All classes at once: each column sorted once (in its own dtype: the order and
    the ties are the values'); in sorted order a run of equal values spans
    positions first..last (0-based, a running max of run starts and a reversed
    running min of run ends), and each of its values has midrank
    (first + last + 2) / 2. Twice the midranks are integers, summed in int64, so U
    is exact; no Python loop, no search. Classes with no positive or no negative
    sample are left out of the mean (AUC is undefined for them); NaN when no
    class is scorable, or when ``probs`` holds NaN or inf (a diverged model has
    no ranking).
    """
    probs = torch.as_tensor(probs)
    labels = torch.as_tensor(labels)
    if probs.dim() != 2 or labels.dim() != 1 or len(labels) != len(probs):
        raise ValueError(f"macro_auc: probs must be [n, C] and labels [n], got {tuple(probs.shape)} and "
                         f"{tuple(labels.shape)}")
    n, C = probs.shape
    cols = probs.detach().cpu().T.contiguous()  # [C, n]
    if cols.dtype not in (torch.float32, torch.float64):
        cols = cols.double()  # exact for 16-bit floats and integers alike
    if not bool(torch.isfinite(cols).all()):
        return math.nan
    ordered, order = cols.sort(dim=1)
    pos = labels.long().cpu()[order] == torch.arange(C)[:, None]  # [C, n], in each column's sorted order
    at = torch.arange(n).expand(C, n)
    starts = torch.ones(C, n, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends = torch.ones(C, n, dtype=torch.bool)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, at, 0).cummax(dim=1).values
    last = torch.where(ends, at, n).flip(1).cummin(dim=1).values.flip(1)
    twice = torch.where(pos, first + last + 2, 0).sum(1)  # 2 x the positives' midrank sum
    n_pos = pos.sum(1).double()
    n_neg = n - n_pos
    u = twice.double() / 2.0 - n_pos * (n_pos + 1) / 2.0
    ok = (n_pos > 0) & (n_neg > 0)
    if not bool(ok.any()):
        return math.nan
    return float((u[ok] / (n_pos[ok] * n_neg[ok])).mean())
