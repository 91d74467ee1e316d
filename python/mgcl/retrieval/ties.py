"""The tie rule over candidate rows (SPEC.md 3.1), for candidates that come
from outside ``similarity_topk`` (FAISS, the shards of a sharded search), and
the check of ``k``. A leaf: it imports nothing of mgcl."""
from __future__ import annotations

import numpy as np


def check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")


def select(qid: np.ndarray, values: np.ndarray, indices: np.ndarray, n_queries: int, k: int, ties: bool):
    """Apply the tie rule (or plain top-k) to candidate rows ``(qid, value, index)``."""
    order = np.lexsort((indices, -values.astype(np.float64), qid))
    qid, values, indices = qid[order], values[order], indices[order]
    if len(qid):
        start = np.ones(len(qid), dtype=bool)
        start[1:] = qid[1:] != qid[:-1]
        seg_start = np.maximum.accumulate(np.where(start, np.arange(len(qid)), 0))
        if ties:
            new = start.copy()
            new[1:] |= values[1:] != values[:-1]
            c = np.cumsum(new)
            rank = c - c[seg_start] + 1  # 1-based rank of the distinct value within its query
        else:
            rank = np.arange(len(qid)) - seg_start + 1
        keep = rank <= k
        qid, values, indices = qid[keep], values[keep], indices[keep]
    offsets = np.zeros(n_queries + 1, dtype=np.int64)
    np.cumsum(np.bincount(qid, minlength=n_queries), out=offsets[1:])
    return values.astype(np.float32), indices.astype(np.int64), offsets


__all__ = ["select", "check_k"]
