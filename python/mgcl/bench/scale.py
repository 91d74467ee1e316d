"""Bench: how a bank grows toward the paper's 18M entries (issue 20, item 4).

For each N in ``SIZES`` (1M, 2M, 4M; ``scale`` shrinks them):
1. Build: a generated jsonl corpus of PubMed-style captions (as in the
   retrieval bench, some repeated verbatim) through ``build_bank`` with the
   hashing embedder at 384-d (MiniLM's width), so the embedding model is not
   the subject: entries per second including reading, sharding, hashing,
   quantised key codes, meta and BM25.
2. Size on disk (every file of the bank), open time (``MemoryBank.open``) and
   the one-time first-read checks (sha256 of shards, codes and meta).
3. Serving: every question of the shipped pool through ``retrieve`` with
   random stored VLM image embeddings (512-d, written beside the bank after
   the build, as the retrieval bench does) and random VLM text features:
   seconds in the dense stage (exact ``similarity_topk``), the rerank
   (image-embedding gather, S_v, caption groups) and BM25; the process's
   resident memory while serving (peak RSS sampled every 50 ms, memory-mapped
   shard pages included) and before opening.
4. The fit: each measured quantity against N by least squares,
   y = a + b N, projected to N = 18M (stated in the output and the JSON).
5. At the largest N: a FAISS ivfpq index (``faiss_index.build_index``
   defaults) against the exact answer: recall@k of its plain top-k (after its
   exact re-scoring) over the exact plain top-k, its build and query times.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time

import numpy as np
import torch

from . import harness

SIZES = (1_000_000, 2_000_000, 4_000_000)
PROJECT_TO = 18_000_000
DIM, VLM_DIM = 384, 512


def _rss() -> int:
    import psutil  # noqa: PLC0415

    return psutil.Process().memory_info().rss


class _PeakRSS:
    """Peak resident memory of this process while the block runs (sampled)."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def _corpus(path: str, n: int) -> None:
    from .retrieval import _captions  # noqa: PLC0415

    with open(path, "w") as fh:
        for i, c in enumerate(_captions(n, seed=1)):
            fh.write(json.dumps({"id": f"fig{i}", "caption": c}) + "\n")


def _attach_random_vlm(path: str, seed: int = 0) -> None:
    """Random unit VLM image embeddings beside the text shards, named in the manifest."""
    from ..retrieval import bank as bank_mod, store  # noqa: PLC0415

    mpath = os.path.join(path, "manifest.json")
    with open(mpath) as fh:
        m = json.load(fh)
    g = torch.Generator().manual_seed(seed)
    shards = [bank_mod.write_shard(path, j, torch.nn.functional.normalize(torch.randn(e["rows"], VLM_DIM, generator=g),
                                                                          dim=1), "vlm", bank_mod.VLM_KEY)
              for j, e in enumerate(m["shards"])]
    m["vlm"] = {"name": "random", "dim": VLM_DIM, "shards": shards}
    store.atomic_write_json(mpath, m)


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def bench_size(n: int, work: str, queries: list[str], vlm_text: torch.Tensor, k: int, k_v: int,
               shard_size: int):
    """One size's row (module doc, 1-3) and the opened bank."""
    from ..retrieval import MemoryBank, build_bank, retrieve  # noqa: PLC0415

    corpus, out = os.path.join(work, "corpus.jsonl"), os.path.join(work, "bank")
    _corpus(corpus, n)
    t0 = time.perf_counter()
    m = build_bank([corpus], out, embedder=f"hashing:{DIM}", shard_size=shard_size, batch_size=256, progress=True)
    build_s = time.perf_counter() - t0
    os.remove(corpus)
    text_bytes = _size(out)
    _attach_random_vlm(out)
    rss_before = _rss()
    t0 = time.perf_counter()
    bank = MemoryBank.open(out)
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bank.check()
    checks_s = time.perf_counter() - t0
    bank.quantized_keys()
    retrieve(bank, queries[:8], k, vlm=object(), k_v=k_v, vlm_text=vlm_text[:8])  # warm-up: one-time self-checks
    timings: dict[str, float] = {}
    stats: dict[str, int] = {}
    with _PeakRSS() as mem:
        t0 = time.perf_counter()
        retrieve(bank, queries, k, vlm=object(), k_v=k_v, timings=timings, vlm_text=vlm_text, stats=stats)
        serve_s = time.perf_counter() - t0
    row = {"entries": m["count"], "build_s": build_s, "build_entries_per_s": m["count"] / build_s,
           "bytes_on_disk": _size(out), "bytes_text_bank": text_bytes, "open_s": open_s,
           "first_read_checks_s": checks_s,
           "rss_before_open": rss_before, "rss_peak_serving": mem.peak, "serve_s": serve_s,
           "dense_s": timings.get("dense", 0.0),
           "rerank_s": sum(timings.get(s, 0.0) for s in ("vlm_image", "visual", "group")),
           "bm25_s": timings.get("bm25", 0.0), "stages": timings,
           "candidates_per_query": {key: v / len(queries) for key, v in stats.items() if key != "gated_queries"}}
    return row, bank


def bench_faiss(bank, queries: list[str], k: int) -> dict:
    from ..retrieval.faiss_index import build_index  # noqa: PLC0415
    from ..retrieval.search import query_embeddings, topk  # noqa: PLC0415

    q = query_embeddings(bank, queries)
    t0 = time.perf_counter()
    entry = build_index(bank, "ivfpq")
    index_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev, ei, eo = topk(bank, q, k, False)
    exact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fv, fi, fo = topk(bank, q, k, False, backend="faiss")
    faiss_s = time.perf_counter() - t0
    found = [len(set(ei[eo[i]:eo[i + 1]]) & set(fi[fo[i]:fo[i + 1]])) / max(1, eo[i + 1] - eo[i])
             for i in range(len(eo) - 1)]
    params = {key: v for key, v in entry.items() if key not in ("kind", "path", "sha256")}
    return {"kind": "ivfpq", "params": params, "k": k, "queries": len(queries),
            "index_build_s": index_s, "faiss_s": faiss_s, "exact_s": exact_s, f"recall_at_{k}": float(np.mean(found)),
            "recall_min": float(np.min(found))}


def fit(ns: list[int], ys: list[float], at: int = PROJECT_TO) -> dict:
    """Least squares y = a + b N over the measured sizes, and y at ``at``."""
    b, a = np.polyfit(np.asarray(ns, dtype=np.float64), np.asarray(ys, dtype=np.float64), 1)
    return {"model": "y = a + b*N (least squares over the measured N)", "a": float(a), "b": float(b),
            "at": at, "projected": float(a + b * at)}


FITTED = ("build_s", "bytes_on_disk", "open_s", "first_read_checks_s", "rss_peak_serving", "dense_s", "rerank_s",
          "bm25_s", "serve_s")


def run(device: str = "cpu", scale: float = 1.0, repeats: int = 1, k: int = 30, k_v: int = 2) -> dict:
    """``scale`` shrinks every N (1M, 2M, 4M times scale, at least 2,000);
    one serving pass per size (``repeats`` unused: each pass takes minutes)."""
    from ..retrieval import load_pool  # noqa: PLC0415

    if device != "cpu":
        raise ValueError("bench scale: the bank is served on the CPU here (--device cpu)")
    sizes = [max(2000, int(n * scale)) for n in SIZES]
    queries = [q.text for q in load_pool()]
    g = torch.Generator().manual_seed(1)
    vlm_text = torch.nn.functional.normalize(torch.randn(len(queries), VLM_DIM, generator=g), dim=1)
    rows, faiss_row = [], None
    for n in sizes:
        work = tempfile.mkdtemp(prefix="mgcl-bench-scale-")
        try:
            row, bank = bench_size(n, work, queries, vlm_text, k, k_v, shard_size=max(1000, min(250_000, n // 8)))
            print(f"scale: {n:,} entries: build {row['build_s']:.0f} s, serve {row['serve_s']:.1f} s", flush=True)
            rows.append(row)
            if n == sizes[-1]:
                faiss_row = bench_faiss(bank, queries, k)
            del bank
        finally:
            shutil.rmtree(work, ignore_errors=True)
    ns = [r["entries"] for r in rows]
    fits = {key: fit(ns, [r[key] for r in rows]) for key in FITTED} if len(rows) >= 2 else {}
    return {"bench": "scale", "machine": harness.machine(device),
            "config": {"scale": scale, "sizes": sizes, "dim": DIM, "vlm_dim": VLM_DIM, "embedder": f"hashing:{DIM}",
                       "k": k, "k_v": k_v, "queries": len(queries), "project_to": PROJECT_TO},
            "sizes": rows, "fit": fits, "faiss": faiss_row}


def table(result: dict) -> str:
    cfg = result["config"]
    m = result["machine"]
    lines = [f"scale bench on {m['device']} ({m['cpu']}, {m['torch_threads']} torch threads): banks built with "
             f"{cfg['embedder']}, {cfg['queries']} pool queries, k={cfg['k']}, k_v={cfg['k_v']}"]
    rows = [{**r, "GiB": r["bytes_on_disk"] / 2**30, "rss_GiB": r["rss_peak_serving"] / 2**30} for r in result["sizes"]]
    lines.append(harness.format_table(rows, [("entries", "entries"), ("build_entries_per_s", "build/s"),
                                             ("GiB", "disk GiB"), ("open_s", "open s"),
                                             ("first_read_checks_s", "checks s"), ("rss_GiB", "RSS GiB"),
                                             ("dense_s", "dense s"), ("rerank_s", "rerank s"), ("bm25_s", "bm25 s"),
                                             ("serve_s", "serve s")]))
    if result["fit"]:
        lines.append(f"projection to N = {cfg['project_to']:,} (y = a + b*N, least squares over the measured N):")
        for key, f in result["fit"].items():
            v = f["projected"] / 2**30 if key in ("bytes_on_disk", "rss_peak_serving") else f["projected"]
            unit = "GiB" if key in ("bytes_on_disk", "rss_peak_serving") else "s"
            lines.append(f"  {key}: {v:,.2f} {unit}  (a={f['a']:.4g}, b={f['b']:.4g} per entry)")
    f = result.get("faiss")
    if f:
        recall = f[f"recall_at_{f['k']}"]
        lines.append(f"FAISS ivfpq at {result['sizes'][-1]['entries']:,} ({f['params']}): recall@{f['k']} "
                     f"{recall:.3f} (min {f['recall_min']:.2f}) against the exact plain top-"
                     f"{f['k']}; {f['queries']} queries: faiss {f['faiss_s']:.2f} s, exact {f['exact_s']:.2f} s; "
                     f"index build {f['index_build_s']:.0f} s")
    return "\n".join(lines)
