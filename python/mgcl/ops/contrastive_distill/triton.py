"""contrastive_distill, Triton kernels (the CUDA fast path; CPU under TRITON_INTERPRET=1).

Two kernels, each launched twice by the block primitives of ``fused.py``: once
over the rows of the block ``S = s*X@Y.T`` (M x N) and once over its columns,
which are the rows of ``S.T = s*Y@X.T`` (the same kernel with X and Y swapped).

``_stats_kernel`` (flash-attention forward without the output): a program owns
BM rows and a range of columns, walks it BN columns at a time and for each
tile computes S and T with ``tl.dot`` over K in BK steps (fp32 accumulators),
then updates per row, in fp32, the online log-sum-exp statistics

    m_s <- max(m_s, max_j S_ij)         l_s <- l_s exp(m_s_old - m_s) + sum_j exp(S_ij - m_s)
    m_t <- max(m_t, max_j T_ij)         l_t <- l_t exp(m_t_old - m_t) + sum_j exp(T_ij - m_t)
    k   <- k exp(m_t_old - m_t) + sum_j exp(T_ij - m_t) (T_ij - S_ij)

Columns past the range are -inf in S and T (so exp gives 0) and masked out of
k. The column range is split over a second grid axis when there are too few
row blocks to fill the GPU; the partial (m, l, k) of the splits are merged on
the host side (``merge_splits``).

``_grad_kernel`` (flash-attention backward for one operand): with the final
statistics known, a program owns BM rows and BD output features, recomputes
each S and T tile, forms in fp32

    G_ij = a_i exp(S_ij - lse_s_i) - g_i exp(T_ij - lse_t_i)
         + b_j exp(S_ij - cse_s_j) - e_j exp(T_ij - cse_t_j)

(the T tiles are skipped when g = e = 0, i.e. kd = 0) and accumulates
``U[rows, feats] += G @ Y[cols, feats]`` in fp32, G rounded to the input dtype
for the tensor cores. G is multiplied by GSCALE (a power of two near sqrt(N))
before the rounding so that fp16 keeps the typical entries (about 1/N) in its
normal range, and the sum is divided by it after. No B x B tensor exists:
memory is O((M + N) d) for the outputs.

Operand tiles are loaded through block pointers whose boundary checks zero-fill
the last partial rows, columns (past the split's end) and K steps of both
operands, so no size needs to be a multiple of a tile, and no per-element
pointer or mask tensors occupy registers. Work: 4 products of the B x B x d
size in the statistics, 6 in the gradients (20 B^2 d flops; the recompute-free
floor is 8 B^2 d, the least any method without a B x B buffer can do is 12 B^2 d).
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
import triton
import triton.language as tl

from ... import _backend

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRET = _backend.triton_interpreting()

# Block pointers keep per-element pointer and mask tensors out of registers and
# zero-fill partial tiles; Triton's replacement (TMA tensor descriptors) needs
# 16-byte aligned row strides, which features of odd dimension do not have.
warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated")

# The interpreter runs one small config (an interpreted tile costs milliseconds).
_INTERP = dict(BM=64, BN=64, BK=32, BD=32)


# GPU configs: checked to compile for sm_90 (wgmma) without register spills in
# bf16, except the BD = 512 one (a few hundred bytes), kept because it avoids
# recomputing S and T per output chunk at d = 512. The autotuner picks per shape.
def _stats_configs():
    if INTERPRET:
        return [triton.Config({"BM": _INTERP["BM"], "BN": _INTERP["BN"], "BK": _INTERP["BK"]}, num_warps=4)]
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": 64}, num_warps=w, num_stages=st)
        for bm, bn, w, st in [(64, 64, 8, 3), (64, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 4),
                              (128, 64, 8, 4)]
    ]


def _grad_configs():
    if INTERPRET:
        return [triton.Config(dict(_INTERP), num_warps=4)]
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": 64, "BD": bd}, num_warps=8, num_stages=3)
        for bm, bn, bd in [(64, 64, 128), (64, 64, 256), (64, 32, 256), (64, 64, 512), (64, 32, 128), (128, 64, 64),
                           (64, 64, 64)]
    ]


def _prune_grad_configs(configs, named_args, **kwargs):
    """Drop output chunks much wider than the feature dimension."""
    widest = max(64, triton.next_power_of_2(int(named_args["K"])))
    kept = [c for c in configs if c.kwargs["BD"] <= widest]
    return kept or [min(configs, key=lambda c: c.kwargs["BD"])]


@triton.jit
def _logits_tile(X, Y, sxm, sxk, sym, syk, row0, col0, M, col_end, K, scale,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """scale * X[row0:row0+BM] @ Y[col0:col0+BN].T as a [BM, BN] fp32 tile.

    Block pointers with boundary checks zero-fill rows >= M, columns >= col_end
    and k >= K (no per-element pointer or mask tensors held in registers)."""
    x_ptr = tl.make_block_ptr(X, shape=(M, K), strides=(sxm, sxk), offsets=(row0, 0), block_shape=(BM, BK),
                              order=(1, 0))
    y_ptr = tl.make_block_ptr(Y, shape=(K, col_end), strides=(syk, sym), offsets=(0, col0), block_shape=(BK, BN),
                              order=(0, 1))
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for _ in range(0, K, BK):
        x = tl.load(x_ptr, boundary_check=(0, 1), padding_option="zero")
        y = tl.load(y_ptr, boundary_check=(0, 1), padding_option="zero")
        acc = tl.dot(x, y, acc, input_precision=PREC)
        x_ptr = tl.advance(x_ptr, (0, BK))
        y_ptr = tl.advance(y_ptr, (BK, 0))
    return acc * scale


@triton.autotune(configs=_stats_configs(), key=["M", "N", "K", "KT"])
@triton.jit
def _stats_kernel(X, Y, XT, YT, SCALE_S, SCALE_T, OUT, DIAG, OFF, M, N, K, KT, cols_per_split,
                  sxm, sxk, sym, syk, stm, stk, sum_, suk, out_stat, out_split,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, PREC_T: tl.constexpr,
                  HAS_DIAG: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    s = tl.load(SCALE_S).to(tl.float32)
    t = tl.load(SCALE_T).to(tl.float32)
    m_s = tl.full([BM], float("-inf"), dtype=tl.float32)
    m_t = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_s = tl.zeros([BM], dtype=tl.float32)
    l_t = tl.zeros([BM], dtype=tl.float32)
    k_acc = tl.zeros([BM], dtype=tl.float32)
    d_acc = tl.zeros([BM], dtype=tl.float32)
    start = pid_s * cols_per_split
    end = tl.minimum(start + cols_per_split, N)
    for n0 in range(start, end, BN):
        cols = n0 + tl.arange(0, BN)
        valid = (cols < end)[None, :]
        S = _logits_tile(X, Y, sxm, sxk, sym, syk, pid_m * BM, n0, M, end, K, s, BM, BN, BK, PREC)
        T = _logits_tile(XT, YT, stm, stk, sum_, suk, pid_m * BM, n0, M, end, KT, t, BM, BN, BK, PREC_T)
        diff = T - S
        if HAS_DIAG:  # S[i, i + OFF] exactly (one entry plus zeros)
            d_acc += tl.sum(tl.where((cols[None, :] == rows[:, None] + OFF) & valid, S, 0.0), axis=1)
        S = tl.where(valid, S, float("-inf"))
        T = tl.where(valid, T, float("-inf"))
        new_s = tl.maximum(m_s, tl.max(S, axis=1))
        l_s = l_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(S - new_s[:, None]), axis=1)
        m_s = new_s
        new_t = tl.maximum(m_t, tl.max(T, axis=1))
        rescale = tl.exp(m_t - new_t)
        p = tl.exp(T - new_t[:, None])
        l_t = l_t * rescale + tl.sum(p, axis=1)
        k_acc = k_acc * rescale + tl.sum(tl.where(valid, p * diff, 0.0), axis=1)
        m_t = new_t
    base = OUT + pid_s * out_split + rows
    keep = rows < M
    tl.store(base, m_s, mask=keep)
    tl.store(base + out_stat, l_s, mask=keep)
    tl.store(base + 2 * out_stat, m_t, mask=keep)
    tl.store(base + 3 * out_stat, l_t, mask=keep)
    tl.store(base + 4 * out_stat, k_acc, mask=keep)
    if HAS_DIAG:
        tl.store(DIAG + pid_s * M + rows, d_acc, mask=keep)


@triton.autotune(configs=_grad_configs(), key=["M", "N", "K", "KT"],
                 prune_configs_by={"early_config_prune": _prune_grad_configs})
@triton.jit
def _grad_kernel(X, Y, XT, YT, SCALE_S, SCALE_T, ROW, COL, OUT, M, N, K, KT, cols_per_split, gscale,
                 sxm, sxk, sym, syk, stm, stk, sum_, suk, so_split, so_m,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
                 PREC_T: tl.constexpr, HAS_T: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    feats = pid_d * BD + tl.arange(0, BD)
    row_ok = rows < M
    s = tl.load(SCALE_S).to(tl.float32)
    t = tl.load(SCALE_T).to(tl.float32)
    # ROW / COL: 4 x M and 4 x N fp32 (lse_s, lse_t, a, g) and (cse_s, cse_t, b, e)
    r_ls = tl.load(ROW + rows, mask=row_ok, other=0.0)
    r_lt = tl.load(ROW + M + rows, mask=row_ok, other=0.0)
    r_a = tl.load(ROW + 2 * M + rows, mask=row_ok, other=0.0)
    r_g = tl.load(ROW + 3 * M + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    start = pid_s * cols_per_split
    end = tl.minimum(start + cols_per_split, N)
    for n0 in range(start, end, BN):
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < end
        S = _logits_tile(X, Y, sxm, sxk, sym, syk, pid_m * BM, n0, M, end, K, s, BM, BN, BK, PREC)
        c_ls = tl.load(COL + cols, mask=col_ok, other=0.0)
        c_b = tl.load(COL + 2 * N + cols, mask=col_ok, other=0.0)
        G = r_a[:, None] * tl.exp(S - r_ls[:, None]) + c_b[None, :] * tl.exp(S - c_ls[None, :])
        if HAS_T:
            T = _logits_tile(XT, YT, stm, stk, sum_, suk, pid_m * BM, n0, M, end, KT, t, BM, BN, BK, PREC_T)
            c_lt = tl.load(COL + N + cols, mask=col_ok, other=0.0)
            c_e = tl.load(COL + 3 * N + cols, mask=col_ok, other=0.0)
            G -= r_g[:, None] * tl.exp(T - r_lt[:, None]) + c_e[None, :] * tl.exp(T - c_lt[None, :])
        G = tl.where(row_ok[:, None] & col_ok[None, :], G * gscale, 0.0)
        y_ptr = tl.make_block_ptr(Y, shape=(end, K), strides=(sym, syk), offsets=(n0, pid_d * BD),
                                  block_shape=(BN, BD), order=(1, 0))
        y = tl.load(y_ptr, boundary_check=(0, 1), padding_option="zero")
        acc = tl.dot(G.to(y.dtype), y, acc, input_precision=PREC)
    acc = acc / gscale
    out = OUT + pid_s * so_split + rows[:, None] * so_m + feats[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & (feats[None, :] < K))


# ---- launchers ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split(rows: int, cols: int, device: torch.device, split: int | None) -> tuple[int, int]:
    """(number of column splits, columns per split): enough programs to fill the GPU."""
    align = _INTERP["BN"] if INTERPRET else 128
    if split is None:
        if device.type == "cuda":
            programs = triton.cdiv(rows, 64)
            split = max(1, min(16, (2 * _sm_count(device.index or 0)) // max(1, programs)))
        else:
            split = 1
    split = max(1, min(int(split), triton.cdiv(cols, align)))
    per = triton.cdiv(triton.cdiv(cols, split), align) * align
    return triton.cdiv(cols, per), per


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _scalar(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(1).to(torch.float32)


def merge_splits(part: torch.Tensor):
    """[5, SPLIT, M] raw (m_s, l_s, m_t, l_t, k) -> (lse_s, lse_t, e) of length M."""
    m_s, l_s, m_t, l_t, k = part.unbind(0)
    tot_s = m_s.max(dim=0).values
    tot_t = m_t.max(dim=0).values
    a_s = torch.exp(m_s - tot_s)
    a_t = torch.exp(m_t - tot_t)
    ls = (l_s * a_s).sum(dim=0)
    lt = (l_t * a_t).sum(dim=0)
    kk = (k * a_t).sum(dim=0)
    return tot_s + ls.log(), tot_t + lt.log(), kk / lt


def _check(X, Y, Xt, Yt):
    for name, x in (("student", X), ("teacher", Xt)):
        if x.dtype not in DTYPES:
            raise ValueError(f"contrastive_distill[triton]: {name} features have dtype {x.dtype}; "
                             "supported: float32, float16, bfloat16")
    if not INTERPRET and X.device.type != "cuda":
        raise ValueError("contrastive_distill[triton]: tensors must be on a CUDA device (or set TRITON_INTERPRET=1)")


def row_stats(X, Y, Xt, Yt, s, t, split: int | None = None, diag=None, off: int = 0):
    """(lse_s, lse_t, e) of each row of s*X@Y.T against t*Xt@Yt.T (float32).
    ``diag`` (length M) receives S[i, i + off] where that column exists, from
    the same tiles as the statistics; other entries are left as they are."""
    _check(X, Y, Xt, Yt)
    M, K = X.shape
    N, KT = Y.shape[0], Xt.shape[1]
    n_split, per = _split(M, N, X.device, split)
    out = torch.empty(5, n_split, M, dtype=torch.float32, device=X.device)
    dpart = torch.empty(n_split, M, dtype=torch.float32, device=X.device) if diag is not None else out
    grid = lambda meta: (triton.cdiv(M, meta["BM"]), n_split)  # noqa: E731
    _stats_kernel[grid](
        X, Y, Xt, Yt, _scalar(s), _scalar(t), out, dpart, int(off), M, N, K, KT, per,
        X.stride(0), X.stride(1), Y.stride(0), Y.stride(1), Xt.stride(0), Xt.stride(1), Yt.stride(0), Yt.stride(1),
        out.stride(0), out.stride(1), PREC=_prec(X.dtype), PREC_T=_prec(Xt.dtype), HAS_DIAG=diag is not None,
    )
    if diag is not None:
        i = torch.arange(M, device=X.device)
        has = (i + off >= 0) & (i + off < N)
        d = dpart[0] if n_split == 1 else dpart.sum(dim=0)  # one split holds the entry, the rest add 0
        diag.copy_(torch.where(has, d.to(diag.dtype), diag))
    return merge_splits(out)


def row_grads(X, Y, Xt, Yt, s, t, row, col, split: int | None = None, teacher: bool = True):
    """U = G @ Y (float32, [M, K]) for the rows of the block (module doc);
    ``teacher=False`` promises g = e = 0 and skips the T tiles."""
    _check(X, Y, Xt, Yt)
    M, K = X.shape
    N, KT = Y.shape[0], Xt.shape[1]
    n_split, per = _split(M, N, X.device, split)
    row_v = torch.stack([v.to(torch.float32) for v in row]).contiguous()
    col_v = torch.stack([v.to(torch.float32) for v in col]).contiguous()
    out = torch.empty(n_split, M, K, dtype=torch.float32, device=X.device)
    gscale = float(2.0 ** math.floor(math.log2(max(N, 1)) / 2))
    grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(K, meta["BD"]), n_split)  # noqa: E731
    _grad_kernel[grid](
        X, Y, Xt, Yt, _scalar(s), _scalar(t), row_v, col_v, out, M, N, K, KT, per, gscale,
        X.stride(0), X.stride(1), Y.stride(0), Y.stride(1), Xt.stride(0), Xt.stride(1), Yt.stride(0), Yt.stride(1),
        out.stride(0), out.stride(1), PREC=_prec(X.dtype), PREC_T=_prec(Xt.dtype), HAS_T=teacher,
    )
    return out[0] if n_split == 1 else out.sum(dim=0)


def block_stats(X, Y, Xt, Yt, s, t, split: int | None = None, diag=None, off: int = 0):
    """Row and column statistics of the block: two launches (rows of S, rows of S.T).
    ``diag = (row_out, col_out)``: S[i, i + off] as each launch computed it."""
    rd, cd = (None, None) if diag is None else diag
    return row_stats(X, Y, Xt, Yt, s, t, split, rd, off), row_stats(Y, X, Yt, Xt, s, t, split, cd, -off)


def block_grads(X, Y, Xt, Yt, s, t, row, col, split: int | None = None, teacher: bool = True):
    """``U = G @ Y`` and ``V = G.T @ X``: two launches (rows of G, rows of G.T)."""
    return (row_grads(X, Y, Xt, Yt, s, t, row, col, split, teacher),
            row_grads(Y, X, Yt, Xt, s, t, col, row, split, teacher))
