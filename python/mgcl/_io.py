"""Atomic file writes, shared by every room: the file is written under a
temporary name next to its destination, flushed to disk, given the mode the
umask asks for (0644 under umask 022, as ``open`` would make it), renamed
over the destination, and the directory is flushed too, so a reader (or a run
resumed after a kill or a power cut) sees the old file or the new one, never
half of one and never none."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Callable


def umask() -> int:
    """The process umask, read without changing it where the OS allows
    (/proc on Linux); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def fsync_dir(path: str) -> None:
    """Flush a directory entry (a rename or a new file in it) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a platform (Windows) or file system that cannot open directories
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename itself stands
    finally:
        os.close(fd)


def publish_dir(tmp: str, final: str) -> None:
    """Rename the folder ``tmp`` (a ``tempfile.mkdtemp``, mode 0700) to ``final``
    with the mode the umask asks for (0755 under 022, as ``os.makedirs`` would
    make it), then flush the parent directory. OSError from the rename is the
    caller's (a racing writer that finished first)."""
    os.chmod(tmp, 0o777 & ~umask())
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))


def is_temp(name: str, of: str | None = None) -> bool:
    """A temporary file left by an ``atomic_write`` killed before its rename
    (of a file called ``of``, when given)."""
    return name.startswith(f".{of}." if of else ".") and name.endswith(".tmp")


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` makes the file; it is fsynced, given the umask's
    mode, renamed to ``path``, and the directory is fsynced."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
        fsync_dir(folder)
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
