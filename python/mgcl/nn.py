"""Drop-in loss modules for any training loop (SPEC.md section 5).

- :class:`ContrastiveDistillLoss`: CKT + CMC on a reference batch, the fused
  :func:`mgcl.ops.contrastive_distill.contrastive_distill` behind an ``nn.Module``;
- :class:`PrimedLoss`: the whole PRIMED training loss, task cross-entropy plus
  ``alpha * CKT + beta * CMC``, returned as named parts so that the Fisher
  guard can see the distillation gradient first.

Example (any trainer; ``model`` is a CLIP-like student, ``teacher`` a frozen copy)::

    import torch, mgcl
    from mgcl.nn import PrimedLoss

    loss_fn = PrimedLoss(alpha=1.0, beta=0.25, label_smoothing=0.2)
    guard = mgcl.FisherGuard(model.parameters(), lam=1e3, mode="dfg")
    for (images, labels), (ref_images, ref_tokens) in zip(task_loader, ref_loader):
        logits = model.classify(images)                      # [n, classes]
        img_s, txt_s = model.encode_image(ref_images), model.encode_text(ref_tokens)
        with torch.no_grad():
            img_t, txt_t = teacher.encode_image(ref_images), teacher.encode_text(ref_tokens)
        out = loss_fn(logits, labels, img_s, txt_s, img_t, txt_t,
                      model.logit_scale.exp(), teacher.logit_scale.exp())
        opt.zero_grad()
        out.distill.backward(retain_graph=True)   # p.grad = d(alpha*CKT + beta*CMC)/dp
        guard.apply()                             # Fisher guard from that gradient
        out.ce.backward()                         # then the task gradient on top
        opt.step()
        print(f"ce {out.ce:.3f} ckt {out.ckt:.3f} cmc {out.cmc:.3f}")

Without a guard, ``out.total.backward()`` is the plain step.

Conventions, against open_clip's losses (``open_clip.loss``). With the same
features and scales, ``i2t = t2i = 1`` and no pair weights:

- CMC (mgcl) is the SUM of the two CE directions, each a mean over its pairs;
  ``ClipLoss`` (and ``DistillClipLoss``'s ``contrastive_loss``) is their MEAN:
  ``CMC = 2 * ClipLoss``.
- CKT (mgcl) is the sum of the row and column KL(teacher || student), each a
  mean over the batch; ``DistillClipLoss``'s ``distill_loss`` is the mean of the
  row and column soft cross-entropies, and a soft cross-entropy is the KL plus
  the teacher's entropy H (a constant for the student):
  ``CKT = 2 * distill_loss - H`` with ``H`` = mean row entropy + mean column
  entropy of the teacher softmaxes; so ``dCKT = 2 * d(distill_loss)``.

``convention="open_clip"`` on :class:`ContrastiveDistillLoss` and
:class:`PrimedLoss` halves both terms, so that ``kd`` / ``cmc`` (``alpha`` /
``beta``) are open_clip's loss weights: the gradients are then exactly those of
``kd * distill_loss + cmc * contrastive_loss``, and the CMC value is
``ClipLoss``'s; the CKT value is the KL part, ``distill_loss - H / 2`` (the
entropy has no gradient and is not computed). The default ``convention="mgcl"``
is SPEC.md's (the paper's) scaling. Numbers on one batch (the test suite checks
them; README.md shows them too):

    >>> import torch
    >>> import open_clip.loss as oc
    >>> from mgcl.nn import ContrastiveDistillLoss
    >>> from mgcl.testing import distill_batch
    >>> img, txt, img_t, txt_t = distill_batch(8, 16, seed=0)   # unit-norm features
    >>> s, t = torch.tensor(10.0), torch.tensor(12.0)           # student, teacher logit scales
    >>> contrastive, distill = oc.DistillClipLoss()(img, txt, s, img_t, txt_t, t)
    >>> T = t * img_t @ txt_t.T
    >>> H = -(T.softmax(1) * T.log_softmax(1)).sum(1).mean() - (T.softmax(0) * T.log_softmax(0)).sum(0).mean()
    >>> def ours(kd, cmc, convention="mgcl"):
    ...     loss = ContrastiveDistillLoss(kd=kd, cmc=cmc, convention=convention)
    ...     return float(loss(img, txt, img_t, txt_t, s, t))
    >>> print(f"ClipLoss {float(contrastive):.4f}  CMC {ours(0, 1):.4f}  open_clip CMC {ours(0, 1, 'open_clip'):.4f}")
    ClipLoss 0.5725  CMC 1.1450  open_clip CMC 0.5725
    >>> print(f"distill_loss {float(distill):.4f}  H {float(H):.4f}  CKT {ours(1, 0):.4f}  "
    ...       f"open_clip CKT {ours(1, 0, 'open_clip'):.4f}")
    distill_loss 4.5716  H 1.8829  CKT 7.2603  open_clip CKT 3.6301
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from .ops.contrastive_distill import contrastive_distill

Scale = Union[float, torch.Tensor]


CONVENTIONS = ("mgcl", "open_clip")


def _weights(weight, row_weight, col_weight):
    return (row_weight if row_weight is not None else weight), (col_weight if col_weight is not None else weight)


def _term_scale(owner: str, convention: str) -> float:
    """What each term is multiplied by in ``convention`` (see the module doc)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"{owner}: convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    return 0.5 if convention == "open_clip" else 1.0


class ContrastiveDistillLoss(torch.nn.Module):
    """``kd * CKT + cmc * CMC`` of a reference batch (a 0-d tensor).

    CKT is the row (image -> text, weight ``i2t``) and column (text -> image,
    weight ``t2i``) KL divergence between the teacher's and the student's
    similarity softmaxes; CMC is the CLIP loss of the student (both CE
    directions summed); both are averaged over the B pairs. With
    ``normalize=True`` the four feature sets are L2-normalised first.

    ``forward(img_s, txt_s, img_t, txt_t, scale_s, scale_t, weight=None, *,
    row_weight=None, col_weight=None)``: features [B, d] (teacher [B, dt]),
    logit scales (float or 0-d tensor, e.g. ``model.logit_scale.exp()``),
    optional per-pair weights (``weight`` applies to both directions;
    ``row_weight`` / ``col_weight`` override one). The teacher is a constant.

    ``backend``, ``gather`` and ``process_group`` are passed to the op
    (``gather=True`` under DDP: the global-batch loss from each rank's pairs).
    ``convention="open_clip"`` halves both terms: ``kd`` and ``cmc`` are then
    open_clip's ``DistillClipLoss`` / ``ClipLoss`` weights (module doc).

    Under autocast pass the features in the dtype the model produced (bf16):
    the GPU path then runs bf16 tiles with float32 accumulation; float32
    features run float32 dots (IEEE unless torch allows TF32).

    Example::

        loss_fn = ContrastiveDistillLoss(kd=1.0, cmc=0.25)
        loss = loss_fn(img_s, txt_s, img_t, txt_t, model.logit_scale.exp(), 100.0)
        loss.backward()
    """

    def __init__(self, kd: float = 1.0, cmc: float = 0.25, i2t: float = 1.0, t2i: float = 1.0, normalize: bool = True,
                 *, backend: Optional[str] = None, gather: bool = False, process_group=None,
                 convention: str = "mgcl"):
        super().__init__()
        self.term_scale = _term_scale("ContrastiveDistillLoss", convention)
        self.kd, self.cmc, self.i2t, self.t2i = float(kd), float(cmc), float(i2t), float(t2i)
        self.normalize, self.convention = bool(normalize), convention
        self.backend, self.gather, self.process_group = backend, gather, process_group

    def extra_repr(self) -> str:
        return (f"kd={self.kd}, cmc={self.cmc}, i2t={self.i2t}, t2i={self.t2i}, normalize={self.normalize}, "
                f"convention={self.convention!r}")

    def forward(self, img_s: torch.Tensor, txt_s: torch.Tensor, img_t: torch.Tensor, txt_t: torch.Tensor,
                scale_s: Scale, scale_t: Scale, weight: Optional[torch.Tensor] = None, *,
                row_weight: Optional[torch.Tensor] = None, col_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.normalize:
            img_s, txt_s = F.normalize(img_s, dim=-1), F.normalize(txt_s, dim=-1)
            img_t, txt_t = F.normalize(img_t.detach(), dim=-1), F.normalize(txt_t.detach(), dim=-1)
        row_weight, col_weight = _weights(weight, row_weight, col_weight)
        return contrastive_distill(img_s, txt_s, img_t, txt_t, scale_s, scale_t, kd=self.kd * self.term_scale,
                                   cmc=self.cmc * self.term_scale, i2t=self.i2t, t2i=self.t2i, row_weight=row_weight,
                                   col_weight=col_weight, backend=self.backend, gather=self.gather,
                                   process_group=self.process_group)


class PrimedLossOutput(NamedTuple):
    """The parts of one PRIMED step's loss.

    ``total = ce + distill`` and ``distill = alpha * ckt + beta * cmc`` carry
    gradients; ``ckt`` and ``cmc`` (the unweighted terms in the loss's
    convention, from the same fused pass) are detached 0-d tensors for logging
    (``float(out.ckt)``, or a trainer's log dict), holding no graph.
    """

    total: torch.Tensor
    ce: torch.Tensor
    ckt: torch.Tensor
    cmc: torch.Tensor
    distill: torch.Tensor


LABEL_SMOOTHING_RULE = "a number in [0, 1) (at 1 the target is uniform whatever the label)"


def label_smoothing_ok(ls) -> bool:
    """The one rule for label smoothing, PrimedLoss's and mgcl.cl.TrainConfig's."""
    return not isinstance(ls, bool) and isinstance(ls, (int, float)) and 0.0 <= ls < 1.0


class PrimedLoss(torch.nn.Module):
    """Task CE (with label smoothing) + ``alpha * CKT + beta * CMC`` on a reference batch.

    ``forward(logits, labels, img_s, txt_s, img_t, txt_t, scale_s, scale_t,
    weight=None, *, row_weight=None, col_weight=None) -> PrimedLossOutput``
    with ``total, ce, ckt, cmc, distill``. ``distill`` is the part the Fisher
    guard must see first (backward it, ``guard.apply()``, then backward ``ce``;
    see the module example). ``i2t``, ``t2i``, ``normalize``, ``backend``,
    ``gather``, ``process_group`` and ``convention`` are as in
    :class:`ContrastiveDistillLoss` (``convention="open_clip"``: ``alpha`` and
    ``beta`` are open_clip's distill / contrastive weights).

    Example:
        >>> import torch
        >>> from mgcl.nn import PrimedLoss
        >>> _ = torch.manual_seed(0)
        >>> loss_fn = PrimedLoss(alpha=1.0, beta=0.25, label_smoothing=0.2)
        >>> logits = torch.randn(8, 5, requires_grad=True)          # task batch
        >>> labels = torch.randint(0, 5, (8,))
        >>> img_s = torch.randn(16, 32, requires_grad=True)         # reference batch, student
        >>> txt_s = torch.randn(16, 32, requires_grad=True)
        >>> img_t, txt_t = img_s.detach() + 0.1, txt_s.detach()     # teacher
        >>> scale = torch.tensor(14.0, requires_grad=True)
        >>> out = loss_fn(logits, labels, img_s, txt_s, img_t, txt_t, scale, 14.0)
        >>> out._fields
        ('total', 'ce', 'ckt', 'cmc', 'distill')
        >>> bool(torch.isclose(out.distill, 1.0 * out.ckt + 0.25 * out.cmc))
        True
        >>> out.distill.backward(retain_graph=True)  # the Fisher guard would read the grads here
        >>> out.ce.backward()
        >>> img_s.grad.shape, logits.grad.shape
        (torch.Size([16, 32]), torch.Size([8, 5]))
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.25, label_smoothing: float = 0.2, *, i2t: float = 1.0,
                 t2i: float = 1.0, normalize: bool = True, backend: Optional[str] = None, gather: bool = False,
                 process_group=None, convention: str = "mgcl"):
        super().__init__()
        if not label_smoothing_ok(label_smoothing):
            raise ValueError(f"PrimedLoss: label_smoothing must be {LABEL_SMOOTHING_RULE}, got {label_smoothing!r}")
        self.term_scale = _term_scale("PrimedLoss", convention)
        self.alpha, self.beta, self.label_smoothing = float(alpha), float(beta), float(label_smoothing)
        self.i2t, self.t2i, self.normalize, self.convention = float(i2t), float(t2i), bool(normalize), convention
        self.backend, self.gather, self.process_group = backend, gather, process_group

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, label_smoothing={self.label_smoothing}, i2t={self.i2t}, "
                f"t2i={self.t2i}, normalize={self.normalize}, convention={self.convention!r}")

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, img_s: torch.Tensor, txt_s: torch.Tensor,
                img_t: torch.Tensor, txt_t: torch.Tensor, scale_s: Scale, scale_t: Scale,
                weight: Optional[torch.Tensor] = None, *, row_weight: Optional[torch.Tensor] = None,
                col_weight: Optional[torch.Tensor] = None) -> PrimedLossOutput:
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        if self.normalize:
            img_s, txt_s = F.normalize(img_s, dim=-1), F.normalize(txt_s, dim=-1)
            img_t, txt_t = F.normalize(img_t.detach(), dim=-1), F.normalize(txt_t.detach(), dim=-1)
        row_weight, col_weight = _weights(weight, row_weight, col_weight)
        distill, ckt, cmc = contrastive_distill(
            img_s, txt_s, img_t, txt_t, scale_s, scale_t, kd=self.alpha * self.term_scale,
            cmc=self.beta * self.term_scale, i2t=self.i2t, t2i=self.t2i, row_weight=row_weight, col_weight=col_weight,
            backend=self.backend, gather=self.gather, process_group=self.process_group, return_parts=True,
        )
        if self.term_scale != 1.0:
            ckt, cmc = ckt * self.term_scale, cmc * self.term_scale
        return PrimedLossOutput(total=ce + distill, ce=ce, ckt=ckt, cmc=cmc, distill=distill)


__all__ = ["ContrastiveDistillLoss", "PrimedLoss", "PrimedLossOutput"]
