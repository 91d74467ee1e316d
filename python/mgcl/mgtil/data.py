"""A user's data root, read against the benchmark definitions.

Layout (per dataset, per split; ``split`` is ``train`` or ``test``)::

    ROOT/<dataset>/<split>/<class>/<image>       # folder layout
    ROOT/<dataset>/<split>.csv                    # csv layout: columns path,label

- ``<dataset>`` is ``DatasetDef.name`` (e.g. ``ROOT/RANZCR``, ``ROOT/NIH ChestX-ray``).
- A class folder name or a csv label names a class by (in this order) a
  non-negative integer (the class index), the dataset's label
  (``DatasetDef.classes``), its prompt name, or an alias; names compare after
  ``normalise_label`` (case-insensitive, runs of other characters than letters
  and digits count as one ``_``), so ``ETT - Abnormal``, ``ett_abnormal`` and
  ``0`` are the same RANZCR class.
- csv: a header row with at least ``path`` and ``label`` (other columns are
  ignored); ``path`` is relative to ``ROOT/<dataset>/`` or absolute. When both
  ``<split>.csv`` and ``<split>/`` exist the csv wins (reported as a warning).
- Images are files with an image extension (``IMAGE_EXTS``, any case), read
  with PIL and converted to RGB. Hidden files and folders are ignored.

``check`` reports, per dataset, what is present, missing or mismatched without
opening an image (it lists folders, reads the csv files and stats csv paths).
``load_task`` / ``load_benchmark`` return ``mgcl.cl.Task`` objects whose
``train`` / ``test`` are lazy map-style datasets of ``(PIL image, int label)``.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .._io import atomic_write_json
from ..cl.tasks import Task
from .benchmarks import BenchmarkDef, DatasetDef, all_real_datasets, get_benchmark

SPLITS = ("train", "test")
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})

# problem kind -> severity. Errors make a root unusable for the benchmark; warnings do not.
PROBLEM_KINDS = {
    "missing-dataset": "error",   # no ROOT/<dataset>
    "missing-split": "error",     # neither <split>/ nor <split>.csv
    "empty-split": "error",       # the split holds no image
    "unknown-class": "error",     # a class folder that names no class of the dataset
    "bad-label": "error",         # csv rows whose label names no class
    "bad-csv": "error",           # unreadable csv, missing columns, empty path
    "missing-file": "error",      # csv paths that do not exist
    "missing-class": "warning",   # a class with no image in a split
    "count": "warning",           # image count differs from the definition
    "both-layouts": "warning",    # <split>.csv and <split>/ both present
}
# problem kind -> (what the summary files it under, and what is wrong) for the report's
# present / missing / mismatched lines
SUMMARY_OF = {
    "missing-dataset": ("missing", ""), "missing-split": ("missing", ""),
    "empty-split": ("missing", "no images"), "missing-file": ("missing", "files named in the csv"),
    "unknown-class": ("mismatched", "class names"), "bad-label": ("mismatched", "class names"),
    "missing-class": ("mismatched", "class names"), "count": ("mismatched", "counts"),
    "bad-csv": ("mismatched", "csv format"), "both-layouts": (None, ""),
}


def normalise_label(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", text.casefold()).strip("_")


class LabelResolver:
    """Maps a folder name or csv label to a class index (None when it names no class)."""

    def __init__(self, ds: DatasetDef):
        self.n = ds.num_classes
        self.table: dict[str, int] = {}
        names = [(c, i) for i, c in enumerate(ds.classes)] + [(p, i) for i, p in enumerate(ds.prompt_names)]
        names += [(a, ds.classes.index(label)) for a, label in ds.aliases]
        for text, i in names:
            key = normalise_label(text)
            if not key or key.isdigit():
                raise ValueError(f"{ds.name}: class name {text!r} normalises to {key!r}, which cannot name a class")
            if self.table.setdefault(key, i) != i:
                raise ValueError(f"{ds.name}: {text!r} normalises to {key!r}, which names two classes")

    def __call__(self, text: str) -> int | None:
        t = text.strip()
        if t.isdigit():
            i = int(t)
            return i if i < self.n else None
        return self.table.get(normalise_label(t))


# ---- scanning one split ----------------------------------------------------------------

@dataclass
class Problem:
    dataset: str
    split: str | None
    kind: str
    message: str

    @property
    def severity(self) -> str:
        return PROBLEM_KINDS[self.kind]

    def __str__(self) -> str:
        where = self.dataset + (f"/{self.split}" if self.split else "")
        return f"[{self.severity}] {where}: {self.kind}: {self.message}"


@dataclass
class SplitScan:
    split: str
    layout: str | None = None                 # "folders" | "csv" | None (missing)
    counts: list[int] = field(default_factory=list)   # images per class index
    items: list[tuple[str, int]] = field(default_factory=list, repr=False)  # (path, label), sorted

    @property
    def total(self) -> int:
        return sum(self.counts)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTS


def _examples(xs, n=3) -> str:
    xs = list(xs)
    more = f", ... ({len(xs)} in all)" if len(xs) > n else ""
    return ", ".join(repr(x) for x in xs[:n]) + more


def scan_split(ds: DatasetDef, ddir: Path, split: str, problems: list[Problem]) -> SplitScan:
    """Lists one split of one dataset; appends what is wrong to ``problems``."""
    resolve = LabelResolver(ds)
    scan = SplitScan(split=split, counts=[0] * ds.num_classes)
    csv_path, folder = ddir / f"{split}.csv", ddir / split
    has_csv, has_dir = csv_path.is_file(), folder.is_dir()
    if not has_csv and not has_dir:
        problems.append(Problem(ds.name, split, "missing-split", f"neither {split}/ nor {split}.csv in {ddir}"))
        return scan
    if has_csv and has_dir:
        problems.append(Problem(ds.name, split, "both-layouts", f"both {split}.csv and {split}/ exist; using the csv"))
    items: list[tuple[str, int]] = []
    if has_csv:
        scan.layout = "csv"
        bad, missing = [], []
        try:
            with open(csv_path, newline="", encoding="utf-8-sig") as fh:   # tolerates a BOM
                reader = csv.DictReader(fh)
                cols = [c.strip() for c in (reader.fieldnames or [])]
                if "path" not in cols or "label" not in cols:
                    problems.append(Problem(ds.name, split, "bad-csv",
                                            f"{csv_path.name} needs columns 'path' and 'label', has {cols}"))
                    return scan
                reader.fieldnames = cols
                for line, row in enumerate(reader, start=2):
                    path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
                    if not path:
                        problems.append(Problem(ds.name, split, "bad-csv", f"{csv_path.name} line {line}: empty path"))
                        continue
                    i = resolve(label)
                    if i is None:
                        bad.append(f"line {line}: {label!r}")
                        continue
                    p = path if os.path.isabs(path) else str(ddir / path)
                    if not os.path.isfile(p):
                        missing.append(path)
                    items.append((p, i))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            problems.append(Problem(ds.name, split, "bad-csv", f"cannot read {csv_path}: {e}"))
            return scan
        if bad:
            problems.append(Problem(ds.name, split, "bad-label",
                                    f"{len(bad)} row(s) of {csv_path.name} name no class: {_examples(bad)}"))
        if missing:
            problems.append(Problem(ds.name, split, "missing-file",
                                    f"{len(missing)} path(s) in {csv_path.name} do not exist: {_examples(missing)}"))
    else:
        scan.layout = "folders"
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            files = sorted(e.name for e in os.scandir(entry.path) if e.is_file() and _is_image(e.name))
            i = resolve(entry.name)
            if i is None:
                problems.append(Problem(ds.name, split, "unknown-class",
                                        f"folder {entry.name!r} ({len(files)} images) names no class of {ds.name}"))
                continue
            items.extend((os.path.join(entry.path, f), i) for f in files)
        items.sort(key=lambda it: (it[1], it[0]))          # class index order, then path
    for _, i in items:
        scan.counts[i] += 1
    scan.items = items
    if not items:
        problems.append(Problem(ds.name, split, "empty-split", f"no image found for {split}"))
    else:
        absent = [ds.classes[i] for i, c in enumerate(scan.counts) if c == 0]
        if absent:
            problems.append(Problem(ds.name, split, "missing-class",
                                    f"{len(absent)} class(es) without images: {_examples(absent, 5)}"))
    return scan


# ---- check ----------------------------------------------------------------------------------

@dataclass
class DatasetReport:
    dataset: DatasetDef
    present: bool
    splits: dict[str, SplitScan]
    problems: list[Problem]

    @property
    def status(self) -> str:
        if not self.present:
            return "MISSING"
        sev = {p.severity for p in self.problems}
        return "ERROR" if "error" in sev else ("warning" if sev else "ok")

    def to_dict(self) -> dict:
        d = self.dataset
        return {
            "dataset": d.name, "domain": d.domain, "present": self.present, "status": self.status,
            "expected": {"classes": list(d.classes), "n_images": d.n_images, "n_train": d.n_train,
                         "n_test": d.n_test},
            "splits": {s: {"layout": sc.layout, "total": sc.total, "counts": sc.counts}
                       for s, sc in self.splits.items()},
            "problems": [asdict(p) | {"severity": p.severity} for p in self.problems],
        }


@dataclass
class CheckReport:
    root: str
    benchmark: str
    synthetic: bool
    datasets: list[DatasetReport]

    @property
    def problems(self) -> list[Problem]:
        return [p for r in self.datasets for p in r.problems]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> dict:
        """``present``: the datasets whose folder exists; ``missing``: datasets and
        splits (``"name/split"``) that are absent or hold no images; ``mismatched``:
        dataset -> what differs from the definition (class names, counts, ...)."""
        missing: list[str] = []
        mismatched: dict[str, list[str]] = {}
        for p in self.problems:
            where, what = SUMMARY_OF[p.kind]
            if where == "missing":
                item = p.dataset + (f"/{p.split}" if p.split else "") + (f" ({what})" if what else "")
                if item not in missing:
                    missing.append(item)
            elif where == "mismatched" and what not in mismatched.setdefault(p.dataset, []):
                mismatched[p.dataset].append(what)
        return {"present": [r.dataset.name for r in self.datasets if r.present], "missing": missing,
                "mismatched": mismatched}

    def to_dict(self) -> dict:
        return {"root": self.root, "benchmark": self.benchmark, "synthetic": self.synthetic, "ok": self.ok,
                "n_errors": len(self.errors), "n_warnings": len(self.warnings), "summary": self.summary(),
                "datasets": [r.to_dict() for r in self.datasets]}

    def format(self) -> str:
        label = self.benchmark + (" (SYNTHETIC data)" if self.synthetic else "")
        lines = [f"mgtil check: root {self.root}, benchmark {label}, {len(self.datasets)} datasets", ""]
        w = max([18] + [len(r.dataset.name) + 1 for r in self.datasets])
        head = (f"{'dataset':<{w}} {'domain':<15} {'layout':<8} {'train':>8} {'test':>8} {'expected':>9} "
                f"{'classes':>8}  status")
        lines += [head, "-" * len(head)]
        for r in self.datasets:
            d = r.dataset
            tr, te = r.splits.get("train"), r.splits.get("test")
            layouts = sorted({s.layout for s in r.splits.values() if s.layout})
            n_tr = f"{tr.total:,}" if tr and tr.layout else "-"
            n_te = f"{te.total:,}" if te and te.layout else "-"
            seen = sum(1 for i in range(d.num_classes) if any(s.counts and s.counts[i] for s in r.splits.values()))
            expected = d.n_images if d.n_train is None else d.n_train + (d.n_test or 0)
            lines.append(
                f"{d.name:<{w}} {d.domain:<15} {'/'.join(layouts) or '-':<8} "
                f"{n_tr:>8} {n_te:>8} "
                f"{expected:>9,} {f'{seen}/{d.num_classes}':>8}  {r.status}")
        sm = self.summary()
        lines += ["",
                  f"present:    {len(sm['present'])} of {len(self.datasets)} datasets"
                  + (": " + ", ".join(sm["present"]) if sm["present"] else ""),
                  "missing:    " + (", ".join(sm["missing"]) or "none"),
                  "mismatched: " + (", ".join(f"{d} ({', '.join(w)})" for d, w in sm["mismatched"].items())
                                    or "none")]
        if self.problems:
            lines += ["", "problems:"] + [f"  {p}" for p in self.problems]
        n_ok = sum(r.status == "ok" for r in self.datasets)
        lines += ["", f"{n_ok} of {len(self.datasets)} datasets ok; {len(self.errors)} error(s), "
                      f"{len(self.warnings)} warning(s)"]
        return "\n".join(lines)

    def write_json(self, path) -> None:

        atomic_write_json(str(path), self.to_dict(), indent=2)


def _resolve(benchmark) -> tuple[str, bool, tuple[DatasetDef, ...]]:
    if benchmark is None:
        return "all real datasets", False, all_real_datasets()
    b = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    if not isinstance(b, BenchmarkDef):
        raise ValueError(f"benchmark must be a name or a BenchmarkDef, got {type(b).__name__}")
    return b.name, b.synthetic, b.datasets


def check_dataset(ds: DatasetDef, root) -> DatasetReport:
    ddir = Path(root) / ds.name
    if not ddir.is_dir():
        key = normalise_label(ds.name)
        near = [e.name for e in os.scandir(root) if e.is_dir() and normalise_label(e.name) == key] \
            if Path(root).is_dir() else []
        hint = f" (found {near[0]!r}: rename it to {ds.name!r})" if near else ""
        return DatasetReport(ds, False, {}, [Problem(ds.name, None, "missing-dataset", f"no directory {ddir}{hint}")])
    problems: list[Problem] = []
    splits = {s: scan_split(ds, ddir, s, problems) for s in SPLITS}
    if not any(p.kind in ("missing-split", "bad-csv") for p in problems):
        if ds.n_train is not None or ds.n_test is not None:
            for s, want in (("train", ds.n_train), ("test", ds.n_test)):
                if want is not None and splits[s].total != want:
                    problems.append(Problem(ds.name, s, "count", f"{splits[s].total:,} images, expected {want:,}"))
        else:
            got = sum(sc.total for sc in splits.values())
            if got != ds.n_images:
                problems.append(Problem(ds.name, None, "count",
                                        f"{got:,} images (train {splits['train'].total:,} + test "
                                        f"{splits['test'].total:,}), expected {ds.n_images:,} in all"))
    return DatasetReport(ds, True, splits, problems)


def check(root, benchmark: str | BenchmarkDef | None = None) -> CheckReport:
    """What ``root`` holds for ``benchmark`` (a name, a ``BenchmarkDef``, or None
    for every real dataset), without opening an image."""
    root = Path(root).expanduser()
    name, synthetic, datasets = _resolve(benchmark)
    if not root.is_dir():
        raise ValueError(f"data root {root} is not a directory")
    return CheckReport(str(root), name, synthetic, [check_dataset(d, root) for d in datasets])


# ---- loading ------------------------------------------------------------------------------

class ImageDataset:
    """Map-style and lazy: ``ds[i]`` opens ``paths[i]`` and returns ``(PIL RGB image, label)``."""

    def __init__(self, items: list[tuple[str, int]], transform=None):
        self.paths = [p for p, _ in items]
        self.labels = [int(y) for _, y in items]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            img = im.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[i]


def _task(rep: DatasetReport, root, benchmark: str | None) -> Task:
    ds = rep.dataset
    errors = [p for p in rep.problems if p.severity == "error"]
    if errors:
        raise ValueError(f"cannot load {ds.name} from {root}:\n" + "\n".join(f"  {p}" for p in errors))
    tr, te = rep.splits["train"], rep.splits["test"]
    meta = {"dataset": ds.name, "benchmark": benchmark, "site": ds.site, "labels": list(ds.classes),
            "synthetic": ds.synthetic, "root": str(root), "layout": {"train": tr.layout, "test": te.layout},
            "n_train": tr.total, "n_test": te.total, "warnings": [str(p) for p in rep.problems]}
    return Task(name=ds.name, domain=ds.domain, classnames=list(ds.prompt_names), templates=list(ds.templates),
                train=ImageDataset(tr.items), test=ImageDataset(te.items), meta=meta)


def load_task(ds: DatasetDef, root, *, benchmark: str | None = None) -> Task:
    """The task of dataset ``ds`` under ``root``; raises ValueError (with every
    error found) when the dataset's folders do not match its definition."""
    return _task(check_dataset(ds, Path(root).expanduser()), root, benchmark)


def load_benchmark(benchmark: str | BenchmarkDef, root) -> list[Task]:
    """Every task of ``benchmark`` in its order. Checks the whole root first and
    raises ValueError listing every error, so a user fixes them in one go."""
    rep = check(root, benchmark)
    if not rep.ok:
        raise ValueError(f"data root {rep.root} does not match {rep.benchmark}:\n"
                         + "\n".join(f"  {p}" for p in rep.errors))
    return [_task(r, rep.root, rep.benchmark) for r in rep.datasets]
