"""Bench: similarity_topk, the first retrieval stage (SPEC.md section 3).

Full size (scale 1.0): on the CPU Q = 3000 queries, N = 200k keys, d = 384,
float32; on a GPU Q = 3000, N = 4M, d = 1024, float16. k = 100, ties=True,
unit-norm random embeddings with 5% of the keys duplicated (exact ties, as
duplicated captions give). ``scale`` multiplies Q and N.

Implementations timed:
- ``reference``: the torch backend (two blocked passes; the baseline);
- ``torch_topk``: chunked torch matmul + ``torch.topk`` merged per chunk, the
  plain top-k a user writes with stock PyTorch (ties broken arbitrarily);
- CPU: ``cpp`` (ties=True), ``cpp_plain`` (ties=False) and ``faiss``
  (faiss-cpu IndexFlatIP.search, plain top-k, its native rule);
- GPU: ``cuda`` (keys device-resident), ``cuda_host`` (keys in pinned host
  memory, streamed through the GPU) and ``gemm`` (the tiled score GEMMs alone,
  float32 output: the floor of any exact method).
Each row reports the median time, the ratio to the reference (and to faiss on
the CPU), the achieved TFLOP/s of 2*Q*N*d and, on a GPU, the percentage of
the card's fp16 GEMM rate measured here (a large fp16 matmul); host-resident
rows also compare with the measured host-to-device copy time of the keys.
"""
from __future__ import annotations

import torch

from ..ops.similarity_topk import BACKENDS, reference, similarity_topk
from . import harness

FULL = {"cpu": dict(q=3000, n=200_000, d=384, dtype=torch.float32),
        "cuda": dict(q=3000, n=4_000_000, d=1024, dtype=torch.float16)}
K = 100
DUP_FRAC = 0.05


def make_case(device: str, scale: float = 1.0, seed: int = 0, dtype=None):
    """(queries [Q, d] on device, keys [N, d] on device, config dict)."""
    dev = torch.device(device)
    full = FULL["cuda" if dev.type == "cuda" else "cpu"]
    q, n, d = max(1, round(full["q"] * scale)), max(1, round(full["n"] * scale)), full["d"]
    dtype = dtype or full["dtype"]
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
    """The cuda backend's score GEMMs alone (same tiles, float32 output)."""
    from ..ops.similarity_topk import native  # noqa: PLC0415

    qg = queries.to(reference.gemm_dtype(queries.dtype, keys.dtype, queries.device))
    tile = native.tile_cols(qg.shape[0])
    buf = torch.empty(qg.shape[0] * tile, dtype=torch.float32, device=queries.device)
    for a in range(0, keys.shape[0], tile):
        kt = keys[a:a + tile]
        reference.block_scores(qg, kt, buf[:qg.shape[0] * kt.shape[0]].view(qg.shape[0], kt.shape[0]))
    return buf


def fp16_gemm_tflops(device, n: int = 8192, repeats: int = 5) -> float:
    """The card's measured dense fp16 GEMM rate (fp16 out, fp32 accumulate)."""
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    t = harness.time_fn(lambda: a @ b, device=device, repeats=repeats, warmup=2)
    return 2 * n ** 3 / t["median"] / 1e12


def h2d_seconds(host: torch.Tensor, device, repeats: int = 3) -> float:
    """Measured time to copy ``host`` (pinned) to the device."""
    dst = torch.empty(host.shape, dtype=host.dtype, device=device)
    t = harness.time_fn(lambda: dst.copy_(host, non_blocking=True), device=device, repeats=repeats, warmup=1)
    del dst
    return t["median"]


def run(device: str = "cpu", scale: float = 1.0, repeats: int = 5) -> dict:
    dev = torch.device(device)
    queries, keys, cfg = make_case(device, scale)
    flops = 2.0 * cfg["Q"] * cfg["N"] * cfg["d"]
    from .. import _backend  # noqa: PLC0415

    impls = {
        "reference": lambda: similarity_topk(queries, keys, K, backend="torch"),
        "torch_topk": lambda: torch_topk(queries, keys, K),
    }
    extra = {}
    if dev.type == "cpu":
        if _backend.runs(BACKENDS, "cpp", "cpu"):
            impls["cpp"] = lambda: similarity_topk(queries, keys, K, backend="cpp")
            impls["cpp_plain"] = lambda: similarity_topk(queries, keys, K, ties=False, backend="cpp")
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
        if _backend.runs(BACKENDS, "cuda", "cuda"):
            impls["cuda"] = lambda: similarity_topk(queries, keys, K, backend="cuda")
            host = keys.cpu().pin_memory()
            impls["cuda_host"] = lambda: similarity_topk(queries, host, K, backend="cuda")
            extra["h2d_seconds"] = h2d_seconds(host, dev)
            extra["keys_gb"] = host.numel() * host.element_size() / 1e9
        extra["fp16_gemm_tflops"] = fp16_gemm_tflops(dev)

    rows = []
    for name, fn in impls.items():
        peak = harness.peak_extra_memory(fn, dev)  # doubles as the warm-up call
        t = harness.time_fn(fn, device=dev, repeats=repeats, warmup=0, max_seconds=90.0)
        rows.append({"impl": name, **{k: t[k] for k in ("median", "min", "max")}, "n": t["n"],
                     "tflops": flops / t["median"] / 1e12, "peak_mb": peak / 2**20})
    base = {r["impl"]: r["median"] for r in rows}
    for r in rows:
        r["vs_reference"] = base["reference"] / r["median"]
        if "faiss" in base:
            r["vs_faiss"] = base["faiss"] / r["median"]
        if "torch_topk" in base:
            r["vs_torch_topk"] = base["torch_topk"] / r["median"]
        if "fp16_gemm_tflops" in extra:
            r["pct_fp16_gemm"] = 100.0 * r["tflops"] / extra["fp16_gemm_tflops"]
        if r["impl"] == "cuda_host":
            r["vs_h2d_copy"] = r["median"] / extra["h2d_seconds"]
    res = similarity_topk(queries, keys, K)
    counts = res.offsets.diff().float()
    cfg.update({"ties": True, "repeats": repeats, "scale": scale, "flops": flops,
                "mean_result_per_query": float(counts.mean()), "max_result_per_query": float(counts.max())})
    return {"bench": "similarity_topk", "machine": harness.machine(dev), "config": cfg, "extra": extra, "rows": rows}


def table(result: dict) -> str:
    cfg, ex = result["config"], result["extra"]
    head = (f"similarity_topk on {result['machine']['device']}: Q={cfg['Q']} N={cfg['N']} d={cfg['d']} k={cfg['k']} "
            f"{cfg['dtype']}, ties=True (mean {cfg['mean_result_per_query']:.1f} results/query); "
            f"GEMM floor 2QNd = {cfg['flops'] / 1e12:.2f} TFLOP")
    if "fp16_gemm_tflops" in ex:
        head += f"; measured fp16 GEMM {ex['fp16_gemm_tflops']:.0f} TFLOP/s"
    if "h2d_seconds" in ex:
        head += f"; H2D copy of the keys ({ex['keys_gb']:.1f} GB) {ex['h2d_seconds'] * 1e3:.0f} ms"
    rows = [{**r, "median_ms": harness.ms(r["median"]), "min_ms": harness.ms(r["min"]),
             "max_ms": harness.ms(r["max"])} for r in result["rows"]]
    cols = [("impl", "impl"), ("median_ms", "median ms"), ("min_ms", "min ms"), ("max_ms", "max ms"),
            ("vs_reference", "x reference"), ("tflops", "TFLOP/s"), ("peak_mb", "peak MiB")]
    if any("vs_faiss" in r for r in rows):
        cols.insert(5, ("vs_faiss", "x faiss"))
    if any("vs_torch_topk" in r for r in rows):
        cols.insert(5, ("vs_torch_topk", "x torch_topk"))
    if any("pct_fp16_gemm" in r for r in rows):
        cols.append(("pct_fp16_gemm", "% fp16 GEMM"))
    if any("vs_h2d_copy" in r for r in rows):
        cols.append(("vs_h2d_copy", "x H2D copy"))
    return head + "\n" + harness.format_table(rows, cols)
