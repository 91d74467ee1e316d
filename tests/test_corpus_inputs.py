"""db build inputs beyond plain files: brace-expanded shard patterns (as bash
expands them), fsspec URLs (file://, memory://; hf:// offline is a clear
error), Hugging Face datasets (a Dataset, a save_to_disk folder, named
columns). The ingest rules hold for each: every readable record kept, skips
in skipped.jsonl, a deterministic order, a resumable build."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess

import pytest
from retrieval_fixtures import color_image, file_hashes, make_records, write_corpus

from mgcl import cli
from mgcl.retrieval.build import build_bank
from mgcl.retrieval.corpus import HFDataset, expand, expand_braces, read_corpus

EMB = "hashing:32"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MGCL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


PATTERNS = ["shard-{000000..000003}.tar", "a{1..10..3}b", "{5..1..2}", "{-2..02}", "{08..11}", "x{a,b{1,2}}y{c,d}",
            "{a..e..2}", "p{a}q", "{1..3", "plain.tar", "{z..w}", "{1..1}", "d{0001..10..4}"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_brace_expansion_is_bash(pattern):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash to compare with")
    want = subprocess.run([bash, "-c", f"printf '%s\\n' {pattern}"], capture_output=True, text=True).stdout.split()
    assert expand_braces(pattern) == want


def _shards(tmp_path, n_shards: int = 3) -> list[str]:
    """WebDataset shards shard-000000.tar ... holding 4 samples each."""
    import tarfile

    paths = []
    for s in range(n_shards):
        p = tmp_path / "shards" / f"shard-{s:06d}.tar"
        p.parent.mkdir(exist_ok=True)
        with tarfile.open(p, "w") as tf:
            for i in range(4):
                buf = io.BytesIO()
                color_image(0.1 * i, s * 10 + i).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("txt", f"shard {s} sample {i} chest x-ray".encode())):
                    info = tarfile.TarInfo(f"k{s}{i}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(str(p))
    return paths


def test_a_shard_pattern_builds_the_bank_of_its_files(tmp_path):
    files = _shards(tmp_path)
    pattern = str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    build_bank(files, str(tmp_path / "listed"), embedder=EMB, progress=False)
    build_bank(pattern, str(tmp_path / "pattern"), embedder=EMB, progress=False)
    a, b = file_hashes(str(tmp_path / "listed")), file_hashes(str(tmp_path / "pattern"))
    assert a["meta.parquet"] == b["meta.parquet"] and a["embeddings/shard-00000.safetensors"] == \
        b["embeddings/shard-00000.safetensors"]
    with pytest.raises(FileNotFoundError, match=r"2 of its 5 paths do not exist .*shard-000003.tar"):
        expand(str(tmp_path / "shards" / "shard-{000000..000004}.tar"))
    assert cli.main(["db", "build", str(tmp_path / "shards" / "shard-{000000..000009}.tar"), "--out",
                     str(tmp_path / "x"), "--embedder", EMB]) == 2


def test_fsspec_urls_local_and_memory(tmp_path, cache):
    fsspec = pytest.importorskip("fsspec")
    files = write_corpus(str(tmp_path / "c"), make_records(30))
    local = [r for r in read_corpus(files)]
    assert [r for r in read_corpus(["file://" + f for f in files])] == local
    mem = fsspec.filesystem("memory")
    mem.pipe("/mgcl-test/a.jsonl", b'{"caption": "memory one"}\nnot json\n{"caption": "memory two"}\n')
    mem.pipe("/mgcl-test/dir/b.jsonl", b'{"caption": "memory three"}\n')
    try:
        out = tmp_path / "bank"
        m = build_bank(["memory://mgcl-test/a.jsonl", "memory://mgcl-test/dir"], str(out), embedder=EMB,
                       progress=False)
        assert m["count"] == 3 and m["build"]["skipped_total"] == 1
        rows = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
        assert rows[0]["position"] == "line 2" and rows[0]["file"].startswith(str(cache / "corpus" / "memory"))
        again = build_bank(["memory://mgcl-test/a.jsonl", "memory://mgcl-test/dir"], str(out), embedder=EMB,
                           progress=False)
        assert again == m, "the cached copy is reused: the same build"
        with pytest.raises(FileNotFoundError, match="memory://mgcl-test/none.jsonl"):
            expand("memory://mgcl-test/none.jsonl")
    finally:
        mem.rm("/mgcl-test", recursive=True)


def test_hf_url_offline_is_one_clear_error(tmp_path, monkeypatch, capsys):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = cli.main(["db", "build", "hf://datasets/no-org/no-set/shard-{000000..000001}.tar", "--out",
                   str(tmp_path / "b"), "--embedder", EMB])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "hf://datasets/no-org/no-set/shard-000000.tar" in err, err
    assert "HF_HUB_OFFLINE is set" in err and "does not exist" not in err, "offline is not 'does not exist'"


def _dataset(n: int = 6):
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa

    feats = datasets.Features({"picture": datasets.Image(), "report": datasets.Value("string"),
                               "modality": datasets.Value("string")})
    pics = []
    for i in range(n):
        buf = io.BytesIO()
        color_image(i / n, i).save(buf, format="PNG")
        pics.append(buf.getvalue() if i != 2 else None)
    caps = [f"dataset caption {i}" if i != 4 else "" for i in range(n)]
    tbl = feats.encode_batch({"picture": pics, "report": caps, "modality": ["x-ray"] * n})
    return datasets.Dataset(pa.table(tbl, schema=feats.arrow_schema), info=datasets.DatasetInfo(features=feats),
                            fingerprint="mgcl-test-dataset")


def test_a_hugging_face_dataset_with_named_columns(tmp_path):
    ds = _dataset()
    with pytest.raises(ValueError, match="no caption column .*picture, report, modality"):
        expand(ds)
    with pytest.raises(ValueError, match="no image column 'pic'"):
        expand(HFDataset(ds, "pic", "report"))
    items = list(read_corpus(HFDataset(ds, "picture", "report")))
    recs = [r for r in items if hasattr(r, "caption")]
    assert [r.caption for r in recs] == [f"dataset caption {i}" for i in (0, 1, 2, 3, 5)], "order kept"
    assert recs[0].domain == "x-ray" and "::image#0" in recs[0].image and recs[2].image == ""
    out = tmp_path / "bank"
    m = build_bank(HFDataset(ds, "picture", "report"), str(out), embedder=EMB, progress=False, vlm=None)
    assert m["count"] == 5 and m["build"]["skipped_total"] == 1
    row = json.loads((out / "skipped.jsonl").read_text().splitlines()[0])
    assert row["position"] == "row 5" and row["reason"] == "no caption field"
    from mgcl.retrieval.images import open_image

    assert open_image(recs[1].image).size == (12, 12)


def test_a_saved_dataset_folder_on_the_command_line_resumes(tmp_path, capsys):
    ds = _dataset(40)
    ds.save_to_disk(str(tmp_path / "saved"))
    args = ["db", "build", str(tmp_path / "saved"), "--image-column", "picture", "--caption-column", "report",
            "--embedder", EMB, "--shard-size", "8", "--allow-skipped"]
    assert cli.main(args + ["--out", str(tmp_path / "full")]) == 0
    assert "39 entries" in capsys.readouterr().out
    calls = []

    def stop(stage, j):
        calls.append((stage, j))
        if stage == "committed" and j == 1:
            raise KeyboardInterrupt

    src = HFDataset(str(tmp_path / "saved"), "picture", "report")
    with pytest.raises(KeyboardInterrupt):
        build_bank(src, str(tmp_path / "resumed"), embedder=EMB, shard_size=8, progress=False, _hook=stop)
    build_bank(src, str(tmp_path / "resumed"), embedder=EMB, shard_size=8, progress=False)
    assert file_hashes(str(tmp_path / "resumed")) == file_hashes(str(tmp_path / "full"))
    assert cli.main(["db", "build", str(tmp_path / "saved"), "--out", str(tmp_path / "y"), "--embedder", EMB]) == 2
    assert "no caption column" in capsys.readouterr().err
    assert cli.main(["db", "build", str(tmp_path / "saved") + "/../saved/state.json", "--out", str(tmp_path / "z"),
                     "--caption-column", "report", "--embedder", EMB]) == 2
    assert "saved Hugging Face dataset" in capsys.readouterr().err
    assert os.path.isdir(tmp_path / "full")
