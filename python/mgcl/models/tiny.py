"""TinyCLIP: a small CLIP that trains on a CPU in minutes.

Image tower: a small ViT (default) or a small CNN on 64x64 images. Text
tower: a small bidirectional transformer over a plain word vocabulary,
mean-pooled over the non-padding tokens. Both towers project to
``embed_dim``. ``logit_scale`` holds log(scale) as in CLIP.

The vocabulary can be built from any corpus (``WordTokenizer.build``);
``TinyCLIP()`` with no tokenizer uses an open vocabulary instead (every word
hashed into one of 4,096 ids). The tokenizer is saved with the weights:
``save(dir)`` writes ``tinyclip.json`` (config +
vocabulary) and ``model.safetensors``; ``TinyCLIP.load(dir)`` reads them back.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._io import atomic_write_json, atomic_write_tensors
from . import images

FORMAT = "mgcl.tinyclip"
CONFIG_FILE = "tinyclip.json"
WEIGHTS_FILE = "model.safetensors"


class WordTokenizer:
    """Lower-cased words and single punctuation marks, one id each.

    Ids: 0 ``<pad>``, 1 ``<unk>``, 2 ``<sot>``, 3 ``<eot>``, then the vocabulary,
    then ``hash_buckets`` ids for words outside it (``crc32(word) % hash_buckets``;
    with ``hash_buckets = 0`` such words are ``<unk>``).
    ``tokenizer(texts)`` -> int64 ``[B, context_length]``: ``<sot> words <eot>``
    then padding; long texts are cut so that ``<eot>`` always fits.
    """

    SPECIALS = ("<pad>", "<unk>", "<sot>", "<eot>")
    PAD, UNK, SOT, EOT = 0, 1, 2, 3
    _WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")

    def __init__(self, words: Sequence[str] = (), context_length: int = 32, hash_buckets: int = 0):
        if context_length < 3:
            raise ValueError(f"WordTokenizer: context_length must be >= 3, got {context_length}")
        if hash_buckets < 0:
            raise ValueError(f"WordTokenizer: hash_buckets must be >= 0, got {hash_buckets}")
        words = [w for w in words if w not in self.SPECIALS]
        if len(set(words)) != len(words):
            raise ValueError("WordTokenizer: duplicated words in the vocabulary")
        self.words = list(words)
        self.context_length, self.hash_buckets = int(context_length), int(hash_buckets)
        self.index = {w: i + len(self.SPECIALS) for i, w in enumerate(self.words)}

    @classmethod
    def split(cls, text: str) -> list[str]:
        return cls._WORD.findall(text.lower())

    @classmethod
    def build(cls, texts: Iterable[str], *, max_size: Optional[int] = None, min_freq: int = 1,
              context_length: int = 32) -> "WordTokenizer":
        """A vocabulary from a corpus: words seen ``min_freq`` times or more, the
        most frequent first (ties alphabetical), at most ``max_size`` words."""
        counts = Counter(w for t in texts for w in cls.split(t))
        words = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[:max_size]
        return cls(words, context_length=context_length)

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIALS) + len(self.words) + self.hash_buckets

    def word_id(self, w: str) -> int:
        if w in self.index:
            return self.index[w]
        if self.hash_buckets:
            return len(self.SPECIALS) + len(self.words) + zlib.crc32(w.encode()) % self.hash_buckets
        return self.UNK

    def encode(self, text: str) -> list[int]:
        ids = [self.word_id(w) for w in self.split(text)][: self.context_length - 2]
        return [self.SOT] + ids + [self.EOT]

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), self.PAD, dtype=torch.int64)
        for i, t in enumerate(texts):
            ids = self.encode(t)
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out

    def to_json(self) -> dict:
        return {"words": self.words, "context_length": self.context_length, "hash_buckets": self.hash_buckets}

    @classmethod
    def from_json(cls, d: dict) -> "WordTokenizer":
        return cls(d["words"], context_length=d["context_length"], hash_buckets=d.get("hash_buckets", 0))


@dataclass
class TinyCLIPConfig:
    image_size: int = 64
    vision: str = "vit"          # "vit" or "cnn"
    patch_size: int = 8          # vit only
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    embed_dim: int = 128
    init_logit_scale: float = math.log(1 / 0.07)

    def __post_init__(self):
        if self.vision not in ("vit", "cnn"):
            raise ValueError(f"TinyCLIPConfig: vision must be 'vit' or 'cnn', got {self.vision!r}")
        if self.vision == "vit" and self.image_size % self.patch_size:
            raise ValueError(f"TinyCLIPConfig: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        for name in ("vision_width", "text_width"):
            heads = self.vision_heads if name == "vision_width" else self.text_heads
            if getattr(self, name) % heads:
                raise ValueError(f"TinyCLIPConfig: {name} {getattr(self, name)} is not a multiple of its heads {heads}")


def _encoder(width: int, layers: int, heads: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class _ViT(nn.Module):
    def __init__(self, cfg: TinyCLIPConfig):
        super().__init__()
        w, n = cfg.vision_width, (cfg.image_size // cfg.patch_size) ** 2
        self.patch = nn.Conv2d(3, w, cfg.patch_size, cfg.patch_size)
        self.cls = nn.Parameter(torch.randn(w) * 0.02)
        self.pos = nn.Parameter(torch.randn(n + 1, w) * 0.02)
        self.blocks = _encoder(w, cfg.vision_layers, cfg.vision_heads)
        self.norm = nn.LayerNorm(w)
        self.proj = nn.Linear(w, cfg.embed_dim, bias=False)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], 1) + self.pos
        return self.proj(self.norm(self.blocks(x)[:, 0]))


class _CNN(nn.Module):
    def __init__(self, cfg: TinyCLIPConfig):
        super().__init__()
        w = cfg.vision_width
        chans = [3, w // 4, w // 2, w, w]
        layers = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GroupNorm(min(8, b), b), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(w, cfg.embed_dim, bias=False)

    def forward(self, x):
        return self.proj(self.body(x).mean((2, 3)))


class _Text(nn.Module):
    def __init__(self, cfg: TinyCLIPConfig, vocab_size: int, context_length: int):
        super().__init__()
        w = cfg.text_width
        self.embed = nn.Embedding(vocab_size, w)
        self.pos = nn.Parameter(torch.randn(context_length, w) * 0.01)
        self.blocks = _encoder(w, cfg.text_layers, cfg.text_heads)
        self.norm = nn.LayerNorm(w)
        self.proj = nn.Linear(w, cfg.embed_dim, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens):
        pad = tokens == WordTokenizer.PAD
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        x = self.norm(self.blocks(x, src_key_padding_mask=pad))
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return self.proj((x * keep).sum(1) / keep.sum(1).clamp_min(1.0))


class TinyCLIP(nn.Module):
    """A small CLIP following :class:`mgcl.models.VLM`.

    ``TinyCLIP()`` (open hashed vocabulary), ``TinyCLIP(tokenizer)`` or
    ``TinyCLIP(WordTokenizer.build(captions), vision="cnn")``; keyword arguments
    override :class:`TinyCLIPConfig` fields.
    """

    OPEN_VOCAB_BUCKETS = 4096

    MEAN = (0.5, 0.5, 0.5)
    STD = (0.5, 0.5, 0.5)

    def __init__(self, tokenizer: Optional[WordTokenizer] = None, config: Optional[TinyCLIPConfig] = None,
                 **overrides):
        super().__init__()
        if tokenizer is None:
            tokenizer = WordTokenizer(hash_buckets=self.OPEN_VOCAB_BUCKETS)
        if not isinstance(tokenizer, WordTokenizer):
            raise ValueError("TinyCLIP: pass a WordTokenizer (e.g. WordTokenizer.build(captions))")
        unknown = set(overrides) - {f.name for f in fields(TinyCLIPConfig)}
        if unknown:
            raise ValueError(f"TinyCLIP: unknown config fields {sorted(unknown)}")
        cfg = TinyCLIPConfig(**{**(asdict(config) if config else {}), **overrides})
        self.config = cfg
        self.tokenizer = tokenizer
        self.visual = _ViT(cfg) if cfg.vision == "vit" else _CNN(cfg)
        self.text = _Text(cfg, tokenizer.vocab_size, tokenizer.context_length)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text(tokens)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def transform(self, train: bool):
        """PIL image or image tensor -> normalised float32 [3, s, s]: a random
        resized crop (area 0.8-1, aspect 0.9-1.1) when training, else resize
        and center crop (torch and Pillow only: see ``images``)."""
        s = self.config.image_size
        if train:
            head = [functools.partial(images.random_resized_crop, size=s, scale=(0.8, 1.0), ratio=(0.9, 1.1))]
        else:
            head = [functools.partial(images.resize_shorter, size=s), functools.partial(images.center_crop, size=s)]
        return images.compose(images.as_image, *head, images.to_tensor,
                              functools.partial(images.normalize, mean=self.MEAN, std=self.STD),
                              deterministic=not train)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        """Normalised image and text features and the scale (CLIP's forward)."""
        return (F.normalize(self.encode_image(images), dim=-1), F.normalize(self.encode_text(tokens), dim=-1),
                self.logit_scale.exp())

    # ---- files ---------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        """``tinyclip.json`` (config + vocabulary) and ``model.safetensors``, each written atomically."""
        atomic_write_tensors(os.path.join(directory, WEIGHTS_FILE), self.state_dict(), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "version": 1, "config": asdict(self.config), "tokenizer": self.tokenizer.to_json()}
        atomic_write_json(os.path.join(directory, CONFIG_FILE), meta)

    @classmethod
    def load(cls, directory: str, map_location: str | torch.device = "cpu") -> "TinyCLIP":
        from safetensors.torch import load_file  # noqa: PLC0415

        path = os.path.join(directory, CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TinyCLIP.load: no {CONFIG_FILE} in {directory}")
        with open(path) as fh:
            meta = json.load(fh)
        if meta.get("format") != FORMAT:
            raise ValueError(f"TinyCLIP.load: {path} is not a TinyCLIP config (format={meta.get('format')!r})")
        model = cls(WordTokenizer.from_json(meta["tokenizer"]), TinyCLIPConfig(**meta["config"]))
        model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_FILE), device=str(map_location)))
        return model.to(map_location)
