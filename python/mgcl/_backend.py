"""Backend selection: each op's table of declared capabilities, one rule, one override.

Each op keeps a flat table ``BACKENDS = {name: Entry(...)}`` in its
``__init__.py``, in order of preference. An entry declares what it can run:
the device types, the dtypes, and, as a small predicate on the call, its
limits (``limit``: why it cannot run this call, e.g. k above a cap) and where
another entry is faster (``prefer``: consulted by the default choice only,
e.g. a measured size crossover). What a backend needs on the machine follows
from its name (``KNOWN``): ``cpp`` needs mgcl._C, ``cuda`` mgcl._C_cuda (and a
GPU it was compiled for), ``triton`` the triton package.

:func:`select` picks the entry for one call, described by its device, the
dtypes of its tensors and op-specific properties (``k=``, ``B=``, ...):

1. an explicit ``backend=`` argument: that entry if it can run the call, else a
   ValueError saying exactly why;
2. else ``MGCL_BACKEND``: one name for every op (``MGCL_BACKEND=torch``) or
   per-op entries (``MGCL_BACKEND=fisher_guard=cpp,similarity_topk=torch``).
   A global name an op does not offer is ignored for that op; otherwise the
   name is treated as in (1);
3. else the first entry, in table order, that can run the call and does not
   defer (``prefer``). Triton on CPU tensors (the interpreter, for tests) runs
   only when asked for by name.

Nothing else dispatches: an op calls ``BACKENDS[select(...)]`` and nothing more.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from . import _native

# Every backend name and what it is; what it needs on the machine is checked
# in machine_problem().
KNOWN = {
    "torch": "reference.py: the definition and the fallback",
    "cpp": "mgcl._C (C++/OpenMP)",
    "cuda": "mgcl._C_cuda (CUDA kernels)",
    "triton": "Triton kernels (GPU; CPU only under TRITON_INTERPRET=1)",
    "chunked": "blocked PyTorch",
}


@dataclass(frozen=True)
class Entry:
    """One row of an op's dispatch table.

    fn: the implementation (the entry is callable: ``BACKENDS[name](...)``).
    devices: device types it runs on ("cpu", "cuda").
    dtypes: tensor dtypes it takes; every dtype of the call must be among them.
    limit: ``limit(call) -> reason or None``: why it cannot run this call
        (the reason is what an explicit choice is told). ``call`` is a dict with
        "device" (a torch.device), "dtypes" and the op's properties; a property
        may be absent (``mgcl info`` asks about a device only).
    prefer: ``prefer(call) -> bool``: False where another entry is faster (a
        measured crossover); the default choice skips it, an explicit one runs it.
    """

    fn: Callable
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    limit: Optional[Callable[[dict], Optional[str]]] = None
    prefer: Optional[Callable[[dict], bool]] = None

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_one_config() -> bool:
    """``MGCL_TRITON_ONE_CONFIG=1``: Triton kernels autotune over one config only
    (benches/gpu_check.sh sets it for the GPU tests: ~100 autotune compiles
    would not fit the run); the interpreter always uses one."""
    return triton_interpreting() or os.environ.get("MGCL_TRITON_ONE_CONFIG", "0") not in ("", "0")


def machine_problem(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run on tensors on ``device`` on this machine, or None."""
    if name == "cpp" and not _native.HAS_C:
        return f"it needs mgcl._C, which could not be imported ({_native.C_ERROR})"
    if name == "cuda" and device.type == "cuda":
        return _native.cuda_problem(device.index)
    if name == "triton":
        if not triton_available():
            return "it needs the triton package, which is not installed"
        if device.type == "cpu" and not triton_interpreting():
            return "it runs on CPU tensors only under TRITON_INTERPRET=1"
    return None


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def problem(entry: Entry, name: str, call: dict) -> Optional[str]:
    """Why ``entry`` (named ``name``) cannot run ``call``, or None when it can."""
    dev = call["device"].type
    if dev not in entry.devices:
        return f"it runs on {' and '.join(entry.devices)} tensors, not {dev}"
    bad = [dt for dt in call.get("dtypes", ()) if dt not in entry.dtypes]
    if bad:
        return (f"it takes {', '.join(map(_dtype_name, entry.dtypes))} tensors, not "
                f"{', '.join(sorted(set(map(_dtype_name, bad))))}")
    why = machine_problem(name, call["device"])
    if why is None and entry.limit is not None:
        why = entry.limit(call)
    return why


def runs(table: dict, name: str, device_type: str) -> bool:
    """Whether ``table`` offers ``name`` and it runs on ``device_type`` tensors here."""
    return name in table and problem(table[name], name, {"device": torch.device(device_type)}) is None


def env_override(op: str) -> tuple[Optional[str], bool]:
    """(name, per_op) from MGCL_BACKEND for ``op``: a per-op entry beats a global name."""
    from .ops import OPS  # noqa: PLC0415  (a tuple of names; ops is the same layer)

    raw = os.environ.get("MGCL_BACKEND", "").strip()
    glob = None
    for part in filter(None, (p.strip() for p in raw.split(","))):
        if "=" not in part:
            glob = part
            continue
        key, val = (s.strip() for s in part.split("=", 1))
        if key not in OPS:
            raise ValueError(f"MGCL_BACKEND={raw!r}: unknown op {key!r}; ops: {', '.join(OPS)}")
        if key == op:
            return val, True
    return glob, False


def select(op: str, table: dict, device, requested: Optional[str] = None, *,
           dtypes: Iterable[torch.dtype] = (), **props) -> str:
    """The backend name ``op`` uses for a call on ``device`` (see the module doc).

    ``dtypes``: the dtypes of the call's tensors; ``props``: the op's call
    properties that its entries' ``limit``/``prefer`` read (``k=``, ``B=``...).
    """
    call = {"device": torch.device(device), "dtypes": tuple(dtypes), **props}
    if requested is not None:
        return _explicit(op, table, requested, call, "backend=")
    env, per_op = env_override(op)
    if env is not None and (per_op or env in table or env not in KNOWN):
        return _explicit(op, table, env, call, f"MGCL_BACKEND={os.environ['MGCL_BACKEND']!r}")
    reasons = []
    for name, entry in table.items():
        why = problem(entry, name, call)
        if why is None and name == "triton" and call["device"].type == "cpu":
            why = "the Triton interpreter is used only when asked for by name"
        if why is None and entry.prefer is not None and not entry.prefer(call):
            why = "another entry is faster for this call"
        if why is None:
            return name
        reasons.append(f"{name}: {why}")
    raise ValueError(f"{op}: no backend can run this call ({'; '.join(reasons)})")


def offered(op: str, table: dict, name: str, source: str = "backend=") -> str:
    """``name`` if ``table`` offers it, else a ValueError saying whether it is unknown or just not offered."""
    if name not in KNOWN:
        raise ValueError(f"{op}: unknown backend {name!r} (from {source}); known backends: {', '.join(KNOWN)}")
    if name not in table:
        raise ValueError(f"{op}: backend {name!r} (from {source}) is known but not offered by this op; "
                         f"it offers {', '.join(table)}")
    return name


def _explicit(op: str, table: dict, name: str, call: dict, source: str) -> str:
    offered(op, table, name, source)
    why = problem(table[name], name, call)
    if why is not None:
        raise ValueError(f"{op}: backend {name!r} (from {source}) cannot run this call: {why}")
    return name


def default_for(op: str, table: dict, device_type: str) -> str:
    """The backend ``op`` would use for ``device_type`` tensors (for ``mgcl info``)."""
    try:
        return select(op, table, device_type)
    except ValueError as exc:
        return f"error: {exc}"


def describe(table: dict) -> list[dict]:
    """The table as rows for ``mgcl info``: what each entry declares and whether it runs here."""
    rows = []
    for name, e in table.items():
        here = {d: problem(e, name, {"device": torch.device(d)}) for d in e.devices}
        rows.append({
            "backend": name,
            "devices": list(e.devices),
            "dtypes": [_dtype_name(dt) for dt in e.dtypes],
            "limit": (e.limit.__doc__ or e.limit.__name__).strip() if e.limit else None,
            "prefer": (e.prefer.__doc__ or e.prefer.__name__).strip() if e.prefer else None,
            "runs_here": {d: why is None for d, why in here.items()},
            "why_not": {d: why for d, why in here.items() if why is not None},
        })
    return rows
