"""On-disk primitives of a bank: atomic writes, sha256, safetensors shards
read through a memory map (the file is never loaded whole)."""
from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
import torch

from .. import _io
from .._io import atomic_write_bytes, atomic_write_tensors  # noqa: F401 - the bank's writers, re-exported


class BankError(ValueError):
    """A bank directory that is missing, incomplete, corrupt or changed since its build."""


class BankFileMissing(BankError, FileNotFoundError):
    """A bank directory or one of its files does not exist (also a FileNotFoundError)."""


_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "BF16": None, "I8": np.int8, "I32": np.int32, "I64": np.int64}


def atomic_write_json(path: str, obj) -> None:
    """A bank's JSON files: sorted keys, so equal content gives equal bytes."""
    _io.atomic_write_json(path, obj, indent=2, sort_keys=True)


def atomic_write_table(path: str, table) -> None:
    import pyarrow.parquet as pq  # noqa: PLC0415

    _io.atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file plus ``__data_start__`` (byte offset)."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: truncated safetensors file (no header length)")
        (n,) = struct.unpack("<Q", raw)
        size = os.fstat(fh.fileno()).st_size
        if n > size - 8:
            raise ValueError(f"{path}: corrupt safetensors header (length {n} past end of file)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: corrupt safetensors header (not JSON)") from None
    header["__data_start__"] = 8 + n
    header["__file_size__"] = size
    return header


def mmap_tensor(path: str, name: str) -> torch.Tensor:
    """Tensor ``name`` of a safetensors file as a copy-on-write memory map."""
    h = safetensors_header(path)
    if name not in h:
        raise ValueError(f"{path}: no tensor {name!r} (has {sorted(k for k in h if not k.startswith('__'))})")
    info = h[name]
    dt = _ST_DTYPES.get(info["dtype"])
    if dt is None:
        raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
    if end - begin != nbytes or h["__data_start__"] + end > h["__file_size__"]:
        raise ValueError(f"{path}: tensor {name!r} data does not match its header (truncated file?)")
    if nbytes == 0:
        return torch.from_numpy(np.zeros(shape, dtype=dt))
    arr = np.memmap(path, dtype=dt, mode="c", offset=h["__data_start__"] + begin, shape=shape)
    return torch.from_numpy(arr)
