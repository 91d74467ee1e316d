"""Blocking and streaming for similarity_topk's fast paths (the definition is
in ``reference.py``; everything here is tested against it).

- shards: numbering, blocks, gathering rows by global index;
- the rule over a candidate set: exact scores of a subset of the pairs that
  holds every pair of the answer give the answer (``apply_rule``);
- the ragged result (``ragged``);
- the screened flow (``screened_topk``): a float32 GEMM per key tile gives an
  upper bound on each exact score, a select keeps each query's ``cap`` best
  bounds, their exact scores give a threshold from below, and the queries
  whose lists cannot prove they hold every pair that reaches it are screened
  again at that threshold. The ``chunked`` backend runs it with torch alone;
  the ``cuda`` backend with its select and pair-score kernels.

Why a candidate set suffices: for ties=True, if it holds every pair with
score >= the true tau, its k'-th largest distinct value is tau (its values
>= tau are exactly the full set's; when the full set has fewer than k distinct
values the candidates must be all the non-NaN pairs, and the flow makes sure
of it). For ties=False the same holds for the true top k.

Why the bound: a float32 GEMM (any order, any blocking, TF32/bf16 inputs
when torch allows them) is off by at most ``gemm_rel(d)`` * ||x|| ||k|| from
x.k, the definition is off by at most 2^-23 ||x|| ||k|| (fp64 sum, one fp32
rounding; see csrc/cpu/similarity_topk.cpp), and the float32 evaluation of
ub = approx + (rel + ETA) A_x T_k + 2^-126 rounds a few times by 2^-24 of
terms bounded by A_x T_k: ETA = 2^-16 covers the last two with room to spare.
A_x >= ||x||, T_k >= ||k|| are float32 norms rounded up. NaN bounds (from
non-finite rows) become +inf: those pairs are always scored exactly.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Iterator, Sequence

import torch

from . import reference

NEG_INF = float("-inf")
ETA = 2.0 ** -16
ABS = 2.0 ** -126
EXACT_CHUNK = 1 << 16  # pairs scored exactly per call


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


def gather_rows(shards: Sequence[torch.Tensor], idx: torch.Tensor, device) -> torch.Tensor:
    """Rows ``idx`` (global indices, any order) of the shards, on ``device``."""
    d = shards[0].shape[1]
    out = torch.empty(idx.shape[0], d, dtype=shards[0].dtype, device=device)
    base = 0
    for s in shards:
        n = s.shape[0]
        mine = ((idx >= base) & (idx < base + n)).nonzero().flatten()
        if mine.numel():
            out[mine] = s[(idx[mine] - base).to(s.device)].to(device)
        base += n
    return out


# ---- the rule over candidates, and the ragged result ------------------------------------------

def _grouped(q: torch.Tensor, n: torch.Tensor, v: torch.Tensor):
    """The triples sorted by query, value desc, index asc (NaN values dropped)."""
    ok = ~torch.isnan(v)
    q, n, v = q[ok], n[ok], v[ok]
    order = n.argsort(stable=True)
    order = order[v[order].argsort(descending=True, stable=True)]
    order = order[q[order].argsort(stable=True)]
    return q[order], n[order], v[order]


def _ranks(q: torch.Tensor, v: torch.Tensor, distinct: bool) -> torch.Tensor:
    """1-based rank of each sorted triple within its query (of its value when distinct)."""
    if not q.numel():
        return q.clone()
    start = torch.ones_like(q, dtype=torch.bool)
    start[1:] = q[1:] != q[:-1]
    new = start.clone()
    if distinct:
        new[1:] |= v[1:] != v[:-1]
    else:
        new[:] = True
    c = torch.cumsum(new.long(), 0)
    first = torch.arange(q.numel(), device=q.device)
    first = torch.cummax(torch.where(start, first, torch.zeros_like(first)), 0).values
    return c - c[first] + 1


def apply_rule(q: torch.Tensor, n: torch.Tensor, v: torch.Tensor, k: int, ties: bool):
    """The rule over exact candidate triples (query, key index, score): the
    kept triples sorted by query, score desc, index asc."""
    q, n, v = _grouped(q, n, v)
    keep = _ranks(q, v, ties) <= k
    return q[keep], n[keep], v[keep]


def kth_scores(q: torch.Tensor, v: torch.Tensor, nq: int, k: int, ties: bool) -> torch.Tensor:
    """float32 [nq]: per query the k-th largest (distinct when ``ties``) candidate
    score, -inf when it has fewer: a lower bound on the true threshold."""
    q, _, v = _grouped(q, q, v)
    tau = torch.full((nq,), NEG_INF, dtype=torch.float32, device=v.device)
    at = (_ranks(q, v, ties) == k).nonzero().flatten()
    tau[q[at]] = v[at]
    return tau


def ragged(q: torch.Tensor, n: torch.Tensor, v: torch.Tensor, nq: int, max_per_query: int | None):
    """Triples sorted by query (each query's in result order) -> (values,
    indices, offsets, truncated), keeping each query's first max_per_query."""
    dev = v.device
    counts = torch.bincount(q, minlength=nq) if q.numel() else torch.zeros(nq, dtype=torch.int64, device=dev)
    truncated = torch.zeros(nq, dtype=torch.bool, device=dev)
    if max_per_query is not None:
        truncated = counts > max_per_query
        starts = torch.cumsum(counts, 0) - counts
        sel = torch.arange(q.numel(), device=dev) - starts[q] < max_per_query
        q, n, v = q[sel], n[sel], v[sel]
        counts = counts.clamp(max=max_per_query)
    offsets = torch.zeros(nq + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(counts, 0)
    return v.float(), n.long(), offsets, truncated


# ---- the screen's bounds ------------------------------------------------------------------------

def norm_bound(rows: torch.Tensor) -> torch.Tensor:
    """float32 [R] >= the 2-norm of each row (fp64 norm, rounded up to fp32)."""
    v = torch.linalg.vector_norm(rows.double(), dim=1).float()
    return torch.nextafter(v, torch.full_like(v, math.inf))


def reduced_fp32_matmul(device_type: str) -> bool:
    """Whether torch may run a float32 matmul on this device type with TF32 or
    bf16 inputs (its precision settings, oneDNN's fpmath mode)."""
    if torch.get_float32_matmul_precision() != "highest":
        return True
    if device_type == "cuda":
        m = torch.backends.cuda.matmul
        return bool(m.allow_tf32) or str(getattr(m, "fp32_precision", "none")).lower() not in ("none", "ieee")
    mkl = getattr(torch.backends.mkldnn, "matmul", None)
    if mkl is not None and str(getattr(mkl, "fp32_precision", "none")).lower() not in ("none", "ieee"):
        return True
    return os.environ.get("ONEDNN_DEFAULT_FPMATH_MODE", "strict").strip().lower() not in ("", "strict")


def gemm_rel(d: int, device_type: str) -> float:
    """r with |fl(x.k) - x.k| <= r ||x|| ||k|| for a float32 matmul of depth d:
    inputs rounded by u_in (0, or 2^-8 when reduced precision is allowed), d
    products and sums each rounded by 2^-24 in any order: (1 + u_in)^2 (1 +
    gamma_(d+2)) - 1, gamma_m = m u / (1 - m u), rounded up."""
    u = 2.0 ** -24
    u_in = 2.0 ** -8 if reduced_fp32_matmul(device_type) else 0.0
    m = d + 2
    gamma = m * u / (1 - m * u)
    return math.nextafter((1 + u_in) ** 2 * (1 + gamma) - 1, math.inf) * (1 + 2.0 ** -40)


def upper_bounds(xf: torch.Tensor, ax: torch.Tensor, kf: torch.Tensor, rel: float) -> torch.Tensor:
    """float32 [Q, n] upper bounds on the exact scores of xf's rows with kf's rows."""
    ub = torch.mm(xf, kf.t())
    ub += (ax * (rel + ETA))[:, None] * norm_bound(kf)[None, :]
    ub += ABS
    return torch.where(torch.isnan(ub), math.inf, ub)


# ---- the screened flow --------------------------------------------------------------------------

def new_lists(nq: int, cap: int, device):
    return (torch.empty(nq, cap, dtype=torch.float32, device=device),
            torch.empty(nq, cap, dtype=torch.int64, device=device),
            torch.zeros(nq, dtype=torch.int64, device=device))


def torch_select(ub: torch.Tensor, n0: int, lv: torch.Tensor, li: torch.Tensor, ln: torch.Tensor) -> None:
    """Fold a tile of bounds (keys n0.. in order) into the per-query lists of
    the best ``cap`` (value desc, index asc; NaN never kept), in place: the
    torch twin of the CUDA select kernel."""
    nq, cap = lv.shape
    j = torch.arange(cap, device=lv.device)
    old_v = torch.where(j[None, :] < ln[:, None], lv, math.nan)
    idx = torch.arange(n0, n0 + ub.shape[1], device=lv.device).expand(nq, -1)
    v = torch.cat([old_v, ub], 1)
    i = torch.cat([li, idx], 1)
    valid = ~torch.isnan(v)
    # value desc, then (stable) the list before the tile and the tile in index order; invalid last
    order = torch.sort(torch.where(valid, v, NEG_INF), dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort((~valid).gather(1, order).byte(), dim=1, stable=True).indices)[:, :cap]
    ln.copy_(valid.sum(1).clamp(max=cap))
    lv.copy_(v.gather(1, order))
    li.copy_(i.gather(1, order))


def screened_topk(queries: torch.Tensor, shards: list[torch.Tensor], k: int, ties: bool,
                  max_per_query: int | None, *, cap: int, tile: int,
                  tiles: Callable | None = None, select: Callable = torch_select,
                  pair_scores: Callable = reference.pair_scores, stats: dict | None = None):
    """The exact result through the screen (see the module doc). ``tiles(shards,
    tile)`` yields (n0, key tile on the queries' device); ``select`` and
    ``pair_scores`` are the torch functions here or the CUDA kernels."""
    dev = queries.device
    nq, d = queries.shape
    tiles = tiles or (lambda sh, t: ((n0, kb.to(dev)) for n0, kb in key_blocks(sh, t)))
    xf = queries.float()
    ax = norm_bound(xf)
    rel = gemm_rel(d, dev.type)
    lv, li, ln = new_lists(nq, cap, dev)
    for n0, kt in tiles(shards, tile):
        select(upper_bounds(xf, ax, kt.float(), rel), n0, lv, li, ln)

    def exact(q, n):  # in chunks: the gathered rows take O(chunk d) memory
        out = torch.empty(q.shape[0], dtype=torch.float32, device=dev)
        for a in range(0, q.shape[0], EXACT_CHUNK):
            b = a + EXACT_CHUNK
            out[a:b] = pair_scores(queries[q[a:b]], gather_rows(shards, n[a:b], dev))
        return out

    listed = torch.arange(cap, device=dev)[None, :] < ln[:, None]
    q, pos = listed.nonzero(as_tuple=True)
    n = li[q, pos]
    v = exact(q, n)
    scored = torch.bincount(q, minlength=nq)
    tau = kth_scores(q, v, nq, k, ties)
    # A full list proves nothing about the keys it lost unless its last bound is below tau.
    unresolved = (ln == cap) & ~(lv[:, cap - 1] < tau)
    rescreened = int(unresolved.sum())
    if rescreened:
        keep = ~unresolved[q]
        pieces = [(q[keep], n[keep], v[keep])]
        rows = unresolved.nonzero().flatten()
        for n0, kt in tiles(shards, tile):
            ub = upper_bounds(xf[rows], ax[rows], kt.float(), rel)
            r, c = (~(ub < tau[rows, None])).nonzero(as_tuple=True)
            q2, n2 = rows[r], c + n0
            pieces.append((q2, n2, exact(q2, n2)))
            scored += torch.bincount(q2, minlength=nq)
        q, n, v = (torch.cat(t) for t in zip(*pieces))
    if stats is not None:
        stats.update(rescored=scored, rescreened=rescreened)
    return ragged(*apply_rule(q, n, v, k, ties), nq, max_per_query)
