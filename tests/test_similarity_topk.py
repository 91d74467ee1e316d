"""similarity_topk: the reference against a brute-force oracle, every backend
against the reference, faiss as an external oracle, and bad input."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import available_backends
from mgcl.ops.similarity_topk import BACKENDS, TopK, native, reference, similarity_topk

CPU_FAST = [b for b in available_backends(BACKENDS, "cpu") if b != "torch"]
CPU_ALL = ["torch"] + CPU_FAST
NAN = float("nan")


# ---- helpers -----------------------------------------------------------------------------------

def brute(queries, keys, k, ties=True, max_per_query=None):
    """The definition, one query at a time in plain Python (float64 scores of
    the float32 products are exact for the small integer data used here)."""
    scores = (queries.double() @ keys.double().T).tolist() if keys.shape[0] else [[] for _ in range(queries.shape[0])]
    vals, idx, offs, trunc = [], [], [0], []
    for row in scores:
        ok = [(v, n) for n, v in enumerate(row) if not math.isnan(v)]
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
    return r.values.tolist(), r.indices.tolist(), r.offsets.tolist(), r.truncated.tolist()


def assert_same(got: TopK, want: TopK, what=""):
    assert got.values.dtype == torch.float32 and got.indices.dtype == torch.int64
    assert got.offsets.dtype == torch.int64 and got.truncated.dtype == torch.bool
    for name in TopK._fields:
        a, b = getattr(got, name).cpu(), getattr(want, name).cpu()
        assert torch.equal(a, b), f"{what}: {name} differs\n got  {a.tolist()[:40]}\n want {b.tolist()[:40]}"


def shards_of(keys, cuts):
    bounds = [0] + list(cuts) + [keys.shape[0]]
    return [keys[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def quantised(shape, levels, seed, dtype=torch.float32, scale=0.25):
    """Integers in [-levels, levels] times ``scale``: every dot product is exact in
    float32 (whatever the summation order) and many scores tie exactly."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-levels, levels + 1, shape, generator=g).float() * scale).to(dtype)


def tie_heavy(q, n, d, seed, dtype=torch.float32):
    """Quantised keys with many duplicated rows: exact ties of whole groups."""
    g = torch.Generator().manual_seed(seed)
    queries = quantised((q, d), 2, seed, dtype)
    base = quantised((max(1, n // 7), d), 2, seed + 1, dtype)
    keys = base[torch.randint(0, base.shape[0], (n,), generator=g)]
    return queries, keys


@pytest.fixture
def small_blocks(monkeypatch):
    """Many score blocks and tiny candidate buffers, so block merging and the
    cpp overflow (second collection) pass run on small inputs."""
    monkeypatch.setitem(reference.QUERY_BLOCK, "cpu", 5)
    monkeypatch.setitem(reference.KEY_BLOCK, "cpu", 37)
    monkeypatch.setattr(native, "cand_capacity", lambda k: k + 3)


# ---- the reference is the definition -------------------------------------------------------------

@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("max_per_query", [None, 1, 4])
def test_reference_matches_brute_force(small_blocks, ties, max_per_query):
    for seed in range(6):
        q = quantised((7, 5), 2, seed)
        keys = quantised((131, 5), 2, seed + 100)
        keys[::17] = keys[3]  # duplicated rows
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


# ---- every backend against the reference ---------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_random_matches_reference_exactly(backend, ties, dtype):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(37, 23, generator=g).to(dtype)
    keys = torch.randn(5003, 23, generator=g).to(dtype)
    for k in (1, 17, 100):
        want = similarity_topk(q, keys, k, ties=ties, backend="torch")
        assert_same(similarity_topk(q, keys, k, ties=ties, backend=backend), want, f"{backend} k={k}")
        if ties:  # random scores have no ties: exactly k each
            assert (want.offsets.diff() == k).all()


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
def test_nan_scores_are_never_returned(small_blocks, backend):
    q = quantised((6, 4), 3, 1)
    keys = quantised((90, 4), 3, 2)
    keys[[3, 40, 41]] = NAN
    keys[7, 2] = NAN
    q[1] = NAN           # every score of query 1 is NaN
    q[4, 0] = NAN        # and of query 4
    keys[50, 1] = float("-inf")
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
    # Random (not small-integer) unit rows, each repeated across shards of
    # uneven sizes: every copy of a row must score the same, so a result holds
    # all copies of each row it holds (a BLAS rounds differently by matrix
    # shape; the fixed-width blocking must hide that).
    g = torch.Generator().manual_seed(5)
    base = torch.nn.functional.normalize(torch.randn(12, 96, generator=g), dim=1)
    which = torch.randint(0, 12, (600,), generator=g)
    keys = base[which].to(dtype)
    q = torch.nn.functional.normalize(torch.randn(n_queries, 96, generator=g), dim=1).to(dtype)
    shards = shards_of(keys, [7, 8, 8, 21, 150, 151, 480])
    res = similarity_topk(q, shards, 3, backend=backend)
    for i in range(n_queries):
        got = res.indices[res.offsets[i]:res.offsets[i + 1]]
        rows = which[got]
        assert set(got.tolist()) == set(torch.isin(which, rows).nonzero().flatten().tolist())
        for r in rows.unique():
            assert res.values[res.offsets[i]:res.offsets[i + 1]][rows == r].unique().numel() == 1


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("qdtype", [torch.float32, torch.float16], ids=str)
def test_fp16_keys(backend, qdtype):
    g = torch.Generator().manual_seed(8)
    q = torch.randn(13, 64, generator=g).to(qdtype)
    keys = torch.randn(3001, 64, generator=g).half()
    for ties in (True, False):
        want = similarity_topk(q, [keys[:1000], keys[1000:]], 10, ties=ties, backend="torch")
        assert_same(similarity_topk(q, [keys[:1000], keys[1000:]], 10, ties=ties, backend=backend), want)
        # float32 accumulation of the exactly upcast fp16 values
        s = q.float() @ keys.float().T
        assert torch.equal(want.values, s.gather(1, want.indices.view(13, 10)).flatten())


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


def test_default_backend_and_result_type():
    q, keys = quantised((4, 3), 2, 0), quantised((20, 3), 2, 1)
    r = similarity_topk(q, keys, 2)
    assert isinstance(r, TopK) and isinstance(r, tuple)
    assert all(t.device.type == "cpu" for t in r)
    from mgcl import _backend
    assert _backend.select("similarity_topk", BACKENDS, "cpu") == (CPU_FAST[0] if CPU_FAST else "torch")


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


@settings(max_examples=80, deadline=None)
@given(problems())
def test_property_all_backends_match_definition(prob):
    q, keys, cuts, k, ties, mpq = prob
    want = brute(q, keys, k, ties, mpq)
    for b in CPU_ALL:
        got = similarity_topk(q, shards_of(keys, cuts), k, ties=ties, max_per_query=mpq, backend=b)
        assert as_lists(got) == want, b
        # structural invariants
        assert got.offsets[0] == 0 and got.offsets[-1] == got.values.numel()
        if not ties:
            assert (got.offsets.diff() <= k).all()


# ---- external oracle -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_ALL)
def test_plain_topk_equals_faiss_on_tie_free_data(backend):
    faiss = pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(5)
    q = torch.nn.functional.normalize(torch.randn(25, 48, generator=g), dim=1)
    keys = torch.nn.functional.normalize(torch.randn(4000, 48, generator=g), dim=1)
    k = 20
    index = faiss.IndexFlatIP(48)
    index.add(keys.numpy())
    dist, ids = index.search(q.numpy(), k)
    r = similarity_topk(q, [keys[:1500], keys[1500:]], k, ties=False, backend=backend)
    assert torch.equal(r.indices.view(25, k), torch.from_numpy(ids).long())
    torch.testing.assert_close(r.values.view(25, k), torch.from_numpy(dist), rtol=1e-5, atol=1e-5)


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
        for ties, mpq in ((True, 0), (False, 2)):
            torch.library.opcheck(op, (q, [keys[:7], keys[7:]], 3, ties, mpq, b),
                                  test_utils=("test_schema", "test_faketensor"))


# ---- GPU (run on a lent GPU; skipped without one) ------------------------------------------------

GPU_BACKENDS = ["torch", "cuda"]


def _gpu_backends():
    return [b for b in GPU_BACKENDS if b == "torch" or "cuda" in available_backends(BACKENDS, "cuda")]


@pytest.fixture
def small_tiles(monkeypatch):
    """Several GEMM tiles, a tiny slack (many queries go through the distinct
    and collection passes) and small reference blocks."""
    monkeypatch.setattr(native, "CUDA_TILE_ELEMS", 1)
    monkeypatch.setattr(native, "CUDA_TILE_MIN", 1280)
    monkeypatch.setattr(native, "cuda_slack", lambda k: 1)
    monkeypatch.setitem(reference.KEY_BLOCK, "cuda", 999)
    monkeypatch.setitem(reference.QUERY_BLOCK, "cuda", 7)


def _exact_case(seed, nq=19, n=6000, d=24, dtype=torch.float32):
    q, keys = tie_heavy(nq, n, d, seed, dtype)
    keys[5] = NAN
    return q, keys


@pytest.mark.gpu
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("overlap", [True, False])
def test_cuda_exact_data_matches_cpu_reference(small_tiles, monkeypatch, ties, dtype, overlap):
    # Quantised data: every summation order gives the same float32 scores,
    # so every backend on every device must agree bit for bit.
    monkeypatch.setattr(native, "CUDA_OVERLAP", overlap)
    for seed in range(3):
        q, keys = _exact_case(seed, dtype=dtype)
        for k in (1, 3, 50):
            want = similarity_topk(q, keys, k, ties=ties, backend="torch")
            for b in _gpu_backends():
                got = similarity_topk(q.cuda(), keys.cuda(), k, ties=ties, backend=b)
                assert got.values.device.type == "cuda"
                assert_same(got, want, f"{b} seed={seed} k={k}")


@pytest.mark.gpu
@pytest.mark.parametrize("pinned", [True, False])
def test_cuda_host_resident_shards_stream(small_tiles, pinned):
    q, keys = _exact_case(4, nq=33, n=9000)
    shards = shards_of(keys, [0, 2500, 2500, 7001])
    if pinned:
        shards = [s.pin_memory() for s in shards]
    for ties in (True, False):
        want = similarity_topk(q, keys, 7, ties=ties, max_per_query=30, backend="torch")
        for b in _gpu_backends():
            got = similarity_topk(q.cuda(), shards, 7, ties=ties, max_per_query=30, backend=b)
            assert_same(got, want, f"{b} host pinned={pinned}")
        # mixed residency: some shards on the GPU, some in host memory
        mixed = [s.cuda() if i % 2 else s for i, s in enumerate(shards)]
        assert_same(similarity_topk(q.cuda(), mixed, 7, ties=ties, max_per_query=30), want, "mixed")


@pytest.mark.gpu
def test_cuda_edge_cases_and_large_k(small_tiles):
    q, keys = _exact_case(6, nq=5, n=3000)
    q[1] = NAN
    for k, kk in ((1, keys[:1]), (4, keys[:0]), (9000, keys), (8000, keys[:100])):  # k above max_best_cap too
        for ties in (True, False):
            want = similarity_topk(q, kk, k, ties=ties, backend="torch")
            assert_same(similarity_topk(q.cuda(), kk.cuda(), k, ties=ties), want, f"k={k} n={kk.shape[0]}")
    want = similarity_topk(q[:0], keys, 3, backend="torch")
    assert_same(similarity_topk(q[:0].cuda(), keys.cuda(), 3), want, "Q=0")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_random_data_agrees_up_to_rounding(dtype):
    # Unquantised data: cuBLAS may round differently from the CPU, so the sets
    # may differ only at scores within rounding of the threshold.
    g = torch.Generator().manual_seed(9)
    q = torch.nn.functional.normalize(torch.randn(300, 96, generator=g), dim=1).to(dtype)
    keys = torch.nn.functional.normalize(torch.randn(70_001, 96, generator=g), dim=1).to(dtype)
    exact = q.double() @ keys.double().T
    eps = 1e-5 if dtype == torch.float32 else 1e-3
    for ties in (True, False):
        got = similarity_topk(q.cuda(), keys.cuda(), 25, ties=ties, backend="cuda")
        want = similarity_topk(q, keys, 25, ties=ties, backend="torch")
        assert torch.equal(got.offsets.cpu(), want.offsets)  # tie-free: 25 each
        gi, wi = got.indices.cpu().view(300, 25), want.indices.view(300, 25)
        diff = (gi != wi).any(1).nonzero().flatten()
        for r in diff.tolist():
            s = exact[r]
            tau = s[wi[r]].min()
            odd = set(gi[r].tolist()) ^ set(wi[r].tolist())
            assert all(abs(float(s[n] - tau)) < eps for n in odd), r
        assert diff.numel() <= 3
        torch.testing.assert_close(got.values.cpu(), exact.gather(1, gi).flatten().float(), rtol=0, atol=eps)


@pytest.mark.gpu
def test_cuda_is_default_and_memory_is_bounded():
    q = torch.randn(64, 32, device="cuda")
    keys = torch.randn(2_000_000, 32, device="cuda")
    from mgcl import _backend
    if "cuda" in available_backends(BACKENDS, "cuda"):
        assert _backend.select("similarity_topk", BACKENDS, q.device) == "cuda"
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
    q, keys = _exact_case(12, nq=9, n=4000)
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


@pytest.mark.parametrize("backend", CPU_ALL)
def test_huge_k_is_bounded_by_n(backend):
    """k far above N is the k = N answer and allocates nothing per k (the
    per-query state used to be [Q, k])."""
    q = quantised((4, 5), 2, 8)
    keys = quantised((9, 5), 2, 9)
    for ties in (True, False):
        r = similarity_topk(q, [keys[:4], keys[:0], keys[4:]], 2**40, ties=ties, backend=backend)
        assert as_lists(r) == brute(q, keys, 9, ties)
