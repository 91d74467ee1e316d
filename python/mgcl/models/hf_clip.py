"""Hugging Face ``transformers.CLIPModel`` behind the :class:`mgcl.models.VLM` protocol.

- ``HFCLIP(config)``: random init from a ``CLIPConfig`` (offline);
- ``HFCLIP.from_pretrained(path_or_name)``: a local model directory (safetensors
  weights only) or a hub name (online).

The tokenizer: the ``CLIPTokenizer`` files of the model directory when present
(or ``tokenizer=``); otherwise open_clip's bundled byte-pair encoder, which is
the same OpenAI CLIP vocabulary (49,408 tokens, ``<|startoftext|>`` 49406,
``<|endoftext|>`` 49407) and so gives the same ids offline. The text tower
pools at the first end-of-text token and is causal, so padding never matters.
A config with a smaller vocabulary (a test-sized one) gets the BPE ids folded
into it: it runs, but pools at the config's ``eos_token_id`` only when that
id fits the vocabulary.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch
from torch import nn

from .images import as_image, to_tensor

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BPE_VOCAB = 49408

log = logging.getLogger("mgcl.models")


class HFCLIP(nn.Module):
    def __init__(self, config_or_model, *, tokenizer: Optional[Callable] = None):
        super().__init__()
        from transformers import CLIPConfig, CLIPModel  # noqa: PLC0415

        if isinstance(config_or_model, CLIPModel):
            self.model = config_or_model
        elif isinstance(config_or_model, CLIPConfig):
            self.model = CLIPModel(config_or_model)
        else:
            raise ValueError("HFCLIP: pass a transformers.CLIPConfig or CLIPModel")
        cfg = self.model.config
        self.context_length = cfg.text_config.max_position_embeddings
        self.image_size = cfg.vision_config.image_size
        self.tokenizer_source = "given" if tokenizer is not None else "open_clip-bpe"
        if tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer  # noqa: PLC0415

            tokenizer = SimpleTokenizer(context_length=self.context_length)
            if cfg.text_config.vocab_size < BPE_VOCAB:
                tokenizer = _Folded(tokenizer, cfg.text_config)
                self.tokenizer_source = "open_clip-bpe-folded"
                log.warning("HFCLIP: text vocab_size %d < %d: OpenAI BPE ids are folded into the vocabulary "
                            "(fine for a randomly initialised model; pass tokenizer= for real weights)",
                            cfg.text_config.vocab_size, BPE_VOCAB)
        self.tokenizer = tokenizer

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model.vision_model(pixel_values=images)
        return self.model.visual_projection(out.pooler_output)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model.text_model(input_ids=tokens)
        return self.model.text_projection(out.pooler_output)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        t = self.tokenizer(list(texts))
        if hasattr(t, "input_ids"):  # a transformers tokenizer called directly
            t = t.input_ids
        return torch.as_tensor(t, dtype=torch.int64).cpu()

    def transform(self, train: bool):
        from torchvision import transforms as T  # noqa: PLC0415

        s = self.image_size
        bicubic = T.InterpolationMode.BICUBIC
        if train:
            head = [T.RandomResizedCrop(s, scale=(0.9, 1.0), interpolation=bicubic, antialias=True)]
        else:
            head = [T.Resize(s, interpolation=bicubic, antialias=True), T.CenterCrop(s)]
        return T.Compose([as_image, *head, to_tensor, T.Normalize(OPENAI_MEAN, OPENAI_STD)])

    @classmethod
    def from_pretrained(cls, path_or_name: str, *, tokenizer=None, device="cpu") -> "HFCLIP":
        from transformers import CLIPModel, CLIPTokenizerFast  # noqa: PLC0415

        if os.path.isdir(path_or_name) and not any(f.endswith(".safetensors") for f in os.listdir(path_or_name)):
            raise ValueError(f"HFCLIP.from_pretrained: {path_or_name} has no *.safetensors weights "
                             "(pickled checkpoints are not read)")
        model = CLIPModel.from_pretrained(path_or_name, use_safetensors=True)
        if tokenizer is None:
            has_tok = os.path.isdir(path_or_name) and any(
                os.path.isfile(os.path.join(path_or_name, f)) for f in ("vocab.json", "tokenizer.json"))
            if has_tok or not os.path.isdir(path_or_name):
                tokenizer = _HFTokenizer(CLIPTokenizerFast.from_pretrained(path_or_name),
                                         model.config.text_config.max_position_embeddings)
        out = cls(model, tokenizer=tokenizer)
        return out.to(device)


class _Folded:
    """BPE ids folded into a smaller vocabulary (a test-sized config): start / end
    of text become the config's bos / eos ids when they fit, other ids ``% vocab``."""

    def __init__(self, bpe, text_config):
        self.bpe, self.vocab = bpe, text_config.vocab_size
        self.bos, self.eos = (i if i is not None and 0 <= i < self.vocab else None
                              for i in (text_config.bos_token_id, text_config.eos_token_id))

    def __call__(self, texts):
        ids = self.bpe(list(texts))
        out = ids % self.vocab
        if self.bos is not None:
            out[ids == BPE_VOCAB - 2] = self.bos
        if self.eos is not None:
            out[ids == BPE_VOCAB - 1] = self.eos
        return out


class _HFTokenizer:
    def __init__(self, tok, context_length: int):
        self.tok, self.context_length = tok, context_length

    def __call__(self, texts):
        return self.tok(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                        return_tensors="pt").input_ids
