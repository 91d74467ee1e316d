"""similarity_topk: every key scoring at or above each query's k-th largest
DISTINCT score (SPEC.md section 3, step 1), or plain top-k, with scores that
are exact and the same on every machine.

    res = similarity_topk(queries, keys, k=100)          # ties=True
    v, i = res.query(7)                                   # query 7's entries
    s = pair_scores(queries[qi], keys[ki])                # the same scores, row-wise

The score of a query row x and a key row k is defined exactly (``reference.py``):
the products x_j * k_j of the stored values in binary64 (exact), summed in
ascending j from +0.0 in binary64, rounded once to float32. Every backend
returns values, indices and offsets bit-identical to the dense reference, on
any CPU, BLAS, thread count, shard split, batching and device.

``keys`` is one [N, d] tensor or a list of shards [n_i, d] whose rows are
numbered consecutively (empty shards allowed). With queries on a GPU, shards
may stay in host memory: they are streamed through the device in blocks. The
result is ragged (CSR).

Speed comes from screening (``native.py``): a low-precision pass with a
rigorous per-pair bound picks the pairs that can reach each query's
threshold, and only those are scored exactly. On the CPU the screen uses int8
codes of the keys; ``quantize_keys`` makes them once (a bank can store them,
they are plain tensors) and ``similarity_topk(..., quantized=...)`` takes them.
The ``triton`` backend (``triton.py``) fuses the screen and the threshold
filter into the GEMM tiles: one kernel keeps each key block's best bound per
query, their exact scores give a threshold from below, and a second kernel
emits only the pairs whose bound reaches it, so no Q x N matrix exists.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from ... import _backend, _native
from ..._backend import Entry
from . import native, reference, streaming
from .native import QuantizedKeys

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _within_cuda_cap(call):
    """k <= mgcl._C_cuda.max_best_cap (the CUDA select's shared memory)"""
    k, cap = call.get("k"), int(_native._C_cuda.max_best_cap)
    return None if k is None or k <= cap else f"k={k} is above the CUDA select's cap of {cap}"


def _ignores_codes(fn):
    """A backend that screens without the int8 key codes: the quantized copies are not used."""
    def run(queries, shards, k, ties, max_per_query, quantized):
        return fn(queries, shards, k, ties, max_per_query)
    run.__doc__ = fn.__doc__
    return run


def _triton(queries, shards, k, ties, max_per_query):
    """The Triton screen + filter kernels (``triton.py``), exact scores by the pair-score table."""
    from . import triton as engine  # noqa: PLC0415  (imports triton: only when used)

    dtypes = (queries.dtype,) + tuple(s.dtype for s in shards[:1])
    return engine.similarity_topk_triton(queries, shards, k, ties, max_per_query,
                                         pair_scores=_pair_entry(queries.device, dtypes))


def _interpreter_float32(call):
    """on CPU tensors (the Triton interpreter) float32 only: the interpreter computes 16-bit dots wrongly"""
    if call["device"].type != "cpu":
        return None
    bad = sorted({str(dt).replace("torch.", "") for dt in call.get("dtypes", ()) if dt != torch.float32})
    return (f"the Triton interpreter (CPU tensors) computes 16-bit dots wrongly: float32 only there, not "
            f"{', '.join(bad)}") if bad else None


def _pair_entry(device: torch.device, dtypes: tuple) -> Entry:
    """The first PAIR_BACKENDS entry that runs on ``device`` with ``dtypes`` (the triton path's exact scores)."""
    for name, entry in PAIR_BACKENDS.items():
        if _backend.problem(entry, name, {"device": device, "dtypes": dtypes}) is None:
            return entry
    raise ValueError(f"similarity_topk: no pair-score backend runs on {device}")


# The dispatch table, in order of preference (see mgcl._backend): every entry
# has the signature (queries, shards: list[Tensor], k, ties, max_per_query,
# quantized: list[QuantizedKeys] | None) -> 4 tensors. triton runs on CPU
# tensors only under TRITON_INTERPRET=1 (and only when named). chunked (torch only,
# exact screening, O(Q (K' + tile)) memory) is the fallback that scales; torch
# is the dense definition.
BACKENDS = {
    "cuda": Entry(_ignores_codes(native.similarity_topk_cuda), devices=("cuda",), dtypes=DTYPES,
                  limit=_within_cuda_cap),
    "cpp": Entry(native.similarity_topk_cpu, devices=("cpu",), dtypes=DTYPES),
    "triton": Entry(_ignores_codes(_triton), devices=("cuda", "cpu"), dtypes=DTYPES, limit=_interpreter_float32),
    "chunked": Entry(_ignores_codes(native.similarity_topk_chunked), devices=("cpu", "cuda"), dtypes=DTYPES),
    "torch": Entry(_ignores_codes(reference.similarity_topk), devices=("cpu", "cuda"), dtypes=DTYPES),
}

# pair_scores: (x [P, d], k [P, d]) -> float32 [P]. The reference is already
# O(P) memory, so chunked and torch share it.
PAIR_BACKENDS = {
    "cuda": Entry(native.pair_scores_cuda, devices=("cuda",), dtypes=DTYPES),
    "cpp": Entry(native.pair_scores_cpu, devices=("cpu",), dtypes=DTYPES),
    "chunked": Entry(reference.pair_scores, devices=("cpu", "cuda"), dtypes=DTYPES),
    "torch": Entry(reference.pair_scores, devices=("cpu", "cuda"), dtypes=DTYPES),
}


class TopK(NamedTuple):
    """A ragged result: query q owns ``values[offsets[q]:offsets[q+1]]`` and the
    same slice of ``indices``, sorted by score descending then index ascending."""

    values: torch.Tensor      # float32 [M]: the scores
    indices: torch.Tensor     # int64 [M]: global key rows (across shards)
    offsets: torch.Tensor     # int64 [Q+1]: offsets[0] = 0, offsets[Q] = M
    truncated: torch.Tensor   # bool [Q]: the query lost entries to max_per_query

    def query(self, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of query ``q``."""
        a, b = int(self.offsets[q]), int(self.offsets[q + 1])
        return self.values[a:b], self.indices[a:b]


def _check(queries, shards, k, ties, max_per_query):
    if not isinstance(queries, torch.Tensor):
        raise ValueError(f"similarity_topk: queries is {type(queries).__name__}, not a tensor")
    if queries.dim() != 2:
        raise ValueError(f"similarity_topk: queries must be 2-D [Q, d], got shape {tuple(queries.shape)}")
    if queries.dtype not in DTYPES:
        raise ValueError(f"similarity_topk: queries have dtype {queries.dtype}; supported: float32, float16, bfloat16")
    if queries.device.type not in ("cpu", "cuda"):
        raise ValueError(f"similarity_topk: queries on {queries.device}; expected a CPU or CUDA tensor")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"similarity_topk: k must be an int >= 1, got {k!r}")
    if not isinstance(ties, bool):
        raise ValueError(f"similarity_topk: ties must be a bool, got {ties!r}")
    if max_per_query is not None and (isinstance(max_per_query, bool) or not isinstance(max_per_query, int)
                                      or max_per_query < 1):
        raise ValueError(f"similarity_topk: max_per_query must be None or an int >= 1, got {max_per_query!r}")
    d = queries.shape[1]
    for i, s in enumerate(shards):
        if not isinstance(s, torch.Tensor):
            raise ValueError(f"similarity_topk: keys[{i}] is {type(s).__name__}, not a tensor")
        if s.dim() != 2:
            raise ValueError(f"similarity_topk: keys[{i}] must be 2-D [n, d], got shape {tuple(s.shape)}")
        if s.shape[1] != d:
            raise ValueError(f"similarity_topk: keys[{i}] has dim {s.shape[1]}, queries have dim {d} (dim mismatch)")
        if s.dtype not in DTYPES:
            raise ValueError(f"similarity_topk: keys[{i}] has dtype {s.dtype}; supported: float32, float16, bfloat16")
        if s.dtype != shards[0].dtype:
            raise ValueError(f"similarity_topk: keys[{i}] has dtype {s.dtype}, keys[0] {shards[0].dtype} "
                             "(mixed dtypes across shards)")
        host_ok = queries.device.type == "cuda" and s.device.type == "cpu"
        if s.device != queries.device and not host_ok:
            raise ValueError(f"similarity_topk: keys[{i}] is on {s.device}, queries on {queries.device}; keys must "
                             "be on the queries' device or, for queries on a GPU, in host memory")


@torch.library.custom_op("mgcl::similarity_topk", mutates_args=())
def _similarity_topk_op(
    queries: torch.Tensor,
    keys: list[torch.Tensor],
    k: int,
    ties: bool,
    max_per_query: Optional[int],
    backend: str,
    quantized: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # quantized: the QuantizedKeys of each shard, flattened (5 tensors per
    # shard), or empty: make them here (torch schemas have no optional list).
    n = len(QuantizedKeys._fields)
    codes = [QuantizedKeys(*quantized[i:i + n]) for i in range(0, len(quantized), n)] or None
    return tuple(BACKENDS[backend](queries, keys, k, ties, max_per_query, codes))


@_similarity_topk_op.register_fake
def _(queries, keys, k, ties, max_per_query, backend, quantized):
    m = torch.library.get_ctx().new_dynamic_size()
    dev, q = queries.device, queries.shape[0]
    return (
        queries.new_empty((m,), dtype=torch.float32),
        queries.new_empty((m,), dtype=torch.int64),
        torch.empty((q + 1,), dtype=torch.int64, device=dev),
        torch.empty((q,), dtype=torch.bool, device=dev),
    )


@torch.library.custom_op("mgcl::similarity_topk_pair_scores", mutates_args=())
def _pair_scores_op(x: torch.Tensor, k: torch.Tensor, backend: str) -> torch.Tensor:
    return PAIR_BACKENDS[backend](x, k)


@_pair_scores_op.register_fake
def _(x, k, backend):
    return x.new_empty((x.shape[0],), dtype=torch.float32)


def quantize_keys(keys: Union[torch.Tensor, Sequence[torch.Tensor]]):
    """The screening codes of a key tensor [N, d] (or of each shard of a list):
    :class:`QuantizedKeys`, plain CPU tensors, deterministic (the same bits on
    every machine), to make once and pass to ``similarity_topk(...,
    quantized=...)`` with the same keys. Needs mgcl._C.

    Per row: codes = round(k / scale) (int8, |code| <= 127), scale = max|k_j| / 127,
    err >= ||k - scale * codes||, norm >= ||scale * codes||, sum = sum of the codes.
    """
    if not _native.HAS_C:
        raise RuntimeError(f"quantize_keys needs mgcl._C, which could not be imported ({_native.C_ERROR})")
    single = isinstance(keys, torch.Tensor)
    out = []
    for i, s in enumerate(streaming.as_shards(keys)):
        if not isinstance(s, torch.Tensor) or s.dim() != 2 or s.dtype not in DTYPES or s.device.type != "cpu":
            raise ValueError(f"quantize_keys: keys[{i}] must be a 2-D float32/float16/bfloat16 CPU tensor")
        out.append(native.quantize(s.detach(), native.KEY_LEVELS))
    return out[0] if single else out


def pair_scores(queries: torch.Tensor, keys: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """float32 [P]: the exact score (the definition above) of row i of
    ``queries`` [P, d] with row i of ``keys`` [P, d]: the same value
    ``similarity_topk`` returns for that pair. Both on one device; dtypes
    float32, float16 or bfloat16 (they may differ)."""
    for name, t in (("queries", queries), ("keys", keys)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"pair_scores: {name} must be a 2-D tensor [P, d]")
        if t.dtype not in DTYPES:
            raise ValueError(f"pair_scores: {name} have dtype {t.dtype}; supported: float32, float16, bfloat16")
    if queries.shape != keys.shape:
        raise ValueError(f"pair_scores: queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must have one shape")
    if queries.device != keys.device:
        raise ValueError(f"pair_scores: queries on {queries.device}, keys on {keys.device}")
    name = _backend.select("similarity_topk", PAIR_BACKENDS, queries.device, backend,
                           dtypes=(queries.dtype, keys.dtype))
    return _pair_scores_op(queries.detach(), keys.detach(), name)


def similarity_topk(
    queries: torch.Tensor,
    keys: Union[torch.Tensor, Sequence[torch.Tensor]],
    k: int,
    *,
    ties: bool = True,
    max_per_query: Optional[int] = None,
    backend: Optional[str] = None,
    quantized: Union[None, QuantizedKeys, Sequence[QuantizedKeys]] = None,
) -> TopK:
    """Per query, every key at or above its k-th largest distinct score.

    Args:
        queries: [Q, d] float32, float16 or bfloat16, on the CPU or a GPU.
        keys: one [N, d] tensor or a list of shards [n_i, d] (indices count
            across shards in order; empty shards allowed), one dtype for all
            (it may differ from the queries'). On the queries' device or, for
            queries on a GPU, in host memory (pinned or not).
        k: >= 1. ``ties=True``: tau = the min(k, #distinct)-th largest distinct
            non-NaN score; every key with score >= tau is returned (so a query
            can get more than k). ``ties=False``: the min(k, #non-NaN) best,
            equal scores broken by the lower index.
        max_per_query: keep at most this many entries per query (the best
            ones) and flag the query in ``truncated``.
        backend: ``"cuda"``, ``"cpp"``, ``"triton"``, ``"chunked"`` or ``"torch"`` (see
            ``BACKENDS``); default: the first that can run the call.
        quantized: ``quantize_keys(keys)`` made beforehand (one per shard), so
            the cpp screen does not quantise the keys on every call; other
            backends ignore them. A few rows are checked against the keys.

    Returns:
        :class:`TopK` on the queries' device: float32 scores (the exact
        definition), int64 global key indices, int64 offsets [Q+1], bool
        truncated [Q]. NaN scores are never returned.

    Raises ValueError on bad input (k < 1, dim mismatch, non-2-D, dtypes mixed
    across shards, keys on another GPU, ...).
    """
    shards = streaming.as_shards(keys)
    _check(queries, shards, k, ties, max_per_query)
    flat = []
    if quantized is not None:
        codes = [quantized] if isinstance(quantized, QuantizedKeys) else list(quantized)
        if len(codes) != len(shards):
            raise ValueError(f"similarity_topk: {len(codes)} quantized copies for {len(shards)} key shards")
        for i, (s, c) in enumerate(zip(shards, codes)):
            if s.device.type != "cpu":
                raise ValueError(f"similarity_topk: quantized copies go with CPU keys; keys[{i}] is on {s.device}")
            native.check_quantized(s, c, f"quantized[{i}]")
        flat = [t for c in codes for t in c]
    # k beyond N changes nothing (k' <= |U| <= N) but would size the per-query state [Q, k]
    k = max(1, min(k, sum(s.shape[0] for s in shards)))
    name = _backend.select("similarity_topk", BACKENDS, queries.device, backend,
                           dtypes=(queries.dtype,) + tuple(s.dtype for s in shards[:1]), k=k)
    out = _similarity_topk_op(queries.detach(), [s.detach() for s in shards], int(k), bool(ties), max_per_query,
                              name, flat)
    return TopK(*out)


__all__ = ["similarity_topk", "pair_scores", "quantize_keys", "QuantizedKeys", "TopK", "BACKENDS", "PAIR_BACKENDS"]
