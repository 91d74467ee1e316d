"""Backend names, the selection rule and the MGCL_BACKEND override.

Each op keeps its own visible table ``BACKENDS = {name: callable}`` and asks
:func:`select` which entry to use. The rule:

1. an explicit ``backend=`` argument wins (an unavailable one is an error);
2. else ``MGCL_BACKEND``: either one name for every op (``MGCL_BACKEND=torch``)
   or per-op entries (``MGCL_BACKEND=fisher_guard=cpp,similarity_topk=torch``).
   A global name an op does not offer is ignored for that op; a per-op entry
   that is unavailable is an error;
3. else by device: CUDA tensors -> ``cuda`` (compiled) if built, else
   ``triton`` if the op has it and Triton imports, else ``torch``; CPU tensors
   -> the op's CPU fast path (``cpp`` or ``chunked``) if available, else ``torch``.
"""
from __future__ import annotations

import enum
import functools
import importlib.util
import os

import torch

from . import _native


class Backend(str, enum.Enum):
    TORCH = "torch"      # reference.py: the definition and fallback
    CPP = "cpp"          # mgcl._C (C++/OpenMP)
    CUDA = "cuda"        # mgcl._C_cuda
    TRITON = "triton"    # Triton kernels (GPU; CPU under TRITON_INTERPRET=1)
    CHUNKED = "chunked"  # blocked PyTorch (CPU default where no C++ path exists)

    def __str__(self) -> str:
        return self.value


# Preference order by device type; the first available entry an op offers wins.
PREFERENCE = {
    "cuda": (Backend.CUDA, Backend.TRITON, Backend.TORCH),
    "cpu": (Backend.CPP, Backend.CHUNKED, Backend.TORCH),
}


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(name: Backend | str, device_type: str) -> bool:
    """Whether backend ``name`` can run on tensors of ``device_type`` here."""
    b = Backend(name)
    if b is Backend.TORCH:
        return True
    if b is Backend.CHUNKED:
        return device_type == "cpu"
    if b is Backend.CPP:
        return device_type == "cpu" and _native.HAS_C
    if b is Backend.CUDA:
        return device_type == "cuda" and _native.HAS_C_CUDA
    if b is Backend.TRITON:
        if not triton_available():
            return False
        return device_type == "cuda" or (device_type == "cpu" and triton_interpreting())
    return False


def env_override(op: str) -> str | None:
    """The MGCL_BACKEND entry for ``op`` (per-op entries beat a global name)."""
    raw = os.environ.get("MGCL_BACKEND", "").strip()
    if not raw:
        return None
    glob = None
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            key, val = (s.strip() for s in part.split("=", 1))
            if key == op:
                return val
        else:
            glob = part
    return glob


def select(op: str, table: dict, device: torch.device | str, requested: str | None = None) -> str:
    """Pick the backend name for ``op`` on ``device`` from ``table`` (see module doc)."""
    dtype = torch.device(device).type
    offered = [Backend(k) for k in table]
    if requested is not None:
        return _checked(op, table, requested, dtype, "backend=")
    env = env_override(op)
    if env is not None:
        try:
            per_op = f"{op}=" in os.environ.get("MGCL_BACKEND", "")
            if per_op or Backend(env) in offered:
                return _checked(op, table, env, dtype, "MGCL_BACKEND")
        except ValueError:
            raise ValueError(
                f"MGCL_BACKEND={os.environ.get('MGCL_BACKEND')!r}: unknown backend {env!r}; "
                f"known: {[b.value for b in Backend]}"
            ) from None
    for b in PREFERENCE.get(dtype, (Backend.TORCH,)):
        if b in offered and available(b, dtype):
            return b.value
    return Backend.TORCH.value


def _checked(op: str, table: dict, name: str, device_type: str, source: str) -> str:
    try:
        b = Backend(name)
    except ValueError:
        raise ValueError(f"{op}: unknown backend {name!r} (from {source}); this op offers {sorted(table)}") from None
    if b.value not in table:
        raise ValueError(f"{op}: backend {name!r} (from {source}) is not offered; this op offers {sorted(table)}")
    if not available(b, device_type):
        raise RuntimeError(
            f"{op}: backend {name!r} (from {source}) is not available for {device_type} tensors here"
            f" ({describe_unavailable(b)})"
        )
    return b.value


def describe_unavailable(b: Backend) -> str:
    if b is Backend.CPP:
        return "mgcl._C is not importable: " + str(_native.C_ERROR)
    if b is Backend.CUDA:
        return "mgcl._C_cuda was not built (no nvcc at build time) or is not importable, or the tensors are not on a GPU"
    if b is Backend.TRITON:
        return "triton is not installed, or the tensors are on the CPU without TRITON_INTERPRET=1"
    return "wrong device"


def default_for(op: str, table: dict, device_type: str) -> str:
    """The backend ``op`` would use for ``device_type`` tensors (for ``mgcl info``)."""
    try:
        return select(op, table, device_type)
    except (ValueError, RuntimeError) as exc:
        return f"error: {exc}"
