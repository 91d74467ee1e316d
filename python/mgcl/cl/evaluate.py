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
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .config import PROMPTS
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


def macro_auc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Macro one-vs-rest ROC-AUC (ties count half, as Mann-Whitney U).

    Classes with no positive or no negative sample are left out of the mean
    (AUC is undefined for them); NaN when no class is scorable.
    """
    probs = probs.double().cpu()
    labels = labels.long().cpu()
    n, C = probs.shape
    aucs = []
    for c in range(C):
        pos = labels == c
        n_pos = int(pos.sum())
        n_neg = n - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = _midranks(probs[:, c])
        u = float(ranks[pos].sum()) - n_pos * (n_pos + 1) / 2.0
        aucs.append(u / (n_pos * n_neg))
    return float(sum(aucs) / len(aucs)) if aucs else float("nan")


def _midranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties given their average rank."""
    order = torch.argsort(x, stable=True)
    xs = x[order]
    n = len(x)
    ranks = torch.empty(n, dtype=torch.float64)
    i = 0
    while i < n:
        j = i
        while j + 1 < n and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


class _Transformed(torch.utils.data.Dataset):
    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return self.transform(image), int(label)


@torch.no_grad()
def evaluate(model, task: Task, device, *, batch_size: int = 256, num_workers: int = 0, amp=None,
             head: Optional[torch.Tensor] = None, prompts: str = "ensemble") -> dict:
    """Top-1 accuracy (percent) and macro AUC (percent) on ``task.test`` (``prompts``: the head, see above)."""
    was_training = model.training
    model.eval()
    try:
        head = zero_shot_head(model, task, device, amp=amp, prompts=prompts) if head is None else head
        scale = model.logit_scale.exp().float()
        loader = torch.utils.data.DataLoader(_Transformed(task.test, model.transform(False)), batch_size=batch_size,
                                             shuffle=False, num_workers=num_workers)
        all_p, all_y = [], []
        for images, labels in loader:
            with autocast(device, amp):
                f = model.encode_image(images.to(device))
            logits = scale * F.normalize(f.float(), dim=-1) @ head.T
            all_p.append(logits.softmax(-1).cpu())
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
