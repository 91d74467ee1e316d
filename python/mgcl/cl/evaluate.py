"""Zero-shot heads and per-task scoring (SPEC.md sections 1 and 7).

A task's head: every template x class name embedded by the current text
encoder, each normalised, averaged over templates, renormalised
(``prompts="ensemble"``, the default); ``prompts="first"``: the first
template's prompt of each class only. An image is
scored among the task's own classes only (task-incremental): logits =
scale * normalise(image feature) @ head^T. Accuracy is top-1; AUC is macro
one-vs-rest ROC-AUC on the softmax over the task's classes.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .config import PROMPTS
from .metrics import macro_auc
from .tasks import Task


def autocast(device: torch.device, amp: Optional[str]):
    """``amp`` "bf16" -> bfloat16 autocast on ``device``; None/"off" -> nothing."""
    if amp == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def text_features(model, tokens: torch.Tensor, device, *, batch_size: int = 256, amp=None) -> torch.Tensor:
    """Normalised float32 text features of ``tokens`` (no_grad is the caller's choice)."""
    out = []
    for i in range(0, len(tokens), batch_size):
        with autocast(device, amp):
            f = model.encode_text(tokens[i:i + batch_size].to(device))
        out.append(F.normalize(f.float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def zero_shot_head(model, task: Task, device, *, amp=None, prompts: str = "ensemble") -> torch.Tensor:
    """``[C, d]`` unit-norm class embeddings from all templates x class names
    (``prompts="ensemble"``) or from the first template (``"first"``)."""
    if prompts not in PROMPTS:
        raise ValueError(f"zero_shot_head: prompts must be one of {list(PROMPTS)}, got {prompts!r}")
    T, C = len(task.templates) if prompts == "ensemble" else 1, len(task.classnames)
    tokens = model.tokenize(task.prompts(None if prompts == "ensemble" else 0))  # template-major: t * C + c
    feats = text_features(model, tokens, device, amp=amp).view(T, C, -1)
    return F.normalize(feats.mean(0), dim=-1)


class _Transformed(torch.utils.data.Dataset):
    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return self.transform(image), int(label)


def head_logits(features: torch.Tensor, head: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """``exp(logit_scale) * normalise(features) @ head.T`` in float32: image
    features scored against a ``[C, d]`` head."""
    return logit_scale.exp().float() * F.normalize(features.float(), dim=-1) @ head.T


def image_logits(model, images: torch.Tensor, head: torch.Tensor, device, amp=None) -> torch.Tensor:
    """The default scoring of a test batch: ``model.encode_image`` (under ``amp``) against ``head``."""
    with autocast(device, amp):
        f = model.encode_image(images)
    return head_logits(f, head, model.logit_scale)


@torch.no_grad()
def evaluate(model, task: Task, device, *, batch_size: int = 256, num_workers: int = 0, amp=None,
             head: Optional[torch.Tensor] = None, logits: Optional[Callable] = None, prompts: str = "ensemble") -> dict:
    """Top-1 accuracy (percent) and macro AUC (percent) on ``task.test``.
    ``head``: the class embeddings (default: the zero-shot head); ``logits``:
    ``images (on device) -> [B, C]`` instead of scoring ``model.encode_image``
    against the head (a strategy's ``eval_logits``); ``prompts``: the default head's, see above."""
    was_training = model.training
    model.eval()
    try:
        if logits is None:
            head = zero_shot_head(model, task, device, amp=amp, prompts=prompts) if head is None else head

            def logits(images):
                return image_logits(model, images, head, device, amp)

        loader = torch.utils.data.DataLoader(_Transformed(task.test, model.transform(False)), batch_size=batch_size,
                                             shuffle=False, num_workers=num_workers)
        all_p, all_y = [], []
        for images, labels in loader:
            all_p.append(logits(images.to(device)).softmax(-1).cpu())
            all_y.append(labels)
    finally:
        model.train(was_training)
    if not all_p:
        raise ValueError(f"evaluate: task {task.name!r} has an empty test set")
    p, y = torch.cat(all_p), torch.cat(all_y)
    acc = 100.0 * float((p.argmax(1) == y).double().mean())
    return {"acc": acc, "auc": 100.0 * macro_auc(p, y), "n": len(y)}


def evaluate_all(model, tasks: Sequence[Task], device, **kw) -> tuple[list[float], list[float]]:
    """Accuracy and AUC of every task (percent)."""
    rows = [evaluate(model, t, device, **kw) for t in tasks]
    return [r["acc"] for r in rows], [r["auc"] for r in rows]
