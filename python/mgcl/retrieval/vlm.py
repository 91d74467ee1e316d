"""The rerank VLM's two encoders, the one place retrieval runs them: unit
float32 text and image embeddings on the CPU. ``vlm`` follows the
``mgcl.models`` protocol (``tokenize``, ``encode_text``, ``encode_image``,
``transform``) and is passed in as an object; batches run on the device of
its parameters.
"""
from __future__ import annotations

import numpy as np
import torch

from .images import UnreadableImage, open_image


def device_of(vlm) -> torch.device:
    try:
        return next(iter(vlm.parameters())).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1).cpu()


def encode_texts(vlm, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Unit VLM text embeddings, float32 [len(texts), d] on the CPU."""
    dev = device_of(vlm)
    out = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            out.append(_unit(vlm.encode_text(vlm.tokenize(list(texts[s:s + batch_size])).to(dev))))
    return torch.cat(out) if out else torch.zeros(0, 0)


def encode_images(vlm, images, batch_size: int = 32, *, dim: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Unit VLM image embeddings of ``images`` and which of them could be read.

    ``images``: image references (``images.open_image``), PIL images, or
    tensors already through ``vlm.transform(False)``. Returns float32
    [n, d] on the CPU, a zero row where a reference cannot be opened, and a
    bool [n] array (True = encoded). The items are taken in windows of
    ``batch_size``; each window's readable images form one batch, so the
    batches, and with them the bits, depend only on the items. ``dim``: the
    width to give the zero rows when nothing is readable (default: asked of
    the text tower).
    """
    tf = vlm.transform(False)
    dev = device_of(vlm)
    n = len(images)
    rows: list = [None] * n
    for s in range(0, n, batch_size):
        chunk, pos = [], []
        for i in range(s, min(s + batch_size, n)):
            item = images[i]
            if isinstance(item, str):
                try:
                    item = open_image(item)
                except (OSError, UnreadableImage):
                    continue
            chunk.append(item if isinstance(item, torch.Tensor) else tf(item))
            pos.append(i)
        if chunk:
            with torch.no_grad():
                f = _unit(vlm.encode_image(torch.stack(chunk).to(dev)))
            for i, r in zip(pos, f):
                rows[i] = r
    ok = np.array([r is not None for r in rows], dtype=bool)
    width = next((r.shape[0] for r in rows if r is not None), None) or dim or encode_texts(vlm, ["x"]).shape[1]
    zero = torch.zeros(width)
    feats = torch.stack([r if r is not None else zero for r in rows]) if n else torch.zeros(0, width)
    return feats, ok


__all__ = ["encode_texts", "encode_images", "device_of"]
