"""fisher_guard over the ViT-B/16 parameter shapes: the per-parameter loop
(reference, the baseline), torch._foreach, cpp (CPU) and cuda (GPU).

    pytest benches/bench_fisher_guard.py --benchmark-json=fg.json
    MGCL_BENCH_SCALE=1.0 pytest benches/bench_fisher_guard.py   # full size
"""
import pytest

from conftest import bench_devices, bench_scale
from mgcl import _backend
from mgcl.bench.fisher_guard import foreach_dfg, make_case
from mgcl.ops.fisher_guard import BACKENDS, fisher_guard, reference

LAM = 1e-3


def impl(name, grads, params, anchors):
    if name == "loop":
        return lambda: reference.fisher_guard(grads, params, anchors, None, LAM, "dfg", 0.0, None)
    if name == "foreach":
        return lambda: foreach_dfg(grads, params, anchors, LAM)
    return lambda: fisher_guard(grads, params, anchors, lam=LAM, backend=name)


@pytest.mark.parametrize("device", bench_devices())
@pytest.mark.parametrize("name", ["loop", "foreach", "cpp", "cuda"])
def test_fisher_guard(run_bench, benchmark, device, name):
    if name not in ("loop", "foreach") and not _backend.runs(BACKENDS, name, device):
        pytest.skip(f"{name} not available on {device}")
    benchmark.group = f"fisher_guard-{device}"
    scale = bench_scale(device)
    grads, params, anchors = make_case(scale, device)
    benchmark.extra_info["scale"] = scale
    benchmark.extra_info["elements"] = sum(g.numel() for g in grads)
    benchmark.extra_info["bytes_moved"] = 16 * benchmark.extra_info["elements"]
    run_bench(impl(name, grads, params, anchors), device)
