"""contrastive_distill: CKT (row and column KL of teacher vs student similarity
softmaxes) + CMC (the CLIP loss) on a reference batch, with gradients for the
student features and the student logit scale.

    loss = contrastive_distill(img_s, txt_s, img_t, txt_t, scale_s, scale_t, kd=1.0, cmc=0.25)

The definition is in ``reference.py``; ``mgcl.nn.ContrastiveDistillLoss`` and
``mgcl.nn.PrimedLoss`` are the training-loop API. The fused backends never
hold a B x B matrix: ``chunked`` (CPU) works on R x B row slabs, ``triton``
(CUDA) on on-chip tiles; both share the driver in ``fused.py``.

The fused backends run inside the custom op ``torch.ops.mgcl.contrastive_distill``
(fake implementation + autograd registered), so ``torch.compile`` sees one
node and ``opcheck`` tests it. Its forward computes the gradients when an input
needs them and its backward only scales them (Liger-Kernel's trick). The
``torch`` backend is not wrapped: it is the differentiable definition, and an
opaque op would hide the autograd graph that makes it the oracle. The
multi-GPU form (``distributed.py``) is a plain ``autograd.Function``, since a
process group cannot be part of an op schema.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ... import _backend
from ..._backend import Entry
from . import chunked, fused, reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _engine(name: str):
    """The module with the block primitives of a fused backend."""
    if name == "triton":
        from . import triton as engine  # noqa: PLC0415  (imports triton: only when used)

        return engine
    return chunked


def _chunked(img_s, txt_s, img_t, txt_t, scale_s, scale_t, kd, cmc, i2t, t2i, row_weight, col_weight, need_grad):
    return fused.forward(chunked, img_s, txt_s, img_t, txt_t, scale_s, scale_t, kd, cmc, i2t, t2i, row_weight,
                         col_weight, need_grad)


def _triton(img_s, txt_s, img_t, txt_t, scale_s, scale_t, kd, cmc, i2t, t2i, row_weight, col_weight, need_grad):
    return fused.forward(_engine("triton"), img_s, txt_s, img_t, txt_t, scale_s, scale_t, kd, cmc, i2t, t2i, row_weight,
                         col_weight, need_grad)


# The crossover below which the dense reference beats chunked on the CPU (its
# forward+backward, d = 256): `mgcl bench contrastive_distill` measures it on the
# machine it runs on and writes it to its JSON ("crossover"), beside this
# declared value. Measured on a shared 2-core AMD EPYC (Zen 3), one thread:
# chunked / torch = 1.43 at B = 64, 1.12 at 256, 1.00 at 384, 0.69 at 512, 0.57 at 1024.
CHUNKED_MIN_BATCH = 512


def _chunked_pays(call) -> bool:
    B = call.get("B")
    return B is None or B >= CHUNKED_MIN_BATCH


_chunked_pays.__doc__ = f"B >= {CHUNKED_MIN_BATCH} (below it the dense reference is faster on the CPU)"

# The dispatch table, in order of preference (see mgcl._backend). "torch" is the
# differentiable reference (autograd through the dense definition); the fused
# entries return (loss, d_img, d_txt, d_scale, parts), the gradients computed in
# the forward when need_grad (Liger-style). B is the batch of the loss (under
# gather=True the global one).
BACKENDS = {
    "triton": Entry(_triton, devices=("cuda", "cpu"), dtypes=(torch.float32, torch.float16, torch.bfloat16)),
    "chunked": Entry(_chunked, devices=("cpu",), dtypes=DTYPES, prefer=_chunked_pays),
    "torch": Entry(reference.contrastive_distill, devices=("cpu", "cuda"), dtypes=DTYPES),
}


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(img_s, txt_s, img_t, txt_t, scale_s, scale_t, kd, cmc, i2t, t2i, row_weight, col_weight):
    names = ("img_s", "txt_s", "img_t", "txt_t")
    feats = (img_s, txt_s, img_t, txt_t)
    for name, x in zip(names, feats):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"contrastive_distill: {name} is {type(x).__name__}, not a tensor")
        if x.dim() != 2:
            raise ValueError(f"contrastive_distill: {name} must be 2-D [B, d], got shape {tuple(x.shape)}")
        if x.dtype not in DTYPES:
            raise ValueError(f"contrastive_distill: {name} has dtype {x.dtype}; supported: float32, float16, "
                             "bfloat16, float64")
        if x.device != img_s.device:
            raise ValueError(f"contrastive_distill: {name} is on {x.device}, img_s on {img_s.device} (mixed devices)")
    if txt_s.shape != img_s.shape:
        raise ValueError(f"contrastive_distill: txt_s has shape {tuple(txt_s.shape)}, img_s {tuple(img_s.shape)}")
    if txt_t.shape != img_t.shape:
        raise ValueError(f"contrastive_distill: txt_t has shape {tuple(txt_t.shape)}, img_t {tuple(img_t.shape)}")
    B, d = img_s.shape
    if img_t.shape[0] != B:
        raise ValueError(f"contrastive_distill: teacher batch {img_t.shape[0]} != student batch {B}")
    if B == 0:
        raise ValueError("contrastive_distill: empty batch (B = 0)")
    if d == 0 or img_t.shape[1] == 0:
        raise ValueError("contrastive_distill: feature dimension is 0")
    if txt_s.dtype != img_s.dtype:
        raise ValueError(f"contrastive_distill: txt_s has dtype {txt_s.dtype}, img_s {img_s.dtype}")
    if txt_t.dtype != img_t.dtype:
        raise ValueError(f"contrastive_distill: txt_t has dtype {txt_t.dtype}, img_t {img_t.dtype}")
    # Value checks read tensor data: on a GPU each would be a host sync, so
    # there they are folded into the result instead (see _poison).
    checking_values = img_s.device.type == "cpu" and not torch.compiler.is_compiling()
    for name, sc in (("scale_s", scale_s), ("scale_t", scale_t)):
        if _is_number(sc):
            if not math.isfinite(sc):
                raise ValueError(f"contrastive_distill: {name} must be finite, got {sc}")
        elif isinstance(sc, torch.Tensor):
            if sc.dim() != 0 or not sc.is_floating_point():
                raise ValueError(f"contrastive_distill: {name} must be a float or a 0-d float tensor, "
                                 f"got shape {tuple(sc.shape)} dtype {sc.dtype}")
            if sc.device != img_s.device:
                raise ValueError(f"contrastive_distill: {name} is on {sc.device}, features on {img_s.device}")
            if checking_values and not bool(torch.isfinite(sc.detach())):
                raise ValueError(f"contrastive_distill: {name} must be finite, got {float(sc)}")
        else:
            raise ValueError(f"contrastive_distill: {name} must be a float or a 0-d tensor, got {type(sc).__name__}")
    for name, c in (("kd", kd), ("cmc", cmc), ("i2t", i2t), ("t2i", t2i)):
        if not _is_number(c) or not math.isfinite(c):
            raise ValueError(f"contrastive_distill: {name} must be a finite number, got {c!r}")
    for name, wt in (("row_weight", row_weight), ("col_weight", col_weight)):
        if wt is None:
            continue
        if not isinstance(wt, torch.Tensor) or not wt.is_floating_point():
            raise ValueError(f"contrastive_distill: {name} must be a float tensor or None")
        if wt.shape != (B,):
            raise ValueError(f"contrastive_distill: {name} has shape {tuple(wt.shape)}; expected ({B},), one per pair")
        if wt.device != img_s.device:
            raise ValueError(f"contrastive_distill: {name} is on {wt.device}, features on {img_s.device}")
        if checking_values and not bool(((wt.detach() >= 0) & torch.isfinite(wt.detach())).all()):
            raise ValueError(f"contrastive_distill: {name} must be finite and >= 0")


def _poison(scale_s: torch.Tensor, scale_t, row_weight, col_weight) -> torch.Tensor:
    """``scale_s``, NaN where a tensor scale is not finite or a weight is negative
    or not finite: the value checks of a device tensor, without a host sync (the
    loss and every gradient then come out NaN)."""
    ok = torch.isfinite(scale_s.detach())
    if isinstance(scale_t, torch.Tensor):
        ok = ok & torch.isfinite(scale_t)
    for wt in (row_weight, col_weight):
        if wt is not None:
            ok = ok & ((wt >= 0) & torch.isfinite(wt)).all()
    return torch.where(ok, scale_s, torch.nan)


@torch.library.custom_op("mgcl::contrastive_distill", mutates_args=())
def _contrastive_distill_op(
    img_s: torch.Tensor,
    txt_s: torch.Tensor,
    img_t: torch.Tensor,
    txt_t: torch.Tensor,
    scale_s: torch.Tensor,
    scale_t: torch.Tensor,
    row_weight: Optional[torch.Tensor],
    col_weight: Optional[torch.Tensor],
    kd: float,
    cmc: float,
    i2t: float,
    t2i: float,
    need_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, d_img, d_txt, d_scale, parts = BACKENDS[backend](img_s, txt_s, img_t, txt_t, scale_s, scale_t, kd, cmc, i2t,
                                                           t2i, row_weight, col_weight, need_grad)
    if not need_grad:
        empty = img_s.new_empty(0)
        return loss, empty, empty.clone(), scale_s.new_empty(0), parts
    return loss, d_img, d_txt, d_scale.to(scale_s.dtype), parts


@_contrastive_distill_op.register_fake
def _(img_s, txt_s, img_t, txt_t, scale_s, scale_t, row_weight, col_weight, kd, cmc, i2t, t2i, need_grad, backend):
    ct = reference.compute_dtype(img_s.dtype)
    loss, parts = img_s.new_empty((), dtype=ct), img_s.new_empty(2, dtype=ct)
    if not need_grad:
        return loss, img_s.new_empty(0), img_s.new_empty(0), scale_s.new_empty(0), parts
    return loss, torch.empty_like(img_s), torch.empty_like(txt_s), scale_s.new_empty(()), parts


def _setup_context(ctx, inputs, output):
    _, d_img, d_txt, d_scale, parts = output
    img_s, txt_s, img_t, txt_t, scale_s, scale_t, row_weight, col_weight = inputs[:8]
    # the inputs too (references, no copies): a double backward re-derives the gradient from them
    ctx.save_for_backward(d_img, d_txt, d_scale, img_s, txt_s, img_t, txt_t, scale_s, scale_t, row_weight, col_weight)
    ctx.coefs = inputs[8:12]
    ctx.mark_non_differentiable(d_img, d_txt, d_scale, parts)


def _backward(ctx, grad, *_unused):
    d_img, d_txt, d_scale, *inputs = ctx.saved_tensors
    need = ctx.needs_input_grad
    if any(need[i] for i in (0, 1, 4)) and d_scale.dim() != 0:
        raise RuntimeError("contrastive_distill: the forward ran with need_grad=False")
    if torch.is_grad_enabled() and any(need[i] for i in (0, 1, 4)):
        return _graph_grads(inputs, ctx.coefs, need, grad)
    return (
        d_img * grad if need[0] else None,
        d_txt * grad if need[1] else None,
        None,
        None,
        (d_scale * grad).to(d_scale.dtype) if need[4] else None,
    ) + (None,) * 9


def _graph_grads(inputs, coefs, need, grad):
    """A backward under ``create_graph=True``: the fused forward's gradients are
    constants, so the gradient is re-derived, with its graph, by autograd
    through the dense reference (its B x B memory, for this call only)."""
    img_s, txt_s, img_t, txt_t, scale_s, scale_t, row_weight, col_weight = inputs
    loss = reference.contrastive_distill(img_s, txt_s, img_t, txt_t, scale_s, scale_t, *coefs, row_weight, col_weight)
    wrt = [x for x, i in zip((img_s, txt_s, scale_s), (0, 1, 4)) if need[i]]
    got = iter(torch.autograd.grad(loss, wrt, grad_outputs=grad, create_graph=True))
    return (next(got) if need[0] else None, next(got) if need[1] else None, None, None,
            next(got) if need[4] else None) + (None,) * 9


_contrastive_distill_op.register_autograd(_backward, setup_context=_setup_context)


def _group(gather: bool, process_group):
    if process_group is None and not gather:
        return None
    import torch.distributed as dist  # noqa: PLC0415

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("contrastive_distill: gather=True / process_group= needs torch.distributed initialised")
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def contrastive_distill(
    img_s: torch.Tensor,
    txt_s: torch.Tensor,
    img_t: torch.Tensor,
    txt_t: torch.Tensor,
    scale_s: Union[float, torch.Tensor],
    scale_t: Union[float, torch.Tensor],
    *,
    kd: float = 1.0,
    cmc: float = 0.0,
    i2t: float = 1.0,
    t2i: float = 1.0,
    row_weight: Optional[torch.Tensor] = None,
    col_weight: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    gather: bool = False,
    process_group=None,
    return_parts: bool = False,
):
    """CKT + CMC loss of a reference batch (SPEC.md section 5); a 0-d tensor.

    With ``S = scale_s*img_s@txt_s.T`` and ``T = scale_t*img_t@txt_t.T``::

        loss = kd*(i2t*sum_i w_i KL(softmax T[i,:] || softmax S[i,:])
                   + t2i*sum_j v_j KL(softmax T[:,j] || softmax S[:,j]))/B
             + cmc*(sum_i CE(S[i,:], i) + sum_j CE(S[:,j], j))/B

    Args:
        img_s, txt_s: student features [B, d] (float32/16, bfloat16 or float64),
            used as given (``mgcl.nn.ContrastiveDistillLoss`` normalises them).
        img_t, txt_t: teacher features [B, dt], constants (no gradient).
        scale_s, scale_t: logit scales, a float or a 0-d tensor; ``scale_s`` may
            require grad.
        kd, cmc: weights of the distillation (CKT) and the CLIP (CMC) terms.
        i2t, t2i: weights of the row (image -> text) and column KL.
        row_weight, col_weight: optional per-pair weights w, v (length B, >= 0).
        backend: ``"torch"`` (dense reference), ``"chunked"`` (CPU) or
            ``"triton"`` (CUDA); default by device (see ``mgcl._backend``).
        gather, process_group: multi-GPU form. Each rank passes its local pairs;
            the loss returned is the global-batch loss (rectangular local blocks,
            no global B x B), the feature gradients are the global loss's
            gradients for the local rows, and ``scale_s`` gets this rank's share
            (see ``distributed.py``).

        return_parts: also return the two unweighted terms as constants (for
            logging): ``(loss, ckt, cmc)`` with ``loss = kd*ckt + cmc*cmc``,
            ``ckt = (i2t*sum w r + t2i*sum v c)/B``, ``cmc = (sum p + sum q)/B``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs). NaN features give NaN.

    Raises ValueError on bad input (shapes, B = 0, non-finite scales or
    weights, negative weights, wrong weight length, mixed devices or dtypes).
    The checks of tensor values (a tensor scale that is not finite, a negative
    or non-finite weight) would each synchronise a GPU with the host, so on a
    GPU they make the loss and every gradient NaN instead of raising.

    Double backward (``create_graph=True``) works with every backend: the
    fused ones re-derive that gradient through the dense reference.
    """
    _check(img_s, txt_s, img_t, txt_t, scale_s, scale_t, kd, cmc, i2t, t2i, row_weight, col_weight)
    group = _group(gather, process_group)
    world = 1 if group is None else torch.distributed.get_world_size(group)
    name = _backend.select("contrastive_distill", BACKENDS, img_s.device, backend,
                           dtypes=(img_s.dtype, img_t.dtype), B=img_s.shape[0] * world)
    kd, cmc, i2t, t2i = float(kd), float(cmc), float(i2t), float(t2i)
    img_t, txt_t = img_t.detach(), txt_t.detach()
    row_weight = None if row_weight is None else row_weight.detach()
    col_weight = None if col_weight is None else col_weight.detach()
    ct = reference.compute_dtype(img_s.dtype)
    unchecked = img_s.device.type != "cpu" and any(
        isinstance(x, torch.Tensor) for x in (scale_s, scale_t, row_weight, col_weight))
    # torch.full, not torch.tensor: a copy from the host would synchronise with the GPU
    if not isinstance(scale_s, torch.Tensor):
        scale_s = torch.full((), float(scale_s), dtype=ct, device=img_s.device)
    if not isinstance(scale_t, torch.Tensor):
        scale_t = torch.full((), float(scale_t), dtype=ct, device=img_s.device)
    scale_t = scale_t.detach()
    if unchecked:
        scale_s = _poison(scale_s, scale_t, row_weight, col_weight)

    if group is not None:
        from . import distributed  # noqa: PLC0415

        if name == "torch":
            loss, parts = distributed.reference_loss(img_s, txt_s, img_t, txt_t, scale_s, scale_t, kd, cmc, i2t, t2i,
                                                     row_weight, col_weight, group)
        else:
            loss, parts = distributed.fused_loss(_engine(name), img_s, txt_s, img_t, txt_t, scale_s, scale_t, kd, cmc,
                                                 i2t, t2i, row_weight, col_weight, group)
    elif name == "torch":
        ckt, cmc_term = reference.parts(img_s, txt_s, img_t, txt_t, scale_s, scale_t, i2t, t2i, row_weight, col_weight)
        loss, parts = kd * ckt + cmc * cmc_term, torch.stack([ckt, cmc_term]).detach()
    else:
        need_grad = torch.is_grad_enabled() and (img_s.requires_grad or txt_s.requires_grad or scale_s.requires_grad)
        loss, _, _, _, parts = _contrastive_distill_op(img_s, txt_s, img_t, txt_t, scale_s, scale_t, row_weight,
                                                       col_weight, kd, cmc, i2t, t2i, need_grad, name)
    if return_parts:
        return loss, parts[0], parts[1]
    return loss


__all__ = ["contrastive_distill", "BACKENDS"]
