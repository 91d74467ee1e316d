"""Corpus readers: jsonl, parquet and WebDataset tar shards -> records.

Shapes understood (field names are tried in the order listed):
- PMC-OA jsonl: one JSON object a line, ``{"image": "PMC..._F1.jpg", "caption": "..."}``;
  relative image paths are resolved against ``image_root`` or the jsonl's folder.
- parquet: the same fields as columns; an image column holds paths, raw
  bytes or Hugging Face ``{"bytes", "path"}`` structs (stored as a reference
  to the cell); WebDataset-style tables (``jpg``/``png`` image columns, ``txt``
  caption, a ``json`` column of metadata) are read like the tar members.
- WebDataset tar (BIOMEDICA, Open-PMC-18M): members grouped by key (the name
  up to the first dot of the basename); the image member (jpg/jpeg/png/webp/
  tif/tiff/bmp), the caption from ``txt`` / ``caption`` or from the ``json``
  member's caption field; id and domain from the json member when present
  (BIOMEDICA keeps cluster labels such as ``image_primary_label`` there).

``read_corpus(paths)`` yields ``Record`` for good records and ``Skipped`` (with
the file, position and reason) for empty or malformed ones, in a deterministic
order: the paths as given, directories expanded to their sorted files.
"""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from typing import Iterator, Union

from .images import parquet_ref, tar_ref

CAPTION_KEYS = ("caption", "text", "txt", "caption_text", "figure_caption")
IMAGE_KEYS = ("image", "image_path", "img_path", "path", "file_name", "filename", "image_file")
ID_KEYS = ("id", "__key__", "key", "image_id", "uid", "sample_id")
DOMAIN_KEYS = ("domain", "modality", "image_primary_label", "primary_label")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp")
CORPUS_EXTS = (".jsonl", ".json", ".jsonl.gz", ".parquet", ".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class Record:
    id: str
    caption: str
    image: str
    domain: str
    source: str  # "file:position" for error messages


@dataclass(frozen=True)
class Skipped:
    source: str
    reason: str


def expand(paths) -> list[str]:
    """Corpus files from ``paths`` (files kept in order; folders expanded, sorted)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            for root, _, files in sorted(os.walk(p)):
                out += [os.path.join(root, f) for f in sorted(files) if f.endswith(CORPUS_EXTS)]
        elif os.path.isfile(p):
            if not p.endswith(CORPUS_EXTS):
                raise ValueError(f"corpus file {p!r}: unknown format; expected one of {CORPUS_EXTS}")
            out.append(p)
        else:
            raise FileNotFoundError(f"corpus path {p!r} does not exist")
    return [os.path.abspath(p) for p in out]


def read_corpus(paths, image_root: str | None = None) -> Iterator[Union[Record, Skipped]]:
    for path in expand(paths):
        if path.endswith(".parquet"):
            yield from _read_parquet(path, image_root)
        elif path.endswith((".tar", ".tar.gz", ".tgz")):
            yield from _read_tar(path)
        else:
            yield from _read_jsonl(path, image_root)


def _first(d: dict, keys) -> object:
    for k in keys:
        v = d.get(k)
        if v is not None and v != "":
            return v
    return None


def _domain(d: dict) -> str:
    v = _first(d, DOMAIN_KEYS)
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    return str(v).strip() if v is not None else ""


def _from_dict(d, source: str, base_dir: str, image_root: str | None, fallback_id: str):
    if not isinstance(d, dict):
        return Skipped(source, f"not a JSON object ({type(d).__name__})")
    cap = _first(d, CAPTION_KEYS)
    if cap is None:
        return Skipped(source, "no caption field")
    if not isinstance(cap, str):
        return Skipped(source, f"caption is {type(cap).__name__}, not a string")
    cap = " ".join(cap.split())
    if not cap:
        return Skipped(source, "empty caption")
    img = _first(d, IMAGE_KEYS)
    if img is not None and not isinstance(img, str):
        return Skipped(source, f"image field is {type(img).__name__}, not a path string")
    image = ""
    if img:
        image = img if os.path.isabs(img) else os.path.abspath(os.path.join(image_root or base_dir, img))
    rid = _first(d, ID_KEYS)
    if rid is None:
        rid = os.path.basename(img) if img else fallback_id
    return Record(str(rid), cap, image, _domain(d), source)


def _read_jsonl(path: str, image_root):
    import gzip  # noqa: PLC0415

    opener = gzip.open if path.endswith(".gz") else open
    base, name = os.path.dirname(path), os.path.basename(path)
    with opener(path, "rt", encoding="utf-8", errors="strict") as fh:
        lineno = 0
        while True:
            source = f"{path}:{lineno + 1}"
            try:
                line = fh.readline()
            except UnicodeDecodeError as exc:
                yield Skipped(source, f"undecodable bytes: {exc.reason}")
                return  # the stream position is lost after a decode error
            if not line:
                return
            lineno += 1
            if not line.strip():
                yield Skipped(source, "blank line")
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Skipped(source, f"invalid JSON: {exc.msg}")
                continue
            yield _from_dict(d, source, base, image_root, f"{name}:{lineno}")


def _read_parquet(path: str, image_root):
    import pyarrow.parquet as pq  # noqa: PLC0415

    base, name = os.path.dirname(path), os.path.basename(path)
    pf = pq.ParquetFile(path)
    image_cols = IMAGE_KEYS + IMAGE_EXTS
    cols = [c for c in pf.schema_arrow.names if c in CAPTION_KEYS + image_cols + ID_KEYS + DOMAIN_KEYS + ("json",)]
    row = 0
    for batch in pf.iter_batches(columns=cols, batch_size=256):
        for d in batch.to_pylist():
            row += 1
            source = f"{path}:row{row}"
            if isinstance(d.get("json"), (str, bytes)):  # WebDataset-style metadata column
                try:
                    meta = json.loads(d.pop("json"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    yield Skipped(source, f"invalid json column: {exc}")
                    continue
                if isinstance(meta, dict):
                    d = {**meta, **{k: v for k, v in d.items() if v is not None}}
            for col in image_cols:
                v, hint = d.get(col), None
                if isinstance(v, dict):  # Hugging Face Image struct
                    hint = v.get("path")
                    v = v.get("bytes") or hint
                if v in (None, "", b""):
                    d[col] = None
                    continue
                if isinstance(v, (bytes, bytearray)):  # image bytes in the cell: refer to it
                    if _first(d, ID_KEYS) is None:
                        d["id"] = os.path.basename(hint) if isinstance(hint, str) and hint else f"{name}:{row}"
                    v = parquet_ref(path, col, row - 1)
                d["image"] = v
                break
            yield _from_dict(d, source, base, image_root, f"{name}:{row}")


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename."""
    d, b = os.path.split(name)
    stem, dot, ext = b.partition(".")
    return (os.path.join(d, stem) if d else stem), ext.lower()


def _read_tar(path: str):
    def flush(key, parts):
        source = f"{path}::{key}"
        meta = {}
        if "json" in parts:
            try:
                meta = json.loads(parts["json"][1].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                return Skipped(source, f"invalid json member: {exc}")
            if not isinstance(meta, dict):
                return Skipped(source, "json member is not an object")
        cap = None
        for ext in ("txt", "caption", "caption.txt"):
            if ext in parts:
                try:
                    cap = parts[ext][1].decode("utf-8")
                except UnicodeDecodeError:
                    return Skipped(source, f"undecodable {ext} member")
                break
        if cap is None:
            cap = _first(meta, CAPTION_KEYS)
        if cap is None:
            return Skipped(source, "no caption (txt member or json caption)")
        if not isinstance(cap, str):
            return Skipped(source, "caption is not a string")
        cap = " ".join(cap.split())
        if not cap:
            return Skipped(source, "empty caption")
        img = next((parts[e][0] for e in IMAGE_EXTS if e in parts), None)
        if img is None:
            return Skipped(source, "no image member")
        rid = _first(meta, ID_KEYS) or key
        return Record(str(rid), cap, tar_ref(path, img), _domain(meta), source)

    with tarfile.open(path, "r:*") as tf:
        key, parts = None, {}
        for m in tf:
            if not m.isfile():
                continue
            k, ext = _split_member(m.name)
            if k != key:
                if key is not None:
                    yield flush(key, parts)
                key, parts = k, {}
            data = tf.extractfile(m).read() if ext in ("json", "txt", "caption", "caption.txt") else b""
            parts[ext] = (m.name, data)
        if key is not None:
            yield flush(key, parts)
