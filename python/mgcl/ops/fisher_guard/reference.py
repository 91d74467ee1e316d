"""fisher_guard, the definition (SPEC.md section 6).

For each tensor triple (grad, param, anchor), in float32:

    d = param - anchor
    W = grad**2                      mode "dfg" (grad holds the distillation gradient)
      = fisher                       mode "ewc"
      = 1                            mode "l2"
    dfg with ema > 0: fisher <- ema*fisher + (1-ema)*grad**2 (stored), W = fisher
    normalize="mean": W <- W / mean(W)   (W = 0 where the mean is 0; the mean
                                          accumulated in float64, then float32)
    grad <- grad + 2*lam*W*d             (W from the incoming grad)
    penalty = lam * sum over tensors of sum(W*d**2)

This module is the fallback, the test oracle and the bench baseline; it is
written to be read, one tensor at a time.
"""
from __future__ import annotations

import torch


def importance(g: torch.Tensor, f: torch.Tensor | None, mode: str, ema: float) -> torch.Tensor:
    """W for one tensor (float32), updating ``f`` in place for dfg with ema."""
    if mode == "dfg":
        w = g.float() ** 2
        if ema > 0:
            f.copy_(ema * f.float() + (1.0 - ema) * w)
            w = f.float()
        return w
    if mode == "ewc":
        return f.float()
    return torch.ones_like(g, dtype=torch.float32)


def fisher_guard(grads, params, anchors, fisher, lam: float, mode: str, ema: float, normalize: str | None):
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for i, (g, p, a) in enumerate(zip(grads, params, anchors)):
        f = fisher[i] if fisher is not None else None
        w = importance(g, f, mode, ema)
        if normalize == "mean":
            m = w.double().mean().float()  # accumulated in float64: sum(W) may pass float32's range
            w = torch.where(m == 0, torch.zeros_like(w), w / m)
        d = p.float() - a.float()
        wd = w * d
        total = total + (wd * d).sum()
        g.copy_(g.float() + (2.0 * lam) * wd)
    return lam * total
