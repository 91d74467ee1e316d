"""Image references stored in a bank's meta.parquet ``image`` column.

A reference is a filesystem path, ``"<tar path>::<member name>"`` for an
image inside a WebDataset tar shard, or ``"<parquet path>::<column>#<row>"``
for image bytes stored in a parquet cell (raw bytes or the ``{"bytes",
"path"}`` struct of Hugging Face datasets); the builder stores absolute
paths. ``open_image(ref)`` opens any of them as an RGB PIL image; the member
index of each tar and the last row groups read from each parquet are cached.
"""
from __future__ import annotations

import functools
import io
import os
import tarfile
import threading

SEP = "::"
_lock = threading.Lock()


def tar_ref(tar_path: str, member: str) -> str:
    return f"{os.path.abspath(tar_path)}{SEP}{member}"


def split_ref(ref: str) -> tuple[str, str | None]:
    """``(path, member)``; member is None for a plain file path."""
    if SEP in ref:
        path, member = ref.split(SEP, 1)
        return path, member
    return ref, None


@functools.lru_cache(maxsize=64)
def _tar_index(path: str) -> tuple[tarfile.TarFile, dict]:
    tf = tarfile.open(path, "r:*")
    return tf, {m.name: m for m in tf.getmembers() if m.isfile()}


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

    column, _, row = member.rpartition("#")
    pf, starts = _parquet_file(path)
    if not row.isdigit() or int(row) >= starts[-1] or column not in pf.schema_arrow.names:
        raise FileNotFoundError(f"open_image: no cell {member!r} in {path!r}")
    g = int(np.searchsorted(starts, int(row), side="right") - 1)
    v = _parquet_group(path, g, column)[int(row) - int(starts[g])].as_py()
    if isinstance(v, dict):
        v = v.get("bytes")
    if not isinstance(v, (bytes, bytearray)) or not v:
        raise ValueError(f"open_image: cell {member!r} of {path!r} holds no image bytes")
    return bytes(v)


def read_bytes(ref: str) -> bytes:
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"open_image: empty or non-string image reference {ref!r}")
    path, member = split_ref(ref)
    if member is None:
        with open(path, "rb") as fh:
            return fh.read()
    if not os.path.exists(path):
        raise FileNotFoundError(f"open_image: shard {path!r} does not exist (reference {ref!r})")
    with _lock:
        if path.endswith(".parquet"):
            return _parquet_cell(path, member)
        tf, index = _tar_index(path)
        info = index.get(member)
        if info is None:
            raise FileNotFoundError(f"open_image: no member {member!r} in {path!r}")
        fh = tf.extractfile(info)
        return fh.read()


def open_image(ref: str):
    """The image at ``ref`` (a path, ``tar::member`` or ``parquet::column#row``) as an RGB ``PIL.Image.Image``."""
    from PIL import Image  # noqa: PLC0415

    img = Image.open(io.BytesIO(read_bytes(ref)))
    img.load()
    return img.convert("RGB")


__all__ = ["open_image", "tar_ref", "parquet_ref", "split_ref", "read_bytes", "SEP"]
