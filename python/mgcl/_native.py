"""Loads the compiled modules. A missing module is a flag, never an import error.

- ``_C`` (CPU, C++/OpenMP) is always built; if it cannot be imported every op
  falls back to its PyTorch reference and one warning says so.
- ``_C_cuda`` exists only when the build found nvcc; its absence is silent
  (CUDA ops then use Triton or the reference).

Importing this module never initialises CUDA. Whether ``_C_cuda`` can run on
a GPU is decided lazily, on the first call that asks about a CUDA device
once torch has initialised CUDA itself (:func:`cuda_problem`; nothing here
creates a context): the GPU's compute capability against the architectures
compiled in, and the driver against the CUDA runtime linked in. The wheel's
default build (cmake/cuda.cmake) holds sm_80 and sm_90 SASS plus compute_90
PTX, so: sm_80, sm_86, sm_87, sm_89 run the sm_80 code; sm_90 its own; sm_100,
sm_120 and later JIT-compile the PTX (a driver of the runtime's major version
or newer does that); below sm_80 (V100, T4) the ``cuda`` backends are off.
The runtime is static, CUDA 13.x in the released build, and needs a driver
that supports CUDA 13.0 (Linux r580 or newer). A GPU that fails the check
turns the ``cuda`` backends off with one warning; Triton or torch then serve.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional

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


def parse_archs(archs: str) -> tuple[set[int], set[int]]:
    """(SASS, PTX) compute capabilities from a CMake list ("80-real,90-real,90-virtual";
    a bare "90" is both)."""
    sass, ptx = set(), set()
    for item in archs.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        num, _, kind = item.partition("-")
        cc = int("".join(ch for ch in num if ch.isdigit()))
        if kind in ("", "real"):
            sass.add(cc)
        if kind in ("", "virtual"):
            ptx.add(cc)
    return sass, ptx


def compatibility(capability: tuple[int, int], archs: str, driver: int, runtime: int) -> Optional[str]:
    """Why code built for ``archs`` with CUDA ``runtime`` (e.g. 13000) cannot run on
    a GPU of ``capability`` with a driver supporting CUDA ``driver``; None when it can.

    SASS runs on GPUs of its major version and a minor one at least as high;
    PTX is JIT-compiled for any GPU at least its version; the static runtime
    runs on a driver of its major version or newer (minor version compatibility)."""
    major, minor = capability
    cc = 10 * major + minor
    sass, ptx = parse_archs(archs)
    built = ", ".join([f"sm_{a} SASS" for a in sorted(sass)] + [f"compute_{a} PTX" for a in sorted(ptx)])
    if cc < 80:
        return f"the GPU is sm_{cc}, below sm_80 (mgcl._C_cuda is built for {built})"
    if not any(s // 10 == major and s <= cc for s in sass) and not any(p <= cc for p in ptx):
        return f"no code for sm_{cc} in mgcl._C_cuda (built for {built})"
    need = (runtime // 1000) * 1000
    if driver < need:
        have = f"CUDA {driver // 1000}.{driver % 1000 // 10}" if driver else "no CUDA driver"
        return (f"the driver supports {have}; mgcl._C_cuda's CUDA {runtime // 1000}.{runtime % 1000 // 10} "
                f"runtime needs CUDA {need // 1000}.0 or newer")
    return None


def _gpu(index: int) -> tuple[str, tuple[int, int]]:
    """(name, compute capability) of GPU ``index`` (CUDA is initialised by then)."""
    return torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)


_checked: dict = {}  # GPU index -> reason or None


def cuda_problem(index: Optional[int] = None) -> Optional[str]:
    """Why the ``cuda`` backends cannot run on GPU ``index`` (None: the current
    one), or None. The first answer for a GPU that fails warns once."""
    if _C_cuda is None:
        return f"it needs mgcl._C_cuda, which was not built (no nvcc at build time) or not importable ({C_CUDA_ERROR})"
    if not torch.cuda.is_initialized():  # nothing on a GPU yet (mgcl info, a CPU run): never initialise CUDA here
        return None
    if index is None:
        index = torch.cuda.current_device()
    if index not in _checked:
        name, capability = _gpu(index)
        why = compatibility(capability, str(_C_cuda.archs), _driver(), int(_C_cuda.cuda_version))
        if why is not None:
            why = f"GPU {index} ({name}): {why}"
            warnings.warn(f"mgcl: the CUDA kernels are off: {why}; Triton or the PyTorch reference run instead",
                          RuntimeWarning, stacklevel=3)
        _checked[index] = why
    return _checked[index]


def cuda_archs() -> str | None:
    """The CUDA architectures _C_cuda was compiled for, or None when it is absent."""
    return None if _C_cuda is None else str(_C_cuda.archs)


def cuda_version() -> str | None:
    """The CUDA runtime version _C_cuda was built against ("13.0"), or None."""
    if _C_cuda is None:
        return None
    v = int(_C_cuda.cuda_version)
    return f"{v // 1000}.{(v % 1000) // 10}"


def _driver() -> int:
    """The CUDA version the driver supports (13000 for 13.0), 0 without one (cudaDriverGetVersion: no context)."""
    return int(_C_cuda.driver_version()) if hasattr(_C_cuda, "driver_version") else 0


def driver_version() -> str | None:
    """The CUDA version the installed driver supports ("13.0"), or None (no driver, or no _C_cuda)."""
    v = _driver()
    return f"{v // 1000}.{(v % 1000) // 10}" if v else None


def stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of the current torch stream on ``device``."""
    return int(torch.cuda.current_stream(device).cuda_stream)


def ptr(t: torch.Tensor) -> int:
    return int(t.data_ptr())
