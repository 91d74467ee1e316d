"""Dense search over a bank: exact (``similarity_topk`` streamed over the
shards) and FAISS (``faiss_index``: approximate candidates, re-scored
exactly). The bank is used through its storage API only (shards, rows,
embedder, ``hit``); ``MemoryBank.search`` / ``topk`` call in here.

Both return CSR numpy arrays ``(values float32 [M], indices int64 [M],
offsets int64 [Q+1])``, score desc then index asc per query.

Tie rule (SPEC.md 3.1): with U the distinct scores of a query, the kept set
is every entry scoring >= the min(k, |U|)-th largest value of U. Merging
per-group results stays exact: a group's own k-th distinct score is never
above the global one, so every globally kept entry is in its group's result.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .ties import check_k, select  # noqa: F401  (select: the rule over candidate rows, used here and by FAISS)

def exact_topk(q: torch.Tensor, shards: list[torch.Tensor], k: int, ties: bool = True, *, device=None,
               backend: str | None = None, quantized=None):
    """Exact candidates of every query over ``shards`` (float16 [n_i, d] each,
    memory-mapped) with ``similarity_topk``: float32 queries, exact scores (the
    op's definition, the same on CPU and GPU); on a GPU the shards stream from
    host memory through the device in blocks. ``quantized``: the shards'
    screening codes (``MemoryBank.quantized_keys``), used on the CPU."""
    from ..ops.similarity_topk import similarity_topk  # noqa: PLC0415

    dev = torch.device(device) if device is not None else torch.device("cpu")
    n_q = q.shape[0]
    if not shards or not sum(s.shape[0] for s in shards) or n_q == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(n_q + 1, np.int64)
    qd = q.to(device=dev, dtype=torch.float32).contiguous()
    codes = quantized if dev.type == "cpu" else None
    r = similarity_topk(qd, list(shards), int(k), ties=bool(ties), backend=backend, quantized=codes)
    return r.values.cpu().numpy(), r.indices.cpu().numpy(), r.offsets.cpu().numpy()


def encode(bank, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Query embeddings (float32 [n, dim], unit rows) from the bank's embedder."""
    return torch.from_numpy(np.ascontiguousarray(bank.embedder.encode(list(texts), batch_size)))


def query_embeddings(bank, queries) -> torch.Tensor:
    """float32 [Q, dim] query vectors: ``queries`` is a list of strings (encoded
    with the bank's embedder) or a [Q, dim] tensor / array of unit vectors."""
    if isinstance(queries, str):
        raise ValueError("search: pass a list of query strings, not one string")
    if isinstance(queries, np.ndarray):
        queries = torch.from_numpy(queries)
    if isinstance(queries, torch.Tensor):
        if queries.dim() != 2 or queries.shape[1] != bank.dim:
            raise ValueError(f"search: query embeddings must be [Q, {bank.dim}], got {tuple(queries.shape)}")
        if not torch.isfinite(queries).all():
            raise ValueError("search: query embeddings contain NaN or inf")
        return queries.float()
    queries = list(queries)
    if not all(isinstance(q, str) for q in queries):
        raise ValueError("search: queries must be a list of strings or a [Q, dim] tensor")
    return encode(bank, queries)


def _exact(bank, q: torch.Tensor, k: int, ties: bool, **_):
    if bank.server is not None:  # the shards are served by Ray actors (retrieval.distributed)
        return bank.server.topk(q, k, ties)
    codes = bank.quantized_keys() if bank.device.type == "cpu" else None
    return exact_topk(q, bank.shards, k, ties, device=bank.device, quantized=codes)


def _faiss(bank, q: torch.Tensor, k: int, ties: bool, *, overfetch: int = 4):
    from .faiss_index import faiss_topk  # noqa: PLC0415

    return faiss_topk(bank, q, k, ties, overfetch=overfetch)


# The dense backends: name -> (bank, float32 queries [Q, dim], k, ties, **options) -> CSR.
DENSE = {"exact": _exact, "faiss": _faiss}


def topk(bank, queries, k: int, ties: bool = True, *, backend: str = "exact", overfetch: int = 4):
    """Dense candidates per query as CSR ``(values, indices, offsets)`` (numpy),
    score desc then index asc. ``backend="exact"`` streams the shards through
    ``similarity_topk``; ``"faiss"`` asks the bank's FAISS index for
    ``overfetch * k`` candidates and re-scores them exactly (the tie rule then
    holds over those candidates)."""
    check_k(k)
    if backend not in DENSE:
        raise ValueError(f"search: unknown backend {backend!r}; expected one of {sorted(DENSE)}")
    return DENSE[backend](bank, query_embeddings(bank, queries), int(k), bool(ties), overfetch=overfetch)


def search(bank, queries, k: int, ties: bool = True, *, backend: str = "exact"):
    """One list of ``Hit`` per query: every entry scoring at least the k-th
    largest distinct cosine score (``ties=True``, so the list can be longer
    than k), or exactly min(k, count) entries (``ties=False``); sorted by
    score desc then index asc. ``queries``: a list of strings (encoded with
    the bank's embedder) or a float [Q, dim] tensor of unit vectors."""
    values, indices, offsets = topk(bank, queries, k, ties, backend=backend)
    return [[bank.hit(indices[j], values[j]) for j in range(offsets[i], offsets[i + 1])]
            for i in range(len(offsets) - 1)]


__all__ = ["topk", "search", "query_embeddings", "encode", "exact_topk", "select", "DENSE"]
