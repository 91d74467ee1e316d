"""contrastive_distill over a process group (DDP): the global-batch loss from local rows.

Rank r holds rows ``off_r .. off_r + M_r`` of the global batch (sizes may
differ between ranks). The fused backends compute the rank's block of rows
``S[off_r : off_r + M_r, :]`` (M_r x B, the positive pair of local row i is
column off_r + i) against the gathered text features; see ``fused.py`` for the
math and the communication. The reference backend gathers everything with
gradient and evaluates the dense loss on every rank.

Semantics (both): every rank returns the global loss (the single-process loss
of the concatenated batch); the gradient reaching a rank's features is the
global loss's gradient for its rows; ``scale_s`` receives the rank's share, so
the shares sum to the global gradient. Under DDP, which averages gradients over
the W ranks, every parameter then sees (1/W) x the global gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import fused, reference


class Comm:
    """The collectives the driver needs, for one call (sizes exchanged once)."""

    def __init__(self, group, local_rows: int, device: torch.device):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        n = torch.tensor([local_rows], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n, group=group)
        self.sizes = [int(x) for x in sizes]
        self.offset = sum(self.sizes[: self.rank])
        self.total = sum(self.sizes)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along dim 0 (no gradient)."""
        x = x.detach().contiguous()
        top = max(self.sizes)
        if x.shape[0] != top:
            pad = x.new_zeros((top - x.shape[0],) + tuple(x.shape[1:]))
            x = torch.cat([x, pad])
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, self.sizes)])

    def gather_stacked(self, x: torch.Tensor) -> torch.Tensor:
        """Stack every rank's equal-shape ``x`` on a new dim 0."""
        x = x.detach().contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x, group=self.group)
        return torch.stack(parts)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x


class _FusedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img_s, txt_s, scale_s, img_t, txt_t, scale_t, row_weight, col_weight, coefs, engine, group):
        kd, cmc, i2t, t2i = coefs
        need_grad = any(ctx.needs_input_grad[:3])
        comm = Comm(group, img_s.shape[0], img_s.device)
        loss, d_img, d_txt, d_scale, parts = fused.forward(engine, img_s, txt_s, img_t, txt_t, scale_s, scale_t, kd,
                                                           cmc, i2t, t2i, row_weight, col_weight, need_grad, comm)
        if need_grad:
            ctx.save_for_backward(d_img, d_txt, d_scale.to(scale_s.dtype))
        ctx.mark_non_differentiable(parts)
        return loss, parts

    @staticmethod
    def backward(ctx, grad, _parts_grad):
        if torch.is_grad_enabled():  # create_graph=True: the saved gradients are constants
            raise RuntimeError("contrastive_distill: double backward (create_graph=True) with gather=True or a "
                               "process group needs backend='torch'; the fused backends keep no graph of the gradient")
        d_img, d_txt, d_scale = ctx.saved_tensors
        return (d_img * grad, d_txt * grad, (d_scale * grad).to(d_scale.dtype)) + (None,) * 8


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return comm.gather(x)

    @staticmethod
    def backward(ctx, grad):
        comm = ctx.comm
        g = comm.all_reduce(grad.contiguous())
        return g[comm.offset: comm.offset + comm.sizes[comm.rank]], None


def fused_loss(engine, img_s, txt_s, img_t, txt_t, scale_s, scale_t, kd, cmc, i2t, t2i, row_weight, col_weight,
               group):
    """``(loss, parts)``: the global loss (differentiable) and its two terms [ckt, cmc] (constants)."""
    return _FusedFn.apply(img_s, txt_s, scale_s, img_t, txt_t, scale_t, row_weight, col_weight, (kd, cmc, i2t, t2i),
                          engine, group)


def reference_loss(img_s, txt_s, img_t, txt_t, scale_s, scale_t, kd, cmc, i2t, t2i, row_weight, col_weight, group):
    """``(loss, parts)`` like :func:`fused_loss`, from the dense reference on the gathered batch."""
    M = img_s.shape[0]
    comm = Comm(group, M, img_s.device)
    ct = reference.compute_dtype(img_s.dtype)
    ones = torch.ones(M, dtype=ct, device=img_s.device)
    ckt, cmc_term = reference.parts(
        _GatherWithGrad.apply(img_s, comm), _GatherWithGrad.apply(txt_s, comm),
        comm.gather(img_t), comm.gather(txt_t), scale_s, scale_t, i2t, t2i,
        comm.gather(ones if row_weight is None else row_weight.to(ct)),
        comm.gather(ones if col_weight is None else col_weight.to(ct)),
    )
    loss = kd * ckt + cmc * cmc_term
    # every rank holds the same loss; the gather's backward sums the ranks' gradients
    share = loss / comm.world
    return share + (loss - share).detach(), torch.stack([ckt, cmc_term]).detach()
