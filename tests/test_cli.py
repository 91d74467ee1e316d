"""The mgcl command: help on every option, --version, one-line errors, db info
(index kind, size on disk), db build naming its problems with a total on its
bar, the ivfpq small-bank warning (FAISS's chatter silenced), third-party
progress bars off, $MGCL_CACHE and ~ in config paths, report --format/--dpi."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from mgcl import cli
from mgcl.mgtil import run

EMB = "hashing:32"


def _actions(parser: argparse.ArgumentParser, path: str = "mgcl"):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _actions(sub, f"{path} {name}")
        elif not isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            yield path, a


def test_every_option_of_every_command_has_help():
    seen = list(_actions(cli.build_parser()))
    assert len(seen) > 40
    missing = [f"{p} {'/'.join(a.option_strings) or a.dest}" for p, a in seen if not (a.help or "").strip()]
    assert not missing, missing
    commands = {p for p, _ in seen}
    assert {"mgcl db build", "mgcl db index", "mgcl db query", "mgcl report", "mgcl run", "mgcl bench"} <= commands


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("mgcl ")


def test_mgtil_check_error_has_its_prefix_once(tmp_path, capsys):
    assert cli.main(["mgtil", "check", "--root", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("mgtil check") == 1 and err.count("\n") == 1, err


def _corpus(tmp_path, n: int) -> str:
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"caption": f"caption number {i} of a chest x-ray", "image": "missing.png"
                                     if i == 1 else None}) + "\n" for i in range(n)))
    return str(p)


def test_db_build_names_each_problem_and_its_bar_has_a_total(tmp_path, capsys):
    out = tmp_path / "bank"
    assert cli.main(["db", "build", _corpus(tmp_path, 5), "--out", str(out), "--embedder", EMB]) == 1
    cap = capsys.readouterr()
    assert f"{tmp_path / 'c.jsonl'}, line 2:" in cap.out and "missing.png" in cap.out
    assert "5/5" in cap.err, "the bar knows the corpus size"
    assert cli.main(["db", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "FAISS index: none" in text and "size on disk:" in text
    assert cli.main(["db", "index", str(out), "--index", "flat"]) == 0
    assert cli.main(["db", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "FAISS index: flat (index/faiss-flat.index)" in text
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    shown = text.split("size on disk: ")[1].split()[0]
    assert abs(float(shown.replace(",", "")) * (1024 if size >= 1024 else 1) - size) < 0.06 * size


def test_ivfpq_on_a_small_bank_warns_once_and_faiss_is_quiet(tmp_path, capfd):
    pytest.importorskip("faiss")
    out = tmp_path / "bank"
    assert cli.main(["db", "build", _corpus(tmp_path, 300), "--out", str(out), "--embedder", EMB,
                     "--allow-skipped"]) == 0
    capfd.readouterr()
    assert cli.main(["db", "index", str(out), "--index", "ivfpq", "--nlist", "4", "--nbits", "4"]) == 0
    err = capfd.readouterr().err
    assert err.count("warning: ivfpq: training on 300 vectors") == 1, err
    assert "WARNING clustering" not in err, "FAISS's own warnings are silenced"
    assert cli.main(["db", "index", str(out), "--index", "ivfpq", "--nlist", "400"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "training needs at least" in err


def test_third_party_progress_bars_are_off():
    code = ("from mgcl import cli; cli.main(['mgtil', 'list']);"
            "import transformers.utils.logging as l; print(l.is_progress_bar_enabled())")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"


def test_config_paths_honour_mgcl_cache_and_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MGCL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert run.expand_path("$MGCL_CACHE/demo/x") == str(tmp_path / "cache" / "demo" / "x")
    assert run.expand_path("${MGCL_CACHE}/y") == str(tmp_path / "cache" / "y")
    assert run.expand_path("~/z") == str(tmp_path / "home" / "z")
    cfg = run.load_config("mgtil-synth-tinyclip-primed").data
    assert cfg["data_root"] == str(tmp_path / "cache" / "synth" / "v1-seed0" / "tasks")
    assert cfg["retrieval"]["bank"].startswith(str(tmp_path / "cache"))
    monkeypatch.delenv("MGCL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert run.expand_path("$MGCL_CACHE/a") == str(tmp_path / "xdg" / "mgcl" / "a"), "unset: mgcl's default cache"


def test_report_format_and_dpi(tmp_path, capsys):
    from mgcl.cl.results import method_entry, results
    from mgcl.mgtil import report

    R = [[80, 45, 35], [70, 85, 32], [60, 75, 90]]
    res = results("trainer", {"primed": method_entry(R, [40, 30, 20], [], [])}, tasks=["a", "b", "c"])
    report.write_json(str(tmp_path / "run1" / "results.json"), res)
    assert cli.main(["report", str(tmp_path / "run1"), "--out", str(tmp_path / "r"), "--format", "svg"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("results of the trainer run run1: primed on 3 task(s)")
    assert (tmp_path / "r" / "heatmaps.svg").is_file() and (tmp_path / "r" / "results.tex").is_file()
    assert not (tmp_path / "r" / "heatmaps.png").exists()
    assert cli.main(["report", str(tmp_path / "run1"), "--out", str(tmp_path / "r"), "--dpi", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
