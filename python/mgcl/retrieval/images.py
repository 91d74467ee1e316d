"""Image references stored in a bank's meta.parquet ``image`` column.

A reference is a filesystem path, ``"<tar path>::<member name>"`` for an
image inside a WebDataset tar shard, or ``"<parquet path>::<column>#<row>"``
for image bytes stored in a parquet cell (raw bytes or the ``{"bytes",
"path"}`` struct of Hugging Face datasets); the builder stores absolute
paths. ``open_image(ref)`` opens any of them as an RGB PIL image, refusing
images of more than ``MAX_PIXELS`` pixels (a decompression bomb) with
``UnreadableImage``; the member index of each tar and the last row groups
read from each parquet are cached. When a tar holds one member name twice,
a reference means the first (the corpus reader skips the later sample).

Any of them may end in ``"#crop=x0,y0,x1,y1"``: the box (pixels, half-open,
in the coordinates of the whole image) of that image, as one panel of a
compound figure (``mgcl db build --split-compound`` stores its panels so;
``crop_ref`` writes one). The pixel limit applies to the whole image; a box
that leaves the image is an ``UnreadableImage``.
"""
from __future__ import annotations

import functools
import io
import os
import re
import tarfile
import threading
import zlib
from typing import Iterator

SEP = "::"
_lock = threading.Lock()

# PIL's own decompression-bomb threshold (about 89.5 Mpixel, 0.25 GiB as RGB).
MAX_PIXELS = 89_478_485
_BLOCK = 512


class UnreadableImage(ValueError):
    """An image reference whose bytes are not a decodable image within the pixel limit."""


_CROP = re.compile(r"#crop=(\d+),(\d+),(\d+),(\d+)$")


def split_crop(ref: str) -> tuple[str, tuple[int, int, int, int] | None]:
    """``(reference of the whole image, crop box or None)``."""
    m = _CROP.search(ref) if isinstance(ref, str) else None
    if m is None:
        return ref, None
    return ref[:m.start()], tuple(int(v) for v in m.groups())


def crop_ref(ref: str, box) -> str:
    """The reference of ``box`` (x0, y0, x1, y1) of the image ``ref`` names; a
    box of a crop reference is relative to that crop."""
    base, outer = split_crop(ref)
    x0, y0, x1, y1 = (int(v) for v in box)
    if outer is not None:
        x0, y0, x1, y1 = x0 + outer[0], y0 + outer[1], x1 + outer[0], y1 + outer[1]
    return f"{base}#crop={x0},{y0},{x1},{y1}"


def tar_ref(tar_path: str, member: str) -> str:
    return f"{os.path.abspath(tar_path)}{SEP}{member}"


def split_ref(ref: str) -> tuple[str, str | None]:
    """``(path, member)``; member is None for a plain file path."""
    if SEP in ref:
        path, member = ref.split(SEP, 1)
        return path, member
    return ref, None


def walk_tar(tf: tarfile.TarFile, damage: list) -> Iterator[tarfile.TarInfo]:
    """The members of ``tf`` (opened with ``ignore_zeros=True``) in archive order,
    reading on past damage; each damage found is appended to ``damage`` as
    ``(byte offset, reason)``.

    A damaged member header makes tarfile skip ahead block by block to the next
    valid header; the skipped span shows as a gap between where one member's
    data ends and the next header starts (a gap of zero blocks is a second
    archive concatenated to the first, which is fine). An archive that ends
    inside a member, inside a header or without its end-of-archive marker
    (two zero blocks) ends early.
    """
    expected = 0
    try:
        for m in tf:
            if m.offset > expected and not _zeros(tf, expected, m.offset - expected):
                damage.append((expected, f"{m.offset - expected} unreadable bytes before member {m.name!r} "
                                         "(a damaged member header)"))
            expected = m.offset_data + -(-m.size // _BLOCK) * _BLOCK if m.isreg() else m.offset_data
            yield m
        tf.fileobj.seek(expected)
        tail, garbage = 0, False
        while chunk := tf.fileobj.read(1 << 20):
            tail += len(chunk)
            garbage |= bool(chunk.strip(b"\0"))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        damage.append((expected, f"ends early ({exc})"))
        return
    if garbage:
        damage.append((expected, f"{tail} unreadable bytes at the end (a damaged member header)"))
    elif tail < 2 * _BLOCK:
        damage.append((expected, "ends early (no end-of-archive marker)"))


def _zeros(tf: tarfile.TarFile, offset: int, n: int) -> bool:
    pos = tf.fileobj.tell()
    try:
        tf.fileobj.seek(offset)
        return not tf.fileobj.read(n).strip(b"\0")
    finally:
        tf.fileobj.seek(pos)


@functools.lru_cache(maxsize=64)
def _tar_index(path: str) -> tuple[tarfile.TarFile, dict]:
    tf = tarfile.open(path, "r:*", ignore_zeros=True)
    index: dict = {}
    for m in walk_tar(tf, []):
        if m.isfile():
            index.setdefault(m.name, m)
    return tf, index


def parquet_ref(parquet_path: str, column: str, row: int) -> str:
    return f"{os.path.abspath(parquet_path)}{SEP}{column}#{int(row)}"


@functools.lru_cache(maxsize=16)
def _parquet_file(path: str):
    import numpy as np  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    pf = pq.ParquetFile(path)
    starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
    return pf, starts


@functools.lru_cache(maxsize=2)
def _parquet_group(path: str, group: int, column: str):
    return _parquet_file(path)[0].read_row_group(group, columns=[column]).column(0)


def _parquet_cell(path: str, member: str) -> bytes:
    import numpy as np  # noqa: PLC0415
    import pyarrow as pa  # noqa: PLC0415

    column, _, row = member.rpartition("#")
    try:
        pf, starts = _parquet_file(path)
        if not row.isdigit() or int(row) >= starts[-1] or column not in pf.schema_arrow.names:
            raise FileNotFoundError(f"open_image: no cell {member!r} in {path!r}")
        g = int(np.searchsorted(starts, int(row), side="right") - 1)
        v = _parquet_group(path, g, column)[int(row) - int(starts[g])].as_py()
    except (pa.ArrowException, OSError) as exc:
        raise UnreadableImage(f"open_image: cannot read cell {member!r} of {path!r} ({exc})") from None
    if isinstance(v, dict):
        v = v.get("bytes")
    if not isinstance(v, (bytes, bytearray)) or not v:
        raise UnreadableImage(f"open_image: cell {member!r} of {path!r} holds no image bytes")
    return bytes(v)


def read_bytes(ref: str) -> bytes:
    """The encoded bytes of the image ``ref`` names (of the whole image, for a crop reference)."""
    if not isinstance(ref, str) or not ref:
        raise UnreadableImage(f"open_image: empty or non-string image reference {ref!r}")
    path, member = split_ref(split_crop(ref)[0])
    if member is None:
        with open(path, "rb") as fh:
            return fh.read()
    if not os.path.exists(path):
        raise FileNotFoundError(f"open_image: shard {path!r} does not exist (reference {ref!r})")
    with _lock:
        if path.endswith(".parquet"):
            return _parquet_cell(path, member)
        try:
            tf, index = _tar_index(path)
            info = index.get(member)
            if info is None:
                raise FileNotFoundError(f"open_image: no member {member!r} in {path!r}")
            return tf.extractfile(info).read()
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise UnreadableImage(f"open_image: cannot read member {member!r} of {path!r} ({exc})") from None


def decode(data: bytes, max_pixels: int = MAX_PIXELS, *, what: str = "image", draft: bool = False):
    """``data`` decoded as a PIL image (not yet converted), refusing more than
    ``max_pixels`` pixels before decoding. Any failure of the decoder on these
    bytes (they are the user's) is an ``UnreadableImage``. ``draft``: decode a
    JPEG at 1/8 scale (every block is still decoded, so damage still shows;
    for checking, not for use)."""
    import warnings  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise UnreadableImage(f"{what}: too large: {w}x{h} pixels, more than the limit of {max_pixels:,}")
            if draft:
                img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))
            img.load()
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own hard limit, checked before ours can be
        size = re.search(r"\d+", str(exc))
        raise UnreadableImage(f"{what}: too large: {int(size.group()):,} pixels, more than the limit of "
                              f"{max_pixels:,}" if size else f"{what}: too large ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on malformed bytes
        raise UnreadableImage(f"{what}: not a readable image ({type(exc).__name__}: {exc})") from None
    return img


_last_whole: tuple = ()  # (key, image): a figure's panels are read one after another; decode it once


def open_image(ref: str, max_pixels: int = MAX_PIXELS):
    """The image at ``ref`` (a path, ``tar::member`` or ``parquet::column#row``,
    optionally ``#crop=x0,y0,x1,y1``) as an RGB ``PIL.Image.Image``. Raises
    ``OSError`` for a missing file and ``UnreadableImage`` (a ValueError) for
    bytes that are no image, exceed ``max_pixels`` or a crop box outside the image."""
    global _last_whole
    base, box = split_crop(ref)
    if box is None:
        return decode(read_bytes(ref), max_pixels, what=f"image {ref!r}").convert("RGB")
    st = os.stat(split_ref(base)[0])
    key = (base, max_pixels, st.st_size, st.st_mtime_ns)  # a file changed or removed since is read again
    last = _last_whole
    if last and last[0] == key:
        img = last[1]
    else:
        img = decode(read_bytes(base), max_pixels, what=f"image {ref!r}").convert("RGB")
        _last_whole = (key, img)
    x0, y0, x1, y1 = box
    if not (x0 < x1 <= img.width and y0 < y1 <= img.height):
        raise UnreadableImage(f"image {ref!r}: crop box {box} is empty or outside the {img.width}x{img.height} image")
    return img.crop(box)


def problem(ref: str, exc: Exception) -> str:
    """Why ``ref`` cannot be used, from what opening it raised (OSError or UnreadableImage)."""
    return str(exc) if isinstance(exc, UnreadableImage) else f"image {ref!r}: {exc.strerror or exc}"


def check_image(ref: str, max_pixels: int = MAX_PIXELS) -> str | None:
    """None when ``ref`` opens as an image within ``max_pixels``, else the reason."""
    try:
        if split_crop(ref)[1] is None:
            decode(read_bytes(ref), max_pixels, what=f"image {ref!r}", draft=True)
        else:  # the box is checked against the full-size image
            open_image(ref, max_pixels)
    except (UnreadableImage, OSError) as exc:
        return problem(ref, exc)
    return None


__all__ = ["open_image", "check_image", "problem", "decode", "tar_ref", "parquet_ref", "crop_ref", "split_ref",
           "split_crop", "read_bytes", "walk_tar", "UnreadableImage", "MAX_PIXELS", "SEP"]
