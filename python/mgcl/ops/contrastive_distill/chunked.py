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
stores the block can do), about 8 exponentials per element. When the block is
one chunk (R = M: every block of up to BLOCK_ELEMENTS entries, so every
batch up to B = 2896), ``block_stats`` leaves S and T in ``work`` and
``block_grads`` uses them instead of recomputing: 2 + 2 products, as few as the
dense reference, in the memory the two sweeps take anyway.
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


def _term(out, Z, lse, coef):
    """out = coef * exp(Z - lse). (Not exp(Z - (lse - log coef)), one pass
    fewer: that rounds a lone entry's exp(0) = 1 away from 1, and B = 1 must
    give exactly zero gradients.)"""
    return torch.sub(Z, lse, out=out).exp_().mul_(coef)


def block_stats(X, Y, Xt, Yt, s, t, block: int | None = None, diag=None, off: int = 0, work: dict | None = None):
    """Row statistics of ``s*X@Y.T`` vs ``t*Xt@Yt.T`` and the column partials.

    Returns ``(row, col)``: each a tuple ``(lse_s, lse_t, e)`` of length M and N.
    ``diag = (row_out, col_out)`` (length M and N) receives the positive-pair
    logits S[i, i + off] at row i and at column i + off, taken from the very
    products the statistics come from (so lse - S_ii is exactly 0 when a row
    holds one entry); entries without a pair are left as they are. ``work``
    (a dict, optional) receives S and T when the block is one chunk, for
    :func:`block_grads`.
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
    R = min(M, rows_per_block(N, block))
    # four R x N slabs, reused by every chunk (no allocation, no fresh pages)
    bS, bT, bD, bE = (torch.empty(R, N, dtype=ct, device=dev) for _ in range(4))
    for r0 in range(0, M, R):
        r1 = min(M, r0 + R)
        S, T, diff, E = bS[: r1 - r0], bT[: r1 - r0], bD[: r1 - r0], bE[: r1 - r0]
        torch.mm(X[r0:r1].to(ct) * s, Y.T, out=S)  # the scale on the R x d side: one pass fewer
        torch.mm(Xt[r0:r1].to(ct) * t, Yt.T, out=T)
        torch.sub(T, S, out=diff)
        if diag is not None:
            d = torch.diagonal(S, offset=r0 + off)
            diag[0][r0:r0 + d.numel()] = d
            diag[1][r0 + off:r0 + off + d.numel()] = d
        # rows: complete in this chunk
        m_s = S.amax(dim=1, keepdim=True)
        m_t = T.amax(dim=1, keepdim=True)
        l_s = torch.sub(S, m_s, out=E).exp_().sum(dim=1)
        l_t = torch.sub(T, m_t, out=E).exp_().sum(dim=1)
        row_e[r0:r1] = E.mul_(diff).sum(dim=1) / l_t
        row_lse_s[r0:r1] = m_s.squeeze(1) + l_s.log()
        row_lse_t[r0:r1] = m_t.squeeze(1) + l_t.log()
        # columns: online log-sum-exp across chunks
        new_m_s = torch.maximum(col_m_s, S.amax(dim=0))
        col_l_s = col_l_s * torch.exp(col_m_s - new_m_s) + torch.sub(S, new_m_s, out=E).exp_().sum(dim=0)
        col_m_s = new_m_s
        new_m_t = torch.maximum(col_m_t, T.amax(dim=0))
        rescale = torch.exp(col_m_t - new_m_t)
        col_l_t = col_l_t * rescale + torch.sub(T, new_m_t, out=E).exp_().sum(dim=0)
        col_k = col_k * rescale + E.mul_(diff).sum(dim=0)
        col_m_t = new_m_t
    if work is not None and R == M:
        work.update(S=bS, T=bT)  # the one chunk's products, untouched since the mm
    col = (col_m_s + col_l_s.log(), col_m_t + col_l_t.log(), col_k / col_l_t)
    return (row_lse_s, row_lse_t, row_e), col


def block_grads(X, Y, Xt, Yt, s, t, row, col, block: int | None = None, teacher: bool = True,
                work: dict | None = None):
    """``U = G @ Y`` and ``V = G.T @ X`` for the block (see the module doc).

    ``row = (lse_s, lse_t, a, g)`` (length M), ``col = (lse_s, lse_t, b, e)``
    (length N); returns float32 (float64 for float64 inputs) tensors.
    ``teacher=False`` promises g = e = 0: the T products are skipped.
    ``work``: what :func:`block_stats` left there (S and T of a one-chunk block).
    """
    ct = compute_dtype(X.dtype)
    M, N = X.shape[0], Y.shape[0]
    dev = X.device
    Y, Yt = Y.to(ct), Yt.to(ct)
    s, t = s.to(ct), t.to(ct)
    r_lse_s, r_lse_t, r_a, r_g = (v.to(ct).unsqueeze(1) for v in row)
    c_lse_s, c_lse_t, c_b, c_e = (v.to(ct) for v in col)
    U = torch.empty(M, X.shape[1], dtype=ct, device=dev)
    V = torch.zeros(N, X.shape[1], dtype=ct, device=dev)
    R = min(M, rows_per_block(N, block))
    kept = work is not None and "S" in work and R == M
    bZ = None if kept else torch.empty(R, N, dtype=ct, device=dev)
    bG, bW = (torch.empty(R, N, dtype=ct, device=dev) for _ in range(2))
    for r0 in range(0, M, R):
        r1 = min(M, r0 + R)
        G, W = bG[: r1 - r0], bW[: r1 - r0]
        Xc = X[r0:r1].to(ct)
        Z = work["S"] if kept else torch.mm(Xc * s, Y.T, out=bZ[: r1 - r0])  # S
        _term(G, Z, r_lse_s[r0:r1], r_a[r0:r1])
        G.add_(_term(W, Z, c_lse_s, c_b))
        if teacher:
            Z = work["T"] if kept else torch.mm(Xt[r0:r1].to(ct) * t, Yt.T, out=Z)  # T
            G.sub_(_term(W, Z, r_lse_t[r0:r1], r_g[r0:r1]))
            G.sub_(_term(W, Z, c_lse_t, c_e))
        torch.mm(G, Y, out=U[r0:r1])
        V.addmm_(G.T, Xc)
    return U, V
