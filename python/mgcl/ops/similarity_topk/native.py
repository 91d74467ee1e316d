"""similarity_topk through the compiled modules.

Both paths compute the float32 scores with torch (BLAS / cuBLAS) one block at
a time and hand each block to a native selection that keeps per-query state
which Python allocated; Python then builds the ragged result.

cpp (CPU): the reference's own score blocks (``reference.score_blocks``, the
same ``torch.mm`` calls into the same kind of buffer), so the scores, and the
result, are bit-identical to the reference. Per query the C++ state is the k
best (distinct) values plus a bounded candidate buffer; a query whose buffer
overflows is collected in a second pass over just its query block.

cuda: GEMM tiles of all queries x ``tile`` keys into a float32 buffer, the
select kernel on a side stream (it overlaps the next tile's GEMM; two score
buffers and events), keys either device-resident or streamed from host memory
(a copy stream, two device buffers, pinned staging for pageable shards). Each
query keeps its top K' = k + slack entries. A query is resolved from its list
unless the list is full and either holds fewer than k distinct values or its
last value equals tau; those queries alone get two more passes over
their own sub-GEMM: a distinct select (exact tau), then a collection of every
score >= tau. Memory: O(Q * (K' + tile)), never Q x N.
"""
from __future__ import annotations

import torch

from ... import _native
from . import reference

# ---- shared: the ragged result from sorted per-query lists + collected rows --------------


def assemble(lists_v, lists_i, count, collected, keep, cap):
    """TopK fields from (a) per-query sorted lists [Q, W] whose first count[q]
    entries are query q's result, and (b) for queries with count[q] == -1,
    collected (q, n, v) triples sorted by query, value desc, index asc."""
    dev = count.device
    nq = count.shape[0]
    cq, cn, cv = collected
    from_list = count >= 0
    raw = torch.bincount(cq, minlength=nq) if cq.numel() else torch.zeros(nq, dtype=torch.int64, device=dev)
    total, truncated = reference.clip_counts(torch.where(from_list, count, raw), keep, cap)
    offsets = torch.zeros(nq + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(total, 0)
    m = int(offsets[-1])
    # output slot p belongs to query owner[p], at rank p - offsets[owner[p]]
    owner = torch.repeat_interleave(torch.arange(nq, device=dev), total, output_size=m)
    rank = torch.arange(m, device=dev) - offsets[owner]
    if not cq.numel():
        return lists_v[owner, rank], lists_i[owner, rank], offsets, truncated
    values = torch.empty(m, dtype=torch.float32, device=dev)
    indices = torch.empty(m, dtype=torch.int64, device=dev)
    mine = from_list[owner]
    values[mine] = lists_v[owner[mine], rank[mine]]
    indices[mine] = lists_i[owner[mine], rank[mine]]
    starts = torch.cumsum(raw, 0) - raw  # first collected triple of each query
    other = ~mine
    src = starts[owner[other]] + rank[other]
    values[other] = cv[src]
    indices[other] = cn[src]
    return values, indices, offsets, truncated


# ---- cpp ------------------------------------------------------------------------------------


def cand_capacity(k: int) -> int:
    """Candidates buffered per query (CPU): room for k plus a run of ties."""
    return max(2 * k, k + 256)


def similarity_topk_cpu(queries, shards, k, ties, max_per_query):
    nq = queries.shape[0]
    cap = cand_capacity(k)
    f32, i64 = torch.float32, torch.int64
    best_v = torch.empty(nq, k, dtype=f32)
    best_n = torch.zeros(nq, dtype=i64)
    cand_v = torch.empty(nq, cap, dtype=f32)
    cand_i = torch.empty(nq, cap, dtype=i64)
    cand_n = torch.zeros(nq, dtype=i64)
    overflow = torch.zeros(nq, dtype=torch.uint8)
    tau = torch.empty(nq, dtype=f32)
    count = torch.empty(nq, dtype=i64)
    state = dict(best_cap=k, distinct=ties, best_v=best_v.data_ptr(), best_n=best_n.data_ptr(),
                 cand_v=cand_v.data_ptr(), cand_i=cand_i.data_ptr(), cand_n=cand_n.data_ptr(), cand_cap=cap,
                 overflow=overflow.data_ptr())
    if nq:
        for q0, n0, s in reference.score_blocks(queries, shards):
            _native._C.similarity_topk_update(s.data_ptr(), s.stride(0), s.shape[0], s.shape[1], q0, n0, **state)
        _native._C.similarity_topk_finish(nq, k, tau=tau.data_ptr(), count=count.data_ptr(), **state)

    pieces = []
    over = (count < 0).nonzero().flatten()
    if over.numel():
        # Same blocks, same torch.mm calls: the overflowed rows see the very
        # scores their tau came from.
        qblock = reference.QUERY_BLOCK["cpu"]
        starts = set((over // qblock * qblock).tolist())
        for q0, n0, s in reference.score_blocks(queries, shards, only=starts):
            rows = over[(over >= q0) & (over < q0 + s.shape[0])]
            r, c = (s[rows - q0] >= tau[rows, None]).nonzero(as_tuple=True)
            pieces.append((rows[r], c + n0, s[rows[r] - q0, c]))
    collected = reference.sorted_triples(pieces, queries.device)
    return assemble(cand_v, cand_i, count, collected, None if ties else k, max_per_query)


# ---- cuda -----------------------------------------------------------------------------------

# Scores per GEMM tile (float32 elements per buffer; two buffers): queries x
# tile keys, tile = CUDA_TILE_ELEMS // Q clamped to [CUDA_TILE_MIN, CUDA_TILE_MAX].
CUDA_TILE_ELEMS = 1 << 26
CUDA_TILE_MIN = 1024
CUDA_TILE_MAX = 65536
# Run the select of tile j on a side stream while the GEMM of tile j+1 runs.
CUDA_OVERLAP = True


def cuda_slack(k: int) -> int:
    """K' - k for ties=True: room for ties at the boundary before a query
    needs the collection pass."""
    return max(32, k)


def tile_cols(rows: int) -> int:
    t = CUDA_TILE_ELEMS // max(rows, 1)
    return max(256, max(CUDA_TILE_MIN, min(CUDA_TILE_MAX, t)) // 256 * 256)


def device_tiles(shards, dev, tile: int, gdt):
    """(n0, key tile [rows, d] on ``dev`` in ``gdt``) in key order.

    Device-resident shards give views. Host-resident blocks are copied on a
    side stream into two device buffers, block j+1 while block j computes:
    copied[b] (copy stream) gates the compute stream; used[b] (compute stream,
    after the caller has enqueued its work on the tile) gates the next copy
    into buffer b. Pageable shards go through pinned staging buffers, refilled
    on the host once the copy out of them has finished."""
    blocks = list(reference.key_blocks(shards, tile))
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
                yield n0, kb.to(gdt)
                continue
            r = rank[i]
            slot = r % 2
            if r + 1 < len(host):
                issue(r + 1)
            compute.wait_event(copied[slot])
            yield n0, dbuf[slot][:kb.shape[0]].to(gdt)
            used[slot].record(compute)
    finally:
        if copy is not None:
            compute.wait_stream(copy)


def _select_pass(qg, shards, tile, cap, distinct, best_v, best_i, best_n):
    """Fold every key tile into the per-row lists (rows = qg's rows). Each
    tile's GEMM has the full tile width (reference.fixed_width_scores)."""
    dev = qg.device
    nq = qg.shape[0]
    qp = reference.pad_queries(qg)
    compute = torch.cuda.current_stream(dev)
    side = torch.cuda.Stream(dev) if CUDA_OVERLAP else compute
    nbuf = 2 if CUDA_OVERLAP else 1
    bufs = [torch.empty(qp.shape[0] * tile, dtype=torch.float32, device=dev) for _ in range(nbuf)]
    pad = [None]  # written and read on the compute stream only
    gemm_done = [torch.cuda.Event() for _ in range(nbuf)]
    select_done = [torch.cuda.Event() for _ in range(nbuf)]
    try:
        for j, (n0, kt) in enumerate(device_tiles(shards, dev, tile, qg.dtype)):
            b = j % nbuf
            compute.wait_event(select_done[b])  # the select reading bufs[b] two tiles ago is done
            cols = kt.shape[0]
            s = reference.fixed_width_scores(qp, nq, kt, tile, bufs[b], pad)
            gemm_done[b].record(compute)
            side.wait_event(gemm_done[b])
            _native._C_cuda.similarity_topk_select(
                s.data_ptr(), s.stride(0), nq, cols, n0, cap, distinct, best_v.data_ptr(), best_i.data_ptr(),
                best_n.data_ptr(), side.cuda_stream)
            select_done[b].record(side)
    finally:
        compute.wait_stream(side)


def _new_lists(nq, cap, dev):
    return (torch.empty(nq, cap, dtype=torch.float32, device=dev),
            torch.empty(nq, cap, dtype=torch.int64, device=dev),
            torch.zeros(nq, dtype=torch.int64, device=dev))


def _resolve(lv, li, ln, k):
    """From the top-K' lists: tau, the count of entries >= tau, and whether the
    list alone settles the query (ties=True)."""
    cap = lv.shape[1]
    j = torch.arange(cap, device=lv.device)
    valid = j[None, :] < ln[:, None]
    new = valid.clone()
    new[:, 1:] &= lv[:, 1:] != lv[:, :-1]
    ndist = new.cumsum(1)
    has_k = ndist[:, -1] >= k
    pos_k = (ndist < k).sum(1).clamp(max=cap - 1)
    last = (ln - 1).clamp(min=0)
    tau = lv.gather(1, torch.where(has_k, pos_k, last)[:, None]).squeeze(1)
    count = (valid & (lv >= tau[:, None])).sum(1)
    count = torch.where(ln > 0, count, torch.zeros_like(count))
    unresolved = (ln == cap) & (~has_k | (lv[:, cap - 1] == tau))
    return count, unresolved


def similarity_topk_cuda(queries, shards, k, ties, max_per_query):
    dev = queries.device
    nq = queries.shape[0]
    max_cap = int(_native._C_cuda.max_best_cap)
    if k > max_cap:  # beyond the select's shared memory: the reference, on the GPU
        return reference.similarity_topk(queries, shards, k, ties, max_per_query)
    kdtype = shards[0].dtype if shards else queries.dtype
    qg = queries.contiguous().to(reference.gemm_dtype(queries.dtype, kdtype, dev))
    tile = tile_cols(nq)
    cap = min(k + cuda_slack(k), max_cap) if ties else k
    lv, li, ln = _new_lists(nq, cap, dev)
    if nq:
        _select_pass(qg, shards, tile, cap, False, lv, li, ln)
    if not ties:
        count = ln.clamp(max=k)
        unresolved = torch.zeros(nq, dtype=torch.bool, device=dev)
    else:
        count, unresolved = _resolve(lv, li, ln, k)
    rows = unresolved.nonzero().flatten()
    pieces = []
    if rows.numel():
        # Their own sub-GEMM for both passes (identical calls, so tau and the
        # collected scores agree bit for bit).
        qr = qg[rows]
        dv, di, dn = _new_lists(rows.numel(), k, dev)
        _select_pass(qr, shards, tile, k, True, dv, di, dn)
        tau = dv.gather(1, (dn - 1).clamp(min=0)[:, None]).squeeze(1)
        qrp = reference.pad_queries(qr)
        buf = torch.empty(qrp.shape[0] * tile, dtype=torch.float32, device=dev)
        pad = [None]
        for n0, kt in device_tiles(shards, dev, tile, qg.dtype):
            s = reference.fixed_width_scores(qrp, rows.numel(), kt, tile, buf, pad)
            r, c = (s >= tau[:, None]).nonzero(as_tuple=True)
            pieces.append((rows[r], c + n0, s[r, c]))
        count = count.masked_fill(unresolved, -1)
    collected = reference.sorted_triples(pieces, dev)
    return assemble(lv, li, count, collected, None if ties else k, max_per_query)
