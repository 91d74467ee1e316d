"""similarity_topk, the definition (SPEC.md section 3, step 1: dense retrieval).

The score of a query row x and a key row k (d values each, in their stored
dtypes: float32, float16 or bfloat16):

    s(x, k) = fp32( (((0 + p_0) + p_1) + ...) + p_{d-1} ),   p_j = x_j * k_j

Every product and every sum is binary64 (a product of two such values is exact
there: 24 + 24 <= 53 significand bits); the sum runs over ascending j from
+0.0 with one rounding per addition, and is rounded once to binary32 (nearest
even). So a score does not depend on BLAS, CPU, thread count, shard layout,
batching or device, and fma(x_j, k_j, acc) gives the same sum (the product is
exact). A NaN product makes the score NaN; a NaN score is never returned.
IEEE arithmetic is assumed: flushing subnormals to zero
(torch.set_flush_denormal(True)) is outside the definition.

The rule, per query q over its scores s[q, :]:

    ties=True:  U = the distinct non-NaN values,  k' = min(k, |U|),
                tau = the k'-th largest value of U;  keep every n with s[q, n] >= tau
    ties=False: keep the min(k, #non-NaN) best n, equal scores broken by lower n
    order:      score descending, then index ascending
    max_per_query=m: keep the first m entries, set truncated[q]

Keys are one [N, d] tensor or shards [n_i, d] numbered consecutively. The
result is ragged (CSR): query q owns values/indices[offsets[q]:offsets[q+1]].
This module is the test oracle and the bench baseline: dense, O(Q N) memory.
"""
from __future__ import annotations

import torch


def pair_scores(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """float32 [P]: the score of row i of ``x`` [P, d] with row i of ``k`` [P, d]."""
    acc = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for j in range(x.shape[1]):
        acc += x[:, j].double() * k[:, j].double()
    return acc.float()


def scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """float32 [Q, N]: the score of every query row with every key row."""
    acc = torch.zeros(queries.shape[0], keys.shape[0], dtype=torch.float64, device=queries.device)
    for j in range(queries.shape[1]):
        acc += queries[:, j, None].double() * keys[None, :, j].double()
    return acc.float()


def similarity_topk(queries: torch.Tensor, shards: list[torch.Tensor], k: int, ties: bool, max_per_query: int | None):
    """(values float32 [M], indices int64 [M], offsets int64 [Q+1], truncated bool [Q])."""
    dev = queries.device
    keys = torch.cat([s.to(dev) for s in shards]) if shards else queries.new_zeros(0, queries.shape[1])
    s = scores(queries, keys)
    values, indices, counts, truncated = [], [], [], []
    for row in s:
        n = (~torch.isnan(row)).nonzero().flatten()  # ascending index
        if ties and n.numel():
            u = torch.unique(row[n])  # ascending distinct values
            n = n[row[n] >= u[-min(k, u.numel())]]
        n = n[torch.sort(row[n], descending=True, stable=True).indices]  # equal scores keep index order
        if not ties:
            n = n[:k]
        truncated.append(max_per_query is not None and n.numel() > max_per_query)
        n = n[:max_per_query]
        values.append(row[n])
        indices.append(n)
        counts.append(n.numel())
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
    empty = torch.empty(0, device=dev)
    return (torch.cat(values) if values else empty.float(), torch.cat(indices) if indices else empty.long(),
            offsets.to(dev), torch.tensor(truncated, dtype=torch.bool, device=dev))
