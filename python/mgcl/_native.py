"""Loads the compiled modules. A missing module is a flag, never an import error.

- ``_C`` (CPU, C++/OpenMP) is always built; if it cannot be imported every op
  falls back to its PyTorch reference and one warning says so.
- ``_C_cuda`` exists only when the build found nvcc; its absence is silent
  (CUDA ops then use Triton or the reference).

Importing this module never initialises CUDA.
"""
from __future__ import annotations

import importlib
import warnings

import torch

# Mirrors mgcl::DType in csrc/include/mgcl/common.h.
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _load(name: str):
    try:
        return importlib.import_module(f"mgcl.{name}"), None
    except ImportError as exc:  # not built, or built for another Python/ABI
        return None, exc


_C, C_ERROR = _load("_C")
_C_cuda, C_CUDA_ERROR = _load("_C_cuda")

HAS_C = _C is not None
HAS_C_CUDA = _C_cuda is not None

if not HAS_C:
    warnings.warn(
        f"mgcl: the compiled CPU module mgcl._C could not be imported ({C_ERROR}); "
        "every op falls back to its PyTorch reference. Reinstall mgcl to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


def cuda_problem() -> str | None:
    """Why the ``cuda`` backends cannot run here, or None."""
    if _C_cuda is None:
        return f"it needs mgcl._C_cuda, which was not built (no nvcc at build time) or not importable ({C_CUDA_ERROR})"
    return None


def cuda_archs() -> str | None:
    """The CUDA architectures _C_cuda was compiled for, or None when it is absent."""
    return None if _C_cuda is None else str(_C_cuda.archs)


def cuda_version() -> str | None:
    """The CUDA runtime version _C_cuda was built against ("13.0"), or None."""
    if _C_cuda is None:
        return None
    v = int(_C_cuda.cuda_version)
    return f"{v // 1000}.{(v % 1000) // 10}"


def stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of the current torch stream on ``device``."""
    return int(torch.cuda.current_stream(device).cuda_stream)


def ptr(t: torch.Tensor) -> int:
    return int(t.data_ptr())
