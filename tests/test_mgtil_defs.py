"""MGTIL benchmark definitions and the data-root check / loaders, on generated miniature roots."""
import csv
import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from mgcl.cli import main
from mgcl.mgtil import benchmarks as B
from mgcl.mgtil import data as D

# SPEC.md section 7, restated: name -> (domain, classes, images)
SPEC = {
    "RANZCR": ("x-ray", 11, 33_665), "CheXchoNet": ("x-ray", 4, 71_589), "PD": ("x-ray", 3, 4_575),
    "BreakHis": ("pathology", 2, 7_909), "Chaoyang": ("pathology", 4, 6_160),
    "NuCLS": ("pathology", 2, 33_284), "EyePACS": ("fundus", 5, 35_126), "AIROGS": ("fundus", 2, 101_442),
    "FARFUM-RoP": ("fundus", 3, 1_533),
    "AOD": ("fundus", 8, 10_000), "BMC": ("cytology", 21, 171_375), "ISIC2024": ("dermoscopy", 33, 81_722),
    "NCT-CRC-HE-100K": ("pathology", 9, 100_000), "NIH ChestX-ray": ("x-ray", 15, 112_120),
    "PITVIS": ("endoscopy", 15, 120_024),
}
HMT_SPEC_ORDER = ["RANZCR", "CheXchoNet", "PD", "BreakHis", "Chaoyang", "NuCLS", "EyePACS", "AIROGS", "FARFUM-RoP"]
MEDX = ["AOD", "BMC", "ISIC2024", "NCT-CRC-HE-100K", "NIH ChestX-ray", "PITVIS"]


# ---- definitions ------------------------------------------------------------------------

def test_every_dataset_matches_spec():
    real = {d.name: d for d in B.all_real_datasets()}
    assert set(real) == set(SPEC)
    for name, (domain, n_classes, n_images) in SPEC.items():
        d = real[name]
        assert d.domain == domain, name
        assert d.num_classes == n_classes == len(d.prompt_names), name
        assert d.n_images == n_images, name
        assert d.n_train is None and d.n_test is None, f"{name}: SPEC.md gives no split sizes"
        assert not d.synthetic
        assert len(d.templates) >= 2 and all(t.count("{}") == 1 for t in d.templates)
        assert d.prompts()[0] == d.templates[0].format(d.prompt_names[0])


def test_hmt_orders():
    assert B.HMT_ORDER1.names == HMT_SPEC_ORDER
    assert B.HMT_ORDER2.names == sorted(HMT_SPEC_ORDER, key=str.casefold)
    assert B.HMT_ORDER2.names == ["AIROGS", "BreakHis", "Chaoyang", "CheXchoNet", "EyePACS", "FARFUM-RoP",
                                 "NuCLS", "PD", "RANZCR"]
    for b in (B.HMT_ORDER1, B.HMT_ORDER2):
        assert sorted(b.names) == sorted(HMT_SPEC_ORDER) and len(set(b.names)) == 9


def test_medxtreme_orders_and_seed():
    assert B.MEDX_ORDER1.names == MEDX == sorted(MEDX, key=str.casefold)
    again = [d.name for d in B.seeded_permutation(B.MEDX_DATASETS, B.MEDX_ORDER2_SEED, B.MEDX_ORDER2_SALT)]
    assert again == list(B.MEDX_ORDER2_NAMES) == B.MEDX_ORDER2.names
    assert B.MEDX_ORDER2.names == ["BMC", "NCT-CRC-HE-100K", "PITVIS", "AOD", "ISIC2024", "NIH ChestX-ray"]
    assert sorted(B.MEDX_ORDER2.names) == sorted(MEDX) and B.MEDX_ORDER2.names != MEDX
    assert B.MEDX_ORDER2.seed == B.MEDX_ORDER2_SEED and str(B.MEDX_ORDER2_SEED) in B.MEDX_ORDER2.order
    other = [d.name for d in B.seeded_permutation(B.MEDX_DATASETS, 3, B.MEDX_ORDER2_SALT)]
    assert other != again and sorted(other) == sorted(MEDX)


def test_get_benchmark_names_and_aliases():
    assert B.get_benchmark("HMT-I") is B.HMT_ORDER1
    assert B.get_benchmark("medxtreme-ii") is B.MEDX_ORDER2
    assert B.get_benchmark("mgtil-synth").synthetic
    assert "SYNTHETIC" in B.get_benchmark("mgtil-synth-quick").display_name
    with pytest.raises(ValueError, match="available: hmt-order1"):
        B.get_benchmark("hmt-3")
    # SPEC.md's spellings, loosely
    for name, want in (("HieraMedTransfer Order I", B.HMT_ORDER1), ("HieraMedTransfer Order II", B.HMT_ORDER2),
                       ("hmt_order2", B.HMT_ORDER2), ("HMT", B.HMT_ORDER1), ("MedXtreme", B.MEDX_ORDER1),
                       ("MedXtreme Order II", B.MEDX_ORDER2), ("medx2", B.MEDX_ORDER2)):
        assert B.get_benchmark(name) is want, name
    assert B.get_benchmark("MGTIL_Synth").name == "mgtil-synth"
    for bad in ("hmt-iii", "medx-i2", "hmt order 3"):
        with pytest.raises(ValueError):
            B.get_benchmark(bad)


def test_domains_are_specs_and_resolve_in_the_question_pool():
    from mgcl.retrieval import pool

    hmt = B.HMT_ORDER1.datasets
    assert [d.domain for d in hmt] == ["x-ray"] * 3 + ["pathology"] * 3 + ["fundus"] * 3
    known = pool.domains(pool.load_pool(None))
    for d in B.all_real_datasets():
        assert d.domain in B.DOMAINS
        assert pool.resolve_domain(d.domain, known) is not None, f"{d.name}: the Siphon's Phi_D cannot map {d.domain!r}"


def test_label_resolution():
    for d in B.all_real_datasets():
        r = D.LabelResolver(d)          # raises when two classes share a normalised name
        for i, (label, prompt) in enumerate(zip(d.classes, d.prompt_names)):
            for text in (label, prompt, label.upper(), D.normalise_label(label), f" {i} ", str(i)):
                assert r(text) == i, (d.name, text)
        for alias, label in d.aliases:
            assert r(alias) == d.classes.index(label)
        for bad in ("", "-1", str(d.num_classes), "no such class"):
            assert r(bad) is None, (d.name, bad)
    r = D.LabelResolver(B.RANZCR)
    assert r("ETT - Abnormal") == r("ett_abnormal") == r("ETT-abnormal") == 0
    assert D.LabelResolver(B.EYEPACS)("4") == 4


def test_definition_errors():
    with pytest.raises(ValueError, match="prompt names"):
        dataclasses.replace(B.PD, prompt_names=("a", "b"))
    with pytest.raises(ValueError, match="exactly one"):
        dataclasses.replace(B.PD, templates=("no slot",))
    clash = dataclasses.replace(B.PD, classes=("COVID-19", "covid 19", "Normal"))
    with pytest.raises(ValueError, match="names two classes"):
        D.LabelResolver(clash)


def _import_graph():
    """module -> the mgcl modules it imports (top level or inside functions), read from the source.
    Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, so a module's
    imports include the packages above each target that are not above itself."""
    import ast
    from pathlib import Path

    import mgcl

    root = Path(mgcl.__file__).parent
    files = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = f
    graph = {}
    for mod, f in files.items():
        pkg = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        deps = set()
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.ImportFrom) and n.level:
                base = ".".join(pkg[:len(pkg) - n.level + 1] + ([n.module] if n.module else []))
                for a in n.names:
                    deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base)
            elif isinstance(n, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]
                deps.update(x for x in names if x in files)
        above = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}
        for d in list(deps):
            deps.update(".".join(d.split(".")[:i]) for i in range(1, d.count(".") + 1))
        graph[mod] = deps - above - {mod}
    return graph


def test_no_import_cycle_in_the_package():
    """No module reaches itself through imports, lazy ones included (they were how
    benchmarks / data / synth held together)."""
    graph = _import_graph()
    cycles = []

    def visit(m, path, done):
        for d in graph.get(m, ()):
            if d in path:
                cycles.append(path[path.index(d):] + [d])
            elif d not in done:
                done.add(d)
                visit(d, path + [d], done)

    for m in graph:
        visit(m, [m], {m})
    assert not cycles, cycles[:3]
    assert graph["mgcl.mgtil.benchmarks"] == set(), "the benchmark definitions are data: they import nothing of mgcl"
    assert "mgcl.mgtil.run" not in graph["mgcl.mgtil.demo"], "the demo does not import the run command"


def test_synthetic_benchmarks_are_definitions_too():
    """get_benchmark("mgtil-synth") answers from the definitions, without the generator."""
    import subprocess
    import sys

    code = ("import sys; from mgcl.mgtil import benchmarks as B; b = B.get_benchmark('mgtil-synth'); "
            "q = B.get_benchmark('mgtil-synth-quick'); print(b.synthetic, len(q.datasets), "
            "'mgcl.mgtil.synth' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", str(len(B.SYNTH_TASKS)), "False"]
    assert B.benchmark_names()[-2:] == ["mgtil-synth", "mgtil-synth-quick"]
    for quick, b in ((False, B.MGTIL_SYNTH), (True, B.MGTIL_SYNTH_QUICK)):
        sz = B.SYNTH_SIZES[quick]
        assert [d.name for d in b.datasets] == [t.name for t in B.SYNTH_TASKS]
        assert [d.n_train for d in b.datasets] == [sz["train"] * len(t.classes) for t in B.SYNTH_TASKS]
        assert all(d.synthetic and "SYNTHETIC" in d.source for d in b.datasets)


# ---- miniature roots --------------------------------------------------------------------------

def _png(path, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(path)


def _make(root, ds, per_class=2, layout="folders", seed=0):
    """ROOT/<ds>/{train,test} with ``per_class`` tiny PNGs per class; csv labels cycle
    through label / slug / index / prompt name spellings."""
    rng = np.random.default_rng(seed)
    ddir = root / ds.name
    for split in D.SPLITS:
        rows = []
        for i, label in enumerate(ds.classes):
            folder = label if i % 2 == 0 else D.normalise_label(label)
            for j in range(per_class):
                if layout == "folders":
                    _png(ddir / split / folder / f"{j}.png", rng)
                else:
                    rel = f"images/{split}/{i}_{j}.png"
                    _png(ddir / rel, rng)
                    spelling = (label, D.normalise_label(label), str(i), ds.prompt_names[i])[(i + j) % 4]
                    rows.append((rel, spelling))
        if layout == "csv":
            with open(ddir / f"{split}.csv", "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["path", "label", "extra"])
                w.writerows((p, lab, "x") for p, lab in rows)


def _small(bench, per_class=2):
    """The benchmark with expected sizes of a miniature root."""
    ds = tuple(dataclasses.replace(d, n_images=2 * per_class * d.num_classes) for d in bench.datasets)
    return dataclasses.replace(bench, datasets=ds)


def test_clean_miniature_root_checks_and_loads(tmp_path):
    bench = _small(B.HMT_ORDER1)
    for k, d in enumerate(bench.datasets):
        _make(tmp_path, d, layout="csv" if k % 2 else "folders", seed=k)
    rep = D.check(tmp_path, bench)
    assert rep.ok and rep.problems == [], rep.format()
    assert [r.status for r in rep.datasets] == ["ok"] * 9
    assert {r.splits["train"].layout for r in rep.datasets} == {"folders", "csv"}
    tasks = D.load_benchmark(bench, tmp_path)
    assert [t.name for t in tasks] == HMT_SPEC_ORDER
    for t, d in zip(tasks, bench.datasets):
        assert t.domain == d.domain and list(t.classnames) == list(d.prompt_names)
        assert len(t.train) == len(t.test) == 2 * d.num_classes
        assert sorted(t.train.labels) == sorted(list(range(d.num_classes)) * 2)
        img, y = t.test[len(t.test) - 1]
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (6, 6)
        assert isinstance(y, int) and 0 <= y < d.num_classes
        assert t.meta["dataset"] == d.name and t.meta["synthetic"] is False
    # csv rows map to the right class whatever spelling the label used
    t = tasks[1]
    for p, y in zip(t.train.paths, t.train.labels):
        assert os.path.basename(p).startswith(f"{y}_")


def test_planted_problems_are_each_reported(tmp_path):
    bench = _small(B.HMT_ORDER1)
    defs = {d.name: d for d in bench.datasets}
    for k, d in enumerate(bench.datasets):
        if d.name != "PD":                                    # missing dataset
            _make(tmp_path, d, layout="csv" if d.name in ("EyePACS", "AIROGS", "NuCLS") else "folders", seed=k)
    rng = np.random.default_rng(9)
    import shutil

    shutil.rmtree(tmp_path / "CheXchoNet" / "test")           # missing split
    _png(tmp_path / "BreakHis" / "train" / "malignent" / "x.png", rng)          # unknown class folder
    shutil.rmtree(tmp_path / "Chaoyang" / "train" / "adenoma")                  # missing class
    _png(tmp_path / "RANZCR" / "test" / "ETT - Normal" / "extra.png", rng)      # wrong count
    with open(tmp_path / "EyePACS" / "train.csv", "a", newline="") as fh:       # bad csv labels
        csv.writer(fh).writerows([("images/train/0_0.png", "grade9"), ("images/train/0_1.png", "-1")])
    with open(tmp_path / "AIROGS" / "test.csv", "a", newline="") as fh:         # csv path that does not exist
        csv.writer(fh).writerow(("images/test/gone.png", "RG"))
    (tmp_path / "NuCLS" / "test.csv").write_text("file,class\na.png,tumor\n")  # csv without path/label
    (tmp_path / "FARFUM-RoP" / "train" / "Plus" / "notes.txt").write_text("ignored: not an image")

    rep = D.check(tmp_path, bench)
    got = {(p.dataset, p.split, p.kind) for p in rep.problems}
    expected = {
        ("PD", None, "missing-dataset"),
        ("CheXchoNet", "test", "missing-split"),
        ("BreakHis", "train", "unknown-class"),     # (its image is not counted: no count problem)
        ("Chaoyang", "train", "missing-class"),
        ("Chaoyang", None, "count"),
        ("RANZCR", None, "count"),
        ("EyePACS", "train", "bad-label"),
        ("AIROGS", "test", "missing-file"),
        ("AIROGS", None, "count"),
        ("NuCLS", "test", "bad-csv"),
    }
    assert got == expected, rep.format()
    by = {(p.dataset, p.kind): p for p in rep.problems}
    assert "'malignent'" in by[("BreakHis", "unknown-class")].message
    assert "adenoma" in by[("Chaoyang", "missing-class")].message
    assert "45 images (train 22 + test 23), expected 44" in by[("RANZCR", "count")].message
    assert "'grade9'" in by[("EyePACS", "bad-label")].message and "2 row(s)" in by[("EyePACS", "bad-label")].message
    assert "gone.png" in by[("AIROGS", "missing-file")].message
    assert by[("Chaoyang", "missing-class")].severity == "warning"
    assert by[("RANZCR", "count")].severity == "warning"
    assert {p.severity for p in rep.errors} == {"error"} and len(rep.errors) == 6
    sm = rep.summary()
    assert sm["present"] == [n for n in HMT_SPEC_ORDER if n != "PD"]
    assert sm["missing"] == ["CheXchoNet/test", "PD", "AIROGS/test (files named in the csv)"]
    assert sm["mismatched"] == {"BreakHis": ["class names"], "Chaoyang": ["class names", "counts"],
                                "RANZCR": ["counts"], "EyePACS": ["class names"], "AIROGS": ["counts"],
                                "NuCLS": ["csv format"]}
    assert "present:    8 of 9 datasets: RANZCR," in rep.format()
    assert "missing:    CheXchoNet/test, PD, AIROGS/test" in rep.format()
    assert "mismatched: " in rep.format() and "Chaoyang (class names, counts)" in rep.format()
    status = {r.dataset.name: r.status for r in rep.datasets}
    assert status["PD"] == "MISSING" and status["FARFUM-RoP"] == "ok" and status["RANZCR"] == "warning"
    assert status["BreakHis"] == "ERROR" and not rep.ok
    text = rep.format()
    for p in rep.problems:
        assert str(p) in text
    with pytest.raises(ValueError) as e:
        D.load_benchmark(bench, tmp_path)
    for p in rep.errors:
        assert str(p) in str(e.value)
    # a dataset without errors still loads on its own, warnings travel in meta
    t = D.load_task(defs["RANZCR"], tmp_path)
    assert len(t.test) == 2 * 11 + 1 and t.meta["warnings"]
    js = rep.to_dict()
    assert js["n_errors"] == 6 and json.dumps(js)


def test_real_definitions_on_miniature_root_and_cli(tmp_path, capsys):
    for k, d in enumerate(B.MEDX_ORDER2.datasets):
        _make(tmp_path, d, per_class=1, seed=k)
    rep = D.check(tmp_path, "medxtreme-order2")
    assert rep.ok and [r.dataset.name for r in rep.datasets] == B.MEDX_ORDER2.names
    assert {(p.dataset, p.kind) for p in rep.problems} == {(n, "count") for n in MEDX}   # a miniature root
    out = tmp_path / "report.json"
    (tmp_path / "ranzcr").mkdir()
    assert main(["mgtil", "check", "--root", str(tmp_path), "--benchmark", "medx-2", "--json", str(out)]) == 0
    assert main(["mgtil", "check", "--root", str(tmp_path), "--benchmark", "medx-2", "--strict"]) == 1
    printed = capsys.readouterr().out
    assert "ISIC2024" in printed and "33/33" in printed and "expected 81,722 in all" in printed
    assert json.loads(out.read_text())["benchmark"] == "medxtreme-order2"
    # every real dataset by default: the HMT ones are missing here
    assert main(["mgtil", "check", "--root", str(tmp_path)]) == 1
    printed = capsys.readouterr().out
    assert "RANZCR" in printed and "missing-dataset" in printed and "found 'ranzcr': rename it to 'RANZCR'" in printed
    assert main(["mgtil", "check", "--root", str(tmp_path / "nope")]) == 2
    assert main(["mgtil", "check", "--root", str(tmp_path), "--benchmark", "nope"]) == 2
    assert main(["mgtil", "list", "--benchmark", "mgtil-synth"]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
