"""contrastive_distill forward+backward: the dense reference (the baseline) vs
chunked (CPU) and triton (GPU), and the default dispatch (``extra_info["backend"]``
names what it picked); the peak memory above the inputs goes into
``extra_info["peak_bytes"]``. ``mgcl bench contrastive_distill`` sweeps B and
reports the crossover.

    pytest benches/bench_contrastive_distill.py --benchmark-json=cd.json
    MGCL_BENCH_SCALE=1.0 pytest benches/bench_contrastive_distill.py   # B = 8192
"""
import pytest
import torch

from conftest import bench_devices, bench_scale
from mgcl import _backend
from mgcl.bench import harness
from mgcl.bench.contrastive_distill import _case, _free
from mgcl.ops.contrastive_distill import BACKENDS
from mgcl.testing import distill_batch


def size(device):
    return max(64, int(8192 * bench_scale(device)))


@pytest.mark.parametrize("device", bench_devices())
@pytest.mark.parametrize("name", ["torch", "chunked", "triton", "default"])
def test_contrastive_distill(run_bench, benchmark, device, name):
    if name not in ("torch", "default") and not _backend.runs(BACKENDS, name, device):
        pytest.skip(f"{name} not available on {device}")
    if device == "cpu" and name == "triton":
        pytest.skip("the Triton interpreter is not a benchmark")
    B = size(device)
    d = 512 if device == "cuda" else 256
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    feats = distill_batch(B, d, dtype=dtype, device=device, seed=B)
    fn, setup = _case("op", None if name == "default" else name, 1.0, 0.25, feats)
    setup()
    fn()  # compile / autotune outside the measurement
    setup()
    _free(torch.device(device))
    benchmark.group = f"contrastive_distill-{device}-B{B}"
    picked = _backend.select("contrastive_distill", BACKENDS, device, dtypes=(dtype,), B=B)
    benchmark.extra_info.update(B=B, d=d, dtype=str(dtype), peak_bytes=harness.peak_extra_memory(fn, device),
                                backend=picked if name == "default" else name)

    def call():
        setup()
        return fn()

    run_bench(call, device)
