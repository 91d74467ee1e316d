"""Multi-stage retrieval (SPEC.md section 3) for a batch of text queries:

1. dense: every entry scoring >= the k-th largest distinct cosine score
   (``MemoryBank.topk``, ties kept);
2. visual rerank: S_v = cos(VLM text embedding of the query, VLM image
   embedding of the candidate); stored image embeddings (``--vlm`` at build
   time) are used when the bank has them, else images are opened and encoded
   (cached per bank index in ``image_cache``). Candidates without a usable
   image (unreadable file, zero stored vector) are dropped. Without a VLM,
   S_v is the dense score;
3. group by caption (meta ``group``): keep each group's top ``k_v`` by S_v;
4. lexical gate: if more than k remain, keep the k with the highest BM25
   score of the query against their captions (equal BM25: higher S_v, then
   lower index);
5. sort the survivors by S_v (descending, then index ascending).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch

from .bank import Hit

STAGES = ("embed", "dense", "vlm_text", "vlm_image", "visual", "group", "bm25", "sort")


@contextmanager
def _timed(timings, stage):
    t0 = time.perf_counter()
    yield
    if timings is not None:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0


def _vlm_device(vlm) -> torch.device:
    try:
        return next(iter(vlm.parameters())).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def vlm_text_features(vlm, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Unit VLM text embeddings (float32, CPU)."""
    dev = _vlm_device(vlm)
    out = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            tok = vlm.tokenize(texts[s:s + batch_size])
            out.append(torch.nn.functional.normalize(vlm.encode_text(tok.to(dev)).float(), dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def vlm_image_features(bank, vlm, indices: np.ndarray, cache: dict | None, batch_size: int = 32) -> torch.Tensor:
    """Unit VLM image embeddings (float32) of bank entries; zero rows for entries
    without a usable image. Stored embeddings when the bank has them."""
    if bank.has_vlm:
        return bank.image_embeddings(indices).float()
    from .images import open_image  # noqa: PLC0415

    cache = {} if cache is None else cache
    todo = [int(i) for i in dict.fromkeys(indices.tolist()) if int(i) not in cache]
    images = bank.meta["image"]
    tf = vlm.transform(False)
    dev = _vlm_device(vlm)
    for s in range(0, len(todo), batch_size):
        chunk, pos = [], []
        for i in todo[s:s + batch_size]:
            try:
                chunk.append(tf(open_image(images[i])))
                pos.append(i)
            except (OSError, ValueError, SyntaxError):
                cache[i] = None
        if chunk:
            with torch.no_grad():
                f = torch.nn.functional.normalize(vlm.encode_image(torch.stack(chunk).to(dev)).float(), dim=1).cpu()
            for i, r in zip(pos, f):
                cache[i] = r
    dim = next((v.shape[0] for v in cache.values() if v is not None), 1)
    zero = torch.zeros(dim)
    return torch.stack([cache[int(i)] if cache[int(i)] is not None else zero for i in indices]) if len(indices) \
        else torch.zeros(0, dim)


def retrieve(bank, queries: list[str], k: int, *, vlm=None, k_v: int = 1, k1: float = 1.5, b: float = 0.75,
             query_embeddings=None, backend: str = "exact", image_cache: dict | None = None,
             timings: dict | None = None, vlm_text: torch.Tensor | None = None,
             stats: dict | None = None) -> list[list[Hit]]:
    """The multi-stage candidates of every query (module doc); one list per query.

    ``query_embeddings`` (float [Q, dim], unit rows) skips the text embedder;
    ``vlm_text`` (float [Q, d_v], unit rows) skips the VLM text encoder;
    ``timings`` accumulates seconds per stage (``STAGES``); ``stats`` accumulates
    the candidate counts after each stage (``dense``, ``usable``, ``grouped``,
    ``final``) and the number of queries the BM25 gate cut (``gated_queries``)."""
    from .bank import _check_k  # noqa: PLC0415

    _check_k(k)
    if isinstance(k_v, bool) or not isinstance(k_v, int) or k_v < 1:
        raise ValueError(f"retrieve: k_v must be an integer >= 1, got {k_v!r}")
    queries = list(queries)
    n_q = len(queries)
    if n_q == 0:
        return []
    with _timed(timings, "embed"):
        q = bank._queries(queries if query_embeddings is None else query_embeddings)
        if q.shape[0] != n_q:
            raise ValueError(f"retrieve: {q.shape[0]} query embeddings for {n_q} queries")
    with _timed(timings, "dense"):
        dv, di, off = bank.topk(q, k, True, backend=backend)
        qid = np.repeat(np.arange(n_q), np.diff(off))
    sv = dv.astype(np.float32)
    keep = np.ones(len(di), dtype=bool)
    if vlm is not None and len(di):
        with _timed(timings, "vlm_text"):
            t = vlm_text_features(vlm, queries) if vlm_text is None else torch.as_tensor(vlm_text).float()
        with _timed(timings, "vlm_image"):
            uniq, inv = np.unique(di, return_inverse=True)
            img = vlm_image_features(bank, vlm, uniq, image_cache)
        with _timed(timings, "visual"):
            if img.shape[1] != t.shape[1]:
                raise ValueError(f"retrieve: VLM text features are {t.shape[1]}-d but image features "
                                 f"{img.shape[1]}-d (bank built with another VLM?)")
            usable = (img.abs().sum(1) > 0).numpy()
            sv = np.empty(len(di), dtype=np.float32)
            for s in range(0, len(di), 1 << 16):  # pairwise dot products in chunks
                sl = slice(s, s + (1 << 16))
                sv[sl] = (t[torch.from_numpy(qid[sl])] * img[torch.from_numpy(inv[sl])]).sum(1).numpy()
            keep &= usable[inv]
    n_usable = int(keep.sum())
    with _timed(timings, "group"):
        groups = bank.meta["group"][di]
        order = np.lexsort((di, -sv.astype(np.float64), groups, qid))
        o_q, o_g = qid[order], groups[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = (o_q[1:] != o_q[:-1]) | (o_g[1:] != o_g[:-1])
        start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
        # rank within (query, group) counting only usable candidates
        kept_order = keep[order]
        c = np.cumsum(kept_order)
        rank = c - (c[start] - kept_order[start])
        in_group = np.zeros(len(order), dtype=bool)
        in_group[order] = kept_order & (rank <= k_v)
        keep &= in_group
    out: list[list[Hit]] = []
    gated = 0
    bm = None
    meta = bank.meta
    for j in range(n_q):
        sel = np.nonzero(keep[off[j]:off[j + 1]])[0] + off[j]
        bscore = None
        if len(sel) > k:
            gated += 1
            with _timed(timings, "bm25"):
                bm = bm or bank.bm25(k1=k1, b=b)
                bscore = bm.scores(queries[j], di[sel])
                top = np.lexsort((di[sel], -sv[sel].astype(np.float64), -bscore))[:k]
                sel, bscore = sel[top], bscore[top]
        with _timed(timings, "sort"):
            o = np.lexsort((di[sel], -sv[sel].astype(np.float64)))
            hits = []
            for t_ in o:
                i = int(di[sel[t_]])
                hits.append(Hit(meta["id"][i], meta["caption"][i], meta["domain"][i], meta["image"][i],
                                float(sv[sel[t_]]), i, int(meta["group"][i]), dense=float(dv[sel[t_]]),
                                visual=float(sv[sel[t_]]) if vlm is not None else None,
                                bm25=float(bscore[t_]) if bscore is not None else None))
            out.append(hits)
    if stats is not None:
        counts = {"dense": len(di), "usable": n_usable, "grouped": int(keep.sum()), "gated_queries": gated,
                  "final": sum(len(h) for h in out)}
        for key, n in counts.items():
            stats[key] = stats.get(key, 0) + int(n)
    return out


__all__ = ["retrieve", "vlm_text_features", "vlm_image_features", "STAGES"]
