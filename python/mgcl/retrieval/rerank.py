"""Multi-stage retrieval (SPEC.md section 3) for a batch of text queries, one
function per stage over a table of candidates (``Candidates``):

1. ``dense``: every entry scoring >= the k-th largest distinct cosine score
   (``search.topk``, ties kept);
2. ``visual``: S_v = cos(VLM text embedding of the query, VLM image
   embedding of the candidate); stored image embeddings (``--vlm`` at build
   time) are used when the bank has them, else images are opened and encoded
   (cached per bank index in ``image_cache``). Candidates without a usable
   image (unreadable file, zero stored vector) are dropped. Without a VLM,
   S_v is the dense score;
3. ``group`` by caption (meta ``group``): keep each group's top ``k_v`` by S_v;
4. ``gate``: if more than k remain, keep the k with the highest BM25 score of
   the query against their captions (equal BM25: higher S_v, then lower index);
5. ``sort`` the survivors by S_v (descending, then index ascending) into hits.

``retrieve(..., stages=)`` runs the whole pipeline ("multi-stage") or one of
the paper's retrieval ablations: "dense-only" (stage 1 alone, ties kept,
sorted by the dense score) or "bm25-only" (the k entries of the whole bank
with the highest BM25 score of the query against their captions, equal BM25:
lower index first, sorted by BM25; no embedder or VLM is used).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .bank import Hit
from .search import query_embeddings as embed_queries
from .search import check_k, topk
from .vlm import encode_images, encode_texts

STAGES = ("embed", "dense", "vlm_text", "vlm_image", "visual", "group", "bm25", "sort")
PIPELINES = ("multi-stage", "dense-only", "bm25-only")


@dataclass
class Candidates:
    """Candidate rows of a batch of queries, grouped by query in query order."""

    qid: np.ndarray            # int64: the query of each row
    index: np.ndarray          # int64: the bank entry
    dense: np.ndarray          # float32: the dense cosine score
    sv: np.ndarray             # float32: S_v (the dense score until ``visual``)
    bm25: np.ndarray           # float64: the BM25 score (NaN where the gate did not score)

    def take(self, rows: np.ndarray) -> "Candidates":
        return Candidates(self.qid[rows], self.index[rows], self.dense[rows], self.sv[rows], self.bm25[rows])

    def __len__(self) -> int:
        return len(self.index)


@contextmanager
def _timed(timings, stage):
    t0 = time.perf_counter()
    yield
    if timings is not None:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0


def image_features(bank, vlm, indices: np.ndarray, cache: dict | None, dim: int) -> torch.Tensor:
    """Unit VLM image embeddings (float32 [len(indices), dim]) of bank entries;
    zero rows for entries without a usable image. The stored embeddings when
    the bank has them, else encoded (``vlm.encode_images``) and cached per
    bank index in ``cache``."""
    if bank.has_vlm:
        return bank.image_embeddings(indices).float()
    cache = {} if cache is None else cache
    todo = [int(i) for i in dict.fromkeys(indices.tolist()) if int(i) not in cache]
    if todo:
        images = bank.meta["image"]
        feats, ok = encode_images(vlm, [images[i] for i in todo], dim=dim)
        for i, f, good in zip(todo, feats, ok):
            cache[i] = f if good else None
    zero = torch.zeros(dim)
    return torch.stack([zero if cache[int(i)] is None else cache[int(i)] for i in indices]) if len(indices) \
        else torch.zeros(0, dim)


# ---- the stages ---------------------------------------------------------------------

def dense(bank, q: torch.Tensor, k: int, backend: str = "exact") -> Candidates:
    """Stage 1: every entry at or above each query's k-th largest distinct score."""
    dv, di, off = topk(bank, q, k, True, backend=backend)
    qid = np.repeat(np.arange(len(off) - 1), np.diff(off))
    return Candidates(qid, di, dv, dv.astype(np.float32), np.full(len(di), np.nan))


# candidates per block of the S_v pass: the rows gathered for one block (float32, d_v wide) are the
# stage's only memory that grows with the candidate count (64K x 512-d: 128 MiB)
VISUAL_BLOCK = 1 << 16


def visual(bank, c: Candidates, text: torch.Tensor, image_cache: dict | None = None,
           timings: dict | None = None, vlm=None) -> Candidates:
    """Stage 2: S_v = text[qid] . image(index); candidates without a usable image dropped.
    ``text``: the queries' unit VLM text embeddings [Q, d_v]; ``vlm`` encodes
    the images when the bank stores none. Stored image embeddings are gathered
    block by block of candidates (``VISUAL_BLOCK``), so the pass holds one
    block's rows, not every candidate's (millions at a 4M-entry bank)."""
    if bank.has_vlm:
        dim = int(bank.manifest["vlm"]["dim"])

        def rows(sl):  # the stored rows need no cache
            return image_features(bank, vlm, c.index[sl], None, dim)
    else:  # encoded once per distinct entry (and cached): those features are held anyway
        with _timed(timings, "vlm_image"):
            uniq, inv = np.unique(c.index, return_inverse=True)
            img = image_features(bank, vlm, uniq, image_cache, text.shape[1])
        dim = img.shape[1]

        def rows(sl):
            return img[torch.from_numpy(inv[sl])]
    if dim != text.shape[1]:
        raise ValueError(f"retrieve: VLM text features are {text.shape[1]}-d but image features "
                         f"{dim}-d (bank built with another VLM?)")
    sv = np.empty(len(c), dtype=np.float32)
    usable = np.empty(len(c), dtype=bool)
    for s in range(0, len(c), VISUAL_BLOCK):  # pairwise dot products, one block at a time
        sl = slice(s, s + VISUAL_BLOCK)
        with _timed(timings, "vlm_image"):
            r = rows(sl)
        with _timed(timings, "visual"):
            usable[sl] = (r.abs().sum(1) > 0).numpy()
            sv[sl] = (text[torch.from_numpy(c.qid[sl])] * r).sum(1).numpy()
    out = Candidates(c.qid, c.index, c.dense, sv, c.bm25)
    return out.take(np.nonzero(usable)[0])


def group(bank, c: Candidates, k_v: int) -> Candidates:
    """Stage 3: each query's top ``k_v`` candidates by S_v within each caption group."""
    groups = bank.meta["group"][c.index]
    order = np.lexsort((c.index, -c.sv.astype(np.float64), groups, c.qid))
    o_q, o_g = c.qid[order], groups[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (o_q[1:] != o_q[:-1]) | (o_g[1:] != o_g[:-1])
    start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    rank = np.arange(len(order)) - start + 1
    return c.take(np.sort(order[rank <= k_v]))


def gate(bank, c: Candidates, queries: list[str], k: int, k1: float = 1.5, b: float = 0.75,
         timings: dict | None = None) -> tuple[Candidates, int]:
    """Stage 4: for every query with more than ``k`` candidates, the ``k`` with the
    highest BM25 score (then S_v, then index). Returns the kept rows and the
    number of queries cut."""
    counts = np.bincount(c.qid, minlength=len(queries))
    over = np.nonzero(counts > k)[0]
    if not len(over):
        return c, 0
    with _timed(timings, "bm25"):
        bm = bank.bm25(k1=k1, b=b)
        keep = np.ones(len(c), dtype=bool)
        bm25 = c.bm25.copy()
        starts = np.concatenate([[0], np.cumsum(counts)])
        for j in over:
            rows = np.arange(starts[j], starts[j + 1])
            score = bm.scores(queries[j], c.index[rows])
            top = np.lexsort((c.index[rows], -c.sv[rows].astype(np.float64), -score))[:k]
            keep[rows] = False
            keep[rows[top]] = True
            bm25[rows[top]] = score[top]
        out = Candidates(c.qid, c.index, c.dense, c.sv, bm25)
        return out.take(np.nonzero(keep)[0]), len(over)


def lexical(bank, queries: list[str], k: int, k1: float = 1.5, b: float = 0.75) -> Candidates:
    """The "bm25-only" ablation: each query's ``k`` entries of the whole bank with the
    highest BM25 score (equal scores: lower index), the score in ``bm25`` and ``sv``."""
    bm = bank.bm25(k1=k1, b=b)
    every = np.arange(bank.count, dtype=np.int64)
    parts = []
    for j, query in enumerate(queries):
        score = bm.scores(query, every)
        top = np.lexsort((every, -score))[:k]
        top = top[score[top] > 0]                      # an entry sharing no term with the query is no hit
        parts.append((np.full(len(top), j, dtype=np.int64), top, score[top]))
    qid, index, bm25 = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return Candidates(qid, index, np.full(len(index), np.nan, dtype=np.float32), bm25.astype(np.float32), bm25)


def sort(bank, c: Candidates, n_queries: int, with_visual: bool) -> list[list[Hit]]:
    """Stage 5: one list of hits per query, by S_v descending, then index."""
    order = np.lexsort((c.index, -c.sv.astype(np.float64), c.qid))
    out: list[list[Hit]] = [[] for _ in range(n_queries)]
    for r in order:
        bm, dv = c.bm25[r], c.dense[r]
        out[int(c.qid[r])].append(bank.hit(c.index[r], c.sv[r], dense=None if np.isnan(dv) else float(dv),
                                           visual=float(c.sv[r]) if with_visual else None,
                                           bm25=None if np.isnan(bm) else float(bm)))
    return out


# ---- the pipeline -------------------------------------------------------------------

def retrieve(bank, queries: list[str], k: int, *, vlm=None, k_v: int = 1, k1: float = 1.5, b: float = 0.75,
             query_embeddings=None, backend: str = "exact", image_cache: dict | None = None,
             timings: dict | None = None, vlm_text: torch.Tensor | None = None,
             stats: dict | None = None, stages: str = "multi-stage") -> list[list[Hit]]:
    """The multi-stage candidates of every query (module doc); one list per query.

    ``query_embeddings`` (float [Q, dim], unit rows) skips the text embedder;
    ``vlm_text`` (float [Q, d_v], unit rows) skips the VLM text encoder;
    ``timings`` accumulates seconds per stage (``STAGES``); ``stats`` accumulates
    the candidate counts after each stage (``dense``, ``usable``, ``grouped``,
    ``final``) and the number of queries the BM25 gate cut (``gated_queries``);
    ``stages`` one of ``PIPELINES`` (module doc)."""
    check_k(k)
    if stages not in PIPELINES:
        raise ValueError(f"retrieve: stages must be one of {list(PIPELINES)}, got {stages!r}")
    if isinstance(k_v, bool) or not isinstance(k_v, int) or k_v < 1:
        raise ValueError(f"retrieve: k_v must be an integer >= 1, got {k_v!r}")
    queries = list(queries)
    if not queries:
        return []
    if stages == "bm25-only":
        with _timed(timings, "bm25"):
            c = lexical(bank, queries, k, k1, b)
        return sort(bank, c, len(queries), False)
    with _timed(timings, "embed"):
        q = embed_queries(bank, queries if query_embeddings is None else query_embeddings)
        if q.shape[0] != len(queries):
            raise ValueError(f"retrieve: {q.shape[0]} query embeddings for {len(queries)} queries")
    with _timed(timings, "dense"):
        c = dense(bank, q, k, backend)
    n_dense = len(c)
    if stages == "dense-only":
        return sort(bank, c, len(queries), False)
    if vlm is not None and len(c):
        with _timed(timings, "vlm_text"):
            text = encode_texts(vlm, queries) if vlm_text is None else torch.as_tensor(vlm_text).float()
        c = visual(bank, c, text, image_cache, timings, vlm=vlm)
    n_usable = len(c)
    with _timed(timings, "group"):
        c = group(bank, c, k_v)
    n_grouped = len(c)
    c, gated = gate(bank, c, queries, k, k1, b, timings)
    with _timed(timings, "sort"):
        out = sort(bank, c, len(queries), vlm is not None)
    if stats is not None:
        for key, n in {"dense": n_dense, "usable": n_usable, "grouped": n_grouped, "gated_queries": gated,
                       "final": len(c)}.items():
            stats[key] = stats.get(key, 0) + int(n)
    return out


__all__ = ["retrieve", "dense", "visual", "group", "gate", "lexical", "sort", "image_features", "Candidates", "STAGES",
           "PIPELINES"]
