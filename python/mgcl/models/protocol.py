"""The one protocol every vision-language model adapter follows.

Retrieval, the continual trainer and the strategies talk to models only
through this interface, so BiomedCLIP (open_clip), Hugging Face CLIP and the
built-in TinyCLIP are interchangeable.
"""
from __future__ import annotations

from typing import Callable, Iterator, Protocol, runtime_checkable

import torch


@runtime_checkable
class VLM(Protocol):
    """A CLIP-style model.

    - ``encode_image(images)``: float tensor ``[B,3,H,W]`` (already through
      ``transform``) -> ``[B,d]`` image features, NOT normalised.
    - ``encode_text(tokens)``: the output of ``tokenize`` -> ``[B,d]`` text
      features, NOT normalised (callers normalise).
    - ``tokenize(texts)``: ``list[str]`` -> token tensor ``[B,L]`` (int64) on the CPU.
    - ``logit_scale``: a 0-d parameter holding log(scale) as in CLIP
      (the similarity scale is ``logit_scale.exp()``).
    - ``transform(train)``: callable mapping a PIL image to a ``[3,H,W]`` float tensor
      (augmenting when ``train`` is True).
    - ``parameters()``: the trainable parameters (an ``nn.Module`` provides it).
    """

    logit_scale: torch.Tensor

    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def tokenize(self, texts: list[str]) -> torch.Tensor: ...

    def transform(self, train: bool) -> Callable: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...
