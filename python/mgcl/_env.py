"""Where mgcl runs, in one place every room may import (a leaf, like ``_io``):

- ``cache_dir(*parts)``: mgcl's cache, ``$MGCL_CACHE``, else
  ``$XDG_CACHE_HOME/mgcl``, else ``~/.cache/mgcl`` (the demo's model and bank,
  mgtil-synth, the offline BiomedBERT files);
- ``versions()``: mgcl, python, torch, numpy and the model libraries, as every
  results file records them;
- ``machine(device)``: the machine a run or a bench measured on;
- ``memory_bytes(device)``: the memory of the host (CPU) or of the GPU.

Imports nothing of mgcl at import time; torch and the rest load on call.
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache root (module doc), or ``parts`` under it; absolute, not created."""
    base = os.environ.get("MGCL_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "mgcl")
    return Path(base).expanduser().absolute().joinpath(*parts)


def versions() -> dict:
    """Versions of mgcl and of what it runs on (None: not installed)."""
    from importlib import metadata  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from ._version import __version__  # noqa: PLC0415

    out = {"mgcl": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "numpy": np.__version__}
    for pkg in ("triton", "open_clip_torch", "transformers", "timm", "torchvision"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bytes(device="cpu") -> int | None:
    """Total memory of ``device``: the GPU's for a CUDA device, else the host's (None: unknown)."""
    import torch  # noqa: PLC0415

    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.get_device_properties(dev).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def machine(device="cpu") -> dict:
    """The machine: host, platform, CPU, cores, memory, torch threads, versions,
    mgcl's compiled modules, and the GPU when ``device`` is one."""
    import torch  # noqa: PLC0415

    from . import _native  # noqa: PLC0415
    from ._version import __version__  # noqa: PLC0415

    mem = memory_bytes("cpu")
    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": None if mem is None else round(mem / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": versions()["triton"],
        "mgcl": __version__,
        "mgcl_C": _native.HAS_C,
        "mgcl_C_cuda": _native.HAS_C_CUDA,
        "device": str(device),
        "gpu": None,
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


__all__ = ["cache_dir", "versions", "machine", "memory_bytes", "cpu_model"]
