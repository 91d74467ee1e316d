"""The bank path gives the same bits on every machine (issue 12, item 2).

A bank is built with the hashing embedder from a seeded corpus whose
captions repeat (so equal rows sit in different shards) and whose hashed
vectors are sums of +-1 buckets (so scores tie); queries are encoded by the
same embedder. The results of ``MemoryBank.search`` (ties kept and plain),
``retrieve`` and the Siphon's reference set are hashed (indices, exact
dense scores, order, levels and queries; BM25 scores are not exact by
definition and only their effect, the kept set, is hashed) and compared with
the golden values committed here, with the stored int8 screening codes and
without them, under the default environment, MKL_CBWR=COMPATIBLE and
OMP_NUM_THREADS=1 (subprocesses: MKL and OpenMP read them when they load),
and with the dense reference as the only backend (MGCL_BACKEND=torch), so
the golden values are the exact definition's own.

    python tests/test_retrieval_golden.py     # prints the hashes
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from mgcl.retrieval import BankError, FinishedTask, MemoryBank, Question, Siphon, build_bank, retrieve

from retrieval_fixtures import DOMAINS, FINDINGS, make_records

GOLDEN = {
    "search_ties_k5": "76f093f0d86c41864e8a65da3d825e20240e010f4565745d123af4c38250f2b4",
    "search_plain_k5": "b60243c1ec001e9eea80682f340e27f5d554442ec90cedc89afcccc312264829",
    "retrieve_k8": "73480931c1e8d41e1e65e2ce14fe0030ac588b5ab12823982e8ac999403582a5",
    "siphon": "0c794c9496d0ae7fe6ff144c4ecca680bbd4c0a34bd5a65f23b724472e9829d1",
}
EMB = "hashing:48"
QUERIES = ["chest x-ray with pneumothorax", "histology of fibroadenoma", "dermoscopy image of melanoma",
           "retinal image showing drusen", "colonoscopy image of adenomatous polyp (case 3)", "skin lesion",
           "chest x-ray", "x-ray", "nothing alike at all"]
HISTORY = [FinishedTask("pd", "x-ray", ["chest x-ray with pneumothorax", "chest x-ray with cardiomegaly"], None),
           FinishedTask("breakhis", "pathology", ["histology of fibroadenoma"], None)]


def build(root: str) -> str:
    corpus = os.path.join(root, "corpus.jsonl")
    with open(corpus, "w") as fh:
        for r in make_records(400, seed=12):  # about a quarter repeat an earlier caption
            fh.write(json.dumps({"id": r["id"], "caption": r["caption"], "domain": r["domain"]}) + "\n")
    out = os.path.join(root, "bank")
    build_bank([corpus], out, embedder=EMB, shard_size=37, batch_size=9, progress=False)
    return out


def pool():
    return [Question(t.format(f=f), dom, "site", f) for dom, temps in DOMAINS.items() for f in FINDINGS[dom]
            for t in temps]


def _h(rows) -> str:
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _score(x: float) -> str:
    return np.float32(x).tobytes().hex()  # the float32 bits


def hashes(path: str) -> dict:
    bank = MemoryBank.open(path)
    out = {}
    for name, ties in (("search_ties_k5", True), ("search_plain_k5", False)):
        out[name] = _h([[(h.index, _score(h.score), h.group) for h in hits] for hits in bank.search(QUERIES, 5, ties)])
    out["retrieve_k8"] = _h([[(h.index, _score(h.dense)) for h in hits] for hits in retrieve(bank, QUERIES, 8)])
    ref = Siphon(bank, pool(), a=4, b=3, c=2, n_general=5, seed=3).reference_set(HISTORY)
    out["siphon"] = _h([(r["index"], r["level"], r["query"], _score(r["score"])) for r in ref])
    return out


def test_bank_results_match_the_golden_hashes(tmp_path):
    path = build(str(tmp_path))
    bank = MemoryBank.open(path)
    assert bank.manifest["quantized"] and len(bank.manifest["shards"]) == 11
    hits = bank.search(QUERIES, 5)
    assert any(len(h) > 5 for h in hits), "the problem should have tie-extended results"
    assert hashes(path) == GOLDEN
    # without the stored codes: made on first use (and stored), the same results
    m = json.loads(open(os.path.join(path, "manifest.json")).read())
    m["quantized"] = None
    with open(os.path.join(path, "manifest.json"), "w") as fh:
        json.dump(m, fh)
    shutil.rmtree(os.path.join(path, "quantized"))
    assert hashes(path) == GOLDEN
    assert MemoryBank.open(path).manifest["quantized"]  # written back


def test_stored_codes_are_checked_like_every_file(tmp_path):
    path = build(str(tmp_path))
    rel = MemoryBank.open(path).manifest["quantized"]["shards"][3]["path"]
    with open(os.path.join(path, rel), "r+b") as fh:
        fh.seek(-5, 2)
        b = fh.read(1)
        fh.seek(-5, 2)
        fh.write(bytes([b[0] ^ 1]))
    with pytest.raises(BankError, match="quantized/shard-00003"):
        MemoryBank.open(path).search(QUERIES[:1], 3)
    with pytest.raises(BankError, match="quantized/shard-00003"):
        MemoryBank.open(path, verify=True)
    os.remove(os.path.join(path, rel))
    with pytest.raises(BankError, match="missing file 'quantized/shard-00003"):
        MemoryBank.open(path)


def test_bank_golden_hashes_hold_in_other_environments(tmp_path):
    path = build(str(tmp_path))
    procs = {}
    for name, extra in {"MKL_CBWR=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"},
                        "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
                        "MGCL_BACKEND=torch (the dense reference)": {"MGCL_BACKEND": "torch"}}.items():
        env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "OMP_NUM_THREADS", "MGCL_BACKEND")}
        procs[name] = subprocess.Popen([sys.executable, __file__, path], env={**env, **extra},
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{name}: {err[-2000:]}"
        assert json.loads(out.strip().splitlines()[-1]) == GOLDEN, name


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(hashes(sys.argv[1])))
    else:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(hashes(build(d))))
