"""open_clip adapter, and the BiomedCLIP architecture registered locally.

- ``OpenCLIP.create(name, pretrained=None)``: any open_clip built-in config
  (``ViT-B-16``, ...) or ``BIOMEDCLIP`` (alias ``"biomedclip"``); ``pretrained``
  is None (random init, offline), a local checkpoint file, or an open_clip tag
  (downloads: online only).
- ``OpenCLIP.from_dir(path)``: a local copy of a hub repo (``open_clip_config.json``
  + ``open_clip_pytorch_model.bin`` / ``*.safetensors`` + tokenizer files), e.g. a
  snapshot of microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224.
- ``OpenCLIP.from_hub("hf-hub:org/name")``: the hub, online only.

Checkpoints are read with safetensors or ``torch.load(weights_only=True)``:
never an arbitrary unpickle.

BiomedCLIP = ViT-B/16 image tower (timm ``vit_base_patch16_224``, token
output, linear projection) + a BERT-base text tower (PubMedBERT / BiomedBERT
base uncased, abstracts) through open_clip's HF text tower (CLS token of the
last hidden state, MLP projection), 256 tokens, 512-d joint embedding, OpenAI
mean/std preprocessing at 224 px. open_clip's HF tower needs a transformers
config and a tokenizer it can load from a directory, so mgcl writes one under
its cache (``mgcl._env.cache_dir``: ``$MGCL_CACHE``, else ``$XDG_CACHE_HOME/mgcl``,
else ``~/.cache/mgcl``):

- ``config.json``: the BiomedBERT-base architecture as a ``BertConfig``
  (vocab 30522, 12 layers, width 768, 12 heads, MLP 3072, 512 positions);
- the tokenizer: the real BiomedBERT tokenizer when it can be loaded without
  the network (HF cache) or is given (``tokenizer=``, or the tokenizer files of
  a checkpoint directory); otherwise an offline stand-in: a WordPiece
  vocabulary built here of the BERT special tokens, the lower-case letters,
  digits and ASCII punctuation (whole and as ``##`` continuations), padded with
  ``[unusedN]`` to 30522 entries. It tokenises any English text (letter by
  letter), so a randomly initialised model trains and runs, but its ids are NOT
  BiomedBERT's: never pair it with pretrained BiomedCLIP weights.
  ``OpenCLIP.tokenizer_source`` says which one a model uses.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import string
import tempfile
from typing import Callable, Optional

import torch
from torch import nn

from .._env import cache_dir
from .._io import atomic_write_json, publish_dir
from .images import as_image

log = logging.getLogger("mgcl.models")

BIOMEDCLIP = "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDCLIP_HUB = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDBERT_HUB = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
BIOMEDBERT_ALIASES = (BIOMEDBERT_HUB, "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract")
ALIASES = {"biomedclip": BIOMEDCLIP}
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

# The BiomedBERT-base architecture (BERT-base shape, its own uncased vocabulary).
BIOMEDBERT_CONFIG = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
    type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
)


def biomedclip_config(text_dir: str) -> dict:
    """The BiomedCLIP model_cfg in open_clip's schema, its text tower read from ``text_dir``."""
    return {
        "embed_dim": 512,
        "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": text_dir, "hf_tokenizer_name": text_dir, "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
    }


def offline_wordpiece_vocab(size: int = BIOMEDBERT_CONFIG["vocab_size"]) -> list[str]:
    """The stand-in vocabulary described in the module docstring."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = specials + chars + ["##" + c for c in chars]
    vocab += [f"[unused{i}]" for i in range(size - len(vocab))]
    return vocab


def _atomic_dir(final: str, fill: Callable[[str], None]) -> str:
    """Create ``final`` by filling a temporary sibling and renaming it (a racing writer is fine)."""
    if os.path.isdir(final):
        return final
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        fill(tmp)
        try:
            publish_dir(tmp, final)
        except OSError:
            if not os.path.isdir(final):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _hf_cached_tokenizer_dir() -> Optional[str]:
    """The real BiomedBERT tokenizer files, if the HF cache has them (never touches the network)."""
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415

        path = snapshot_download(BIOMEDBERT_HUB, local_files_only=True,
                                 allow_patterns=["vocab.txt", "tokenizer*.json", "special_tokens_map.json"])
    except Exception:  # noqa: BLE001 - not cached, or no huggingface_hub
        return None
    return path if os.path.isfile(os.path.join(path, "vocab.txt")) else None


def biomedbert_dir() -> str:
    """A directory open_clip's HF text tower can read offline (see the module docstring)."""
    real = _hf_cached_tokenizer_dir()
    name = "biomedbert-base-uncased" + ("" if real else "-offline-vocab")

    def fill(tmp):
        from transformers import BertConfig, BertTokenizer  # noqa: PLC0415

        BertConfig(**BIOMEDBERT_CONFIG).save_pretrained(tmp)
        if real:
            for f in os.listdir(real):
                shutil.copy(os.path.join(real, f), tmp)
        else:
            with open(os.path.join(tmp, "vocab.txt"), "w") as fh:
                fh.write("\n".join(offline_wordpiece_vocab()) + "\n")
            BertTokenizer(os.path.join(tmp, "vocab.txt"), do_lower_case=True, model_max_length=512).save_pretrained(tmp)
            with open(os.path.join(tmp, "MGCL_OFFLINE_VOCAB.txt"), "w") as fh:
                fh.write("Offline stand-in vocabulary built by mgcl: NOT BiomedBERT's token ids.\n")

    return _atomic_dir(str(cache_dir("models", name)), fill)


def register_biomedclip() -> str:
    """Register the BiomedCLIP architecture with open_clip (idempotent); returns its name."""
    import open_clip  # noqa: PLC0415

    if BIOMEDCLIP in open_clip.list_models():
        cfg = open_clip.get_model_config(BIOMEDCLIP)
        if os.path.isdir(cfg["text_cfg"]["hf_model_name"]):
            return BIOMEDCLIP
    text_dir = biomedbert_dir()
    cfg_dir = str(cache_dir("open_clip_configs"))
    path = os.path.join(cfg_dir, BIOMEDCLIP + ".json")
    atomic_write_json(path, biomedclip_config(text_dir))
    open_clip.add_model_config(path)
    return BIOMEDCLIP


def _check_checkpoint_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if not path.endswith(CHECKPOINT_SUFFIXES):
        raise ValueError(f"checkpoint {path!r}: expected one of {CHECKPOINT_SUFFIXES} "
                         "(read with safetensors or torch.load(weights_only=True))")


class OpenCLIP(nn.Module):
    """An open_clip CLIP / CustomTextCLIP behind the :class:`mgcl.models.VLM` protocol.

    ``OpenCLIP(model)`` wraps a model built elsewhere (e.g. ``open_clip.create_model``);
    with no ``tokenizer`` a Hugging Face text tower gets its own tokenizer and any
    other the OpenAI BPE at the model's context length.
    """

    def __init__(self, model: nn.Module, tokenizer: Optional[Callable] = None, *, name: str = "",
                 tokenizer_source: str = ""):
        super().__init__()
        if tokenizer is None:
            hf = getattr(getattr(model, "text", None), "config", None)
            ctx = getattr(model, "context_length", None) or 77
            if hf is not None:
                tokenizer, tokenizer_source = _hf_tokenizer(hf.name_or_path, ctx), hf.name_or_path
            else:
                import open_clip  # noqa: PLC0415

                tokenizer, tokenizer_source = open_clip.SimpleTokenizer(context_length=ctx), "open_clip-bpe"
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.tokenizer_source = tokenizer_source

    # ---- the protocol --------------------------------------------------------------------

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(torch.int64).cpu()

    def transform(self, train: bool):
        import open_clip  # noqa: PLC0415
        from open_clip.transform import PreprocessCfg, image_transform_v2  # noqa: PLC0415
        from torchvision import transforms as T  # noqa: PLC0415

        cfg = open_clip.get_model_preprocess_cfg(self.model)
        return T.Compose([as_image, image_transform_v2(PreprocessCfg(**cfg), is_train=train)])

    # ---- construction --------------------------------------------------------------------

    @classmethod
    def create(cls, name: str = "ViT-B-16", pretrained: Optional[str] = None, *, tokenizer=None,
               device="cpu") -> "OpenCLIP":
        """A built-in open_clip config or BiomedCLIP; ``pretrained`` None = random init."""
        import open_clip  # noqa: PLC0415

        name = ALIASES.get(name.lower(), name) if isinstance(name, str) else name
        if name == BIOMEDCLIP:
            register_biomedclip()
        if name not in open_clip.list_models():
            raise ValueError(f"OpenCLIP: unknown config {name!r}; open_clip offers {len(open_clip.list_models())} "
                             f"(e.g. ViT-B-16) plus {BIOMEDCLIP!r} / 'biomedclip'")
        if pretrained is not None and (os.path.sep in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES)
                                       or os.path.exists(pretrained)):
            _check_checkpoint_file(pretrained)
        model = open_clip.create_model(name, pretrained=pretrained, pretrained_text=False, weights_only=True,
                                       device=device)
        tok, source = _tokenizer_for(name, tokenizer)
        if name == BIOMEDCLIP and pretrained is not None and source == "offline-stand-in":
            raise ValueError("OpenCLIP: BiomedCLIP weights need the BiomedBERT tokenizer; pass tokenizer=<dir with "
                             "vocab.txt> (the offline stand-in vocabulary has different token ids)")
        return cls(model, tok, name=name, tokenizer_source=source)

    @classmethod
    def from_dir(cls, path: str, *, tokenizer=None, device="cpu") -> "OpenCLIP":
        """A local open_clip model directory (open_clip_config.json + weights + tokenizer files)."""
        import open_clip  # noqa: PLC0415
        from open_clip.factory import _find_checkpoint_in_dir  # noqa: PLC0415
        from pathlib import Path  # noqa: PLC0415

        with open(os.path.join(path, "open_clip_config.json")) as fh:
            full = json.load(fh)
        model_cfg = copy.deepcopy(full.get("model_cfg", full))
        text, vision = model_cfg["text_cfg"], model_cfg["vision_cfg"]
        ckpt = _find_checkpoint_in_dir(Path(path))
        if ckpt is None:
            raise FileNotFoundError(f"OpenCLIP.from_dir: no checkpoint (*.safetensors, *.bin, *.pth) in {path}")
        _check_checkpoint_file(ckpt)
        tok_files = any(os.path.isfile(os.path.join(path, f)) for f in ("vocab.txt", "tokenizer.json"))
        if "hf_model_name" in text:
            hf = text["hf_model_name"]
            if hf in BIOMEDBERT_ALIASES or not os.path.isdir(hf):
                if hf not in BIOMEDBERT_ALIASES:
                    raise ValueError(f"OpenCLIP.from_dir: text tower {hf!r} is not a local directory; only the "
                                     "BiomedBERT architecture is built offline")
                text["hf_model_name"] = biomedbert_dir()
            text["hf_model_pretrained"] = False
            if tokenizer is None:
                if not tok_files:
                    raise ValueError(f"OpenCLIP.from_dir: {path} has no tokenizer files (vocab.txt / tokenizer.json);"
                                     " pass tokenizer=<dir>")
                tokenizer = path
        if "timm_model_name" in vision:
            vision["timm_model_pretrained"] = False
        custom = model_cfg.pop("custom_text", False) or "hf_model_name" in text
        model = (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**model_cfg)
        open_clip.load_checkpoint(model, ckpt, strict=True, weights_only=True)
        pre = {k: v for k, v in full.get("preprocess_cfg", {}).items()}
        pre.setdefault("size", vision.get("image_size", 224))
        open_clip.set_model_preprocess_cfg(model, {**_default_preprocess(), **pre})
        if tokenizer is not None:
            tok, source = _hf_tokenizer(tokenizer, text.get("context_length", 77)), str(tokenizer)
        else:
            tok, source = open_clip.SimpleTokenizer(context_length=text.get("context_length", 77)), "open_clip-bpe"
        return cls(model.to(device), tok, name=os.path.basename(os.path.normpath(path)), tokenizer_source=source)

    @classmethod
    def from_hub(cls, hub_id: str = BIOMEDCLIP_HUB, *, device="cpu") -> "OpenCLIP":
        """``hf-hub:org/name`` through open_clip (needs the network or a populated HF cache)."""
        import open_clip  # noqa: PLC0415

        if not hub_id.startswith("hf-hub:"):
            hub_id = "hf-hub:" + hub_id
        model = open_clip.create_model(hub_id, weights_only=True, device=device)
        return cls(model, open_clip.get_tokenizer(hub_id), name=hub_id, tokenizer_source=hub_id)


def _default_preprocess() -> dict:
    from dataclasses import asdict  # noqa: PLC0415

    from open_clip.transform import PreprocessCfg  # noqa: PLC0415

    return asdict(PreprocessCfg())


def _hf_tokenizer(source, context_length: int):
    if callable(source) and not isinstance(source, str):
        return source
    from open_clip.tokenizer import HFTokenizer  # noqa: PLC0415

    return HFTokenizer(str(source), context_length=context_length)


def _tokenizer_for(name: str, tokenizer) -> tuple[Callable, str]:
    import open_clip  # noqa: PLC0415

    cfg = open_clip.get_model_config(name)
    ctx = cfg["text_cfg"].get("context_length", 77)
    if tokenizer is not None:
        return _hf_tokenizer(tokenizer, ctx), str(tokenizer)
    if name == BIOMEDCLIP:
        text_dir = cfg["text_cfg"]["hf_tokenizer_name"]
        offline = os.path.isfile(os.path.join(text_dir, "MGCL_OFFLINE_VOCAB.txt"))
        if offline:
            log.warning("BiomedCLIP: using mgcl's offline stand-in WordPiece vocabulary (the BiomedBERT tokenizer "
                        "is not in the HF cache); fine for random init, not for pretrained weights")
        return _hf_tokenizer(text_dir, ctx), ("offline-stand-in" if offline else text_dir)
    return open_clip.get_tokenizer(name), "open_clip"
