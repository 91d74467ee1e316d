"""The first and the tensor step of every adapter's ``transform``: datasets may
hold PIL images, or image tensors / arrays (generated data).

- ``as_image``: a PIL image -> RGB (as before); a tensor or array -> float32
  ``[3,H,W]`` in [0, 1] (uint8 is divided by 255; ``[H,W]``, one channel and
  channel-last ``[H,W,1|3]`` arrays are accepted), so the resize / crop steps
  that follow work on it;
- ``to_tensor``: ``ToTensor`` for PIL images, tensors pass through.
"""
from __future__ import annotations

import torch


def as_image(img):
    if hasattr(img, "convert"):
        return img.convert("RGB")
    x = torch.as_tensor(img)
    if x.ndim == 3 and x.shape[0] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(2, 0, 1)  # an [H,W,C] array
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"transform: expected a PIL image or a [3,H,W] / [1,H,W] / [H,W] image tensor, "
                         f"got shape {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def to_tensor(img) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        return img
    from torchvision.transforms import functional as TF  # noqa: PLC0415

    return TF.to_tensor(img)
