"""Bench: the retrieval engine end to end.

1. Build throughput: a generated corpus of PubMed-style captions (pool
   questions with figure-style suffixes, some repeated verbatim) embedded into
   a bank with the MiniLM embedder (and the hashing embedder for comparison),
   entries per second including reading, sharding, hashing, meta and BM25.
2. Serving: every question of the shipped pool (>= 3,000 queries) against a
   bank of ``1,000,000 * scale`` entries with random unit text embeddings
   (384-d, MiniLM's width; entries that share a caption share the row, as a
   real build would make them) and random stored VLM image embeddings (512-d),
   through the multi-stage pipeline (``rerank.retrieve``): MiniLM query
   embedding, exact dense search (``similarity_topk``, ties kept), stored
   image-embedding gather, S_v, caption groups, BM25 gate, final sort.
   The VLM text features of the queries are random unit vectors: the cost of a
   VLM's text tower belongs to the model, not to retrieval. The bank's
   one-time integrity checks run before the timed passes (part 3 times them).
3. Open: ``MemoryBank.open`` and the first query of a fresh process's view of
   the bank (which checks the sha256 of the text shards and meta.parquet on
   that first read), a second query (checks done), and ``verify()`` (every
   file hashed and scanned for NaN). The files are in the page cache (just
   written), so this is the hashing cost, not the disk's.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch

from . import harness

SUFFIXES = ["", " (arrow)", " in a 54-year-old man", " in a 31-year-old woman", ", follow-up after 6 months",
            ", scale bar 100 um", " (case 2)", ", before treatment", ", after treatment", " (A-C)"]


def _captions(n: int, seed: int) -> list[str]:
    from ..retrieval import load_pool  # noqa: PLC0415

    pool = [q.text for q in load_pool()]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if out and rng.random() < 0.2:
            out.append(rng.choice(out))  # a caption reused verbatim (subfigures, reprints)
        else:
            out.append(f"Figure {i % 7 + 1}{'ABCDEF'[i % 6]}. " + rng.choice(pool) + rng.choice(SUFFIXES)
                       + f" [PMC{1_000_000 + i}]")
    return out


def bench_open(bank_path: str, device: str, query: str = "chest x-ray showing a pneumothorax", k: int = 30) -> dict:
    import pyarrow.parquet  # noqa: F401, PLC0415 - imports kept out of the timings

    from ..ops.similarity_topk import similarity_topk  # noqa: F401, PLC0415
    from ..retrieval import MemoryBank  # noqa: PLC0415
    from ..retrieval.embedders import get_embedder  # noqa: PLC0415

    emb = get_embedder("minilm", device=device)
    q = torch.from_numpy(emb.encode([query], 1))  # the query's embedding kept out of the timing
    t0 = time.perf_counter()
    bank = MemoryBank.open(bank_path, embedder=emb, device=device)
    t1 = time.perf_counter()
    first = bank.search(q, k)
    t2 = time.perf_counter()
    again = bank.search(q, k)
    t3 = time.perf_counter()
    assert [h.index for h in first[0]] == [h.index for h in again[0]]
    fresh = MemoryBank.open(bank_path, embedder=emb, device=device)
    t4 = time.perf_counter()
    fresh.check([e["path"] for e in fresh.manifest["shards"]] + [fresh.manifest["meta"]["path"]])
    t5 = time.perf_counter()
    fresh.verify()
    t6 = time.perf_counter()
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(bank_path) for f in fs)
    return {"open_s": t1 - t0, "first_query_s": t2 - t1, "second_query_s": t3 - t2,
            "first_read_checks_s": t5 - t4, "verify_s": t6 - t5, "bank_bytes": size}


def bench_build(n: int, embedder: str, device: str, work: str, batch_size: int = 64) -> dict:
    from ..retrieval import build_bank  # noqa: PLC0415
    from ..retrieval.embedders import get_embedder  # noqa: PLC0415

    corpus = os.path.join(work, f"corpus-{embedder.replace(':', '_')}.jsonl")
    with open(corpus, "w") as fh:
        for i, c in enumerate(_captions(n, seed=1)):
            fh.write(json.dumps({"id": f"fig{i}", "caption": c}) + "\n")  # text only: no image to check
    emb = get_embedder(embedder, device=device)  # model load kept out of the timing
    emb.encode(["warm up"], 1)
    out = os.path.join(work, f"bank-{embedder.replace(':', '_')}")
    t0 = time.perf_counter()
    m = build_bank([corpus], out, embedder=emb, shard_size=max(1, n // 4), batch_size=batch_size, device=device,
                   progress=False)
    dt = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"embedder": emb.name, "entries": m["count"], "seconds": dt, "entries_per_s": m["count"] / dt,
            "batch_size": batch_size}


def make_serving_bank(path: str, n: int, dim: int = 384, vlm_dim: int = 512, seed: int = 0,
                      shard_size: int = 250_000) -> dict:
    """A bank of ``n`` random entries written shard by shard (bounded memory)."""
    from ..retrieval import bank as bank_mod  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    caps = _captions(n, seed=seed)
    owner = bank_mod.group_ids(caps)  # the first entry with the same caption
    os.makedirs(path, exist_ok=True)
    shards, vshards = [], []
    g = torch.Generator().manual_seed(seed)
    repeat = np.nonzero(owner != np.arange(n))[0]
    referenced = np.unique(owner[repeat])
    saved = {}  # rows of captions repeated in a later shard
    for j, s in enumerate(range(0, n, shard_size)):
        e = min(n, s + shard_size)
        blk = torch.nn.functional.normalize(torch.randn(e - s, dim, generator=g), dim=1)
        # an entry repeating an earlier caption gets that caption's row, as a real build would
        for r in repeat[(repeat >= s) & (repeat < e)]:
            src = int(owner[r])
            blk[r - s] = saved[src] if src < s else blk[src - s]
        for i in referenced[(referenced >= s) & (referenced < e)]:
            saved[int(i)] = blk[int(i) - s].clone()
        shards.append(bank_mod.write_shard(path, j, blk))
        v = torch.nn.functional.normalize(torch.randn(e - s, vlm_dim, generator=g), dim=1)
        vshards.append(bank_mod.write_shard(path, j, v, "vlm", bank_mod.VLM_KEY))
    bank_mod.finalize(path, ids=[f"e{i}" for i in range(n)], captions=caps, images=[f"/img/e{i}.jpg" for i in range(n)],
                      domains=[""] * n, shards=shards, dim=dim, embedder="minilm",
                      vlm={"name": "random", "dim": vlm_dim, "shards": vshards}, build={"source": "bench"})
    return {"entries": n, "distinct_captions": int((owner == np.arange(n)).sum())}


def bench_serve(bank_path: str, device: str, k: int, k_v: int, repeats: int, vlm_dim: int = 512) -> dict:
    from ..retrieval import MemoryBank, load_pool, retrieve  # noqa: PLC0415
    from ..retrieval.embedders import get_embedder  # noqa: PLC0415

    queries = [q.text for q in load_pool()]
    emb = get_embedder("minilm", device=device)
    emb.encode(["warm up"], 1)
    bank = MemoryBank.open(bank_path, embedder=emb, device=device)
    bank.check()  # the one-time first-read checks of every file, here rather than in the timings (bench_open)
    codes = bank.quantized_keys()  # stored at build: memory-mapped here, not made
    g = torch.Generator().manual_seed(1)
    vlm_text = torch.nn.functional.normalize(torch.randn(len(queries), vlm_dim, generator=g), dim=1)

    # A VLM stand-in: with vlm_text given and the image embeddings stored,
    # retrieve calls none of its methods, only its presence turns on S_v.
    vlm = object()
    runs = []
    for _ in range(repeats):
        timings: dict[str, float] = {}
        stats: dict[str, int] = {}
        harness.sync(device)
        t0 = time.perf_counter()
        retrieve(bank, queries, k, vlm=vlm, k_v=k_v, timings=timings, vlm_text=vlm_text, stats=stats)
        harness.sync(device)
        timings["total"] = time.perf_counter() - t0
        runs.append(timings)
    stages = {s: statistics.median(r.get(s, 0.0) for r in runs) for s in runs[0]}
    from ..ops.similarity_topk import BACKENDS, native  # noqa: PLC0415
    from .. import _backend  # noqa: PLC0415

    backend = _backend.select("similarity_topk", BACKENDS, torch.device(device))
    return {"dense_s": stages["dense"], "screen_path": native.screen_path() if backend == "cpp" else backend,
            "stored_codes": codes is not None and bool(bank.manifest.get("quantized")),
            "queries": len(queries), "k": k, "k_v": k_v, "repeats": len(runs), "stages": stages,
            "per_query_ms": stages["total"] / len(queries) * 1e3,
            "candidates_per_query": {kk: v / len(queries) for kk, v in stats.items() if kk != "gated_queries"},
            "gated_queries": stats.get("gated_queries", 0),
            "topk_backend": backend}


def run(device: str = "cpu", scale: float = 1.0, repeats: int = 5, k: int = 30, k_v: int = 2) -> dict:
    """``scale`` shrinks both parts (build corpus 2,000 * scale captions, bank
    1,000,000 * scale entries); serving repeats are capped at 1 past 200k entries."""
    n_build = max(64, int(2000 * scale))
    n_bank = max(1000, int(1_000_000 * scale))
    work = tempfile.mkdtemp(prefix="mgcl-bench-retrieval-")
    try:
        build_rows = [bench_build(n_build, "minilm", device, work), bench_build(n_build, "hashing:384", device, work)]
        t0 = time.perf_counter()
        bank_info = make_serving_bank(os.path.join(work, "serve"), n_bank)
        setup_s = time.perf_counter() - t0
        opened = bench_open(os.path.join(work, "serve"), device, k=k)
        serve = bench_serve(os.path.join(work, "serve"), device, k, k_v,
                            repeats=1 if n_bank > 200_000 else max(1, repeats))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"bench": "retrieval", "machine": harness.machine(device),
            "config": {"scale": scale, "build_captions": n_build, "bank_entries": n_bank, "k": k, "k_v": k_v,
                       "repeats": repeats, **bank_info, "bank_write_seconds": setup_s},
            "build": build_rows, "open": opened, "serve": serve}


def table(result: dict) -> str:
    cfg, s = result["config"], result["serve"]
    lines = [f"retrieval bench on {result['machine']['device']} ({result['machine']['cpu']}, "
             f"{result['machine']['torch_threads']} torch threads)",
             f"build: {cfg['build_captions']} captions -> bank (jsonl read, embed, fp16 shards, sha256, meta, BM25)"]
    lines.append(harness.format_table(result["build"], [("embedder", "embedder"), ("entries", "entries"),
                                                        ("seconds", "seconds"), ("entries_per_s", "entries/s")]))
    lines.append(f"serve: {s['queries']} pool queries vs {cfg['bank_entries']:,} entries "
                 f"({cfg['distinct_captions']:,} distinct captions), k={s['k']}, k_v={s['k_v']}, "
                 f"similarity_topk backend {s['topk_backend']}, median of {s['repeats']} run(s)")
    c = s["candidates_per_query"]
    lines.append(f"candidates per query: dense {c['dense']:.1f} -> grouped {c['grouped']:.1f} -> final "
                 f"{c['final']:.1f}; BM25 gate applied to {s['gated_queries']} queries")
    total = s["stages"]["total"]
    rows = [{"stage": k, "seconds": v, "pct": 100 * v / total if total else 0.0} for k, v in s["stages"].items()]
    lines.append(harness.format_table(rows, [("stage", "stage"), ("seconds", "seconds"), ("pct", "% of total")]))
    lines.append(f"per query: {s['per_query_ms']:.2f} ms end to end")
    lines.append(f"dense stage (exact similarity_topk, {s['topk_backend']} backend, screen {s['screen_path']}, "
                 f"{'stored' if s['stored_codes'] else 'no stored'} int8 key codes): {s['dense_s']:.2f} s, "
                 f"{s['dense_s'] / s['queries'] * 1e3:.2f} ms per query")
    o = result.get("open")
    if o:
        lines.append(f"open + first query ({o['bank_bytes'] / 2**30:.2f} GiB bank, page-cached): open "
                     f"{o['open_s'] * 1e3:.1f} ms, first query {o['first_query_s']:.2f} s (its first-read sha256 "
                     f"checks of the text shards and meta alone: {o['first_read_checks_s']:.2f} s), second query "
                     f"{o['second_query_s']:.2f} s; verify everything {o['verify_s']:.2f} s")
    return "\n".join(lines)
