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


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(worker, out_dir, *args, world: int = 2) -> list:
    """Run ``worker(rank, world, port, out_dir, *args)`` in ``world`` processes (gloo
    on the CPU, a free local port); each saves ``out_dir/rank{r}.pt``; their contents."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, free_port(), str(out_dir), *args), nprocs=world, join=True)
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt")) for r in range(world)]


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
