"""The memory bank: a directory of text embeddings, captions and images.

Layout (DESIGN.md, "Data on disk"):

    manifest.json                      format version, dim, dtype, count, embedder,
                                       normalised flag, every file with its sha256
    embeddings/shard-00000.safetensors "embeddings": float16 [n_i, dim], unit rows
    meta.parquet                       id, caption, image, domain, group (int64); built with
                                       --split-compound also parent (the figure's id) and panel
                                       (int64: index in reading order, -1 = a whole figure)
    vlm/shard-00000.safetensors        optional "image_embeddings": float16 [n_i, d_v]
                                       (unit rows; zero rows for unreadable images)
    bm25/{vocab.json,tokens.safetensors}  caption term counts + document frequencies
    index/faiss-<kind>.index           optional FAISS index
    skipped.jsonl                      corpus records the builder skipped or repaired, damaged
                                       containers (file, position, reason, action)

The manifest is written last: a directory without it is an unfinished build.
``group`` is the index of the first entry with the same caption, so identical
captions share a group id. A panel's ``image`` names its box in the figure
(``<ref>#crop=x0,y0,x1,y1``, see ``images``), its caption is its sub-caption
(so the group follows the sub-caption), its id ``<figure id>#p<panel>``.
"""
from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
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
    """A bank directory that is missing, incomplete, corrupt or changed since its build."""


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
    """An opened bank: storage only (rows, meta, the BM25 cache, the FAISS
    index file); searching it is ``mgcl.retrieval.search``. Open with
    ``MemoryBank.open``.

    Integrity: opening reads the manifest and every file's header, never the
    data. Each file's sha256 is checked against the manifest on its first
    read through the opened bank (a shard when a search or a gather first touches it,
    meta.parquet when the captions are first read, the BM25 cache, the FAISS
    index when loaded), so a flipped byte, a rewritten shard or caption, or
    two swapped shards are refused with a BankError naming the file before any
    of it is used; the cost is one hashing pass per file per open.
    ``verify()`` (``open(..., verify=True)``, ``mgcl db info --verify``) checks
    every file at once, and the embeddings for NaN or inf.
    """

    def __init__(self, path: str, manifest: dict, shards: list[torch.Tensor], vlm_shards: list[torch.Tensor] | None,
                 embedder=None, device=None):
        self.path = path
        self.manifest = manifest
        self._shards = shards
        self._vlm_shards = vlm_shards or []
        self.count = int(manifest["count"])
        self.dim = int(manifest["dim"])
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._embedder = embedder
        self._meta = None
        self._bm25 = {}
        self._pending = set(_named_files(manifest))  # relative paths not yet checked against their sha256
        self._lock = threading.Lock()
        self.offsets = np.concatenate([[0], np.cumsum([s.shape[0] for s in shards])]).astype(np.int64)

    # ---- opening and verifying ---------------------------------------------------

    @classmethod
    def open(cls, path: str, *, verify: bool = False, embedder=None, device=None) -> "MemoryBank":
        """Open the bank at ``path``: check the manifest (format version, types,
        counts, that it names only files inside the bank) and every shard's
        header, and memory-map the shards; file contents are checked on first
        read (class doc). ``verify=True`` checks every file now. ``embedder``
        (an object or a name) encodes text queries, in place of the one named in
        the manifest. ``device``: where searches run (default: the CPU)."""
        path = os.path.abspath(os.fspath(path))
        mpath = os.path.join(path, "manifest.json")
        if not os.path.isdir(path):
            raise BankFileMissing(f"bank {path!r} does not exist")
        if not os.path.exists(mpath):
            hint = " (an unfinished build: rerun `mgcl db build` to resume)" if os.path.isdir(
                os.path.join(path, ".build")) else ""
            raise BankFileMissing(f"bank {path!r} has no manifest.json{hint}")
        dev = resolve_device(device)
        try:
            with open(mpath, "rb") as fh:
                m = json.loads(fh.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BankError(f"{mpath}: not valid JSON ({exc})") from None
        _check_manifest(m, mpath)
        for rel in _named_files(m):
            _inside(path, rel)
        dim = int(m["dim"])
        shards = _open_shards(path, m["shards"], EMB_KEY, dim)
        total = sum(s.shape[0] for s in shards)
        if total != m["count"]:
            raise BankError(f"{mpath}: shards hold {total} rows but count is {m['count']}")
        vlm = None
        if m.get("vlm"):
            vlm = _open_shards(path, m["vlm"]["shards"], VLM_KEY, int(m["vlm"]["dim"]))
            if [s.shape[0] for s in vlm] != [s.shape[0] for s in shards]:
                raise BankError(f"{mpath}: VLM image-embedding shards do not match the text shards row for row")
        import pyarrow as pa  # noqa: PLC0415
        import pyarrow.parquet as pq  # noqa: PLC0415

        meta = _file(path, m["meta"]["path"])
        try:
            nrows = pq.ParquetFile(meta).metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise BankError(f"bank {path!r}: {m['meta']['path']!r} is not a readable parquet file ({exc})") from None
        if nrows != m["count"]:
            raise BankError(f"{meta}: {nrows} rows but the manifest count is {m['count']}")
        for rel in _named_files(m):
            _file(path, rel)
        bank = cls(path, m, shards, vlm, embedder=embedder, device=dev)
        if verify:
            bank.verify()
        return bank

    def verify(self) -> None:
        """Check every file against its sha256 in the manifest, and the stored
        embeddings for NaN or inf (raises BankError naming the file)."""
        self.check(force=True)
        for entries, tensors in ((self.manifest["shards"], self._shards),
                                 ((self.manifest.get("vlm") or {}).get("shards", []), self._vlm_shards)):
            for e, t in zip(entries, tensors):
                for a in range(0, t.shape[0], 1 << 16):  # float16 NaN/inf: all five exponent bits set
                    if bool(((t[a:a + (1 << 16)].view(torch.int16) & 0x7C00) == 0x7C00).any()):
                        raise BankError(f"bank {self.path!r}: {e['path']!r} holds NaN or inf values")

    def check(self, files=None, *, force: bool = False) -> None:
        """Check ``files`` (paths relative to the bank; default: every file the
        manifest names) against their sha256, each once per bank object unless
        ``force``; several files are hashed in parallel. Reads run it on first use."""
        want = _named_files(self.manifest)
        with self._lock:
            todo = [r for r in dict.fromkeys(want if files is None else files) if force or r in self._pending]
            if not todo:
                return
            workers = max(1, min(len(todo), 4, os.cpu_count() or 1))
            with ThreadPoolExecutor(workers) as pool:
                got = list(pool.map(lambda r: store.sha256_file(os.path.join(self.path, r)), todo))
            for rel, h in zip(todo, got):
                if h != want[rel]:
                    raise BankError(f"bank {self.path!r}: {rel!r} does not match its sha256 in the manifest (changed "
                                    f"or corrupt since the build; `mgcl db info {self.path} --verify` checks all)")
                self._pending.discard(rel)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (f"MemoryBank({self.path!r}, count={self.count}, dim={self.dim}, embedder={self.embedder_name!r}, "
                f"shards={len(self._shards)}, vlm={'yes' if self.has_vlm else 'no'})")

    # ---- rows ------------------------------------------------------------------------

    @property
    def shards(self) -> list[torch.Tensor]:
        """The text-embedding shards (float16 [n_i, dim], memory-mapped), checked."""
        self.check(e["path"] for e in self.manifest["shards"])
        return list(self._shards)

    @property
    def vlm_shards(self) -> list[torch.Tensor]:
        """The VLM image-embedding shards (empty without ``--vlm``), checked."""
        self.check(e["path"] for e in (self.manifest.get("vlm") or {}).get("shards", []))
        return list(self._vlm_shards)

    @property
    def has_vlm(self) -> bool:
        return bool(self._vlm_shards)

    def _gather(self, shards, entries, indices) -> torch.Tensor:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.count):
            raise ValueError(f"index out of range [0, {self.count})")
        d = shards[0].shape[1] if shards else 0
        out = torch.empty((len(idx), d), dtype=torch.float16)
        sid = np.searchsorted(self.offsets, idx, side="right") - 1
        used = np.unique(sid)
        self.check(entries[s]["path"] for s in used)
        for s in used:
            sel = np.nonzero(sid == s)[0]
            out[torch.from_numpy(sel)] = shards[s][torch.from_numpy(idx[sel] - self.offsets[s])]
        return out

    def embeddings(self, indices) -> torch.Tensor:
        """float16 [len(indices), dim] rows of the text embeddings."""
        return self._gather(self._shards, self.manifest["shards"], indices)

    def image_embeddings(self, indices) -> torch.Tensor:
        """float16 rows of the stored VLM image embeddings (BankError when absent)."""
        if not self._vlm_shards:
            raise BankError(f"bank {self.path!r} has no VLM image embeddings (build with --vlm)")
        return self._gather(self._vlm_shards, self.manifest["vlm"]["shards"], indices)

    # ---- meta, BM25, the FAISS index file ------------------------------------------------

    @property
    def embedder_name(self) -> str:
        return self.manifest["embedder"]

    @property
    def embedder(self):
        """The text embedder of queries: the one given to ``open``, else the manifest's."""
        if self._embedder is None or isinstance(self._embedder, str):
            from .embedders import for_bank  # noqa: PLC0415

            self._embedder = for_bank(self._embedder or self.embedder_name, self)
        return self._embedder

    @property
    def meta(self):
        """The meta table as a dict of columns (lists / int64 arrays), loaded once;
        ``parent`` and ``panel`` too in a bank of split compound figures."""
        if self._meta is None:
            import pyarrow.parquet as pq  # noqa: PLC0415

            rel = self.manifest["meta"]["path"]
            self.check([rel])
            t = pq.read_table(os.path.join(self.path, rel))
            missing = [c for c in ("id", "caption", "image", "domain", "group") if c not in t.column_names]
            if missing:
                raise BankError(f"bank {self.path!r}: {rel!r} lacks the column(s) {missing}")
            meta = {c: t.column(c).to_pylist() for c in ("id", "caption", "image", "domain")}
            meta["group"] = t.column("group").to_numpy()
            if "parent" in t.column_names and "panel" in t.column_names:  # built with --split-compound
                meta["parent"] = t.column("parent").to_pylist()
                meta["panel"] = t.column("panel").to_numpy()
            self._meta = meta
        return self._meta

    def hit(self, index: int, score: float, **stages) -> Hit:
        """The ``Hit`` of entry ``index``; ``stages``: dense, visual, bm25 scores."""
        m = self.meta
        i = int(index)
        return Hit(m["id"][i], m["caption"][i], m["domain"][i], m["image"][i], float(score), i, int(m["group"][i]),
                   **stages)

    def bm25(self, k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25):
        from .bm25 import BM25  # noqa: PLC0415

        key = (k1, b, epsilon)
        if key not in self._bm25:
            entry = self.manifest.get("bm25")
            if not entry:
                raise BankError(f"bank {self.path!r} has no BM25 cache")
            self.check([entry["vocab"]["path"], entry["tokens"]["path"]])
            self._bm25[key] = BM25.open(self.path, entry, k1=k1, b=b, epsilon=epsilon)
        return self._bm25[key]

    def index_file(self) -> tuple[dict, str]:
        """The FAISS index entry of the manifest and the file's path, checked."""
        entry = self.manifest.get("index")
        if not entry:
            raise BankError(f"bank {self.path!r} has no FAISS index (mgcl db index {self.path} --index flat|ivfpq)")
        self.check([entry["path"]])
        return entry, os.path.join(self.path, entry["path"])

    def record_index(self, entry: dict) -> None:
        """Name a FAISS index file (already written inside the bank) in the manifest."""
        _check_entry(entry, "index", os.path.join(self.path, "manifest.json"))
        _inside(self.path, entry["path"])
        self.manifest["index"] = entry
        store.atomic_write_json(os.path.join(self.path, "manifest.json"), self.manifest)
        with self._lock:
            self._pending.discard(entry["path"])

    # ---- conveniences: searching is mgcl.retrieval.search ------------------------------

    def topk(self, queries, k: int, ties: bool = True, *, backend: str = "exact", overfetch: int = 4):
        """``mgcl.retrieval.search.topk(self, ...)``: CSR (values, indices, offsets)."""
        from .search import topk  # noqa: PLC0415

        return topk(self, queries, k, ties, backend=backend, overfetch=overfetch)

    def search(self, queries, k: int, ties: bool = True, *, backend: str = "exact") -> list[list[Hit]]:
        """``mgcl.retrieval.search.search(self, ...)``: one list of ``Hit`` per query."""
        from .search import search  # noqa: PLC0415

        return search(self, queries, k, ties, backend=backend)


def resolve_device(device) -> torch.device:
    """``device`` (None: the CPU) as a torch.device; ValueError for a bad name or a GPU that is not there."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no GPU is visible (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    return dev


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entry(e, what: str, mpath: str, rows: bool = False) -> None:
    ok = isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("sha256"), str)
    if ok and rows:
        ok = _is_int(e.get("rows")) and e["rows"] >= 0
    if not ok:
        need = "path, sha256" + (" and rows" if rows else "")
        raise BankError(f"{mpath}: {what} must be an object with {need}, got {json.dumps(e)[:80]}")


def _check_manifest(m, mpath: str) -> None:
    """The manifest's shape and types, so that a hand-edited one fails here, in one line."""
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
    for key in ("dim", "count"):
        if not _is_int(m[key]) or m[key] < (1 if key == "dim" else 0):
            raise BankError(f"{mpath}: {key!r} must be a non-negative integer, got {m[key]!r}")
    if not isinstance(m.get("embedder"), str):
        raise BankError(f"{mpath}: 'embedder' must be a string, got {m.get('embedder')!r}")
    if not isinstance(m["shards"], list):
        raise BankError(f"{mpath}: 'shards' must be a list of shard entries, got {type(m['shards']).__name__}")
    for i, e in enumerate(m["shards"]):
        _check_entry(e, f"shards[{i}]", mpath, rows=True)
    _check_entry(m["meta"], "'meta'", mpath)
    v = m.get("vlm")
    if v is not None:
        if not (isinstance(v, dict) and _is_int(v.get("dim")) and v["dim"] > 0 and isinstance(v.get("shards"), list)):
            raise BankError(f"{mpath}: 'vlm' must be null or an object with dim and a list of shards")
        for i, e in enumerate(v["shards"]):
            _check_entry(e, f"vlm.shards[{i}]", mpath, rows=True)
    b = m.get("bm25")
    if b is not None:
        if not isinstance(b, dict):
            raise BankError(f"{mpath}: 'bm25' must be null or an object")
        for part in ("vocab", "tokens"):
            _check_entry(b.get(part), f"bm25.{part}", mpath)
    if m.get("index") is not None:
        _check_entry(m["index"], "'index'", mpath)
        if m["index"].get("kind") not in ("flat", "ivfpq"):
            raise BankError(f"{mpath}: index kind {m['index'].get('kind')!r}; expected 'flat' or 'ivfpq'")


def _named_files(m: dict) -> dict[str, str]:
    """Every file the manifest names (relative path -> sha256)."""
    entries = list(m["shards"]) + [m["meta"]] + list((m.get("vlm") or {}).get("shards", []))
    if m.get("bm25"):
        entries += [m["bm25"]["vocab"], m["bm25"]["tokens"]]
    if m.get("index"):
        entries.append(m["index"])
    return {e["path"]: e["sha256"] for e in entries}


def _inside(bank: str, rel: str) -> None:
    """A manifest names only files inside its bank: relative, no '..'."""
    parts = rel.replace("\\", "/").split("/")
    if os.path.isabs(rel) or "\0" in rel or ".." in parts or rel in ("", "."):
        raise BankError(f"bank {bank!r}: the manifest names {rel!r}, which is not a file inside the bank "
                        "(paths must be relative, without '..')")


def _file(bank: str, rel: str) -> str:
    p = os.path.join(bank, rel)
    if not os.path.isfile(p):
        raise BankFileMissing(f"bank {bank!r}: missing file {rel!r}")
    return p


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")


def _open_shards(bank: str, entries: list, key: str, dim: int) -> list[torch.Tensor]:
    out = []
    for e in entries:
        p = _file(bank, e["path"])
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
    """Write shard ``j`` (float16, atomically); return its manifest entry.
    Rows with NaN or inf (also after rounding to float16) are refused."""
    t = torch.as_tensor(emb).to(torch.float16).contiguous()
    bad = torch.nonzero(~torch.isfinite(t).all(1)).flatten()
    if len(bad):
        raise ValueError(f"write_shard: {len(bad)} row(s) of {sub} shard {j} hold NaN or inf (the first: row "
                         f"{int(bad[0])}); a bank stores finite unit vectors")
    rel = shard_name(j, sub)
    store.atomic_write_tensors(os.path.join(bank, rel), {key: t})
    return {"path": rel, "rows": int(t.shape[0]), "sha256": store.sha256_file(os.path.join(bank, rel))}


def group_ids(captions: Sequence[str]) -> np.ndarray:
    """Index of the first entry with the same caption (identical captions share it)."""
    first: dict[str, int] = {}
    return np.fromiter((first.setdefault(c, i) for i, c in enumerate(captions)), dtype=np.int64, count=len(captions))


def finalize(bank: str, *, ids, captions, images, domains, shards: list, dim: int, embedder: str,
             vlm: dict | None = None, build: dict | None = None, extra: dict | None = None,
             progress: bool = False) -> dict:
    """Write meta.parquet, the BM25 cache and (last) manifest.json for shards
    already on disk. ``extra``: the ``parent`` (str) and ``panel`` (int)
    columns of a bank of split compound figures."""
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
        **({"parent": pa.array(list(extra["parent"]), pa.string()),
            "panel": pa.array(list(extra["panel"]), pa.int64())} if extra else {}),
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
