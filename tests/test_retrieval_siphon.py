"""mgcl.retrieval: multi-stage rerank / group / BM25 gate against an
independent re-implementation, the question pool, the Dynamic Siphon
(levels, de-duplication, determinism, Phi_D, uniform mode) and ReferenceSet."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from mgcl.ops.similarity_topk import reference as topk_reference
from mgcl.retrieval import (CachedEmbedder, FinishedTask, MemoryBank, Question, ReferenceSet, Siphon, build_bank,
                            get_embedder, load_pool, open_image, retrieve)
from mgcl.retrieval.bm25 import tokenize
from mgcl.retrieval.pool import domains as pool_domains
from retrieval_fixtures import DOMAINS, FINDINGS, FixtureVLM, make_records, write_corpus

EMB = "hashing:64"


@pytest.fixture(scope="module")
def vlm():
    return FixtureVLM()


@pytest.fixture(scope="module")
def banks(tmp_path_factory, vlm):
    """The same corpus built twice: without and with stored VLM image embeddings."""
    root = str(tmp_path_factory.mktemp("corpus"))
    files = write_corpus(root, make_records(180, seed=7))
    plain = str(tmp_path_factory.mktemp("b") / "plain")
    withv = str(tmp_path_factory.mktemp("b") / "vlm")
    build_bank(files, plain, embedder=EMB, shard_size=50, progress=False)
    build_bank(files, withv, embedder=EMB, vlm=vlm, vlm_name="fixture", shard_size=50, batch_size=16, progress=False)
    return MemoryBank.open(plain), MemoryBank.open(withv, verify=True)


@pytest.fixture(scope="module")
def small_pool():
    qs = []
    for dom, temps in DOMAINS.items():
        for f in FINDINGS[dom]:
            for t in temps:
                qs.append(Question(t.format(f=f), dom, "site", f))
    return qs


# ---- the independent oracle -------------------------------------------------------------------

def oracle(bank, vlm, queries: list[str], j: int, k: int, k_v: int, k1=1.5, b=0.75, use_vlm=True):
    """SPEC.md section 3 written out directly for ``queries[j]``: dense with ties
    over the full float32 score matrix of all the queries (one matmul), S_v
    from freshly encoded images, group by caption string, BM25 gate with
    rank_bm25, sort by S_v."""
    from rank_bm25 import BM25Okapi

    query = queries[j]
    keys = torch.cat([s.float() for s in bank.shards])
    q = torch.from_numpy(get_embedder(EMB).encode(queries))
    s = topk_reference.scores(q, keys)[j].numpy()
    u = np.unique(s)[::-1]
    tau = u[min(k, len(u)) - 1]
    cand = np.nonzero(s >= tau)[0]
    caps, imgs = bank.meta["caption"], bank.meta["image"]
    if use_vlm:
        with torch.no_grad():
            t = torch.nn.functional.normalize(vlm.encode_text(vlm.tokenize([query])), dim=1)[0]
            tf = vlm.transform(False)
            x = torch.stack([tf(open_image(imgs[i])) for i in cand])
            f = torch.nn.functional.normalize(vlm.encode_image(x), dim=1)
        sv = dict(zip(cand.tolist(), (f @ t).tolist()))
    else:
        sv = {int(i): float(s[i]) for i in cand}
    groups: dict[str, list[int]] = {}
    for i in cand.tolist():
        groups.setdefault(caps[i], []).append(i)
    kept = [i for g in groups.values() for i in sorted(g, key=lambda i: (-sv[i], i))[:k_v]]
    if len(kept) > k:
        bm = BM25Okapi([tokenize(c) for c in caps], k1=k1, b=b).get_scores(tokenize(query))
        kept = sorted(kept, key=lambda i: (-bm[i], -sv[i], i))[:k]
    return sorted(kept, key=lambda i: (-sv[i], i)), sv


QUERIES = ["chest x-ray with pneumothorax", "fundus photograph of the retina with glaucoma",
           "histology of fibroadenoma", "dermoscopy image of melanoma", "endoscopic view of esophagitis",
           "colonoscopy image of adenomatous polyp (case 12)"]


@pytest.mark.parametrize("k,k_v", [(3, 1), (5, 2), (12, 1), (40, 3)])
def test_rerank_group_gate_matches_oracle(banks, vlm, k, k_v):
    plain, _ = banks
    got = retrieve(plain, QUERIES, k, vlm=vlm, k_v=k_v)  # images encoded on the fly
    for j, (query, hits) in enumerate(zip(QUERIES, got)):
        want, sv = oracle(plain, vlm, QUERIES, j, k, k_v)
        assert [h.index for h in hits] == want, query
        assert np.allclose([h.score for h in hits], [sv[i] for i in want], atol=1e-5)
        assert len(hits) <= k
        caps = [h.caption for h in hits]
        assert all(caps.count(c) <= k_v for c in caps)
        assert all(h.visual == h.score and h.dense is not None for h in hits)


def test_rerank_without_vlm_uses_dense_score(banks):
    plain, _ = banks
    for k, k_v in ((4, 1), (10, 2)):
        got = retrieve(plain, QUERIES, k, k_v=k_v)
        for j, hits in enumerate(got):
            want, _ = oracle(plain, None, QUERIES, j, k, k_v, use_vlm=False)
            assert [h.index for h in hits] == want
            assert all(h.visual is None and h.score == h.dense for h in hits)


def test_gate_bm25_parameters_matter(banks, vlm):
    plain, _ = banks
    for k1, b in ((0.5, 0.1), (3.0, 1.0)):
        got = retrieve(plain, QUERIES, 3, vlm=vlm, k_v=1, k1=k1, b=b)
        for j, hits in enumerate(got):
            want, _ = oracle(plain, vlm, QUERIES, j, 3, 1, k1=k1, b=b)
            assert [h.index for h in hits] == want


def test_stored_vlm_embeddings_match_on_the_fly(banks, vlm):
    plain, withv = banks
    assert withv.has_vlm and withv.manifest["vlm"]["name"] == "fixture" and withv.manifest["vlm"]["dim"] == 8
    stored = withv.image_embeddings(np.arange(withv.count)).float()
    from mgcl.retrieval.rerank import image_features

    fresh = image_features(plain, vlm, np.arange(plain.count), {}, 8)
    assert torch.allclose(stored, fresh, atol=2e-3)
    a = retrieve(plain, QUERIES, 6, vlm=vlm, k_v=1)
    b = retrieve(withv, QUERIES, 6, vlm=vlm, k_v=1)
    for x, y in zip(a, b):
        assert [h.index for h in x] == [h.index for h in y]
        assert np.allclose([h.score for h in x], [h.score for h in y], atol=3e-3)


def test_unreadable_images_are_dropped_and_counted(tmp_path, vlm):
    recs = make_records(30, seed=2)
    files = write_corpus(str(tmp_path), recs)
    os.remove(os.path.join(str(tmp_path), "images", f"{recs[0]['id']}.png"))
    refused = build_bank(files, str(tmp_path / "refused"), embedder=EMB, vlm=vlm, shard_size=16, progress=False)
    assert refused["count"] == 29 and refused["build"]["skipped"] == {"unreadable image": 1}  # the default
    out = str(tmp_path / "bank")
    m = build_bank(files, out, embedder=EMB, vlm=vlm, shard_size=16, progress=False, missing_images="keep")
    assert m["build"]["image_failures"] == 1 and m["build"]["unreadable_images"] == 1
    bank = MemoryBank.open(out)
    assert not bank.image_embeddings([0]).any()
    stats: dict = {}
    hits = retrieve(bank, [recs[0]["caption"]], 50, vlm=vlm, stats=stats)[0]
    assert 0 not in {h.index for h in hits} and len(hits) > 0
    assert stats["usable"] == stats["dense"] - 1  # entry 0 (score 1) is a dense candidate without an image


def test_retrieve_stats_count_each_stage(banks, vlm):
    """``stats`` (the bench's candidate counts) against the oracle's stages; a
    second call with the same dict adds to it."""
    from collections import Counter

    plain, _ = banks
    k, k_v = 3, 1
    caps = plain.meta["caption"]
    dense = grouped = gated = 0
    for j in range(len(QUERIES)):
        _, sv = oracle(plain, vlm, QUERIES, j, k, k_v)
        n_grouped = sum(min(n, k_v) for n in Counter(caps[i] for i in sv).values())
        dense, grouped, gated = dense + len(sv), grouped + n_grouped, gated + (n_grouped > k)
    stats: dict = {}
    got = retrieve(plain, QUERIES, k, vlm=vlm, k_v=k_v, stats=stats)
    want = {"dense": dense, "usable": dense, "grouped": grouped, "gated_queries": gated,
            "final": sum(len(h) for h in got)}
    assert stats == want and 0 < gated < len(QUERIES)
    retrieve(plain, QUERIES, k, vlm=vlm, k_v=k_v, stats=stats)
    assert stats == {key: 2 * v for key, v in want.items()}


def test_retrieve_bad_inputs(banks, vlm):
    plain, _ = banks
    with pytest.raises(ValueError, match="k must be"):
        retrieve(plain, ["x"], 0)
    with pytest.raises(ValueError, match="k_v"):
        retrieve(plain, ["x"], 3, k_v=0)
    assert retrieve(plain, [], 3) == []


# ---- the stages, one at a time ---------------------------------------------------------------

@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """12 entries: captions repeat (groups), image embeddings are chosen per
    entry (entries 3 and 8 have none: zero rows)."""
    from mgcl.retrieval import write_bank

    g = torch.Generator().manual_seed(5)
    caps = ["chest x-ray", "chest x-ray", "fundus photo of drusen", "skin lesion", "chest x-ray",
            "fundus photo of drusen", "x-ray of the chest with effusion", "skin lesion", "colon polyp",
            "chest x-ray with pneumothorax", "fundus", "skin"]
    emb = torch.randn(12, 16, generator=g)
    img = torch.randn(12, 4, generator=g)
    img[3] = img[8] = 0
    bank = write_bank(str(tmp_path_factory.mktemp("st") / "b"), emb, caps, image_embeddings=img, embedder="hashing:16")
    return bank, torch.nn.functional.normalize(emb, dim=1), torch.nn.functional.normalize(img, dim=1)


def test_stage_dense(staged):
    from mgcl.retrieval.rerank import dense
    from mgcl.retrieval.search import topk

    bank, emb, _ = staged
    q = emb[[0, 5]] + 0.01
    c = dense(bank, q, 3)
    v, i, off = topk(bank, q, 3, True)
    assert np.array_equal(c.index, i) and np.array_equal(c.dense, v) and np.array_equal(c.sv, v)
    assert c.qid.tolist() == [0] * int(off[1]) + [1] * int(off[2] - off[1]) and np.isnan(c.bm25).all()


def test_stage_visual(staged):
    from mgcl.retrieval.rerank import Candidates, visual

    bank, _, img = staged
    rows = np.arange(12)
    c = Candidates(np.repeat([0, 1], 6), rows, np.linspace(1, 0, 12, dtype=np.float32),
                   np.zeros(12, np.float32), np.full(12, np.nan))
    text = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 1.0, 0]]), dim=1)
    out = visual(bank, c, text)
    assert out.index.tolist() == [0, 1, 2, 4, 5, 6, 7, 9, 10, 11]  # 3 and 8 have no image
    stored = bank.image_embeddings(out.index).float()
    assert np.allclose(out.sv, (text[out.qid] * stored).sum(1).numpy(), atol=1e-6)
    assert np.allclose(stored, img[out.index], atol=2e-3) and np.array_equal(out.dense, c.dense[out.index])
    with pytest.raises(ValueError, match="another VLM"):
        visual(bank, c, torch.ones(2, 5))
    with pytest.raises(ValueError, match="another VLM"):  # checked with no candidates too
        visual(bank, c.take(np.zeros(0, dtype=np.int64)), torch.ones(2, 5))


def test_stage_visual_in_blocks_equals_one_pass(staged, monkeypatch):
    """The stored rows are gathered block by block of candidates: any block size
    gives the same candidates and the same S_v, bit for bit (each S_v is one
    row's float32 dot product, whichever block holds it)."""
    import mgcl.retrieval.rerank as rr

    bank, _, _ = staged
    g = torch.Generator().manual_seed(3)
    qid = np.sort(torch.randint(0, 3, (40,), generator=g).numpy())
    rows = torch.randint(0, 12, (40,), generator=g).numpy()  # repeats, and the two rows without an image
    c = rr.Candidates(qid, rows, np.linspace(1, 0, 40, dtype=np.float32), np.zeros(40, np.float32),
                      np.full(40, np.nan))
    text = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=1)
    whole = rr.visual(bank, c, text)
    for block in (1, 7, 39):
        monkeypatch.setattr(rr, "VISUAL_BLOCK", block)
        timings: dict = {}
        part = rr.visual(bank, c, text, timings=timings)
        assert np.array_equal(part.index, whole.index) and np.array_equal(part.qid, whole.qid)
        assert np.array_equal(part.sv, whole.sv) and set(timings) == {"vlm_image", "visual"}
    assert not np.isin(whole.index, [3, 8]).any() and len(whole) == int((~np.isin(rows, [3, 8])).sum())


def test_stage_group(staged):
    from mgcl.retrieval.rerank import Candidates, group

    bank, _, _ = staged
    idx = np.array([0, 1, 4, 2, 5, 3, 0, 1, 4])  # query 0: three "chest x-ray", two drusen, one lesion
    sv = np.array([0.2, 0.9, 0.5, 0.3, 0.3, 0.1, 0.7, 0.7, 0.1], np.float32)
    c = Candidates(np.array([0] * 6 + [1] * 3), idx, sv, sv, np.full(9, np.nan))
    assert group(bank, c, 1).index.tolist() == [1, 2, 3, 0]  # the best of each group; equal S_v: lower index
    assert group(bank, c, 2).index.tolist() == [1, 4, 2, 5, 3, 0, 1]


def test_stage_gate(staged):
    from rank_bm25 import BM25Okapi

    from mgcl.retrieval.rerank import Candidates, gate

    bank, _, _ = staged
    queries = ["chest x-ray effusion", "skin"]
    idx = np.array([0, 6, 9, 2, 3, 11])
    sv = np.array([0.1, 0.2, 0.3, 0.9, 0.5, 0.4], np.float32)
    c = Candidates(np.array([0, 0, 0, 0, 1, 1]), idx, sv, sv, np.full(6, np.nan))
    out, cut = gate(bank, c, queries, 2)
    bm = BM25Okapi([tokenize(x) for x in bank.meta["caption"]]).get_scores(tokenize(queries[0]))
    want = sorted([0, 6, 9, 2], key=lambda i: (-bm[i], -sv[list(idx).index(i)], i))[:2]
    assert cut == 1 and out.index.tolist() == sorted(want, key=list(idx).index) + [3, 11]
    assert np.allclose(out.bm25[:2], bm[out.index[:2]]) and np.isnan(out.bm25[2:]).all()
    assert gate(bank, c, queries, 4)[1] == 0


def test_stage_sort(staged):
    from mgcl.retrieval.rerank import Candidates, sort

    bank, _, _ = staged
    c = Candidates(np.array([0, 0, 0, 1]), np.array([5, 2, 7, 1]), np.array([0.1, 0.2, 0.3, 0.4], np.float32),
                   np.array([0.5, 0.9, 0.5, 0.1], np.float32), np.array([np.nan, 1.5, np.nan, np.nan]))
    hits = sort(bank, c, 3, True)
    assert [[h.index for h in hs] for hs in hits] == [[2, 5, 7], [1], []]
    h = hits[0][0]
    assert (h.caption, h.score, h.dense, h.visual, h.bm25, h.group) == (bank.meta["caption"][2], pytest.approx(0.9),
                                                                         pytest.approx(0.2), pytest.approx(0.9), 1.5, 2)
    assert hits[0][1].bm25 is None and sort(bank, c, 3, False)[0][0].visual is None


# ---- the question pool ------------------------------------------------------------------------

def test_shipped_pool():
    pool = load_pool()
    assert len(pool) >= 3000
    assert len({q.text for q in pool}) == len(pool)
    doms = pool_domains(pool)
    assert len(doms) >= 12
    for d in ("x-ray", "ct", "mri", "ultrasound", "histopathology", "cytology", "fundus", "oct", "dermoscopy",
              "endoscopy"):
        assert d in doms
    assert len({q.finding.lower() for q in pool}) >= 300
    assert all(q.text and q.domain and q.site and q.finding and q.finding in q.text for q in pool)
    assert load_pool() == pool  # deterministic
    by_dom = {d: sum(q.domain == d for q in pool) for d in doms}
    assert min(by_dom.values()) >= 50


def test_pool_extension(tmp_path):
    base = load_pool()
    p = tmp_path / "mine.yaml"
    p.write_text(
        "extends: builtin\n"
        "domains:\n"
        "  capillaroscopy:\n"
        "    description: nailfold capillaroscopy image\n"
        "    templates: ['nailfold capillaroscopy of the {site} showing {finding}']\n"
        "    sites:\n"
        "      finger: [giant capillaries of systemic sclerosis, capillary dropout]\n"
        "  fundus:\n"
        "    templates: ['a fundus photograph of the {site} showing {finding}']\n"
        "    sites:\n"
        "      retina: [Coats disease]\n")
    ext = load_pool(str(p))
    assert len(ext) == len(base) + 2 + 8  # Coats disease gets every fundus template
    assert Question("nailfold capillaroscopy of the finger showing capillary dropout", "capillaroscopy", "finger",
                    "capillary dropout") in ext
    assert any(q.finding == "Coats disease" for q in ext)
    only = tmp_path / "only.yaml"
    only.write_text("domains:\n  capillaroscopy:\n    templates: ['{finding}']\n    sites:\n      finger: [a, b]\n")
    assert [q.text for q in load_pool(str(only))] == ["a", "b"]
    jl = tmp_path / "q.jsonl"
    jl.write_text(json.dumps({"text": "my question", "domain": "x-ray"}) + "\n")
    assert load_pool(str(jl)) == [Question("my question", "x-ray", "", "")]
    js = tmp_path / "q.json"
    js.write_text(json.dumps([{"text": "my question", "domain": "x-ray", "site": "chest", "finding": "f"}]))
    assert load_pool(str(js)) == [Question("my question", "x-ray", "chest", "f")]
    bad = tmp_path / "bad.yaml"
    bad.write_text("domains:\n  d:\n    templates: ['no placeholder']\n    sites: {s: [f]}\n")
    with pytest.raises(ValueError, match="finding"):
        load_pool(str(bad))
    with pytest.raises(FileNotFoundError):
        load_pool(str(tmp_path / "missing.yaml"))


# ---- the Dynamic Siphon --------------------------------------------------------------------------

def finished(name, domain, classnames, template="{}", images=None):
    return FinishedTask(name, domain, [template.format(c) for c in classnames], images)


HISTORY = [finished("pd", "x-ray", ["pneumothorax", "pleural effusion", "cardiomegaly"], "chest x-ray with {}"),
           finished("breakhis", "pathology", ["fibroadenoma", "invasive ductal carcinoma"], "histology of {}")]


def test_siphon_levels_dedup_and_priority(banks, small_pool, vlm):
    _, withv = banks
    s = Siphon(withv, small_pool, EMB, vlm=vlm, a=4, b=3, c=2, n_general=6, k_v=1, seed=0)
    ref = s.reference_set(HISTORY)
    counts = ref.level_counts()
    assert counts["task"] > 0 and counts["domain"] > 0 and counts["general"] > 0
    assert sum(counts.values()) == len(ref)
    idx = ref.indices()
    assert len(idx) == len(set(idx))  # de-duplicated by bank entry
    assert s.last_domains == {"pd": "x-ray", "breakhis": "histopathology"}  # Phi_D via names and aliases
    qs = s.queries(HISTORY)
    assert qs["task"] == [p for t in HISTORY for p in t.prompts]
    assert {q.domain for q in small_pool if q.text in qs["domain"]} == {"x-ray", "histopathology"}
    assert len(qs["general"]) == 6 and not {q.domain for q in small_pool if q.text in qs["general"]} & {
        "x-ray", "histopathology"}
    # every level's own retrieval, recomputed: an entry takes the highest level that found it
    found = {}
    for level, k in (("general", 2), ("domain", 3), ("task", 4)):
        for hits in retrieve(withv, qs[level], k, vlm=vlm, k_v=1):
            for h in hits:
                found[h.index] = level
    assert {r["index"]: r["level"] for r in ref} == found
    for r in ref:
        assert r["caption"] == withv.meta["caption"][r["index"]] and r["query"] in qs[r["level"]]


def test_siphon_is_deterministic(banks, small_pool):
    plain, _ = banks
    a = Siphon(plain, small_pool, EMB, a=3, b=2, c=2, n_general=5, k_v=1, seed=11).reference_set(HISTORY)
    b = Siphon(plain, small_pool, EMB, a=3, b=2, c=2, n_general=5, k_v=1, seed=11).reference_set(HISTORY)
    assert a.rows == b.rows
    s1 = Siphon(plain, small_pool, EMB, a=3, b=2, c=2, n_general=5, k_v=1, seed=11)
    s2 = Siphon(plain, small_pool, EMB, a=3, b=2, c=2, n_general=5, k_v=1, seed=12)
    assert s1.queries(HISTORY)["general"] != s2.queries(HISTORY)["general"]
    # first task: nothing finished yet, general level only
    first = s1.reference_set([])
    assert set(first.level_counts()) <= {"task", "domain", "general"} and first.level_counts()["task"] == 0
    assert first.level_counts()["domain"] == 0 and first.level_counts()["general"] > 0


def test_siphon_domain_mapper(banks, small_pool, vlm):
    plain, _ = banks
    # undeclared domain, no VLM: the text embedder on the class prompts
    s = Siphon(plain, small_pool, EMB, a=2, b=2, c=2, n_general=2, k_v=1, seed=0)
    t = finished("mystery", "retina-cam", ["glaucoma", "drusen"], "fundus photograph of the retina with {}")
    assert s.map_domain(t) in pool_domains(small_pool)
    # with a VLM and training images: zero-shot over the pool's domains, a deterministic answer
    imgs = [(open_image(p), 0) for p in plain.meta["image"][:10]]
    sv = Siphon(plain, small_pool, EMB, vlm=vlm, a=2, b=2, c=2, n_general=2, k_v=1, seed=0)
    t2 = finished("mystery2", "unknown", ["a", "b"], images=imgs)
    d = sv.map_domain(t2)
    assert d in pool_domains(small_pool) and sv.map_domain(t2) == d
    # declared domains resolve by name, case and alias
    for declared, want in (("Fundus", "fundus"), ("xray", "x-ray"), ("colonoscopy", "endoscopy")):
        assert s.map_domain(finished("t", declared, ["a", "b"])) == want


def test_a_finished_task_is_one_type(banks, small_pool):
    """The Siphon takes FinishedTask only (no guessing at dicts, tuples or other objects);
    mgcl.cl.Task.finished() adapts a task, with its class prompts of template 0 and its images."""
    from mgcl.cl.tasks import Task

    plain, _ = banks
    s = Siphon(plain, small_pool, EMB, a=2, b=2, c=2, n_general=3, k_v=1, seed=0)
    train = [(open_image(p), 0) for p in plain.meta["image"][:2]]
    task = Task("chexchonet", "x-ray", ["normal", "pneumothorax"], ["chest x-ray with {}", "radiograph: {}"],
                train=train, test=[])
    done = task.finished()
    assert done == FinishedTask("chexchonet", "x-ray", ("chest x-ray with normal", "chest x-ray with pneumothorax"),
                                train)
    ref = s.reference_set([done])
    assert ref.level_counts()["task"] > 0 and s.last_domains == {"chexchonet": "x-ray"}
    for bad in ({"name": "t", "domain": "x-ray", "prompts": ["a"]}, ("t", "x-ray", ["a"]), task):
        with pytest.raises(ValueError, match="a finished task is a mgcl.retrieval.FinishedTask"):
            s.reference_set([bad])
    for prompts in ([], "one string", [1, 2]):
        with pytest.raises(ValueError, match="class prompts"):
            FinishedTask("t", "x-ray", prompts)


def test_from_bank_is_the_one_road(banks, small_pool, tmp_path, vlm):
    """Siphon.from_bank(dir): the bank's embedder, a pool file or list sampled per domain
    (seeded), and the one-text-at-a-time query cache, which every Siphon has."""
    plain, _ = banks
    s = Siphon.from_bank(plain.path, pool=small_pool, pool_per_domain=2, vlm=vlm, a=3, b=2, c=2, n_general=4,
                         k_v=1, seed=3)
    assert isinstance(s.embedder, CachedEmbedder) and s.embedder.one_by_one and s.embedder.name == EMB
    assert s.vlm is vlm and (s.a, s.seed) == (3, 3)
    per = {d: sum(q.domain == d for q in s.pool) for d in pool_domains(small_pool)}
    assert set(per) == set(pool_domains(small_pool)) and all(n == 2 for n in per.values())
    again = Siphon.from_bank(plain.path, pool=small_pool, pool_per_domain=2, a=3, b=2, c=2, n_general=4, k_v=1,
                             seed=3)
    assert again.pool == s.pool, "the per-domain sample is seeded"
    assert Siphon.from_bank(plain.path, pool=small_pool, seed=3).pool == small_pool
    ref = s.reference_set(HISTORY)
    assert len(ref) > 0 and set(s.embedder.cache) >= set(s.queries(HISTORY)["task"])
    # the cached vectors are the embedder's own, one text at a time
    inner = get_embedder(EMB)
    for text in list(s.embedder.cache)[:5]:
        assert np.array_equal(s.embedder.cache[text], inner.encode([text], 1)[0])
    p = tmp_path / "pool.jsonl"
    p.write_text("".join(json.dumps({"text": q.text, "domain": q.domain}) + "\n" for q in small_pool[:4]))
    assert [q.text for q in Siphon.from_bank(plain.path, pool=str(p)).pool] == [q.text for q in small_pool[:4]]
    direct = Siphon(plain, small_pool, CachedEmbedder(get_embedder(EMB)), a=1, b=1, c=1)
    assert direct.embedder.one_by_one, "a batch-mode cache is wrapped again, one text at a time"


def test_siphon_bad_args(banks, small_pool):
    plain, _ = banks
    with pytest.raises(ValueError, match="a must be"):
        Siphon(plain, small_pool, EMB, a=0, b=1, c=1, n_general=1, k_v=1, seed=0)
    with pytest.raises(ValueError, match="k_v"):
        Siphon(plain, small_pool, EMB, a=1, b=1, c=1, n_general=1, k_v=0, seed=0)
    with pytest.raises(ValueError, match="dim 64"):
        Siphon(plain, small_pool, "hashing:32", a=1, b=1, c=1, n_general=1, k_v=1, seed=0)
    with pytest.raises(ValueError, match="empty question pool"):
        Siphon(plain, [], EMB, a=1, b=1, c=1, n_general=1, k_v=1, seed=0)


def test_uniform_set(banks, small_pool):
    plain, _ = banks
    s = Siphon(plain, small_pool, EMB, a=1, b=1, c=1, n_general=1, k_v=2, seed=0)
    kws = ["chest x-ray", "histology", "fundus photograph", "dermoscopy", "colonoscopy"]
    u = s.uniform_set(20, keywords=kws)
    assert len(u) == 20 and len(set(u.indices())) == 20
    assert u.level_counts() == {"task": 0, "domain": 0, "general": 0, "uniform": 20}
    per = {k: sum(r["query"] == k for r in u) for k in kws}
    assert per == {k: 4 for k in kws}
    assert s.uniform_set(20, keywords=kws).rows == u.rows
    default = s.uniform_set(60)  # the taxonomy's ~30 keywords
    assert len(default) == 60 and len({r["query"] for r in default}) >= 25
    assert len(s.uniform_set(10_000, keywords=kws)) <= plain.count


# ---- ReferenceSet --------------------------------------------------------------------------------

def test_reference_set_save_load_and_batches(banks, small_pool, vlm, tmp_path):
    plain, _ = banks
    ref = Siphon(plain, small_pool, EMB, vlm=vlm, a=4, b=3, c=2, n_general=6, k_v=1, seed=0).reference_set(HISTORY)
    p = tmp_path / "ref.parquet"
    ref.save(str(p))
    back = ReferenceSet.load(str(p))
    assert len(back) == len(ref)
    for x, y in zip(ref.rows, back.rows):
        assert {k: v for k, v in x.items() if k != "score"} == {k: v for k, v in y.items() if k != "score"}
        assert abs(x["score"] - y["score"]) < 1e-6
    # the training side: pairs (decoded through the student's transform, weighted by level) and batches
    from mgcl.cl.strategies.refdata import ReferencePairs, reference_batches

    weights = {"task": 3.0, "domain": 2.0, "general": 0.5}
    pairs = ReferencePairs(ref, vlm.transform(False), weights)
    assert len(pairs) == len(ref)
    img, cap, w = pairs[0]
    assert img.shape == (3, 12, 12) and cap == ref[0]["caption"] and w == weights[ref[0]["level"]]
    stream = reference_batches(pairs, vlm.tokenize, 7, seed=3)
    per_pass = len(ref) // 7
    batches = [next(stream) for _ in range(2 * per_pass)]
    b0 = batches[0]
    assert b0.images.shape == (7, 3, 12, 12) and b0.images.dtype == torch.float32
    assert b0.tokens.shape == (7, 16) and b0.weights.dtype == torch.float32
    order = torch.randperm(len(ref), generator=torch.Generator().manual_seed(3)).tolist()
    assert b0.weights.tolist() == [weights[ref[i]["level"]] for i in order[:7]]
    assert torch.equal(b0.tokens, vlm.tokenize([ref[i]["caption"] for i in order[:7]]))
    again = reference_batches(pairs, vlm.tokenize, 7, seed=3)
    assert all(torch.equal(a.tokens, next(again).tokens) for a in batches)
    second = torch.randperm(len(ref), generator=torch.Generator().manual_seed(4)).tolist()
    assert torch.equal(batches[per_pass].tokens, vlm.tokenize([ref[i]["caption"] for i in second[:7]])), \
        "pass k is shuffled with seed + k, the last partial batch dropped"
    small = next(reference_batches(pairs, vlm.tokenize, len(ref) + 5, seed=0))
    assert small.images.shape[0] == len(ref), "a set smaller than a batch gives one batch of all of it"
    with pytest.raises(RuntimeError, match="empty"):
        next(reference_batches(ReferencePairs(ReferenceSet([]), vlm.transform(False)), vlm.tokenize, 4, seed=0))
    with pytest.raises(ValueError, match="not a reference set"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"x": [1]}), tmp_path / "bad.parquet")
        ReferenceSet.load(str(tmp_path / "bad.parquet"))
