"""mgtil-synth: determinism, caching, task sizes and balance, the captioned corpus."""
import hashlib
import io
import json
import re
import tarfile
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mgcl.mgtil import benchmarks as B
from mgcl.mgtil import data as D
from mgcl.mgtil import synth


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return synth.build(tmp_path_factory.mktemp("synth") / "q", seed=0, quick=True, progress=False)


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _full_plan():
    return synth._corpus_plan(np.random.default_rng([0, synth._stream("corpus-plan")]), B.SYNTH_SIZES[False]["corpus"])


# ---- determinism and the cache ---------------------------------------------------------------

def test_same_seed_same_bytes(quick, tmp_path):
    again = synth.build(tmp_path / "again", seed=0, quick=True, progress=False)
    a, b = _tree(quick.root), _tree(again.root)
    assert len(a) > 1000 and a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert [p.name for p in tmp_path.iterdir()] == ["again"]      # nothing left from the atomic build


def test_render_depends_on_the_seed_not_on_threads():
    f = np.array(["nodule", "normal", "effusion"] * 200)             # > 2 chunks
    a = synth.render("x-ray", f, (0, 1), workers=1)
    assert np.array_equal(a, synth.render("x-ray", f, (0, 1), workers=3))
    assert not np.array_equal(a, synth.render("x-ray", f, (1, 1), workers=1))
    assert a.shape == (600, 64, 64, 3) and a.dtype == np.uint8
    with pytest.raises(ValueError, match="no finding"):
        synth.render("fundus", ["nodule"], (0,))


def test_cache_is_reused_and_guarded(quick, tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "_generate", lambda *a, **k: pytest.fail("regenerated a complete cache"))
    assert synth.build(quick.root, seed=0, quick=True, progress=False).manifest == quick.manifest
    with pytest.raises(ValueError, match="seed=0, not 1"):
        synth.build(quick.root, seed=1, quick=True)
    with pytest.raises(ValueError, match="quick=True, not False"):
        synth.build(quick.root, seed=0, quick=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    with pytest.raises(ValueError, match="not an mgtil-synth cache"):
        synth.build(tmp_path / "mine", quick=True)
    with pytest.raises(ValueError, match="non-negative int"):
        synth.build(tmp_path / "x", seed=-1)
    monkeypatch.setenv("MGCL_CACHE", str(tmp_path))
    assert synth.default_cache_dir(3, True) == tmp_path / "synth" / f"v{synth.VERSION}-seed3-quick"


def test_manifest_labels_it_synthetic(quick):
    m = json.loads((quick.root / "manifest.json").read_text())
    assert m["synthetic"] is True and "SYNTHETIC" in m["notice"] and m["seed"] == 0 and m["quick"] is True
    assert str(quick.root) not in json.dumps(m)                     # relocatable: relative paths only
    for rel, digest in m["corpus"]["sha256"].items():
        assert hashlib.sha256((quick.root / rel).read_bytes()).hexdigest() == digest
    assert "SYNTHETIC" in repr(quick) and "SYNTHETIC" in quick.label


# ---- tasks ----------------------------------------------------------------------------------------

def test_tasks_sizes_balance_and_domains(quick):
    sz = B.SYNTH_SIZES[True]
    b = quick.benchmark
    assert b.synthetic and b.name == "mgtil-synth-quick" and "SYNTHETIC" in b.display_name
    assert [t.name for t in quick.tasks] == b.names and len(quick.tasks) >= 6
    per_domain = Counter(t.domain for t in quick.tasks)
    assert set(per_domain) == set(synth.PRINCIPLES) and min(per_domain.values()) >= 2
    assert set(quick.task_domains) == set(synth.PRINCIPLES)
    assert set(quick.domains) == set(synth.PRINCIPLES) | set(synth.DISTRACTORS) and len(synth.DISTRACTORS) >= 3
    for t in quick.tasks:
        C = len(t.classnames)
        assert C >= 3 and t.name.startswith("synth-") and t.meta["synthetic"] is True
        assert len(t.train) == sz["train"] * C and len(t.test) == sz["test"] * C
        for split in (t.train, t.test):
            assert np.bincount(split.labels, minlength=C).tolist() == [len(split) // C] * C
        img, y = t.test[len(t.test) - 1]
        assert isinstance(img, Image.Image) and img.size == (64, 64) and img.mode == "RGB" and y == C - 1
        assert quick.class_prompts[t.name] == [t.templates[0].format(c) for c in t.classnames]
    rep = D.check(quick.tasks_root, "mgtil-synth-quick")
    assert rep.problems == [] and rep.synthetic and "SYNTHETIC" in rep.format()


def _features(task_split, k=2):
    x = np.stack([np.asarray(task_split[i][0], np.float32) / 255 for i in range(len(task_split))])
    return x.reshape(len(x), 64 // k, k, 64 // k, k, 3).mean((2, 4)).reshape(len(x), -1)


def test_domains_differ_and_classes_are_learnable_but_not_trivial(quick):
    """A linear probe on 32x32 pixels separates every task's classes well above chance, but no
    class is simply its mean image (nearest centroid stays well below perfect)."""
    from sklearn.linear_model import RidgeClassifier

    means, doms = [], []
    for t in quick.tasks:
        xtr, xte = _features(t.train), _features(t.test)
        ytr, yte = np.array(t.train.labels), np.array(t.test.labels)
        C = len(t.classnames)
        cent = np.stack([xtr[ytr == c].mean(0) for c in range(C)])
        nearest = (np.argmin(((xte[:, None] - cent[None]) ** 2).sum(-1), 1) == yte).mean()
        linear = RidgeClassifier(alpha=10.0).fit(xtr, ytr).score(xte, yte)
        assert nearest < 0.9, f"{t.name}: a class is its mean image ({nearest:.2f})"
        assert linear > 1 / C + 0.15, f"{t.name}: classes not separable by a linear probe ({linear:.2f})"
        means.append(np.concatenate([xtr, xte]).mean(0))
        doms.append(t.domain)
    # each task's mean image is closest to the other task of its own domain
    m = np.stack(means)
    d = ((m[:, None] - m[None]) ** 2).sum(-1) + np.eye(len(m)) * 1e9
    assert [doms[j] for j in d.argmin(1)] == doms


# ---- corpus ---------------------------------------------------------------------------------------

def test_corpus_shards_are_webdataset(quick, tmp_path):
    c = quick.corpus()
    assert len(c) == quick.corpus_size == B.SYNTH_SIZES[True]["corpus"]
    for shard in quick.corpus_shards:
        with tarfile.open(shard) as tar:
            names = tar.getnames()
        keys = [n.rsplit(".", 1)[0] for n in names[::3]]
        assert names == [f"{k}.{e}" for k in keys for e in ("png", "txt", "json")]
    i = len(c) // 2
    img, cap = c[i]
    assert img.size == (64, 64) and cap == c.captions[i] and cap
    tar_path, member = c.image_ref(i).split("::")
    with tarfile.open(tar_path) as tar:
        meta = json.loads(tar.extractfile(member.replace(".png", ".json")).read())
        png = tar.extractfile(member).read()
    assert meta["id"] == c.ids[i] and meta["domain"] == c.domains[i] and meta["synthetic"] is True
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), np.asarray(img))
    arr = c.decode_all()
    assert arr.shape == (len(c), 64, 64, 3) and np.array_equal(arr[i], np.asarray(img))
    rows = [json.loads(line) for line in quick.write_jsonl(tmp_path / "corpus.jsonl").read_text().splitlines()]
    assert len(rows) == len(c) and rows[i] == {"id": c.ids[i], "caption": cap, "domain": c.domains[i],
                                               "image": c.image_ref(i)}
    assert len(set(c.ids)) == len(c)


def test_image_refs_match_the_bank_builder(quick, monkeypatch):
    """The retrieval builder stores "<absolute tar path>::<member>"; so does the corpus, even when
    the cache is opened through a relative path."""
    from mgcl.retrieval.corpus import Record, read_corpus

    monkeypatch.chdir(quick.root.parent)
    rel = synth.load(quick.root.name)
    assert rel.root.is_absolute() and rel.root == quick.root
    c = rel.corpus()
    records = [r for r in read_corpus(rel.corpus_shards[:1])]
    assert all(isinstance(r, Record) for r in records) and len(records) == B.SYNTH_SIZES[True]["shard"]
    for i in (0, 17, len(records) - 1):
        r = records[i]
        assert (r.id, r.caption, r.domain, r.image) == (c.ids[i], c.captions[i], c.domains[i], c.image_ref(i))


def test_class_prompts_retrieve_relevant_pairs(quick):
    """Lexical retrieval (BM25) for each task's class prompts: the top captions come from the
    task's domain, and mostly describe that class's finding."""
    from rank_bm25 import BM25Okapi

    c = quick.corpus()

    def tok(s):
        return re.findall(r"[a-z0-9]+", s.lower())

    bm25 = BM25Okapi([tok(x) for x in c.captions])
    doms, finds = np.array(c.domains), np.array(c.findings)
    precision = []
    for t in B.SYNTH_TASKS:
        for (cname, key), prompt in zip(t.classes, quick.class_prompts[t.name]):
            top = np.argsort(-bm25.get_scores(tok(prompt)), kind="stable")[:20]
            assert (doms[top] == t.domain).all(), prompt
            precision.append((finds[top] == key).mean())
            assert precision[-1] >= 0.5, (prompt, precision[-1])
    assert np.mean(precision) >= 0.8


def test_full_corpus_plan_captions():
    """The plan fixes every caption, domain and figure group of the full corpus (rendering only draws it)."""
    plan = _full_plan()
    assert len(plan) == B.SYNTH_SIZES[False]["corpus"] >= 20_000
    caps = Counter(cap for _, _, cap, _ in plan)
    assert len(caps) < 0.6 * len(plan) and max(caps.values()) >= 6      # captions shared by several images
    by_figure = {}
    for d, f, cap, g in plan:
        assert by_figure.setdefault(g, (d, f, cap)) == (d, f, cap)       # one figure: one domain, finding, caption
    doms = Counter(d for d, *_ in plan)
    assert set(doms) == set(synth.DOMAINS)
    assert all(doms[d] > 0.05 * len(plan) for d in synth.DISTRACTORS)
    assert sum(doms[d] for d in synth.PRINCIPLES) > 0.5 * len(plan)
    # every task class is named in captions of its domain, in more than one wording
    for t in B.SYNTH_TASKS:
        for cname, fkey in t.classes:
            named = [cap for d, f, cap, _ in plan if d == t.domain and cname.lower() in cap.lower()]
            own = [cap for d, f, cap, _ in plan if d == t.domain and f == fkey]
            assert len(named) >= 50, (t.name, cname)
            assert len({re.sub(r"\d+", "#", c) for c in own}) >= 20, (t.name, cname)
    # and a few captions name no finding at all (PubMed noise)
    phrases = [p.lower() for dom in synth.DOMAINS.values() for ps, _ in dom.findings.values() for p in ps]
    weak = [cap for _, _, cap, _ in plan if not any(p in cap.lower() for p in phrases)]
    assert 0.02 * len(plan) < len(weak) < 0.1 * len(plan)


@pytest.mark.slow
def test_full_build(tmp_path):
    t0 = time.perf_counter()
    full = synth.build(tmp_path / "full", seed=0, quick=False, progress=False)
    seconds = time.perf_counter() - t0
    c = full.corpus()
    assert len(c) == full.corpus_size == len(_full_plan()) >= 20_000
    assert c.captions == [cap for _, _, cap, _ in _full_plan()]
    assert Counter(c.domains) == Counter(d for d, *_ in _full_plan())
    sz = B.SYNTH_SIZES[False]
    assert [len(t.train) for t in full.tasks] == [sz["train"] * len(t.classes) for t in B.SYNTH_TASKS]
    print(f"full mgtil-synth build: {seconds:.1f} s")
    assert seconds < 300
