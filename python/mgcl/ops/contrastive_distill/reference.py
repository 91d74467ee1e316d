"""contrastive_distill, the definition (SPEC.md section 5).

Student features ``img_s, txt_s [B, d]``, teacher features ``img_t, txt_t
[B, dt]`` (constants), scales ``scale_s`` (may carry a gradient) and ``scale_t``:

    S = scale_s * img_s @ txt_s.T          T = scale_t * img_t @ txt_t.T
    r_i = KL(softmax(T[i, :]) || softmax(S[i, :]))     row KL     (image -> text)
    c_j = KL(softmax(T[:, j]) || softmax(S[:, j]))     column KL  (text -> image)
    p_i = lse(S[i, :]) - S[i, i]                       row CE     (CLIP loss)
    q_j = lse(S[:, j]) - S[j, j]                       column CE
    loss = kd * (i2t * sum_i w_i r_i + t2i * sum_j v_j c_j) / B
         + cmc * (sum_i p_i + sum_j q_j) / B

``w`` and ``v`` are the optional row and column weights (default 1). The B x B
matrices are built in full here: this is the oracle, the fallback and the bench
baseline, written to be read. Everything is computed in float32 (float64 for
float64 inputs) with autocast off; gradients come from autograd.
"""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def parts(img_s, txt_s, img_t, txt_t, scale_s, scale_t, i2t=1.0, t2i=1.0, row_weight=None, col_weight=None):
    """The two unweighted terms ``(ckt, cmc)``:
    ``ckt = (i2t * sum_i w_i r_i + t2i * sum_j v_j c_j) / B`` and ``cmc = (sum_i p_i + sum_j q_j) / B``."""
    ct = compute_dtype(img_s.dtype)
    with torch.autocast(img_s.device.type, enabled=False):
        img_s, txt_s = img_s.to(ct), txt_s.to(ct)
        img_t, txt_t = img_t.detach().to(ct), txt_t.detach().to(ct)
        scale_t = torch.as_tensor(scale_t).detach().to(device=img_s.device, dtype=ct)
        if isinstance(scale_s, torch.Tensor):
            scale_s = scale_s.to(ct)
        B = img_s.shape[0]
        S = scale_s * (img_s @ txt_s.T)
        T = scale_t * (img_t @ txt_t.T)

        log_q_row, log_p_row = S.log_softmax(dim=1), T.log_softmax(dim=1)
        log_q_col, log_p_col = S.log_softmax(dim=0), T.log_softmax(dim=0)
        r = (log_p_row.exp() * (log_p_row - log_q_row)).sum(dim=1)
        c = (log_p_col.exp() * (log_p_col - log_q_col)).sum(dim=0)
        p = -log_q_row.diagonal()
        q = -log_q_col.diagonal()

        w = torch.ones(B, dtype=ct, device=S.device) if row_weight is None else row_weight.detach().to(ct)
        v = torch.ones(B, dtype=ct, device=S.device) if col_weight is None else col_weight.detach().to(ct)
        ckt = (i2t * (w * r).sum() + t2i * (v * c).sum()) / B
        cmc = (p.sum() + q.sum()) / B
        return ckt, cmc


def contrastive_distill(img_s, txt_s, img_t, txt_t, scale_s, scale_t, kd=1.0, cmc=0.0, i2t=1.0, t2i=1.0,
                        row_weight=None, col_weight=None) -> torch.Tensor:
    """``kd * ckt + cmc * cmc_term`` (see :func:`parts`)."""
    ckt_term, cmc_term = parts(img_s, txt_s, img_t, txt_t, scale_s, scale_t, i2t, t2i, row_weight, col_weight)
    return kd * ckt_term + cmc * cmc_term
