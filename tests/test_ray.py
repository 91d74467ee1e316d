"""Bank build and sharded search on Ray (issue 20, item 3), on one local Ray
instance for the whole module (2 CPUs, loopback only, no dashboard; it takes
tens of seconds to start on a busy 2-core machine).

- a build over 8 shards with 2 workers equals the serial build, file for file;
- a distributed build killed (the driver stopped by an injected failure
  mid-build, shards in flight on the actors) and restarted equals an
  uninterrupted one, and keeps the complete shards;
- sharded search equals local search, bit for bit, on a tie-heavy bank,
  through MemoryBank.search, retrieve and the Siphon's reference set.
"""
import json
import os

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from mgcl.retrieval import BankError, FinishedTask, MemoryBank, Question, Siphon, build_bank, retrieve  # noqa: E402
from mgcl.retrieval.bank import write_bank  # noqa: E402
from mgcl.retrieval.distributed import build_bank_ray, serve, split  # noqa: E402

from retrieval_fixtures import DOMAINS, FINDINGS, file_hashes, make_records, write_corpus  # noqa: E402

EMB = "hashing:64"
OPTS = dict(embedder=EMB, shard_size=24, batch_size=7, progress=False)  # 8 shards of the 180-record corpus


@pytest.fixture(scope="module")
def cluster():
    # Ray gives its raylet 30 s to register; on an overloaded machine that can
    # fail (the raylet exits), so start it up to three times
    for attempt in range(3):
        try:
            ctx = ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
            break
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception for a start-up timeout
            ray.shutdown()
            if attempt == 2:
                raise
    yield ctx
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-corpus")
    files = write_corpus(str(root), make_records(180, seed=3))
    serial = root / "serial"
    m = build_bank(files, str(serial), **OPTS)
    assert len(m["shards"]) == 8
    return files, serial


def test_split_balances_contiguous_ranges():
    assert split([10] * 8, 2) == [(0, 4), (4, 8)]
    assert split([10] * 3, 5) == [(0, 1), (1, 2), (2, 3)]
    assert split([100, 0, 0, 100], 2) == [(0, 1), (1, 4)]
    r = split([5, 1, 1, 1, 1, 1, 40, 3], 3)
    assert r[0][0] == 0 and r[-1][1] == 8 and all(a < b for a, b in r)
    assert all(r[i][1] == r[i + 1][0] for i in range(len(r) - 1))


def test_ray_build_equals_serial(cluster, corpus, tmp_path):
    files, serial = corpus
    out = tmp_path / "ray"
    m = build_bank_ray(files, str(out), workers=2, **OPTS)
    assert len(m["shards"]) == 8 and m["build"]["records"] == 180
    assert file_hashes(str(out)) == file_hashes(str(serial))  # manifest, shards, quantized codes, meta, skips
    assert (out / "quantized/shard-00007.safetensors").exists()


def test_cli_db_build_ray_equals_serial(cluster, corpus, tmp_path):
    from mgcl.cli import main

    files, serial = corpus
    out = tmp_path / "cli"
    rc = main(["db", "build", *files, "--out", str(out), "--embedder", EMB, "--shard-size", "24", "--batch-size", "7",
               "--ray", "--workers", "2"])
    assert rc == 0
    assert file_hashes(str(out)) == file_hashes(str(serial))


def test_ray_build_keeps_every_readable_record_and_records_skips(cluster, tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    lines = [json.dumps({"caption": f"chest x-ray {i}", "id": f"a{i}"}) for i in range(30)]
    lines[4] = "{not json"
    lines[11] = json.dumps({"id": "nocap"})
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    (root / "b.jsonl").write_text("\n".join(json.dumps({"caption": f"fundus {i}"}) for i in range(9)) + "\n")
    opts = dict(embedder=EMB, shard_size=8, batch_size=3, progress=False)
    want = build_bank([str(root)], str(tmp_path / "serial"), **opts)
    got = build_bank_ray([str(root)], str(tmp_path / "ray"), workers=2, **opts)
    assert got["build"]["records"] == want["build"]["records"] == 37
    assert got["build"]["skipped_total"] == 2
    assert file_hashes(str(tmp_path / "ray")) == file_hashes(str(tmp_path / "serial"))
    skipped = [json.loads(x) for x in (tmp_path / "ray" / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == 2 and all(s["file"].endswith("a.jsonl") for s in skipped)


def test_killed_ray_build_resumes_to_the_uninterrupted_result(cluster, corpus, tmp_path):
    """The driver dies after writing shard 3 (the actors have later shards in
    flight); a restart keeps shards 0-2 and equals the uninterrupted build."""
    files, serial = corpus
    out = tmp_path / "killed"

    def hook(stage, j):
        if stage == "shard_written" and j == 3:
            raise KeyboardInterrupt("killed after writing shard 3")

    with pytest.raises(KeyboardInterrupt):
        build_bank_ray(files, str(out), workers=2, _hook=hook, **OPTS)
    state = json.loads((out / ".build/state.json").read_text())
    assert state["done"] == 3 and not (out / "manifest.json").exists()
    with pytest.raises(BankError, match="no manifest"):
        MemoryBank.open(out)
    done_before = {f: os.stat(out / f"embeddings/shard-0000{f}.safetensors").st_mtime_ns for f in range(3)}
    build_bank_ray(files, str(out), workers=2, **OPTS)
    assert file_hashes(str(out)) == file_hashes(str(serial))
    assert not (out / ".build").exists()
    # the complete shards were kept, not embedded and written again
    assert all(os.stat(out / f"embeddings/shard-0000{f}.safetensors").st_mtime_ns == t for f, t in done_before.items())


def tie_heavy_bank(path) -> MemoryBank:
    """Rows duplicated across shards (every row three times, far apart),
    integer-grid rows that tie, random unit rows; uneven shards, one empty."""
    g = torch.Generator().manual_seed(7)
    d = 32
    unit = torch.nn.functional.normalize(torch.randn(90, d, generator=g), dim=1)
    grid = torch.nn.functional.normalize(torch.randint(-2, 3, (60, d), generator=g).float() + 0.0, dim=1)
    base = torch.cat([unit, grid])
    rows = torch.cat([base, base[torch.randperm(150, generator=g)], base])
    caps = [f"caption {i % 150} chest x-ray" for i in range(len(rows))]
    write_bank(str(path), rows, caps, embedder=EMB.replace("64", "32"), shard_size=37, normalise=False)
    return MemoryBank.open(str(path))


def test_sharded_search_equals_local_search(cluster, tmp_path):
    local = tie_heavy_bank(tmp_path / "b")
    sharded = MemoryBank.open(str(tmp_path / "b"))
    g = torch.Generator().manual_seed(8)
    q = torch.cat([local.embeddings([0, 100, 200, 449]).float(),
                   torch.nn.functional.normalize(torch.randn(12, local.dim, generator=g), dim=1)])
    server = serve(sharded, workers=3, cpus_per_worker=0.5)  # three actors on the 2-CPU instance
    try:
        assert len(server.ranges) == 3
        for k, ties in ((1, True), (5, True), (5, False), (40, True), (1000, True)):
            want = local.topk(q, k, ties)
            got = sharded.topk(q, k, ties)
            for a, b in zip(want, got):
                assert a.dtype == b.dtype and np.array_equal(a, b), (k, ties)
        assert len(want[1]) > 3 * 16  # ties made lists longer than k
        texts = ["chest x-ray caption 3", "caption 77", "nothing in common"]
        hl, hs = local.search(texts, 4), sharded.search(texts, 4)
        assert [[(h.index, h.score) for h in x] for x in hl] == [[(h.index, h.score) for h in x] for x in hs]
        rl, rs = retrieve(local, texts, 6), retrieve(sharded, texts, 6)
        assert [[(h.index, h.score, h.bm25) for h in x] for x in rl] == [[(h.index, h.score, h.bm25) for h in x]
                                                                        for x in rs]
        pool = [Question(t.format(f=f), dom, "site", f) for dom, temps in DOMAINS.items() for f in FINDINGS[dom]
                for t in temps]
        history = [FinishedTask("pd", "x-ray", ["chest x-ray with pneumothorax", "caption 12"], None)]
        want = Siphon(local, pool, a=4, b=3, c=2, n_general=4, seed=1).reference_set(history)
        got = Siphon(sharded, pool, a=4, b=3, c=2, n_general=4, seed=1).reference_set(history)
        assert len(want) > 0 and want.rows == got.rows
    finally:
        server.close()
        sharded.server = None
