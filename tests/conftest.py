import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when no GPU is
# visible; the variable must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


def available_backends(table: dict, device_type: str) -> list[str]:
    from mgcl import _backend

    return [b for b in table if _backend.runs(table, b, device_type)]


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if HAS_GPU else [])


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one intra-op thread, and it keeps them immune
    to a busy shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
