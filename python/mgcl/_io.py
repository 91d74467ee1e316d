"""Atomic file writes, shared by every room: the file is written under a
temporary name next to its destination, flushed to disk, then renamed over
it, so a reader (or a run resumed after a kill) sees the old file or the new
one, never half of one."""
from __future__ import annotations

import json
import os
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` makes the file; it is fsynced and renamed to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, write)


def atomic_write_json(path: str, obj, *, indent: int = 1, sort_keys: bool = False) -> None:
    """JSON (values it cannot encode written with ``str``), newline-terminated."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n").encode())


def atomic_write_tensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """A safetensors file of CPU copies of ``tensors`` (shared storage is fine)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))
