"""similarity_topk: every key scoring at or above each query's k-th largest
DISTINCT score (SPEC.md section 3, step 1), or plain top-k.

    res = similarity_topk(queries, keys, k=100)          # ties=True
    v, i = res.query(7)                                   # query 7's entries

``keys`` is one [N, d] tensor or a list of shards [n_i, d] whose rows are
numbered consecutively (empty shards allowed). With queries on a GPU, shards
may stay in host memory: they are streamed through the device in blocks. The
result is ragged (CSR); the exact rule is in ``reference.py``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from ... import _backend, _native
from ..._backend import Entry
from . import native, reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _within_cuda_cap(call):
    """k <= mgcl._C_cuda.max_best_cap (the CUDA select's shared memory)"""
    k, cap = call.get("k"), int(_native._C_cuda.max_best_cap)
    return None if k is None or k <= cap else f"k={k} is above the CUDA select's cap of {cap}"


# The dispatch table, in order of preference (see mgcl._backend): every entry
# has the signature (queries, shards: list[Tensor], k, ties, max_per_query) -> 4 tensors.
BACKENDS = {
    "cuda": Entry(native.similarity_topk_cuda, devices=("cuda",), dtypes=DTYPES, limit=_within_cuda_cap),
    "cpp": Entry(native.similarity_topk_cpu, devices=("cpu",), dtypes=DTYPES),
    "torch": Entry(reference.similarity_topk, devices=("cpu", "cuda"), dtypes=DTYPES),
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
    max_per_query: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # max_per_query is 0 for "no cap" (the schema has no optional int).
    return tuple(BACKENDS[backend](queries, keys, k, ties, max_per_query or None))


@_similarity_topk_op.register_fake
def _(queries, keys, k, ties, max_per_query, backend):
    m = torch.library.get_ctx().new_dynamic_size()
    dev, q = queries.device, queries.shape[0]
    return (
        queries.new_empty((m,), dtype=torch.float32),
        queries.new_empty((m,), dtype=torch.int64),
        torch.empty((q + 1,), dtype=torch.int64, device=dev),
        torch.empty((q,), dtype=torch.bool, device=dev),
    )


def similarity_topk(
    queries: torch.Tensor,
    keys: Union[torch.Tensor, Sequence[torch.Tensor]],
    k: int,
    *,
    ties: bool = True,
    max_per_query: Optional[int] = None,
    backend: Optional[str] = None,
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
        backend: ``"torch"``, ``"cpp"`` or ``"cuda"``; default by the queries'
            device (see ``mgcl._backend``).

    Returns:
        :class:`TopK` on the queries' device: float32 scores (accumulated in
        float32), int64 global key indices, int64 offsets [Q+1], bool
        truncated [Q]. NaN scores are never returned.

    Raises ValueError on bad input (k < 1, dim mismatch, non-2-D, dtypes mixed
    across shards, keys on another GPU, ...).
    """
    shards = reference.as_shards(keys)
    _check(queries, shards, k, ties, max_per_query)
    # k beyond N changes nothing (k' <= |U| <= N) but would size the per-query state [Q, k]
    k = max(1, min(k, sum(s.shape[0] for s in shards)))
    name = _backend.select("similarity_topk", BACKENDS, queries.device, backend,
                           dtypes=(queries.dtype,) + tuple(s.dtype for s in shards[:1]), k=k)
    out = _similarity_topk_op(queries.detach(), [s.detach() for s in shards], int(k), bool(ties),
                              int(max_per_query or 0), name)
    return TopK(*out)


__all__ = ["similarity_topk", "TopK", "BACKENDS"]
