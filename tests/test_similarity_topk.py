"""similarity_topk: the reference against the definition written in plain
Python, every backend and every CPU screening path against the reference
bit for bit, the screen's bound under adversarial near-ties, the quantised
key copies, pair_scores, dispatch, and bad input."""
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import available_backends
from mgcl import _backend, _native
from mgcl.ops.similarity_topk import (BACKENDS, PAIR_BACKENDS, QuantizedKeys, TopK, native, pair_scores,
                                      quantize_keys, reference, similarity_topk, streaming)

# triton on CPU tensors is the interpreter (milliseconds per tile): its tests, at
# interpreter sizes, are in test_similarity_topk_triton.py
CPU_FAST = [b for b in available_backends(BACKENDS, "cpu") if b not in ("torch", "triton")]
CPU_ALL = CPU_FAST + ["torch"]
PATHS = (native.cpu_paths() + ["scalar", "blas"]) if _native.HAS_C else []
NAN = float("nan")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_c = pytest.mark.skipif(not _native.HAS_C, reason="mgcl._C not built")


# ---- the definition in plain Python ------------------------------------------------------------

def definition(x: list, k: list) -> float:
    """fp64 products (exact: Python floats of fp32/fp16/bf16 values), summed in
    ascending j from +0.0, rounded once to fp32."""
    acc = 0.0
    for a, b in zip(x, k):
        acc += a * b
    with np.errstate(over="ignore"):
        return float(np.float32(acc))


def brute(queries, keys, k, ties=True, max_per_query=None):
    """The result by the rule, one query at a time, scores by ``definition``."""
    qs, ks = queries.double().tolist(), keys.double().tolist()
    vals, idx, offs, trunc = [], [], [0], []
    for x in qs:
        ok = [(v, n) for n, v in enumerate(definition(x, kr) for kr in ks) if not math.isnan(v)]
        if ties:
            u = sorted({v for v, _ in ok}, reverse=True)
            sel = [(v, n) for v, n in ok if u and v >= u[min(k, len(u)) - 1]]
        else:
            sel = ok
        sel.sort(key=lambda t: (-t[0], t[1]))
        if not ties:
            sel = sel[:k]
        trunc.append(max_per_query is not None and len(sel) > max_per_query)
        if max_per_query is not None:
            sel = sel[:max_per_query]
        vals += [v for v, _ in sel]
        idx += [n for _, n in sel]
        offs.append(len(vals))
    return vals, idx, offs, trunc


def as_lists(r):
    return tuple(t.tolist() for t in r)


def assert_same(got, want, what=""):
    got, want = TopK(*got), TopK(*want)
    assert got.values.dtype == torch.float32 and got.indices.dtype == torch.int64
    assert got.offsets.dtype == torch.int64 and got.truncated.dtype == torch.bool
    for name in TopK._fields:
        a, b = getattr(got, name).cpu(), getattr(want, name).cpu()
        assert torch.equal(a, b), f"{what}: {name} differs\n got  {a.tolist()[:40]}\n want {b.tolist()[:40]}"


def shards_of(keys, cuts):
    bounds = [0] + list(cuts) + [keys.shape[0]]
    return [keys[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def quantised(shape, levels, seed, dtype=torch.float32, scale=0.25):
    """Integers in [-levels, levels] times ``scale``: many scores tie exactly."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-levels, levels + 1, shape, generator=g).float() * scale).to(dtype)


def tie_heavy(q, n, d, seed, dtype=torch.float32):
    """Quantised keys with many duplicated rows: exact ties of whole groups."""
    g = torch.Generator().manual_seed(seed)
    queries = quantised((q, d), 2, seed, dtype)
    base = quantised((max(1, n // 7), d), 2, seed + 1, dtype)
    keys = base[torch.randint(0, base.shape[0], (n,), generator=g)]
    return queries, keys


def unit(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=1).to(dtype)


def run_path(path, q, shards, k, ties=True, mpq=None, **kw):
    return native.similarity_topk_cpu(q, list(shards), k, ties, mpq, path=path, **kw)


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny candidate buffers (the cpp reruns of overflowed queries), small
    tiles and lists (the screened flow's second pass), small BLAS blocks."""
    monkeypatch.setattr(native, "cand_capacity", lambda k: k + 3)
    monkeypatch.setattr(native, "slack", lambda k: 1)
    monkeypatch.setitem(native.CHUNKED_TILE, "cpu", 37)
    monkeypatch.setattr(native, "CPU_BLAS_KEY_BLOCK", 37)
    monkeypatch.setattr(native, "CPU_BLAS_QUERY_BLOCK", 5)


# ---- the reference is the definition -------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_scores_are_the_definition(dtype):
    q = unit((5, 37), 1, dtype)
    keys = unit((11, 37), 2, dtype) * 3
    s = reference.scores(q, keys)
    assert s.dtype == torch.float32
    want = [[definition(x, k) for k in keys.double().tolist()] for x in q.double().tolist()]
    assert s.tolist() == want
    assert reference.pair_scores(q, keys[:5]).tolist() == [want[i][i] for i in range(5)]


def test_the_sum_runs_in_ascending_order_from_plus_zero():
    # The same three products: (2^60 + 1) - 2^60 is 0 in fp64, (2^60 - 2^60) + 1
    # is 1. The definition fixes the order: ascending j.
    x = torch.tensor([[2.0 ** 60, 1.0, -(2.0 ** 60)], [2.0 ** 60, -(2.0 ** 60), 1.0]])
    k = torch.ones(1, 3)
    assert reference.scores(x, k).flatten().tolist() == [0.0, 1.0]
    # products of -0.0 sum to +0.0 (the sum starts from +0.0)
    z = reference.scores(torch.tensor([[-0.0, 0.0]]), torch.tensor([[1.0, -1.0]]))
    assert z.item() == 0.0 and math.copysign(1.0, z.item()) == 1.0


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("max_per_query", [None, 1, 4])
def test_reference_matches_brute_force(ties, max_per_query):
    for seed in range(4):
        q = quantised((7, 5), 2, seed)
        keys = unit((131, 5), seed + 100)
        keys[::17] = keys[3]  # duplicated rows
        keys[40:60] = quantised((20, 5), 2, seed)
        if seed % 2:
            keys[5, 1] = NAN
            q[2, 0] = NAN
            keys[9, 0] = float("inf")
        for k in (1, 3, 10, 200):
            got = similarity_topk(q, shards_of(keys, [0, 40, 40, 99]), k, ties=ties, max_per_query=max_per_query,
                                  backend="torch")
            assert as_lists(got) == brute(q, keys, k, ties, max_per_query), (seed, k)


def test_known_values():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[3.0, 0.0], [1.0, 1.0], [3.0, 5.0], [2.0, 2.0], [1.0, 0.0]])
    # query 0 scores 3,1,3,2,1: distinct 3>2>1; k=2 -> tau=2 -> {0,2,3}
    # query 1 scores 0,1,5,2,0: distinct 5>2>1>0; k=2 -> tau=2 -> {2,3}
    for b in CPU_ALL:
        r = similarity_topk(q, keys, 2, backend=b)
        assert r.offsets.tolist() == [0, 3, 5]
        assert r.indices.tolist() == [0, 2, 3, 2, 3]
        assert r.values.tolist() == [3.0, 3.0, 2.0, 5.0, 2.0]
        r = similarity_topk(q, keys, 2, ties=False, backend=b)
        assert r.indices.tolist() == [0, 2, 2, 3]
        r = similarity_topk(q, keys, 2, max_per_query=2, backend=b)
        assert r.indices.tolist() == [0, 2, 2, 3] and r.truncated.tolist() == [True, False]
        v, i = r.query(1)
        assert v.tolist() == [5.0, 2.0] and i.tolist() == [2, 3]


# ---- every backend and screen path against the reference -----------------------------------------

@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_matches_reference_exactly(backend, ties, dtype):
    q = unit((37, 23), 3, dtype)
    keys = unit((5003, 23), 4, dtype)
    for k in (1, 17, 100):
        want = similarity_topk(q, keys, k, ties=ties, backend="torch")
        assert_same(similarity_topk(q, keys, k, ties=ties, backend=backend), want, f"{backend} k={k}")
        if ties:  # random scores have no ties: exactly k each
            assert (want.offsets.diff() == k).all()


@needs_c
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ties", [True, False])
def test_every_screen_path_matches_reference(small_blocks, path, ties):
    # more than one work unit (64 queries), key block (256 keys) and packed
    # group (16 queries), a partial group, d not a multiple of 4, fp16 keys
    q = unit((83, 30), 5)
    keys = unit((700, 30), 6, torch.float16)
    keys[100:300:3] = keys[7]  # duplicates of one row, scattered over blocks
    q[40] = q[3]
    for k in (1, 5, 40):
        want = similarity_topk(q, keys, k, ties=ties, backend="torch")
        stats = {}
        got = run_path(path, q, shards_of(keys, [256, 300]), k, ties, stats=stats)
        assert_same(got, want, f"{path} k={k}")
        assert stats["path"] == path
        assert (stats["rescored"] >= want.offsets.diff()).all()
    qt, kt = tie_heavy(19, 600, 9, 1)
    for k in (1, 3, 40):
        for mpq in (None, 3):
            want = similarity_topk(qt, kt, k, ties=ties, max_per_query=mpq, backend="torch")
            got = run_path(path, qt, shards_of(kt, [0, 111, 500]), k, ties, mpq, stats=stats)
            assert_same(got, want, f"{path} tie-heavy k={k} mpq={mpq}")
    assert stats["passes"] > 1, "the tiny buffers should overflow and rerun"


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("ties", [True, False])
def test_tie_heavy_matches_reference(small_blocks, backend, ties):
    for seed in range(2):
        q, keys = tie_heavy(11, 500, 6, seed)
        for k in (1, 3, 40):
            for mpq in (None, 3):
                want = similarity_topk(q, keys, k, ties=ties, max_per_query=mpq, backend="torch")
                got = similarity_topk(q, keys, k, ties=ties, max_per_query=mpq, backend=backend)
                assert_same(got, want, f"seed={seed} k={k} mpq={mpq}")
                if ties and mpq is None:
                    assert (want.offsets.diff() > k).any(), "the data should produce tie-extended results"


@pytest.mark.parametrize("backend", CPU_ALL)
def test_nan_inf_and_extreme_rows(small_blocks, backend):
    q = quantised((7, 4), 3, 1)
    keys = quantised((90, 4), 3, 2)
    keys[[3, 40, 41]] = NAN
    keys[7, 2] = NAN
    q[1] = NAN           # every score of query 1 is NaN
    q[4, 0] = NAN        # and of query 4
    q[5] = 0.0           # every score 0: all keys tie
    keys[50, 1] = float("-inf")
    keys[51, 0] = float("inf")
    keys[60] = keys[60] * 2.0 ** 70     # outside the screen's range: always scored exactly
    keys[61] = keys[61] * 2.0 ** -70
    keys[62] = torch.tensor([1e-45, -1e-45, 0.0, 1e-40])  # subnormals
    for ties in (True, False):
        for k in (1, 4, 500):
            r = similarity_topk(q, keys, k, ties=ties, backend=backend)
            assert not torch.isnan(r.values).any()
            assert as_lists(r) == brute(q, keys, k, ties), (ties, k)
            assert r.offsets[2] == r.offsets[1] and r.offsets[5] == r.offsets[4]


@pytest.mark.parametrize("backend", CPU_ALL)
def test_edge_shapes(backend):
    q = quantised((3, 5), 2, 4)
    keys = quantised((9, 5), 2, 5)
    empty = keys[:0]
    cases = [  # (queries, keys argument, the keys as one tensor, k)
        (q, keys, keys, 50),                   # k > N: every non-NaN key
        (q, empty, empty, 3),                  # N = 0
        (q, [empty, empty], empty, 3),         # only empty shards
        (q, [], empty, 3),                     # no shards
        (q[:1], keys, keys, 1),                # Q = 1, k = 1
        (q[:0], keys, keys, 2),                # Q = 0
    ]
    for qq, kk, flat, k in cases:
        for ties in (True, False):
            r = similarity_topk(qq, kk, k, ties=ties, backend=backend)
            assert as_lists(r) == brute(qq, flat, k, ties)
            assert r.offsets.shape == (qq.shape[0] + 1,) and r.truncated.shape == (qq.shape[0],)
    r = similarity_topk(q, keys, 50, ties=False, backend=backend)
    assert (r.offsets.diff() == 9).all()


@pytest.mark.parametrize("backend", CPU_ALL)
def test_uneven_shards_give_global_indices(small_blocks, backend):
    q, keys = tie_heavy(9, 400, 7, 11)
    whole = similarity_topk(q, keys, 6, backend=backend)
    for cuts in ([0, 1, 1, 399], [200], [37, 74, 300, 300, 301], [400, 400]):
        assert_same(similarity_topk(q, shards_of(keys, cuts), 6, backend=backend), whole, f"cuts={cuts}")
    assert as_lists(whole) == brute(q, keys, 6)


@pytest.mark.parametrize("backend", CPU_ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n_queries", [1, 3, 13])
def test_duplicated_random_rows_tie_wherever_they_sit(backend, dtype, n_queries):
    # Random unit rows, each repeated across shards of uneven sizes: every
    # copy of a row scores the same, so a result holds all copies of a row.
    g = torch.Generator().manual_seed(5)
    base = unit((12, 96), 7)
    which = torch.randint(0, 12, (600,), generator=g)
    keys = base[which].to(dtype)
    q = unit((n_queries, 96), 8, dtype)
    shards = shards_of(keys, [7, 8, 8, 21, 150, 151, 480])
    res = similarity_topk(q, shards, 3, backend=backend)
    for i in range(n_queries):
        got = res.indices[res.offsets[i]:res.offsets[i + 1]]
        rows = which[got]
        assert set(got.tolist()) == set(torch.isin(which, rows).nonzero().flatten().tolist())
        for r in rows.unique():
            assert res.values[res.offsets[i]:res.offsets[i + 1]][rows == r].unique().numel() == 1


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("qdtype", DTYPES, ids=str)
def test_mixed_query_and_key_dtypes(backend, qdtype):
    q = unit((13, 64), 8, qdtype)
    keys = unit((3001, 64), 9, torch.float16)
    for ties in (True, False):
        want = similarity_topk(q, [keys[:1000], keys[1000:]], 10, ties=ties, backend="torch")
        assert_same(similarity_topk(q, [keys[:1000], keys[1000:]], 10, ties=ties, backend=backend), want)
        # the values are the definition's scores of those pairs
        pairs = pair_scores(q.repeat_interleave(10, 0), keys[want.indices])
        assert torch.equal(want.values, pairs)


@pytest.mark.parametrize("backend", CPU_ALL)
def test_max_per_query_keeps_the_best(small_blocks, backend):
    q, keys = tie_heavy(8, 300, 5, 21)
    full = similarity_topk(q, keys, 4, backend=backend)
    for m in (1, 2, 7, 1000):
        r = similarity_topk(q, keys, 4, max_per_query=m, backend=backend)
        counts = full.offsets.diff()
        assert torch.equal(r.offsets.diff(), counts.clamp(max=m))
        assert torch.equal(r.truncated, counts > m)
        for i in range(q.shape[0]):
            v, n = r.query(i)
            fv, fn = full.query(i)
            assert torch.equal(v, fv[:m]) and torch.equal(n, fn[:m])


@pytest.mark.parametrize("backend", CPU_ALL)
def test_huge_k_is_bounded_by_n(backend):
    """k far above N is the k = N answer and allocates nothing per k."""
    q = quantised((4, 5), 2, 8)
    keys = quantised((9, 5), 2, 9)
    for ties in (True, False):
        r = similarity_topk(q, [keys[:4], keys[:0], keys[4:]], 2**40, ties=ties, backend=backend)
        assert as_lists(r) == brute(q, keys, 9, ties)


def test_default_backend_and_result_type():
    q, keys = quantised((4, 3), 2, 0), quantised((20, 3), 2, 1)
    r = similarity_topk(q, keys, 2)
    assert isinstance(r, TopK) and isinstance(r, tuple)
    assert all(t.device.type == "cpu" for t in r)
    assert _backend.select("similarity_topk", BACKENDS, "cpu") == ("cpp" if _native.HAS_C else "chunked")


# ---- property tests ------------------------------------------------------------------------------

@st.composite
def problems(draw):
    nq = draw(st.integers(0, 4))
    n = draw(st.integers(0, 30))
    d = draw(st.integers(1, 4))
    levels = draw(st.integers(1, 3))
    ints = st.integers(-levels, levels)

    def matrix(rows):
        vals = draw(st.lists(ints, min_size=rows * d, max_size=rows * d))
        return torch.tensor(vals, dtype=torch.float32).reshape(rows, d)

    q, keys = matrix(nq), matrix(n)
    if n and draw(st.booleans()):
        keys[draw(st.integers(0, n - 1)), 0] = NAN
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=3)))
    k = draw(st.integers(1, 8))
    ties = draw(st.booleans())
    mpq = draw(st.one_of(st.none(), st.integers(1, 5)))
    return q, keys, cuts, k, ties, mpq


@settings(max_examples=60, deadline=None)
@given(problems())
def test_property_all_backends_match_definition(prob):
    q, keys, cuts, k, ties, mpq = prob
    want = brute(q, keys, k, ties, mpq)
    for b in CPU_ALL:
        got = similarity_topk(q, shards_of(keys, cuts), k, ties=ties, max_per_query=mpq, backend=b)
        assert as_lists(got) == want, b
        assert got.offsets[0] == 0 and got.offsets[-1] == got.values.numel()
        if not ties:
            assert (got.offsets.diff() <= k).all()


@st.composite
def near_ties(draw):
    """Keys within a few ulps of each other (and of the quantisation grid's
    rounding boundaries): the screen's bound is the only thing that keeps the
    best of them. Magnitudes span the screen's range and beyond."""
    d = draw(st.integers(1, 70))
    n = draw(st.integers(2, 40))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    scale = 2.0 ** draw(st.sampled_from([-60, -40, -3, 0, 5, 40, 60]))
    base = torch.randn(d, generator=g)
    if draw(st.booleans()):  # values on the grid's half steps: every code rounds to even
        base = (torch.randint(-20, 21, (d,), generator=g).float() + 0.5) / 20
    ulps = torch.randint(-3, 4, (n, d), generator=g).float()
    keys = base[None, :] * (1 + ulps * 2.0 ** -23) * scale
    keys[draw(st.integers(0, n - 1))] = keys[0]  # an exact duplicate
    q = torch.stack([base, torch.randn(d, generator=g)]) * (2.0 ** draw(st.sampled_from([-30, 0, 30])))
    dtype = draw(st.sampled_from(DTYPES))
    return q.to(dtype), keys.to(dtype), draw(st.integers(1, 4)), draw(st.booleans())


@needs_c
@settings(max_examples=80, deadline=None)
@given(near_ties())
def test_property_the_bound_never_drops_an_entry(prob):
    q, keys, k, ties = prob
    want = similarity_topk(q, keys, k, ties=ties, backend="torch")
    for path in PATHS:
        assert_same(run_path(path, q, [keys], k, ties), want, path)
    assert_same(similarity_topk(q, keys, k, ties=ties, backend="chunked"), want, "chunked")


# ---- quantised key copies ------------------------------------------------------------------------

@needs_c
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_keys_bounds_hold_and_are_deterministic(dtype):
    keys = unit((300, 77), 11, dtype) * 5
    keys[3] = 0.0
    keys[4, 0] = NAN
    keys[5] = keys[5] * 2.0 ** 80 if dtype != torch.float16 else keys[5]
    qk = quantize_keys(keys)
    assert isinstance(qk, QuantizedKeys) and qk.codes.dtype == torch.int8
    assert int(qk.codes.abs().max()) <= native.KEY_LEVELS
    again = quantize_keys([keys[:100], keys[100:]])
    for f in QuantizedKeys._fields:
        assert torch.equal(torch.cat([getattr(a, f) for a in again]), getattr(qk, f)), f
    k64 = keys.double()
    approx = qk.scale.double()[:, None] * qk.codes.double()
    ok = torch.isfinite(qk.err)
    assert (qk.err.double()[ok] >= (k64 - approx).norm(dim=1)[ok]).all()
    assert (qk.norm.double() >= approx.norm(dim=1)).all()
    assert torch.equal(qk.sum, qk.codes.int().sum(1).int())
    assert not ok[4] and qk.err[3] == 0 and qk.scale[3] == 0


@needs_c
def test_quantized_copies_pass_through_and_are_checked(tmp_path):
    from safetensors.torch import load_file, save_file

    q = unit((21, 40), 12)
    shards = [unit((500, 40), 13, torch.float16), unit((321, 40), 14, torch.float16)]
    want = similarity_topk(q, shards, 7, backend="torch")
    codes = quantize_keys(shards)
    for i, c in enumerate(codes):  # the file form: plain tensors
        save_file(c._asdict(), str(tmp_path / f"q{i}.safetensors"))
    loaded = [QuantizedKeys(**load_file(str(tmp_path / f"q{i}.safetensors"))) for i in range(2)]
    assert_same(similarity_topk(q, shards, 7, quantized=loaded), want, "loaded copies")
    assert_same(similarity_topk(q, shards[0], 7, quantized=codes[0]), similarity_topk(q, shards[0], 7, backend="torch"))
    with pytest.raises(ValueError, match="does not match its keys"):
        similarity_topk(q, shards, 7, quantized=[codes[0], quantize_keys(shards[1] * 2)])
    with pytest.raises(ValueError, match="quantized copies for 2 key shards"):
        similarity_topk(q, shards, 7, quantized=codes[:1])
    with pytest.raises(ValueError, match=r"quantized\[0\]\.codes must be"):
        similarity_topk(q, shards, 7, quantized=[codes[1], codes[0]])


# ---- screening paths: detection and the self-check -------------------------------------------------

@needs_c
def test_screen_path_is_self_checked():
    for p in native.cpu_paths() + ["scalar"]:
        assert _native._C.similarity_topk_selfcheck(native.PATHS[p]), p
    assert native.screen_path() in native.PREFERRED + ("blas",)
    # a path this CPU lacks is never reported as passing
    bits = _native._C.similarity_topk_paths()
    for p in native.PREFERRED:
        if not bits >> native.PATHS[p] & 1:
            assert not _native._C.similarity_topk_selfcheck(native.PATHS[p])


@needs_c
def test_a_path_that_fails_its_self_check_is_skipped_with_one_warning(monkeypatch):
    real = _native._C

    class Failing:
        """mgcl._C as it is, but every int8 path fails its self-check."""

        def __getattr__(self, name):
            return getattr(real, name)

        def similarity_topk_paths(self):
            return (1 << native.PATHS["avx2"]) | 1

        def similarity_topk_selfcheck(self, path):
            return False

    monkeypatch.setattr(_native, "_C", Failing())
    native.screen_path.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="avx2 int8 screen disagreed"):
            assert native.screen_path() == "blas"
        q, keys = tie_heavy(5, 80, 6, 3)
        assert_same(similarity_topk(q, keys, 3, backend="cpp"), similarity_topk(q, keys, 3, backend="torch"))
    finally:
        monkeypatch.undo()
        native.screen_path.cache_clear()


def test_blas_bound_follows_torch_precision(monkeypatch):
    full = streaming.gemm_rel(384, "cpu")
    assert 384 * 2.0 ** -24 < full < 400 * 2.0 ** -24
    monkeypatch.setenv("ONEDNN_DEFAULT_FPMATH_MODE", "BF16")
    assert streaming.gemm_rel(384, "cpu") > 2.0 ** -7


# ---- pair_scores ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [b for b in available_backends(PAIR_BACKENDS, "cpu")])
@pytest.mark.parametrize("xdtype", DTYPES, ids=str)
@pytest.mark.parametrize("kdtype", DTYPES, ids=str)
def test_pair_scores_are_the_definition(backend, xdtype, kdtype):
    x = unit((29, 19), 15, xdtype) * 7
    k = unit((29, 19), 16, kdtype)
    x[3, 2] = NAN
    k[5] = 0
    got = pair_scores(x, k, backend=backend)
    want = [definition(a, b) for a, b in zip(x.double().tolist(), k.double().tolist())]
    assert got.dtype == torch.float32
    assert [v if not math.isnan(v) else "nan" for v in got.tolist()] == [v if not math.isnan(v) else "nan"
                                                                          for v in want]
    assert pair_scores(x[:0], k[:0], backend=backend).shape == (0,)


def test_pair_scores_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        pair_scores(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="dtype"):
        pair_scores(torch.randn(3, 4).double(), torch.randn(3, 4))


# ---- dispatch ------------------------------------------------------------------------------------

@pytest.mark.skipif(not _native.HAS_C_CUDA, reason="mgcl._C_cuda not built")
def test_k_above_the_cuda_cap_is_a_declared_limit():
    # A GPU-less probe of the table: the selection logic alone.
    cap = int(_native._C_cuda.max_best_cap)
    f32 = (torch.float32,)
    assert _backend.select("similarity_topk", BACKENDS, "cuda", dtypes=f32, k=cap) == "cuda"
    after = "triton" if _backend.triton_available() else "chunked"  # the next GPU entry
    assert _backend.select("similarity_topk", BACKENDS, "cuda", dtypes=f32, k=cap + 1) == after
    with pytest.raises(ValueError, match="above the CUDA select's cap"):
        _backend.select("similarity_topk", BACKENDS, "cuda", "cuda", dtypes=f32, k=cap + 1)


def test_k_above_the_cuda_cap_runs_on_the_fallback_exactly(small_blocks):
    # What the cuda entry falls back to (triton, else chunked; triton's own test
    # file covers k > N) keeps the exact answer for a
    # k far above the select's cap, on the CPU here (the same torch code).
    q, keys = tie_heavy(6, 9000, 5, 4)
    k = 8000
    for ties in (True, False):
        assert_same(similarity_topk(q, keys, k, ties=ties, backend="chunked"),
                    similarity_topk(q, keys, k, ties=ties, backend="torch"), f"ties={ties}")


def test_torch_select_keeps_the_best_under_value_then_index():
    lv, li, ln = streaming.new_lists(2, 3, "cpu")
    streaming.torch_select(torch.tensor([[1.0, 5.0, 5.0, -math.inf], [2.0, 2.0, 2.0, 2.0]]), 10, lv, li, ln)
    assert ln.tolist() == [3, 3]
    assert lv[0].tolist() == [5.0, 5.0, 1.0] and li[0].tolist() == [11, 12, 10]
    assert li[1].tolist() == [10, 11, 12]
    streaming.torch_select(torch.tensor([[5.0, 9.0], [2.0, 3.0]]), 14, lv, li, ln)
    assert lv[0].tolist() == [9.0, 5.0, 5.0] and li[0].tolist() == [15, 11, 12]
    assert lv[1].tolist() == [3.0, 2.0, 2.0] and li[1].tolist() == [15, 10, 11]


# ---- bad input -----------------------------------------------------------------------------------

def _bad():
    q, keys = torch.randn(3, 4), torch.randn(10, 4)
    yield "k=0", dict(queries=q, keys=keys, k=0), "k must be"
    yield "k float", dict(queries=q, keys=keys, k=2.0), "k must be"
    yield "k bool", dict(queries=q, keys=keys, k=True), "k must be"
    yield "dim mismatch", dict(queries=q, keys=torch.randn(10, 5), k=2), "dim mismatch"
    yield "dim mismatch shard", dict(queries=q, keys=[keys, torch.randn(2, 3)], k=2), r"keys\[1\].*dim mismatch"
    yield "1-D queries", dict(queries=torch.randn(4), keys=keys, k=2), "queries must be 2-D"
    yield "3-D keys", dict(queries=q, keys=torch.randn(2, 10, 4), k=2), r"keys\[0\] must be 2-D"
    yield "mixed shard dtypes", dict(queries=q, keys=[keys, keys.half()], k=2), "mixed dtypes"
    yield "float64", dict(queries=q.double(), keys=keys, k=2), "dtype"
    yield "int keys", dict(queries=q, keys=keys.int(), k=2), "dtype"
    yield "not a tensor", dict(queries=q, keys=[keys, [1.0] * 4], k=2), r"keys\[1\] is list"
    yield "queries not a tensor", dict(queries=[[1.0] * 4], keys=keys, k=2), "queries is list"
    yield "max_per_query=0", dict(queries=q, keys=keys, k=2, max_per_query=0), "max_per_query"
    yield "ties not bool", dict(queries=q, keys=keys, k=2, ties=1), "ties must be"
    yield "keys on meta", dict(queries=q, keys=torch.randn(10, 4, device="meta"), k=2), "queries' device"


@pytest.mark.parametrize("case", list(_bad()), ids=lambda c: c[0])
@pytest.mark.parametrize("backend", ["torch", None])
def test_bad_input_raises_value_error(case, backend):
    _, kwargs, pattern = case
    with pytest.raises(ValueError, match=pattern):
        similarity_topk(**kwargs, backend=backend)


def test_custom_op_registration():
    q, keys = quantised((4, 3), 2, 0), quantised((20, 3), 2, 1)
    op = torch.ops.mgcl.similarity_topk.default
    for b in CPU_ALL:
        for ties, mpq in ((True, None), (False, 2)):
            torch.library.opcheck(op, (q, [keys[:7], keys[7:]], 3, ties, mpq, b, []),
                                  test_utils=("test_schema", "test_faketensor"))
    if _native.HAS_C:
        flat = [t for c in quantize_keys([keys[:7], keys[7:]]) for t in c]
        torch.library.opcheck(op, (q, [keys[:7], keys[7:]], 3, True, None, "cpp", flat),
                              test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.mgcl.similarity_topk_pair_scores.default, (q, keys[:4], "torch"),
                          test_utils=("test_schema", "test_faketensor"))


def test_cpu_use_does_not_initialise_cuda():
    code = textwrap.dedent("""
        import torch
        from mgcl.ops.similarity_topk import similarity_topk
        r = similarity_topk(torch.randn(4, 8), [torch.randn(50, 8), torch.randn(7, 8)], 3)
        assert not torch.cuda.is_initialized()
        print("ok", r.offsets.tolist())
    """)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ok [0, 3, 6, 9, 12]" in out.stdout


# ---- GPU (run on a lent GPU; skipped without one) ------------------------------------------------

def _gpu_backends():
    return [b for b in ("cuda", "chunked", "torch") if b in available_backends(BACKENDS, "cuda")]


@pytest.fixture
def small_tiles(monkeypatch):
    """Several GEMM tiles and a tiny slack (many queries take the second pass)."""
    monkeypatch.setattr(native, "CUDA_TILE_ELEMS", 1)
    monkeypatch.setattr(native, "CUDA_TILE_MIN", 1280)
    monkeypatch.setattr(native, "slack", lambda k: 1)
    monkeypatch.setitem(native.CHUNKED_TILE, "cuda", 999)


@pytest.mark.gpu
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu_reference_bit_for_bit(small_tiles, ties, dtype):
    # The score is defined exactly, so unquantised random data must agree
    # with the CPU reference bit for bit too.
    for seed in range(2):
        q, keys = tie_heavy(19, 6000, 24, seed, dtype)
        keys[5] = NAN
        r = unit((19, 24), seed, dtype)
        rk = unit((6000, 24), seed + 9, dtype)
        for qq, kk in ((q, keys), (r, rk)):
            for k in (1, 3, 50):
                want = similarity_topk(qq, kk, k, ties=ties, backend="torch")
                for b in _gpu_backends():
                    got = similarity_topk(qq.cuda(), kk.cuda(), k, ties=ties, backend=b)
                    assert got.values.device.type == "cuda"
                    assert_same(got, want, f"{b} seed={seed} k={k}")


@pytest.mark.gpu
@pytest.mark.parametrize("pinned", [True, False])
def test_cuda_host_resident_shards_stream(small_tiles, pinned):
    q, keys = tie_heavy(33, 9000, 24, 4)
    shards = shards_of(keys, [0, 2500, 2500, 7001])
    if pinned:
        shards = [s.pin_memory() for s in shards]
    for ties in (True, False):
        want = similarity_topk(q, keys, 7, ties=ties, max_per_query=30, backend="torch")
        for b in ("cuda", "chunked"):
            if b not in _gpu_backends():
                continue
            got = similarity_topk(q.cuda(), shards, 7, ties=ties, max_per_query=30, backend=b)
            assert_same(got, want, f"{b} host pinned={pinned}")
        mixed = [s.cuda() if i % 2 else s for i, s in enumerate(shards)]
        assert_same(similarity_topk(q.cuda(), mixed, 7, ties=ties, max_per_query=30), want, "mixed")


@pytest.mark.gpu
def test_cuda_edge_cases_and_large_k(small_tiles):
    q, keys = tie_heavy(5, 3000, 24, 6)
    q[1] = NAN
    keys[7] = NAN
    cap = int(_native._C_cuda.max_best_cap) if _native.HAS_C_CUDA else 7168
    # k above the cap goes to triton (else chunked) by the table; 1025-3072 crosses the select's 48 KiB shared memory
    for k, kk in ((1, keys[:1]), (4, keys[:0]), (cap + 10, keys), (2000, keys), (8000, keys[:100])):
        for ties in (True, False):
            want = similarity_topk(q, kk, k, ties=ties, backend="torch")
            assert_same(similarity_topk(q.cuda(), kk.cuda(), k, ties=ties), want, f"k={k} n={kk.shape[0]}")
    want = similarity_topk(q[:0], keys, 3, backend="torch")
    assert_same(similarity_topk(q[:0].cuda(), keys.cuda(), 3), want, "Q=0")
    x, y = unit((100, 24), 1), unit((100, 24), 2, torch.bfloat16)
    assert torch.equal(pair_scores(x.cuda(), y.cuda()).cpu(), pair_scores(x, y))


@pytest.mark.gpu
def test_cuda_is_default_and_memory_is_bounded():
    q = torch.randn(64, 32, device="cuda")
    keys = torch.randn(2_000_000, 32, device="cuda")
    if "cuda" in _gpu_backends():
        assert _backend.select("similarity_topk", BACKENDS, q.device, dtypes=(torch.float32,), k=10) == "cuda"
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    r = similarity_topk(q, keys, 10)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 64 * 2_000_000 * 4 / 4, f"peak {extra} bytes: the Q x N score matrix must never exist"
    assert r.offsets[-1] == 640


@pytest.mark.gpu
def test_cuda_runs_on_the_callers_stream(small_tiles):
    q, keys = tie_heavy(9, 4000, 24, 12)
    want = similarity_topk(q, keys, 5, backend="torch")
    host = keys.pin_memory()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        qc = q.cuda()
        got = similarity_topk(qc, keys.cuda(), 5)
        got_host = similarity_topk(qc, host, 5)
    s.synchronize()
    assert_same(got, want, "device keys on a side stream")
    assert_same(got_host, want, "host keys on a side stream")


@needs_c
def test_bench_reports_path_rescoring_and_checks():
    from mgcl.bench import similarity_topk as bench

    res = bench.run("cpu", scale=0.005, repeats=1)
    assert [c["config"]["case"] for c in res["cases"]] == list(bench.CASES["cpu"])
    for case in res["cases"]:
        assert case["checks"] and all(case["checks"].values()), case["checks"]
        assert case["extra"]["screen_path"] == native.screen_path()
        assert case["extra"]["rescored_per_query_mean"] >= case["extra"]["result_per_query_mean"]
        assert {"cpp", "reference", "quantize"} <= {r["impl"] for r in case["rows"]}
    assert "screen: " + native.screen_path() in bench.table(res)
