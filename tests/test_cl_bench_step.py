"""`mgcl bench step`: FT vs PRIMED training-step times on TinyCLIP (CPU)."""
import json
import subprocess
import sys


def test_step_bench_runs_the_real_steps_and_prints_a_table(one_thread):
    from mgcl.bench import step

    res = step.run(device="cpu", scale=0.1, repeats=1)
    impls = [r["impl"] for r in res["rows"]]
    assert impls == ["finetune", "primed", "primed, ref batch 2", "primed-reference", "primed, teacher recomputed"]
    assert res["config"]["model"] == "tinyclip" and res["config"]["batch"] == 6
    assert all(r["median"] > 0 and r["n"] >= 1 for r in res["rows"])
    assert res["rows"][0]["vs_finetune"] == 1.0
    assert res["target"]["applies"] is False and res["target"]["target"] == 1.3
    text = step.table(res)
    assert "finetune" in text and "PRIMED / FT" in text and "not a GPU run" in text
    json.dumps(res, default=str)


def test_cli_bench_step_json(tmp_path):
    out = tmp_path / "step.json"
    r = subprocess.run([sys.executable, "-m", "mgcl", "bench", "step", "--scale", "0.07", "--repeats", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "primed" in r.stdout and json.load(open(out))["bench"] == "step"
