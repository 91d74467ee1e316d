"""contrastive_distill, blocked PyTorch (the CPU fast path).

The two block primitives of the fused driver (``fused.py``) for one block of
rows ``A = X @ Y.T`` (M x N; X = the rank's image features, Y = every text
feature), the teacher block ``At = Xt @ Yt.T`` alongside. Rows are taken R at a
time, so the largest temporaries are a few R x N matrices, never N x N:

``block_stats``: one sweep. For a chunk of rows the row statistics are
complete (each row is whole). The column statistics are merged across chunks
with the online log-sum-exp: keeping per column the running maxima m, the sums
l = sum_i exp(S_ij - m_j) and k = sum_i exp(T_ij - mt_j) (T_ij - S_ij), a new
chunk with maxima m' rescales the old sums by exp(m - max(m, m')) before adding
its own. Each set of statistics is returned as

    lse_s = log sum exp S,   lse_t = log sum exp T,   e = E_{softmax T}[T - S]

so that KL(softmax T || softmax S) = e + lse_s - lse_t. The column sets are
partial (over these M rows) until merged across ranks.

``block_grads``: one sweep again, recomputing S and T per chunk:

    G_ij = a_i exp(S_ij - lse_s_i) - g_i exp(T_ij - lse_t_i)          (row terms)
         + b_j exp(S_ij - cse_s_j) - e_j exp(T_ij - cse_t_j)          (column terms)
    U = G @ Y   [M, d]          V = G.T @ X   [N, d]   (V summed over chunks)

Work: 2 + 4 GEMM-sized products of the block (the fewest a method that never
stores the block can do), about 8 exponentials per element.
"""
from __future__ import annotations

import torch

from .reference import compute_dtype

# Elements in one R x N slab: R = max(1, BLOCK_ELEMENTS // N). 2**23 float32 is
# 32 MiB per slab; a chunk holds about five slabs at once.
BLOCK_ELEMENTS = 1 << 23


def rows_per_block(n_cols: int, block: int | None = None) -> int:
    if block is not None:
        return max(1, int(block))
    return max(1, BLOCK_ELEMENTS // max(1, n_cols))


def _logits(Xc, Y, scale):
    return torch.mm(Xc, Y.T).mul_(scale)


def block_stats(X, Y, Xt, Yt, s, t, block: int | None = None):
    """Row statistics of ``s*X@Y.T`` vs ``t*Xt@Yt.T`` and the column partials.

    Returns ``(row, col)``: each a tuple ``(lse_s, lse_t, e)`` of length M and N.
    """
    ct = compute_dtype(X.dtype)
    M, N = X.shape[0], Y.shape[0]
    dev = X.device
    Y, Yt = Y.to(ct), Yt.to(ct)
    s, t = s.to(ct), t.to(ct)
    row_lse_s = torch.empty(M, dtype=ct, device=dev)
    row_lse_t = torch.empty(M, dtype=ct, device=dev)
    row_e = torch.empty(M, dtype=ct, device=dev)
    col_m_s = torch.full((N,), float("-inf"), dtype=ct, device=dev)
    col_m_t = torch.full((N,), float("-inf"), dtype=ct, device=dev)
    col_l_s = torch.zeros(N, dtype=ct, device=dev)
    col_l_t = torch.zeros(N, dtype=ct, device=dev)
    col_k = torch.zeros(N, dtype=ct, device=dev)
    R = rows_per_block(N, block)
    for r0 in range(0, M, R):
        r1 = min(M, r0 + R)
        S = _logits(X[r0:r1].to(ct), Y, s)
        T = _logits(Xt[r0:r1].to(ct), Yt, t)
        diff = torch.sub(T, S)
        # rows: complete in this chunk
        m_s = S.amax(dim=1, keepdim=True)
        m_t = T.amax(dim=1, keepdim=True)
        E = torch.sub(S, m_s).exp_()
        l_s = E.sum(dim=1)
        torch.sub(T, m_t, out=E).exp_()
        l_t = E.sum(dim=1)
        row_e[r0:r1] = E.mul_(diff).sum(dim=1) / l_t
        row_lse_s[r0:r1] = m_s.squeeze(1) + l_s.log()
        row_lse_t[r0:r1] = m_t.squeeze(1) + l_t.log()
        # columns: online log-sum-exp across chunks
        new_m_s = torch.maximum(col_m_s, S.amax(dim=0))
        torch.sub(S, new_m_s, out=E).exp_()
        col_l_s = col_l_s * torch.exp(col_m_s - new_m_s) + E.sum(dim=0)
        col_m_s = new_m_s
        new_m_t = torch.maximum(col_m_t, T.amax(dim=0))
        torch.sub(T, new_m_t, out=E).exp_()
        rescale = torch.exp(col_m_t - new_m_t)
        col_l_t = col_l_t * rescale + E.sum(dim=0)
        col_k = col_k * rescale + E.mul_(diff).sum(dim=0)
        col_m_t = new_m_t
        del S, T, E, diff
    col = (col_m_s + col_l_s.log(), col_m_t + col_l_t.log(), col_k / col_l_t)
    return (row_lse_s, row_lse_t, row_e), col


def block_grads(X, Y, Xt, Yt, s, t, row, col, block: int | None = None, teacher: bool = True):
    """``U = G @ Y`` and ``V = G.T @ X`` for the block (see the module doc).

    ``row = (lse_s, lse_t, a, g)`` (length M), ``col = (lse_s, lse_t, b, e)``
    (length N); returns float32 (float64 for float64 inputs) tensors.
    ``teacher=False`` promises g = e = 0: the T products are skipped.
    """
    ct = compute_dtype(X.dtype)
    M, N = X.shape[0], Y.shape[0]
    Y, Yt = Y.to(ct), Yt.to(ct)
    s, t = s.to(ct), t.to(ct)
    r_lse_s, r_lse_t, r_a, r_g = (v.to(ct).unsqueeze(1) for v in row)
    c_lse_s, c_lse_t, c_b, c_e = (v.to(ct).unsqueeze(0) for v in col)
    U = torch.empty(M, X.shape[1], dtype=ct, device=X.device)
    V = torch.zeros(N, X.shape[1], dtype=ct, device=X.device)
    R = rows_per_block(N, block)
    for r0 in range(0, M, R):
        r1 = min(M, r0 + R)
        Xc = X[r0:r1].to(ct)
        S = _logits(Xc, Y, s)
        G = torch.sub(S, r_lse_s[r0:r1]).exp_().mul_(r_a[r0:r1])
        tmp = torch.sub(S, c_lse_s).exp_().mul_(c_b)
        G.add_(tmp)
        if teacher:
            T = _logits(Xt[r0:r1].to(ct), Yt, t)
            torch.sub(T, r_lse_t[r0:r1], out=tmp).exp_().mul_(r_g[r0:r1])
            G.sub_(tmp)
            torch.sub(T, c_lse_t, out=tmp).exp_().mul_(c_e)
            G.sub_(tmp)
            del T
        del S, tmp
        torch.mm(G, Y, out=U[r0:r1])
        V.addmm_(G.T, Xc)
        del G
    return U, V
