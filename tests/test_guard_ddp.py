"""The guarded step under DDP: 2 gloo processes on the CPU, each with half of
every step's batch. The replicas stay bit-identical, the run equals the
single-process run on the concatenated batch, and the guard adds exactly one
all-reduce per step (g_kd; DDP's reducer all-reduces the CE gradient)."""
import contextlib
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import guard_fixtures as gf
from conftest import run_ranks

STEPS = 4
# name -> (guard options, micro-batches per step on each rank)
CASES = {
    "dfg": (dict(), 1),
    "dfg-accumulate": (dict(), 2),
    "dfg-ema-mean-accumulate": (dict(ema=0.7, normalize="mean", lam=0.3), 3),  # lam 3 with W/mean(W) diverges
    "l2": (dict(mode="l2"), 1),
}


def ddp_run(case, rank, world):
    opts, micro = CASES[case]
    student, teacher, g = gf.setup(**opts)
    model = DDP(student)
    calls = []
    real = dist.all_reduce

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    dist.all_reduce = counting
    try:
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        pens = []
        for step in range(STEPS):
            x, y, r = (t[rank::world] for t in gf.batch(step))
            for i, (xs, ys, rs) in enumerate(zip(x.chunk(micro), y.chunk(micro), r.chunk(micro))):
                sync = contextlib.nullcontext() if i == micro - 1 else model.no_sync()
                with sync:
                    distill, ce = gf.losses(model, teacher, xs, ys, rs)
                    g.backward(distill / micro, ce / micro)
            pens.append(g.apply())
            opt.step()
            opt.zero_grad()
    finally:
        dist.all_reduce = real
    return {"params": gf.flat(student), "penalties": torch.stack(pens), "all_reduces": len(calls),
            "fisher": torch.cat([f.reshape(-1) for f in g.fisher]) if g.fisher else None}


def single_run(case):
    opts, _ = CASES[case]
    student, teacher, g = gf.setup(**opts)
    pens = gf.train(student, teacher, g, STEPS)
    return {"params": gf.flat(student), "penalties": torch.stack(pens),
            "fisher": torch.cat([f.reshape(-1) for f in g.fisher]) if g.fisher else None}


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save({case: ddp_run(case, rank, world) for case in CASES}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_worker, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("case", list(CASES))
def test_replicas_stay_bit_identical(ranks, case):
    a, b = ranks[0][case], ranks[1][case]
    assert torch.equal(a["params"], b["params"])
    assert torch.equal(a["penalties"], b["penalties"])
    if a["fisher"] is not None:
        assert torch.equal(a["fisher"], b["fisher"])


@pytest.mark.parametrize("case", list(CASES))
def test_equals_the_single_process_run_on_the_concatenated_batch(ranks, case):
    """W from the globally averaged g_kd (a rank-local W would also break the bit-identity above)."""
    want = single_run(case)
    got = ranks[0][case]
    torch.testing.assert_close(got["params"], want["params"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["penalties"], want["penalties"], rtol=1e-5, atol=0)
    if want["fisher"] is not None:
        torch.testing.assert_close(got["fisher"], want["fisher"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("case", list(CASES))
def test_one_extra_all_reduce_per_step(ranks, case):
    opts, _ = CASES[case]
    expect = 0 if opts.get("mode") == "l2" else STEPS  # l2's W needs no g_kd: DDP alone
    assert ranks[0][case]["all_reduces"] == expect

