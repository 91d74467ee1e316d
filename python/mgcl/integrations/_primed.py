"""What both integrations share: the PRIMED losses of one micro-batch for a
CLIP-like model, the parts a losses callable returns, and the running means of
the logged terms."""
from __future__ import annotations

from typing import Iterator, Mapping, Optional

import torch
import torch.nn.functional as F

from ..guard import FisherGuard
from ..nn import PrimedLoss, PrimedLossOutput

LOGGED = ("ce", "ckt", "cmc", "distill")


class PrimedLosses:
    """PRIMED's losses (SPEC.md section 5) of one micro-batch, for a student with
    ``encode_image``, ``encode_text`` and ``logit_scale`` (``mgcl.models``: TinyCLIP,
    HFCLIP around a ``transformers.CLIPModel``, OpenCLIP).

    ``teacher``: the frozen model of the previous task (eval mode, no grad);
    ``class_tokens``: the task's class prompts, tokenized (one per class); the
    task logits are ``scale * normalize(image) @ normalize(text(class_tokens)).T``;
    ``references``: an iterator of reference batches with ``images``, ``tokens``
    and ``weights`` (e.g. ``mgcl.cl.strategies.refdata.reference_batches``), one
    drawn per micro-batch; ``loss``: a ``mgcl.nn.PrimedLoss`` (default: alpha 1,
    beta 0.25, label smoothing 0.2).

    ``losses(model, inputs)`` takes ``inputs["images"]`` and ``inputs["labels"]``
    and returns a ``PrimedLossOutput`` (ce, ckt, cmc, distill, total).
    """

    def __init__(self, teacher: torch.nn.Module, class_tokens: torch.Tensor, references: Iterator,
                 loss: Optional[PrimedLoss] = None):
        if not isinstance(class_tokens, torch.Tensor) or class_tokens.dim() != 2:
            raise ValueError("PrimedLosses: class_tokens must be a [classes, length] tensor of token ids")
        if not hasattr(references, "__next__"):
            raise ValueError(f"PrimedLosses: references must be an iterator of reference batches, "
                             f"got {type(references).__name__}")
        self.teacher, self.class_tokens, self.references = teacher, class_tokens, references
        self.loss = loss if loss is not None else PrimedLoss()

    def __call__(self, model, inputs: Mapping) -> PrimedLossOutput:
        images, labels = inputs["images"], inputs["labels"]
        dev = images.device
        ref = next(self.references)
        head = F.normalize(model.encode_text(self.class_tokens.to(dev)).float(), dim=-1)
        img = F.normalize(model.encode_image(images).float(), dim=-1)
        logits = model.logit_scale.exp().float() * img @ head.T
        ref_images, ref_tokens = ref.images.to(dev), ref.tokens.to(dev)
        img_s, txt_s = model.encode_image(ref_images).float(), model.encode_text(ref_tokens).float()
        with torch.no_grad():
            img_t = self.teacher.encode_image(ref_images).float()
            txt_t = self.teacher.encode_text(ref_tokens).float()
        weights = getattr(ref, "weights", None)
        return self.loss(logits, labels.to(dev), img_s, txt_s, img_t, txt_t, model.logit_scale.exp().float(),
                         self.teacher.logit_scale.exp().float(), None if weights is None else weights.to(dev))


def parts(out, who: str) -> dict:
    """The losses of a micro-batch as a dict: ``distill`` and ``ce`` (0-d, with
    gradient), and ``ckt`` / ``cmc`` when given (a PrimedLossOutput or a mapping)."""
    d = out._asdict() if isinstance(out, PrimedLossOutput) else out
    if not isinstance(d, Mapping) or "distill" not in d or "ce" not in d:
        raise ValueError(f"{who}: the losses callable must return a mgcl.nn.PrimedLossOutput or a mapping with "
                         f"'distill' and 'ce' (0-d tensors), got {type(out).__name__}")
    return dict(d)


def make_guard(guard, params, scaler, who: str) -> FisherGuard:
    """``guard`` itself when it is a FisherGuard, else a FisherGuard over ``params``
    with the options in the mapping ``guard`` (lam, mode, ema, normalize, backend)."""
    if isinstance(guard, FisherGuard):
        return guard
    if not isinstance(guard, Mapping) or "lam" not in guard:
        raise ValueError(f"{who}: guard must be a mgcl.FisherGuard or a dict of its options with 'lam', "
                         f"got {guard!r}")
    return FisherGuard([p for p in params if p.requires_grad], scaler=scaler, **guard)


class Terms:
    """Running sums of the logged terms since the last ``means()``, kept as detached
    tensors (no host sync per micro-batch)."""

    def __init__(self):
        self.sums: dict = {}
        self.counts: dict = {}

    def add(self, values: Mapping) -> None:
        for name, v in values.items():
            if isinstance(v, torch.Tensor) and v.dim() == 0:
                v = v.detach().float()
                self.sums[name] = self.sums[name] + v.to(self.sums[name].device) if name in self.sums else v
                self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        out = {name: float(s) / self.counts[name] for name, s in self.sums.items()}
        self.sums, self.counts = {}, {}
        return out
