"""The retrieval ablations of ``retrieve(..., stages=)`` and the Siphon: "dense-only"
(SPEC.md section 3's stage 1 alone) and "bm25-only" (BM25 over the whole bank),
each against an independent oracle; "multi-stage" is tested in test_retrieval_siphon."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mgcl.ops.similarity_topk import reference as topk_reference
from mgcl.retrieval import FinishedTask, MemoryBank, Question, Siphon, build_bank, get_embedder, retrieve
from mgcl.retrieval.bm25 import tokenize
from retrieval_fixtures import DOMAINS, FINDINGS, FixtureVLM, make_records, write_corpus

EMB = "hashing:64"
QUERIES = ["chest x-ray with pneumothorax", "fundus photograph of the retina with glaucoma",
           "histology of fibroadenoma", "dermoscopy image of melanoma", "qqqq zzzz xxxx"]


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("corpus"))
    files = write_corpus(root, make_records(150, seed=3))
    out = str(tmp_path_factory.mktemp("b") / "bank")
    build_bank(files, out, embedder=EMB, vlm=FixtureVLM(), vlm_name="fixture", shard_size=50, batch_size=16,
               progress=False)
    return MemoryBank.open(out)


class NoVLM(FixtureVLM):
    """The ablations use no VLM: any call fails the test."""

    def encode_text(self, tokens):
        raise AssertionError("the VLM must not be used")

    encode_image = encode_text


@pytest.mark.parametrize("k", [1, 3, 8])
def test_dense_only_is_stage_one_with_ties(bank, k):
    keys = torch.cat([s.float() for s in bank.shards])
    s = topk_reference.scores(torch.from_numpy(get_embedder(EMB).encode(QUERIES)), keys).numpy()
    got = retrieve(bank, QUERIES, k, vlm=NoVLM(), stages="dense-only")
    for j, hits in enumerate(got):
        tau = np.unique(s[j])[::-1][min(k, len(np.unique(s[j]))) - 1]
        want = sorted(np.nonzero(s[j] >= tau)[0].tolist(), key=lambda i: (-s[j][i], i))
        assert [h.index for h in hits] == want
        assert all(h.score == h.dense and h.visual is None and h.bm25 is None for h in hits)
    assert any(len(h) > k for h in got) or k == 8, "duplicated captions tie: the set can exceed k"


@pytest.mark.parametrize("k", [1, 4, 10])
def test_bm25_only_is_the_top_k_of_the_whole_bank(bank, k):
    from rank_bm25 import BM25Okapi

    docs = BM25Okapi([tokenize(c) for c in bank.meta["caption"]], k1=1.5, b=0.75)
    got = retrieve(bank, QUERIES, k, vlm=NoVLM(), stages="bm25-only")
    for query, hits in zip(QUERIES, got):
        score = docs.get_scores(tokenize(query))
        want = [i for i in sorted(range(bank.count), key=lambda i: (-score[i], i))[:k] if score[i] > 0]
        assert [h.index for h in hits] == want, query
        assert np.allclose([h.bm25 for h in hits], score[want]) and all(h.dense is None for h in hits)
    assert got[-1] == [], "a query sharing no term with the corpus finds nothing"


def test_bad_stages_name(bank):
    with pytest.raises(ValueError, match="stages must be one of"):
        retrieve(bank, QUERIES, 3, stages="bm25")


def test_siphon_runs_every_level_through_the_chosen_stages(bank):
    pool = [Question(t.format(f=f), dom, "site", f) for dom, temps in DOMAINS.items() for f in FINDINGS[dom]
            for t in temps]
    history = [FinishedTask("pd", "x-ray", ("chest x-ray with pneumothorax", "chest x-ray with cardiomegaly"))]
    s = Siphon(bank, pool, EMB, vlm=FixtureVLM(), a=4, b=3, c=2, n_general=6, k_v=1, seed=0)
    qs = s.queries(history)
    for stages in ("dense-only", "bm25-only"):
        ref = s.reference_set(history, stages=stages)
        found = {}
        for level, k in (("general", 2), ("domain", 3), ("task", 4)):
            for hits in retrieve(bank, qs[level], k, stages=stages):
                for h in hits:
                    found[h.index] = level
        assert {r["index"]: r["level"] for r in ref} == found
        uni = s.uniform_set(12, keywords=["x-ray", "fundus", "histology"], stages=stages)
        assert len(uni) == 12 and set(uni.level_counts()) == {"task", "domain", "general", "uniform"}
    assert s.reference_set(history).rows != s.reference_set(history, stages="bm25-only").rows
