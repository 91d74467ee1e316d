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

Nothing readable is lost. ``read_corpus(paths)`` yields, in a deterministic
order (the paths as given, folders expanded to their sorted files):
- ``Record`` for every usable record; text that is not clean is repaired
  (invalid UTF-8 and lone surrogates become U+FFFD, NUL and other control
  characters are dropped) and the record says what was repaired;
- ``Skipped`` (file, position, reason) for a record that cannot be used, and
  reading goes on with the next one;
- ``Damaged`` (file, position, reason, records read so far) for a container
  that is damaged or ends early: a tar is read on past a damaged member
  header, a parquet file past an unreadable row group; a gzip stream or a
  tar that ends early keeps the records read before the damage.
A tar that holds one member name twice keeps the first sample and skips the
later one. Image paths must resolve inside the corpus root (``image_root``,
else the folder the file was found in) unless ``external_images=True``.
Folders holding an mgcl bank (finished or under construction) are not corpus:
``expand`` leaves them out and says so. ``expand`` also takes brace patterns
(``shard-{000000..000999}.tar``, expanded as bash does), fsspec URLs (remote
files copied once into mgcl's cache) and Hugging Face datasets (``HFDataset``,
a ``datasets.Dataset`` or a ``save_to_disk`` folder, written once as parquet
into mgcl's cache and read as parquet): the last section of this file.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from typing import Iterator, Union

from .. import _env, _hub
from .images import parquet_ref, tar_ref, walk_tar

CAPTION_KEYS = ("caption", "text", "txt", "caption_text", "figure_caption")
IMAGE_KEYS = ("image", "image_path", "img_path", "path", "file_name", "filename", "image_file")
ID_KEYS = ("id", "__key__", "key", "image_id", "uid", "sample_id")
DOMAIN_KEYS = ("domain", "modality", "image_primary_label", "primary_label")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp")
CORPUS_EXTS = (".jsonl", ".json", ".jsonl.gz", ".parquet", ".tar", ".tar.gz", ".tgz")
TEXT_MEMBERS = ("json", "txt", "caption", "caption.txt")


@dataclass(frozen=True)
class Record:
    id: str
    caption: str
    image: str
    domain: str
    file: str
    position: str          # "line 12", "row 7", "sample k0001"
    repaired: str = ""     # what was repaired in its text ("" = nothing)
    parent: str = ""       # a panel of a split compound figure (``cleanse``): the figure's id ("" = a whole figure)
    panel: int = -1        # ... and its index in reading order (-1 = a whole figure)


@dataclass(frozen=True)
class Skipped:
    file: str
    position: str
    reason: str

    def __post_init__(self):  # one line in skipped.jsonl's readers and the build's summary
        object.__setattr__(self, "reason", " ".join(self.reason.split()))


@dataclass(frozen=True)
class Damaged:
    file: str
    position: str          # where the damage starts ("byte 5120", "row group 2 (rows 513-768)", "line 90")
    reason: str
    records_read: int      # records (used or skipped) read from the file before it

    def __post_init__(self):  # tarfile's and pyarrow's messages can span lines
        object.__setattr__(self, "reason", " ".join(self.reason.split()))


Item = Union[Record, Skipped, Damaged]


@dataclass(frozen=True)
class CorpusFile:
    path: str              # absolute
    root: str              # the folder its image paths must stay inside


# ---- finding the files -------------------------------------------------------------------

def is_bank_dir(path: str) -> bool:
    """A finished mgcl bank (manifest.json of format mgcl-bank) or one being built (.build/)."""
    if os.path.isdir(os.path.join(path, ".build")):
        return True
    try:
        with open(os.path.join(path, "manifest.json"), "rb") as fh:
            return json.loads(fh.read(1 << 20)).get("format") == "mgcl-bank"
    except (OSError, ValueError, AttributeError):
        return False


def expand(paths, *, exclude=(), excluded: list | None = None) -> list[CorpusFile]:
    """Corpus files from ``paths`` (files kept in order; folders expanded, sorted).
    A path may be a brace pattern (``shard-{000000..000999}.tar``, expanded as
    bash does), an fsspec URL (``file://``, ``memory://``, ``hf://``, ...), a
    folder written by ``datasets``' ``save_to_disk``, a ``datasets.Dataset`` or
    an ``HFDataset``. Folders that hold an mgcl bank, and the folders in
    ``exclude`` (the bank being built), are left out and appended to ``excluded``."""
    if isinstance(paths, (str, os.PathLike, HFDataset)) or _is_dataset(paths):
        paths = [paths]
    skip = {os.path.abspath(os.fspath(p)) for p in exclude}
    out = []
    for given in paths:
        if isinstance(given, HFDataset) or _is_dataset(given):
            out.append(_dataset_file(given if isinstance(given, HFDataset) else HFDataset(given)))
            continue
        given = os.fspath(given)
        names = expand_braces(given) if isinstance(given, str) else [given]
        if len(names) > 1 and not any(is_url(n) for n in names):
            missing = [n for n in names if not os.path.exists(n)]
            if missing:
                raise FileNotFoundError(f"corpus pattern {given!r}: {len(missing)} of its {len(names)} paths do not "
                                        f"exist (the first: {missing[0]!r})")
        for name in names:
            for p in (_fetch_url(name) if is_url(name) else [name]):
                out += _expand_one(os.path.abspath(p), skip, excluded)
    return out


def _expand_one(p: str, skip: set, excluded: list | None) -> list[CorpusFile]:
    if os.path.isdir(p) and is_saved_dataset(p) and not is_bank_dir(p):
        return [_dataset_file(HFDataset(p))]
    if os.path.isdir(p):
        found = []
        for root, dirs, files in os.walk(p):
            if root in skip or is_bank_dir(root):
                if excluded is not None:
                    excluded.append(root)
                dirs[:] = []
                continue
            found.append((root, files))
        # folders in sorted path order, then their sorted files
        return [CorpusFile(os.path.join(root, f), p) for root, files in sorted(found) for f in sorted(files)
                if f.endswith(CORPUS_EXTS)]
    if os.path.isfile(p):
        if not p.endswith(CORPUS_EXTS):
            raise ValueError(f"corpus file {p!r}: unknown format; expected one of {CORPUS_EXTS}")
        return [CorpusFile(p, os.path.dirname(p))]
    raise FileNotFoundError(f"corpus path {p!r} does not exist")


def read_corpus(paths, image_root: str | None = None, *, external_images: bool = False) -> Iterator[Item]:
    """Records, skips and damage of the corpus at ``paths`` (module doc)."""
    return read_files(expand(paths), image_root, external_images=external_images)


def read_files(files: list[CorpusFile], image_root: str | None = None, *,
               external_images: bool = False) -> Iterator[Item]:
    root = os.path.abspath(image_root) if image_root else None
    for cf in files:
        if not _encodable(cf.path):
            yield Damaged(cf.path, "", "the file name is not valid UTF-8 (rename it)", 0)
        elif cf.path.endswith(".parquet"):
            yield from _read_parquet(cf, root, external_images)
        elif cf.path.endswith((".tar", ".tar.gz", ".tgz")):
            yield from _read_tar(cf.path)
        else:
            yield from _read_jsonl(cf, root, external_images)


# ---- text ---------------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")  # control characters that are not whitespace


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\0" not in s


def _decode(raw: bytes) -> tuple[str, str]:
    """UTF-8 text, with invalid bytes replaced by U+FFFD; and a note when any were."""
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as exc:
        return raw.decode("utf-8", errors="replace"), f"invalid UTF-8 at byte {exc.start}"


def _clean(s: str, what: str, notes: list) -> str:
    """``s`` with lone surrogates as U+FFFD and control characters dropped (noted)."""
    t = _CONTROL.sub("", _SURROGATE.sub("\ufffd", s))
    if t != s:
        notes.append(f"{what}: {'lone surrogate' if _SURROGATE.search(s) else 'control character'}")
    return t


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


def _inside(path: str, root: str) -> bool:
    path, root = os.path.normpath(path), os.path.normpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _from_dict(d, file: str, pos: str, base_dir: str, root: str, external: bool, fallback_id: str,
               notes: list, image_ref: str | None = None):
    """A record from one JSON object / table row. ``image_ref``: a reference
    to image bytes inside the container itself (no path to check)."""
    if not isinstance(d, dict):
        return Skipped(file, pos, f"not a JSON object ({type(d).__name__})")
    cap = _first(d, CAPTION_KEYS)
    if cap is None:
        return Skipped(file, pos, "no caption field")
    if not isinstance(cap, str):
        return Skipped(file, pos, f"caption is {type(cap).__name__}, not a string")
    cap = " ".join(_clean(cap, "caption", notes).split())
    if not cap:
        return Skipped(file, pos, "empty caption")
    img = None if image_ref is not None else _first(d, IMAGE_KEYS)
    if img is not None and not isinstance(img, str):
        return Skipped(file, pos, f"image field is {type(img).__name__}, not a path string")
    image = image_ref or ""
    if img:
        if not _encodable(img):
            return Skipped(file, pos, "image path holds invalid text (lone surrogate or NUL)")
        image = img if os.path.isabs(img) else os.path.abspath(os.path.join(base_dir, img))
        if not external and not _inside(image, root):
            return Skipped(file, pos, f"image outside the corpus root: {img!r} is not under {root} (pass "
                                      "--image-root FOLDER, or --allow-external-images to accept any path)")
    rid = _first(d, ID_KEYS)
    if rid is None:
        rid = os.path.basename(img) if img else fallback_id
    rid = _clean(str(rid), "id", notes)
    return Record(rid, cap, image, _clean(_domain(d), "domain", notes), file, pos, "; ".join(notes))


# ---- jsonl ----------------------------------------------------------------------------------

def _read_jsonl(cf: CorpusFile, image_root, external):
    import gzip  # noqa: PLC0415

    path = cf.path
    base, name = os.path.dirname(path), os.path.basename(path)
    gz = path.endswith(".gz")
    read, lineno = 0, 0
    try:
        if gz and os.path.getsize(path) == 0:
            yield Damaged(path, "", "empty file (not a gzip stream)", 0)
            return
        fh = gzip.open(path, "rb") if gz else open(path, "rb")
    except OSError as exc:
        yield Damaged(path, "", f"cannot open ({exc.strerror or exc})", 0)
        return
    with fh:
        lines = iter(fh)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except (OSError, EOFError, zlib.error) as exc:
                yield Damaged(path, f"line {lineno + 1}", f"ends early or is corrupt ({exc})", read)
                return
            lineno += 1
            if not raw.strip():
                continue  # a blank line holds no record
            read += 1
            pos = f"line {lineno}"
            text, note = _decode(raw)
            try:
                d = json.loads(text, strict=False)  # raw control characters in strings are repaired below
            except json.JSONDecodeError as exc:
                yield Skipped(path, pos, f"invalid JSON: {exc.msg}" + (f" ({note})" if note else ""))
                continue
            yield _from_dict(d, path, pos, image_root or base, image_root or cf.root, external,
                             f"{name}:{lineno}", [note] if note else [])


# ---- parquet --------------------------------------------------------------------------------

def _read_parquet(cf: CorpusFile, image_root, external):
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    path = cf.path
    base, name = os.path.dirname(path), os.path.basename(path)
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    except (pa.ArrowException, OSError) as exc:
        yield Damaged(path, "", f"not a readable parquet file ({exc})", 0)
        return
    cols = [c for c in names if c in CAPTION_KEYS + IMAGE_KEYS + IMAGE_EXTS + ID_KEYS + DOMAIN_KEYS + ("json",)]
    strings = {f.name for f in pf.schema_arrow if f.name in cols and (pa.types.is_string(f.type)
                                                                     or pa.types.is_large_string(f.type))}
    read, row = 0, 0
    for g, size in enumerate(sizes):
        start, done = row, 0
        batches = pf.iter_batches(columns=cols, batch_size=256, row_groups=[g])
        while True:
            try:
                batch = next(batches)
                rows = _strings_as_binary(batch, strings).to_pylist()
            except StopIteration:
                break
            except (pa.ArrowException, OSError, ValueError) as exc:
                yield Damaged(path, f"row group {g} (rows {start + done + 1}-{start + size})",
                              f"unreadable ({exc}); its remaining {size - done} rows are lost", read)
                break
            for d in rows:
                done += 1
                read += 1
                yield _parquet_row(d, strings, path, start + done, base, image_root, cf.root, external, name)
        row = start + size


def _strings_as_binary(batch, strings: set):
    """String columns as binary, so that invalid UTF-8 in one cell is repaired
    for that record (``_decode``) rather than failing the whole batch."""
    import pyarrow as pa  # noqa: PLC0415

    return batch.cast(pa.schema([pa.field(f.name, pa.large_binary()) if f.name in strings else f
                                 for f in batch.schema]))


def _parquet_row(d: dict, strings: set, path, row: int, base, image_root, root, external, name):
    pos = f"row {row}"
    notes: list = []
    for k in strings:
        if d.get(k) is not None:
            d[k], note = _decode(d[k])
            if note:
                notes.append(f"{k}: {note}")
    if isinstance(d.get("json"), (str, bytes)):  # WebDataset-style metadata column
        try:
            meta = json.loads(d.pop("json"), strict=False)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return Skipped(path, pos, f"invalid json column: {exc}")
        if isinstance(meta, dict):
            d = {**meta, **{k: v for k, v in d.items() if v is not None}}
    ref = None
    for col in IMAGE_KEYS + IMAGE_EXTS:
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
            ref = parquet_ref(path, col, row - 1)
        else:
            d["image"] = v
        break
    return _from_dict(d, path, pos, image_root or base, image_root or root, external, f"{name}:{row}", notes, ref)


# ---- WebDataset tar -------------------------------------------------------------------------

def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename."""
    d, b = os.path.split(name)
    stem, dot, ext = b.partition(".")
    return (os.path.join(d, stem) if d else stem), ext.lower()


def _tar_sample(path: str, key: str, parts: dict, duplicate):
    pos = f"sample {key}"
    if duplicate is not None:
        name, first = duplicate
        return Skipped(path, pos, f"duplicate member name: {name!r} (first at byte {first}); the first sample "
                                  "is kept, this one skipped")
    if not all(_encodable(name) for name, _ in parts.values()):
        return Skipped(path, pos, "member name is not valid UTF-8")
    broken = [ext for ext, (_, data) in parts.items() if isinstance(data, Exception)]
    if broken:
        return Skipped(path, pos, f"unreadable member: {parts[broken[0]][0]!r} ({parts[broken[0]][1]})")
    notes: list = []
    meta = {}
    if "json" in parts:
        text, note = _decode(parts["json"][1])
        try:
            meta = json.loads(text, strict=False)
        except json.JSONDecodeError as exc:
            return Skipped(path, pos, f"invalid json member: {exc}")
        if not isinstance(meta, dict):
            return Skipped(path, pos, "json member is not an object")
        if note:
            notes.append(f"json: {note}")
    cap = None
    for ext in ("txt", "caption", "caption.txt"):
        if ext in parts:
            cap, note = _decode(parts[ext][1])
            if note:
                notes.append(f"{ext}: {note}")
            break
    if cap is None:
        cap = _first(meta, CAPTION_KEYS)
    if cap is None:
        return Skipped(path, pos, "no caption (txt member or json caption)")
    if not isinstance(cap, str):
        return Skipped(path, pos, "caption is not a string")
    cap = " ".join(_clean(cap, "caption", notes).split())
    if not cap:
        return Skipped(path, pos, "empty caption")
    img = next((parts[e][0] for e in IMAGE_EXTS if e in parts), None)
    if img is None:
        return Skipped(path, pos, "no image member")
    rid = _clean(str(_first(meta, ID_KEYS) or key), "id", notes)
    return Record(rid, cap, tar_ref(path, img), _clean(_domain(meta), "domain", notes), path, pos, "; ".join(notes))


def _read_tar(path: str):
    try:
        tf = tarfile.open(path, "r:*", ignore_zeros=True)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        yield Damaged(path, "", f"not a readable tar archive ({exc})", 0)
        return
    damage: list = []
    reported = 0
    read = 0
    seen: dict[str, int] = {}
    key, parts, dup = None, {}, None
    with tf:
        for m in walk_tar(tf, damage):
            for off, why in damage[reported:]:
                yield Damaged(path, f"byte {off}", why, read)
            reported = len(damage)
            if not m.isfile():
                continue
            k, ext = _split_member(m.name)
            if k != key or ext in parts:  # a new sample (a repeated extension: the same key again)
                if key is not None:
                    read += 1
                    yield _tar_sample(path, key, parts, dup)
                key, parts, dup = k, {}, None
            if m.name in seen:
                dup = dup or (m.name, seen[m.name])
            else:
                seen[m.name] = m.offset
            data = b""
            if ext in TEXT_MEMBERS:
                try:
                    data = tf.extractfile(m).read()
                except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                    data = exc
            parts[ext] = (m.name, data)
        if key is not None:
            read += 1
            yield _tar_sample(path, key, parts, dup)
    for off, why in damage[reported:]:
        yield Damaged(path, f"byte {off}", why, read)


# ---- inputs: brace patterns, URLs, Hugging Face datasets ------------------------------------

_SEQ = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$|^([A-Za-z])\.\.([A-Za-z])(?:\.\.(-?\d+))?$")


def _matching(s: str, i: int) -> int:
    """The index of the ``}`` closing the ``{`` at ``i`` (nesting counted), or -1."""
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return j
    return -1


def _split_top(s: str) -> list[str]:
    """``s`` split at the commas outside nested braces."""
    parts, depth, start = [], 0, 0
    for j, c in enumerate(s):
        depth += {"{": 1, "}": -1}.get(c, 0)
        if c == "," and depth == 0:
            parts.append(s[start:j])
            start = j + 1
    return parts + [s[start:]]


def _sequence(body: str) -> list[str] | None:
    """Bash's ``{x..y[..step]}``: integers (zero-padded to the wider end when
    either end has a leading zero) or single letters; None when not a sequence."""
    m = _SEQ.match(body)
    if m is None:
        return None
    if m.group(1) is not None:
        a, b, step = m.group(1), m.group(2), m.group(3)
        lo, hi = int(a), int(b)
    else:
        a, b, step = m.group(4), m.group(5), m.group(6)
        lo, hi = ord(a), ord(b)
    inc = abs(int(step)) if step else 1
    inc = inc or 1
    vals = range(lo, hi + 1, inc) if lo <= hi else range(lo, hi - 1, -inc)
    if m.group(1) is None:
        return [chr(v) for v in vals]
    pad = any(len(e.lstrip("-")) > 1 and e.lstrip("-").startswith("0") for e in (a, b))
    width = max(len(a), len(b)) if pad else 0
    return [f"{v:0{width}d}" for v in vals]


def expand_braces(pattern: str) -> list[str]:
    """Bash brace expansion, the WebDataset shard convention:
    ``shard-{000000..000002}.tar`` -> shard-000000.tar .. shard-000002.tar;
    ``{a,b}``, ``{1..10..3}`` (steps), ``{a..e}``, nested and several groups
    (expanded left to right, as bash does). A brace group that is neither a
    list nor a sequence is kept literally."""
    i = pattern.find("{")
    while i >= 0:
        j = _matching(pattern, i)
        if j < 0:
            return [pattern]
        body = pattern[i + 1:j]
        parts = _split_top(body)
        alts = [x for p in parts for x in expand_braces(p)] if len(parts) > 1 else _sequence(body)
        if alts is not None:
            head, tails = pattern[:i], expand_braces(pattern[j + 1:])
            return [head + a + t for a in alts for t in tails]
        i = pattern.find("{", i + 1)
    return [pattern]


def is_url(p) -> bool:
    return isinstance(p, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", p) is not None


def _fetch_url(url: str) -> list[str]:
    """Local paths of the corpus files at an fsspec URL (a file or a folder).
    ``file://`` is the local path itself; any other protocol is copied once into
    mgcl's cache (``$MGCL_CACHE/corpus/<protocol>/...``, atomically, reused while
    its size matches), so the bank's image references stay openable later and a
    resumed build sees the same files."""
    try:
        import fsspec  # noqa: PLC0415
    except ImportError:
        raise ImportError(f"corpus URL {url!r}: reading URLs needs fsspec (pip install mgcl[datasets])") from None
    from .._io import atomic_write  # noqa: PLC0415

    try:
        fs, path = fsspec.core.url_to_fs(url)
        protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        if protocol in ("file", "local"):
            return [os.path.abspath(path)]
        if protocol == "hf" and _hub.offline():
            # offline, the hub's filesystem answers "does not exist" for everything
            raise OSError(f"corpus URL {url!r} cannot be read: HF_HUB_OFFLINE is set, so the hub is not asked "
                          "(unset it, or download the files and pass their local paths)")
        if not fs.exists(path):
            raise FileNotFoundError(f"corpus URL {url!r} does not exist")
        names = sorted(f for f in fs.find(path) if f.endswith(CORPUS_EXTS)) if fs.isdir(path) else [path]
        out = []
        for name in names:
            local = str(_env.cache_dir("corpus", protocol, *name.lstrip("/").split("/")))
            size = fs.size(name)
            if not (os.path.isfile(local) and os.path.getsize(local) == size):
                atomic_write(local, lambda tmp, name=name: fs.get_file(name, tmp))
            out.append(local)
        return out
    except (FileNotFoundError, ImportError):
        raise
    except Exception as exc:  # noqa: BLE001 -- each filesystem raises its own kinds; one line names the URL
        if str(exc).startswith(f"corpus URL {url!r}"):
            raise  # already ours
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise OSError(f"corpus URL {url!r} cannot be read ({why[:300]})") from None


@dataclass(frozen=True)
class HFDataset:
    """A Hugging Face ``datasets.Dataset`` (or the folder ``save_to_disk`` wrote)
    as corpus: ``image_column`` (images or paths) and ``caption_column`` (text);
    None tries the usual names (``IMAGE_KEYS``, ``CAPTION_KEYS``). Its rows are
    written once, in order, as a parquet file in mgcl's cache
    (``$MGCL_CACHE/corpus/datasets/<fingerprint>.parquet``) and read from there
    like any parquet corpus (skips name that file and the row)."""
    dataset: object
    image_column: str | None = None
    caption_column: str | None = None


def is_saved_dataset(path: str) -> bool:
    """A folder written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``)."""
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path,
                                                                                           "dataset_dict.json"))


def _is_dataset(obj) -> bool:
    return type(obj).__module__.split(".")[0] == "datasets"


def _dataset_file(spec: HFDataset) -> CorpusFile:
    try:
        import datasets  # noqa: PLC0415
    except ImportError:
        raise ImportError("a Hugging Face dataset as corpus needs datasets (pip install mgcl[datasets])") from None
    ds, root = spec.dataset, os.getcwd()
    if isinstance(ds, (str, os.PathLike)):
        root = os.path.abspath(os.fspath(ds))
        if os.path.isfile(os.path.join(root, "dataset_dict.json")):
            with open(os.path.join(root, "dataset_dict.json")) as fh:
                splits = json.load(fh).get("splits", [])
            raise ValueError(f"corpus {root!r} is a saved DatasetDict (splits {', '.join(splits)}); pass one "
                             f"split's folder ({os.path.join(root, splits[0] if splits else 'train')})")
        try:
            ds = datasets.load_from_disk(root)
        except (OSError, ValueError) as exc:
            raise ValueError(f"corpus {root!r}: not a readable saved dataset ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"corpus: a DatasetDict (splits {', '.join(ds)}); pass one split, e.g. ds[{next(iter(ds))!r}]")
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"corpus: expected a datasets.Dataset, got {type(ds).__name__}")
    cols = ds.column_names
    rename = {}
    for want, given, keys in (("image", spec.image_column, IMAGE_KEYS + IMAGE_EXTS),
                              ("caption", spec.caption_column, CAPTION_KEYS)):
        if given is not None and given not in cols:
            raise ValueError(f"corpus dataset: no {want} column {given!r}; its columns: {', '.join(cols)}")
        name = given or next((k for k in keys if k in cols), None)
        if name is None and want == "caption":
            raise ValueError(f"corpus dataset: no caption column (tried {', '.join(keys)}); its columns: "
                             f"{', '.join(cols)} (--caption-column NAME)")
        if name is not None and name != want:
            rename[name] = want
    keep = [c for c in cols if c in rename or c in ("image", "caption") + ID_KEYS + DOMAIN_KEYS]
    ds = ds.select_columns(keep)
    for old in rename:  # a column already called image / caption that is not the chosen one is dropped
        if rename[old] in ds.column_names:
            ds = ds.remove_columns(rename[old])
    ds = ds.rename_columns(rename)
    bars = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()                           # mgcl's bar is the build's
    try:
        feat = ds.features.get("image")
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column("image", datasets.Image(decode=False))   # {"bytes", "path"}, not PIL images
        elif "image" in ds.column_names:                                 # paths: relative to the dataset's folder
            ds = ds.map(lambda r: {"image": r["image"] if not isinstance(r["image"], str) or os.path.isabs(
                r["image"]) else os.path.join(root, r["image"])})
        local = str(_env.cache_dir("corpus", "datasets", f"{ds._fingerprint}.parquet"))
        if not os.path.isfile(local):
            from .._io import atomic_write  # noqa: PLC0415

            atomic_write(local, lambda tmp: ds.to_parquet(tmp))
    finally:
        if bars:
            datasets.utils.enable_progress_bars()
    return CorpusFile(local, root)


def count_records(files: list[CorpusFile]) -> int | None:
    """Records the files hold, when cheap to know (parquet metadata, plain jsonl
    lines); None when any file needs a full read to count (gzip, tar)."""
    import pyarrow.parquet as pq  # noqa: PLC0415

    n = 0
    for cf in files:
        try:
            if cf.path.endswith(".parquet"):
                n += pq.ParquetFile(cf.path).metadata.num_rows
            elif cf.path.endswith((".jsonl", ".json")):
                with open(cf.path, "rb") as fh:
                    n += sum(1 for line in fh if line.strip())
            else:
                return None
        except Exception:  # noqa: BLE001 -- a damaged file is reported by its reader; the total is then unknown
            return None
    return n
