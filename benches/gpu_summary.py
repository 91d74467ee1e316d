"""The summary table benches/gpu_check.sh prints last: each step's status, the
tests' counts and failures (from the junit XML), and each bench row's wall
and device (CUDA events) time (from the bench JSON).

    python benches/gpu_summary.py OUT STATUS_FILE
"""
import json
import os
import sys
import xml.etree.ElementTree as ET


def tests(path: str) -> list[str]:
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return ["tests: no junit XML (the step did not run to pytest's end)"]
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return [f"tests: unreadable junit XML ({exc})"]
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    lines = [f"tests: {passed} passed, {count['failures']} failed, {count['errors']} errors, "
             f"{count['skipped']} skipped"]
    for case in root.iter("testcase"):
        for bad in ("failure", "error"):
            el = case.find(bad)
            if el is not None:
                msg = (el.get("message") or "").splitlines()[0][:160] if el.get("message") else ""
                lines.append(f"  {bad.upper()} {case.get('classname', '')}::{case.get('name', '')}: {msg}")
    return lines


def ms(v):
    return "-" if v is None else f"{1e3 * v:.3f}"


def benches(out: str) -> list[str]:
    lines = []
    for name in sorted(os.listdir(out)):
        if not (name.startswith("bench_") and name.endswith(".json")):
            continue
        path = os.path.join(out, name)
        if os.path.getsize(path) == 0:
            lines.append(f"{name}: empty (the bench did not finish)")
            continue
        try:
            result = json.load(open(path))
        except (OSError, ValueError) as exc:
            lines.append(f"{name}: unreadable ({type(exc).__name__})")
            continue
        gpu = result.get("machine", {}).get("gpu", "?")
        lines.append(f"{result.get('bench', name)} on {gpu}: wall ms / device ms (CUDA events) per row")
        for r in result.get("rows", []):
            what = " ".join(f"{k}={r[k]}" for k in ("B", "stage", "method") if k in r)
            lines.append(f"  {r.get('impl', '?'):<14} {what:<10} {ms(r.get('median')):>10} / "
                         f"{ms(r.get('device_median')):>10}  {r.get('status', 'ok')}")
        host = result.get("host")
        if host:
            lines.append(f"  FisherGuard.apply() host: same grads {1e6 * host['same_grads_host']:.0f} us, "
                         f"new grads {1e6 * host['new_grads_host']:.0f} us"
                         + (f", zero_grad loop {1e6 * host['zero_grad_loop_host']:.0f} us"
                            if "zero_grad_loop_host" in host else "")
                         + (f" ({1e6 * host['zero_grad_loop_read_host']:.0f} us with the grads read first)"
                            if "zero_grad_loop_read_host" in host else ""))
    return lines or ["benches: no bench JSON"]


def main(out: str, status_file: str) -> None:
    with open(status_file) as fh:
        steps = [line.rstrip("\n") for line in fh if line.strip()]
    lines = ["== summary", "step                          status"] + steps
    lines += tests(os.path.join(out, "tests.xml")) + benches(out)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
