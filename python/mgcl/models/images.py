"""The first and the tensor step of every adapter's ``transform``: datasets may
hold PIL images, or image tensors / arrays (generated data).

- ``as_image``: a PIL image -> RGB (as before); a tensor or array -> float32
  ``[3,H,W]`` in [0, 1] (uint8 is divided by 255; ``[H,W]``, one channel and
  channel-last ``[H,W,1|3]`` arrays are accepted), so the resize / crop steps
  that follow work on it;
- ``to_tensor``: a PIL image -> float32 ``[C,H,W]`` in [0, 1], tensors pass through;
- the resize / crop / normalise steps of TinyCLIP's transforms (below), on
  PIL images and tensors, with torch and Pillow alone.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
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
    """A PIL image -> float32 [C,H,W] in [0, 1]; tensors pass through."""
    if isinstance(img, torch.Tensor):
        return img
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    x = x[:, :, None] if x.ndim == 2 else x
    return x.permute(2, 0, 1).contiguous().float().div(255)


# ---- the resize / crop steps, on PIL images and on [C,H,W] float tensors ---------------------
# TinyCLIP's transforms with torch and Pillow alone (torchvision stays optional:
# a plain `pip install mgcl` with any torch runs the demo). Each step is the
# usual one: PIL images resize with Pillow's bilinear filter (antialiased by
# construction), tensors with torch's antialiased bilinear interpolation; the
# random crop draws its box from torch's generator (tests/test_images.py checks
# all of it against torchvision's transforms where torchvision is installed).

def _size(img) -> tuple[int, int]:
    """(height, width) of a PIL image or a [C,H,W] tensor."""
    return (img.size[1], img.size[0]) if hasattr(img, "size") and not isinstance(img, torch.Tensor) \
        else (int(img.shape[-2]), int(img.shape[-1]))


def _resize_to(img, h: int, w: int):
    if _size(img) == (h, w):
        return img
    if isinstance(img, torch.Tensor):
        return torch.nn.functional.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False,
                                               antialias=True)[0]
    from PIL import Image  # noqa: PLC0415

    return img.resize((w, h), Image.BILINEAR)


def _crop(img, top: int, left: int, h: int, w: int):
    if isinstance(img, torch.Tensor):
        return img[..., top:top + h, left:left + w]
    return img.crop((left, top, left + w, top + h))


def resize_shorter(img, size: int):
    """Scale so that the shorter side is ``size`` (the longer one truncates)."""
    h, w = _size(img)
    if h <= w:
        return _resize_to(img, size, int(size * w / h))
    return _resize_to(img, int(size * h / w), size)


def center_crop(img, size: int):
    """The central ``size`` x ``size`` window (the image is at least that large)."""
    h, w = _size(img)
    if h < size or w < size:
        raise ValueError(f"center_crop: a {h}x{w} image is smaller than {size}x{size}")
    return _crop(img, int(round((h - size) / 2.0)), int(round((w - size) / 2.0)), size, size)


def random_box(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random window of an h x w image whose
    area is a uniform fraction in ``scale`` of the image's and whose aspect
    ratio is log-uniform in ``ratio``: up to 10 draws, then the largest central
    window within ``ratio``. Draws from torch's default generator."""
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    log_ratio = torch.log(torch.tensor(ratio))  # the bounds in float32, as the draws use them
    for _ in range(10):
        area = h * w * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = torch.randint(0, h - ch + 1, size=(1,)).item()
            left = torch.randint(0, w - cw + 1, size=(1,)).item()
            return top, left, ch, cw
    aspect = w / h
    if aspect < math.exp(lo):
        cw, ch = w, int(round(w / ratio[0]))
    elif aspect > math.exp(hi):
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def random_resized_crop(img, size: int, scale: tuple[float, float], ratio: tuple[float, float]):
    """A ``random_box`` window scaled to ``size`` x ``size``."""
    top, left, h, w = random_box(*_size(img), scale, ratio)
    return _resize_to(_crop(img, top, left, h, w), size, size)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel of a [C,H,W] float tensor."""
    m = torch.as_tensor(mean, dtype=x.dtype)[:, None, None]
    s = torch.as_tensor(std, dtype=x.dtype)[:, None, None]
    return (x - m) / s


def compose(*steps, deterministic: bool):
    """The steps applied in order; ``deterministic`` says whether they draw no
    random numbers (``mgcl.cl.strategies.refdata.is_deterministic`` reads it)."""
    def run(img):
        for step in steps:
            img = step(img)
        return img
    run.deterministic = deterministic
    return run
