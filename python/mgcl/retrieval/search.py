"""Dense search over a bank: exact (``similarity_topk`` streamed over the
shards) and FAISS (approximate candidates, re-scored exactly).

Both return CSR numpy arrays ``(values float32 [M], indices int64 [M],
offsets int64 [Q+1])``, score desc then index asc per query.

Tie rule (SPEC.md 3.1): with U the distinct scores of a query, the kept set
is every entry scoring >= the min(k, |U|)-th largest value of U. Merging
per-group results stays exact: a group's own k-th distinct score is never
above the global one, so every globally kept entry is in its group's result.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .._io import atomic_write


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


def exact_topk(q: torch.Tensor, shards: list[torch.Tensor], k: int, ties: bool = True, *, device=None,
               backend: str | None = None):
    """Exact candidates of every query over ``shards`` (float16 [n_i, d] each,
    memory-mapped) with ``similarity_topk``: float32 queries, exact scores (the
    op's definition, the same on CPU and GPU); on a GPU the shards stream from
    host memory through the device in blocks."""
    from ..ops.similarity_topk import similarity_topk  # noqa: PLC0415

    dev = torch.device(device) if device is not None else torch.device("cpu")
    n_q = q.shape[0]
    if not shards or not sum(s.shape[0] for s in shards) or n_q == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(n_q + 1, np.int64)
    qd = q.to(device=dev, dtype=torch.float32).contiguous()
    r = similarity_topk(qd, list(shards), int(k), ties=bool(ties), backend=backend)
    return r.values.cpu().numpy(), r.indices.cpu().numpy(), r.offsets.cpu().numpy()


# ---- FAISS --------------------------------------------------------------------------

def _faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError:
        raise ImportError("the FAISS backend needs faiss (pip install faiss-cpu, or faiss-gpu)") from None
    return faiss


def _iter_rows(bank, chunk: int = 65536):
    for s in bank.shards:
        for i in range(0, s.shape[0], chunk):
            yield s[i:i + chunk].float().numpy()


def build_faiss_index(bank, kind: str, *, nlist=None, m=None, nbits: int = 8, train_size: int = 200_000,
                      seed: int = 0) -> dict:
    """Build ``index/faiss-<kind>.index`` (inner product) for ``bank``; returns the manifest entry."""
    from . import store  # noqa: PLC0415

    faiss = _faiss()
    d, n = bank.dim, bank.count
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        params = {}
    elif kind == "ivfpq":
        nlist = int(nlist or max(1, min(65536, int(4 * np.sqrt(n)))))
        if m is None:
            m = next(c for c in range(max(1, d // 8), 0, -1) if d % c == 0)
        if d % m:
            raise ValueError(f"ivfpq: m={m} must divide the dimension {d}")
        need = max(nlist, 2 ** nbits)
        if n < need:
            raise ValueError(f"ivfpq: the bank has {n} entries; training needs at least {need} "
                             f"(lower nlist={nlist} or nbits={nbits}, or use --index flat)")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFPQ(quantizer, d, nlist, int(m), int(nbits), faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, train_size), replace=False))
        index.train(bank.embeddings(sample).float().numpy())
        params = {"nlist": nlist, "m": int(m), "nbits": int(nbits), "train_size": int(len(sample)), "seed": seed}
    else:
        raise ValueError(f"unknown FAISS index kind {kind!r}; expected 'flat' or 'ivfpq'")
    for rows in _iter_rows(bank):
        index.add(np.ascontiguousarray(rows))
    rel = f"index/faiss-{kind}.index"
    path = os.path.join(bank.path, rel)
    atomic_write(path, lambda tmp: faiss.write_index(index, tmp))
    return {"kind": kind, "path": rel, "sha256": store.sha256_file(path), **params}


def load_faiss_index(bank, nprobe: int | None = None):
    faiss = _faiss()
    entry = bank.manifest.get("index")
    if not entry:
        raise ValueError(f"bank {bank.path!r} has no FAISS index (mgcl db index DIR --index flat|ivfpq)")
    index = faiss.read_index(os.path.join(bank.path, entry["path"]))
    if entry["kind"] == "ivfpq":
        index.nprobe = int(nprobe or min(entry["nlist"], 32))
    if bank.device.type == "cuda" and hasattr(faiss, "StandardGpuResources"):
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, bank.device.index or 0, index)
        index._mgcl_res = res  # keep the resources alive with the index
    return entry["kind"], index


def faiss_topk(bank, q: torch.Tensor, k: int, ties: bool = True, *, overfetch: int = 4):
    """FAISS candidates (``overfetch * k`` per query) re-scored exactly against the
    stored float16 embeddings, then the tie rule over those candidates. With a
    flat index, a query whose kept set fills every returned slot is completed by
    a range search at its threshold, so its ties are exact over the whole bank."""
    if bank._faiss is None:
        bank._faiss = load_faiss_index(bank)
    kind, index = bank._faiss
    qn = np.ascontiguousarray(q.float().cpu().numpy())
    kf = int(min(bank.count, max(k * max(1, overfetch), k)))
    _, I = index.search(qn, kf)
    qid = np.repeat(np.arange(len(qn)), kf)
    idx = I.reshape(-1)
    ok = idx >= 0
    qid, idx = qid[ok], idx[ok]
    vals = _rescore(bank, q, qid, idx)
    v, i, off = select(qid, vals, idx, len(qn), k, ties)
    if kind == "flat" and ties:
        full = np.array([j for j in range(len(qn)) if off[j + 1] - off[j] >= kf and kf < bank.count], dtype=np.int64)
        if len(full):
            taus = v[off[full + 1] - 1]
            lims, _, J = index.range_search(qn[full], float(taus.min()) - 1e-3)
            lims = lims.astype(np.int64)
            eq = np.repeat(full, np.diff(lims))
            ei = J.astype(np.int64)
            ev = _rescore(bank, q, eq, ei)
            keep = ev >= np.repeat(taus, np.diff(lims))
            pairs = np.unique(np.stack([np.concatenate([np.repeat(np.arange(len(qn)), np.diff(off)), eq[keep]]),
                                        np.concatenate([i, ei[keep]])], 1), axis=0)
            v, i, off = select(pairs[:, 0], _rescore(bank, q, pairs[:, 0], pairs[:, 1]), pairs[:, 1], len(qn), k, ties)
    return v, i, off


def _rescore(bank, q: torch.Tensor, qid: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Exact scores (similarity_topk's definition) of (query, entry) pairs: the
    float32 queries against the stored float16 rows."""
    from ..ops.similarity_topk import pair_scores  # noqa: PLC0415

    if not len(idx):
        return np.zeros(0, np.float32)
    qf = q.float().cpu()[torch.from_numpy(np.asarray(qid, dtype=np.int64))]
    return pair_scores(qf, bank.embeddings(np.asarray(idx, dtype=np.int64))).numpy()
