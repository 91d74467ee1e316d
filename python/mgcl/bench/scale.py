"""Bench: how a bank grows toward the paper's 18M entries (issue 20, item 4).

For each N in ``SIZES`` (1M, 2M, 4M; ``scale`` shrinks them):
1. Build: a generated jsonl corpus of PubMed-style captions (as in the
   retrieval bench, some repeated verbatim) through ``build_bank`` with the
   hashing embedder at 384-d (MiniLM's width), so the embedding model is not
   the subject: entries per second including reading, sharding, hashing,
   quantised key codes, meta and BM25; the build process's peak RSS (the
   kernel's ru_maxrss) and its RSS before ``build_bank``.
2. Size on disk (every file of the bank), open time (``MemoryBank.open``) and
   the one-time first-read checks (sha256 of shards, codes and meta).
3. Serving: every question of the shipped pool through ``retrieve`` with
   random stored VLM image embeddings (512-d, written beside the bank after
   the build, as the retrieval bench does) and random VLM text features:
   seconds in the dense stage (exact ``similarity_topk``), the rerank
   (image-embedding gather, S_v, caption groups) and BM25; the serving
   process's resident memory while serving (peak RSS sampled every 50 ms,
   memory-mapped shard pages included, with its anonymous / file-backed split
   at that sample; the kernel's VmHWM over the pass where it can be reset) and
   before opening; a sha256 of every hit, to compare runs.
4. The fit: each measured quantity against N by least squares,
   y = a + b N, projected to N = 18M (stated in the output and the JSON).
5. At the largest N: a FAISS ivfpq index (``faiss_index.build_index``
   defaults) against the exact answer: recall@k of its plain top-k (after its
   exact re-scoring) over the exact plain top-k, its build and query times.

The corpus, the build and the serving (with FAISS) each run in a fresh
``python -m mgcl.bench.scale`` process, so one stage's leftovers (the build's
Python lists, the corpus strings) are not counted in another's memory.
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
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self):
        self.peak, self.at_peak, self._stop = 0, {}, threading.Event()
        self._sample()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _sample(self):
        status = _status()
        rss = status.get("VmRSS") or _rss()  # one read: the split adds up to this RSS (less shmem)
        if rss > self.peak:
            self.peak, self.at_peak = rss, status  # RssAnon / RssFile at the peak sample (Linux)

    def _run(self):
        while not self._stop.wait(0.05):
            self._sample()

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()


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


def _status() -> dict:
    """VmRSS, RssAnon, RssFile and VmHWM of this process in bytes ({} off Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, v = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _maxrss() -> int:
    """This process's peak RSS so far in bytes (ru_maxrss is in KiB on Linux)."""
    import resource  # noqa: PLC0415

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(stage: str, **args) -> dict:
    """Run ``stage`` in a fresh ``python -m mgcl.bench.scale`` process; its result dict."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    out = os.path.join(args["work"], f"{stage}.json")
    cmd = [sys.executable, "-m", "mgcl.bench.scale", stage, json.dumps(args), out]
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench scale: the {stage} process exited with status {done.returncode}")
    with open(out) as fh:
        return json.load(fh)


def _stage_corpus(work: str, n: int) -> dict:
    _corpus(os.path.join(work, "corpus.jsonl"), n)
    return {}


def _stage_build(work: str, shard_size: int) -> dict:
    from ..retrieval import build_bank  # noqa: PLC0415

    corpus, out = os.path.join(work, "corpus.jsonl"), os.path.join(work, "bank")
    rss_before = _rss()
    t0 = time.perf_counter()
    m = build_bank([corpus], out, embedder=f"hashing:{DIM}", shard_size=shard_size, batch_size=256, progress=True)
    build_s = time.perf_counter() - t0
    return {"entries": m["count"], "build_s": build_s, "build_rss_before": rss_before, "build_rss_peak": _maxrss()}


def _hits_sha256(results) -> str:
    import hashlib  # noqa: PLC0415

    return hashlib.sha256(repr([[(h.id, h.caption, h.domain, h.image, h.score, h.index, h.group, h.dense, h.visual,
                                  h.bm25) for h in hits] for hits in results]).encode()).hexdigest()


def _stage_serve(work: str, k: int, k_v: int, faiss: bool) -> dict:
    """Module doc, 3 (and 5 when ``faiss``) on the bank in ``work``, in this fresh process."""
    from ..retrieval import MemoryBank, retrieve  # noqa: PLC0415

    queries, vlm_text = _queries()
    out = os.path.join(work, "bank")
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
    hwm_reset = harness._reset_hwm()  # VmHWM from here on is this pass's peak
    with _PeakRSS() as mem:
        t0 = time.perf_counter()
        results = retrieve(bank, queries, k, vlm=object(), k_v=k_v, timings=timings, vlm_text=vlm_text, stats=stats)
        serve_s = time.perf_counter() - t0
    after = _status()
    row = {"open_s": open_s, "first_read_checks_s": checks_s,
           "rss_before_open": rss_before, "rss_peak_serving": mem.peak,
           "rss_peak_serving_anon": mem.at_peak.get("RssAnon"), "rss_peak_serving_file": mem.at_peak.get("RssFile"),
           "rss_hwm_serving": after.get("VmHWM") if hwm_reset else None,
           "rss_after_serving_anon": after.get("RssAnon"), "rss_after_serving_file": after.get("RssFile"),
           "serve_s": serve_s,
           "dense_s": timings.get("dense", 0.0),
           "rerank_s": sum(timings.get(s, 0.0) for s in ("vlm_image", "visual", "group")),
           "bm25_s": timings.get("bm25", 0.0), "stages": timings,
           "candidates_per_query": {key: v / len(queries) for key, v in stats.items() if key != "gated_queries"},
           "hits_sha256": _hits_sha256(results)}
    del results
    return {"row": row, "faiss": bench_faiss(bank, queries, k) if faiss else None}


def _queries():
    """The pool's questions and their random unit VLM text features (seeded)."""
    from ..retrieval import load_pool  # noqa: PLC0415

    queries = [q.text for q in load_pool()]
    g = torch.Generator().manual_seed(1)
    return queries, torch.nn.functional.normalize(torch.randn(len(queries), VLM_DIM, generator=g), dim=1)


def bench_size(n: int, work: str, k: int, k_v: int, shard_size: int, faiss: bool = False):
    """One size's row (module doc, 1-3; each stage in a fresh process) and,
    with ``faiss``, the FAISS row (module doc, 5) on the same bank."""
    _child("corpus", work=work, n=n)
    row = _child("build", work=work, shard_size=shard_size)
    row["build_entries_per_s"] = row["entries"] / row["build_s"]
    os.remove(os.path.join(work, "corpus.jsonl"))
    out = os.path.join(work, "bank")
    row["bytes_text_bank"] = _size(out)
    _attach_random_vlm(out)
    row["bytes_on_disk"] = _size(out)
    served = _child("serve", work=work, k=k, k_v=k_v, faiss=faiss)
    return {**row, **served["row"]}, served["faiss"]


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


FITTED = ("build_s", "build_rss_peak", "bytes_on_disk", "open_s", "first_read_checks_s", "rss_peak_serving", "dense_s",
          "rerank_s", "bm25_s", "serve_s")


def run(device: str = "cpu", scale: float = 1.0, repeats: int = 1, k: int = 30, k_v: int = 2) -> dict:
    """``scale`` shrinks every N (1M, 2M, 4M times scale, at least 2,000);
    one serving pass per size (``repeats`` unused: each pass takes minutes)."""
    if device != "cpu":
        raise ValueError("bench scale: the bank is served on the CPU here (--device cpu)")
    from ..retrieval import load_pool  # noqa: PLC0415

    sizes = [max(2000, int(n * scale)) for n in SIZES]
    n_queries = len(load_pool())
    rows, faiss_row = [], None
    for n in sizes:
        work = tempfile.mkdtemp(prefix="mgcl-bench-scale-")
        try:
            row, f = bench_size(n, work, k, k_v, shard_size=max(1000, min(250_000, n // 8)), faiss=n == sizes[-1])
            print(f"scale: {n:,} entries: build {row['build_s']:.0f} s, serve {row['serve_s']:.1f} s", flush=True)
            rows.append(row)
            faiss_row = f if f is not None else faiss_row
        finally:
            shutil.rmtree(work, ignore_errors=True)
    ns = [r["entries"] for r in rows]
    fits = {key: fit(ns, [r[key] for r in rows]) for key in FITTED} if len(rows) >= 2 else {}
    return {"bench": "scale", "machine": harness.machine(device),
            "config": {"scale": scale, "sizes": sizes, "dim": DIM, "vlm_dim": VLM_DIM, "embedder": f"hashing:{DIM}",
                       "k": k, "k_v": k_v, "queries": n_queries, "project_to": PROJECT_TO,
                       "processes": "corpus, build and serving (with FAISS) each in a fresh process"},
            "sizes": rows, "fit": fits, "faiss": faiss_row}


def table(result: dict) -> str:
    cfg = result["config"]
    m = result["machine"]
    lines = [f"scale bench on {m['device']} ({m['cpu']}, {m['torch_threads']} torch threads): banks built with "
             f"{cfg['embedder']}, {cfg['queries']} pool queries, k={cfg['k']}, k_v={cfg['k_v']}"
             + (f"; {cfg['processes']}" if "processes" in cfg else "")]
    rows = [{**r, "GiB": r["bytes_on_disk"] / 2**30, "rss_GiB": r["rss_peak_serving"] / 2**30,
             "build_rss_GiB": r["build_rss_peak"] / 2**30 if "build_rss_peak" in r else None,
             "anon_GiB": r["rss_peak_serving_anon"] / 2**30 if r.get("rss_peak_serving_anon") else None}
            for r in result["sizes"]]
    lines.append(harness.format_table(rows, [("entries", "entries"), ("build_entries_per_s", "build/s"),
                                             ("build_rss_GiB", "build RSS GiB"),
                                             ("GiB", "disk GiB"), ("open_s", "open s"),
                                             ("first_read_checks_s", "checks s"), ("rss_GiB", "RSS GiB"),
                                             ("anon_GiB", "anon GiB"),
                                             ("dense_s", "dense s"), ("rerank_s", "rerank s"), ("bm25_s", "bm25 s"),
                                             ("serve_s", "serve s")]))
    if result["fit"]:
        lines.append(f"projection to N = {cfg['project_to']:,} (y = a + b*N, least squares over the measured N):")
        for key, f in result["fit"].items():
            in_bytes = key in ("bytes_on_disk", "rss_peak_serving", "build_rss_peak")
            v = f["projected"] / 2**30 if in_bytes else f["projected"]
            unit = "GiB" if in_bytes else "s"
            lines.append(f"  {key}: {v:,.2f} {unit}  (a={f['a']:.4g}, b={f['b']:.4g} per entry)")
    f = result.get("faiss")
    if f:
        recall = f[f"recall_at_{f['k']}"]
        lines.append(f"FAISS ivfpq at {result['sizes'][-1]['entries']:,} ({f['params']}): recall@{f['k']} "
                     f"{recall:.3f} (min {f['recall_min']:.2f}) against the exact plain top-"
                     f"{f['k']}; {f['queries']} queries: faiss {f['faiss_s']:.2f} s, exact {f['exact_s']:.2f} s; "
                     f"index build {f['index_build_s']:.0f} s")
    return "\n".join(lines)


_STAGES = {"corpus": _stage_corpus, "build": _stage_build, "serve": _stage_serve}

if __name__ == "__main__":  # one stage in a fresh process: python -m mgcl.bench.scale STAGE ARGS_JSON OUT_JSON
    import sys

    _stage, _args, _out = sys.argv[1:4]
    _result = _STAGES[_stage](**json.loads(_args))
    with open(_out, "w") as _fh:
        json.dump(_result, _fh)
