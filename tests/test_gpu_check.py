"""benches/gpu_check.sh as a dry run on the CPU: its order, each step's time
budget, the commands it would run, the files it writes, its exit status; and
the summary it prints from real junit XML and bench JSON."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benches" / "gpu_check.sh"
STEPS = ["build", "tests", "memcheck", "racecheck", "bench_fisher_guard", "bench_similarity_topk",
         "bench_contrastive_distill", "bench_step"]
FILES = {"build.log", "tests.log", "tests.xml", "log.txt", "bench_fisher_guard.json", "bench_similarity_topk.json",
         "bench_contrastive_distill.json", "bench_step.json"}
DEVICE_LIMIT_S = 600  # one device command


def dry_run(tmp_path, **env):
    out = tmp_path / "out"
    e = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **{k: str(v) for k, v in env.items()}}
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=e, cwd=ROOT,
                       timeout=120)
    plan = re.findall(r"^== (\w+) \(budget (\d+) s of (\d+) s\): (.*)$", r.stdout, flags=re.M)
    return r, out, [(name, int(b), int(lim), cmd) for name, b, lim, cmd in plan]


def test_order_budgets_commands_and_files(tmp_path):
    r, out, plan = dry_run(tmp_path)
    assert r.returncode == 0, r.stderr
    assert [p[0] for p in plan] == STEPS
    assert r.stdout.rstrip().splitlines()[-1].startswith("bench_step.json"), "the summary comes last"
    assert r.stdout.index("== summary") > r.stdout.index("== bench_step")
    # every step gets its whole limit, and the limits fit one device command with room to spare
    assert all(b == lim for _, b, lim, _ in plan)
    assert sum(b for _, b, _, _ in plan) <= 570 < DEVICE_LIMIT_S
    cmds = {name: cmd for name, _, _, cmd in plan}
    assert all(cmd.startswith(f"timeout -s INT -k 10 {b} ") for (_, b, _, cmd) in plan), "SIGINT on timeout"
    assert "MGCL_CUDA=ON" in cmds["build"]
    tests = cmds["tests"]
    assert "MGCL_TRITON_ONE_CONFIG=1" in tests and " -m gpu " in tests and f"--junitxml={out}/tests.xml" in tests
    files = re.findall(r"tests/test_\w+\.py", tests)
    assert files[:2] == ["tests/test_similarity_topk.py", "tests/test_fisher_guard.py"]
    assert files.index("tests/test_contrastive_distill.py") > 1, "the Triton tests after the CUDA ones"
    assert "compute-sanitizer --tool memcheck" in cmds["memcheck"] and "benches/sanitize_cases.py" in cmds["memcheck"]
    assert "compute-sanitizer --tool racecheck" in cmds["racecheck"]
    for op in ("fisher_guard", "similarity_topk", "contrastive_distill", "step"):
        assert f"mgcl bench {op} --device cuda --repeats 3 --json {out}/bench_{op}.json" in cmds[f"bench_{op}"]
    assert {p.name for p in out.iterdir()} == FILES and len(FILES) <= 8
    status = dict(re.findall(r"^(\w+)\s+(ok|failed.*|timed out.*)$", r.stdout, flags=re.M))
    assert [status[s] for s in STEPS] == ["ok"] * len(STEPS)


def test_a_step_that_times_out_is_listed_and_the_run_still_exits_0(tmp_path):
    r, out, plan = dry_run(tmp_path, MGCL_GPU_FAKE_RC_tests=124, MGCL_GPU_FAKE_RC_bench_step=1)
    assert r.returncode == 0
    assert re.search(r"^tests\s+timed out: SIGINT after 170 s$", r.stdout, flags=re.M)
    assert re.search(r"^bench_step\s+failed \(exit status 1\)$", r.stdout, flags=re.M)
    assert [p[0] for p in plan] == STEPS, "the later steps still run"


def test_a_failed_build_returns_its_log_and_exits_1(tmp_path):
    r, out, plan = dry_run(tmp_path, MGCL_GPU_FAKE_RC_build=2)
    assert r.returncode == 1
    assert [p[0] for p in plan] == ["build"]
    assert (out / "build.log").exists() and "could not run: the build failed" in r.stdout


def test_a_short_deadline_cuts_the_later_steps(tmp_path):
    r, out, plan = dry_run(tmp_path, MGCL_GPU_DEADLINE=300)
    assert r.returncode == 0
    budgets = [b for _, b, _, _ in plan]
    assert sum(budgets) <= 300 - 10 + len(budgets)  # each step at least 1 s
    assert budgets[0] == 140 and min(budgets) >= 1


def test_summary_from_junit_and_bench_json(tmp_path):
    sys.path.insert(0, str(ROOT / "benches"))
    try:
        import gpu_summary
    finally:
        sys.path.pop(0)
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_fisher_guard" name="test_a"/>'
        '<testcase classname="tests.test_fisher_guard" name="test_b"><failure message="assert 1 == 2&#10;more"/>'
        '</testcase><testcase classname="t" name="c"><skipped/></testcase><testcase classname="t" name="d"/>'
        '</testsuite></testsuites>')
    (tmp_path / "bench_fisher_guard.json").write_text(json.dumps({
        "bench": "fisher_guard", "machine": {"gpu": "NVIDIA H200"},
        "rows": [{"impl": "cuda", "median": 0.002, "device_median": 0.0015, "status": "ok"},
                 {"impl": "inf-cl", "status": "error: ValueError: boom"}],
        "host": {"same_grads_host": 6e-5, "new_grads_host": 9e-5}}))
    status = tmp_path / "status"
    status.write_text("build                         ok\ntests                         timed out: SIGINT after 170 s\n")
    text = subprocess.run([sys.executable, str(ROOT / "benches" / "gpu_summary.py"), str(tmp_path), str(status)],
                          capture_output=True, text=True, check=True).stdout
    assert "tests: 2 passed, 1 failed, 0 errors, 1 skipped" in text
    assert "FAILURE tests.test_fisher_guard::test_b: assert 1 == 2" in text
    assert re.search(r"cuda\s+2\.000 /\s+1\.500\s+ok", text)
    assert "error: ValueError: boom" in text and "same grads 60 us, new grads 90 us" in text
    assert "timed out: SIGINT after 170 s" in text
    assert gpu_summary.tests(str(tmp_path / "missing.xml"))[0].startswith("tests: no junit XML")


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="needs bash")
def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
