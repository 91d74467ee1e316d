"""Shared by the run tests: one `mgcl demo --quick` per test session, used by
test_demo.py and test_run.py (each wraps ``quick_demo`` in a session fixture;
the work is memoised here, so it runs once; it runs from a cold cache in a
temporary directory, through the command line, like CI's smoke test), and
``miniature_root``, a data root of random images for a few real datasets."""
from __future__ import annotations

import contextlib
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

_MEMO: dict = {}
SEEDS = 2   # the session's demo runs 2 training seeds (the default is 3): enough to test the seeds, and cheaper


@dataclass
class QuickDemo:
    out: Path           # --out DIR
    cache: Path         # the MGCL_CACHE it ran with
    stdout: str         # what `mgcl demo` printed
    rc: int
    seconds: float

    @property
    def assets(self) -> Path:
        return self.cache / "demo" / "v1-seed0-quick"


def quick_demo(tmp_path_factory) -> QuickDemo:
    if "demo" not in _MEMO:
        from mgcl import cli

        base = tmp_path_factory.mktemp("quick-demo")
        cache, out = base / "cache", base / "out"
        old = os.environ.get("MGCL_CACHE")
        os.environ["MGCL_CACHE"] = str(cache)
        buf = io.StringIO()
        t0 = time.time()
        try:
            with contextlib.redirect_stdout(buf):
                rc = cli.main(["demo", "--quick", "--out", str(out), "--no-progress", "--seeds", str(SEEDS)])
        finally:
            if old is None:
                os.environ.pop("MGCL_CACHE", None)
            else:
                os.environ["MGCL_CACHE"] = old
        _MEMO["demo"] = QuickDemo(out, cache, buf.getvalue(), rc, time.time() - t0)
    return _MEMO["demo"]


def miniature_root(root: Path, datasets, per_class: int, seed: int = 0) -> None:
    """ROOT/<dataset>/{train,test}/<class>/<j>.png: ``per_class`` random 8x8 images per class and split."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for d in datasets:
        for split in ("train", "test"):
            for label in d.classes:
                folder = root / d.name / split / label
                folder.mkdir(parents=True)
                for j in range(per_class):
                    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{j}.png")
