"""contrastive_distill, Triton kernels (the CUDA fast path; CPU under TRITON_INTERPRET=1).

The two block primitives of ``fused.py`` for the block ``S = s*X@Y.T`` (M x N)
and its teacher block ``T = t*Xt@Yt.T``, one kernel launch each:

- ``_stats_kernel``: the row statistics and the column partials in one sweep
  (S and T computed once per tile: 2 products of M x N x d);
- ``_grad_kernel``: S and T recomputed once per tile, and from that one tile
  both gradient products ``U = G @ Y`` and ``V = G.T @ X`` (4 products).

Work: 6 products of M x N x d in all (12 M N d flops) where the row/column
launch pairs of the first version did 10. Memory: O((M + N) d) for the outputs
plus O(programs x N) for the column partials; nothing M x N exists.

dtypes: 16-bit features go to the tensor cores as they are (fp32 accumulators);
float32 features use IEEE fp32 dots unless torch's float32 matmul precision
allows TF32 (``torch.backends.cuda.matmul.fp32_precision = "tf32"`` or
``torch.set_float32_matmul_precision("high")``), the same switch that decides
whether the reference's cuBLAS products use TF32.

Launch rules: a device guard makes the tensors' GPU current (so cuda:1 works),
no host synchronisation happens (the gradient scale below is computed on the
device), and the autotuner is keyed by power-of-two buckets of M and N (plus
the exact feature dims, the dtypes and the kernel variant), so a new batch size
reuses its bucket's tuning. ``MGCL_TRITON_AUTOTUNE=0`` runs only the first GPU config of each
feature width (tests, one-shot GPU checks); the interpreter always runs one
small config.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
import triton
import triton.language as tl

from ... import _backend
from .fused import merge_stats

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRET = _backend.triton_interpreting()
ONE_CONFIG = os.environ.get("MGCL_TRITON_AUTOTUNE", "1").strip() in ("0", "off", "false")

# Block pointers keep per-element pointer and mask tensors out of registers and
# zero-fill partial tiles; Triton's replacement (TMA tensor descriptors) needs
# 16-byte aligned row strides, which features of odd dimension do not have.
warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated")

# The interpreter runs one small config (an interpreted tile costs milliseconds).
_INTERP = dict(BM=64, BN=64, BK=32, BD=32, BDV=32)

# |G| * GSCALE stays below this (fp16 overflows at 65504; see _grad_kernel).
G_CEILING = 2.0**14


# GPU configs: (tile sizes, warps, stages), one list for 16-bit features and one
# for float32 (fp32 operand tiles take twice the registers); the first of each
# list is the default (MGCL_TRITON_AUTOTUNE=0). Checked with ptxas -v for sm_90:
# the 16-bit ones and the float32 ones with TF32 dots compile without register
# spills, except BD = 512 (a hundred bytes), kept because at d = 512 it skips
# the S and T recompute of a second feature chunk (6 products instead of 8).
# IEEE float32 dots spill some hundred bytes in every tile tried.
_STATS_16 = [(dict(BM=64, BN=64, BK=64), 8, 3), (dict(BM=64, BN=64, BK=64), 8, 2), (dict(BM=64, BN=64, BK=32), 8, 3),
             (dict(BM=64, BN=32, BK=64), 8, 3), (dict(BM=128, BN=32, BK=32), 8, 2)]
_STATS_32 = [(dict(BM=64, BN=32, BK=64), 8, 3), (dict(BM=64, BN=64, BK=32), 8, 3), (dict(BM=128, BN=32, BK=32), 8, 2)]
_GRAD_16 = [(dict(BM=64, BN=32, BK=64, BD=256, BDV=64), 8, 3), (dict(BM=64, BN=64, BK=64, BD=512, BDV=64), 8, 2),
            (dict(BM=64, BN=64, BK=64, BD=256, BDV=64), 8, 2), (dict(BM=64, BN=64, BK=64, BD=128, BDV=64), 8, 3),
            (dict(BM=64, BN=32, BK=64, BD=128, BDV=64), 8, 3), (dict(BM=128, BN=32, BK=64, BD=128, BDV=64), 8, 2)]
_GRAD_32 = [(dict(BM=64, BN=32, BK=32, BD=64, BDV=32), 8, 2), (dict(BM=64, BN=32, BK=32, BD=64, BDV=32), 4, 2),
            (dict(BM=32, BN=32, BK=32, BD=64, BDV=32), 4, 2), (dict(BM=64, BN=32, BK=32, BD=32, BDV=32), 4, 2)]


def _configs(lists, interp: dict):
    """The autotuner's configs: every list (the first of each under ONE_CONFIG), each
    config tagged with the feature width it is for; the interpreter gets one."""
    if INTERPRET:
        return [triton.Config(interp, num_warps=4)]
    out = []
    for width, entries in lists:
        for kw, warps, stages in entries[:1] if ONE_CONFIG else entries:
            c = triton.Config(dict(kw), num_warps=warps, num_stages=stages)
            c.feature_bytes = width
            out.append(c)
    return out


def _stats_configs():
    return _configs(((2, _STATS_16), (4, _STATS_32)), {k: _INTERP[k] for k in ("BM", "BN", "BK")})


def _grad_configs():
    return _configs(((2, _GRAD_16), (4, _GRAD_32)), dict(_INTERP))


def _prune_configs(configs, named_args, **kwargs):
    """The configs for the features' width, and no output chunk much wider than d."""
    width = named_args["X"].element_size()
    kept = [c for c in configs if getattr(c, "feature_bytes", width) == width]
    widest = max(64, triton.next_power_of_2(int(named_args["K"])))
    narrow = [c for c in kept if c.kwargs.get("BD", 0) <= widest]
    return narrow or [min(kept or configs, key=lambda c: c.kwargs.get("BD", 0))]


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


@triton.jit
def _logaddexp(a, b):
    """log(exp(a) + exp(b)) for b finite (a may be -inf: the result is b exactly)."""
    m = tl.maximum(a, b)
    return m + tl.log(tl.exp(a - m) + tl.exp(b - m))


# _stats_kernel: rows and columns in one sweep.
#
# Grid (row groups, column splits). Program (g, c) takes the row blocks g,
# g + G, g + 2G, ... (BM rows each) and, for each, walks the columns of split c
# BN at a time. Per tile it computes S and T (fp32 accumulators) once and uses
# them twice:
#
# rows (complete over the split; online log-sum-exp in registers):
#     m_s <- max(m_s, max_j S_ij)     l_s <- l_s exp(m_s_old - m_s) + sum_j exp(S_ij - m_s)
#     m_t, l_t likewise for T;        k <- k exp(m_t_old - m_t) + sum_j exp(T_ij - m_t) (T_ij - S_ij)
#     stored per split as (lse_s, lse_t, e) = (m_s + log l_s, m_t + log l_t, k / l_t);
#
# columns (over this tile's BM rows, then merged into the group's running
# statistics in COLP[g, :, cols], which only this program touches):
#     lse_s_j = c_j + log sum_i exp(S_ij - c_j),  c_j = max_i S_ij   (lse_t_j likewise)
#     e_j     = sum_i exp(T_ij - ct_j) (T_ij - S_ij) / sum_i exp(T_ij - ct_j)
#     merge:  lse <- logaddexp(lse_old, lse_tile)
#             e   <- e_old exp(lse_t_old - lse_t) + e_tile exp(lse_t_tile - lse_t)
#     (COLP starts at (-inf, -inf, 0), so the first merge gives the tile's values exactly).
#
# The splits' row statistics and the groups' column statistics are merged by
# fused.merge_stats (the same weighted log-sum-exp). Columns outside the block
# are -inf in the row statistics and rows outside it in the column statistics
# (exp gives 0; their T - S is 0, the operands being zero-filled), so no lane
# computes inf - inf; what the other side computes there is not stored. With HAS_DIAG the
# positive-pair logit S[i, i + OFF] is written, from the same tile value the
# statistics used, to DROW[i] and DCOL[i + OFF]: one entry among zeros summed,
# so exactly that value (B = 1 then gives lse - S_ii = 0 exactly).
@triton.autotune(configs=_stats_configs(), key=["MB", "NB", "K", "KT", "PREC", "PREC_T"], restore_value=["COLP"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit(do_not_specialize=["OFF", "M", "N", "MB", "NB", "cols_per_split", "n_groups"])
def _stats_kernel(X, Y, XT, YT, SCALE_S, SCALE_T, ROWP, COLP, DROW, DCOL, OFF, M, N, K, KT, MB, NB,
                  cols_per_split, n_groups, sxm, sxk, sym, syk, stm, stk, sum_, suk,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, PREC_T: tl.constexpr,
                  HAS_DIAG: tl.constexpr):
    pid_g = tl.program_id(0)
    pid_s = tl.program_id(1)
    s = tl.load(SCALE_S).to(tl.float32)
    t = tl.load(SCALE_T).to(tl.float32)
    start = pid_s * cols_per_split
    end = tl.minimum(start + cols_per_split, N)
    colp = COLP + pid_g * 3 * N
    for rb in range(pid_g, tl.cdiv(M, BM), n_groups):
        row0 = rb * BM
        rows = row0 + tl.arange(0, BM)
        row_ok = rows < M
        m_s = tl.full([BM], float("-inf"), dtype=tl.float32)
        m_t = tl.full([BM], float("-inf"), dtype=tl.float32)
        l_s = tl.zeros([BM], dtype=tl.float32)
        l_t = tl.zeros([BM], dtype=tl.float32)
        k_acc = tl.zeros([BM], dtype=tl.float32)
        d_acc = tl.zeros([BM], dtype=tl.float32)
        for n0 in range(start, end, BN):
            cols = n0 + tl.arange(0, BN)
            col_ok = cols < end
            S = _logits_tile(X, Y, sxm, sxk, sym, syk, row0, n0, M, end, K, s, BM, BN, BK, PREC)
            T = _logits_tile(XT, YT, stm, stk, sum_, suk, row0, n0, M, end, KT, t, BM, BN, BK, PREC_T)
            diff = T - S
            if HAS_DIAG:
                hit = (cols[None, :] == rows[:, None] + OFF) & row_ok[:, None] & col_ok[None, :]
                S_hit = tl.where(hit, S, 0.0)
                d_acc += tl.sum(S_hit, axis=1)
                tl.store(DCOL + cols, tl.sum(S_hit, axis=0), mask=tl.max(hit.to(tl.int32), axis=0) > 0)
            # rows: columns outside the block are -inf (exp gives 0; diff is 0 there, zero-filled)
            S_r = tl.where(col_ok[None, :], S, float("-inf"))
            T_r = tl.where(col_ok[None, :], T, float("-inf"))
            new_s = tl.maximum(m_s, tl.max(S_r, axis=1))
            l_s = l_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(S_r - new_s[:, None]), axis=1)
            m_s = new_s
            new_t = tl.maximum(m_t, tl.max(T_r, axis=1))
            rescale = tl.exp(m_t - new_t)
            p = tl.exp(T_r - new_t[:, None])
            l_t = l_t * rescale + tl.sum(p, axis=1)
            k_acc = k_acc * rescale + tl.sum(p * diff, axis=1)
            m_t = new_t
            # columns of this tile (rows outside the block -inf), merged into the group's statistics
            S_c = tl.where(row_ok[:, None], S, float("-inf"))
            T_c = tl.where(row_ok[:, None], T, float("-inf"))
            c_s = tl.max(S_c, axis=0)
            c_t = tl.max(T_c, axis=0)
            pc = tl.exp(T_c - c_t[None, :])
            lc_t = tl.sum(pc, axis=0)
            tile_s = c_s + tl.log(tl.sum(tl.exp(S_c - c_s[None, :]), axis=0))
            tile_t = c_t + tl.log(lc_t)
            tile_e = tl.sum(pc * diff, axis=0) / lc_t
            old_s = tl.load(colp + cols, mask=col_ok, other=0.0)
            old_t = tl.load(colp + N + cols, mask=col_ok, other=0.0)
            old_e = tl.load(colp + 2 * N + cols, mask=col_ok, other=0.0)
            lse_t = _logaddexp(old_t, tile_t)
            tl.store(colp + cols, _logaddexp(old_s, tile_s), mask=col_ok)
            tl.store(colp + N + cols, lse_t, mask=col_ok)
            tl.store(colp + 2 * N + cols, old_e * tl.exp(old_t - lse_t) + tile_e * tl.exp(tile_t - lse_t),
                     mask=col_ok)
        rowp = ROWP + pid_s * 3 * M + rows
        tl.store(rowp, m_s + tl.log(l_s), mask=row_ok)
        tl.store(rowp + M, m_t + tl.log(l_t), mask=row_ok)
        tl.store(rowp + 2 * M, k_acc / l_t, mask=row_ok)
        if HAS_DIAG:
            tl.store(DROW + rows, d_acc, mask=row_ok & (rows + OFF >= start) & (rows + OFF < end))


# _grad_kernel: both gradient products from one recomputed tile.
#
# With the final statistics (ROW = lse_s, lse_t, a, g per row; COL = cse_s,
# cse_t, b, e per column) a program owns BM rows, the output features
# f0..f0+BD and the columns of one split. Per BN-column tile it recomputes S
# and T, forms in fp32
#
#     G_ij = a_i exp(S_ij - lse_s_i) - g_i exp(T_ij - lse_t_i)
#          + b_j exp(S_ij - cse_s_j) - e_j exp(T_ij - cse_t_j)
#
# (the T tile is skipped when g = e = 0, i.e. kd = 0) and, from that one tile,
#
#     U[rows, f] += G @ Y[cols, f]      in registers over the whole sweep
#     V[cols, f] += G.T @ X[rows, f]    atomically added to V (fp32), BDV features at a time
#
# (WITH_V=False: only U; the launcher then runs the transposed block for V,
# which is deterministic; used under torch.use_deterministic_algorithms.)
#
# G goes to the tensor cores in the input dtype. Its entries are bounded,
# |G_ij| <= max_i(|a_i| + |g_i|) + max_j(|b_j| + |e_j|) =: bound (softmaxes lie in
# [0, 1]), while typical entries are about bound / N. G is multiplied by
# GSCALE = 2^floor(log2(2^14 / bound)) before the rounding and the products
# divided by it after: a power of two (exact in fp32), fp16 can never overflow
# (|G| GSCALE <= 2^14 < 65504, whatever the weights), and the typical entries
# sit far above fp16's subnormal range. GSCALE is computed on the device (no
# host sync). With d > BD the feature chunks each recompute S and T.
@triton.autotune(configs=_grad_configs(), key=["MB", "NB", "K", "KT", "PREC", "PREC_T", "HAS_T", "WITH_V"],
                 reset_to_zero=["V"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit(do_not_specialize=["M", "N", "MB", "NB", "cols_per_split"])
def _grad_kernel(X, Y, XT, YT, SCALE_S, SCALE_T, GSCALE, ROW, COL, U, V, M, N, K, KT, MB, NB, cols_per_split,
                 sxm, sxk, sym, syk, stm, stk, sum_, suk, su_split, su_m, sv_n,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                 PREC: tl.constexpr, PREC_T: tl.constexpr, HAS_T: tl.constexpr, WITH_V: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    row0 = pid_m * BM
    f0 = pid_d * BD
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < M
    s = tl.load(SCALE_S).to(tl.float32)
    t = tl.load(SCALE_T).to(tl.float32)
    gs = tl.load(GSCALE)
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
        S = _logits_tile(X, Y, sxm, sxk, sym, syk, row0, n0, M, end, K, s, BM, BN, BK, PREC)
        c_ls = tl.load(COL + cols, mask=col_ok, other=0.0)
        c_b = tl.load(COL + 2 * N + cols, mask=col_ok, other=0.0)
        G = r_a[:, None] * tl.exp(S - r_ls[:, None]) + c_b[None, :] * tl.exp(S - c_ls[None, :])
        if HAS_T:
            T = _logits_tile(XT, YT, stm, stk, sum_, suk, row0, n0, M, end, KT, t, BM, BN, BK, PREC_T)
            c_lt = tl.load(COL + N + cols, mask=col_ok, other=0.0)
            c_e = tl.load(COL + 3 * N + cols, mask=col_ok, other=0.0)
            G -= r_g[:, None] * tl.exp(T - r_lt[:, None]) + c_e[None, :] * tl.exp(T - c_lt[None, :])
        G = tl.where(row_ok[:, None] & col_ok[None, :], G * gs, 0.0).to(X.dtype.element_ty)
        y_ptr = tl.make_block_ptr(Y, shape=(end, K), strides=(sym, syk), offsets=(n0, f0), block_shape=(BN, BD),
                                  order=(1, 0))
        y = tl.load(y_ptr, boundary_check=(0, 1), padding_option="zero")
        acc = tl.dot(G, y, acc, input_precision=PREC)
        if WITH_V:
            Gt = tl.trans(G)
            for fv in tl.static_range(0, BD, BDV):
                x_ptr = tl.make_block_ptr(X, shape=(M, K), strides=(sxm, sxk), offsets=(row0, f0 + fv),
                                          block_shape=(BM, BDV), order=(1, 0))
                x = tl.load(x_ptr, boundary_check=(0, 1), padding_option="zero")
                v = tl.dot(Gt, x, input_precision=PREC) / gs
                feats = f0 + fv + tl.arange(0, BDV)
                tl.atomic_add(V + cols[:, None] * sv_n + feats[None, :], v,
                              mask=col_ok[:, None] & (feats[None, :] < K), sem="relaxed")
    feats = f0 + tl.arange(0, BD)
    out = U + pid_s * su_split + rows[:, None] * su_m + feats[None, :]
    tl.store(out, acc / gs, mask=row_ok[:, None] & (feats[None, :] < K))


# ---- launchers ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """About two programs per SM fill the GPU."""
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _split(rows: int, cols: int, device: torch.device, split: int | None) -> tuple[int, int]:
    """(number of column splits, columns per split): enough programs to fill the GPU
    when there are few row blocks."""
    align = _INTERP["BN"] if INTERPRET else 128
    if split is None:
        split = max(1, min(16, _target_programs(device) // triton.cdiv(rows, 64))) if device.type == "cuda" else 1
    split = max(1, min(int(split), triton.cdiv(cols, align)))
    per = triton.cdiv(triton.cdiv(cols, split), align) * align
    return triton.cdiv(cols, per), per


def _groups(rows: int, n_split: int, device: torch.device, groups: int | None) -> int:
    """Row groups of the statistics sweep: each holds one column partial of length N,
    so there are only as many as fill the GPU (the interpreter: two row blocks each)."""
    blocks = triton.cdiv(rows, 64)
    if groups is None:
        groups = max(1, _target_programs(device) // n_split) if device.type == "cuda" else triton.cdiv(blocks, 2)
    return max(1, min(int(groups), blocks))


def fp32_dot_precision() -> str:
    """"tf32" when torch allows TF32 for float32 CUDA matmuls, else "ieee"."""
    try:
        p = torch.backends.cuda.matmul.fp32_precision
        if p == "none":
            p = torch.backends.fp32_precision
    except (AttributeError, RuntimeError):  # torch without the per-backend setting
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32" if p == "tf32" else "ieee"


def _prec(dtype: torch.dtype) -> str:
    return fp32_dot_precision() if dtype == torch.float32 else "tf32"  # 16-bit: tensor cores regardless


def _scalar(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(1).to(torch.float32)


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def _check(X, Y, Xt, Yt):
    for name, x in (("student", X), ("teacher", Xt)):
        if x.dtype not in DTYPES:
            raise ValueError(f"contrastive_distill[triton]: {name} features have dtype {x.dtype}; "
                             "supported: float32, float16, bfloat16")
    if not INTERPRET and X.device.type != "cuda":
        raise ValueError("contrastive_distill[triton]: tensors must be on a CUDA device (or set TRITON_INTERPRET=1)")


def _on(device: torch.device):
    """Make the tensors' GPU current for the launch (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _strides(X, Y, Xt, Yt):
    return (X.stride(0), X.stride(1), Y.stride(0), Y.stride(1), Xt.stride(0), Xt.stride(1), Yt.stride(0),
            Yt.stride(1))


def block_stats(X, Y, Xt, Yt, s, t, split: int | None = None, groups: int | None = None, diag=None, off: int = 0,
                work: dict | None = None):
    """Row statistics of ``s*X@Y.T`` vs ``t*Xt@Yt.T`` and the column partials, one launch.

    Returns ``(row, col)``, each ``(lse_s, lse_t, e)`` (float32, length M and N).
    ``diag = (row_out, col_out)`` receives S[i, i + off] at row i and column
    i + off, from the tiles the statistics came from; other entries are left
    as they are. ``split`` / ``groups``: column splits and row groups (default:
    enough programs for the GPU). ``work`` is left empty (the gradient kernel
    recomputes its tiles).
    """
    _check(X, Y, Xt, Yt)
    M, K = X.shape
    N, KT = Y.shape[0], Xt.shape[1]
    dev = X.device
    n_split, per = _split(M, N, dev, split)
    n_groups = _groups(M, n_split, dev, groups)
    rowp = torch.empty(n_split, 3, M, dtype=torch.float32, device=dev)
    colp = torch.empty(n_groups, 3, N, dtype=torch.float32, device=dev)
    colp[:, :2].fill_(float("-inf"))
    colp[:, 2].zero_()
    if diag is not None:
        d_row, d_col = (torch.empty(n, dtype=torch.float32, device=dev) for n in (M, N))
    else:
        d_row = d_col = rowp  # not written
    with _on(dev):
        _stats_kernel[(n_groups, n_split)](
            X, Y, Xt, Yt, _scalar(s), _scalar(t), rowp, colp, d_row, d_col, int(off), M, N, K, KT, _bucket(M),
            _bucket(N), per, n_groups, *_strides(X, Y, Xt, Yt),
            PREC=_prec(X.dtype), PREC_T=_prec(Xt.dtype), HAS_DIAG=diag is not None,
        )
    if diag is not None:  # keep the entries that have no pair in this block
        i, j = torch.arange(M, device=dev) + off, torch.arange(N, device=dev) - off
        diag[0].copy_(torch.where((i >= 0) & (i < N), d_row.to(diag[0].dtype), diag[0]))
        diag[1].copy_(torch.where((j >= 0) & (j < M), d_col.to(diag[1].dtype), diag[1]))
    row = merge_stats(*rowp.unbind(1)) if n_split > 1 else tuple(rowp[0].unbind(0))
    col = merge_stats(*colp.unbind(1)) if n_groups > 1 else tuple(colp[0].unbind(0))
    return row, col


def g_scale(row, col) -> torch.Tensor:
    """GSCALE of ``_grad_kernel`` as a 1-element float32 device tensor (no host sync)."""
    bound = (row[2].abs() + row[3].abs()).amax() + (col[2].abs() + col[3].abs()).amax()
    e = torch.floor(torch.log2(G_CEILING / bound.float().clamp_min(2.0**-60))).clamp(-60.0, 60.0)
    return torch.exp2(e).reshape(1)


def _grads(X, Y, Xt, Yt, s, t, row_v, col_v, gscale, split, teacher, with_v):
    """U = G @ Y ([M, K] float32) and, ``with_v``, V = G.T @ X ([N, K]) from one launch."""
    M, K = X.shape
    N, KT = Y.shape[0], Xt.shape[1]
    n_split, per = _split(M, N, X.device, split)
    U = torch.empty(n_split, M, K, dtype=torch.float32, device=X.device)
    V = torch.zeros(N, K, dtype=torch.float32, device=X.device) if with_v else U
    grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(K, meta["BD"]), n_split)  # noqa: E731
    with _on(X.device):
        _grad_kernel[grid](
            X, Y, Xt, Yt, _scalar(s), _scalar(t), gscale, row_v, col_v, U, V, M, N, K, KT, _bucket(M), _bucket(N),
            per, *_strides(X, Y, Xt, Yt), U.stride(0), U.stride(1), K,
            PREC=_prec(X.dtype), PREC_T=_prec(Xt.dtype), HAS_T=teacher, WITH_V=with_v,
        )
    return (U[0] if n_split == 1 else U.sum(dim=0)), (V if with_v else None)


def block_grads(X, Y, Xt, Yt, s, t, row, col, split: int | None = None, teacher: bool = True,
                work: dict | None = None):
    """``U = G @ Y`` and ``V = G.T @ X`` (float32) for the block (see ``_grad_kernel``).

    ``row = (lse_s, lse_t, a, g)`` (length M), ``col = (lse_s, lse_t, b, e)``
    (length N); ``teacher=False`` promises g = e = 0 and skips the T tiles.
    One launch; under ``torch.use_deterministic_algorithms(True)`` two (rows,
    then the transposed block), with no atomics.
    """
    _check(X, Y, Xt, Yt)
    row_v = torch.stack([v.to(torch.float32) for v in row]).contiguous()
    col_v = torch.stack([v.to(torch.float32) for v in col]).contiguous()
    gscale = g_scale(row_v, col_v)
    if not torch.are_deterministic_algorithms_enabled():
        return _grads(X, Y, Xt, Yt, s, t, row_v, col_v, gscale, split, teacher, True)
    U, _ = _grads(X, Y, Xt, Yt, s, t, row_v, col_v, gscale, split, teacher, False)
    V, _ = _grads(Y, X, Yt, Xt, s, t, col_v, row_v, gscale, split, teacher, False)
    return U, V
