"""Image references stored in a bank's meta.parquet ``image`` column.

A reference is a filesystem path, or ``"<tar path>::<member name>"`` for an
image inside a WebDataset tar shard (the builder stores absolute paths).
``open_image(ref)`` opens either as an RGB PIL image; the member index of each
tar is read once and cached.
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


def read_bytes(ref: str) -> bytes:
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"open_image: empty or non-string image reference {ref!r}")
    path, member = split_ref(ref)
    if member is None:
        with open(path, "rb") as fh:
            return fh.read()
    if not os.path.exists(path):
        raise FileNotFoundError(f"open_image: tar shard {path!r} does not exist (reference {ref!r})")
    with _lock:
        tf, index = _tar_index(path)
        info = index.get(member)
        if info is None:
            raise FileNotFoundError(f"open_image: no member {member!r} in {path!r}")
        fh = tf.extractfile(info)
        return fh.read()


def open_image(ref: str):
    """The image at ``ref`` (a path or ``tar::member``) as an RGB ``PIL.Image.Image``."""
    from PIL import Image  # noqa: PLC0415

    img = Image.open(io.BytesIO(read_bytes(ref)))
    img.load()
    return img.convert("RGB")


__all__ = ["open_image", "tar_ref", "split_ref", "read_bytes", "SEP"]
