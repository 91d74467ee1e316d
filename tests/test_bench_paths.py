"""`mgcl bench paths`: macro AUC against scikit-learn, reference decoding in one thread and in the pool."""
import json


def test_paths_bench_checks_its_values_and_prints_a_table(one_thread):
    from mgcl.bench import paths

    res = paths.run(scale=0.01, repeats=1)
    assert [r["impl"] for r in res["rows"]][:2] == ["macro_auc, scikit-learn", "macro_auc, mgcl"]
    assert [r["path"] for r in res["rows"]] == ["macro_auc"] * 2 + ["reference decode"] * 2
    assert res["config"]["auc_n"] == 200 and res["config"]["images"] == 4
    assert res["checks"]["auc_equal"] and res["checks"]["same_batches"]
    assert all(r["median"] > 0 for r in res["rows"]) and res["target"]["target"] == 1.5
    text = paths.table(res)
    assert "scikit-learn" in text and "equal" in text and "the same" in text
    json.dumps(res)
