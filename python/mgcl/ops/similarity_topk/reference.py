"""similarity_topk, the definition (SPEC.md section 3, step 1: dense retrieval).

For queries X [Q, d] and keys K [N, d] (one tensor, or a list of shards whose
rows are numbered consecutively across shards), every score accumulated in
float32:

    s[q, n] = X[q] . K[n]
    ties=True:  U = the distinct non-NaN values of s[q, :],  k' = min(k, |U|),
                tau = the k'-th largest value of U;  keep every n with s[q, n] >= tau
    ties=False: keep the min(k, #non-NaN) best n, equal scores broken by lower n
    within a query: score descending, then index ascending
    max_per_query=m: keep a query's first m entries, set truncated[q]

NaN scores are never returned (``NaN >= tau`` is false). The result is ragged
(CSR): query q owns ``values/indices[offsets[q]:offsets[q+1]]``.

How the reference computes it, in two passes over the same score blocks:

1. tau. Per block, each query's k largest values (distinct ones for
   ties=True) are merged into a running [Q, k] list; tau = its k-th entry.
   Rows with fewer than k (distinct) non-NaN values are padded with -inf, and
   that is exact: then tau = -inf keeps every non-NaN score, which is the same
   set as "every score >= min(U)". A real -inf score behaves the same way.
2. collect. Per block, every (q, n) with s >= tau[q]; then a stable sort by
   score (descending) and a stable sort by query put each query's entries in
   order (collection already visits n in ascending order). ties=False keeps
   the first k of each query: the entries above tau and the lowest-index ties.

The scores are those of one fixed blocking (``score_blocks``): a block of
queries times a block of keys, one ``torch.mm`` each. The cpp backend makes the
very same calls, so its scores, and therefore its result, are bit-identical.
Inputs: float32 matmul after an exact upcast; on a GPU, float16/bfloat16
queries and keys of the same dtype multiply in that dtype with float32
accumulation and float32 output (``torch.mm(..., out_dtype=float32)``).

This module is the fallback, the test oracle and the bench baseline.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

NEG_INF = float("-inf")

# The blocking that defines the scores: rows of queries x rows of keys per
# matmul, by device type. Key blocks never cross a shard boundary.
QUERY_BLOCK = {"cpu": 1024, "cuda": 4096}
KEY_BLOCK = {"cpu": 4096, "cuda": 16384}
MIN_QUERY_ROWS = 8  # QUERY_BLOCK's entries are multiples of it

# Whether torch.mm(..., out_dtype=float32) works for 16-bit inputs on a device
# type; filled on first use.
_MM_OUT_DTYPE: dict = {}


def gemm_dtype(query_dtype: torch.dtype, key_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype both operands are cast to before the matmul (exact casts)."""
    dev = torch.device(device)
    if dev.type == "cuda" and query_dtype == key_dtype and query_dtype in (torch.float16, torch.bfloat16):
        if _MM_OUT_DTYPE.get((dev.type, query_dtype), True):
            return query_dtype
    return torch.float32


def block_scores(qb: torch.Tensor, kb: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 scores ``qb @ kb.T`` of one block; ``out`` is an optional
    contiguous float32 [rows, cols] buffer. Operands already in gemm_dtype."""
    if qb.dtype != torch.float32 and _MM_OUT_DTYPE.get((qb.device.type, qb.dtype)) is False:
        qb, kb = qb.float(), kb.float()
    if qb.dtype == torch.float32:
        return torch.mm(qb, kb.t()) if out is None else torch.mm(qb, kb.t(), out=out)
    try:
        if out is None:
            return torch.mm(qb, kb.t(), out_dtype=torch.float32)
        return torch.mm(qb, kb.t(), out_dtype=torch.float32, out=out)
    except (RuntimeError, TypeError):
        # This torch cannot multiply 16-bit operands into float32 here: fall
        # back to an exact upcast for this and every later call.
        _MM_OUT_DTYPE[(qb.device.type, qb.dtype)] = False
        return block_scores(qb.float(), kb.float(), out)


def as_shards(keys) -> list[torch.Tensor]:
    return [keys] if isinstance(keys, torch.Tensor) else list(keys)


def key_blocks(shards: Sequence[torch.Tensor], block: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(global index of the first row, block view) in key order; empty shards skipped."""
    base = 0
    for shard in shards:
        n = shard.shape[0]
        for a in range(0, n, block):
            yield base + a, shard[a:min(n, a + block)]
        base += n


def pad_queries(qg: torch.Tensor) -> torch.Tensor:
    """``qg`` with zero rows appended up to a multiple of MIN_QUERY_ROWS, so no
    matmul (query blocks are multiples of it too) has fewer rows than that
    (see fixed_width_scores)."""
    extra = -qg.shape[0] % MIN_QUERY_ROWS
    return torch.cat([qg, qg.new_zeros(extra, qg.shape[1])]) if extra else qg


def fixed_width_scores(qp: torch.Tensor, rows: int, kb: torch.Tensor, width: int, out: torch.Tensor,
                       pad: list) -> torch.Tensor:
    """float32 scores of the first ``rows`` rows of ``qp`` (already pad_queries'd)
    against the block ``kb`` (at most ``width`` rows), as a [rows, len(kb)] view
    of ``out`` (a float32 buffer of at least [len(qp), width]; row stride width).

    Every matmul has the same key width: a shorter block (a shard's last) is
    zero-padded to ``width`` in ``pad[0]`` (made on first use), and too few
    queries were padded by pad_queries. A BLAS picks its kernel, and so the
    order of the fp32 sum, by the matrix shape (a single query runs as a
    matrix-vector product, a narrow block as another kernel), so without this
    two copies of one key row could score an ulp apart depending on where they
    sit, and the tie rule would split identical captions."""
    cols = kb.shape[0]
    if cols < width:
        if pad[0] is None:
            pad[0] = qp.new_zeros(width, qp.shape[1])
        pad[0][:cols].copy_(kb)
        pad[0][cols:].zero_()
        kb = pad[0]
    full = out.view(-1)[:qp.shape[0] * width].view(qp.shape[0], width)
    return block_scores(qp, kb, full)[:rows, :cols]


def score_blocks(queries: torch.Tensor, shards: Sequence[torch.Tensor], only: set | None = None):
    """The fixed blocking: yields (q0, n0, scores [rows, cols] float32, a view
    with row stride KEY_BLOCK) in key order (outer) then query order (inner),
    on the queries' device. Each is one matmul of the same width
    (fixed_width_scores). The scores live in one reused buffer: use them
    before asking for the next block. ``only``: the query-block starts q0 to
    compute (default: all)."""
    dev = queries.device
    kdtype = shards[0].dtype if shards else queries.dtype
    nq = queries.shape[0]
    qp = pad_queries(queries.to(gemm_dtype(queries.dtype, kdtype, dev)))
    qblock, kblock = QUERY_BLOCK.get(dev.type, 256), KEY_BLOCK.get(dev.type, 4096)
    buf = torch.empty(min(qblock, qp.shape[0]) * kblock, dtype=torch.float32, device=dev)
    pad = [None]
    for n0, kb in key_blocks(shards, kblock):
        kg = kb.to(device=dev, dtype=qp.dtype)
        for q0 in range(0, nq, qblock):
            if only is not None and q0 not in only:
                continue
            yield q0, n0, fixed_width_scores(qp[q0:q0 + qblock], min(qblock, nq - q0), kg, kblock, buf, pad)


def _drop_repeats(v: torch.Tensor) -> torch.Tensor:
    """Rows sorted descending -> each value once, descending, -inf padded."""
    if v.shape[1] < 2:
        return v
    rep = torch.zeros_like(v, dtype=torch.bool)
    rep[:, 1:] = v[:, 1:] == v[:, :-1]
    return torch.where(rep, NEG_INF, v).sort(dim=1, descending=True).values


def top_values(s: torch.Tensor, k: int, distinct: bool) -> torch.Tensor:
    """[R, m] -> [R, k]: each row's k largest values (each value once when
    ``distinct``), descending; NaN ignored; short rows padded with -inf."""
    s = torch.where(torch.isnan(s), NEG_INF, s)
    rows, m = s.shape
    out = torch.full((rows, k), NEG_INF, dtype=torch.float32, device=s.device)
    if m == 0 or rows == 0:
        return out
    raw = s.topk(min(k, m), dim=1).values
    t = raw
    if distinct:
        t = _drop_repeats(raw)
        if m > k:
            # A row whose k largest values repeat may hold more distinct
            # values further down: only such rows are fully sorted.
            more = ((t > NEG_INF).sum(1) < k) & (raw[:, -1] > NEG_INF)
            if bool(more.any()):
                rows_more = more.nonzero().flatten()
                t[rows_more] = _drop_repeats(s[rows_more].sort(dim=1, descending=True).values)[:, :k]
    out[:, :t.shape[1]] = t
    return out


def thresholds(queries: torch.Tensor, shards: Sequence[torch.Tensor], k: int, ties: bool) -> torch.Tensor:
    """tau [Q] (float32): the k-th largest (distinct if ``ties``) score, -inf when short."""
    best = torch.full((queries.shape[0], k), NEG_INF, dtype=torch.float32, device=queries.device)
    for q0, _, s in score_blocks(queries, shards):
        q1 = q0 + s.shape[0]
        merged = torch.cat([best[q0:q1], top_values(s, k, ties)], dim=1)
        best[q0:q1] = top_values(merged, k, ties)
    return best[:, k - 1].clone()


def collect(queries: torch.Tensor, shards: Sequence[torch.Tensor], tau: torch.Tensor):
    """Every (q, n, s) with s >= tau[q], sorted by query, score desc, index asc."""
    pieces = []
    for q0, n0, s in score_blocks(queries, shards):
        r, c = (s >= tau[q0:q0 + s.shape[0], None]).nonzero(as_tuple=True)
        pieces.append((r + q0, c + n0, s[r, c]))
    return sorted_triples(pieces, queries.device)


def sorted_triples(pieces, device):
    """Concatenate (query, key index, value) pieces that arrive in ascending key
    order and sort them by query, value desc, index asc (two stable sorts)."""
    if not pieces:
        e = torch.empty(0, dtype=torch.int64, device=device)
        return e, e.clone(), torch.empty(0, dtype=torch.float32, device=device)
    q, n, v = (torch.cat(x) for x in zip(*pieces))
    order = v.sort(descending=True, stable=True).indices
    order = order[q[order].sort(stable=True).indices]
    return q[order], n[order], v[order]


def clip_counts(counts: torch.Tensor, keep: int | None, cap: int | None):
    """(counts kept, truncated): each query's first ``keep`` entries
    (ties=False), then its first ``cap`` (max_per_query, flagged)."""
    if keep is not None:
        counts = counts.clamp(max=keep)
    truncated = torch.zeros(counts.shape[0], dtype=torch.bool, device=counts.device)
    if cap is not None:
        truncated = counts > cap
        counts = counts.clamp(max=cap)
    return counts, truncated


def ragged(q: torch.Tensor, n: torch.Tensor, v: torch.Tensor, n_queries: int, keep: int | None, cap: int | None):
    """Sorted (q, n, v) triples -> TopK fields (see clip_counts)."""
    dev = q.device
    counts = torch.bincount(q, minlength=n_queries) if q.numel() else torch.zeros(n_queries, dtype=torch.int64,
                                                                                   device=dev)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(q.numel(), device=dev) - starts[q]
    counts, truncated = clip_counts(counts, keep, cap)
    sel = rank < counts[q]
    offsets = torch.zeros(n_queries + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(counts, 0)
    return v[sel].float(), n[sel].long(), offsets, truncated


def similarity_topk(queries: torch.Tensor, shards: list[torch.Tensor], k: int, ties: bool, max_per_query: int | None):
    """(values float32 [M], indices int64 [M], offsets int64 [Q+1], truncated bool [Q])."""
    tau = thresholds(queries, shards, k, ties)
    q, n, v = collect(queries, shards, tau)
    return ragged(q, n, v, queries.shape[0], None if ties else k, max_per_query)
