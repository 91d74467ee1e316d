"""similarity_topk through the compiled modules.

cpp (CPU): per call, the queries are quantised to 7-bit codes (and packed for
the int8 tiles) and each key shard to 8-bit codes, unless the caller passes
the shard's ``QuantizedKeys`` (made once by ``quantize_keys``, e.g. stored in
a bank). One native call per shard screens every (query, key) pair with an
int8 dot product and a rigorous per-pair upper bound on the exact score,
scores exactly (by the definition) only the pairs that can still reach the
query's running threshold, and keeps the per-query state Python allocated;
``finish`` sorts each query's result. A query whose candidates outgrow their
buffer is screened again with its now known threshold as a floor and twice
the room. The derivation is atop csrc/cpu/similarity_topk.cpp.

Which screen runs (``screen_path``): the best int8 path the CPU has
(AVX512-VNNI, AVX-VNNI, AVX2), each compared on first use with the scalar
int8 loop on a fixed problem (exact integers); a path that disagrees is
skipped with one warning. Without any, the screen is a float32 torch.mm
(BLAS) with its rounding-error bound (``streaming.gemm_rel``).

cuda: ``streaming.screened_topk`` with the CUDA select kernel (per query the
best K' upper bounds, K' = k + slack) and the CUDA exact pair-score kernel;
keys device-resident or streamed from host memory.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import torch

from ... import _native
from . import streaming

# Mirrors csrc/include/mgcl/similarity_topk.h.
KEY_LEVELS = 127
QUERY_LEVELS = 63
INT8_MAX_DIM = 65536
PATHS = {"scalar": 0, "avx2": 1, "avxvnni": 2, "avx512vnni": 3, "blas": -1}
PREFERRED = ("avx512vnni", "avxvnni", "avx2")  # int8 paths, best first; then "blas"
CPU_BLAS_KEY_BLOCK = 4096
CPU_BLAS_QUERY_BLOCK = 1024


class QuantizedKeys(NamedTuple):
    """Screening codes of one key shard [N, d], made by :func:`quantize_keys`.

    Plain CPU tensors, so they store as they are (e.g.
    ``safetensors.torch.save_file(q._asdict(), path)`` and
    ``QuantizedKeys(**safetensors.torch.load_file(path))``). Deterministic:
    the same keys give the same bits on every machine. They speed up the
    screen only; results never depend on them, but they must be those of the
    keys they are passed with (a few rows are re-checked on every call).
    """

    codes: torch.Tensor  # int8 [N, d]: round(k / scale), |code| <= 127
    scale: torch.Tensor  # float32 [N]: max |k_j| / 127 (0 for a zero or special row)
    err: torch.Tensor    # float32 [N]: >= ||k - scale * codes||_2 (inf for a special row)
    norm: torch.Tensor   # float32 [N]: >= ||scale * codes||_2
    sum: torch.Tensor    # int32 [N]: sum_j codes[j]


def _params(**kw):
    """A native params dict: tensors become their addresses, None becomes 0."""
    return {k: (v.data_ptr() if isinstance(v, torch.Tensor) else (0 if v is None else v)) for k, v in kw.items()}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit inner stride (a row stride is passed separately)."""
    return t if t.stride(1) == 1 or t.shape[0] == 0 else t.contiguous()


def quantize(rows: torch.Tensor, levels: int) -> QuantizedKeys:
    """Codes and row metadata of ``rows`` [R, d] (CPU) at ``levels``."""
    rows = _rows(rows)
    r, d = rows.shape
    out = QuantizedKeys(torch.empty(r, d, dtype=torch.int8), torch.empty(r), torch.empty(r), torch.empty(r),
                        torch.empty(r, dtype=torch.int32))
    if r:
        _native._C.similarity_topk_quantize(_params(
            src=rows, dtype=_native.DTYPE_CODE[rows.dtype], rows=r, d=d, ld=rows.stride(0), levels=levels,
            codes=out.codes, scale=out.scale, err=out.err, norm=out.norm, sum=out.sum))
    return out


def check_quantized(keys: torch.Tensor, qk: QuantizedKeys, what: str) -> None:
    """Raise ValueError unless ``qk`` has the shapes of ``keys`` and agrees with
    it on a few rows (first, middle, last): a cheap guard against stale or
    misaligned copies."""
    n, d = keys.shape
    want = {"codes": ((n, d), torch.int8), "scale": ((n,), torch.float32), "err": ((n,), torch.float32),
            "norm": ((n,), torch.float32), "sum": ((n,), torch.int32)}
    for name, (shape, dt) in want.items():
        t = getattr(qk, name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dt or t.device.type != "cpu":
            raise ValueError(f"similarity_topk: {what}.{name} must be a CPU {dt} tensor of shape {shape} "
                             "(from quantize_keys of these keys)")
        if not t.is_contiguous():
            raise ValueError(f"similarity_topk: {what}.{name} must be contiguous")
    if n:
        rows = sorted({0, n // 2, n - 1})
        fresh = quantize(keys[rows], KEY_LEVELS)
        if not all(torch.equal(getattr(fresh, f), getattr(qk, f)[rows]) for f in QuantizedKeys._fields):
            raise ValueError(f"similarity_topk: {what} does not match its keys (rows {rows} quantise "
                             "differently): pass quantize_keys() of these very keys")


def cpu_paths() -> list[str]:
    """The int8 screening paths this CPU can run (before the self-check), best first."""
    bits = int(_native._C.similarity_topk_paths())
    return [p for p in PREFERRED if bits >> PATHS[p] & 1]


@functools.lru_cache(maxsize=None)
def screen_path() -> str:
    """The screen the cpp backend uses on this machine (see the module doc)."""
    for p in cpu_paths():
        if _native._C.similarity_topk_selfcheck(PATHS[p]):
            return p
        warnings.warn(f"mgcl similarity_topk: the {p} int8 screen disagreed with the scalar loop in its "
                      "self-check; not using it on this machine", RuntimeWarning, stacklevel=2)
    return "blas"


def cand_capacity(k: int) -> int:
    """Candidates buffered per query (CPU): room for k plus a run of ties."""
    return max(2 * k, k + 256)


# ---- cpp ------------------------------------------------------------------------------------

def _screen(queries, qq, shards, kqs, k, ties, cap, floor, path, rescored):
    """One screening pass of every shard into a fresh state; finish; returns
    (cand_v, cand_i, count, tau) with count -1 for overflowed queries."""
    nq, d = queries.shape
    f32, i64 = torch.float32, torch.int64
    state = dict(n_queries=nq, k=k, distinct=ties, best_v=torch.empty(nq, k), best_n=torch.zeros(nq, dtype=i64),
                 cand_v=torch.empty(nq, cap), cand_i=torch.empty(nq, cap, dtype=i64),
                 cand_n=torch.zeros(nq, dtype=i64), cand_cap=cap, overflow=torch.zeros(nq, dtype=torch.uint8))
    blas = path == "blas"
    packed = None
    if not blas:
        packed = torch.empty(-(-nq // 16) * -(-d // 4) * 64, dtype=torch.uint8)
        _native._C.similarity_topk_pack_queries(qq.codes.data_ptr(), nq, d, packed.data_ptr())
    qf = queries.float() if blas else None
    rel = streaming.gemm_rel(d, "cpu") if blas else 0.0
    base = dict(queries=queries, q_dtype=_native.DTYPE_CODE[queries.dtype], d=d,
                q_ld=queries.stride(0), q_packed=packed, q_scale=qq.scale, q_err=qq.err, q_norm=qq.norm,
                path=PATHS[path], approx=None, approx_ld=0, approx_rel=rel, floor=floor, rescored=rescored, **state)
    tau = torch.empty(nq, dtype=f32)
    count = torch.empty(nq, dtype=i64)
    if nq == 0:
        return state["cand_v"], state["cand_i"], count, tau
    col0 = 0
    for shard, kq in zip(shards, kqs):
        n = shard.shape[0]
        if n == 0:
            continue
        kd = _native.DTYPE_CODE[shard.dtype]
        if not blas:
            _native._C.similarity_topk_screen(_params(
                **base, row0=0, rows=nq, keys=shard, k_dtype=kd, n_keys=n, k_ld=shard.stride(0), col0=col0,
                k_codes=kq.codes, k_scale=kq.scale, k_err=kq.err, k_norm=kq.norm, k_sum=kq.sum))
        else:
            for a in range(0, n, CPU_BLAS_KEY_BLOCK):
                kb = shard[a:a + CPU_BLAS_KEY_BLOCK]
                kf = kb.float()
                for r0 in range(0, nq, CPU_BLAS_QUERY_BLOCK):
                    approx = torch.mm(qf[r0:r0 + CPU_BLAS_QUERY_BLOCK], kf.t())
                    _native._C.similarity_topk_screen(_params(
                        **{**base, "approx": approx, "approx_ld": approx.stride(0)}, row0=r0, rows=approx.shape[0],
                        keys=kb, k_dtype=kd, n_keys=kb.shape[0], k_ld=shard.stride(0), col0=col0 + a,
                        k_codes=None, k_scale=kq.scale[a:], k_err=kq.err[a:], k_norm=kq.norm[a:], k_sum=None))
        col0 += n
    _native._C.similarity_topk_finish(_params(tau=tau, count=count, **state))
    return state["cand_v"], state["cand_i"], count, tau


def _listed(cand_v, cand_i, count, rows):
    """(query, index, value) triples of the finished lists (count >= 0), in row order."""
    keep = torch.arange(cand_v.shape[1])[None, :] < count[:, None]
    return torch.repeat_interleave(rows, keep.sum(1)), cand_i[keep], cand_v[keep]


def similarity_topk_cpu(queries, shards, k, ties, max_per_query, quantized=None, *, path=None, stats=None):
    """The cpp backend. ``quantized``: one QuantizedKeys per shard (or None to
    make them here); ``path``: force a screen (tests, bench); ``stats``: a dict
    that receives the path, the exact scores per query and the reruns."""
    path = path or screen_path()
    nq, d = queries.shape
    if path != "blas" and d > INT8_MAX_DIM:
        path = "blas"
    queries = _rows(queries)
    shards = [_rows(s) for s in shards]
    kqs = list(quantized) if quantized is not None else [quantize(s, KEY_LEVELS) for s in shards]
    qq = quantize(queries, QUERY_LEVELS)
    rescored = torch.zeros(nq, dtype=torch.int64)
    n_total = sum(s.shape[0] for s in shards)
    rows = torch.arange(nq)
    floor = torch.full((nq,), -math.inf)
    cap = cand_capacity(k)
    pieces, passes = [], 0
    while passes == 0 or rows.numel():
        sub = rows if passes else slice(None)
        qsub = queries[sub]
        qqs = QuantizedKeys(*(t[sub].contiguous() for t in qq))
        scored = torch.zeros(rows.numel(), dtype=torch.int64)
        cv, ci, count, tau = _screen(qsub, qqs, shards, kqs, k, ties, cap, floor[sub].contiguous(), path, scored)
        rescored[rows] += scored
        pieces.append(_listed(cv, ci, count, rows))
        over = count < 0
        floor[rows[over]] = tau[over]
        rows = rows[over]
        cap = min(2 * cap, n_total + k + 1)
        passes += 1
    q, n, v = (torch.cat(t) for t in zip(*pieces))
    if passes > 1:  # each query's triples come from one pass, already in order
        order = q.argsort(stable=True)
        q, n, v = q[order], n[order], v[order]
    if stats is not None:
        stats.update(path=path, rescored=rescored, passes=passes)
    return streaming.ragged(q, n, v, nq, max_per_query)


def pair_scores_cpu(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    x, k = _rows(x), _rows(k)
    out = torch.empty(x.shape[0], dtype=torch.float32)
    if x.shape[0]:
        _native._C.similarity_topk_pair_scores(x.data_ptr(), _native.DTYPE_CODE[x.dtype], x.stride(0), k.data_ptr(),
                                               _native.DTYPE_CODE[k.dtype], k.stride(0), x.shape[0], x.shape[1],
                                               out.data_ptr())
    return out


# ---- chunked (torch only) and cuda ------------------------------------------------------------

CHUNKED_TILE = {"cpu": 4096, "cuda": 65536}


def slack(k: int) -> int:
    """K' - k: room in each list for bounds above the exact threshold."""
    return max(32, k)


def similarity_topk_chunked(queries, shards, k, ties, max_per_query, *, stats=None):
    tile = CHUNKED_TILE.get(queries.device.type, 4096)
    return streaming.screened_topk(queries, shards, k, ties, max_per_query, cap=k + slack(k), tile=tile,
                                   stats=stats)


# Scores per GEMM tile (float32 elements): queries x tile keys,
# tile = CUDA_TILE_ELEMS // Q clamped to [CUDA_TILE_MIN, CUDA_TILE_MAX].
CUDA_TILE_ELEMS = 1 << 26
CUDA_TILE_MIN = 1024
CUDA_TILE_MAX = 65536


def tile_cols(rows: int) -> int:
    t = CUDA_TILE_ELEMS // max(rows, 1)
    return max(256, max(CUDA_TILE_MIN, min(CUDA_TILE_MAX, t)) // 256 * 256)


def device_tiles(shards, dev, tile: int):
    """(n0, key tile [rows, d] on ``dev``) in key order.

    Device-resident shards give views. Host-resident blocks are copied on a
    side stream into two device buffers, block j+1 while block j computes:
    copied[b] (copy stream) gates the compute stream; used[b] (compute stream,
    after the caller has enqueued its work on the tile) gates the next copy
    into buffer b. Pageable shards go through pinned staging buffers, refilled
    on the host once the copy out of them has finished."""
    blocks = list(streaming.key_blocks(shards, tile))
    host = [i for i, (_, kb) in enumerate(blocks) if kb.device.type == "cpu"]
    rank = {i: r for r, i in enumerate(host)}
    compute = torch.cuda.current_stream(dev)
    copy = torch.cuda.Stream(dev) if host else None
    if host:
        kb0 = blocks[host[0]][1]
        dbuf = [torch.empty(tile, kb0.shape[1], dtype=kb0.dtype, device=dev) for _ in range(2)]
        stage = [None, None]
        copied = [torch.cuda.Event(), torch.cuda.Event()]
        used = [torch.cuda.Event(), torch.cuda.Event()]

    def issue(r):
        slot = r % 2
        kb = blocks[host[r]][1]
        rows = kb.shape[0]
        src = kb
        if not kb.is_pinned():
            if stage[slot] is None:
                stage[slot] = torch.empty(tile, kb.shape[1], dtype=kb.dtype, pin_memory=True)
            copied[slot].synchronize()  # the last copy out of this staging buffer is done
            stage[slot][:rows].copy_(kb)
            src = stage[slot][:rows]
        with torch.cuda.stream(copy):
            copy.wait_event(used[slot])
            dbuf[slot][:rows].copy_(src, non_blocking=True)
            copied[slot].record(copy)

    try:
        if host:
            issue(0)
        for i, (n0, kb) in enumerate(blocks):
            if kb.device.type != "cpu":
                yield n0, kb
                continue
            r = rank[i]
            slot = r % 2
            if r + 1 < len(host):
                issue(r + 1)
            compute.wait_event(copied[slot])
            yield n0, dbuf[slot][:kb.shape[0]]
            used[slot].record(compute)
    finally:
        if copy is not None:
            compute.wait_stream(copy)


def cuda_select(ub, n0, lv, li, ln):
    """The CUDA select kernel (see kernels/similarity_topk.cu) on one tile of bounds."""
    dev = ub.device
    _native._C_cuda.similarity_topk_select(ub.data_ptr(), ub.stride(0), ub.shape[0], ub.shape[1], n0, lv.shape[1],
                                           False, lv.data_ptr(), li.data_ptr(), ln.data_ptr(),
                                           _native.stream_handle(dev))


def pair_scores_cuda(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    x, k = _rows(x), _rows(k)
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    if x.shape[0]:
        _native._C_cuda.similarity_topk_pair_scores(
            x.data_ptr(), _native.DTYPE_CODE[x.dtype], x.stride(0), k.data_ptr(), _native.DTYPE_CODE[k.dtype],
            k.stride(0), x.shape[0], x.shape[1], out.data_ptr(), _native.stream_handle(x.device))
    return out


def similarity_topk_cuda(queries, shards, k, ties, max_per_query, *, stats=None):
    dev = queries.device
    nq = queries.shape[0]
    cap = min(k + slack(k), int(_native._C_cuda.max_best_cap))
    return streaming.screened_topk(queries, shards, k, ties, max_per_query, cap=cap, tile=tile_cols(nq),
                                   tiles=lambda sh, t: device_tiles(sh, dev, t), select=cuda_select,
                                   pair_scores=pair_scores_cuda, stats=stats)
