"""similarity_topk, Triton kernels: the screen and the threshold filter fused
into the GEMM (the GPU path; CPU tensors only under TRITON_INTERPRET=1).

No Q x N matrix of scores or bounds exists anywhere: the bounds live in
on-chip tiles and each kernel writes only what survives its reduction.

1. ``_screen_kernel``, per (key block, query block) tile: the float32 GEMM
   tile and the bound ``ub`` (below), reduced per query row to the largest
   bound of the BN keys and its key index: [Q, n_blocks] out.
2. The driver keeps per query the ``k + slack`` largest of those block
   maxima, scores them exactly and takes their k-th largest score (distinct
   when ties): tau_lb.
3. ``_filter_kernel`` recomputes the same bounds and appends every pair with
   ``ub >= tau_lb[q]`` to a compacted candidate list (an atomic counter per
   program, an in-tile prefix sum for the slots).
4. The candidates are scored exactly; ``streaming.apply_rule`` and
   ``streaming.ragged`` give the answer.

dtypes: two 16-bit operands of one dtype go to the tensor cores as they are
(the products are exact in fp32, fp32 accumulators); float32 operands, or
operands of two dtypes (both converted to float32, exactly), use IEEE fp32
dots unless torch allows TF32 for float32 matmuls, and the bound then counts
the inputs' rounding.

Launch rules: a device guard makes the tensors' GPU current; the screen is
autotuned keyed by power-of-two buckets of Q and of the launch's key count
(plus d, the precision and the operand dtypes); ``MGCL_TRITON_ONE_CONFIG=1``
keeps the first GPU config, and the interpreter runs one small config. The
filter is not autotuned: it has side effects (the counter), which the
autotuner's repeated trial runs would count more than once.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from ... import _backend
from . import native, streaming

INTERPRET = _backend.triton_interpreting()
ONE_CONFIG = _backend.triton_one_config()

# Keys per launch: the screen's output of one launch is [Q, rows / BN], so
# rows shrink as Q grows (about 2^26 tile elements per launch, as the cuda
# backend's tiles); host-resident keys are copied to the device a launch at a
# time, twice (the screen, then the filter).
LAUNCH_ELEMS = 1 << 26
LAUNCH_MIN = 4096
LAUNCH_MAX = 1 << 20

# Queries per pass: the grid's second axis (query blocks) stops at 65535 on
# CUDA; larger calls run in passes whose ragged results are concatenated.
MAX_QUERIES = 1 << 20

# The interpreter runs one small config (an interpreted tile costs ~20 ms whatever
# its size, so tiles big enough for few programs, small enough for several blocks).
_INTERP = dict(BM=32, BN=64, BK=64)

# GPU configs of the screen: (tiles, warps, stages), one list for 16-bit dot
# operands and one for float32; the first of each is the default
# (MGCL_TRITON_ONE_CONFIG=1) and the filter's tile.
_SCREEN_16 = [(dict(BM=64, BN=64, BK=64), 4, 3), (dict(BM=128, BN=64, BK=64), 8, 3),
              (dict(BM=64, BN=128, BK=64), 8, 3), (dict(BM=128, BN=128, BK=32), 8, 3)]
_SCREEN_32 = [(dict(BM=64, BN=64, BK=32), 4, 2), (dict(BM=32, BN=64, BK=32), 4, 2),
              (dict(BM=64, BN=32, BK=32), 4, 2)]


def _configs():
    if INTERPRET:
        return [triton.Config(dict(_INTERP), num_warps=4)]
    out = []
    for width, entries in ((2, _SCREEN_16), (4, _SCREEN_32)):
        for kw, warps, stages in entries[:1] if ONE_CONFIG else entries:
            c = triton.Config(dict(kw), num_warps=warps, num_stages=stages)
            c.operand_bytes = width
            out.append(c)
    return out


def _operand_bytes(x_dtype: torch.dtype, k_dtype: torch.dtype) -> int:
    """Bytes of the dot's operands: 2 for two 16-bit operands of one dtype, else 4 (float32)."""
    return 2 if x_dtype == k_dtype and x_dtype != torch.float32 else 4


def _prune_configs(configs, named_args, **kwargs):
    width = _operand_bytes(named_args["X"].dtype, named_args["K"].dtype)
    return [c for c in configs if getattr(c, "operand_bytes", width) == width] or configs


def _min_bn() -> int:
    """The narrowest key tile among the screen's configs: sizes its output."""
    return min(c.kwargs["BN"] for c in _configs())


def _filter_tile(width: int) -> tuple[dict, int]:
    if INTERPRET:
        return dict(_INTERP), 4
    kw, warps, _ = (_SCREEN_16 if width == 2 else _SCREEN_32)[0]
    return dict(kw), warps


# The bound, and why the candidates hold the answer.
#
# For a query row x and a key row k, the tile computes g = fl(x . k), a float32
# GEMM of depth d, and
#
#     ub = (g + a_x t_k) + 2^-126,   a_x = A_x (rel + ETA),  NaN -> +inf
#
# with A_x >= ||x||, t_k = T_k >= ||k|| (streaming.norm_bound). |g - x.k| <=
# rel ||x|| ||k|| (``dot_rel``: exact or TF32-rounded inputs, each product and
# sum rounded faithfully, as tensor cores may truncate), the exact score s is
# within 2^-23 ||x|| ||k|| (+ underflow) of x.k, and ETA covers that and the
# float32 rounding of ub itself (streaming's derivation, the same formula): so
# s <= ub for every pair, and a NaN s (a NaN row) has ub = +inf.
#
# tau = the true threshold (the k'-th largest distinct non-NaN exact score of
# the query when ties, its k-th largest with repeats when not). The driver's
# tau_lb is the same order statistic over a subset of the query's pairs (the
# best block maxima), so tau_lb <= tau, or -inf when the subset is too small.
# Every pair of the answer has s >= tau, hence ub >= s >= tau >= tau_lb: the
# filter's candidates {ub >= tau_lb} hold the answer, and the rule over their
# exact scores gives it (streaming's "why a candidate set suffices").
@triton.jit
def _bound_tile(X, K, AX, TK, Q, N, D, sxm, sxk, skn, skk, abs_term, row0, col0,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, CAST: tl.constexpr):
    """The [BM, BN] tile of bounds of queries row0.. with keys col0.. (zero-filled outside)."""
    rows = row0 + tl.arange(0, BM)
    cols = col0 + tl.arange(0, BN)
    row_ok = rows < Q
    col_ok = cols < N
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < D
        x = tl.load(X + rows[:, None] * sxm + ks[None, :] * sxk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(K + ks[:, None] * skk + cols[None, :] * skn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if CAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, y, acc, input_precision=PREC)
    a = tl.load(AX + rows, mask=row_ok, other=0.0)
    t = tl.load(TK + cols, mask=col_ok, other=0.0)
    ub = acc + a[:, None] * t[None, :]
    ub = ub + abs_term
    ub = tl.where(ub != ub, float("inf"), ub)
    return ub, rows, cols, row_ok, col_ok


# _screen_kernel: program (j, i) owns keys j*BN.. of the launch and queries
# i*BM..; it writes, per query row, the largest bound over its BN keys and that
# key's global index to column j of BEST_V / BEST_I (keys outside the launch
# count as -inf; a row of -inf is left for the driver to drop). The output is
# sized for the narrowest BN and prefilled with -inf; the autotuner restores
# it after each trial, so a wider config's run leaves no stale columns of a
# narrower trial (they would repeat pairs, and a repeated pair could lift the
# k-th largest of ties=False above the true threshold).
@triton.autotune(configs=_configs(), key=["QB", "NB", "D", "PREC", "CAST"], restore_value=["BEST_V", "BEST_I"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit(do_not_specialize=["Q", "N", "n0", "QB", "NB"])
def _screen_kernel(X, K, AX, TK, BEST_V, BEST_I, Q, N, D, n0, QB, NB, sxm, sxk, skn, skk, sbq, abs_term,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, CAST: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    ub, rows, cols, row_ok, col_ok = _bound_tile(X, K, AX, TK, Q, N, D, sxm, sxk, skn, skk, abs_term,
                                                 pid_m * BM, pid_n * BN, BM, BN, BK, PREC, CAST)
    ub = tl.where(col_ok[None, :], ub, float("-inf"))
    best = tl.max(ub, axis=1)
    arg = tl.argmax(ub, axis=1)
    at = BEST_V + rows.to(tl.int64) * sbq + pid_n
    tl.store(at, best, mask=row_ok)
    tl.store(BEST_I + rows.to(tl.int64) * sbq + pid_n, (pid_n * BN + arg).to(tl.int64) + n0, mask=row_ok)


# _filter_kernel: the same tile's bounds; the pairs with ub >= TAU[q] get
# consecutive slots: the program reserves its count with one atomic add on
# COUNT (which returns the slots before it) and numbers its pairs by an
# inclusive prefix sum over the flattened tile. Slots >= cap are not written
# but still counted, so COUNT ends as the number of candidates either way.
@triton.jit(do_not_specialize=["Q", "N", "n0", "cap"])
def _filter_kernel(X, K, AX, TK, TAU, OUT_Q, OUT_N, COUNT, cap, Q, N, D, n0, sxm, sxk, skn, skk, abs_term,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, CAST: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    ub, rows, cols, row_ok, col_ok = _bound_tile(X, K, AX, TK, Q, N, D, sxm, sxk, skn, skk, abs_term,
                                                 pid_m * BM, pid_n * BN, BM, BN, BK, PREC, CAST)
    tau = tl.load(TAU + rows, mask=row_ok, other=float("inf"))
    keep = (ub >= tau[:, None]) & row_ok[:, None] & col_ok[None, :]
    flat = tl.reshape(keep.to(tl.int32), [BM * BN])
    total = tl.sum(flat, axis=0)
    if total > 0:
        base = tl.atomic_add(COUNT, total.to(tl.int64), sem="relaxed")
        slot = base + tl.cumsum(flat, axis=0).to(tl.int64) - 1
        ok = (flat > 0) & (slot < cap)
        q = tl.reshape(tl.broadcast_to(rows[:, None], [BM, BN]), [BM * BN])
        n = tl.reshape(tl.broadcast_to(cols[None, :], [BM, BN]), [BM * BN])
        tl.store(OUT_Q + slot, q.to(tl.int64), mask=ok)
        tl.store(OUT_N + slot, n.to(tl.int64) + n0, mask=ok)


# ---- the driver ----------------------------------------------------------------------------

def dot_prec(x_dtype: torch.dtype, k_dtype: torch.dtype, device_type: str) -> str:
    """The dot's input precision: for float32 operands "tf32" when torch allows
    reduced-precision float32 matmuls on CUDA, else "ieee"; 16-bit operands
    take the tensor cores regardless (their products are exact in fp32)."""
    if _operand_bytes(x_dtype, k_dtype) == 2:
        return "tf32"
    return "tf32" if device_type == "cuda" and streaming.reduced_fp32_matmul("cuda") else "ieee"


def dot_rel(d: int, rounded_inputs: bool) -> float:
    """r with |g - x.k| <= r ||x|| ||k|| for the tiles' dot of depth d: inputs
    rounded by u_in (2^-8 covers TF32's 2^-11 when ``rounded_inputs``; 0 for
    IEEE float32 and for 16-bit operands), d products and sums each rounded
    faithfully (u = 2^-23, which also covers truncating tensor-core
    accumulation), in any order: (1 + u_in)^2 (1 + gamma_(d+2)) - 1,
    gamma_m = m u / (1 - m u), rounded up."""
    u = 2.0 ** -23
    u_in = 2.0 ** -8 if rounded_inputs else 0.0
    m = d + 2
    gamma = m * u / (1 - m * u)
    return math.nextafter((1 + u_in) ** 2 * (1 + gamma) - 1, math.inf) * (1 + 2.0 ** -40)


def launch_rows(nq: int) -> int:
    rows = LAUNCH_ELEMS // max(nq, 1)
    return max(LAUNCH_MIN, min(LAUNCH_MAX, rows)) // 256 * 256


def initial_capacity(nq: int, k: int) -> int:
    """Slots of the filter's first candidate buffer: a few times the answer's
    likely size; more are allocated (and the filter rerun) when it overflows."""
    return max(1 << 12, 4 * nq * (k + native.slack(k)))


def _on(device: torch.device):
    """Make the tensors' GPU current for the launch (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check(queries: torch.Tensor):
    if not INTERPRET and queries.device.type != "cuda":
        raise ValueError("similarity_topk[triton]: queries must be on a CUDA device (or set TRITON_INTERPRET=1)")


class _Problem:
    """The queries' side of a call, prepared once: rows, a_x, precision, rel."""

    def __init__(self, queries: torch.Tensor, key_dtype: torch.dtype):
        self.x = queries
        self.nq, self.d = queries.shape
        self.prec = dot_prec(queries.dtype, key_dtype, queries.device.type)
        self.cast = queries.dtype != key_dtype
        rel = dot_rel(self.d, self.prec == "tf32" and _operand_bytes(queries.dtype, key_dtype) == 4)
        self.ax = (streaming.norm_bound(queries.float()) * (rel + streaming.ETA)).contiguous()

    def args(self, kb: torch.Tensor, tk: torch.Tensor):
        return (self.x, kb, self.ax, tk)

    def strides(self, kb: torch.Tensor):
        return (self.x.stride(0), self.x.stride(1), kb.stride(0), kb.stride(1))


def screen(p: _Problem, kb: torch.Tensor, tk: torch.Tensor, n0: int):
    """Kernel A on one launch of keys ``kb`` [n, d] (global rows n0..):
    (best bound, its global key index), each [Q, ceil(n / BN_min)]: per query
    the largest bound of each key block (-inf where a block is absent)."""
    n = kb.shape[0]
    cols = triton.cdiv(n, _min_bn())
    best_v = torch.full((p.nq, cols), -math.inf, dtype=torch.float32, device=p.x.device)
    best_i = torch.zeros((p.nq, cols), dtype=torch.int64, device=p.x.device)
    if p.nq and n:
        grid = lambda meta: (triton.cdiv(n, meta["BN"]), triton.cdiv(p.nq, meta["BM"]))  # noqa: E731
        with _on(p.x.device):
            _screen_kernel[grid](*p.args(kb, tk), best_v, best_i, p.nq, n, p.d, int(n0),
                                 triton.next_power_of_2(p.nq), triton.next_power_of_2(n), *p.strides(kb), cols,
                                 streaming.ABS, PREC=p.prec, CAST=p.cast)
    return best_v, best_i


def _filter(p: _Problem, blocks, tau, cap: int):
    """Kernel B over every launch: (query idx, key idx) buffers of ``cap`` slots and the candidate count."""
    dev = p.x.device
    out_q = torch.empty(cap, dtype=torch.int64, device=dev)
    out_n = torch.empty(cap, dtype=torch.int64, device=dev)
    count = torch.zeros(1, dtype=torch.int64, device=dev)
    kw, warps = _filter_tile(_operand_bytes(p.x.dtype, blocks[0][1].dtype) if blocks else 4)
    for n0, kb, tk in blocks:
        kb = kb.to(dev)
        n = kb.shape[0]
        grid = (triton.cdiv(n, kw["BN"]), triton.cdiv(p.nq, kw["BM"]))
        with _on(dev):
            _filter_kernel[grid](*p.args(kb, tk), tau, out_q, out_n, count, cap, p.nq, n, p.d, int(n0),
                                 *p.strides(kb), streaming.ABS, PREC=p.prec, CAST=p.cast, num_warps=warps, **kw)
    return out_q, out_n, count


def _exact(queries, shards, q, n, pair_scores):
    """Exact scores of the pairs (q[i], n[i]), in chunks (gathered rows take O(chunk d))."""
    out = torch.empty(q.shape[0], dtype=torch.float32, device=queries.device)
    for a in range(0, q.shape[0], streaming.EXACT_CHUNK):
        b = a + streaming.EXACT_CHUNK
        out[a:b] = pair_scores(queries[q[a:b]], streaming.gather_rows(shards, n[a:b], queries.device))
    return out


def _concat(parts):
    """One ragged result from those of consecutive query ranges."""
    ends = torch.stack([p[2][-1] for p in parts]).cumsum(0)
    offsets = [parts[0][2]] + [p[2][1:] + e for p, e in zip(parts[1:], ends[:-1])]
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), torch.cat(offsets),
            torch.cat([p[3] for p in parts]))


def similarity_topk_triton(queries, shards, k, ties, max_per_query, *, pair_scores, stats=None):
    """The exact result (values, indices, offsets, truncated) through the two
    kernels (see the module doc). ``pair_scores`` (x, k) -> float32 exact
    scores on the queries' device: the pair-score backend the caller chose."""
    _check(queries)
    dev = queries.device
    nq = queries.shape[0]
    if nq > MAX_QUERIES:
        parts = [similarity_topk_triton(queries[a:a + MAX_QUERIES], shards, k, ties, max_per_query,
                                        pair_scores=pair_scores) for a in range(0, nq, MAX_QUERIES)]
        return _concat(parts)
    total = sum(s.shape[0] for s in shards)
    empty = torch.empty(0, dtype=torch.int64, device=dev)
    if nq == 0 or total == 0:
        return streaming.ragged(empty, empty, empty.float(), nq, max_per_query)
    p = _Problem(queries, shards[0].dtype)

    # 1-2: the screen, folded launch by launch into each query's `cap` best block maxima
    cap = k + native.slack(k)
    lv = torch.full((nq, 0), -math.inf, dtype=torch.float32, device=dev)
    li = torch.zeros((nq, 0), dtype=torch.int64, device=dev)
    blocks = []
    for n0, kb in streaming.key_blocks(shards, launch_rows(nq)):
        kd = kb.to(dev)
        tk = streaming.norm_bound(kd).contiguous()
        blocks.append((n0, kb, tk))
        bv, bi = screen(p, kd, tk, n0)
        v, i = torch.cat([lv, bv], 1), torch.cat([li, bi], 1)
        top = torch.topk(v, min(cap, v.shape[1]), dim=1, sorted=False).indices
        lv, li = v.gather(1, top), i.gather(1, top)
    q0, pos = (lv > -math.inf).nonzero(as_tuple=True)
    n_a = li[q0, pos]
    tau = streaming.kth_scores(q0, _exact(queries, shards, q0, n_a, pair_scores), nq, k, ties).contiguous()

    # 3: the filter. The candidate count decides the buffer's size, so it is
    # read on the host once (and once more only after an overflow, rerun with
    # exactly the counted room). The kernels themselves never wait for the
    # host; the compactions around them (the screen's listed pairs, the rule,
    # the ragged result) are data-dependent sizes, as in the other backends.
    room = initial_capacity(nq, k)
    reruns = 0
    while True:
        out_q, out_n, count = _filter(p, blocks, tau, room)
        m = int(count.item())
        if m <= room:
            break
        room, reruns = m, reruns + 1
    q, n = out_q[:m], out_n[:m]

    # 4: exact scores of the candidates, the rule, the ragged result
    v = _exact(queries, shards, q, n, pair_scores)
    if stats is not None:
        stats.update(screened=int(q0.numel()), candidates=m, capacity=room, reruns=reruns,
                     rescored=torch.bincount(q, minlength=nq) + torch.bincount(q0, minlength=nq))
    return streaming.ragged(*streaming.apply_rule(q, n, v, k, ties), nq, max_per_query)
