"""mgcl._env: one cache directory, one machine description, one versions dict,
used by every room (models, mgtil-synth, the demo, the benches)."""
import os
from pathlib import Path

import pytest

from mgcl import _env


@pytest.mark.parametrize("env, want", [
    ({"MGCL_CACHE": "/tmp/m", "XDG_CACHE_HOME": "/tmp/x"}, "/tmp/m"),
    ({"XDG_CACHE_HOME": "/tmp/x"}, "/tmp/x/mgcl"),
    ({}, os.path.join(os.path.expanduser("~"), ".cache", "mgcl")),
])
def test_cache_dir_honours_mgcl_cache_then_xdg(monkeypatch, env, want):
    from mgcl.mgtil import demo, synth
    from mgcl.models import openclip

    for k in ("MGCL_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    root = Path(want)
    assert _env.cache_dir() == root and _env.cache_dir("a", "b") == root / "a" / "b"
    # every room asks the one function: the demo's cache, mgtil-synth's and the models' agree
    assert demo.cache_root() == root
    assert synth.default_cache_dir(3, True) == root / "synth" / f"v{synth.VERSION}-seed3-quick"
    seen = []
    monkeypatch.setattr(openclip, "_atomic_dir", lambda final, fill: seen.append(final) or final)
    monkeypatch.setattr(openclip, "_hf_cached_tokenizer_dir", lambda: None)
    openclip.biomedbert_dir()
    assert seen == [str(root / "models" / "biomedbert-base-uncased-offline-vocab")]


def test_machine_and_versions():
    import torch

    from mgcl.bench import harness

    m = _env.machine("cpu")
    assert harness.machine is _env.machine, "the benches use the one machine description"
    assert m["device"] == "cpu" and m["cpu_count"] == os.cpu_count() and m["torch"] == torch.__version__
    assert m["memory_gib"] > 0 and m["cpu"] and isinstance(m["mgcl_C"], bool) and m["gpu"] is None
    v = _env.versions()
    assert v["torch"] == torch.__version__ and v["mgcl"] and set(v) >= {"python", "numpy", "open_clip_torch"}
    assert _env.memory_bytes("cpu") == int(m["memory_gib"] * 2**30) or abs(_env.memory_bytes("cpu") / 2**30
                                                                           - m["memory_gib"]) < 0.1


def test_env_is_a_leaf():
    """It imports only the other leaves (``_version``, ``_native``), so every room may import it."""
    import ast

    import mgcl._env as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    inner = {(n.level, n.module) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    named = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module is None
             for a in n.names}
    assert inner <= {(1, "_version"), (1, None)} and named <= {"_native"}, (inner, named)
