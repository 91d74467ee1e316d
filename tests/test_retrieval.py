"""mgcl.retrieval: bank format, builder (resume identity, malformed records),
embedders, exact and FAISS search against a brute-force reference, BM25
against rank_bm25, bad inputs, and the ``mgcl db`` commands."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mgcl.ops.similarity_topk import reference as topk_reference
from mgcl.retrieval import BankError, MemoryBank, build_bank, build_index, get_embedder, open_image, write_bank
from mgcl.retrieval.bm25 import tokenize
from mgcl.retrieval.corpus import Record, Skipped, read_corpus
from retrieval_fixtures import file_hashes, make_records, write_corpus

EMB = "hashing:64"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("corpus"))
    recs = make_records(150, seed=1)
    return root, recs, write_corpus(root, recs)


@pytest.fixture(scope="module")
def bank(corpus, tmp_path_factory):
    _, _, files = corpus
    out = str(tmp_path_factory.mktemp("bank") / "bank")
    build_bank(files, out, embedder=EMB, shard_size=32, batch_size=7, progress=False)
    return MemoryBank.open(out, verify=True)


# ---- brute-force oracle -----------------------------------------------------------------

def brute_force(keys: torch.Tensor, queries: torch.Tensor, k: int, ties: bool):
    """Per query: list of (index, score) by the SPEC.md 3.1 rule over the full
    score matrix (similarity_topk's exact definition, its dense reference)."""
    scores = topk_reference.scores(queries.float(), keys.float()).numpy()
    out = []
    for s in scores:
        if ties:
            u = np.unique(s)[::-1]
            tau = u[min(k, len(u)) - 1]
            idx = np.nonzero(s >= tau)[0]
        else:
            idx = np.lexsort((np.arange(len(s)), -s))[:k]
        idx = idx[np.lexsort((idx, -s[idx]))]
        out.append([(int(i), float(s[i])) for i in idx])
    return out


def all_keys(b: MemoryBank) -> torch.Tensor:
    return torch.cat([s.float() for s in b.shards])


# ---- corpus readers --------------------------------------------------------------------

def test_readers_shapes(corpus):
    root, recs, files = corpus
    items = list(read_corpus(files))
    assert all(isinstance(x, Record) for x in items)
    assert [x.id for x in items] == [r["id"] for r in recs]
    assert [x.caption for x in items] == [r["caption"] for r in recs]
    assert [x.domain for x in items] == [r["domain"] for r in recs]
    # jsonl: relative image path resolved against the jsonl's folder; tar: "tar::member"
    assert items[0].image == os.path.join(root, "images", f"{recs[0]['id']}.png")
    assert items[-1].image == f"{files[2]}::{recs[-1]['id']}.png"
    for x in (items[0], items[60], items[-1]):
        img = open_image(x.image)
        assert img.mode == "RGB" and img.size == (12, 12)


def test_parquet_image_bytes(tmp_path):
    """Hugging Face parquet shapes: an Image struct column, and a WebDataset-style
    table (jpg bytes, txt caption, json metadata); images open from the cells."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def png(red):
        buf = io.BytesIO()
        Image.new("RGB", (6, 6), (red, 0, 0)).save(buf, format="PNG")
        return buf.getvalue()

    pq.write_table(pa.table({"image": [{"bytes": png(10 * i), "path": f"f{i}.png"} for i in range(5)]
                             + [{"bytes": None, "path": None}],
                             "caption": [f"caption {i}" for i in range(6)]}), tmp_path / "a.parquet", row_group_size=2)
    pq.write_table(pa.table({"__key__": ["k0", "k1"], "jpg": [png(200), png(100)], "txt": ["fundus photo", "an mri"],
                             "json": [json.dumps({"modality": "fundus"}), json.dumps({"modality": "mri"})]}),
                   tmp_path / "b.parquet")
    items = list(read_corpus([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]))
    assert all(isinstance(x, Record) for x in items) and len(items) == 8
    assert [x.id for x in items] == ["f0.png", "f1.png", "f2.png", "f3.png", "f4.png", "a.parquet:6", "k0", "k1"]
    assert [x.domain for x in items][-2:] == ["fundus", "mri"] and items[5].image == ""
    reds = [open_image(x.image).getpixel((0, 0))[0] for x in items if x.image]
    assert reds == [0, 10, 20, 30, 40, 200, 100]


def test_malformed_records_counted(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join([
        json.dumps({"caption": "fine caption one", "image": "a.png"}),
        "{not json",
        json.dumps({"caption": "   "}),
        json.dumps({"image": "b.png"}),
        json.dumps(["a", "list"]),
        json.dumps({"caption": 5}),
        "",
        json.dumps({"text": "fine caption two"}),
    ]) + "\n")
    import io
    import tarfile
    tp = tmp_path / "s.tar"
    with tarfile.open(tp, "w") as tf:
        for name, data in (("k1.png", b"x"), ("k2.txt", b"caption without image"), ("k3.png", b"x"),
                           ("k3.txt", b"ok caption"), ("k4.png", b"x"), ("k4.txt", b"  ")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    items = list(read_corpus([str(p), str(tp)]))
    good = [x for x in items if isinstance(x, Record)]
    bad = [x for x in items if isinstance(x, Skipped)]
    assert [g.caption for g in good] == ["fine caption one", "fine caption two", "ok caption"]
    reasons = sorted(s.reason.split(":")[0] for s in bad)
    assert reasons == sorted(["invalid JSON", "empty caption", "no caption field", "not a JSON object (list)",
                              "caption is int, not a string", "no caption (txt member or json caption)",
                              "no image member", "empty caption"])  # a blank line holds no record
    assert [s.position for s in bad[:3]] == ["line 2", "line 3", "line 4"]
    out = tmp_path / "bank"
    m = build_bank([str(p), str(tp)], str(out), embedder=EMB, progress=False, external_images=True)
    assert m["count"] == 3 and m["build"]["skipped_total"] == len(bad) == 8
    assert m["build"]["unreadable_images"] == 2  # "a.png" does not exist, k3.png holds b"x"; both kept (no VLM)
    rows = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert sum(r["action"] == "skipped" for r in rows) == 8 and all({"file", "position", "reason"} <= set(r)
                                                                     for r in rows)


def test_folder_order_is_sorted_paths(tmp_path):
    """A folder's files come in sorted folder-path order (the record numbering,
    so the bank, depends on it), '-' sorting before '/'."""
    from mgcl.retrieval.corpus import expand

    for d in ("b", "b/c", "b-x", "a"):
        os.makedirs(tmp_path / d, exist_ok=True)
        for f in ("z.jsonl", "y.jsonl", "n.txt"):
            (tmp_path / d / f).write_text("")
    got = [os.path.relpath(f.path, tmp_path) for f in expand(tmp_path)]
    assert got == ["a/y.jsonl", "a/z.jsonl", "b/y.jsonl", "b/z.jsonl", "b-x/y.jsonl", "b-x/z.jsonl",
                   "b/c/y.jsonl", "b/c/z.jsonl"]
    assert all(f.root == str(tmp_path) for f in expand(tmp_path))


def test_empty_corpus_is_an_error(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text(json.dumps({"caption": ""}) + "\n")
    with pytest.raises(ValueError, match="no usable records"):
        build_bank([str(p)], str(tmp_path / "bank"), embedder=EMB, progress=False)
    with pytest.raises(FileNotFoundError):
        build_bank([str(tmp_path / "missing.jsonl")], str(tmp_path / "b2"), embedder=EMB, progress=False)
    with pytest.raises(ValueError, match="no corpus files"):
        os.makedirs(tmp_path / "nothing")
        build_bank([str(tmp_path / "nothing")], str(tmp_path / "b3"), embedder=EMB, progress=False)


# ---- bank format ----------------------------------------------------------------------

def test_bank_format(bank, corpus):
    _, recs, _ = corpus
    m = bank.manifest
    assert m["format_version"] == 1 and m["dtype"] == "float16" and m["normalised"] is True
    assert m["count"] == len(recs) == 150 and m["dim"] == 64 and m["embedder"] == "hashing:64"
    assert [s["rows"] for s in m["shards"]] == [32, 32, 32, 32, 22]
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    # memory-mapped, float16, unit rows
    assert all(isinstance(s, torch.Tensor) and s.dtype == torch.float16 for s in bank.shards)
    norms = all_keys(bank).norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=2e-3)
    # meta columns and group ids: identical captions share the first index
    meta = bank.meta
    assert meta["id"] == [r["id"] for r in recs]
    caps = [r["caption"] for r in recs]
    for i, c in enumerate(caps):
        assert meta["group"][i] == caps.index(c)
    assert len(set(caps)) < len(caps)  # the corpus really has duplicates
    # text embeddings equal the embedder's, rounded to float16
    e = get_embedder(EMB).encode(caps[:40], 8)
    assert np.array_equal(bank.embeddings(np.arange(40)).numpy(), e.astype(np.float16))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_shards_are_memory_mapped(bank):
    with open("/proc/self/maps") as fh:
        maps = fh.read()
    for e in bank.manifest["shards"]:
        assert os.path.join(bank.path, e["path"]) in maps


def test_open_errors(tmp_path, bank):
    import shutil

    with pytest.raises(BankError, match="does not exist"):
        MemoryBank.open(tmp_path / "nope")
    os.makedirs(tmp_path / "half/.build")
    with pytest.raises(BankError, match="unfinished build"):
        MemoryBank.open(tmp_path / "half")
    # missing shard
    b1 = tmp_path / "b1"
    shutil.copytree(bank.path, b1)
    os.remove(b1 / "embeddings/shard-00002.safetensors")
    with pytest.raises(BankError, match="shard-00002"):
        MemoryBank.open(b1)
    with pytest.raises(FileNotFoundError, match="shard-00002"):
        MemoryBank.open(b1)
    # checksum mismatch: same size, one byte changed (headers still consistent: found on
    # the shard's first read, or at once with verify=True)
    b2 = tmp_path / "b2"
    shutil.copytree(bank.path, b2)
    p = b2 / "embeddings/shard-00003.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    opened = MemoryBank.open(b2)
    opened.embeddings([0, 40])  # shards 0 and 1 are intact
    with pytest.raises(BankError, match="'embeddings/shard-00003.safetensors' does not match its sha256"):
        opened.embeddings([100])
    with pytest.raises(BankError, match="'embeddings/shard-00003.safetensors' does not match its sha256"):
        MemoryBank.open(b2, verify=True)
    # truncated shard: caught without verify
    b3 = tmp_path / "b3"
    shutil.copytree(bank.path, b3)
    p = b3 / "embeddings/shard-00001.safetensors"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(BankError, match="shard-00001"):
        MemoryBank.open(b3)
    # wrong format version
    b4 = tmp_path / "b4"
    shutil.copytree(bank.path, b4)
    m = json.loads((b4 / "manifest.json").read_text())
    m["format_version"] = 99
    (b4 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BankError, match="format version 99"):
        MemoryBank.open(b4)
    m["format_version"] = 1
    del m["shards"]
    (b4 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BankError, match="lacks.*shards"):
        MemoryBank.open(b4)
    # meta checksum
    b5 = tmp_path / "b5"
    shutil.copytree(bank.path, b5)
    m = json.loads((b5 / "manifest.json").read_text())
    m["meta"]["sha256"] = "0" * 64
    (b5 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BankError, match="meta.parquet"):
        MemoryBank.open(b5, verify=True)
    with pytest.raises(BankError, match="meta.parquet"):
        MemoryBank.open(b5).meta


# ---- resume after a kill ----------------------------------------------------------------

STAGES = [("embedded", 0), ("shard_written", 1), ("part_written", 2), ("committed", 2), ("embedded", 4),
          ("before_finalize", 5), ("finalized", 5)]


def test_resume_after_injected_failure(corpus, tmp_path):
    _, _, files = corpus
    ref = tmp_path / "ref"
    build_bank(files, str(ref), embedder=EMB, shard_size=32, batch_size=7, progress=False)
    want = file_hashes(str(ref))
    assert "meta.parquet" in want and "embeddings/shard-00004.safetensors" in want
    for stage, shard in STAGES:
        out = tmp_path / f"run-{stage}-{shard}"

        def hook(s, j, stage=stage, shard=shard):
            if s == stage and j == shard:
                raise KeyboardInterrupt(f"injected at {stage} {shard}")

        with pytest.raises(KeyboardInterrupt):
            build_bank(files, str(out), embedder=EMB, shard_size=32, batch_size=7, progress=False, _hook=hook)
        if stage == "finalized":  # the manifest exists: the bank is complete; a restart only cleans up
            assert file_hashes(str(out)) == want and (out / ".build").exists()
            build_bank(files, str(out), embedder=EMB, shard_size=32, batch_size=7, progress=False)
            assert file_hashes(str(out)) == want and not (out / ".build").exists()
            continue
        with pytest.raises(BankError, match="no manifest"):
            MemoryBank.open(out)
        build_bank(files, str(out), embedder=EMB, shard_size=32, batch_size=7, progress=False)
        assert file_hashes(str(out)) == want, f"bank differs after a failure at {stage} {shard}"
        assert not (out / ".build").exists()


def test_resume_after_sigkill(corpus, tmp_path):
    """A real kill -9 in the middle of writing shard 3, then a restart."""
    _, _, files = corpus
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal
        from mgcl.retrieval import build_bank
        def hook(stage, j):
            if stage == "shard_written" and j == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        build_bank({files!r}, {str(out)!r}, embedder={EMB!r}, shard_size=32, batch_size=7, progress=False, _hook=hook)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    state = json.loads((out / ".build/state.json").read_text())
    assert state["done"] == 3
    build_bank(files, str(out), embedder=EMB, shard_size=32, batch_size=7, progress=False)
    ref = tmp_path / "ref"
    build_bank(files, str(ref), embedder=EMB, shard_size=32, batch_size=7, progress=False)
    assert file_hashes(str(out)) == file_hashes(str(ref))


def test_resume_redoes_a_damaged_committed_shard(corpus, tmp_path):
    _, _, files = corpus
    ref = tmp_path / "ref"
    build_bank(files, str(ref), embedder=EMB, shard_size=32, batch_size=7, progress=False)
    out = tmp_path / "b"

    def hook(s, j):
        if s == "committed" and j == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_bank(files, str(out), embedder=EMB, shard_size=32, batch_size=7, progress=False, _hook=hook)
    p = out / "embeddings/shard-00001.safetensors"
    data = bytearray(p.read_bytes())
    data[-2] ^= 0xFF
    p.write_bytes(bytes(data))
    build_bank(files, str(out), embedder=EMB, shard_size=32, batch_size=7, progress=False)
    assert file_hashes(str(out)) == file_hashes(str(ref))


def test_resume_refuses_other_settings(corpus, tmp_path):
    _, _, files = corpus
    out = tmp_path / "b"

    def hook(s, j):
        if s == "committed" and j == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_bank(files, str(out), embedder=EMB, shard_size=32, progress=False, _hook=hook)
    with pytest.raises(BankError, match="shard_size"):
        build_bank(files, str(out), embedder=EMB, shard_size=16, progress=False)
    build_bank(files, str(out), embedder=EMB, shard_size=32, progress=False)
    before = file_hashes(str(out))
    assert build_bank(files, str(out), embedder=EMB, shard_size=32, progress=False)["count"] == len(corpus[1])
    assert file_hashes(str(out)) == before  # the same build again: a no-op
    with pytest.raises(BankError, match="already holds a finished bank built with other settings"):
        build_bank(files, str(out), embedder=EMB, shard_size=16, progress=False)


# ---- embedders ---------------------------------------------------------------------------

def test_hashing_embedder():
    e = get_embedder("hashing:32")
    x = e.encode(["Chest X-ray, pneumothorax", "chest x-ray pneumothorax", "fundus drusen", "", "\u03b1\u03b2"], 2)
    assert x.dtype == np.float32 and x.shape == (5, 32)
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-6)  # unit rows, texts without ASCII words too
    assert np.array_equal(x[0], x[1]) and not np.array_equal(x[3], x[4])
    assert np.array_equal(x, get_embedder("hashing:32").encode(
        ["Chest X-ray, pneumothorax", "chest x-ray pneumothorax", "fundus drusen", "", "\u03b1\u03b2"]))
    with pytest.raises(ValueError, match="hashing"):
        get_embedder("hashing:abc")
    with pytest.raises(ValueError, match="list of strings"):
        e.encode("one string")


def test_minilm_embedder_and_build(tmp_path):
    e = get_embedder("minilm")
    assert e.name == "minilm" and e.dim == 384
    x = e.encode(["a chest x-ray showing a pneumothorax", "collapsed lung on a chest radiograph",
                  "a dermoscopy image of a melanoma"], 2)
    assert x.dtype == np.float32 and x.shape == (3, 384)
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert x[0] @ x[1] > x[0] @ x[2]
    recs = make_records(40, seed=3)
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"caption": r["caption"], "id": r["id"]}) + "\n" for r in recs))
    build_bank([str(p)], str(tmp_path / "bank"), embedder="minilm", shard_size=16, batch_size=8, progress=False)
    b = MemoryBank.open(tmp_path / "bank", verify=True)
    assert b.embedder_name == "minilm" and b.dim == 384 and b.count == 40
    hits = b.search(["pneumothorax on chest x-ray"], k=3)[0]
    assert len(hits) >= 3 and "chest" in hits[0].caption


# ---- search ----------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 10, 200])
@pytest.mark.parametrize("ties", [True, False])
def test_search_matches_brute_force(bank, k, ties):
    texts = ["chest x-ray with pneumothorax", "retinal image showing drusen", "histology of fibroadenoma",
             "melanoma", "colonoscopy image of adenomatous polyp (case 3)", "unrelated words entirely"]
    got = bank.search(texts, k=k, ties=ties)
    q = torch.from_numpy(get_embedder(EMB).encode(texts))
    want = brute_force(all_keys(bank), q, k, ties)
    meta = bank.meta
    for g, w in zip(got, want):
        assert [h.index for h in g] == [i for i, _ in w]
        assert np.allclose([h.score for h in g], [s for _, s in w], atol=1e-5)
        for h in g:
            assert (h.id, h.caption, h.domain, h.image) == (meta["id"][h.index], meta["caption"][h.index],
                                                            meta["domain"][h.index], meta["image"][h.index])
        if not ties:
            assert len(g) == min(k, bank.count)


def test_single_query_ties_do_not_depend_on_shard_layout(bank, tmp_path):
    """One query at a time over shards of 7 rows: identical captions score the
    same wherever they sit, and results equal the batched brute force."""
    b = write_bank(str(tmp_path / "s7"), all_keys(bank), bank.meta["caption"], shard_size=7, normalise=False,
                   embedder=EMB)
    caps = b.meta["caption"]
    texts = list(dict.fromkeys(caps))[:40]
    q = torch.from_numpy(get_embedder(EMB).encode(texts))
    want = brute_force(all_keys(b), q, 1, True)
    for j, t in enumerate(texts):
        got = b.search(q[j:j + 1], k=1)[0]
        assert [h.index for h in got] == [i for i, _ in want[j]]
        assert {i for i, c in enumerate(caps) if c == t} <= {h.index for h in got}
        assert len({h.score for h in got}) == 1


def test_search_ties_keep_every_duplicate(bank):
    caps = bank.meta["caption"]
    dup = next(c for c in caps if caps.count(c) >= 3)
    hits = bank.search([dup], k=1)[0]
    assert sorted(h.index for h in hits) == [i for i, c in enumerate(caps) if c == dup] or \
        {i for i, c in enumerate(caps) if c == dup} <= {h.index for h in hits}
    assert len({round(h.score, 6) for h in hits}) == 1


def test_search_with_embeddings_and_bad_inputs(bank):
    q = torch.from_numpy(get_embedder(EMB).encode(["fundus photograph of the retina with glaucoma"]))
    a = bank.search(q, k=5)
    b = bank.search(["fundus photograph of the retina with glaucoma"], k=5)
    assert [h.index for h in a[0]] == [h.index for h in b[0]]
    for bad_k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must be"):
            bank.search(["x"], k=bad_k)
    with pytest.raises(ValueError, match="list of query strings"):
        bank.search("one string", k=3)
    with pytest.raises(ValueError, match=r"\[Q, 64\]"):
        bank.search(torch.zeros(2, 5), k=3)
    with pytest.raises(ValueError, match="unknown backend"):
        bank.search(["x"], k=3, backend="magic")


def test_write_bank_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(300, 24, generator=g)
    emb[50] = emb[7]  # an exact duplicate row
    caps = [f"caption {i % 97}" for i in range(300)]
    b = write_bank(str(tmp_path / "rb"), emb, caps, shard_size=64)
    assert b.count == 300 and len(b.shards) == 5 and b.meta["group"][97] == 0
    q = torch.nn.functional.normalize(torch.randn(9, 24, generator=g), dim=1)
    q[0] = torch.nn.functional.normalize(emb[7], dim=0)
    for ties in (True, False):
        got = b.search(q, k=4, ties=ties)
        want = brute_force(all_keys(b), q, 4, ties)
        assert [[h.index for h in x] for x in got] == [[i for i, _ in w] for w in want]
    assert {7, 50} <= {h.index for h in b.search(q[:1], k=1)[0]}


# ---- FAISS ------------------------------------------------------------------------------------

def test_faiss_flat_equals_exact(bank, tmp_path):
    import shutil

    pytest.importorskip("faiss")
    p = tmp_path / "fb"
    shutil.copytree(bank.path, p)
    b = MemoryBank.open(p)
    entry = build_index(b, "flat")
    assert entry["kind"] == "flat" and MemoryBank.open(p, verify=True).manifest["index"]["path"] == entry["path"]
    texts = ["chest x-ray with pleural effusion", "dermoscopy image of nevus", "histology of lobular carcinoma"]
    for k in (1, 5, 40):
        ex = b.search(texts, k=k)
        fa = b.search(texts, k=k, backend="faiss")
        # the same candidates with the same float32 scores up to summation order;
        # each list ordered by its own scores (desc) then index (asc)
        for e, f in zip(ex, fa):
            assert sorted(h.index for h in f) == sorted(h.index for h in e)
            se = {h.index: h.score for h in e}
            assert all(abs(se[h.index] - h.score) < 1e-6 for h in f)
            assert [h.index for h in f] == [h.index for h in sorted(f, key=lambda h: (-h.score, h.index))]


def test_faiss_keeps_its_index_out_of_the_bank(bank, tmp_path):
    """FAISS handling lives in faiss_index.py and never writes the bank's state:
    the loaded index sits in that module's own per-bank cache."""
    import ast
    import shutil
    from pathlib import Path

    import mgcl.retrieval.faiss_index as fi

    for mod in ("faiss_index", "search"):  # no `bank.x = ...` (or augmented / deleted) anywhere
        tree = ast.parse((Path(fi.__file__).parent / f"{mod}.py").read_text())
        stores = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and
                  isinstance(n.value, ast.Name) and n.value.id == "bank" and not isinstance(n.ctx, ast.Load)]
        assert not stores, f"{mod}.py writes the bank's attributes at lines {stores}"
    pytest.importorskip("faiss")
    p = tmp_path / "fb"
    shutil.copytree(bank.path, p)
    b = MemoryBank.open(p)
    build_index(b, "flat")
    texts = ["chest x-ray with pleural effusion", "dermoscopy image of nevus"]
    b.search(texts, k=3)                               # the bank's own lazy state (meta, embedder) filled
    before = {k: id(v) for k, v in vars(b).items()}
    assert b not in fi._loaded
    b.search(texts, k=3, backend="faiss")
    assert {k: id(v) for k, v in vars(b).items()} == before
    assert b in fi._loaded


def test_faiss_ivfpq_rescored(tmp_path):
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(3000, 32, generator=g)
    b = write_bank(str(tmp_path / "ivf"), emb, [f"c{i}" for i in range(3000)], shard_size=1000)
    build_index(b, "ivfpq", nlist=16, m=8, nbits=6)
    q = torch.nn.functional.normalize(torch.randn(5, 32, generator=g), dim=1)
    v, i, off = b.topk(q, 10, True, backend="faiss")
    keys = all_keys(b)
    exact = brute_force(keys, q, 10, True)
    recall = []
    for j in range(5):
        idx, val = i[off[j]:off[j + 1]], v[off[j]:off[j + 1]]
        assert len(idx) >= 10
        # scores are exact (re-scored from the stored rows) and ordered
        assert np.allclose(val, (keys[idx] @ q[j]).numpy(), atol=1e-5)
        assert np.all(np.diff(val) <= 0)
        recall.append(len(set(idx.tolist()) & {x for x, _ in exact[j]}) / 10)
    assert np.mean(recall) >= 0.5
    with pytest.raises(ValueError, match="m=5 must divide"):
        build_index(b, "ivfpq", nlist=16, m=5, nbits=6)


def test_faiss_ivfpq_default_sample_is_never_short(tmp_path, monkeypatch):
    """The default k-means sample is DEFAULT_TRAIN_SIZE rows, or FAISS's 39 per
    centroid where that is more (a 4M bank's 8,000 lists want 312,000): no
    SmallBankWarning from the defaults; a train_size given short still warns."""
    import warnings

    pytest.importorskip("faiss")
    import mgcl.retrieval.faiss_index as fi

    monkeypatch.setattr(fi, "DEFAULT_TRAIN_SIZE", 500)  # the 200,000 scaled to a test bank
    g = torch.Generator().manual_seed(2)
    b = write_bank(str(tmp_path / "ivf"), torch.randn(3000, 16, generator=g), [f"c{i}" for i in range(3000)],
                   shard_size=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fi.SmallBankWarning)
        entry = build_index(b, "ivfpq", nlist=40, m=4, nbits=4)  # 40 centroids: 1,560 rows wanted
    assert entry["train_size"] == 39 * 40
    with pytest.warns(fi.SmallBankWarning, match="training on 500 vectors, fewer than the 1560"):
        entry = build_index(b, "ivfpq", nlist=40, m=4, nbits=4, train_size=500)
    assert entry["train_size"] == 500


# ---- BM25 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("k1,b", [(1.5, 0.75), (0.9, 0.4), (2.0, 1.0)])
def test_bm25_matches_rank_bm25(bank, k1, b):
    rank_bm25 = pytest.importorskip("rank_bm25")
    caps = bank.meta["caption"]
    ref = rank_bm25.BM25Okapi([tokenize(c) for c in caps], k1=k1, b=b)
    ours = bank.bm25(k1=k1, b=b)
    for q in ["chest x-ray with pneumothorax pneumothorax", "case 12 melanoma", "drusen retinal", "zzz unknown"]:
        want = ref.get_scores(tokenize(q))
        got = ours.scores(q, np.arange(len(caps)))
        assert np.allclose(got, want, rtol=1e-9, atol=1e-12)
        sub = np.array([5, 77, 3, 149])
        assert np.allclose(ours.scores(q, sub), want[sub])
    with pytest.raises(ValueError, match="b must be"):
        bank.bm25(k1=1.0, b=1.5)


def test_bm25_cache_bytes_are_those_of_the_list_based_builder(tmp_path):
    # sha256 of the files the list-based build_cache wrote for this corpus (before it kept ids in C arrays):
    # the cache's bytes, so every bank's manifest hashes, are unchanged
    from mgcl.retrieval.bm25 import build_cache

    caps = [r["caption"] for r in make_records(3000, seed=5)] + ["", "Ünïcode café 10µm", "A a A a b", "123 456 123"]
    entry = build_cache(caps, str(tmp_path))
    assert entry["vocab"]["sha256"] == "af2b97d712036d538f02e12bb02c4ced85803d3b6b560418381b012a53fc768a"
    assert entry["tokens"]["sha256"] == "60717f8f199983163845592567cce8e9908a2a28a0a4733c707cda7545921ba8"
    assert entry["n_docs"] == 3004 and entry["n_terms"] == 98
    empty = build_cache([], str(tmp_path / "empty"))
    assert empty["n_docs"] == 0 and empty["n_terms"] == 0 and empty["avgdl"] == 0.0


# ---- CLI ---------------------------------------------------------------------------------------

def test_cli_db_build_and_query(corpus, tmp_path, capsys):
    from mgcl.cli import main

    _, _, files = corpus
    out = str(tmp_path / "cli-bank")
    assert main(["db", "build", *files, "--out", out, "--embedder", EMB, "--shard-size", "50",
                 "--batch-size", "16"]) == 0
    text = capsys.readouterr().out
    assert "150 entries" in text and "skipped 0 records" in text
    assert main(["db", "query", out, "retinal image showing glaucoma", "-k", "3"]) == 0
    text = text_exact = capsys.readouterr().out
    assert "query: retinal image showing glaucoma" in text and "[fundus]" in text
    assert main(["db", "query", out, "x", "-k", "0"]) == 2
    assert "k must be" in capsys.readouterr().err
    assert main(["db", "info", out, "--verify"]) == 0
    assert "checksums: all files match" in capsys.readouterr().out
    if importlib.util.find_spec("faiss") is not None:
        assert main(["db", "query", out, "retinal image showing glaucoma", "-k", "3", "--index", "flat"]) == 2
        assert "no FAISS index" in capsys.readouterr().err
        assert main(["db", "index", out, "--index", "ivfpq"]) == 2  # too few entries to train: a clear error
        assert "training needs" in capsys.readouterr().err
        assert main(["db", "index", out, "--index", "flat"]) == 0
        capsys.readouterr()
        for flag in (["--index", "flat"], ["--index"]):
            assert main(["db", "query", out, "retinal image showing glaucoma", "-k", "3", *flag]) == 0
            assert capsys.readouterr().out == text_exact
    assert main(["db", "build", *files, "--out", str(tmp_path / "v"), "--embedder", EMB, "--vlm", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mgcl db build: --vlm 'no-such-model'") and err.count("\n") == 1
