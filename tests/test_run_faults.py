"""Fault injection for runs and configs (issue 15): bad configs and paths, corrupt
weights, `mgcl report` / `mgcl demo` inputs, runs killed (SIGKILL) at several
points and resumed, and checkpoints edited, truncated, removed or pointed
outside the run folder.

Every failure on user input must be one line on stderr naming the input, exit
status 2, no traceback; every resume must give the uninterrupted run's R with
a train_log.jsonl that holds each (task, step) once. Each case below is one
input; the counts for the closing note come from these tables."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from demo_fixtures import miniature_root

from mgcl import cli
from mgcl.cl import ContinualTrainer
from mgcl.cl import strategies as S
from mgcl.cl.checkpoint import CheckpointError
from mgcl.cl.toy import toy_tasks, toy_vocabulary
from mgcl.mgtil import benchmarks as B
from mgcl.models import TinyCLIP, WordTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
DATASETS = ("PD", "BreakHis")


# ---- a miniature world: a two-dataset HMT root, a saved TinyCLIP, a config ------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    picked = [d for d in B.HMT_ORDER1.datasets if d.name in DATASETS]
    miniature_root(base / "root", picked, 3)
    torch.manual_seed(0)
    tok = WordTokenizer.build([p for d in picked for t in range(len(d.templates)) for p in d.prompts(t)],
                              context_length=24)
    TinyCLIP(tok, vision="cnn", image_size=16, vision_width=8, text_width=8, text_heads=2, text_layers=1,
             embed_dim=8).save(str(base / "model"))
    cfg = {"benchmark": "hmt-order1", "data_root": str(base / "root"), "tasks": list(DATASETS),
           "output_dir": str(base / "out"), "threads": 1,
           "model": {"adapter": "tinyclip", "checkpoint": str(base / "model")},
           "strategy": {"name": "l2"},
           "train": {"iters_per_task": 2, "batch_size": 4, "warmup": 1, "log_every": 1, "eval_batch_size": 16}}
    return base, cfg


def write(path, cfg) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def one_line_error(capsys, argv, *needles):
    """Run the CLI; it must exit 2 with one stderr line naming every needle, no traceback."""
    rc = cli.main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 2, (rc, err)
    assert err.count("\n") == 1 and err.startswith(f"mgcl {argv[0]}: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def edit(cfg, **changes):
    out = json.loads(json.dumps(cfg))
    for path, value in changes.items():
        *head, last = path.split("__")
        d = out
        for k in head:
            d = d.setdefault(k, {})
        d[last] = value
    return out


# ---- configs: `mgcl run` -----------------------------------------------------------------------

BAD_CONFIGS = [
    # (name, config changes, what the message names)
    ("seed 2^70", {"train__seed": 2**70}, ["train.seed"]),
    ("lr nan", {"train__lr": float("nan")}, ["train.lr", "finite"]),
    ("lr inf", {"train__lr": float("inf")}, ["train.lr", "finite"]),
    ("lr -1", {"train__lr": -1.0}, ["train.lr"]),
    ("batch_size 1e12 (a float)", {"train__batch_size": 1e12}, ["train.batch_size"]),
    ("batch_size 10^12", {"train__batch_size": 10**12}, ["train.batch_size"]),
    ("batch_size above the datasets", {"train__batch_size": 100_000}, ["train.batch_size", "training set"]),
    ("eval_batch_size 0", {"train__eval_batch_size": 0}, ["train.eval_batch_size"]),
    ("iters_per_task a string", {"train__iters_per_task": "10"}, ["train.iters_per_task"]),
    ("label_smoothing 1", {"train__label_smoothing": 1.0}, ["train.label_smoothing"]),
    ("unknown train key", {"train__lrr": 1.0}, ["'lrr'", "did you mean 'lr'"]),
    ("unknown strategy", {"strategy__name": "no-such-method"}, ["unknown strategy 'no-such-method'"]),
    ("bad strategy option", {"strategy__options": {"lam": "big"}}, ["strategy.options (l2)", "lam"]),
    ("threads 0", {"threads": 0}, ["threads"]),
    ("device tpu", {"device": "tpu"}, ["device"]),
    ("unknown task", {"tasks": ["PD", "MNIST"]}, ["'MNIST'"]),
]


@pytest.mark.parametrize("name, changes, needles", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_values(world, tmp_path, capsys, name, changes, needles):
    _, cfg = world
    path = write(tmp_path / "c.yaml", edit(cfg, **changes))
    one_line_error(capsys, ["run", path, "--check"], *needles)
    one_line_error(capsys, ["run", path], *needles)


def test_bad_config_files(world, tmp_path, capsys):
    _, cfg = world
    p = tmp_path / "latin1.yaml"
    p.write_bytes(yaml.safe_dump(cfg).encode() + b"# caf\xe9\n")
    one_line_error(capsys, ["run", str(p), "--check"], str(p), "not UTF-8")
    one_line_error(capsys, ["run", str(tmp_path), "--check"], "is a directory")
    one_line_error(capsys, ["run", str(tmp_path / "none.yaml")], "no such config file")
    p = tmp_path / "broken.yaml"
    p.write_text("benchmark: [unclosed\n  x")
    one_line_error(capsys, ["run", str(p)], "not valid YAML")
    p.write_text("- a\n- b\n")
    one_line_error(capsys, ["run", str(p)], "expected a mapping at the top level")
    p.write_bytes(b"\xff\xfe\x00\x00")
    one_line_error(capsys, ["run", str(p)], "not UTF-8")


BAD_PATHS = [
    ("data_root missing", {"data_root": "/nonexistent/root"}, ["data_root: /nonexistent/root does not exist"]),
    ("checkpoint missing", {"model__checkpoint": "/nonexistent/model"}, ["model.checkpoint", "does not exist"]),
    ("bank missing", {"strategy": {"name": "primed"}, "retrieval__bank": "/nonexistent/bank"},
     ["retrieval.bank: /nonexistent/bank does not exist"]),
    ("pool missing", {"retrieval__pool": "/nonexistent/pool.yaml"}, ["retrieval.pool"]),
]


@pytest.mark.parametrize("name, changes, needles", BAD_PATHS, ids=[c[0] for c in BAD_PATHS])
def test_check_names_every_bad_path(world, tmp_path, capsys, name, changes, needles):
    _, cfg = world
    path = write(tmp_path / "c.yaml", edit(cfg, **changes))
    one_line_error(capsys, ["run", path, "--check"], *needles)


def test_paths_that_are_the_wrong_kind(world, tmp_path, capsys):
    base, cfg = world
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    not_a_bank = tmp_path / "empty-dir"
    not_a_bank.mkdir()
    cases = [
        ({"output_dir": str(a_file)}, ["output_dir", "is a file"]),
        ({"output_dir": str(a_file / "below")}, ["output_dir", "cannot be made"]),
        ({"data_root": str(a_file)}, ["data_root", "not a directory"]),
        ({"model__checkpoint": str(a_file)}, ["model.checkpoint", "not a directory"]),
        ({"strategy": {"name": "primed"}, "retrieval__bank": str(not_a_bank)}, ["no manifest.json"]),
        ({"strategy": {"name": "primed"}, "retrieval__bank": "/nonexistent/b", "data_root": "/nonexistent/r"},
         ["data_root", "retrieval.bank"]),
    ]
    for changes, needles in cases:
        one_line_error(capsys, ["run", write(tmp_path / "c.yaml", edit(cfg, **changes)), "--check"], *needles)
    ok = write(tmp_path / "ok.yaml", cfg)
    assert cli.main(["run", ok, "--check"]) == 0 and "OK" in capsys.readouterr().out


def test_unreadable_models(world, tmp_path, capsys):
    """A model directory without weights, with garbage weights or with truncated
    weights: one line naming model.checkpoint, before any training."""
    import shutil

    base, cfg = world
    cases = {"no weights": None, "garbage": b"not a safetensors file" * 10, "truncated": "half",
             "bad json": "json"}
    for name, content in cases.items():
        d = tmp_path / name.replace(" ", "-")
        shutil.copytree(base / "model", d)
        if content is None:
            os.remove(d / "model.safetensors")
        elif content == "half":
            raw = (d / "model.safetensors").read_bytes()
            (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
        elif content == "json":
            (d / "tinyclip.json").write_text("{not json")
        else:
            (d / "model.safetensors").write_bytes(content)
        path = write(tmp_path / "c.yaml", edit(cfg, model__checkpoint=str(d), output_dir=str(tmp_path / name)))
        one_line_error(capsys, ["run", path], "model.checkpoint", str(d))


# ---- `mgcl report` and `mgcl demo` ---------------------------------------------------------------

def test_report_inputs(tmp_path, capsys):
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "results.json").write_bytes(b'{"methods": "caf\xe9"}')
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "results.json").write_text("[1, 2]")
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "results.json").write_text(json.dumps(
        {"format": "mgcl.mgtil.results", "methods": {"x": {"R": [[1]], "zero_shot": [1, 2]}}}))
    out = ["--out", str(tmp_path / "o")]
    one_line_error(capsys, ["report", str(tmp_path / "nothing"), *out], "no results.json")
    one_line_error(capsys, ["report", str(tmp_path / "latin1"), *out], "latin1/results.json", "not UTF-8")
    one_line_error(capsys, ["report", str(tmp_path / "bad"), *out], "bad/results.json", "not valid JSON")
    one_line_error(capsys, ["report", str(tmp_path / "list"), *out], "not an mgcl results file")
    one_line_error(capsys, ["report", str(tmp_path / "short"), *out], "method 'x' lacks")


def test_report_out_is_a_file(world, tmp_path, capsys):
    """A good results file, but --out names a file."""
    from mgcl.cl.results import method_entry, results

    res = results("trainer", {"finetune": method_entry([[50.0]], [40.0], [[60.0]], [55.0])}, tasks=["t"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(res))
    (tmp_path / "f").write_text("x")
    one_line_error(capsys, ["report", str(tmp_path / "run"), "--out", str(tmp_path / "f")], "--out", "is a file")


def test_demo_inputs(tmp_path, capsys, monkeypatch):
    (tmp_path / "f").write_text("x")
    one_line_error(capsys, ["demo", "--out", str(tmp_path / "f")], "--out", "is a file")
    one_line_error(capsys, ["demo", "--out", str(tmp_path / "f" / "x")], "--out", "cannot be made")
    one_line_error(capsys, ["demo", "--seed", str(2**70), "--out", str(tmp_path / "o")], "--seed")
    one_line_error(capsys, ["demo", "--seed", "-1", "--out", str(tmp_path / "o")], "--seed")
    monkeypatch.setenv("MGCL_CACHE", str(tmp_path / "f"))
    one_line_error(capsys, ["demo", "--out", str(tmp_path / "o")], "the cache", "is a file")
    squatted = tmp_path / "cache" / "synth" / "v1-seed0-quick"
    squatted.mkdir(parents=True)
    (squatted / "mine.txt").write_text("not mgtil-synth")
    monkeypatch.setenv("MGCL_CACHE", str(tmp_path / "cache"))
    one_line_error(capsys, ["demo", "--quick", "--out", str(tmp_path / "o")], "the cache", "not an mgtil-synth cache")


# ---- runs killed at several points, then resumed ---------------------------------------------------

TRAIN = dict(iters_per_task=3, batch_size=6, lr=2e-3, warmup=1, log_every=1, eval_batch_size=64,
             reset_optimizer=False)

CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    from mgcl.cl import ContinualTrainer, checkpoint
    from mgcl.cl import strategies as S
    from mgcl.cl import trainer as trainer_mod
    sys.path.insert(0, {tests!r})
    from test_run_faults import TRAIN, toy_model, toy
    kind, a, b = {point!r}
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    def after(fn, when):
        def wrapped(*args, **kw):
            out = fn(*args, **kw)
            if when(*args, **kw):
                die()
            return out
        return wrapped
    seen = []
    if kind == "zero":
        checkpoint.save_zero_shot = after(checkpoint.save_zero_shot, lambda *x, **k: True)
    elif kind == "log":          # after the b-th log line of task a is on disk
        real = trainer_mod.ContinualTrainer.log
        def log(self, msg):
            real(self, msg)
            if msg.startswith(f"task {{a + 1}}/") and " step " in msg:
                seen.append(msg)
                if len(seen) == b:
                    die()
        trainer_mod.ContinualTrainer.log = log
    elif kind == "ckpt-file":    # inside the checkpoint of task a, after its b-th tensor file
        real_save = checkpoint.save
        def save(trainer, t, **kw):
            if t == a:
                inner = checkpoint.atomic_write_tensors
                def write(path, tensors, *x):
                    inner(path, tensors, *x)
                    seen.append(path)
                    if len(seen) == b:
                        die()
                checkpoint.atomic_write_tensors = write
            return real_save(trainer, t, **kw)
        checkpoint.save = save
    elif kind == "latest":       # right after latest.json names task a (older folders still there)
        inner_json = checkpoint.atomic_write_json
        def wj(path, obj, **kw):
            inner_json(path, obj, **kw)
            if path.endswith("latest.json") and obj["finished"] == a:
                die()
        checkpoint.atomic_write_json = wj
    tr = ContinualTrainer(toy_model(), S.create("ewc", fisher_batches=2), toy(), device="cpu", out_dir={out!r},
                          progress=False, **TRAIN)
    tr.run()
    print("finished without being killed")
""")


def toy():
    return toy_tasks(3, n_train=4, n_test=3, image_size=16)


def toy_model():
    torch.manual_seed(0)
    tok = WordTokenizer.build(toy_vocabulary(toy()), context_length=12)
    return TinyCLIP(tok, vision="cnn", image_size=16, vision_width=8, text_width=8, text_heads=2, text_layers=1,
                    embed_dim=8)


def run_toy(out, resume=False, strategy=None):
    return ContinualTrainer(toy_model(), strategy or S.create("ewc", fisher_batches=2), toy(), device="cpu",
                            out_dir=str(out), progress=False, resume=resume, **TRAIN).run()


def log_rows(out):
    return [(r["task"], r["step"]) for r in map(json.loads, open(os.path.join(out, "train_log.jsonl")))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return run_toy(out)["methods"]["ewc"], log_rows(out)


KILLS = [("zero", 0, 0), ("log", 0, 2), ("log", 1, 1), ("log", 2, 3), ("ckpt-file", 0, 1), ("ckpt-file", 1, 3),
         ("latest", 0, 0), ("latest", 2, 0)]


@pytest.mark.parametrize("point", KILLS, ids=["-".join(map(str, k)) for k in KILLS])
def test_killed_run_resumes_to_the_same_R_and_log(uninterrupted, tmp_path, point):
    full, full_log = uninterrupted
    out = tmp_path / "run"
    code = CHILD.format(tests=os.path.dirname(__file__), point=point, out=str(out))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == -9, (r.returncode, r.stdout, r.stderr[-2000:])
    res = run_toy(out, resume=True)["methods"]["ewc"]
    assert res["R"] == full["R"] and res["zero_shot"] == full["zero_shot"] and res["auc_matrix"] == full["auc_matrix"]
    rows = log_rows(out)
    assert len(rows) == len(set(rows)), f"duplicated (task, step) rows after resuming from {point}"
    assert rows == full_log


# ---- checkpoints edited, truncated, removed or pointing outside ------------------------------------

@pytest.fixture
def finished(tmp_path):
    """A finished toy run (2 tasks) to tamper with; resuming it rechecks every file."""
    out = tmp_path / "run"
    ContinualTrainer(toy_model(), S.create("ewc", fisher_batches=2), toy()[:2], device="cpu", out_dir=str(out),
                     progress=False, **TRAIN).run()
    return out


def resume(out):
    return ContinualTrainer(toy_model(), S.create("ewc", fisher_batches=2), toy()[:2], device="cpu",
                            out_dir=str(out), progress=False, resume=True, **TRAIN).run()


def flip(path, at=0.5):
    raw = bytearray(open(path, "rb").read())
    raw[int(len(raw) * at)] ^= 0xFF
    open(path, "wb").write(bytes(raw))


def truncate(path):
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])


def rewrite_json(path, fn):
    d = json.load(open(path))
    fn(d)
    open(path, "w").write(json.dumps(d))


TAMPER = [
    # (name, what to do to the checkpoint folder ck / its task folder d, what the one line must say)
    ("latest.json truncated", lambda ck, d: truncate(ck / "latest.json"), "latest.json cannot be read as JSON"),
    ("latest.json not UTF-8", lambda ck, d: (ck / "latest.json").write_bytes(b"\xff\xfe{}"), "latest.json"),
    ("latest.json a list", lambda ck, d: (ck / "latest.json").write_text("[]"), "not a checkpoint pointer"),
    ("latest.json dir ../../../../../etc",
     lambda ck, d: rewrite_json(ck / "latest.json", lambda j: j.update(dir="../../../../../etc")),
     "not a checkpoint pointer"),
    ("latest.json dir absolute", lambda ck, d: rewrite_json(ck / "latest.json", lambda j: j.update(dir="/etc")),
     "not a checkpoint pointer"),
    ("task folder a link outside", lambda ck, d: (os.rename(d, ck / "moved"), os.symlink("/etc", d)), "outside"),
    ("task folder missing", lambda ck, d: __import__("shutil").rmtree(d), "state.json is missing"),
    ("latest.json checksum edited", lambda ck, d: rewrite_json(ck / "latest.json",
                                                               lambda j: j.update(sha256="0" * 64)),
     "does not match the checksum"),
    ("state.json R edited", lambda ck, d: rewrite_json(d / "state.json", lambda j: j["R"][0].__setitem__(0, 99.0)),
     "state.json does not match the checksum"),
    ("state.json truncated", lambda ck, d: truncate(d / "state.json"), "state.json does not match"),
    ("model weights flipped", lambda ck, d: flip(d / "model.safetensors"), "model.safetensors does not match"),
    ("model weights truncated", lambda ck, d: truncate(d / "model.safetensors"), "model.safetensors does not match"),
    ("model weights missing", lambda ck, d: os.remove(d / "model.safetensors"), "model.safetensors is missing"),
    ("optimizer flipped", lambda ck, d: flip(d / "optimizer.safetensors", 0.9), "optimizer.safetensors"),
    ("strategy state flipped", lambda ck, d: flip(d / "strategy.safetensors", 0.9), "strategy.safetensors"),
    ("rng state truncated", lambda ck, d: truncate(d / "rng.safetensors"), "rng.safetensors"),
]


@pytest.mark.parametrize("name, tamper, needle", TAMPER, ids=[t[0] for t in TAMPER])
def test_tampered_checkpoints_are_refused_in_one_line(finished, name, tamper, needle):
    ck = finished / "checkpoint"
    tamper(ck, ck / "task-001")
    with pytest.raises(CheckpointError) as e:
        resume(finished)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and msg.startswith("resume: "), msg


def test_consistent_but_foreign_state_is_refused(finished):
    """A state.json re-signed in latest.json after an edit passes the checksum, but
    names other settings, or a model of another shape."""
    import hashlib

    ck = finished / "checkpoint"
    d = ck / "task-001"

    def resign():
        rewrite_json(ck / "latest.json",
                     lambda j: j.update(sha256=hashlib.sha256((d / "state.json").read_bytes()).hexdigest()))

    good = (d / "state.json").read_bytes()
    rewrite_json(d / "state.json", lambda j: j["config"].update(lr=1.0))
    resign()
    with pytest.raises(CheckpointError, match="other settings"):
        resume(finished)
    (d / "state.json").write_bytes(good)
    other = TinyCLIP(toy_model().tokenizer, vision="cnn", image_size=16, vision_width=4, text_width=8, text_heads=2,
                     text_layers=1, embed_dim=8)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(d / "model.safetensors"))
    rewrite_json(d / "state.json", lambda j: j["files"].update({"model.safetensors": hashlib.sha256(
        (d / "model.safetensors").read_bytes()).hexdigest()}))
    resign()
    with pytest.raises(CheckpointError, match="does not fit this run") as e:
        resume(finished)
    assert "\n" not in str(e.value)


def test_edited_zero_shot_row_is_refused(finished):
    """Killed before the first task finished: the zero-shot row is reused only if it checks out."""
    ck = finished / "checkpoint"
    os.remove(ck / "latest.json")
    rewrite_json(ck / "zero_shot.json", lambda j: j["z"].__setitem__(0, 100.0))
    with pytest.raises(CheckpointError, match="zero_shot.json does not match its checksum"):
        resume(finished)


def test_resume_through_the_cli_refuses_an_edited_checkpoint(world, tmp_path, capsys):
    """`mgcl run --resume` over edited weights: one line, exit 2; an intact one resumes."""
    base, cfg = world
    cfg = edit(cfg, output_dir=str(tmp_path / "out"))
    path = write(tmp_path / "c.yaml", cfg)
    assert cli.main(["run", path, "--no-progress"]) == 0
    capsys.readouterr()
    d = tmp_path / "out" / "runs" / "l2" / "checkpoint" / "task-001"
    good = (d / "model.safetensors").read_bytes()
    flip(d / "model.safetensors", 0.99)
    one_line_error(capsys, ["run", path, "--resume", "--no-progress"], "model.safetensors does not match")
    (d / "model.safetensors").write_bytes(good)
    assert cli.main(["run", path, "--resume", "--no-progress"]) == 0
    rewrite_json(tmp_path / "out" / "runs" / "l2" / "checkpoint" / "latest.json",
                 lambda j: j.update(dir="../../../../../etc"))
    one_line_error(capsys, ["run", path, "--resume", "--no-progress"], "latest.json is not a checkpoint pointer")


# ---- a bank that cannot give reference pairs: one line before the task trains ------------------------

def _primed(cfg, out, bank, vlm):
    return edit(cfg, output_dir=str(out), strategy={"name": "primed"},
                retrieval={"bank": str(bank), "embedder": "hashing:64", "vlm": vlm, "pool_per_domain": 2,
                           "siphon": {"a": 2, "b": 2, "c": 2, "n_general": 3}})


@pytest.fixture(scope="module")
def imageless_bank(tmp_path_factory):
    """A bank built (exit 1, kept) from a corpus whose every image is missing."""
    from mgcl.retrieval import build_bank

    root = tmp_path_factory.mktemp("imageless")
    with open(root / "c.jsonl", "w") as fh:
        for i in range(40):
            fh.write(json.dumps({"id": f"m{i}", "caption": f"figure {i} of a parkinson spiral drawing",
                                 "image": f"img/{i}.png"}) + "\n")
    m = build_bank([str(root / "c.jsonl")], str(root / "bank"), embedder="hashing:64", progress=False)
    assert m["build"]["unreadable_images"] == 40
    return root / "bank"


@pytest.mark.parametrize("vlm, needle", [("none", "none of the"), ("model", "the reference set is empty")])
def test_primed_on_a_bank_without_readable_images(world, imageless_bank, tmp_path, capsys, vlm, needle):
    """Issue 15: a PRIMED run on such a bank died mid-task ("reference pair ... cannot
    open image", a traceback; with the model as VLM, "the reference set is empty"):
    now one line naming the bank, exit 2, before the task trains."""
    _, cfg = world
    path = write(tmp_path / "c.yaml", _primed(cfg, tmp_path / "out", imageless_bank, vlm))
    one_line_error(capsys, ["run", path, "--no-progress"], needle, str(imageless_bank))
    assert not (tmp_path / "out" / "runs" / "primed" / "checkpoint" / "task-000").exists()


def test_reference_pairs_without_a_readable_image_are_left_out(tmp_path):
    from PIL import Image

    from mgcl.cl.strategies.refdata import readable_pairs
    from mgcl.retrieval import ReferenceSet

    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rows = [{"index": i, "id": f"r{i}", "caption": "c", "image": str(tmp_path / name), "domain": "x", "level": "domain",
             "query": "q", "score": 1.0} for i, name in enumerate(["ok.png", "gone.png", "bad.png", "ok.png"])]
    for workers in (0, 4):
        kept, left_out = readable_pairs(ReferenceSet(rows), workers=workers)
        assert [r["id"] for r in kept] == ["r0", "r3"]
        assert len(left_out) == 2 and left_out[0].startswith("'r1' (bank index 1): image ")
        assert "No such file" in left_out[0] and "not a readable image" in left_out[1]
    whole = ReferenceSet(rows[:1])
    assert readable_pairs(whole)[0] is whole


def test_reference_images_are_checked_again_only_where_the_build_did_not_vouch(imageless_bank, tmp_path):
    """A bank whose build opened every image (none unreadable or absent) needs no
    second decode of its reference pairs; one that records otherwise, or nothing, does."""
    from PIL import Image

    from mgcl.cl.strategies.refdata import images_checked
    from mgcl.retrieval import MemoryBank, build_bank

    os.makedirs(tmp_path / "img")
    with open(tmp_path / "c.jsonl", "w") as fh:
        for i in range(6):
            Image.new("RGB", (4, 4), (40 * i, 0, 0)).save(tmp_path / "img" / f"{i}.png")
            fh.write(json.dumps({"id": f"g{i}", "caption": f"figure {i}", "image": f"img/{i}.png"}) + "\n")
    build_bank([str(tmp_path / "c.jsonl")], str(tmp_path / "bank"), embedder="hashing:64", progress=False)
    assert images_checked(MemoryBank.open(str(tmp_path / "bank")))
    assert not images_checked(MemoryBank.open(str(imageless_bank)))
    assert not images_checked(object())  # no manifest: check


def test_tampered_bank_through_mgcl_run(world, imageless_bank, tmp_path, capsys):
    """`mgcl run` over a bank changed since its build: the BankError of its first read as one line, exit 2."""
    import shutil

    _, cfg = world
    bank = tmp_path / "bank"
    shutil.copytree(imageless_bank, bank)
    flip(bank / "embeddings" / "shard-00000.safetensors", 0.9)
    path = write(tmp_path / "c.yaml", _primed(cfg, tmp_path / "out", bank, "none"))
    one_line_error(capsys, ["run", path, "--no-progress"], "shard-00000.safetensors' does not match its sha256")
