"""The memory bank: a directory of text embeddings, captions and images.

Layout (DESIGN.md, "Data on disk"):

    manifest.json                      format version, dim, dtype, count, embedder,
                                       normalised flag, every file with its sha256
    embeddings/shard-00000.safetensors "embeddings": float16 [n_i, dim], unit rows
    meta.parquet                       id, caption, image, domain, group (int64)
    vlm/shard-00000.safetensors        optional "image_embeddings": float16 [n_i, d_v]
                                       (unit rows; zero rows for unreadable images)
    bm25/{vocab.json,tokens.safetensors}  caption term counts + document frequencies
    index/faiss-<kind>.index           optional FAISS index
    skipped.jsonl                      corpus records the builder could not use

The manifest is written last: a directory without it is an unfinished build.
``group`` is the index of the first entry with the same caption, so identical
captions share a group id.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from . import store

FORMAT = "mgcl-bank"
FORMAT_VERSION = 1
EMB_KEY = "embeddings"
VLM_KEY = "image_embeddings"


class BankError(ValueError):
    """A bank directory that is missing, incomplete or corrupt."""


class BankFileMissing(BankError, FileNotFoundError):
    """A bank directory or one of its files does not exist (also a FileNotFoundError)."""


@dataclass
class Hit:
    """One retrieved entry. ``score`` is the dense cosine score after ``search``
    and the visual score S_v after the multi-stage pipeline (where
    ``dense``/``visual``/``bm25`` keep each stage's score)."""

    id: str
    caption: str
    domain: str
    image: str
    score: float
    index: int
    group: int = -1
    dense: Optional[float] = None
    visual: Optional[float] = None
    bm25: Optional[float] = None


class MemoryBank:
    """An opened bank; see the module doc for the files. Open with ``MemoryBank.open``."""

    def __init__(self, path: str, manifest: dict, shards: list[torch.Tensor], vlm_shards: list[torch.Tensor] | None,
                 embedder=None, device=None):
        self.path = path
        self.manifest = manifest
        self.shards = shards
        self.vlm_shards = vlm_shards
        self.count = int(manifest["count"])
        self.dim = int(manifest["dim"])
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._embedder = embedder
        self._meta = None
        self._bm25 = {}
        self._faiss = None
        self.offsets = np.concatenate([[0], np.cumsum([s.shape[0] for s in shards])]).astype(np.int64)

    # ---- opening and verifying ---------------------------------------------------

    @classmethod
    def open(cls, path: str, *, verify: bool = False, embedder=None, device=None) -> "MemoryBank":
        """Open the bank at ``path``: check the manifest (format version, counts,
        shard headers) and memory-map every shard. ``verify=True`` also checks
        the sha256 of every file (reads everything once). ``embedder`` (an object
        or a name) encodes text queries; by default the one named in the manifest."""
        path = os.path.abspath(os.fspath(path))
        mpath = os.path.join(path, "manifest.json")
        if not os.path.isdir(path):
            raise BankFileMissing(f"bank {path!r} does not exist")
        if not os.path.exists(mpath):
            hint = " (an unfinished build: rerun `mgcl db build` to resume)" if os.path.isdir(
                os.path.join(path, ".build")) else ""
            raise BankFileMissing(f"bank {path!r} has no manifest.json{hint}")
        try:
            with open(mpath) as fh:
                m = json.load(fh)
        except json.JSONDecodeError as exc:
            raise BankError(f"{mpath}: not valid JSON ({exc})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            what = f"format={m.get('format')!r}" if isinstance(m, dict) else "not a JSON object"
            raise BankError(f"{mpath}: not an mgcl bank ({what})")
        if m.get("format_version") != FORMAT_VERSION:
            raise BankError(f"{mpath}: format version {m.get('format_version')!r}; this mgcl reads {FORMAT_VERSION}")
        missing = [key for key in ("dim", "count", "shards", "meta") if key not in m]
        if missing:
            raise BankError(f"{mpath}: manifest lacks {missing}")
        if m.get("dtype") != "float16":
            raise BankError(f"{mpath}: dtype {m.get('dtype')!r}; expected float16")
        dim = int(m["dim"])
        shards = _open_shards(path, m["shards"], EMB_KEY, dim, verify)
        total = sum(s.shape[0] for s in shards)
        if total != m["count"]:
            raise BankError(f"{mpath}: shards hold {total} rows but count is {m['count']}")
        vlm = None
        if m.get("vlm"):
            vlm = _open_shards(path, m["vlm"]["shards"], VLM_KEY, int(m["vlm"]["dim"]), verify)
            if [s.shape[0] for s in vlm] != [s.shape[0] for s in shards]:
                raise BankError(f"{mpath}: VLM image-embedding shards do not match the text shards row for row")
        _check_file(path, m["meta"], verify)
        import pyarrow.parquet as pq  # noqa: PLC0415

        nrows = pq.ParquetFile(os.path.join(path, m["meta"]["path"])).metadata.num_rows
        if nrows != m["count"]:
            raise BankError(f"{os.path.join(path, m['meta']['path'])}: {nrows} rows but the manifest count is {m['count']}")
        if m.get("bm25"):
            for part in ("vocab", "tokens"):
                _check_file(path, m["bm25"][part], verify)
        if m.get("index"):
            _check_file(path, m["index"], verify)
        return cls(path, m, shards, vlm, embedder=embedder, device=device)

    def verify(self) -> None:
        """Check the sha256 of every file against the manifest (raises BankError)."""
        MemoryBank.open(self.path, verify=True)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (f"MemoryBank({self.path!r}, count={self.count}, dim={self.dim}, embedder={self.embedder_name!r}, "
                f"shards={len(self.shards)}, vlm={'yes' if self.vlm_shards else 'no'})")

    # ---- metadata --------------------------------------------------------------------

    @property
    def embedder_name(self) -> str:
        return self.manifest["embedder"]

    @property
    def embedder(self):
        if self._embedder is None or isinstance(self._embedder, str):
            from .embedders import get_embedder  # noqa: PLC0415

            name = self._embedder or self.embedder_name
            if name == "external":
                raise ValueError(f"bank {self.path!r} was written from precomputed embeddings; "
                                 "pass query embeddings or an embedder to MemoryBank.open(..., embedder=)")
            self._embedder = get_embedder(name, device=None)
        return self._embedder

    @property
    def meta(self):
        """The meta table as a dict of columns (lists / int64 array), loaded once."""
        if self._meta is None:
            import pyarrow.parquet as pq  # noqa: PLC0415

            t = pq.read_table(os.path.join(self.path, self.manifest["meta"]["path"]))
            self._meta = {c: t.column(c).to_pylist() for c in ("id", "caption", "image", "domain")}
            self._meta["group"] = t.column("group").to_numpy()
        return self._meta

    @property
    def has_vlm(self) -> bool:
        return bool(self.vlm_shards)

    def hit(self, index: int, score: float) -> Hit:
        m = self.meta
        i = int(index)
        return Hit(m["id"][i], m["caption"][i], m["domain"][i], m["image"][i], float(score), i, int(m["group"][i]))

    def _gather(self, shards, indices) -> torch.Tensor:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.count):
            raise ValueError(f"index out of range [0, {self.count})")
        d = shards[0].shape[1] if shards else 0
        out = torch.empty((len(idx), d), dtype=torch.float16)
        sid = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(sid):
            sel = np.nonzero(sid == s)[0]
            out[torch.from_numpy(sel)] = shards[s][torch.from_numpy(idx[sel] - self.offsets[s])]
        return out

    def embeddings(self, indices) -> torch.Tensor:
        """float16 [len(indices), dim] rows of the text embeddings."""
        return self._gather(self.shards, indices)

    def image_embeddings(self, indices) -> torch.Tensor:
        """float16 rows of the stored VLM image embeddings (BankError when absent)."""
        if not self.vlm_shards:
            raise BankError(f"bank {self.path!r} has no VLM image embeddings (build with --vlm)")
        return self._gather(self.vlm_shards, indices)

    def bm25(self, k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25):
        from .bm25 import BM25  # noqa: PLC0415

        key = (k1, b, epsilon)
        if key not in self._bm25:
            if not self.manifest.get("bm25"):
                raise BankError(f"bank {self.path!r} has no BM25 cache")
            self._bm25[key] = BM25.open(self.path, self.manifest["bm25"], k1=k1, b=b, epsilon=epsilon)
        return self._bm25[key]

    # ---- search -------------------------------------------------------------------------

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Query embeddings (float32 [n, dim], unit rows) from the bank's embedder."""
        emb = torch.from_numpy(np.ascontiguousarray(self.embedder.encode(list(texts), batch_size)))
        if emb.shape[1] != self.dim:
            raise ValueError(f"the embedder gives {emb.shape[1]}-d vectors; bank {self.path!r} has dim {self.dim}")
        return emb

    def _queries(self, queries) -> torch.Tensor:
        if isinstance(queries, str):
            raise ValueError("search: pass a list of query strings, not one string")
        if isinstance(queries, np.ndarray):
            queries = torch.from_numpy(queries)
        if isinstance(queries, torch.Tensor):
            if queries.dim() != 2 or queries.shape[1] != self.dim:
                raise ValueError(f"search: query embeddings must be [Q, {self.dim}], got {tuple(queries.shape)}")
            if not torch.isfinite(queries).all():
                raise ValueError("search: query embeddings contain NaN or inf")
            return queries.float()
        queries = list(queries)
        if not all(isinstance(q, str) for q in queries):
            raise ValueError("search: queries must be a list of strings or a [Q, dim] tensor")
        return self.encode(queries)

    def topk(self, queries, k: int, ties: bool = True, *, backend: str = "exact", overfetch: int = 4):
        """Dense candidates per query as CSR ``(values, indices, offsets)`` (numpy),
        score desc then index asc. ``backend="exact"`` streams the shards through
        ``similarity_topk``; ``"faiss"`` asks the FAISS index and re-scores what it
        returns exactly (the tie rule then holds over those candidates)."""
        _check_k(k)
        q = self._queries(queries)
        if backend == "exact":
            from .search import exact_topk  # noqa: PLC0415

            return exact_topk(q, self.shards, k, ties, device=self.device)
        if backend == "faiss":
            from .search import faiss_topk  # noqa: PLC0415

            return faiss_topk(self, q, k, ties, overfetch=overfetch)
        raise ValueError(f"search: unknown backend {backend!r}; expected 'exact' or 'faiss'")

    def search(self, queries, k: int, ties: bool = True, *, backend: str = "exact") -> list[list[Hit]]:
        """One list of ``Hit`` per query: every entry scoring at least the k-th
        largest distinct cosine score (``ties=True``, so the list can be longer
        than k), or exactly min(k, count) entries (``ties=False``); sorted by
        score desc then index asc. ``queries``: a list of strings (encoded with
        the bank's embedder) or a float [Q, dim] tensor of unit vectors."""
        values, indices, offsets = self.topk(queries, k, ties, backend=backend)
        return [[self.hit(indices[j], values[j]) for j in range(offsets[i], offsets[i + 1])]
                for i in range(len(offsets) - 1)]

    # ---- FAISS ----------------------------------------------------------------------------

    def build_index(self, kind: str = "flat", *, nlist: int | None = None, m: int | None = None, nbits: int = 8,
                    train_size: int = 200_000, seed: int = 0) -> dict:
        from .search import build_faiss_index  # noqa: PLC0415

        entry = build_faiss_index(self, kind, nlist=nlist, m=m, nbits=nbits, train_size=train_size, seed=seed)
        self.manifest["index"] = entry
        store.atomic_write_json(os.path.join(self.path, "manifest.json"), self.manifest)
        self._faiss = None
        return entry


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")


def _check_file(bank: str, entry: dict, verify: bool) -> None:
    p = os.path.join(bank, entry["path"])
    if not os.path.exists(p):
        raise BankFileMissing(f"bank {bank!r}: missing file {entry['path']!r}")
    if verify and store.sha256_file(p) != entry["sha256"]:
        raise BankError(f"bank {bank!r}: checksum mismatch for {entry['path']!r} (file changed or corrupt)")


def _open_shards(bank: str, entries: list, key: str, dim: int, verify: bool) -> list[torch.Tensor]:
    out = []
    for e in entries:
        _check_file(bank, e, verify)
        p = os.path.join(bank, e["path"])
        try:
            t = store.mmap_tensor(p, key)
        except ValueError as exc:
            raise BankError(f"bank {bank!r}: bad shard {e['path']!r}: {exc}") from None
        if t.dtype != torch.float16 or t.dim() != 2 or t.shape[1] != dim or t.shape[0] != e["rows"]:
            raise BankError(f"bank {bank!r}: shard {e['path']!r} holds {t.dtype} {tuple(t.shape)}; "
                            f"the manifest says float16 [{e['rows']}, {dim}]")
        out.append(t)
    return out


# ---- writing ----------------------------------------------------------------------------

def shard_name(j: int, sub: str = "embeddings") -> str:
    return f"{sub}/shard-{j:05d}.safetensors"


def write_shard(bank: str, j: int, emb, sub: str = "embeddings", key: str = EMB_KEY) -> dict:
    """Write shard ``j`` (float16, atomically); return its manifest entry."""
    t = torch.as_tensor(emb).to(torch.float16).contiguous()
    rel = shard_name(j, sub)
    store.atomic_write_tensors(os.path.join(bank, rel), {key: t})
    return {"path": rel, "rows": int(t.shape[0]), "sha256": store.sha256_file(os.path.join(bank, rel))}


def group_ids(captions: Sequence[str]) -> np.ndarray:
    """Index of the first entry with the same caption (identical captions share it)."""
    first: dict[str, int] = {}
    return np.fromiter((first.setdefault(c, i) for i, c in enumerate(captions)), dtype=np.int64, count=len(captions))


def finalize(bank: str, *, ids, captions, images, domains, shards: list, dim: int, embedder: str,
             vlm: dict | None = None, build: dict | None = None, progress: bool = False) -> dict:
    """Write meta.parquet, the BM25 cache and (last) manifest.json for shards already on disk."""
    import pyarrow as pa  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from .bm25 import build_cache  # noqa: PLC0415

    n = len(captions)
    if sum(s["rows"] for s in shards) != n:
        raise ValueError(f"finalize: shards hold {sum(s['rows'] for s in shards)} rows for {n} captions")
    table = pa.table({
        "id": pa.array(list(ids), pa.string()), "caption": pa.array(list(captions), pa.string()),
        "image": pa.array(list(images), pa.string()), "domain": pa.array(list(domains), pa.string()),
        "group": pa.array(group_ids(captions), pa.int64()),
    })
    mpath = os.path.join(bank, "meta.parquet")
    store.atomic_write_table(mpath, table)
    with tqdm(total=n, desc="bm25 cache", unit="doc", disable=not progress) as bar:
        bm25 = build_cache(captions, os.path.join(bank, "bm25"), progress=bar)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dim": int(dim), "dtype": "float16", "count": n,
        "embedder": embedder, "normalised": True, "shards": shards,
        "meta": {"path": "meta.parquet", "sha256": store.sha256_file(mpath)},
        "vlm": vlm, "bm25": bm25, "index": None, "build": build or {},
    }
    store.atomic_write_json(os.path.join(bank, "manifest.json"), manifest)
    return manifest


def write_bank(out: str, embeddings, captions: Sequence[str], *, ids=None, images=None, domains=None,
               embedder: str = "external", image_embeddings=None, vlm_name: str | None = None,
               shard_size: int = 100_000, normalise: bool = True, progress: bool = False) -> MemoryBank:
    """Write a bank from precomputed embeddings (float [n, dim]) and captions.

    Rows are L2-normalised first unless ``normalise=False`` (then they must
    already be unit vectors). For banks built from a corpus use ``build_bank``.
    """
    emb = torch.as_tensor(embeddings)
    n = len(captions)
    if emb.dim() != 2 or emb.shape[0] != n:
        raise ValueError(f"write_bank: embeddings must be [{n}, dim], got {tuple(emb.shape)}")
    if shard_size < 1:
        raise ValueError(f"write_bank: shard_size must be >= 1, got {shard_size}")
    if os.path.exists(os.path.join(out, "manifest.json")):
        raise BankError(f"write_bank: {out!r} already holds a bank")
    ids = [str(i) for i in range(n)] if ids is None else list(ids)
    images = [""] * n if images is None else list(images)
    domains = [""] * n if domains is None else list(domains)
    if not (len(ids) == len(images) == len(domains) == n):
        raise ValueError("write_bank: ids, images and domains must have one entry per caption")
    os.makedirs(out, exist_ok=True)
    shards, vshards = [], []
    for j, s in enumerate(range(0, n, shard_size)):
        blk = emb[s:s + shard_size].float()
        if normalise:
            blk = torch.nn.functional.normalize(blk, dim=1)
        shards.append(write_shard(out, j, blk))
        if image_embeddings is not None:
            v = torch.nn.functional.normalize(torch.as_tensor(image_embeddings[s:s + shard_size]).float(), dim=1)
            vshards.append(write_shard(out, j, v, "vlm", VLM_KEY))
    vlm = None
    if image_embeddings is not None:
        vlm = {"name": vlm_name or "external", "dim": int(torch.as_tensor(image_embeddings[:1]).shape[1]),
               "shards": vshards}
    finalize(out, ids=ids, captions=list(captions), images=images, domains=domains, shards=shards,
             dim=emb.shape[1], embedder=embedder, vlm=vlm, build={"source": "write_bank"}, progress=progress)
    return MemoryBank.open(out)
