"""`mgcl demo --quick` end to end (cold cache, through the CLI), its results
file, tables and plots, and the demo cache."""
import csv
import dataclasses
import io
import json
import math
import statistics

import pytest
import torch
from demo_fixtures import SEEDS
from demo_fixtures import quick_demo as _quick_demo
from mgcl.cl.metrics import summarize
from mgcl.mgtil import benchmarks as B
from mgcl.mgtil import demo, report, synth
from PIL import Image


@pytest.fixture(scope="session")
def quick(tmp_path_factory):
    return _quick_demo(tmp_path_factory)


@pytest.fixture(scope="module")
def results(quick):
    assert quick.rc == 0
    return json.loads((quick.out / "results.json").read_text())


def test_results_have_every_method_with_a_full_R(results):
    T = len(B.SYNTH_TASKS)
    assert results["benchmark"] == "mgtil-synth" and results["quick"] is True and results["synthetic"] is True
    assert "SYNTHETIC" in results["label"] and "SYNTHETIC" in results["notice"]
    assert list(results["methods"]) == ["zero-shot", "finetune", "l2", "zscl", "primed"]
    assert results["tasks"] == [t.name for t in B.SYNTH_TASKS]
    seeds = results["config"]["seeds"]
    assert seeds == [42, 43][:len(seeds)] and len(seeds) == SEEDS
    for name, m in results["methods"].items():
        assert set(m) >= {"transfer", "avg", "last", "bwt", "forgetting", "R", "zero_shot", "std", "per_seed"}, name
        assert m["seeds"] == (seeds if name != "zero-shot" else seeds[:1]), "zero-shot does not train: one run"
        R, z = m["R"], m["zero_shot"]
        assert len(R) == T and all(len(row) == T for row in R) and len(z) == T, name
        for k in ("transfer", "avg", "last", "bwt", "forgetting"):
            per = []
            for p in m["per_seed"]:
                assert all(0.0 <= v <= 100.0 for row in p["R"] for v in row), name
                assert p[k] == pytest.approx(summarize(p["R"], z)[k]), (name, k)
                per.append(p[k])
            assert m[k] == pytest.approx(statistics.fmean(per)), (name, k)
            assert m["std"][k] == pytest.approx(statistics.stdev(per) if len(per) > 1 else 0.0), (name, k)
        if name != "zero-shot":
            assert m["per_seed"][0]["R"] != m["per_seed"][1]["R"], f"{name}: the seeds gave the same run"
    z = results["methods"]["zero-shot"]["zero_shot"]
    assert results["methods"]["zero-shot"]["R"] == [z] * T, "the zero-shot baseline copies z into every row"
    assert all(m["zero_shot"] == z for m in results["methods"].values()), "every method starts from one model"
    for name in ("finetune", "l2", "zscl", "primed"):
        assert results["methods"][name]["R"] != [z] * T, f"{name} did not change the model"
    assert results["versions"]["torch"] == torch.__version__
    assert results["config"]["settings"] == demo.settings(quick=True)
    assert set(results["config"]["choices"]) >= {"pretrain", "train", "strategies"}


def test_zero_shot_is_above_chance(results):
    z = results["methods"]["zero-shot"]["zero_shot"]
    chance = [100.0 / len(t.classes) for t in B.SYNTH_TASKS]
    assert sum(z) / len(z) > sum(chance) / len(chance) + 10, (z, chance)


def test_reference_sets_recorded_and_shared_across_seeds(results):
    first, second = (p["reference_sets"] for p in results["methods"]["primed"]["per_seed"])
    if results["timings"]["workers"] == 1:
        assert not any(s["cached"] for s in first) and all(s["cached"] for s in second), "each set is built once"
    assert [{k: s[k] for k in ("pairs", "levels")} for s in first] == \
        [{k: s[k] for k in ("pairs", "levels")} for s in second], "retrieval does not depend on the seed"
    sets = first
    assert [s["before_task"] for s in sets] == list(range(1, len(B.SYNTH_TASKS) + 1))
    assert all(s["kind"] == "dynamic" and s["pairs"] > 0 for s in sets)
    assert sets[0]["levels"]["task"] == 0 and sets[0]["levels"]["domain"] == 0, "nothing is finished before task 1"
    assert all(s["levels"]["task"] > 0 for s in sets[1:])
    (u,) = results["methods"]["zscl"]["per_seed"][0]["reference_sets"]
    assert u["kind"] == "uniform" and u["pairs"] == demo.settings(quick=True)["strategies"]["zscl"]["uniform_size"]


def test_printed_table_tables_and_plots(quick, results):
    out = quick.stdout
    assert "SYNTHETIC" in out
    for name in results["methods"]:
        assert f"\n| {name} | " in out
    for col in ("Transfer", "Avg", "Last", "BWT"):
        assert col in out
    rows = list(csv.DictReader(io.StringIO((quick.out / "results.csv").read_text())))
    assert [r["method"] for r in rows] == list(results["methods"])
    assert float(rows[1]["last"]) == pytest.approx(results["methods"]["finetune"]["last"], abs=1e-3)
    md = (quick.out / "results.md").read_text()
    assert md in out and "SYNTHETIC" in md and "Which differences exceed the seed spread" in md
    ft = results["methods"]["finetune"]
    assert f"| finetune | {SEEDS} | {ft['transfer']:.1f} ± {ft['std']['transfer']:.1f} |" in md
    assert "| primed − finetune |" in md and "primed vs finetune: " in md
    assert (quick.out / "results.tex").is_file()  # the paper-style tables, from report.render
    for png in ("curves.png", "curves_by_task.png", "heatmaps.png"):
        with Image.open(quick.out / png) as im:
            assert im.format == "PNG" and im.size[0] > 300
    for name, m in results["methods"].items():
        for seed in m["seeds"]:
            assert (quick.out / "runs" / name / f"seed-{seed}" / "results.json").is_file()


def test_cache_is_reused(quick, monkeypatch):
    monkeypatch.setattr(demo, "pretrain", lambda *a, **k: pytest.fail("pretrained again despite a complete cache"))
    monkeypatch.setattr("mgcl.retrieval.build_bank", lambda *a, **k: pytest.fail("rebuilt the bank"))
    a = demo.prepare(0, quick=True, cache_dir=quick.cache, progress=False)
    assert a.reused and a.dir == quick.assets and (a.model_dir / "tinyclip.json").is_file()
    want = json.loads((quick.assets / "assets.json").read_text())
    assert demo._valid(quick.assets, {k: want[k] for k in ("version", "seed", "quick", "settings")}) is not None
    other = {k: want[k] for k in ("version", "seed", "quick")} | {"settings": {"pretrain": {"steps": 1}}}
    assert demo._valid(quick.assets, other) is None, "a cache made with other settings is not reused"


def test_pretraining_is_deterministic(quick):
    data = synth.build(quick.cache / "synth" / "v1-seed0-quick", seed=0, quick=True, progress=False)
    cfg = demo.settings(quick=True)
    cfg["pretrain"].update(steps=3, batch_size=8)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (a, log_a), (b, log_b) = (demo.pretrain(data, cfg, seed=0, progress=False) for _ in range(2))
        c, _ = demo.pretrain(data, cfg, seed=1, progress=False)
    finally:
        torch.set_num_threads(n)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert log_a == log_b and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_bad_arguments():
    with pytest.raises(ValueError, match="subset"):
        demo.run_demo("unused", methods=["finetune", "sgd"])
    with pytest.raises(ValueError, match="jobs"):
        demo.run_demo("unused", workers=0)
    with pytest.raises(ValueError, match="seed"):
        demo.run_demo("unused", seed=-1)


def test_moe_adapters_and_diki_run_on_a_pretrained_vit(tmp_path, monkeypatch):
    """--methods moe-adapters,diki at the tiniest settings (the first 3 tasks, a few
    steps): only the ViT TinyCLIP is pretrained (no CNN model, no bank), cached
    apart; their rows and zero-shot-vit's."""
    T = 3
    tiny = demo.settings(quick=True)
    tiny["pretrain"].update(steps=4, warmup=2, batch_size=16)
    tiny["train"].update(iters_per_task=2, batch_size=8, warmup=1, log_every=2)
    tiny["strategies"]["moe-adapters"] = {"ddas_iters": 5}
    monkeypatch.setitem(demo.SETTINGS, True, tiny)
    build = synth.build

    def first_tasks(*a, **k):
        data = build(*a, **k)
        return dataclasses.replace(data, tasks=data.tasks[:T])

    monkeypatch.setattr(synth, "build", first_tasks)
    res = demo.run_demo(tmp_path / "out", quick=True, cache_dir=tmp_path / "cache", methods=["moe-adapters", "diki"],
                        seeds=1, progress=False, workers=1)
    assert list(res["methods"]) == [demo.VIT_ZERO_SHOT, "moe-adapters", "diki"]
    z = res["methods"][demo.VIT_ZERO_SHOT]["zero_shot"]
    for name, m in res["methods"].items():
        assert m["model"] == "vit" and m["zero_shot"] == z and len(m["R"]) == T
        assert (tmp_path / "out" / "runs" / name / "seed-42" / "results.json").is_file()
    for name in ("moe-adapters", "diki"):          # trained on every task (a few steps do not move R reliably)
        log = (tmp_path / "out" / "runs" / name / "seed-42" / "train_log.jsonl").read_text().splitlines()
        steps = [json.loads(line) for line in log if '"loss"' in line]
        assert sorted({e["task"] for e in steps}) == list(range(T)) and all(math.isfinite(e["loss"]) for e in steps)
    vit = tmp_path / "cache" / "demo" / "v1-seed0-quick-vit"
    info = json.loads((vit / "assets.json").read_text())
    assert info["settings"]["model"]["vision"] == "vit" and "bank" not in info["settings"]
    assert list(res["config"]["assets_vit"]["zero_shot_after_pretraining"].values()) == pytest.approx(z)
    assert not (tmp_path / "cache" / "demo" / "v1-seed0-quick").exists(), "no CNN model or bank was needed"
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [m["model"] for m in saved["methods"].values()] == ["vit"] * 3
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| diki † |" in md and "ViT TinyCLIP" in md
    again = demo.prepare(0, quick=True, cache_dir=tmp_path / "cache", progress=False, tower="vit")
    assert again.reused and again.bank_dir is None and again.dir == vit


def test_report_loads_a_demo_output(quick, results):
    res = report.load(str(quick.out))
    assert res["methods"].keys() == results["methods"].keys()
    text = report.format_table(res)
    assert "SYNTHETIC" in text and "primed" in text
