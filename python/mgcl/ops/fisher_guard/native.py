"""fisher_guard through the compiled modules.

Inputs arrive validated (``__init__._check``). Python packs the metadata (the
pointer arrays and the chunk map, one int64 array; its layout is documented
once, in csrc/include/mgcl/fisher_guard.h) and allocates the penalty and, on
CUDA, the workspace. A :class:`Meta` is built once per list of tensor sizes;
``FisherGuard``'s prepared path keeps one and only re-points it when an
address changes, so a step costs no repacking.
"""
from __future__ import annotations

import numpy as np
import torch

from ... import _native

MODE_CODE = {"dfg": 0, "ewc": 1, "l2": 2}

# Elements per chunk (one CUDA block, one OpenMP task each): 64K elements keep
# ~2,300 chunks in flight for a 150M-parameter model while 300 small tensors
# cost one each.
CHUNK = 1 << 16

_ptr = torch.Tensor.data_ptr

# the C++ overlap re-check of new grads where mgcl._C is built (else Spans uses first_overlap, below)
_first_overlap_c = getattr(_native._C, "fisher_guard_first_overlap", None)


def pointers(params, anchors, fisher) -> list[int]:
    """The param, anchor and fisher address sections (fisher addresses 0 when absent)."""
    fis = map(_ptr, fisher) if fisher is not None else [0] * len(anchors)
    return [*map(_ptr, params), *map(_ptr, anchors), *fis]


def addresses(tensors) -> np.ndarray:
    """The tensors' data addresses as an int64 array, in one C-level pass
    (TypeError where an entry is not a tensor, e.g. a grad that is None)."""
    return np.fromiter(map(_ptr, tensors), dtype=np.int64, count=len(tensors))


class Spans:
    """The fixed tensors' memory (params, anchors, fisher: disjoint, checked once)
    as sorted spans, and the byte sizes of the grads, for :meth:`first_overlap`."""

    def __init__(self, fixed, grad_nbytes: list[int]):
        spans = sorted((_ptr(t), _ptr(t) + t.numel() * t.element_size()) for t in fixed if t.numel())
        spans = np.array(spans, dtype=np.int64).reshape(-1, 2)
        self.start, self.end = spans[:, 0].copy(), spans[:, 1].copy()
        self.nbytes = np.array(grad_nbytes, dtype=np.int64)
        self._native = _first_overlap_c
        # the arrays' addresses for the native check, taken once (the arrays live as long as this object)
        self._args = (self.nbytes.ctypes.data, len(grad_nbytes), self.start.ctypes.data, self.end.ctypes.data,
                      len(self.start))

    def first_overlap(self, start: np.ndarray) -> int:
        """-1 when the grads at ``start`` (int64, one per grad, sized as given)
        overlap neither each other nor a fixed span; else the index of one that
        does (csrc/include/mgcl/fisher_guard.h: the C++ loop where mgcl._C has it,
        else :func:`first_overlap`, the same rule in numpy)."""
        if self._native is not None:
            b, n, fs, fe, m = self._args
            return self._native(start.ctypes.data, b, n, fs, fe, m)
        return first_overlap(start, self.nbytes, self.start, self.end)


def first_overlap(start: np.ndarray, nbytes: np.ndarray, fixed_start: np.ndarray, fixed_end: np.ndarray) -> int:
    """The rule of the native ``fisher_guard_first_overlap`` (fisher_guard.h) in
    numpy: span i is bytes [start[i], start[i] + nbytes[i]) (none when nbytes[i]
    is 0); -1 when all are disjoint from each other and from the sorted, disjoint
    fixed spans, else the first index, in (start, index) order, that overlaps."""
    sized = np.flatnonzero(nbytes > 0)
    order = sized[np.argsort(start[sized], kind="stable")]
    s, e = start[order], start[order] + nbytes[order]
    bad = np.zeros(len(order), dtype=bool)
    bad[:-1] = e[:-1] > s[1:]
    # k: the first fixed span starting after s; the one before must end by s, it must start at or after e
    # (the ends padded with -inf / +inf sentinels: no branches)
    k = np.searchsorted(fixed_start, s, side="right")
    lo, hi = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    bad |= (np.concatenate([[lo], fixed_end])[k] > s) | (np.concatenate([fixed_start, [hi]])[k] < e)
    hit = np.flatnonzero(bad)
    return int(order[hit[0]]) if len(hit) else -1


class Meta:
    """The packed metadata for one list of tensor sizes on one device.

    The sizes and the chunk map are written once; :meth:`point` writes the
    address sections and, on CUDA, uploads the array, only when an address
    changed since the last call.
    """

    def __init__(self, numels: list[int], device: torch.device):
        n = len(numels)
        first, chunk_tensor, chunk_start = [0], [], []
        for t, m in enumerate(numels):
            starts = range(0, m, CHUNK)
            chunk_tensor.extend([t] * len(starts))
            chunk_start.extend(starts)
            first.append(len(chunk_tensor))
        self.n, self.n_chunks, self.device = n, len(chunk_tensor), device
        self.host = torch.zeros(6 * n + 1 + 2 * self.n_chunks, dtype=torch.int64)
        self.host[4 * n:] = torch.tensor(numels + first + chunk_tensor + chunk_start, dtype=torch.int64)
        self._addresses = self.host.numpy()
        self._grads: list[int] | None = None
        self._rest: list[int] | None = None
        self.buf = self.host  # the array the kernel reads (a device copy on CUDA)
        self.address = self.buf.data_ptr()
        self.workspace = None
        if device.type == "cuda":
            self.workspace = torch.empty(2 * self.n_chunks + n, dtype=torch.float32, device=device)

    def point(self, grads, rest: list[int]) -> int:
        """Set the grad addresses (a list or an int64 array) and the rest
        (``pointers()``); the address of the array to pass. An address section
        is rewritten when a new object arrives (the caller's objects are not
        changed in place)."""
        changed = False
        if rest is not self._rest:
            self._addresses[self.n:4 * self.n] = rest
            self._rest, changed = rest, True
        if grads is not self._grads:
            self._addresses[:self.n] = grads
            self._grads, changed = grads, True
        if changed and self.device.type == "cuda":
            # A fresh pinned copy and a fresh device array each time: torch's
            # allocators keep both alive until the stream has used them, so an
            # earlier launch still reading the old array is never raced.
            self.buf = self.host.pin_memory().to(self.device, non_blocking=True)
            self.address = self.buf.data_ptr()
        return self.address


def launch(meta: Meta, grads: list[int], rest: list[int], dtype, fisher_dtype, lam, mode, ema,
           normalize) -> torch.Tensor:
    """Run the native kernel over the tensors at the given addresses; the penalty (0-d float32)."""
    address = meta.point(grads, rest)
    args = (meta.n, meta.n_chunks, CHUNK, fisher_dtype is not None, _native.DTYPE_CODE[dtype],
            _native.DTYPE_CODE[fisher_dtype or dtype], MODE_CODE[mode], float(lam), float(ema), normalize == "mean")
    if meta.device.type == "cpu":
        penalty = torch.empty((), dtype=torch.float32)
        _native._C.fisher_guard(address, *args, penalty.data_ptr())
        return penalty
    with torch.cuda.device(meta.device):  # the launch goes to the tensors' GPU, whichever is current
        penalty = torch.empty((), dtype=torch.float32, device=meta.device)
        stream = torch.cuda.current_stream(meta.device)
        meta.buf.record_stream(stream)
        _native._C_cuda.fisher_guard(address, *args, meta.workspace.data_ptr(), penalty.data_ptr(),
                                     stream.cuda_stream)
    return penalty


def fisher_guard(grads, params, anchors, fisher, lam, mode, ema, normalize, *, prepared=None):
    """The dispatch table's cpp and cuda entry (the signature of reference.fisher_guard).

    ``prepared``: ``(meta, grad addresses, the other addresses)`` from the caller
    (``Prepared``, which validated them) instead of packing them here."""
    meta, gp, rest = prepared or (Meta([g.numel() for g in grads], grads[0].device), list(map(_ptr, grads)),
                                  pointers(params, anchors, fisher))
    fisher_dtype = fisher[0].dtype if fisher is not None else None
    return launch(meta, gp, rest, grads[0].dtype, fisher_dtype, lam, mode, ema, normalize)
