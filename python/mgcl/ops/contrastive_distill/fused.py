"""The driver shared by the fused backends (``chunked``, ``triton``).

A backend ("engine") offers two block primitives over the rectangular block
``S = s*X@Y.T`` (M x N) with its teacher block ``T = t*Xt@Yt.T``:

- ``block_stats(X, Y, Xt, Yt, s, t, diag=(row_out, col_out), off=off, work=work) -> (row, col)``,
  each ``(lse_s, lse_t, e)``: log-sum-exp of S and T and ``e = E_{softmax T}[T - S]``
  per row (over all N columns) and per column (over these M rows: partial when
  M is one rank's rows); it also writes the positive-pair logits S[i, i + off]
  from its own products into ``row_out[i]`` and ``col_out[i + off]``;
- ``block_grads(X, Y, Xt, Yt, s, t, (lse_s, lse_t, a, g), (cse_s, cse_t, b, e), work=work)
  -> (U, V)`` with ``U = G @ Y``, ``V = G.T @ X`` and
  ``G_ij = a_i Q_ij - g_i P_ij + b_j Q'_ij - e_j P'_ij`` (Q, P the row softmaxes
  of S and T, Q', P' the column softmaxes);
- ``work``: a dict the statistics sweep may leave products in for the gradient
  sweep (``chunked`` keeps S and T of a one-chunk block; ``triton`` keeps nothing).

Math (B = global batch, X = img_s rows of this rank, Y = every txt_s row):

    r_i = e_i + lse_s_i - lse_t_i          row KL
    p_i = lse_s_i - S_ii                   row CE (S_ii = s <img_i, txt_i>)
    dL/dS_ij = [ (kd i2t w_i + cmc) Q_ij - kd i2t w_i P_ij
               + (kd t2i v_j + cmc) Q'_ij - kd t2i v_j P'_ij - 2 cmc [j = i + off] ] / B
    dL/d img_s = s (dL/dS) @ txt_s,   dL/d txt_s = s (dL/dS).T @ img_s,
    dL/ds = sum_ij dL/dS_ij <img_i, txt_j> = sum_i <(dL/dS @ txt_s)_i, img_i>

so the driver needs the row statistics (a kernel sweep), the column statistics
(the same sweep's partials, merged across ranks) and one gradient sweep. As in
Liger-Kernel, the forward computes the gradients when they will be needed and
the backward only multiplies them by the incoming scalar: nothing B x B and no
gathered features are kept for the backward, and the backward issues no
collectives.

Multi-GPU (``comm`` given): each rank holds rows ``off..off+M`` of the global
batch; the text features (student and teacher) and column weights are
gathered, the column partials are merged across ranks, the loss is summed, and
``V`` (every column's gradient from this rank's rows) is summed across ranks
before this rank keeps its slice. The returned loss is the global loss; the
feature gradients are the global loss's gradient for this rank's rows; the
scale gradient is this rank's share (the shares sum to the global one).
"""
from __future__ import annotations

import torch

from .reference import compute_dtype


def merge_stats(lse_s: torch.Tensor, lse_t: torch.Tensor, e: torch.Tensor):
    """Merge partial statistics stacked on dim 0 (e.g. one row per rank or split)."""
    tot_s = torch.logsumexp(lse_s, dim=0)
    tot_t = torch.logsumexp(lse_t, dim=0)
    w = torch.exp(lse_t - tot_t)
    return tot_s, tot_t, (w * e).sum(dim=0)


def forward(engine, img_s, txt_s, img_t, txt_t, scale_s, scale_t, kd, cmc, i2t, t2i, row_weight, col_weight,
            need_grad: bool, comm=None):
    """``(loss, d_img, d_txt, d_scale, parts)``: the gradients are ``None`` unless
    ``need_grad``; ``parts`` = [ckt, cmc], the two unweighted terms (loss = kd*ckt + cmc*cmc)."""
    ct = compute_dtype(img_s.dtype)
    dev = img_s.device
    M = img_s.shape[0]
    s = scale_s.detach().to(device=dev, dtype=ct)
    t = scale_t.detach().to(device=dev, dtype=ct)
    img_t, txt_t = img_t.detach(), txt_t.detach()
    w = torch.ones(M, dtype=ct, device=dev) if row_weight is None else row_weight.detach().to(ct)
    v = torch.ones(M, dtype=ct, device=dev) if col_weight is None else col_weight.detach().to(ct)
    if comm is None:
        off, B = 0, M
        Y, Yt, v_all = txt_s.detach(), txt_t, v
    else:
        off, B = comm.offset, comm.total
        Y, Yt, v_all = comm.gather(txt_s.detach()), comm.gather(txt_t), comm.gather(v)

    # The positive-pair logits S_ii as the engine's own products gave them (the
    # row and the column sweep each), so that lse - S_ii and the KL terms are
    # exactly 0 where a row or column holds a single entry (B = 1).
    row_diag = torch.empty(M, dtype=ct, device=dev)
    col_diag = torch.empty(Y.shape[0], dtype=ct, device=dev)
    work = {} if need_grad else None  # what an engine keeps from its statistics sweep for its gradient sweep
    row, col = engine.block_stats(img_s.detach(), Y, img_t, Yt, s, t, diag=(row_diag, col_diag), off=off, work=work)
    row = tuple(x.to(ct) for x in row)
    col = tuple(x.to(ct) for x in col)
    if comm is not None:
        col = merge_stats(*(comm.gather_stacked(x) for x in col))
    loc = slice(off, off + M)
    # KL = E_P[T - S] - (lse_t - lse_s), in this order: both differences round alike
    r = row[2] - (row[1] - row[0])
    c = col[2][loc] - (col[1][loc] - col[0][loc])
    p = row[0] - row_diag
    q = col[0][loc] - col_diag[loc]
    parts = torch.stack([i2t * (w * r).sum() + t2i * (v * c).sum(), p.sum() + q.sum()]) / B
    if comm is not None:
        parts = comm.all_reduce(parts)
    loss = kd * parts[0] + cmc * parts[1]
    if not need_grad:
        return loss, None, None, None, parts

    a, g = kd * i2t * w + cmc, kd * i2t * w
    b, e = kd * t2i * v_all + cmc, kd * t2i * v_all
    teacher = kd * i2t != 0.0 or kd * t2i != 0.0  # else g = e = 0 and the T products are skipped
    U, V = engine.block_grads(img_s.detach(), Y, img_t, Yt, s, t, (row[0], row[1], a, g), (col[0], col[1], b, e),
                              teacher=teacher, work=work)
    del work
    U = U.to(ct).div_(B)
    V = V.to(ct).div_(B)
    zeta = 2.0 * cmc / B
    if zeta != 0.0:
        U.sub_(txt_s.detach().to(ct), alpha=zeta)
        V[loc].sub_(img_s.detach().to(ct), alpha=zeta)
    if comm is not None:
        V = comm.all_reduce(V)
    d_scale = (U * img_s.detach().to(ct)).sum()
    d_img = (U.mul_(s)).to(img_s.dtype)
    d_txt = (V[loc] * s).to(txt_s.dtype)
    return loss, d_img, d_txt, d_scale, parts
