"""Vision-language model adapters (one protocol: :class:`mgcl.models.protocol.VLM`).

- :class:`OpenCLIP`: open_clip models, any built-in config plus BiomedCLIP
  (registered locally: ViT-B/16 + BiomedBERT, 256 tokens);
- :class:`HFCLIP`: Hugging Face ``transformers.CLIPModel``;
- :class:`TinyCLIP`: a small built-in CLIP that trains on a CPU in minutes.

``create(name, pretrained=None)`` builds one by name (random init when
``pretrained`` is None); ``load(name_or_path)`` reads a local checkpoint or,
for ``hf-hub:`` names, the hub. open_clip / transformers are imported only
when an adapter that needs them is built.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from .hf_clip import HFCLIP
from .openclip import BIOMEDCLIP, BIOMEDCLIP_HUB, OpenCLIP, register_biomedclip
from .protocol import VLM
from .tiny import TinyCLIP, TinyCLIPConfig, WordTokenizer


def create(name: str, pretrained: Optional[str] = None, **kwargs):
    """``"tinyclip"`` (kwargs: tokenizer or vocab texts, else an open hashed vocabulary;
    config fields), or an open_clip
    config name / ``"biomedclip"`` (``pretrained``: None = random init, a local file, a tag)."""
    if name.lower() == "tinyclip":
        if pretrained is not None:
            return TinyCLIP.load(pretrained)
        tok = kwargs.pop("tokenizer", None)
        texts = kwargs.pop("texts", None)
        if tok is None and texts is not None:
            tok = WordTokenizer.build(texts)
        return TinyCLIP(tok, **kwargs)
    return OpenCLIP.create(name, pretrained=pretrained, **kwargs)


def load(name_or_path: str, *, arch: Optional[str] = None, tokenizer=None, device="cpu"):
    """A model from a local checkpoint or the hub.

    - a directory: TinyCLIP (``tinyclip.json``), open_clip (``open_clip_config.json``)
      or Hugging Face CLIP (``config.json`` of model_type clip, safetensors);
    - a checkpoint file (``.safetensors``, or ``.bin``/``.pt``/``.pth`` read with
      ``torch.load(weights_only=True)``) of open_clip config ``arch``
      (BiomedCLIP is recognised from its keys when ``arch`` is None);
    - ``hf-hub:org/name`` (or ``"biomedclip"`` with no local file): open_clip
      from the hub, online only.
    """
    if os.path.isdir(name_or_path):
        if os.path.isfile(os.path.join(name_or_path, "tinyclip.json")):
            return TinyCLIP.load(name_or_path, map_location=device)
        if os.path.isfile(os.path.join(name_or_path, "open_clip_config.json")):
            return OpenCLIP.from_dir(name_or_path, tokenizer=tokenizer, device=device)
        cfg = os.path.join(name_or_path, "config.json")
        if os.path.isfile(cfg):
            with open(cfg) as fh:
                if json.load(fh).get("model_type") == "clip":
                    return HFCLIP.from_pretrained(name_or_path, tokenizer=tokenizer, device=device)
        raise ValueError(f"load: {name_or_path} holds no TinyCLIP, open_clip or Hugging Face CLIP model")
    if os.path.isfile(name_or_path):
        if arch is None:
            arch = _guess_arch(name_or_path)
        return OpenCLIP.create(arch, pretrained=name_or_path, tokenizer=tokenizer, device=device)
    if name_or_path.startswith("hf-hub:"):
        return OpenCLIP.from_hub(name_or_path, device=device)
    if name_or_path.lower() == "biomedclip":
        return OpenCLIP.from_hub(BIOMEDCLIP_HUB, device=device)
    raise ValueError(f"load: {name_or_path!r} is neither a local file/directory nor an 'hf-hub:' name "
                     "(use create(name) for a randomly initialised model)")


def _guess_arch(path: str) -> str:
    if path.endswith(".safetensors"):
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(path, "pt") as fh:
            keys = list(fh.keys())
    else:
        import torch  # noqa: PLC0415

        sd = torch.load(path, map_location="meta", weights_only=True)
        keys = list(sd.get("state_dict", sd).keys())
    if any("text.transformer.embeddings.word_embeddings" in k for k in keys) and \
            any(k.startswith(("visual.trunk.", "module.visual.trunk.")) for k in keys):
        return BIOMEDCLIP
    raise ValueError(f"load: cannot tell the architecture of {path}; pass arch=<open_clip config name>")


__all__ = ["VLM", "OpenCLIP", "HFCLIP", "TinyCLIP", "TinyCLIPConfig", "WordTokenizer", "BIOMEDCLIP",
           "BIOMEDCLIP_HUB", "register_biomedclip", "create", "load"]
