"""pytest-benchmark suite. The sizes follow MGCL_BENCH_SCALE (default 0.1 on
the CPU, 1.0 on a GPU); every timed GPU call synchronises inside the call."""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()


def bench_scale(device: str) -> float:
    env = os.environ.get("MGCL_BENCH_SCALE")
    if env:
        return float(env)
    return 1.0 if device == "cuda" else 0.1


def bench_devices() -> list[str]:
    return ["cpu"] + (["cuda"] if HAS_GPU else [])


def synced(fn, device):
    if device == "cuda":
        def call():
            out = fn()
            torch.cuda.synchronize()
            return out
        return call
    return fn


@pytest.fixture
def run_bench(benchmark):
    """benchmark(fn) with the GPU synchronised inside each timed call."""
    def go(fn, device, rounds=5):
        benchmark.extra_info["device"] = device
        benchmark.extra_info["torch"] = torch.__version__
        if device == "cuda":
            benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
        return benchmark.pedantic(synced(fn, device), rounds=rounds, iterations=1, warmup_rounds=1)
    return go
