"""ContinualTrainer: the loop, the files it writes, resumability."""
import json
import math
import os

import pytest
import torch

from mgcl.cl import ContinualTrainer, Task
from mgcl.cl import strategies as S
from mgcl.cl.evaluate import evaluate_all
from mgcl.cl.checkpoint import CheckpointError
from mgcl.cl.toy import toy_tasks, toy_vocabulary
from mgcl.mgtil import report
from mgcl.models import TinyCLIP, WordTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tasks4():
    return toy_tasks(4, n_train=5, n_test=4, image_size=32)


def tiny_model(tasks, seed=0):
    torch.manual_seed(seed)
    tok = WordTokenizer.build(toy_vocabulary(tasks), context_length=12)
    return TinyCLIP(tok, vision="cnn", image_size=32, vision_width=16, text_width=16, text_heads=2, text_layers=1,
                    embed_dim=16)


KW = dict(iters_per_task=4, batch_size=6, lr=2e-3, warmup=1, device="cpu", log_every=2, progress=False,
          eval_batch_size=64)


def test_run_results_file_and_log(tasks4, tmp_path):
    tasks = tasks4[:2]
    model = tiny_model(tasks)
    z_expect, _ = evaluate_all(model, tasks, "cpu")
    scale = float(model.logit_scale.detach())
    res = ContinualTrainer(model, "finetune", tasks, out_dir=str(tmp_path), **KW).run()
    on_disk = json.load(open(tmp_path / "results.json"))
    assert on_disk == json.loads(json.dumps(res)) and on_disk["format"] == "mgcl.mgtil.results"
    assert report.validate(on_disk) is on_disk and on_disk["kind"] == "trainer"
    assert res["tasks"] == ["shape", "colour"] and res["domains"] == ["toy-shape", "toy-colour"]
    m = res["methods"]["finetune"]
    assert m["zero_shot"] == z_expect, "z is the untouched model's row"
    assert m["R"][-1] == evaluate_all(model, tasks, "cpu")[0], "the last row is the final model's accuracy"
    assert len(m["auc_matrix"]) == 2 and all(len(r) == 2 for r in m["auc_matrix"]) and len(m["zero_shot_auc"]) == 2
    assert m["last"] == pytest.approx(sum(m["R"][-1]) / 2)
    assert m["auc"] == pytest.approx(sum(m["auc_matrix"][-1]) / 2)
    cfg = res["config"]["trainer"]
    assert (cfg["iters_per_task"], cfg["batch_size"], cfg["lr"], cfg["label_smoothing"], cfg["seed"]) == \
        (4, 6, 2e-3, 0.2, 42)
    assert cfg["amp"] == "off" and cfg["schedule"] == "cosine"
    assert res["versions"]["torch"] == torch.__version__ and "mgcl" in res["versions"]
    assert float(model.logit_scale) == scale and not model.logit_scale.requires_grad
    log = [json.loads(x) for x in open(tmp_path / "train_log.jsonl")]
    assert [(x["task"], x["step"]) for x in log] == [(0, 2), (0, 4), (1, 2), (1, 4)]
    assert all(math.isfinite(x["ce"]) and x["loss"] == pytest.approx(x["ce"]) for x in log)


def test_tasks_of_image_tensors(tmp_path):
    """Generated tasks may hold image tensors and tensor labels (a TensorDataset)."""
    g = torch.Generator().manual_seed(0)
    tasks = []
    for k in range(2):
        x, y = torch.rand(12, 3, 32, 32, generator=g), torch.arange(12) % 3
        ds = torch.utils.data.TensorDataset(x, y)
        tasks.append(Task(f"t{k}", "toy", [f"c{k}{i}" for i in range(3)], ["a photo of {}."], ds, ds))
    torch.manual_seed(0)
    model = TinyCLIP(vision="cnn", image_size=32, vision_width=16, text_width=16, text_heads=2, text_layers=1,
                     embed_dim=16)
    R = ContinualTrainer(model, "finetune", tasks, out_dir=str(tmp_path), **KW).run()["methods"]["finetune"]["R"]
    assert len(R) == 2 and all(len(r) == 2 and all(0 <= a <= 100 for a in r) for r in R)


def test_loader_cycles_small_datasets(tasks4):
    tr = ContinualTrainer(tiny_model(tasks4), "finetune", tasks4, out_dir="unused", **KW)
    ds = [(tasks4[0].train[i][0], i) for i in range(3)]  # 3 items, batches of 4
    batches = list(tr.loader(ds, train=True, seed=0, iters=5, batch_size=4))
    assert len(batches) == 5 and all(b[0].shape == (4, 3, 32, 32) for b in batches)
    seen = torch.cat([b[1] for b in batches]).tolist()
    for k in range(0, 18, 3):  # every pass is a permutation
        assert sorted(seen[k:k + 3]) == [0, 1, 2]
    again = [b[1] for b in tr.loader(ds, train=True, seed=0, iters=5, batch_size=4)]
    assert torch.equal(torch.cat(again), torch.tensor(seen))


def test_lr_schedule(tasks4):
    tr = ContinualTrainer(tiny_model(tasks4), "finetune", tasks4, out_dir="unused",
                          **{**KW, "iters_per_task": 110, "warmup": 10, "lr": 1e-5})
    lrs = [tr.lr_at(s) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[9] == pytest.approx(1e-5)
    assert lrs[10] == pytest.approx(1e-5) and lrs[60] == pytest.approx(0.5e-5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-8
    tr.train_config = tr.train_config.replace(schedule="constant")
    assert tr.lr_at(100) == 1e-5


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("name,opts,reset", [("ewc", {"fisher_batches": 2}, False), ("icarl", {"memory": 6}, True)])
def test_resume_after_interruption_matches_uninterrupted_run(tasks4, tmp_path, name, opts, reset):
    kw = {**KW, "reset_optimizer": reset}
    full_model = tiny_model(tasks4)
    full = ContinualTrainer(full_model, S.create(name, **opts), tasks4, out_dir=str(tmp_path / "a"), **kw).run()

    class Crash(S.get(name)):
        def before_task(self, trainer, t):
            if t == 2:
                raise Interrupt("killed after task 2 of 4")
            super().before_task(trainer, t)

    with pytest.raises(Interrupt):
        ContinualTrainer(tiny_model(tasks4), Crash(**opts), tasks4, out_dir=str(tmp_path / "b"), **kw).run()
    ck = tmp_path / "b" / "checkpoint"
    latest = json.load(open(ck / "latest.json"))
    assert {k: latest[k] for k in ("dir", "finished")} == {"dir": "task-001", "finished": 1}
    assert len(latest["sha256"]) == 64
    assert sorted(os.listdir(ck / "task-001")) == ["model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                                   "state.json", "strategy.safetensors"]
    assert not os.path.exists(ck / "task-000"), "older checkpoints are removed"
    assert not [f for f in os.listdir(ck / "task-001") if f.endswith(".tmp")]

    started = []

    class Watch(S.get(name)):
        def before_task(self, trainer, t):
            started.append(t)
            super().before_task(trainer, t)

    resumed_model = tiny_model(tasks4, seed=123)  # the checkpoint, not the initial weights, decides
    res = ContinualTrainer(resumed_model, Watch(**opts), tasks4, out_dir=str(tmp_path / "b"), resume=True,
                           **kw).run()
    assert started == [2, 3]
    a, b = res["methods"][name], full["methods"][name]
    assert a["R"] == b["R"] and a["auc_matrix"] == b["auc_matrix"] and a["zero_shot"] == b["zero_shot"]
    for (k, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), k


def test_resume_without_checkpoint_starts_fresh_and_rejects_other_settings(tasks4, tmp_path):
    tasks = tasks4[:2]
    a = ContinualTrainer(tiny_model(tasks), "finetune", tasks, out_dir=str(tmp_path), resume=True, **KW).run()
    assert len(a["methods"]["finetune"]["R"]) == 2
    with pytest.raises(CheckpointError, match="other settings.*lr"):
        ContinualTrainer(tiny_model(tasks), "finetune", tasks, out_dir=str(tmp_path), resume=True,
                         **{**KW, "lr": 1.0}).run()
    # everything finished: resuming only rewrites the results
    b = ContinualTrainer(tiny_model(tasks), "finetune", tasks, out_dir=str(tmp_path), resume=True,
                         **{**KW, "log_every": 1}).run()
    assert b["methods"]["finetune"]["R"] == a["methods"]["finetune"]["R"]


def test_bad_settings(tasks4):
    m = tiny_model(tasks4)
    for kw, msg in (({"amp": "fp16"}, "fp16"), ({"schedule": "linear"}, "schedule"), ({"iters_per_task": 0}, ">= 1"),
                    ({"batch_size": 0}, ">= 1"), ({"label_smoothing": 1.0}, "label_smoothing"), ({"lr": 0}, "lr"),
                    ({"lr": float("nan")}, "train.lr"), ({"lr": float("inf")}, "train.lr"),
                    ({"seed": 2**70}, "train.seed"), ({"batch_size": 10**12}, "train.batch_size"),
                    ({"batch_size": 1000}, "larger than every task's training set"), ({"itres_per_task": 3}, "itres"),
                    ({"eval_batch_size": 2**31 - 1}, "input images takes .* GiB, more than the device")):
        with pytest.raises(ValueError, match=msg):
            ContinualTrainer(m, "finetune", tasks4, out_dir="unused", **{**KW, **kw})
    dup = toy_tasks(2, n_train=2, n_test=2)
    dup[1].name = dup[0].name
    with pytest.raises(ValueError, match="two tasks"):
        ContinualTrainer(m, "finetune", dup, out_dir="unused", **KW)
    with pytest.raises(ValueError, match="not mgcl.cl.Task"):
        ContinualTrainer(m, "finetune", ["x"], out_dir="unused", **KW)
    with pytest.raises(ValueError, match="unknown strategy"):
        ContinualTrainer(m, "replay", tasks4, out_dir="unused", **KW)
