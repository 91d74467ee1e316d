"""Fault injection for the retrieval room (issue 15): corrupt records,
damaged and truncated containers, bad text, bad and huge images, duplicate
tar members, banks inside the corpus, paths outside the corpus or the bank,
tampered banks, bad manifests, a corrupt FAISS index, killed builds, bad
command-line input, offline hub names, file modes and terminal escapes.

Each case checks three things: the error (if any) is one clear line naming
the input, the result is right, and no readable record is lost."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import struct
import tarfile
import zlib

import pytest
import torch

from mgcl.cli import main
from mgcl.retrieval import BankError, MemoryBank, build_bank, build_index, open_image, retrieve, write_bank
from mgcl.retrieval.corpus import Damaged, Record, read_corpus
from retrieval_fixtures import FixtureVLM, color_image, file_hashes

EMB = "hashing:64"


# ---- helpers ------------------------------------------------------------------------------

def png(red: int = 200, size: int = 6) -> bytes:
    buf = io.BytesIO()
    color_image(red / 255, red).resize((size, size)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(w: int = 20_000, h: int = 20_000) -> bytes:
    """A valid PNG header claiming w x h pixels (a decompression bomb), no real data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def write_tar(path, samples) -> list[tarfile.TarInfo]:
    """``samples``: (key, {ext: bytes}) in order; returns the members written."""
    with tarfile.open(path, "w") as tf:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        return tf.getmembers()


def tar_samples(n: int, start: int = 0):
    return [(f"s{i:04d}", {"png": png(i % 250), "txt": f"caption of sample {i}".encode(),
                           "json": json.dumps({"id": f"s{i:04d}"}).encode()}) for i in range(start, start + n)]


def write_jsonl(path, rows) -> None:
    with open(path, "wb") as fh:
        for r in rows:
            fh.write(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n")


def cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def one_line(err: str) -> str:
    """The one message line of stderr (progress bars aside), which must be all there is."""
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip() and "rec/s]" not in x and "doc/s]" not in x
             and not x.startswith(("embedding (", "bm25 cache"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def entries(bank_dir) -> list[tuple[str, str]]:
    m = MemoryBank.open(bank_dir).meta
    return list(zip(m["id"], m["caption"]))


def skipped_rows(bank_dir) -> list[dict]:
    with open(os.path.join(bank_dir, "skipped.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def build_cli(files, out, *extra) -> tuple[int, str, str]:
    return cli("db", "build", *files, "--out", out, "--embedder", EMB, "--shard-size", 64, *extra)


# ---- 1. corrupt records: reading goes on, every readable record is kept ----------------------

def test_jsonl_invalid_utf8_and_broken_lines(tmp_path):
    """A non-UTF-8 byte at line 500 of 1,000 once cost every later line; now the
    record is repaired, a broken JSON line is skipped at its own line, and the
    build exits 1 naming both."""
    rows = [{"id": f"r{i}", "caption": f"finding number {i}"} for i in range(1000)]
    rows[499] = b'{"id": "r499", "caption": "lymphoma in a f\xe9male"}\n'
    rows[699] = b'{"id": "r699", "caption": "cut \xfe\n'
    write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "bank"
    rc, text, err = build_cli([tmp_path / "c.jsonl"], out)
    assert rc == 1 and "1 problem(s)" in one_line(err)
    got = dict(entries(out))
    assert len(got) == 999 and "r699" not in got
    assert got["r499"] == "lymphoma in a f\ufffdmale" and got["r998"] == "finding number 998"
    rows = skipped_rows(out)
    assert [(r["position"], r["action"]) for r in rows] == [("line 500", "repaired"), ("line 700", "skipped")]
    assert "invalid UTF-8" in rows[0]["reason"] and rows[1]["reason"].startswith("invalid JSON")
    assert "repaired the text of 1 record" in text and "skipped 1 record" in text
    assert build_cli([tmp_path / "c.jsonl"], tmp_path / "b2", "--allow-skipped")[0] == 0


def test_bad_text_is_repaired_per_record(tmp_path):
    """Lone surrogates, NUL, raw control characters and invalid UTF-8, in jsonl,
    tar and parquet: repaired, never aborting the build at finalize."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "a.jsonl", [
        b'{"id": "lone", "caption": "bad \\ud800 surrogate"}\n',
        b'{"id": "nul", "caption": "nul\\u0000 inside", "domain": "x\\u001b-ray"}\n',
        b'{"id": "raw", "caption": "raw\ttab and \x07 bell"}\n',
        b'{"id": "pair", "caption": "emoji \\ud83d\\ude00 kept"}\n',
    ])
    write_tar(tmp_path / "b.tar", [("t1", {"png": png(), "txt": b"caf\xe9 au lait"})])
    pq.write_table(pa.table({"id": ["p1", "p2"], "caption": ["ok caption", "bad \x01 byte"]}), tmp_path / "c.parquet",
                   compression="none", use_dictionary=False)  # then made invalid UTF-8 in place (pyarrow refuses it)
    raw = (tmp_path / "c.parquet").read_bytes()
    (tmp_path / "c.parquet").write_bytes(raw.replace(b"bad \x01 byte", b"bad \xff byte"))
    out = tmp_path / "bank"
    m = build_bank([tmp_path / "a.jsonl", tmp_path / "b.tar", tmp_path / "c.parquet"], out, embedder=EMB,
                   progress=False)
    got = dict(entries(out))
    assert got == {"lone": "bad \ufffd surrogate", "nul": "nul inside", "raw": "raw tab and bell",
                   "pair": "emoji \U0001f600 kept", "t1": "caf\ufffd au lait", "p1": "ok caption",
                   "p2": "bad \ufffd byte"}
    assert MemoryBank.open(out).meta["domain"][1] == "x-ray"
    assert m["build"]["repaired"] == 5 and m["build"]["skipped_total"] == 0


# ---- 2. damaged and truncated containers ------------------------------------------------------

def test_tar_truncated_at_60_percent(tmp_path):
    members = write_tar(tmp_path / "full.tar", tar_samples(100))
    data = (tmp_path / "full.tar").read_bytes()
    cut = int(len(data) * 0.6)
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    out = tmp_path / "bank"
    rc, text, err = build_cli([tmp_path / "cut.tar"], out)
    assert rc == 1
    complete = {m.name.split(".")[0] for m in members if m.name.endswith(".txt") and m.offset_data + m.size <= cut}
    got = dict(entries(out))
    assert complete <= set(got) and all(got[k] == f"caption of sample {int(k[1:])}" for k in got)
    assert len(got) >= 59  # every sample written before the cut
    b = MemoryBank.open(out).manifest["build"]
    (f,) = b["files"]
    assert f["damaged"] and "ends early" in f["damaged"][0]["reason"]
    assert f["damaged"][0]["records_read"] == f["read"] >= len(complete)
    assert "DAMAGED" in text and "records read" in text


def test_tar_gz_truncated(tmp_path):
    write_tar(tmp_path / "full.tar", tar_samples(60))
    import gzip

    gz = gzip.compress((tmp_path / "full.tar").read_bytes(), mtime=0)
    (tmp_path / "cut.tar.gz").write_bytes(gz[:len(gz) // 2])
    m = build_bank([tmp_path / "cut.tar.gz"], tmp_path / "bank", embedder=EMB, progress=False)
    (f,) = m["build"]["files"]
    assert f["damaged"] and m["build"]["damaged_files"] == 1 and 0 < m["count"] < 60
    assert all(c == f"caption of sample {int(i[1:])}" for i, c in entries(tmp_path / "bank"))


def test_tar_member_header_corrupted_mid_archive(tmp_path):
    """Once half the archive was silently lost after one bad header; now the
    reader skips past it and keeps every later sample."""
    members = write_tar(tmp_path / "c.tar", tar_samples(100))
    bad = next(m for m in members if m.name == "s0050.txt")
    data = bytearray((tmp_path / "c.tar").read_bytes())
    data[bad.offset:bad.offset + 100] = b"\xa5" * 100  # the member name and mode: the checksum fails
    (tmp_path / "c.tar").write_bytes(bytes(data))
    out = tmp_path / "bank"
    rc, text, _ = build_cli([tmp_path / "c.tar"], out)
    assert rc == 1
    got = dict(entries(out))
    assert len(got) == 99 and "s0050" not in got and got["s0099"] == "caption of sample 99"
    b = MemoryBank.open(out).manifest["build"]
    assert b["skipped"] == {"no caption (txt member or json caption)": 1}
    assert "damaged member header" in b["files"][0]["damaged"][0]["reason"]


@pytest.mark.parametrize("kind", ["empty.tar", "garbage.tar", "empty.parquet", "garbage.parquet",
                                  "empty.jsonl.gz", "garbage.jsonl.gz", "cut.jsonl.gz"])
def test_damaged_container_next_to_a_good_file(tmp_path, kind):
    import gzip

    bad = tmp_path / kind
    if kind.startswith("empty"):
        bad.write_bytes(b"")
    elif kind.startswith("garbage"):
        bad.write_bytes(os.urandom(3000))
    else:
        lines = b"".join(json.dumps({"id": f"g{i}", "caption": f"gz caption {i}"}).encode() + b"\n"
                         for i in range(500))
        z = gzip.compress(lines, mtime=0)
        bad.write_bytes(z[:len(z) * 2 // 3])
    write_jsonl(tmp_path / "good.jsonl", [{"id": f"ok{i}", "caption": f"good caption {i}"} for i in range(10)])
    out = tmp_path / "bank"
    rc, text, err = build_cli([bad, tmp_path / "good.jsonl"], out)
    assert rc == 1 and "Traceback" not in err
    got = dict(entries(out))
    assert {f"ok{i}" for i in range(10)} <= set(got)
    b = MemoryBank.open(out).manifest["build"]
    f = next(x for x in b["files"] if x["path"] == str(bad))
    assert f["damaged"] and b["damaged_files"] == 1 and str(bad) in text
    assert "\n" not in f["damaged"][0]["reason"]  # an empty tar's tarfile message spans four lines
    assert [x for x in text.splitlines() if str(bad) in x and "DAMAGED" in x][0].endswith("records read)")
    if kind == "cut.jsonl.gz":  # the lines before the damage are kept
        assert f["kept"] == f["damaged"][0]["records_read"] > 100
        assert all(got[f"g{i}"] == f"gz caption {i}" for i in range(f["kept"]))


def test_parquet_damaged_row_group(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"caption": [f"caption number {i} " * 5 for i in range(400)],
                             "id": [f"p{i}" for i in range(400)]}), p, row_group_size=100, compression="zstd")
    c = pq.ParquetFile(p).metadata.row_group(2).column(0)
    data = bytearray(p.read_bytes())
    mid = c.data_page_offset + c.total_compressed_size // 2
    data[mid:mid + 16] = bytes(x ^ 0x5A for x in data[mid:mid + 16])
    p.write_bytes(bytes(data))
    items = list(read_corpus([p]))
    assert sum(isinstance(x, Record) for x in items) == 300
    (d,) = [x for x in items if isinstance(x, Damaged)]
    assert d.position == "row group 2 (rows 201-300)" and d.records_read == 200
    m = build_bank([p], tmp_path / "bank", embedder=EMB, progress=False)
    assert m["count"] == 300 and entries(tmp_path / "bank")[-1] == ("p399", "caption number 399 " * 4 + "caption number 399")


def test_non_utf8_names(tmp_path):
    """A corpus file and a tar member whose names are not UTF-8 cannot be stored in
    the bank's meta: refused per file / per sample, the rest kept."""
    d = os.fsencode(tmp_path / "corpus")
    os.makedirs(d)
    with open(os.path.join(d, b"bad\xff.jsonl"), "wb") as fh:
        fh.write(json.dumps({"caption": "lost in a bad name"}).encode() + b"\n")
    write_jsonl(tmp_path / "corpus" / "good.jsonl", [{"id": "g", "caption": "a good one"}])
    with tarfile.open(tmp_path / "corpus" / "m.tar", "w", encoding="utf-8", errors="surrogateescape") as tf:
        for name, data in (("ok.png", png()), ("ok.txt", b"fine"), ("b\udcff.png", png()), ("b\udcff.txt", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    m = build_bank([tmp_path / "corpus"], tmp_path / "bank", embedder=EMB, progress=False)
    assert sorted(c for _, c in entries(tmp_path / "bank")) == ["a good one", "fine"]
    assert m["build"]["damaged_files"] == 1 and m["build"]["skipped"] == {"member name is not valid UTF-8": 1}


# ---- 3. images ----------------------------------------------------------------------------------

def _image_corpus(root):
    os.makedirs(root / "img")
    (root / "img" / "ok.png").write_bytes(png())
    (root / "img" / "garbage.png").write_bytes(b"not an image at all")
    (root / "img" / "cut.png").write_bytes(png(size=64)[:300])
    (root / "img" / "bomb.png").write_bytes(bomb_png())
    rows = [{"id": n, "caption": f"figure {n}", "image": f"img/{n}.png"}
            for n in ("ok", "garbage", "cut", "bomb", "missing")]
    write_jsonl(root / "c.jsonl", rows)
    return root / "c.jsonl"


def test_images_checked_without_vlm(tmp_path):
    f = _image_corpus(tmp_path)
    out = tmp_path / "bank"
    rc, text, err = build_cli([f], out)
    assert rc == 1 and "4 record(s) kept without a readable image" in text
    assert len(entries(out)) == 5  # no VLM: kept, listed
    reasons = {r["position"]: r["reason"] for r in skipped_rows(out)}
    assert set(reasons) == {"line 2", "line 3", "line 4", "line 5"}
    assert "too large" in reasons["line 4"] and "No such file" in reasons["line 5"]
    rc, _, _ = build_cli([f], tmp_path / "b2", "--missing-images", "skip")
    assert rc == 1 and entries(tmp_path / "b2") == [("ok", "figure ok")]


def test_vlm_bank_refuses_entries_without_a_readable_image(tmp_path):
    """A 20,000 x 20,000 PNG once aborted a --vlm build with a traceback; a VLM
    bank now leaves out (by default) every entry it could not rerank."""
    f = _image_corpus(tmp_path)
    vlm = FixtureVLM()
    m = build_bank([f], tmp_path / "bank", embedder=EMB, vlm=vlm, progress=False)
    assert m["count"] == 1 and m["build"]["skipped"] == {"unreadable image": 4}
    bank = MemoryBank.open(tmp_path / "bank")
    assert bank.image_embeddings([0]).float().norm() > 0.99
    keep = build_bank([f], tmp_path / "keep", embedder=EMB, vlm=vlm, progress=False, missing_images="keep")
    assert keep["count"] == 5 and keep["build"]["image_failures"] == 4
    assert MemoryBank.open(tmp_path / "keep").image_embeddings([1, 2, 3, 4]).abs().sum() == 0


def test_vlm_build_over_a_corpus_without_images_fails_clearly(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"caption": f"c{i}", "image": f"gone{i}.png"} for i in range(5)])
    with pytest.raises(ValueError, match=r"no usable records \(5 unreadable image\)"):
        build_bank([tmp_path / "c.jsonl"], tmp_path / "bank", embedder=EMB, vlm=FixtureVLM(), progress=False)


def test_open_image_refuses_bombs_with_a_clear_error(tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    with pytest.raises(ValueError, match="too large: 400,000,000 pixels, more than the limit of 89,478,485"):
        open_image(str(tmp_path / "bomb.png"))
    (tmp_path / "big.png").write_bytes(bomb_png(3000, 2000))  # the limit is ours to set
    with pytest.raises(ValueError, match="too large: 3000x2000 pixels, more than the limit of 1,000,000"):
        open_image(str(tmp_path / "big.png"), max_pixels=1_000_000)
    with pytest.raises(ValueError, match="not a readable image"):  # within the default: decoded, and its data is fake
        open_image(str(tmp_path / "big.png"))


# ---- 4. duplicates, banks in the corpus, paths -----------------------------------------------------

def test_tar_duplicate_member_names(tmp_path):
    """Two samples sharing a member name once paired the first caption with the
    last image; now the first sample keeps its own image and the second is skipped."""
    write_tar(tmp_path / "d.tar", [("k1", {"png": png(250), "txt": b"first caption"}),
                                   ("k2", {"png": png(120), "txt": b"middle caption"}),
                                   ("k1", {"png": png(10), "txt": b"second caption"}),
                                   ("k3", {"png": png(60), "txt": b"third"}), ("k3", {"png": png(70), "txt": b"again"})])
    out = tmp_path / "bank"
    m = build_bank([tmp_path / "d.tar"], out, embedder=EMB, progress=False)
    bank = MemoryBank.open(out)
    assert bank.meta["caption"] == ["first caption", "middle caption", "third"]
    assert open_image(bank.meta["image"][0]).getpixel((0, 0))[0] == 250
    assert open_image(bank.meta["image"][2]).getpixel((0, 0))[0] == 60
    assert m["build"]["skipped"] == {"duplicate member name": 2}
    reasons = [(r["position"], r["reason"]) for r in skipped_rows(out)]
    assert [p for p, _ in reasons] == ["sample k1", "sample k3"]
    assert reasons[0][1].startswith("duplicate member name: 'k1.png' (first at byte 0)")
    assert reasons[1][1].startswith("duplicate member name: 'k3.png'")


def test_bank_inside_the_corpus_folder_is_not_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    os.makedirs(corpus)
    write_jsonl(corpus / "a.jsonl", [{"id": f"a{i}", "caption": f"caption {i}"} for i in range(20)])
    rc, _, _ = build_cli([corpus], corpus / "bank1")  # written inside the folder it reads
    assert rc == 0 and len(entries(corpus / "bank1")) == 20
    rc, text, _ = build_cli([corpus], corpus / "bank2")  # bank1 is now in the corpus folder
    assert rc == 0 and entries(corpus / "bank2") == entries(corpus / "bank1")
    assert f"left out {corpus / 'bank1'}: an mgcl bank" in text
    rc, _, err = build_cli([corpus / "bank1"], tmp_path / "bank3")
    assert rc == 2 and "left out bank folder" in one_line(err)


def test_image_paths_stay_under_the_corpus_root(tmp_path):
    root = tmp_path / "corpus"
    os.makedirs(root / "img")
    (tmp_path / "outside.png").write_bytes(png())
    (root / "img" / "in.png").write_bytes(png())
    write_jsonl(root / "c.jsonl", [{"id": "in", "caption": "inside", "image": "img/in.png"},
                                   {"id": "up", "caption": "dot dot", "image": "../outside.png"},
                                   {"id": "abs", "caption": "absolute", "image": str(tmp_path / "outside.png")}])
    out = tmp_path / "bank"
    rc, _, _ = build_cli([root / "c.jsonl"], out)
    assert rc == 1 and entries(out) == [("in", "inside")]
    reasons = [r["reason"] for r in skipped_rows(out)]
    assert len(reasons) == 2 and all("outside the corpus root" in r and "--allow-external-images" in r
                                     for r in reasons)
    assert build_cli([root / "c.jsonl"], tmp_path / "b2", "--allow-external-images")[0] == 0
    assert len(entries(tmp_path / "b2")) == 3
    # --image-root: relative paths resolve against it, and it is the root
    write_jsonl(root / "d.jsonl", [{"id": "rel", "caption": "relative", "image": "outside.png"},
                                   {"id": "abs", "caption": "absolute", "image": str(tmp_path / "outside.png")},
                                   {"id": "up", "caption": "dot dot", "image": "../outside.png"}])
    rc, _, _ = build_cli([root / "d.jsonl"], tmp_path / "b3", "--image-root", tmp_path)
    assert rc == 1 and [i for i, _ in entries(tmp_path / "b3")] == ["rel", "abs"]


# ---- 5. tampered banks ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clean_bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("tamper")
    write_tar(root / "c.tar", tar_samples(120))
    out = root / "bank"
    build_bank([root / "c.tar"], out, embedder=EMB, vlm=FixtureVLM(), shard_size=40, progress=False)
    pytest.importorskip("faiss")
    build_index(MemoryBank.open(out), "flat")
    return out


def _flip(p, at=-3):
    data = bytearray(p.read_bytes())
    data[at] ^= 0xFF
    p.write_bytes(bytes(data))


def _nan_shard(p):
    from safetensors.torch import load_file, save_file

    t = load_file(str(p))["embeddings"].clone()
    t[:] = float("nan")
    save_file({"embeddings": t}, str(p))


def _swap(a, b):
    tmp = a.with_suffix(".x")
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)


def _rewrite_caption(p):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(p)
    caps = t.column("caption").to_pylist()
    caps[5] = "a caption someone edited by hand"
    pq.write_table(t.set_column(t.column_names.index("caption"), "caption", pa.array(caps)), p)


TAMPER = {
    "flipped byte": ("embeddings/shard-00001.safetensors", _flip),
    "NaN shard": ("embeddings/shard-00002.safetensors", _nan_shard),
    "swapped shards": ("embeddings/shard-00000.safetensors",
                       lambda p: _swap(p, p.parent / "shard-00001.safetensors")),
    "rewritten captions": ("meta.parquet", _rewrite_caption),
    "flipped VLM shard": ("vlm/shard-00000.safetensors", _flip),
    "flipped BM25 cache": ("bm25/tokens.safetensors", lambda p: _flip(p, -1)),
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_bank_is_refused_on_first_read(clean_bank, tmp_path, case):
    """Once served without notice by db query, MemoryBank.open and mgcl run;
    now the first read of the file refuses it, naming it."""
    rel, tamper = TAMPER[case]
    b = tmp_path / "b"
    shutil.copytree(clean_bank, b)
    tamper(b / rel)
    bank = MemoryBank.open(b)  # cheap: headers only
    queries = ["caption of sample 5", "caption of sample 77"]
    with pytest.raises(BankError, match=f"{rel}' does not match its sha256"):
        retrieve(bank, queries, 40, vlm=FixtureVLM(), k_v=1)  # dense, meta, visual, BM25 (40 > k: gated)
    rc, _, err = cli("db", "query", b, *queries, "-k", "40")
    if rel.startswith(("embeddings", "meta")):  # what a plain query reads
        assert rc == 2 and rel in one_line(err)
    rc, _, err = cli("db", "info", b, "--verify")
    assert rc == 2 and rel in one_line(err)


def test_tampered_bank_refused_through_a_run_siphon(clean_bank, tmp_path):
    """mgcl run opens the bank through Siphon.from_bank (the one road from a bank folder): the same refusal."""
    from mgcl.retrieval import Siphon

    b = tmp_path / "b"
    shutil.copytree(clean_bank, b)
    _flip(b / "embeddings/shard-00000.safetensors")
    siphon = Siphon.from_bank(str(b), a=2, b=2, c=2, n_general=3)
    with pytest.raises(BankError, match="shard-00000.safetensors' does not match"):
        siphon.reference_set([])


def test_nan_with_a_matching_checksum_is_caught_by_verify(clean_bank, tmp_path):
    from mgcl.retrieval import store

    b = tmp_path / "b"
    shutil.copytree(clean_bank, b)
    _nan_shard(b / "embeddings/shard-00001.safetensors")
    m = json.loads((b / "manifest.json").read_text())
    m["shards"][1]["sha256"] = store.sha256_file(b / "embeddings/shard-00001.safetensors")
    (b / "manifest.json").write_text(json.dumps(m))
    rc, _, err = cli("db", "info", b, "--verify")
    assert rc == 2 and "shard-00001.safetensors' holds NaN or inf" in one_line(err)


def test_a_clean_bank_passes_every_check(clean_bank):
    bank = MemoryBank.open(clean_bank, verify=True)
    assert not bank._pending  # verify checked every file
    lazy = MemoryBank.open(clean_bank)
    assert lazy.search(["caption of sample 5"], 1)[0][0].caption == "caption of sample 5"
    assert not any(p.startswith("embeddings/") or p == "meta.parquet" for p in lazy._pending)
    assert "index/faiss-flat.index" in lazy._pending and "vlm/shard-00000.safetensors" in lazy._pending
    assert len(retrieve(lazy, ["caption of sample 5"], 3, vlm=FixtureVLM())[0]) == 3
    assert not any(p.startswith("vlm/") for p in lazy._pending)  # the rerank read them: checked
    rc, out, _ = cli("db", "info", clean_bank, "--verify")
    assert rc == 0 and "checksums: all files match" in out


# ---- 6. bad manifests and index files ----------------------------------------------------------------

def _edit(m: dict, case: str):
    if case == "shards is a string":
        m["shards"] = "embeddings/shard-00000.safetensors"
    elif case == "shard without sha256":
        del m["shards"][0]["sha256"]
    elif case == "count is a string":
        m["count"] = "120"
    elif case == "negative dim":
        m["dim"] = -4
    elif case == "vlm is a list":
        m["vlm"] = []
    elif case == "unknown index kind":
        m["index"]["kind"] = "hnsw"
    elif case == "shard path with ..":
        m["shards"][0]["path"] = "../../etc/passwd"
    elif case == "absolute shard path":
        m["shards"][0]["path"] = "/etc/passwd"
    elif case == "absolute meta path":
        m["meta"]["path"] = "/etc/hostname"
    elif case == "not an object":
        return [1, 2]
    return m


@pytest.mark.parametrize("case", ["shards is a string", "shard without sha256", "count is a string", "negative dim",
                                  "vlm is a list", "unknown index kind", "shard path with ..", "absolute shard path",
                                  "absolute meta path", "not an object", "not JSON"])
def test_bad_manifest_is_one_line(clean_bank, tmp_path, case):
    b = tmp_path / "b"
    shutil.copytree(clean_bank, b)
    if case == "not JSON":
        (b / "manifest.json").write_bytes(b"{\xff not json")
    else:
        (b / "manifest.json").write_text(json.dumps(_edit(json.loads((b / "manifest.json").read_text()), case)))
    with pytest.raises(BankError):
        MemoryBank.open(b)
    for args in (["info", b, "--verify"], ["query", b, "x"]):
        rc, _, err = cli("db", *args)
        assert rc == 2 and "manifest" in one_line(err)
    if "path" in case:
        assert "not a file inside the bank" in err


def test_corrupt_faiss_index(clean_bank, tmp_path):
    from mgcl.retrieval import store

    b = tmp_path / "b"
    shutil.copytree(clean_bank, b)
    rel = "index/faiss-flat.index"
    (b / rel).write_bytes(b"this is not a faiss index" * 10)
    rc, _, err = cli("db", "query", b, "x", "--index")
    assert rc == 2 and f"{rel}' does not match its sha256" in one_line(err)
    m = json.loads((b / "manifest.json").read_text())
    m["index"]["sha256"] = store.sha256_file(b / rel)  # consistent but garbage
    (b / "manifest.json").write_text(json.dumps(m))
    rc, _, err = cli("db", "query", b, "x", "--index")
    assert rc == 2 and f"{rel}' is not a readable FAISS index" in one_line(err)


# ---- 7. killed builds (see also test_retrieval.py: every commit point, kill -9) ---------------------

def test_resume_redoes_a_shard_whose_records_changed(tmp_path):
    """Killed after shard 1; an image of shard 0 disappears before the restart, so
    the records of every shard shift by one: the resumed build must equal a fresh
    build of the corpus as it is now, not reuse the stale shards."""
    root = tmp_path / "c"
    os.makedirs(root / "img")
    rows = []
    for i in range(50):
        (root / "img" / f"{i}.png").write_bytes(png(i * 5))
        rows.append({"id": f"i{i}", "caption": f"caption {i}", "image": f"img/{i}.png"})
    write_jsonl(root / "c.jsonl", rows)
    vlm = FixtureVLM()

    def hook(stage, j):
        if stage == "committed" and j == 1:
            raise KeyboardInterrupt

    kw = dict(embedder=EMB, vlm=vlm, shard_size=16, progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_bank([root / "c.jsonl"], tmp_path / "out", _hook=hook, **kw)
    os.remove(root / "img" / "3.png")
    build_bank([root / "c.jsonl"], tmp_path / "out", **kw)
    build_bank([root / "c.jsonl"], tmp_path / "fresh", **kw)
    assert file_hashes(str(tmp_path / "out")) == file_hashes(str(tmp_path / "fresh"))
    assert len(entries(tmp_path / "out")) == 49


def test_resume_cleans_up_temporary_files(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"caption": f"caption {i}"} for i in range(40)])

    def hook(stage, j):
        if stage == "committed" and j == 0:
            open(tmp_path / "out" / "embeddings" / ".shard-00001.safetensors.abc.tmp", "w").close()
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_bank([tmp_path / "c.jsonl"], tmp_path / "out", embedder=EMB, shard_size=16, progress=False, _hook=hook)
    build_bank([tmp_path / "c.jsonl"], tmp_path / "out", embedder=EMB, shard_size=16, progress=False)
    build_bank([tmp_path / "c.jsonl"], tmp_path / "ref", embedder=EMB, shard_size=16, progress=False)
    assert file_hashes(str(tmp_path / "out")) == file_hashes(str(tmp_path / "ref"))


# ---- 8. bad command-line input: one line naming it, exit 2 -------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    write_jsonl(root / "c.jsonl", [{"id": f"s{i}", "caption": f"small caption {i}"} for i in range(30)])
    assert build_cli([root / "c.jsonl"], root / "bank")[0] == 0
    (root / "file.txt").write_text("x")
    return root


BAD_CLI = {
    "missing bank": (["query", "{r}/nope", "x"], "nope"),
    "a file as bank": (["info", "{r}/file.txt"], "file.txt"),
    "k = 0": (["query", "{r}/bank", "x", "-k", "0"], "k must be"),
    "bad device": (["query", "{r}/bank", "x", "--device", "tpu"], "'tpu'"),
    "missing corpus": (["build", "{r}/none.jsonl", "--out", "{r}/o1", "--embedder", EMB], "none.jsonl"),
    "unknown corpus format": (["build", "{r}/file.txt", "--out", "{r}/o2", "--embedder", EMB], "file.txt"),
    "out is a file": (["build", "{r}/c.jsonl", "--out", "{r}/file.txt", "--embedder", EMB], "file.txt"),
    "shard size 0": (["build", "{r}/c.jsonl", "--out", "{r}/o3", "--embedder", EMB, "--shard-size", "0"], "shard_size"),
    "batch size 0": (["build", "{r}/c.jsonl", "--out", "{r}/o4", "--embedder", EMB, "--batch-size", "0"], "batch_size"),
    "missing image root": (["build", "{r}/c.jsonl", "--out", "{r}/o5", "--embedder", EMB, "--image-root", "{r}/no"],
                           "no"),
    "pixel limit 0": (["build", "{r}/c.jsonl", "--out", "{r}/o6", "--embedder", EMB, "--max-image-pixels", "0"],
                      "max_image_pixels"),
    "bad hashing spec": (["build", "{r}/c.jsonl", "--out", "{r}/o7", "--embedder", "hashing:x"], "hashing:x"),
    "other settings": (["build", "{r}/c.jsonl", "--out", "{r}/bank", "--embedder", "hashing:32"], "other settings"),
    "ivfpq on a tiny bank": (["index", "{r}/bank", "--index", "ivfpq"], "training needs"),
    "nbits 0": (["index", "{r}/bank", "--index", "ivfpq", "--nbits", "0"], "nbits"),
    "m does not divide": (["index", "{r}/bank", "--index", "ivfpq", "--m", "5"], "m=5"),
    "no index to query": (["query", "{r}/bank", "x", "--index", "flat"], "no FAISS index"),
    "wrong query embedder": (["query", "{r}/bank", "x", "--embedder", "hashing:32"], "dim 64"),
}


@pytest.mark.parametrize("case", list(BAD_CLI))
def test_db_bad_input_is_one_line_exit_2(small, case):
    if "index" in case or "ivfpq" in case or "nbits" in case or "divide" in case:
        pytest.importorskip("faiss")
    argv, needle = BAD_CLI[case]
    rc, _, err = cli("db", *[a.format(r=small) for a in argv])
    assert rc == 2 and needle in one_line(err) and one_line(err).startswith("mgcl db ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_db_query_on_cuda_without_a_gpu(small):
    rc, _, err = cli("db", "query", small / "bank", "x", "--device", "cuda")
    assert rc == 2 and "no GPU is visible" in one_line(err)


@pytest.mark.parametrize("argv", [["build", "{r}/c.jsonl", "--out", "{r}/h1", "--embedder", "no-such-org/no-model"],
                                  ["query", "{r}/bank", "x", "--embedder", "no-such-model-anywhere"],
                                  ["build", "{r}/c.jsonl", "--out", "{r}/h2", "--embedder", EMB, "--vlm", "biomedclip"]])
def test_offline_hub_names_fail_at_once(small, monkeypatch, argv):
    """An unknown --embedder once spent 81 s on retries, --vlm biomedclip printed
    three tracebacks; offline, both now fail at once saying how to pass a folder."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download("microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", local_files_only=True)
        if "biomedclip" in argv:
            pytest.skip("BiomedCLIP is in the local Hugging Face cache")
    except OSError:
        pass
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = cli("db", *[a.format(r=small) for a in argv])
    assert rc == 2 and "pass its folder" in one_line(err) and "HF_HUB_OFFLINE" in err


def test_an_unknown_embedder_is_refused_before_sentence_transformers_loads(small, tmp_path):
    """The hub check ran after importing sentence-transformers: 25.8 s inside
    main() before the one line on a loaded 2-core VM, 1.2 s with the check first.
    Nothing heavy is imported before the refusal."""
    import subprocess
    import sys

    code = ("import sys; from mgcl.cli import main; "
            f"rc = main(['db', 'build', {str(small / 'c.jsonl')!r}, '--out', {str(tmp_path / 'o')!r}, "
            "'--embedder', 'no-such-org/no-model']); "
            "print(rc, 'sentence_transformers' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.stdout.split() == ["2", "False", "False"], (r.stdout, r.stderr[-2000:])
    assert "pass its folder" in one_line(r.stderr)


# ---- 9. output hygiene ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_every_bank_file_follows_the_umask(tmp_path, mask):
    write_tar(tmp_path / "c.tar", tar_samples(20))
    old = os.umask(mask)
    try:
        out = tmp_path / "bank"
        build_bank([tmp_path / "c.tar"], out, embedder=EMB, vlm=FixtureVLM(), shard_size=8, progress=False)
        if __import__("importlib").util.find_spec("faiss"):
            build_index(MemoryBank.open(out), "flat")
    finally:
        os.umask(old)
    modes = {os.path.relpath(os.path.join(r, f), out): stat.S_IMODE(os.stat(os.path.join(r, f)).st_mode)
             for r, _, fs in os.walk(out) for f in fs}
    assert "embeddings/shard-00000.safetensors" in modes and "meta.parquet" in modes
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_atomic_write_fsyncs_the_directory(tmp_path, monkeypatch):
    from mgcl import _io

    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    _io.atomic_write_bytes(str(tmp_path / "x.bin"), b"data")
    assert synced == [False, True]  # the file, then its directory after the rename
    assert (tmp_path / "x.bin").read_bytes() == b"data" and os.listdir(tmp_path) == ["x.bin"]


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_folders_published_and_detector_checkpoints_follow_the_umask(tmp_path, monkeypatch, mask):
    """mkdtemp folders (the demo's assets, the synth and model caches) were 0700 or a
    fixed 0755, and save_detector's safetensors file 0600."""
    import tempfile

    from mgcl import _io
    from mgcl.retrieval.cleanse import save_detector

    synced = []
    real = _io.fsync_dir
    monkeypatch.setattr(_io, "fsync_dir", lambda p: (synced.append(p), real(p)))
    old = os.umask(mask)
    try:
        tmp = tempfile.mkdtemp(dir=tmp_path)
        os.makedirs(os.path.join(tmp, "sub"))
        _io.publish_dir(tmp, str(tmp_path / "final"))
        assert synced == [str(tmp_path)]  # the parent, after the rename
        save_detector(torch.nn.Linear(2, 2), str(tmp_path / "det.safetensors"), arch="x", num_classes=2)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "final") == mode(tmp_path / "final" / "sub") == 0o777 & ~mask
    assert mode(tmp_path / "det.safetensors") == 0o666 & ~mask


def test_db_query_escapes_control_characters(tmp_path):
    caps = ["evil \x1b[2J\x1b]0;pwned\x07 caption", "plain caption"]
    write_bank(str(tmp_path / "b"), torch.eye(2, 8), caps, domains=["x\x1b[31m", ""], embedder="hashing:8")
    rc, out, _ = cli("db", "query", tmp_path / "b", "evil \x1b caption", "-k", "2")
    assert rc == 0 and "\x1b" not in out and "\x07" not in out
    assert "evil \\x1b[2J\\x1b]0;pwned\\x07 caption" in out and "[x\\x1b[31m]" in out
    rc, out, _ = cli("db", "query", tmp_path / "b", "evil", "--json")
    assert "\x1b" not in out and json.loads(out)[0]["hits"][0]["caption"] == caps[0]


@pytest.mark.parametrize("argv, needle", [
    (["--scale", "-1"], "--scale must be a finite number > 0, got -1.0"),  # once ran the whole bench, exit 0
    (["--scale", "nan"], "--scale must be"),
    (["--repeats", "0"], "--repeats must be >= 1"),  # once a StatisticsError traceback after the bench
    (["--json", "{r}"], "is a directory"),
    (["--json", "{r}/file.txt/x.json"], "file.txt is a file"),
], ids=["scale -1", "scale nan", "repeats 0", "json a folder", "json under a file"])
def test_bench_bad_options_are_one_line_before_it_runs(small, argv, needle):
    rc, out, err = cli("bench", "retrieval", *[a.format(r=small) for a in argv])
    assert rc == 2 and out == "" and needle in one_line(err) and one_line(err).startswith("mgcl bench: ")
