"""similarity_topk: the reference (baseline, on its first queries only),
stock torch chunked matmul + topk, cpp (int8 screen, ties=True and plain, key
codes made beforehand) and faiss-cpu IndexFlatIP on the CPU; cuda with keys
device-resident and host-resident, and the screen's GEMMs alone, on a GPU.
Sizes: mgcl.bench.similarity_topk's first case per device (scale 1.0 = Q 3000,
N 200k, d 384 on the CPU; Q 3000, N 4M, d 1024 fp16 on a GPU).

    pytest benches/bench_similarity_topk.py --benchmark-json=topk.json
    MGCL_BENCH_SCALE=1.0 pytest benches/bench_similarity_topk.py   # full size
"""
import pytest
import torch

from conftest import bench_devices, bench_scale
from mgcl import _backend
from mgcl.bench.similarity_topk import CASES, K, gemm_tiles, make_case, torch_topk
from mgcl.ops.similarity_topk import BACKENDS, quantize_keys, similarity_topk

_CASES = {}


def case(device):
    scale = bench_scale(device)
    key = (device, scale)
    if key not in _CASES:
        _CASES.clear()
        spec = next(iter(CASES[device].values()))
        queries, keys, cfg = make_case(device, spec, scale)
        codes = quantize_keys(keys) if device == "cpu" and _backend.runs(BACKENDS, "cpp", "cpu") else None
        _CASES[key] = (queries, keys, cfg, codes, spec["ref_q"])
    return _CASES[key]


def impl(name, device):
    queries, keys, cfg, codes, ref_q = case(device)
    if name == "reference":
        return lambda: similarity_topk(queries[:ref_q], keys, K, backend="torch")
    if name == "torch_topk":
        return lambda: torch_topk(queries, keys, K)
    if name == "cpp":
        return lambda: similarity_topk(queries, keys, K, backend="cpp", quantized=codes)
    if name == "cpp_plain":
        return lambda: similarity_topk(queries, keys, K, ties=False, backend="cpp", quantized=codes)
    if name == "faiss":
        faiss = pytest.importorskip("faiss")
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatIP(cfg["d"])
        index.add(keys.float().numpy())
        qnp = queries.float().numpy()
        return lambda: index.search(qnp, K)
    if name == "gemm":
        return lambda: gemm_tiles(queries, keys)
    if name == "cuda":
        return lambda: similarity_topk(queries, keys, K, backend="cuda")
    if name == "cuda_host":
        host = keys.cpu().pin_memory()
        return lambda: similarity_topk(queries, host, K, backend="cuda")
    raise ValueError(name)


NAMES = {"cpu": ["reference", "torch_topk", "cpp", "cpp_plain", "faiss"],
         "cuda": ["reference", "torch_topk", "gemm", "cuda", "cuda_host"]}


@pytest.mark.parametrize("device", bench_devices())
@pytest.mark.parametrize("name", sorted({n for v in NAMES.values() for n in v}))
def test_similarity_topk(run_bench, benchmark, device, name):
    if name not in NAMES[device]:
        pytest.skip(f"{name} is not a {device} implementation")
    if name.startswith("cpp") and not _backend.runs(BACKENDS, "cpp", device):
        pytest.skip("cpp not available")
    if name.startswith("cuda") and not _backend.runs(BACKENDS, "cuda", device):
        pytest.skip("cuda not available")
    benchmark.group = f"similarity_topk-{device}"
    fn = impl(name, device)
    _, _, cfg, _, ref_q = case(device)
    benchmark.extra_info.update(cfg)
    benchmark.extra_info["reference_queries"] = ref_q
    benchmark.extra_info["flops"] = 2.0 * cfg["Q"] * cfg["N"] * cfg["d"]
    run_bench(fn, device, rounds=3)
