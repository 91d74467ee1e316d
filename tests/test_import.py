"""Importing mgcl works everywhere: no GPU, no _C_cuda, no _C at all."""
import os
import subprocess
import sys
import textwrap

import pytest


def run_py(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_import_without_gpu_does_not_initialise_cuda():
    r = run_py(
        """
        import torch, mgcl
        g = [torch.ones(3)]; p = [torch.ones(3)]; a = [torch.zeros(3)]
        mgcl.fisher_guard(g, p, a, lam=1.0, mode="l2")
        assert not torch.cuda.is_initialized(), "importing/using mgcl on CPU initialised CUDA"
        print("ok", g[0].tolist())
        """,
        {"CUDA_VISIBLE_DEVICES": ""},
    )
    assert r.returncode == 0, r.stderr
    assert "ok [3.0, 3.0, 3.0]" in r.stdout


def test_import_with_cuda_module_missing_is_silent():
    r = run_py(
        """
        import sys, warnings
        sys.modules["mgcl._C_cuda"] = None   # makes 'import mgcl._C_cuda' raise ImportError
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import mgcl
            from mgcl import _native, _backend
        assert not _native.HAS_C_CUDA
        assert not [x for x in w if "mgcl" in str(x.message)], [str(x.message) for x in w]
        from mgcl.ops.fisher_guard import BACKENDS
        print(_backend.select("fisher_guard", BACKENDS, "cuda"), _backend.select("fisher_guard", BACKENDS, "cpu"))
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["torch", "cpp"]


def test_import_with_cpu_module_missing_warns_once_and_falls_back():
    r = run_py(
        """
        import sys, warnings, torch
        sys.modules["mgcl._C"] = None
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import mgcl
            import mgcl.guard, mgcl.ops.fisher_guard, mgcl.cli
        msgs = [str(x.message) for x in w if "mgcl._C" in str(x.message)]
        assert len(msgs) == 1, msgs
        from mgcl import _backend
        from mgcl.ops.fisher_guard import BACKENDS
        assert _backend.select("fisher_guard", BACKENDS, "cpu") == "torch"
        g = [torch.ones(4)]; p = [torch.full((4,), 2.0)]; a = [torch.zeros(4)]
        pen = mgcl.fisher_guard(g, p, a, lam=0.5)       # dfg: W = 1
        print(float(pen), g[0].tolist())
        """
    )
    assert r.returncode == 0, r.stderr
    # W = 1, d = 2: grad = 1 + 2*0.5*1*2 = 3; penalty = 0.5 * 4 * (1*4) = 8
    assert r.stdout.split()[0] == "8.0"
    assert "[3.0, 3.0, 3.0, 3.0]" in r.stdout


def test_mgcl_info_runs_and_names_backends():
    r = subprocess.run([sys.executable, "-m", "mgcl", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for word in ("mgcl", "torch", "triton", "python", "mgcl._C", "mgcl._C_cuda", "GPU", "fisher_guard"):
        assert word in r.stdout
    r = subprocess.run([sys.executable, "-m", "mgcl", "info", "--json"], capture_output=True, text=True, timeout=120)
    import json

    info = json.loads(r.stdout)
    assert info["backends"]["fisher_guard"]["cpu"] in ("cpp", "torch")


def test_import_loads_ops_nn_and_guard_only():
    r = run_py(
        """
        import sys, json
        import mgcl
        loaded = sorted(m for m in sys.modules if m.startswith("mgcl"))
        print(json.dumps(loaded))
        trainer = mgcl.ContinualTrainer          # loads mgcl.cl on first use
        from mgcl import Task
        assert trainer.__module__ == "mgcl.cl.trainer" and Task.__module__ == "mgcl.cl.tasks"
        assert "mgcl.cl.trainer" in sys.modules
        try:
            mgcl.NoSuchThing
        except AttributeError as exc:
            assert "NoSuchThing" in str(exc)
        else:
            raise AssertionError("mgcl.NoSuchThing did not raise")
        """
    )
    assert r.returncode == 0, r.stderr
    import json

    loaded = json.loads(r.stdout.splitlines()[0])
    rooms = {m.split(".")[1] for m in loaded if m.count(".") >= 1}
    assert rooms <= {"_C", "_C_cuda", "_backend", "_native", "_version", "guard", "nn", "ops"}, loaded
    assert not [m for m in loaded if m.startswith(("mgcl.cl", "mgcl.retrieval", "mgcl.models", "mgcl.mgtil",
                                                   "mgcl.bench", "mgcl.cli"))]
