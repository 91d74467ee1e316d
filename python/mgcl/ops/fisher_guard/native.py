"""fisher_guard through the compiled modules: validated inputs in, Python
allocates the penalty (and, on CUDA, the chunk map and workspaces)."""
from __future__ import annotations

import torch

from ... import _native

MODE_CODE = {"dfg": 0, "ewc": 1, "l2": 2}

# Elements per CUDA chunk (one block each): 64K elements keeps ~2,300 blocks
# in flight for a 150M-parameter model while 300 small tensors cost one each.
CUDA_CHUNK = 1 << 16

# Device copies of the pointer arrays + chunk map, keyed by the tensors'
# addresses: a training loop guards the same tensors every step, so the map is
# uploaded once. Small and bounded.
_META_CACHE: dict = {}
_META_CACHE_MAX = 8


def _fisher_dtype(fisher, dtype):
    return _native.DTYPE_CODE[fisher[0].dtype] if fisher else _native.DTYPE_CODE[dtype]


def fisher_guard_cpu(grads, params, anchors, fisher, lam, mode, ema, normalize):
    penalty = torch.zeros((), dtype=torch.float32)
    if not grads:
        return penalty
    dtype = grads[0].dtype
    _native._C.fisher_guard(
        [t.data_ptr() for t in grads],
        [t.data_ptr() for t in params],
        [t.data_ptr() for t in anchors],
        [t.data_ptr() for t in fisher] if fisher is not None else [],
        [t.numel() for t in grads],
        _native.DTYPE_CODE[dtype],
        _fisher_dtype(fisher, dtype),
        MODE_CODE[mode],
        float(lam),
        float(ema),
        normalize == "mean",
        penalty.data_ptr(),
    )
    return penalty


def _cuda_meta(grads, params, anchors, fisher, device):
    """int64 device buffer: grad|param|anchor|fisher pointers, numel,
    tensor_first_chunk (n+1), chunk_tensor (C), chunk_start (C)."""
    fis = fisher if fisher is not None else [None] * len(grads)
    key = (
        device,
        tuple((g.data_ptr(), p.data_ptr(), a.data_ptr(), f.data_ptr() if f is not None else 0, g.numel())
              for g, p, a, f in zip(grads, params, anchors, fis)),
    )
    hit = _META_CACHE.get(key)
    if hit is not None:
        return hit
    n = len(grads)
    numel = [g.numel() for g in grads]
    first, chunk_tensor, chunk_start = [0], [], []
    for t, m in enumerate(numel):
        starts = range(0, m, CUDA_CHUNK)
        chunk_tensor.extend([t] * len(starts))
        chunk_start.extend(starts)
        first.append(len(chunk_tensor))
    host = torch.tensor(
        [g.data_ptr() for g in grads]
        + [p.data_ptr() for p in params]
        + [a.data_ptr() for a in anchors]
        + [f.data_ptr() if f is not None else 0 for f in fis]
        + numel + first + chunk_tensor + chunk_start,
        dtype=torch.int64,
    )
    assert host.numel() == 6 * n + 1 + 2 * len(chunk_tensor)
    # A plain (synchronous) copy: it happens once per distinct tensor list, and
    # a later call on another stream must not race an in-flight upload.
    meta = host.to(device)
    if len(_META_CACHE) >= _META_CACHE_MAX:
        _META_CACHE.pop(next(iter(_META_CACHE)))
    entry = (meta, len(chunk_tensor))
    _META_CACHE[key] = entry
    return entry


def fisher_guard_cuda(grads, params, anchors, fisher, lam, mode, ema, normalize):
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    device = grads[0].device
    dtype = grads[0].dtype
    meta, n_chunks = _cuda_meta(grads, params, anchors, fisher, device)
    n = len(grads)
    penalty = torch.empty((), dtype=torch.float32, device=device)
    workspace = torch.empty(2 * n_chunks + n + 1, dtype=torch.float32, device=device)
    _native._C_cuda.fisher_guard(
        meta.data_ptr(), n, n_chunks, CUDA_CHUNK, fisher is not None,
        _native.DTYPE_CODE[dtype], _fisher_dtype(fisher, dtype), MODE_CODE[mode],
        float(lam), float(ema), normalize == "mean",
        workspace.data_ptr(), penalty.data_ptr(), _native.stream_handle(device),
    )
    return penalty
