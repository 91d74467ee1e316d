"""A bank's FAISS index, all of it here: build, load, query, re-score.

The index file lives inside the bank (``index/faiss-<kind>.index``) and is
named in its manifest (``MemoryBank.record_index``); a loaded index is kept
per bank object in this module's cache (the bank's own state is never
touched), keyed by the file's sha256 so a rebuilt index is reloaded. FAISS
returns approximate candidates; ``faiss_topk`` re-scores them exactly against
the stored float16 rows, so a FAISS-served bank returns the same scores as
the exact search for the entries it finds.
"""
from __future__ import annotations

import os
import warnings
import weakref

import numpy as np
import torch

from .._io import atomic_write
from .store import BankError
from .ties import select

KINDS = ("flat", "ivfpq")
POINTS_PER_CENTROID = 39  # FAISS's own floor (ClusteringParameters.min_points_per_centroid)
DEFAULT_TRAIN_SIZE = 200_000  # the k-means sample of ivfpq unless more rows are needed (build_index)


class SmallBankWarning(UserWarning):
    """An ivfpq index trained on fewer vectors than FAISS's k-means wants: it
    works, but its clusters and codes are poor (a flat index is exact)."""
_loaded: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # bank -> (sha256, nprobe, kind, index, gpu res)


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


def build_index(bank, kind: str = "flat", *, nlist=None, m=None, nbits: int = 8, train_size=None,
                seed: int = 0) -> dict:
    """Write ``index/faiss-<kind>.index`` (inner product) for ``bank`` and name it
    in the manifest; returns the manifest entry.

    ivfpq: ``nlist`` defaults to 4 sqrt(N) (at most 65,536), ``m`` to the largest
    divisor of the dimension up to d / 8; the k-means trains on ``train_size``
    rows sampled without replacement (default: 200,000, or the
    ``POINTS_PER_CENTROID`` rows per centroid FAISS wants where that is more,
    so the default never trains short; at most the bank)."""
    faiss = _faiss()
    d, n = bank.dim, bank.count
    for name, v in (("nlist", nlist), ("m", m), ("nbits", nbits), ("train_size", train_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{kind}: {name} must be an integer >= 1, got {v!r}")
    if kind == "ivfpq" and nbits > 16:
        raise ValueError(f"ivfpq: nbits={nbits}; FAISS product quantizers take 1 to 16 bits")
    try:
        return _build(faiss, bank, kind, d, n, nlist, m, nbits, train_size, seed)
    except RuntimeError as exc:  # FAISS's C++ errors: keep their last line
        why = str(exc).strip().splitlines()
        raise ValueError(f"FAISS could not build the {kind} index ({why[-1] if why else exc})") from None


def _build(faiss, bank, kind, d, n, nlist, m, nbits, train_size, seed) -> dict:
    from . import store  # noqa: PLC0415

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
        want = POINTS_PER_CENTROID * need
        if train_size is None:
            train_size = max(DEFAULT_TRAIN_SIZE, want)
        sample = np.sort(rng.choice(n, size=min(n, train_size), replace=False))
        if len(sample) < want:  # one warning here instead of FAISS's, printed by each of its m+1 k-means
            warnings.warn(f"ivfpq: training on {len(sample)} vectors, fewer than the {want} that FAISS's k-means "
                          f"wants for {need} centroids (nlist={nlist}, 2^nbits={2 ** nbits}); the index will be "
                          "poor: lower --nlist / --nbits, or use --index flat (exact)", SmallBankWarning,
                          stacklevel=3)
        # The floor only decides FAISS's stderr warning, never the clustering; 1 silences it.
        index.cp.min_points_per_centroid = 1
        index.pq.cp.min_points_per_centroid = 1
        index.train(bank.embeddings(sample).float().numpy())
        params = {"nlist": nlist, "m": int(m), "nbits": int(nbits), "train_size": int(len(sample)), "seed": seed}
    else:
        raise ValueError(f"unknown FAISS index kind {kind!r}; expected one of {KINDS}")
    for rows in _iter_rows(bank):
        index.add(np.ascontiguousarray(rows))
    rel = f"index/faiss-{kind}.index"
    path = os.path.join(bank.path, rel)
    atomic_write(path, lambda tmp: faiss.write_index(index, tmp))
    entry = {"kind": kind, "path": rel, "sha256": store.sha256_file(path), **params}
    bank.record_index(entry)
    return entry


def load_index(bank, nprobe: int | None = None):
    """``(kind, index)`` of the bank's FAISS index, read once per bank object
    (the file checked against its sha256 first; an unreadable one is a
    BankError naming it)."""
    faiss = _faiss()
    entry, path = bank.index_file()
    hit = _loaded.get(bank)
    if hit is not None and hit[0] == entry["sha256"] and hit[1] == nprobe:
        return hit[2], hit[3]
    try:
        index = faiss.read_index(path)
    except RuntimeError as exc:
        why = str(exc).strip().splitlines()
        raise BankError(f"bank {bank.path!r}: {entry['path']!r} is not a readable FAISS index "
                        f"({why[-1] if why else 'read_index failed'})") from None
    if index.d != bank.dim or index.ntotal != bank.count:
        raise BankError(f"bank {bank.path!r}: {entry['path']!r} indexes {index.ntotal} vectors of dim {index.d}; "
                        f"the bank holds {bank.count} of dim {bank.dim} (rebuild it: mgcl db index)")
    if entry["kind"] == "ivfpq":
        index.nprobe = int(nprobe or min(entry["nlist"], 32))
    res = None
    if bank.device.type == "cuda" and hasattr(faiss, "StandardGpuResources"):
        res = faiss.StandardGpuResources()  # kept alive with the index
        index = faiss.index_cpu_to_gpu(res, bank.device.index or 0, index)
    _loaded[bank] = (entry["sha256"], nprobe, entry["kind"], index, res)
    return entry["kind"], index


def faiss_topk(bank, q: torch.Tensor, k: int, ties: bool = True, *, overfetch: int = 4):
    """FAISS candidates (``overfetch * k`` per query) re-scored exactly against the
    stored float16 embeddings, then the tie rule over those candidates. With a
    flat index, a query whose kept set fills every returned slot is completed by
    a range search at its threshold, so its ties are exact over the whole bank."""
    kind, index = load_index(bank)
    qn = np.ascontiguousarray(q.float().cpu().numpy())
    kf = int(min(bank.count, max(k * max(1, overfetch), k)))
    _, I = index.search(qn, kf)
    qid = np.repeat(np.arange(len(qn)), kf)
    idx = I.reshape(-1)
    ok = idx >= 0
    qid, idx = qid[ok], idx[ok]
    vals = rescore(bank, q, qid, idx)
    v, i, off = select(qid, vals, idx, len(qn), k, ties)
    if kind == "flat" and ties:
        full = np.array([j for j in range(len(qn)) if off[j + 1] - off[j] >= kf and kf < bank.count], dtype=np.int64)
        if len(full):
            taus = v[off[full + 1] - 1]
            lims, _, J = index.range_search(qn[full], float(taus.min()) - 1e-3)
            lims = lims.astype(np.int64)
            eq = np.repeat(full, np.diff(lims))
            ei = J.astype(np.int64)
            ev = rescore(bank, q, eq, ei)
            keep = ev >= np.repeat(taus, np.diff(lims))
            pairs = np.unique(np.stack([np.concatenate([np.repeat(np.arange(len(qn)), np.diff(off)), eq[keep]]),
                                        np.concatenate([i, ei[keep]])], 1), axis=0)
            v, i, off = select(pairs[:, 0], rescore(bank, q, pairs[:, 0], pairs[:, 1]), pairs[:, 1], len(qn), k, ties)
    return v, i, off


def rescore(bank, q: torch.Tensor, qid: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Exact scores (similarity_topk's definition, as the exact backend gives
    them) of (query, entry) pairs: the float32 queries against the stored
    float16 rows."""
    from ..ops.similarity_topk import pair_scores  # noqa: PLC0415

    if not len(idx):
        return np.zeros(0, np.float32)
    qf = q.float().cpu()[torch.from_numpy(np.asarray(qid, dtype=np.int64))]
    return pair_scores(qf, bank.embeddings(np.asarray(idx, dtype=np.int64))).numpy()


__all__ = ["SmallBankWarning", "build_index", "load_index", "faiss_topk", "rescore", "KINDS"]
