"""The trainer in several processes (2 gloo ranks on the CPU): each rank trains
on its half of every global batch, PRIMED's reference batch is gathered
(contrastive_distill(gather=True)), retrieval runs on rank 0 and is broadcast;
the replicas stay identical and the run equals the single-process run at the
same global batch within float32 tolerance (deterministic transforms: random
augmentations are drawn per rank)."""
import json
import os

import pytest
import torch
import torch.distributed as dist

from conftest import run_ranks
from mgcl.cl import ContinualTrainer
from mgcl.cl import strategies as S
from mgcl.cl.strategies.base import OptimizerSpec
from mgcl.cl.toy import toy_tasks
from mgcl.models import TinyCLIP
from test_cl_strategies import bank, siphon_for, tiny_model  # noqa: F401  (bank: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(iters_per_task=4, batch_size=8, lr=0.05, warmup=1, device="cpu", log_every=2, progress=False,
          eval_batch_size=64)
# The replicas sum their gradients in another order than one process does: parameters agree to float32
# rounding over a few steps, and the accuracies (12 test images per task) to within one image.
PARAM_ATOL = 2e-5


def tasks():
    return toy_tasks(2, n_train=6, n_test=4, image_size=32)


def strategy(name, bank, rank):
    """The strategy with SGD: Adam turns gradients that are rounding noise (a key bias of attention, a conv
    bias before a GroupNorm of one channel per group: exactly zero in exact arithmetic) into steps of lr
    size, which two summation orders then disagree on; SGD keeps noise as noise."""

    class WithSGD(S.get(name)):
        def optimizer(self, trainer, t):
            return OptimizerSpec("sgd")

    if name == "primed":
        from mgcl.cl.trainer import RankZeroSiphon

        siphon = siphon_for(bank) if not rank else None
        return WithSGD(siphon=siphon if rank is None else RankZeroSiphon(siphon, rank), ref_batch_size=6,
                       prefetch=0)
    return WithSGD()


def train(name, bank, out_dir, rank=None):
    ts = tasks()
    model = tiny_model(ts)
    # no random augmentation: each rank draws its own crops (as in any DDP run), which one process draws
    # in another order; with a deterministic transform the two runs see the same global batches
    model.transform = lambda train: TinyCLIP.transform(model, False)
    if rank:
        with torch.no_grad():                       # rank 0's weights are broadcast at the start
            for p in model.parameters():
                p.add_(1.0)
    res = ContinualTrainer(model, strategy(name, bank, rank), ts, out_dir=out_dir, **KW).run()
    return {"R": res["methods"][name]["R"], "z": res["methods"][name]["zero_shot"],
            "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()])}


def _worker(rank, world, port, out_dir, name, bank):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(train(name, bank, os.path.join(out_dir, "run"), rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["primed", "l2"])
def test_two_ranks_equal_one_process(bank, tmp_path, name):
    single = train(name, bank, str(tmp_path / "single"))
    ranks = run_ranks(_worker, tmp_path, name, bank)
    assert torch.equal(ranks[0]["params"], ranks[1]["params"]), "the replicas stay bit-identical"
    assert ranks[0]["R"] == ranks[1]["R"]
    torch.testing.assert_close(ranks[0]["params"], single["params"], rtol=0, atol=PARAM_ATOL)
    assert ranks[0]["z"] == single["z"]
    for row, want in zip(ranks[0]["R"], single["R"]):
        assert row == pytest.approx(want, abs=100 / 12 + 1e-9), "within one test image per task"
    # rank 0 alone wrote the run's files
    res = json.load(open(tmp_path / "run" / "results.json"))
    assert res["methods"][name]["R"] == ranks[0]["R"]
    assert len(open(tmp_path / "run" / "train_log.jsonl").read().splitlines()) == 4


def test_batch_must_divide_by_the_world(bank, tmp_path):
    ranks = run_ranks(_divide_worker, tmp_path)
    assert ranks[0] == ranks[1] == "does not divide by the 2 processes"


def _divide_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ts = tasks()
        try:
            ContinualTrainer(tiny_model(ts), "finetune", ts, out_dir=os.path.join(out_dir, "x"),
                             **{**KW, "batch_size": 7})
            msg = "no error"
        except ValueError as exc:
            msg = "does not divide by the 2 processes" if "does not divide by the 2 processes" in str(exc) \
                else str(exc)
        torch.save(msg, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
