"""Seeds in the demo and the ablation: one entry from several seeds (mean, sample
std, mean R), the spread rule, the tables; the shared, memoised retrieval; the
decoded images (the same tensors as from the files); `--methods all`."""
import statistics

import pytest
import torch
from mgcl.cl import strategies as S
from mgcl.mgtil import ablate, demo, seeds


def entry(shift, R=None):
    R = R or [[50.0 + shift, 40.0], [45.0 + shift, 60.0 + shift]]
    from mgcl.cl.results import method_entry

    return method_entry(R, [30.0, 35.0], [[70.0, 60.0], [65.0, 80.0 + shift]], [50.0, 50.0])


def test_over_seeds_mean_std_and_matrices():
    es = [entry(0.0), entry(1.0), entry(5.0)]
    m = seeds.over_seeds(es, [42, 43, 44])
    for k in ("transfer", "avg", "last", "bwt", "forgetting", "auc"):
        vals = [e[k] for e in es]
        assert m[k] == pytest.approx(statistics.fmean(vals)) and m["std"][k] == pytest.approx(statistics.stdev(vals))
    assert m["R"] == [[52.0, 40.0], [47.0, 62.0]] and m["seeds"] == [42, 43, 44]
    assert [p["seed"] for p in m["per_seed"]] == [42, 43, 44] and m["per_seed"][2]["R"] == es[2]["R"]
    one = seeds.over_seeds([entry(0.0)], [42])
    assert one["std"]["last"] == 0.0
    with pytest.raises(ValueError):
        seeds.over_seeds(es, [1, 2])


def test_spread_rule_and_tables():
    a = {"transfer": 60.0, "avg": 50.0, "last": 55.0, "bwt": -2.0, "forgetting": 3.0, "auc": 80.0, "seeds": [1, 2, 3],
         "std": {"transfer": 1.0, "avg": 0.5, "last": 0.2, "bwt": 0.1, "forgetting": 0.1, "auc": 0.1}}
    b = {**a, "transfer": 61.5, "avg": 52.0, "last": 55.3, "std": dict(a["std"])}
    assert seeds.exceeds(a, b, "transfer") == (pytest.approx(-1.5), 2.0, False)
    assert seeds.exceeds(a, b, "avg") == (pytest.approx(-2.0), 1.0, True)
    md = seeds.differences_md({"a": a, "b": b}, [("a", "b")])
    assert "| a − b | -1.5 | **-2.0** | -0.3 | +0.0 |" in md and "a vs b: Avg -2.0 (spread 1.0)" in md
    t = seeds.table_md({"a": a})
    assert "| a | 3 | 60.0 ± 1.0 | 50.0 ± 0.5 | 55.0 ± 0.2 | -2.0 ± 0.1 |" in t
    csv = seeds.to_csv({"a": a}, extra={"a": {"group": "x"}}).splitlines()
    assert csv[0].startswith("method,group,seeds,transfer") and csv[1].startswith("a,x,1 2 3,60.0000")


def test_shared_retrieval_builds_each_set_once():
    built = []

    class Fake:
        def reference_set(self, history, stages="multi-stage"):
            built.append(("dynamic", [t.name for t in history], stages))
            from mgcl.retrieval import ReferenceSet
            return ReferenceSet([])

        def uniform_set(self, size, keywords=None, stages="multi-stage"):
            built.append(("uniform", size, stages))
            from mgcl.retrieval import ReferenceSet
            return ReferenceSet([])

    class T:
        def __init__(self, name):
            self.name = name

    shared = demo.SharedRetrieval(Fake())
    for _ in range(2):
        r = demo._RecordingSiphon(shared)
        r.reference_set([T("a")])
        r.reference_set([T("a")], stages="bm25-only")
        r.uniform_set(10)
    assert built == [("dynamic", ["a"], "multi-stage"), ("dynamic", ["a"], "bm25-only"), ("uniform", 10, "multi-stage")]
    assert [s["cached"] for s in r.sets] == [True, True, True] and all(s["seconds"] == 0.0 for s in r.sets)


def test_decoded_images_give_the_same_tensors(tmp_path):
    from mgcl.cl.toy import toy_tasks
    from mgcl.models import TinyCLIP, WordTokenizer

    tasks = toy_tasks(1, n_train=2, n_test=2, image_size=32)
    (d,) = demo.decoded_tasks(tasks)
    m = TinyCLIP(WordTokenizer(["a"], context_length=8), vision="cnn", image_size=32, vision_width=8, text_width=8,
                 text_heads=2, text_layers=1, embed_dim=8)
    tf = m.transform(False)
    for i in range(len(tasks[0].test)):
        assert torch.equal(tf(d.test[i][0]), tf(tasks[0].test[i][0])) and d.test[i][1] == tasks[0].test[i][1]
    assert d.test[0][0].dtype == torch.uint8 and d.train.labels == list(tasks[0].train.labels)
    assert type(d.train[0][0]) is type(tasks[0].train[0][0].convert("RGB"))


def test_methods_all_is_the_registry_and_bad_names_fail():
    assert demo.resolve_methods("all") == S.available() == demo.resolve_methods(["all"])
    assert demo.resolve_methods(["l2", "primed"]) == ["l2", "primed"]
    with pytest.raises(ValueError, match="subset"):
        demo.resolve_methods(["finetune", "sgd"])
    with pytest.raises(ValueError, match="seeds"):
        demo.run_demo("unused", seeds=0)
    assert demo.seed_list(demo.settings(), 3) == [42, 43, 44] and demo.SEEDS == 3


def test_methods_needing_transformer_towers_run_on_the_vit_model():
    rows = demo.rows_for(demo.resolve_methods("all"))
    labels = [r[0] for r in rows]
    assert [r[1] for r in rows if r[0] != demo.VIT_ZERO_SHOT] == S.available()
    vit = {r[0] for r in rows if r[2] == "vit"}
    assert vit == {demo.VIT_ZERO_SHOT, "moe-adapters", "diki"}
    assert labels.index(demo.VIT_ZERO_SHOT) == min(labels.index("moe-adapters"), labels.index("diki")) - 1
    assert demo.rows_for(["finetune", "snd"]) == [("finetune", "finetune", "cnn"), ("snd", "snd", "cnn")]
    assert demo.rows_for(["diki"]) == [(demo.VIT_ZERO_SHOT, "zero-shot", "vit"), ("diki", "diki", "vit")]
    cfg = demo.settings(quick=True)
    assert cfg["vit_model"]["vision"] == "vit" and cfg["model"]["vision"] == "cnn"
    assert {"moe-adapters", "diki", "snd", "gift"} <= set(cfg["strategies"]), "the new baselines have demo options"
    assert cfg["strategies"]["snd"] == {"uniform_size": 1500} and demo.settings()["strategies"]["snd"] == {
        "uniform_size": 5000}
    with pytest.raises(ValueError, match="tower"):
        demo.prepare(tower="resnet")


def test_ablation_variants_are_the_papers_groups():
    cfg = demo.settings()
    want = {"losses": 3, "teacher": 2, "regulariser": 3, "retrieval": 3, "reference set": 2}
    assert {g: len(rows) for g, rows in ablate.GROUPS} == want
    assert all(v in ablate.VARIANTS for _, rows in ablate.GROUPS for _, v in rows)
    opts = {v: ablate.variant_options(cfg, v) for v in ablate.VARIANTS}
    for v, o in opts.items():
        S.create("primed", **o)   # every variant is a valid PRIMED
    assert opts["uniform"]["uniform_size"] == cfg["strategies"]["zscl"]["uniform_size"]
    assert opts["bm25-only"]["stages"] == "bm25-only" and opts["ckt-only"]["cmc"] is False
    with pytest.raises(ValueError, match="variants"):
        ablate.run_ablation("unused", variants=["nope"])
