"""Bench: similarity_topk, the first retrieval stage (SPEC.md section 3).

Cases (``scale`` multiplies Q and N), k = 100, ties=True, unit-norm random
embeddings with 5% of the keys duplicated (exact ties, as duplicated captions
give):
- CPU: ``200k`` (Q = 3000, N = 200k, d = 384) and ``1M`` (Q = 3000, N = 1M,
  d = 768), float32 keys (faiss's own format);
- GPU: Q = 3000, N = 4M, d = 1024, float16 keys.

Implementations timed in the same run:
- ``cpp``: the int8 screen with the keys' codes made beforehand
  (``quantize_keys``, as a bank stores them); ``quantize`` is the time to make
  them, once; ``cpp_plain``: ties=False;
- ``faiss``: faiss-cpu IndexFlatIP.search (plain top-k, its own rule), on the
  same number of threads;
- ``torch_topk``: chunked torch matmul + torch.topk (plain, ties arbitrary);
- ``reference``: the dense definition, on the first ``ref_q`` queries only
  (its Q x N float64 matrix would not fit at full size);
- GPU: ``cuda`` (keys device-resident), ``cuda_host`` (keys in pinned host
  memory), ``gemm`` (the screen's float32 GEMM tiles alone);
- ``triton``: the fused screen + filter kernels (keys device-resident), on a
  GPU; on the CPU only under TRITON_INTERPRET=1 and in the first case (the
  interpreter: a check of the row, not a speed).
Every row reports its median time, the time per query, the ratio to faiss
(CPU), the per-query ratio to the reference, TFLOP/s of 2 Q N d, and peak
memory. Checks: the cpp (cuda) result equals the reference's bit for bit on
the reference's queries, and the ``chunked`` backend's (an independent screen)
on every query of the 200k case. Also reported: the screening path this
machine uses and the exact scores computed per query.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from ..ops.similarity_topk import BACKENDS, native, quantize_keys, similarity_topk
from . import harness

# ref_q: the queries the dense reference runs on (its float64 [ref_q, N] matrix)
CASES = {"cpu": {"200k": dict(q=3000, n=200_000, d=384, dtype=torch.float32, ref_q=16),
                 "1M": dict(q=3000, n=1_000_000, d=768, dtype=torch.float32, ref_q=4)},
         "cuda": {"4M": dict(q=3000, n=4_000_000, d=1024, dtype=torch.float16, ref_q=16)}}
K = 100
DUP_FRAC = 0.05


def make_case(device: str, spec: dict, scale: float = 1.0, seed: int = 0):
    """(queries [Q, d] on device, keys [N, d] on device, config dict)."""
    dev = torch.device(device)
    q, n, d = max(1, round(spec["q"] * scale)), max(1, round(spec["n"] * scale)), spec["d"]
    dtype = spec["dtype"]
    g = torch.Generator(device=dev).manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(q, d, generator=g, device=dev), dim=1).to(dtype)
    keys = torch.empty(n, d, dtype=dtype, device=dev)
    step = 1 << 18
    for a in range(0, n, step):  # in slices: a full float32 [N, d] temporary would be 2x the keys
        b = min(n, a + step)
        keys[a:b] = torch.nn.functional.normalize(torch.randn(b - a, d, generator=g, device=dev), dim=1).to(dtype)
    n_dup = int(DUP_FRAC * n)
    if n_dup:
        src = torch.randint(0, n, (n_dup,), generator=g, device=dev)
        dst = torch.randint(0, n, (n_dup,), generator=g, device=dev)
        keys[dst] = keys[src]
    return queries, keys, {"Q": q, "N": n, "d": d, "k": K, "dtype": str(dtype), "dup_frac": DUP_FRAC}


def torch_topk(queries, keys, k, chunk: int = 65536):
    """Stock PyTorch plain top-k: chunked matmul, topk per chunk, merged."""
    best_v = torch.full((queries.shape[0], 0), float("-inf"), device=queries.device)
    best_i = torch.zeros((queries.shape[0], 0), dtype=torch.int64, device=queries.device)
    for a in range(0, keys.shape[0], chunk):
        s = (queries @ keys[a:a + chunk].T).float()
        v, i = s.topk(min(k, s.shape[1]), dim=1)
        best_v, pos = torch.cat([best_v, v], 1).topk(min(k, best_v.shape[1] + v.shape[1]), dim=1)
        best_i = torch.cat([best_i, i + a], 1).gather(1, pos)
    return best_v, best_i


def gemm_tiles(queries, keys):
    """The cuda backend's screening GEMMs alone (the same tiles, float32)."""
    qf = queries.float()
    tile = native.tile_cols(qf.shape[0])
    out = None
    for a in range(0, keys.shape[0], tile):
        out = torch.mm(qf, keys[a:a + tile].float().t())
    return out


def same(a, b) -> bool:
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))


def first_queries(res, m: int):
    """The result of the first m queries of a ragged result."""
    v, i, o, t = res
    end = int(o[m])
    return v[:end], i[:end], o[:m + 1], t[:m]


def run_case(device: str, name: str, spec: dict, scale: float, repeats: int) -> dict:
    dev = torch.device(device)
    queries, keys, cfg = make_case(device, spec, scale)
    nq = cfg["Q"]
    m = min(spec["ref_q"], nq)
    flops = 2.0 * nq * cfg["N"] * cfg["d"]
    impls, nqs, extra, checks = {}, {}, {}, {}
    if dev.type == "cpu":
        codes = None
        if "cpp" in BACKENDS and _runs("cpp", "cpu"):
            impls["quantize"] = lambda: quantize_keys(keys)
            codes = quantize_keys(keys)
            impls["cpp"] = lambda: similarity_topk(queries, keys, K, backend="cpp", quantized=codes)
            impls["cpp_plain"] = lambda: similarity_topk(queries, keys, K, ties=False, backend="cpp", quantized=codes)
        try:
            import faiss  # noqa: PLC0415

            faiss.omp_set_num_threads(torch.get_num_threads())
            index = faiss.IndexFlatIP(cfg["d"])
            index.add(keys.float().numpy())
            qnp = queries.float().numpy()
            impls["faiss"] = lambda: index.search(qnp, K)
            extra["faiss"] = faiss.__version__
        except ImportError:
            pass
    else:
        impls["gemm"] = lambda: gemm_tiles(queries, keys)
        if _runs("cuda", "cuda"):
            impls["cuda"] = lambda: similarity_topk(queries, keys, K, backend="cuda")
            host = keys.cpu().pin_memory()
            impls["cuda_host"] = lambda: similarity_topk(queries, host, K, backend="cuda")
    # on the CPU (the interpreter) the first case only: it checks the row, it is no speed
    if _runs("triton", dev.type) and (dev.type == "cuda" or name == next(iter(CASES["cpu"]))):
        impls["triton"] = lambda: similarity_topk(queries, keys, K, backend="triton")
    impls["torch_topk"] = lambda: torch_topk(queries, keys, K)
    impls["reference"] = lambda: similarity_topk(queries[:m], keys, K, backend="torch")
    nqs["reference"] = m

    rows = []
    for impl, fn in tqdm(list(impls.items()), desc=f"similarity_topk {name}", leave=False):
        peak = harness.peak_extra_memory(fn, dev)  # doubles as the warm-up call
        t = harness.time_fn(fn, device=dev, repeats=repeats, warmup=0, max_seconds=120.0)
        q_rows = nqs.get(impl, nq)
        rows.append({"impl": impl, "Q": q_rows, **{s: t[s] for s in ("median", "min", "max")}, "n": t["n"],
                     "ms_per_query": 1e3 * t["median"] / q_rows,
                     "tflops": 2.0 * q_rows * cfg["N"] * cfg["d"] / t["median"] / 1e12, "peak_mb": peak / 2**20})
    base = {r["impl"]: r for r in rows}
    for r in rows:
        if r["impl"] == "quantize":
            continue
        r["vs_reference"] = base["reference"]["ms_per_query"] / r["ms_per_query"]
        if "faiss" in base:
            r["vs_faiss"] = base["faiss"]["median"] / r["median"]

    fast = "cpp" if "cpp" in impls else ("cuda" if "cuda" in impls else None)
    if fast is not None:
        stats = {}
        run = native.similarity_topk_cpu if fast == "cpp" else native.similarity_topk_cuda
        kw = {"quantized": [codes]} if fast == "cpp" else {}
        res = run(queries, [keys], K, True, None, stats=stats, **kw)
        ref = similarity_topk(queries[:m], keys, K, backend="torch")
        checks[f"{fast}_equals_reference_on_first_{m}_queries"] = same(first_queries(res, m), ref)
        if name == "200k" or scale < 1.0:
            checks[f"{fast}_equals_chunked_on_all_queries"] = same(res, similarity_topk(queries, keys, K,
                                                                                        backend="chunked"))
        sc = stats["rescored"].float()
        counts = res[2].diff().float()
        extra.update(screen_path=stats.get("path", "fp32 GEMM + CUDA select"), passes=stats.get("passes"),
                     rescored_per_query_mean=float(sc.mean()), rescored_per_query_max=float(sc.max()),
                     result_per_query_mean=float(counts.mean()), result_per_query_max=float(counts.max()))
    if "triton" in impls:
        ref = similarity_topk(queries[:m], keys, K, backend="torch")
        res = similarity_topk(queries, keys, K, backend="triton")
        checks[f"triton_equals_reference_on_first_{m}_queries"] = same(first_queries(res, m), ref)
    cfg.update({"case": name, "ties": True, "repeats": repeats, "scale": scale, "flops": flops,
                "reference_queries": m})
    return {"config": cfg, "extra": extra, "checks": checks, "rows": rows}


def _runs(name: str, device_type: str) -> bool:
    from .. import _backend  # noqa: PLC0415

    return _backend.runs(BACKENDS, name, device_type)


def run(device: str = "cpu", scale: float = 1.0, repeats: int = 5) -> dict:
    dev = torch.device(device)
    cases = [run_case(device, name, spec, scale, repeats) for name, spec in CASES[dev.type].items()]
    return {"bench": "similarity_topk", "machine": harness.machine(dev), "cases": cases}


def table(result: dict) -> str:
    blocks = []
    for case in result["cases"]:
        cfg, ex = case["config"], case["extra"]
        head = (f"similarity_topk [{cfg['case']}] on {result['machine']['device']} ({result['machine']['cpu']}): "
                f"Q={cfg['Q']} N={cfg['N']} d={cfg['d']} k={cfg['k']} {cfg['dtype']}, ties=True; "
                f"GEMM floor 2QNd = {cfg['flops'] / 1e12:.2f} TFLOP")
        if "screen_path" in ex:
            head += (f"\n  screen: {ex['screen_path']}; exact scores per query: mean {ex['rescored_per_query_mean']:.0f},"
                     f" max {ex['rescored_per_query_max']:.0f} (result per query: mean "
                     f"{ex['result_per_query_mean']:.1f}, max {ex['result_per_query_max']:.0f})")
        if case["checks"]:
            head += "\n  checks: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in case["checks"].items())
        rows = [{**r, "median_ms": harness.ms(r["median"]), "min_ms": harness.ms(r["min"]),
                 "max_ms": harness.ms(r["max"])} for r in case["rows"]]
        cols = [("impl", "impl"), ("Q", "Q"), ("median_ms", "median ms"), ("min_ms", "min ms"), ("max_ms", "max ms"),
                ("ms_per_query", "ms/query"), ("vs_reference", "x reference/query"), ("tflops", "TFLOP/s"),
                ("peak_mb", "peak MiB")]
        if any("vs_faiss" in r for r in rows):
            cols.insert(6, ("vs_faiss", "x faiss"))
        blocks.append(head + "\n" + harness.format_table(rows, cols))
    return "\n\n".join(blocks)
