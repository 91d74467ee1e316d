"""Loggers (CSV, TensorBoard, W&B offline), callbacks and mid-task checkpoints of the trainer."""
import csv
import json
import os

import pytest
import torch

from mgcl.cl import ContinualTrainer, TrainConfig
from mgcl.cl import strategies as S
from mgcl.cl.checkpoint import CheckpointError
from mgcl.cl.config import ConfigError
from mgcl.cl.logging import Callback, CSVLogger, TensorBoardLogger, WandbLogger
from test_cl_strategies import bank, siphon_for, tiny_model  # noqa: F401  (bank: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(iters_per_task=6, batch_size=8, lr=1e-3, warmup=1, device="cpu", log_every=2, progress=False,
          eval_batch_size=64)


@pytest.fixture(scope="module")
def tasks():
    from mgcl.cl.toy import toy_tasks

    return toy_tasks(2, n_train=6, n_test=4, image_size=32)


class Events(Callback):
    def __init__(self):
        self.seen = []

    def on_task_start(self, trainer, t):
        self.seen.append(("start", t))

    def on_step_end(self, trainer, t, step, loss):
        assert isinstance(loss, S.Loss)
        self.seen.append(("step", t, step))

    def on_evaluate(self, trainer, t, acc, auc):
        self.seen.append(("evaluate", t, tuple(acc)))

    def on_task_end(self, trainer, t, acc, auc):
        self.seen.append(("end", t))


def test_csv_logger_and_callbacks(tasks, bank, tmp_path):
    ev = Events()
    res = ContinualTrainer(tiny_model(tasks), S.create("primed", siphon=siphon_for(bank), ref_batch_size=6), tasks,
                           out_dir=str(tmp_path), callbacks=[ev], **KW).run()["methods"]["primed"]
    steps = list(csv.DictReader(open(tmp_path / "steps.csv")))
    assert [(int(r["task"]), int(r["step"]), int(r["global_step"])) for r in steps] == \
        [(0, 2, 2), (0, 4, 4), (0, 6, 6), (1, 2, 8), (1, 4, 10), (1, 6, 12)]
    for r in steps:
        for k in ("ce", "ckt", "cmc", "penalty", "lr", "throughput", "loss"):
            assert float(r[k]) == float(r[k]) and r[k] != "", k
        assert float(r["throughput"]) > 0
    log = [json.loads(x) for x in open(tmp_path / "train_log.jsonl")]
    assert [float(r["ce"]) for r in steps] == [x["ce"] for x in log], "one row, both files"
    assert [float(r["lr"]) for r in steps][:3] == [pytest.approx(x) for x in
                                                  (1e-3 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * k / 5))).item()
                                                   for k in (0, 2, 4))]
    rows = list(csv.DictReader(open(tmp_path / "tasks.csv")))
    assert [[float(r[f"acc/{t.name}"]) for t in tasks] for r in rows] == res["R"]
    assert [float(r["acc_mean"]) for r in rows] == [pytest.approx(sum(r) / 2) for r in res["R"]]
    # callbacks: the zero-shot evaluation, then per task: start, its steps, evaluation, end
    want = [("evaluate", -1, tuple(res["zero_shot"]))]
    for t in range(2):
        want += [("start", t)] + [("step", t, s) for s in range(6)] + [("evaluate", t, tuple(res["R"][t])),
                                                                         ("end", t)]
    assert ev.seen == want


def test_tensorboard_and_wandb_offline(tasks, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    tb, wb = TensorBoardLogger(), WandbLogger(project="mgcl-test", mode="offline")
    captured = {}
    finish = wb.close

    def keep_summary():
        captured.update({k: wb.run.summary[k] for k in ("train/ce", "train/penalty", "R/acc_mean")})
        captured["dir"] = wb.run.dir
        finish()

    wb.close = keep_summary
    res = ContinualTrainer(tiny_model(tasks), S.create("l2"), tasks, out_dir=str(tmp_path), loggers=[tb, wb],
                           **KW).run()["methods"]["l2"]
    log = [json.loads(x) for x in open(tmp_path / "train_log.jsonl")]
    assert not (tmp_path / "steps.csv").exists(), "loggers= replaces the default CSV logger"
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    ce = acc.Scalars("train/ce")
    assert [e.step for e in ce] == [x["global_step"] for x in log]
    assert [e.value for e in ce] == [pytest.approx(x["ce"]) for x in log]
    assert [e.value for e in acc.Scalars("train/penalty")] == [pytest.approx(x["penalty"]) for x in log]
    assert [e.value for e in acc.Scalars("R/acc_mean")] == [pytest.approx(sum(r) / 2) for r in res["R"]]
    # W&B offline: the run is written under out_dir/wandb and its summary holds the last values
    assert captured["train/ce"] == pytest.approx(log[-1]["ce"])
    assert captured["train/penalty"] == pytest.approx(log[-1]["penalty"])
    assert captured["R/acc_mean"] == pytest.approx(sum(res["R"][-1]) / 2)
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1 and any(f.endswith(".wandb") for f in os.listdir(tmp_path / "wandb" / runs[0]))


class Killed(Exception):
    pass


class KillAt(Callback):
    def __init__(self, t, step):
        self.at = (t, step)

    def on_step_end(self, trainer, t, step, loss):
        if (t, step) == self.at:
            raise Killed(f"killed after step {step + 1} of task {t}")


@pytest.mark.parametrize("name,kill", [("primed", (1, 3)), ("primed", (0, 4)), ("finetune", (1, 5)),
                                       ("wise-ft", (1, 3)), ("wise-ft", (0, 2)), ("zscl", (1, 3)),
                                       ("zscl", (0, 4)), ("icarl", (1, 3)), ("icarl", (1, 5))])
def test_mid_task_checkpoint_resumes_to_the_same_run(tasks, bank, tmp_path, name, kill):
    def strategy():
        if name == "zscl":  # its weight ensemble (every 2 steps) is mid-task state in state_dict
            return S.create("zscl", siphon=siphon_for(bank), ref_batch_size=6, we_every=2)
        if name == "icarl":  # task 1 replays task 0's exemplars in batches of 5: the loader's position resumes
            return S.create("icarl", replay_batch_size=5)
        return S.create("primed", siphon=siphon_for(bank), ref_batch_size=6) if name == "primed" \
            else S.create(name)

    kw = {**KW, "checkpoint_every": 2}
    full_model = tiny_model(tasks)
    full = ContinualTrainer(full_model, strategy(), tasks, out_dir=str(tmp_path / "a"), **kw).run()["methods"][name]
    ck = tmp_path / "a" / "checkpoint"
    assert not os.path.exists(ck / "mid.json") and not [d for d in os.listdir(ck) if d.startswith("step-")], \
        "a task's end removes its mid-task checkpoint"

    with pytest.raises(Killed):
        ContinualTrainer(tiny_model(tasks), strategy(), tasks, out_dir=str(tmp_path / "b"), callbacks=[KillAt(*kill)],
                         **kw).run()
    ck = tmp_path / "b" / "checkpoint"
    t, step = kill
    done = step // 2 * 2                             # the last checkpoint saved before the kill
    mid = json.load(open(ck / "mid.json"))
    assert (mid["dir"], mid["task"], mid["step"]) == (f"step-{t:03d}-{done:06d}", t, done)
    assert os.path.isdir(ck / f"task-{t - 1:03d}") == (t > 0)
    # after the first task the checkpoint decides, not the weights given; in the first task the weights given
    # stand for the state before it (the initial model, as `mgcl run --resume` loads it again)
    resumed_model = tiny_model(tasks, seed=7 if t > 0 else 0)
    ev = Events()
    res = ContinualTrainer(resumed_model, strategy(), tasks, out_dir=str(tmp_path / "b"), resume=True,
                           callbacks=[ev], **kw).run()["methods"][name]
    assert [e[2] for e in ev.seen if e[0] == "step" and e[1] == t][0] == done, "resumed at the checkpoint's step"
    assert res["R"] == full["R"] and res["zero_shot"] == full["zero_shot"] and res["auc_matrix"] == \
        full["auc_matrix"], "same R as the uninterrupted run"
    for (k, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), k
    a_log = [json.loads(x) for x in open(tmp_path / "a" / "train_log.jsonl")]
    b_log = [json.loads(x) for x in open(tmp_path / "b" / "train_log.jsonl")]
    assert [(x["task"], x["step"]) for x in b_log] == [(x["task"], x["step"]) for x in a_log], "each step once"
    assert [x["ce"] for x in b_log] == [x["ce"] for x in a_log]
    steps = list(csv.DictReader(open(tmp_path / "b" / "steps.csv")))
    assert [(int(r["task"]), int(r["step"])) for r in steps] == [(x["task"], x["step"]) for x in a_log]


def test_mid_task_checkpoint_is_checked(tasks, tmp_path):
    kw = {**KW, "checkpoint_every": 2}
    with pytest.raises(Killed):
        ContinualTrainer(tiny_model(tasks), "finetune", tasks, out_dir=str(tmp_path), callbacks=[KillAt(1, 3)],
                         **kw).run()
    ck = tmp_path / "checkpoint"
    state = ck / json.load(open(ck / "mid.json"))["dir"] / "model.safetensors"
    state.write_bytes(state.read_bytes()[:-8] + b"xxxxxxxx")
    with pytest.raises(CheckpointError, match="model.safetensors does not match its checksum"):
        ContinualTrainer(tiny_model(tasks), "finetune", tasks, out_dir=str(tmp_path), resume=True, **kw).run()
    (ck / "mid.json").write_text(json.dumps({"dir": "../elsewhere", "task": 1, "step": 4, "sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="not a checkpoint pointer"):
        ContinualTrainer(tiny_model(tasks), "finetune", tasks, out_dir=str(tmp_path), resume=True, **kw).run()


class NoMidTask(S.Strategy):
    name = "no-mid-task"
    mid_task_checkpoints = False  # a strategy whose state during a task is not all in state_dict


def test_bad_logging_settings(tasks, bank):
    with pytest.raises(ConfigError, match="train.loggers"):
        TrainConfig(loggers=["csv", "mlflow"])
    with pytest.raises(ConfigError, match="train.checkpoint_every"):
        TrainConfig(checkpoint_every=0)
    with pytest.raises(ValueError, match="checkpoint_every must be null"):
        ContinualTrainer(tiny_model(tasks), NoMidTask(), tasks, out_dir="unused",
                         **{**KW, "checkpoint_every": 2})
    with pytest.raises(ValueError, match="loggers must have"):
        ContinualTrainer(tiny_model(tasks), "finetune", tasks, out_dir="unused", loggers=[object()], **KW)
    with pytest.raises(ValueError, match="callbacks must be"):
        ContinualTrainer(tiny_model(tasks), "finetune", tasks, out_dir="unused", callbacks=[print], **KW)
    assert isinstance(ContinualTrainer(tiny_model(tasks), "finetune", tasks, out_dir="unused",
                                       **KW).loggers[0], CSVLogger)
