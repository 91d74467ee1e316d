"""`mgcl run` as torchrun starts it (WORLD_SIZE / RANK / MASTER_* in the
environment; run.py joins the gloo group itself): 2 CPU processes on a tiny
mgtil-synth-quick PRIMED run give the R matrix of the single-process run at
the same global batch, rank 0 alone writing the outputs.

Tolerance: the ranks' gradients are summed in another order than one process
sums them, so the weights agree to float32 rounding and the accuracies to
within one test image per task (100 / n_test points). Random crops would be
drawn per rank (as in any DDP run), so both runs use TinyCLIP's eval
transform for training here."""
import json
import os

import pytest
import torch

from conftest import run_ranks
from demo_fixtures import quick_demo as _quick_demo
from mgcl.models import TinyCLIP
from test_run import tiny_config, write_config


@pytest.fixture(scope="session")
def quick(tmp_path_factory):
    return _quick_demo(tmp_path_factory)


def _no_random_crops():
    plain = TinyCLIP.transform
    TinyCLIP.transform = lambda self, train: plain(self, False)
    return plain


def _run(path):
    from mgcl.mgtil import run

    return run.run(run.load_config(path), progress=False)


def _worker(rank, world, port, out_dir, path):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    _no_random_crops()
    res = _run(path)
    torch.save({"R": res["methods"]["primed"]["R"], "z": res["methods"]["primed"]["zero_shot"]},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_mgcl_run_under_two_processes_equals_one(quick, tmp_path):
    cfg = tiny_config(quick, tmp_path / "single")
    cfg["train"]["batch_size"] = 8                # 4 images per rank, and 4 reference pairs
    plain = _no_random_crops()
    try:
        single = _run(write_config(cfg, tmp_path / "single.yaml"))["methods"]["primed"]
    finally:
        TinyCLIP.transform = plain
    cfg["output_dir"] = str(tmp_path / "ddp")
    ranks = run_ranks(_worker, tmp_path, write_config(cfg, tmp_path / "ddp.yaml"))
    assert ranks[0] == ranks[1], "every rank reports rank 0's evaluation"
    assert ranks[0]["z"] == single["zero_shot"]
    test_dirs = [os.path.join(cfg["data_root"], t, "test") for t in cfg["tasks"]]
    n_test = [sum(len(os.listdir(os.path.join(d, c))) for c in os.listdir(d)) for d in test_dirs]
    tol = 100.0 / min(n_test) + 1e-9
    for row, want in zip(ranks[0]["R"], single["R"]):
        assert row == pytest.approx(want, abs=tol)
    written = json.load(open(tmp_path / "ddp" / "results.json"))
    assert written["methods"]["primed"]["R"] == ranks[0]["R"]
    log = (tmp_path / "ddp" / "runs" / "primed" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["task"] for x in log] == [0, 1, 2], "rank 0 alone logs"
