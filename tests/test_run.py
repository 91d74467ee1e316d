"""`mgcl run CONFIG.yaml [--resume]` and `mgcl report`: config validation
(the example configs included), a tiny mgtil-synth run interrupted after a
task and resumed, and the side-by-side report of two runs."""
import contextlib
import copy
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from demo_fixtures import miniature_root
from demo_fixtures import quick_demo as _quick_demo
from mgcl import cli
from mgcl.cl import ContinualTrainer
from mgcl.cl.strategies import Strategy
from mgcl.mgtil import benchmarks as B
from mgcl.mgtil import report, run

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*-biomedclip-primed.yaml"))
MINIMAL = {
    "benchmark": "hmt-order1", "data_root": "/nonexistent/mgtil", "output_dir": "/nonexistent/out",
    "model": {"adapter": "open_clip", "name": "biomedclip", "checkpoint": "/nonexistent/biomedclip"},
    "strategy": {"name": "primed", "options": {"alpha": 1.0}},
    "retrieval": {"bank": "/nonexistent/bank"},
}


def with_(**changes):
    cfg = copy.deepcopy(MINIMAL)
    for path, value in changes.items():
        *head, last = path.split("__")
        d = cfg
        for k in head:
            d = d.setdefault(k, {})
        if value is _DROP:
            d.pop(last, None)
        else:
            d[last] = value
    return cfg


_DROP = object()


# ---- validation ------------------------------------------------------------------------------

def test_example_configs_validate(capsys):
    assert len(CONFIGS) == 4
    seen = set()
    for path in CONFIGS:
        cfg = run.load_config(str(path)).data
        seen.add(cfg["benchmark"])
        assert cfg["model"]["adapter"] == "open_clip" and cfg["model"]["name"] == "biomedclip"
        assert cfg["strategy"]["name"] == "primed"
        opts = cfg["strategy"]["options"]
        assert (opts["alpha"], opts["beta"], opts["retrieval"]) == (1.0, 0.25, "dynamic")
        t = cfg["train"]
        assert (t["iters_per_task"], t["batch_size"], t["lr"], t["label_smoothing"], t["seed"]) == \
            (1000, 64, 1e-5, 0.2, 42)
        sip = cfg["retrieval"]["siphon"]
        want = (30, 80) if cfg["benchmark"].startswith("hmt") else (70, 100)
        assert (sip["b"], sip["c"]) == want, path.name
        assert cfg["benchmark"] in path.name
        # --check also checks the paths: the examples name placeholders, each reported, on one line
        assert cli.main(["run", str(path), "--check"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "data_root: /path/to/mgtil does not exist" in err
        assert "model.checkpoint: /path/to/BiomedCLIP" in err and "retrieval.bank: /path/to/bank" in err
    assert seen == {"hmt-order1", "hmt-order2", "medxtreme-order1", "medxtreme-order2"}


def test_synthetic_example_config_matches_the_demo():
    from mgcl.mgtil import demo

    from mgcl.cl import strategies

    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {p.stem for p in CONFIGS} | {"mgtil-synth-tinyclip-primed"} <= set(names)
    for name in names:  # <sequence or mgtil-synth>-<model>-<method>, the method a registered strategy
        assert name.startswith(("hmt-order", "medxtreme-order", "mgtil-synth-")), name
        assert any(name.endswith("-" + m) for m in strategies.available()), name
    cfg = run.load_config(str(CONFIG_DIR / "mgtil-synth-tinyclip-primed.yaml")).data
    want = demo.settings(quick=False)
    assert cfg["benchmark"] == "mgtil-synth" and not cfg["model"]["checkpoint"].startswith("~")
    assert cfg["model"]["checkpoint"].endswith("/demo/v1-seed0/model") and "~" not in cfg["retrieval"]["bank"]
    assert cfg["retrieval"]["siphon"] == want["siphon"]
    assert cfg["retrieval"]["pool_per_domain"] == want["pool_per_domain"]
    assert {k: cfg["train"][k] for k in want["train"]} == want["train"]
    assert {k: cfg["strategy"]["options"][k] for k in ("alpha", "beta", "lam")} == \
        {k: want["strategies"]["primed"][k] for k in ("alpha", "beta", "lam")}


def test_defaults_are_the_protocol():
    from mgcl.cl import TrainConfig

    rc = run.validate(MINIMAL)
    cfg = rc.data
    assert cfg["train"] == TrainConfig().to_dict() == rc.train.to_dict() and cfg["device"] == "cpu"
    assert (rc.train.iters_per_task, rc.train.batch_size, rc.train.lr, rc.train.label_smoothing, rc.train.seed) == \
        (1000, 64, 1e-5, 0.2, 42), "SPEC.md section 1"
    assert cfg["retrieval"]["vlm"] == "model" and cfg["retrieval"]["siphon"] == {}
    assert rc.strategy.name == "primed" and rc.strategy.needs_reference_set
    assert rc.strategy.reference.siphon is None, "run() hands the strategy its Siphon"


@pytest.mark.parametrize("cfg, match", [
    (with_(trian={}), r"unknown key\(s\) 'trian' \(did you mean 'train'\?\)"),
    (with_(train__iters_per_tsak=5), r"train: unknown key\(s\) 'iters_per_tsak'"),
    (with_(train__iters_per_task=0), r"train.iters_per_task: expected an integer >= 1"),
    (with_(train__batch_size=True), r"train.batch_size"),
    (with_(train__lr=0), r"train.lr"),
    (with_(train__label_smoothing=1.0), r"train.label_smoothing"),
    (with_(train__lr=float("nan")), r"train.lr: expected a finite number"),
    (with_(train__lr=float("inf")), r"train.lr: expected a finite number"),
    (with_(train__seed=2**70), r"train.seed: expected an integer >= 0 and <= 4,294,967,295"),
    (with_(train__batch_size=1e12), r"train.batch_size: expected an integer"),
    (with_(train__batch_size=10**12), r"train.batch_size: expected an integer >= 1 and <= 2,147,483,647"),
    (with_(train__batch_size=200_000), r"train.batch_size: 200,000 is larger than every task's training set"),
    (with_(train__amp="fp16"), r"train.amp"),
    (with_(strategy__name="primd"), r"unknown strategy 'primd' \(did you mean 'primed'\?\)"),
    (with_(strategy__options={"alpah": 1.0}), r"strategy.options \(primed\): unknown key\(s\) 'alpah'"),
    (with_(strategy__options={"teacher": "oracle"}), r"teacher must be one of"),
    (with_(strategy__options={"bank": "/b"}), r"come from the retrieval section"),
    (with_(retrieval__bank=_DROP), r"retrieval.bank: strategy 'primed' distils"),
    (with_(retrieval__siphon={"a": 30, "d": 1}), r"retrieval.siphon: unknown key\(s\) 'd'"),
    (with_(retrieval__siphon={"b": 0}), r"retrieval.siphon.b"),
    (with_(retrieval__vlm="biomedclip"), r"retrieval.vlm"),
    (with_(model__adapter="timm"), r"model.adapter"),
    (with_(model__checkpoint=_DROP), r"model.checkpoint: open_clip 'biomedclip' without a checkpoint"),
    (with_(benchmark="hmt-order3"), r"benchmark: unknown benchmark 'hmt-order3'"),
    (with_(data_root=_DROP), r"data_root: benchmark 'hmt-order1' needs the data root"),
    (with_(output_dir=_DROP), r"'output_dir' is required"),
    (with_(tasks=["RANZCR", "MNIST"]), r"tasks: unknown key\(s\) 'MNIST'"),
    (with_(device="tpu"), r"device"),
    (with_(threads=0), r"threads"),
    ([1, 2], r"expected a mapping at the top level"),
])
def test_bad_configs_are_refused_before_anything_loads(cfg, match):
    with pytest.raises(run.ConfigError, match=match):
        run.validate(cfg)


def test_a_strategy_without_retrieval_needs_no_bank():
    cfg = run.validate(with_(strategy={"name": "finetune"}, retrieval__bank=_DROP))
    assert cfg.data["strategy"] == {"name": "finetune", "options": {}} and not cfg.strategy.needs_reference_set
    off = run.validate(with_(strategy__options={"ckt": False, "cmc": False, "regularizer": "l2"},
                             retrieval__bank=_DROP))
    assert off.data["retrieval"]["bank"] is None and not off.strategy.needs_reference_set


def test_cli_reports_config_errors(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(with_(strategy__name="no-such-method")))
    assert cli.main(["run", str(p)]) == 2
    assert "unknown strategy 'no-such-method'" in capsys.readouterr().err
    p.write_text("benchmark: [unclosed")
    assert cli.main(["run", str(p), "--check"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert cli.main(["run", str(tmp_path / "missing.yaml")]) == 2


# ---- a tiny run on mgtil-synth-quick, interrupted and resumed ----------------------------------

@pytest.fixture(scope="session")
def quick(tmp_path_factory):
    return _quick_demo(tmp_path_factory)


def tiny_config(quick, out: Path) -> dict:
    return {
        "benchmark": "mgtil-synth-quick", "data_root": str(quick.cache / "synth" / "v1-seed0-quick" / "tasks"),
        "tasks": ["synth-chest-findings", "synth-colon-histology", "synth-glaucoma"],
        "output_dir": str(out), "device": "cpu", "threads": 1,
        "model": {"adapter": "tinyclip", "checkpoint": str(quick.assets / "model")},
        "strategy": {"name": "primed", "options": {"lam": 1.0, "prefetch": 0}},
        "retrieval": {"bank": str(quick.assets / "bank"), "pool_per_domain": 4,
                      "siphon": {"a": 3, "b": 3, "c": 3, "n_general": 6}},
        "train": {"iters_per_task": 3, "batch_size": 8, "warmup": 1, "lr": 1e-4, "log_every": 3,
                  "eval_batch_size": 128},
    }


def write_config(cfg: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def full_run(quick, tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny-run")
    path = write_config(tiny_config(quick, base / "full"), base / "full.yaml")
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["run", path, "--no-progress"]) == 0
    return base / "full"


def test_run_writes_results_tables_and_plots(full_run):
    res = json.loads((full_run / "results.json").read_text())
    assert res["benchmark"] == "mgtil-synth-quick" and res["synthetic"] is True and res["kind"] == "run"
    assert res["tasks"] == ["synth-chest-findings", "synth-colon-histology", "synth-glaucoma"]
    (m,) = res["methods"].values()
    assert list(res["methods"]) == ["primed"]
    assert len(m["R"]) == 3 and all(len(r) == 3 for r in m["R"]) and len(m["zero_shot"]) == 3
    assert res["config"]["run"]["strategy"]["options"]["lam"] == 1.0
    assert res["config"]["trainer"]["iters_per_task"] == 3
    for f in ("results.csv", "results.md", "curves.png", "curves_by_task.png", "heatmaps.png", "config.yaml"):
        assert (full_run / f).is_file(), f
    assert (full_run / "runs" / "primed" / "checkpoint" / "latest.json").is_file()
    assert run.load_config(str(full_run / "config.yaml")).data["benchmark"] == "mgtil-synth-quick"


def test_resume_after_an_interruption_gives_the_same_R(quick, full_run, tmp_path, monkeypatch, capsys):
    path = write_config(tiny_config(quick, tmp_path / "out"), tmp_path / "cfg.yaml")
    real = ContinualTrainer._train_task
    real_new = Strategy.__new__

    def stop_at_task_2(self, t, *args, **kwargs):
        if t == 1:
            raise KeyboardInterrupt("interrupted after task 1")
        return real(self, t, *args, **kwargs)

    monkeypatch.setattr(ContinualTrainer, "_train_task", stop_at_task_2)
    built = []
    monkeypatch.setattr(Strategy, "__new__", lambda cls, *a, **k: built.append(cls.name) or real_new(cls, *a, **k))
    with pytest.raises(KeyboardInterrupt):
        cli.main(["run", path, "--no-progress"])
    assert built == ["primed"], "a run constructs its strategy once"
    monkeypatch.setattr(ContinualTrainer, "_train_task", real)
    state = json.loads((tmp_path / "out" / "runs" / "primed" / "checkpoint" / "latest.json").read_text())
    assert state["finished"] == 0 and not (tmp_path / "out" / "results.json").exists()
    assert cli.main(["run", path, "--no-progress"]) == 2, "a second run over an existing one needs --resume"
    assert "--resume" in capsys.readouterr().err
    assert cli.main(["run", path, "--resume", "--no-progress"]) == 0
    resumed = json.loads((tmp_path / "out" / "results.json").read_text())["methods"]["primed"]
    full = json.loads((full_run / "results.json").read_text())["methods"]["primed"]
    assert resumed["R"] == full["R"] and resumed["zero_shot"] == full["zero_shot"]
    assert resumed["last"] == full["last"]
    lines = (tmp_path / "out" / "runs" / "primed" / "train_log.jsonl").read_text().splitlines()
    log = [json.loads(x) for x in lines]
    assert [x["task"] for x in log] == [0, 1, 2], "task 1 was trained once, before the interruption"


def test_report_renders_two_runs_side_by_side(quick, full_run, tmp_path):
    out = tmp_path / "report"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["report", str(quick.out), str(full_run), "--out", str(out)]) == 0
    text = buf.getvalue()
    combined = json.loads((out / "combined.json").read_text())
    names = list(combined["methods"])
    assert "primed [out]" in names and "primed [full]" in names and "finetune" in names
    assert len(names) == 6
    assert combined["tasks"] is None, "the runs have different task lists"
    assert "SYNTHETIC" in text and "primed [full]" in text
    for f in ("results.csv", "results.md", "curves.png", "heatmaps.png"):
        assert (out / f).is_file(), f
    assert not (out / "curves_by_task.png").exists()
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 6
    one = report.combine([report.load(str(full_run))])
    assert list(one["methods"]) == ["primed"]
    trainer_file = report.load(str(full_run / "runs" / "primed"))     # the trainer's own results.json
    assert trainer_file["methods"]["primed"]["R"] == one["methods"]["primed"]["R"]


def test_report_refuses_a_directory_without_results(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_a_real_benchmark_subset_on_a_miniature_root(quick, tmp_path):
    """HieraMedTransfer Order I, two of its datasets (only those need to be present),
    the demo's TinyCLIP, fine-tuning: the same files as any run, not labelled synthetic."""
    miniature_root(tmp_path / "root", [d for d in B.HMT_ORDER1.datasets if d.name in ("BreakHis", "RANZCR")], 2)
    cfg = {"benchmark": "hmt-1", "data_root": str(tmp_path / "root"), "tasks": ["BreakHis", "RANZCR"],
           "output_dir": str(tmp_path / "out"), "threads": 1,
           "model": {"adapter": "tinyclip", "checkpoint": str(quick.assets / "model")},
           "strategy": {"name": "finetune"},
           "train": {"iters_per_task": 2, "batch_size": 4, "warmup": 1, "log_every": 2}}
    threads = torch.get_num_threads()
    res = run.run(run.validate(cfg), progress=False)
    assert torch.get_num_threads() == threads, "the config's thread count is restored afterwards"
    assert res["benchmark"] == "hmt-order1" and res["synthetic"] is False
    assert res["tasks"] == ["RANZCR", "BreakHis"], "benchmark order, not the order listed"
    assert len(res["methods"]["finetune"]["R"]) == 2
    assert "SYNTHETIC" not in (tmp_path / "out" / "results.md").read_text()
    cfg["tasks"] = ["RANZCR", "CheXchoNet"]
    with pytest.raises(run.ConfigError, match="CheXchoNet"):
        run.run(run.validate({**cfg, "output_dir": str(tmp_path / "out2")}), progress=False)
