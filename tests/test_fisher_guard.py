"""fisher_guard: every available backend against the reference."""

import numpy as np
import pytest
import torch

from conftest import HAS_GPU, available_backends
from mgcl import _native
from mgcl.ops.fisher_guard import BACKENDS, fisher_guard
from mgcl.testing import TOLERANCES, assert_matches_reference, odd_shapes

CPU_FAST = [b for b in available_backends(BACKENDS, "cpu") if b != "torch"]
GPU_FAST = [b for b in available_backends(BACKENDS, "cuda") if b != "torch"] if HAS_GPU else []
CASES = [(b, "cpu") for b in CPU_FAST] + [(b, "cuda") for b in GPU_FAST]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(shapes, dtype, device, seed=0, fisher_dtype=None):
    g = torch.Generator().manual_seed(seed)

    def r(s, sd=1.0):
        return (torch.randn(s, generator=g) * sd).to(device=device, dtype=dtype)

    grads = [r(s) for s in shapes]
    params = [r(s) for s in shapes]
    anchors = [p + r(p.shape, 0.5) for p in params]
    fisher = [torch.rand(s, generator=g).to(device=device, dtype=fisher_dtype or dtype) for s in shapes]
    return grads, params, anchors, fisher


def clone(ts):
    return [t.clone() for t in ts]


def run_both(backend, shapes, dtype, device, mode="dfg", ema=0.0, normalize=None, lam=0.37, fisher_dtype=None, seed=0):
    grads, params, anchors, fisher = make(shapes, dtype, device, seed, fisher_dtype)
    g_ref, f_ref = clone(grads), clone(fisher)
    uses_f = mode == "ewc" or ema > 0
    pen_ref = fisher_guard(g_ref, params, anchors, lam=lam, mode=mode, fisher=f_ref if uses_f else None, ema=ema,
                           normalize=normalize, backend="torch")
    g_out, f_out = clone(grads), clone(fisher)
    pen = fisher_guard(g_out, params, anchors, lam=lam, mode=mode, fisher=f_out if uses_f else None, ema=ema,
                       normalize=normalize, backend=backend)
    return (g_ref, f_ref, pen_ref), (g_out, f_out, pen)


def check(ref, out, dtype):
    (g_ref, f_ref, pen_ref), (g_out, f_out, pen) = ref, out
    rtol, _ = TOLERANCES[dtype]
    assert pen.dtype == torch.float32 and pen.dim() == 0
    assert pen.device == (g_ref[0].device if g_ref else torch.device("cpu"))
    # the penalty is a sum of non-negative terms: relative comparison
    assert_matches_reference(pen, pen_ref, dtype=dtype, rtol=max(rtol, 1e-5), atol=0, name="penalty")
    for i, (a, b) in enumerate(zip(g_out, g_ref)):
        # grad + 2*lam*W*d can cancel: compare on the scale of the tensor
        scale = float(b.float().abs().max()) if b.numel() else 0.0
        assert_matches_reference(a, b, dtype=dtype, atol=rtol * max(scale, 1.0), name=f"grads[{i}]")
    for i, (a, b) in enumerate(zip(f_out, f_ref)):
        assert_matches_reference(a, b, dtype=b.dtype, name=f"fisher[{i}]")


MODES = [("dfg", 0.0), ("dfg", 0.9), ("ewc", 0.0), ("l2", 0.0)]


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode,ema", MODES)
@pytest.mark.parametrize("normalize", [None, "mean"])
def test_matches_reference(backend, device, dtype, mode, ema, normalize):
    shapes = odd_shapes(23, seed=1) + [(70001,), (3, 257, 129)]
    ref, out = run_both(backend, shapes, dtype, device, mode, ema, normalize)
    check(ref, out, dtype)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_fisher_with_16bit_grads(backend, device, dtype):
    for mode, ema in [("ewc", 0.0), ("dfg", 0.5)]:
        ref, out = run_both(backend, [(1001,), (17, 3)], dtype, device, mode, ema, fisher_dtype=torch.float32)
        check(ref, out, dtype)


@pytest.mark.parametrize("backend,device", CASES)
def test_many_tensors_zero_d_and_empty(backend, device):
    from mgcl.bench.fisher_guard import vit_b16_shapes

    shapes = vit_b16_shapes(0.002) + [(), (), (0,), (5, 0)]
    assert len(shapes) >= 300
    for mode, ema in MODES:
        ref, out = run_both(backend, shapes, torch.float32, device, mode, ema, "mean" if mode == "dfg" else None)
        check(ref, out, torch.float32)


@pytest.mark.parametrize("backend", [None] + list(BACKENDS))
def test_empty_list_for_every_backend_name(backend):
    # no tensors, no device: nothing to run, whichever backend is named and whether or not it runs here
    for mode, fisher in (("dfg", None), ("ewc", []), ("l2", None)):
        pen = fisher_guard([], [], [], lam=1.0, mode=mode, fisher=fisher, backend=backend)
        assert pen.shape == () and pen.dtype == torch.float32 and float(pen) == 0.0


def test_empty_list_still_checks_the_name():
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        fisher_guard([], [], [], lam=1.0, backend="bogus")
    with pytest.raises(ValueError, match="'chunked' .* known but not offered"):
        fisher_guard([], [], [], lam=1.0, backend="chunked")
    with pytest.raises(ValueError, match="lam"):
        fisher_guard([], [], [], lam=float("nan"))


def test_known_values():
    g = [torch.tensor([1.0, -2.0, 0.5])]
    p = [torch.tensor([1.0, 1.0, 1.0])]
    a = [torch.tensor([0.0, 2.0, 1.0])]
    # dfg: W = g^2 = [1, 4, .25]; d = [1, -1, 0]; grad += 2*lam*W*d; pen = lam*sum(W d^2)
    for backend in ["torch"] + CPU_FAST:
        gg = [g[0].clone()]
        pen = fisher_guard(gg, p, a, lam=0.5, backend=backend)
        assert torch.allclose(gg[0], torch.tensor([2.0, -6.0, 0.5]))
        assert float(pen) == pytest.approx(0.5 * (1 + 4))
        gg = [g[0].clone()]
        pen = fisher_guard(gg, p, a, lam=0.5, normalize="mean", backend=backend)
        mean_w = (1 + 4 + 0.25) / 3
        assert torch.allclose(gg[0], torch.tensor([1 + 1 / mean_w, -2 - 4 / mean_w, 0.5]))
        assert float(pen) == pytest.approx(0.5 * 5 / mean_w, rel=1e-6)
        # zero mean -> W = 0: no change, zero penalty
        gz = [torch.zeros(3)]
        pen = fisher_guard(gz, p, a, lam=0.5, normalize="mean", backend=backend)
        assert torch.equal(gz[0], torch.zeros(3)) and float(pen) == 0.0
        # ema: fisher <- .75*f + .25*g^2, W = fisher
        f = [torch.tensor([4.0, 0.0, 1.0])]
        gg = [g[0].clone()]
        fisher_guard(gg, p, a, lam=0.5, fisher=f, ema=0.75, backend=backend)
        assert torch.allclose(f[0], torch.tensor([3.25, 1.0, 0.8125]))
        assert torch.allclose(gg[0], torch.tensor([1 + 3.25, -2 - 1.0, 0.5]))


@pytest.mark.parametrize("backend", ["torch"] + [b for b, _ in CASES])
def test_normalize_mean_when_the_sum_of_w_passes_float32s_range(backend):
    """(issue 15) sum(g**2) = 2.9e39 > float32's 3.4e38 while mean(g**2) = 2.9e34 is fine:
    W = g**2 / mean = 1 everywhere, so the penalty is l2's, on every backend."""
    dev = "cuda" if backend == "cuda" else "cpu"
    n = 100_000
    g = torch.full((n,), 1.7e17, device=dev)
    p = torch.randn(n, generator=torch.Generator().manual_seed(8)).to(dev)
    a = torch.zeros(n, device=dev)
    pen = fisher_guard([g.clone()], [p], [a], lam=0.5, normalize="mean", backend=backend)
    want = fisher_guard([g.clone()], [p], [a], lam=0.5, mode="l2", backend="torch")
    assert float(want) > 1e4
    torch.testing.assert_close(pen.cpu(), want.cpu(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend,device", CASES)
def test_nan_and_inf_propagate_like_reference(backend, device):
    for mode, ema in MODES:
        grads, params, anchors, fisher = make([(257,), (5, 7)], torch.float32, device, seed=3)
        grads[0][3] = float("nan")
        params[0][10] = float("inf")
        anchors[1][2, 2] = float("-inf")
        fisher[0][20] = float("nan")
        outs = []
        for b in ("torch", backend):
            g, f = clone(grads), clone(fisher)
            pen = fisher_guard(g, params, anchors, lam=0.5, mode=mode, ema=ema,
                               fisher=f if (mode == "ewc" or ema) else None, backend=b)
            outs.append((g, f, pen))
        (g_r, f_r, p_r), (g_o, f_o, p_o) = outs
        assert torch.isnan(p_r) == torch.isnan(p_o) and torch.isinf(p_r) == torch.isinf(p_o)
        for a, b in zip(g_o, g_r):
            assert torch.equal(torch.isnan(a), torch.isnan(b)), mode
            assert torch.equal(torch.isinf(a), torch.isinf(b)), mode
            fin = torch.isfinite(b)
            torch.testing.assert_close(a[fin], b[fin], rtol=1e-5, atol=1e-5)
        for a, b in zip(f_o, f_r):
            assert torch.equal(torch.isnan(a), torch.isnan(b))


# ---- bad input: ValueError naming the index, nothing modified ------------------------------

def _bad_cases():
    def base():
        g = [torch.randn(4), torch.randn(3, 2), torch.randn(5)]
        return g, [torch.randn_like(t) for t in g], [torch.randn_like(t) for t in g], [torch.rand_like(t) for t in g]

    def shape(g, p, a, f):
        p[1] = torch.randn(2, 3)
        return dict(grads=g, params=p, anchors=a), "params\\[1\\]"

    def length(g, p, a, f):
        return dict(grads=g, params=p[:2], anchors=a), "lengths"

    def device(g, p, a, f):
        a[2] = torch.randn(5, device="meta")
        return dict(grads=g, params=p, anchors=a), "anchors\\[2\\]"

    def dtype(g, p, a, f):
        p[2] = p[2].double()
        return dict(grads=g, params=p, anchors=a), "params\\[2\\]"

    def noncontig(g, p, a, f):
        g[1] = torch.randn(2, 3).t()
        return dict(grads=g, params=p, anchors=a), "params\\[1\\] has strides \\(2, 1\\), grads\\[1\\] \\(1, 3\\)"

    def aliased(g, p, a, f):
        buf = torch.randn(6)
        g[1], p[1] = buf[:6].view(3, 2), buf[:6].view(3, 2)
        return dict(grads=g, params=p, anchors=a), "grads\\[1\\] and params\\[1\\] overlap in memory"

    def no_fisher(g, p, a, f):
        return dict(grads=g, params=p, anchors=a, mode="ewc"), "fisher"

    def no_fisher_ema(g, p, a, f):
        return dict(grads=g, params=p, anchors=a, ema=0.5), "fisher"

    def fisher_shape(g, p, a, f):
        f[2] = torch.rand(6)
        return dict(grads=g, params=p, anchors=a, mode="ewc", fisher=f), "fisher\\[2\\]"

    def neg_lam(g, p, a, f):
        return dict(grads=g, params=p, anchors=a, lam=-1.0), "lam"

    def bad_mode(g, p, a, f):
        return dict(grads=g, params=p, anchors=a, mode="fisher"), "mode"

    def bad_normalize(g, p, a, f):
        return dict(grads=g, params=p, anchors=a, normalize="max"), "normalize"

    def unsupported_dtype(g, p, a, f):
        return dict(grads=[t.double() for t in g], params=[t.double() for t in p], anchors=[t.double() for t in a]), "dtype"

    for fn in (shape, length, device, dtype, noncontig, aliased, no_fisher, no_fisher_ema, fisher_shape, neg_lam, bad_mode,
               bad_normalize, unsupported_dtype):
        yield pytest.param(base, fn, id=fn.__name__)


@pytest.mark.parametrize("base,mutate", list(_bad_cases()))
@pytest.mark.parametrize("backend", ["torch", None])
def test_bad_input_raises_and_modifies_nothing(base, mutate, backend):
    g, p, a, f = base()
    kwargs, pattern = mutate(g, p, a, f)
    kwargs.setdefault("lam", 1.0)
    before = {k: [t.clone() for t in v] for k, v in kwargs.items() if isinstance(v, list) and v and v[0].device.type != "meta"}
    with pytest.raises(ValueError, match=pattern):
        fisher_guard(**kwargs, backend=backend)
    for k, ts in before.items():
        for t0, t1 in zip(ts, kwargs[k]):
            if t1.device.type != "meta":
                assert torch.equal(t0, t1), f"{k} was modified"


# ---- memory layouts: any dense layout shared by the four tensors of an index ----------------

def _layouts():
    """(name, shape, relayout(contiguous tensor) -> the same values in a dense non-contiguous layout)."""
    return [
        ("channels_last", (4, 6, 5, 3), lambda t: t.contiguous(memory_format=torch.channels_last)),
        ("transposed", (7, 9), lambda t: t.t().contiguous().t()),
        ("permuted", (3, 4, 5), lambda t: t.permute(2, 0, 1).contiguous().permute(1, 2, 0)),
    ]


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("layout", [x[0] for x in _layouts()])
@pytest.mark.parametrize("mode,ema", MODES)
def test_dense_non_contiguous_layouts_match_reference(backend, device, layout, mode, ema):
    _, shape, relayout = next(x for x in _layouts() if x[0] == layout)
    grads, params, anchors, fisher = ([relayout(ts[0]), ts[1]] for ts in make([shape, (11,)], torch.float32, device,
                                                                             seed=4))
    assert not grads[0].is_contiguous() and grads[0].stride() == params[0].stride()
    uses_f = mode == "ewc" or ema > 0
    outs = []
    for b in ("torch", backend):
        g, f = [t.clone(memory_format=torch.preserve_format) for t in grads], [t.clone() for t in fisher]
        pen = fisher_guard(g, params, anchors, lam=0.4, mode=mode, ema=ema, fisher=f if uses_f else None,
                           normalize="mean", backend=b)
        outs.append((g, f, pen))
    (g_r, f_r, p_r), (g_o, f_o, p_o) = outs
    torch.testing.assert_close(p_o, p_r, rtol=1e-5, atol=0)
    for a, b in zip(g_o + f_o, g_r + f_r):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and the same numbers as on contiguous copies
    g_c = [t.contiguous() for t in grads]
    f_c = [t.contiguous() for t in fisher]
    pen_c = fisher_guard(g_c, [t.contiguous() for t in params], [t.contiguous() for t in anchors], lam=0.4,
                         mode=mode, ema=ema, fisher=f_c if uses_f else None, normalize="mean", backend="torch")
    torch.testing.assert_close(p_r, pen_c, rtol=1e-5, atol=0)
    torch.testing.assert_close(g_r[0], g_c[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch"] + CPU_FAST)
def test_layouts_that_cannot_run_are_refused(backend):
    base = torch.randn(6, 4)
    cases = [
        ("expanded", lambda t: torch.randn(1, 4).expand(6, 4), "grads\\[0\\] is not dense"),
        ("strided", lambda t: torch.randn(12, 4)[::2], "grads\\[0\\] is not dense"),
        ("mixed layouts", lambda t: t.t().contiguous().t(), "grads\\[0\\] .*share one memory layout"),
    ]
    for name, bad, pattern in cases:
        g = [bad(base.clone())]
        with pytest.raises(ValueError, match=pattern):
            fisher_guard(g, [base.clone()], [base.clone()], lam=1.0, backend=backend)


# ---- the prepared path (FisherGuard's): validated once, a pointer check per call -------------

@pytest.fixture(params=["native", "numpy"])
def overlap_check(request, monkeypatch):
    """The re-check of new grads' overlap: the C++ loop (mgcl._C), or its numpy rule where _C is absent."""
    from mgcl.ops.fisher_guard import native

    if request.param == "native":
        if native._first_overlap_c is None:
            pytest.skip("mgcl._C not built")
    else:
        monkeypatch.setattr(native, "_first_overlap_c", None)
    return request.param


def test_prepared_matches_the_op_and_rechecks_new_grads(overlap_check):
    from mgcl.ops.fisher_guard import Prepared

    grads, params, anchors, fisher = make([(33,), (4, 5), (0,), (2, 3, 4)], torch.float32, "cpu", seed=5)
    for mode, ema in MODES:
        f_p, f_o = clone(fisher), clone(fisher)
        uses_f = mode == "ewc" or ema > 0
        prep = Prepared(params, anchors, f_p if uses_f else None, lam=0.3, mode=mode, ema=ema, normalize="mean")
        for step in range(3):  # the same grads twice, then new ones
            g = grads if step < 2 else clone(grads)
            g_o = clone(g)
            pen_p = prep(g)
            pen_o = fisher_guard(g_o, params, anchors, lam=0.3, mode=mode, ema=ema, fisher=f_o if uses_f else None,
                                 normalize="mean")
            assert torch.equal(pen_p, pen_o)
            assert all(torch.equal(a, b) for a, b in zip(g, g_o))
            assert all(torch.equal(a, b) for a, b in zip(f_p, f_o))
        # new grads that alias a param, or each other, or change layout: the op's errors
        bad = clone(grads)
        bad[1] = params[1]
        with pytest.raises(ValueError, match="overlap in memory"):
            prep(bad)
        buf = torch.zeros(40)
        bad = clone(grads)
        bad[0], bad[1] = buf[:33], buf[7:27].view(4, 5)
        with pytest.raises(ValueError, match="grads\\[0\\] and grads\\[1\\] overlap in memory"):
            prep(bad)
        bad = clone(grads)
        bad[1] = torch.randn(5, 4).t()
        with pytest.raises(ValueError, match="share one memory layout"):
            prep(bad)
        bad = clone(grads)
        bad[3] = None
        with pytest.raises(ValueError, match="None"):
            prep(bad)
        f_o = clone(f_p)  # nothing was changed by the refused calls
        assert torch.equal(prep(clone(grads)), fisher_guard(clone(grads), params, anchors, lam=0.3, mode=mode,
                                                            ema=ema, fisher=f_o if uses_f else None, normalize="mean"))


def test_address_comparison_fallback_agrees_with_torchs():
    from mgcl.ops.fisher_guard import _addresses_equal, _python_addresses_equal

    ts = [torch.randn(3), torch.zeros(0), torch.randn(2, 2).t()]
    ptrs = [t.data_ptr() for t in ts]
    for addresses in (ptrs, [ptrs[0] + 4, *ptrs[1:]], [*ptrs[:2], 0]):
        for indices in ([0, 1, 2], [1, 2], []):
            assert _addresses_equal(ts, addresses, indices) == _python_addresses_equal(ts, addresses, indices)


def _first_overlap_by_pairs(start, nbytes, fixed):
    """The overlap rule spelt out: every pair of sized spans, and every span against every fixed one;
    the set of spans that overlap something."""
    spans = [(s, s + b) for s, b in zip(start, nbytes)]
    hits = set()
    for i, (s, e) in enumerate(spans):
        if s == e:
            continue
        if any(j != i and t < f and s < f and t < e for j, (t, f) in enumerate(spans)) or \
                any(s < f and t < e for t, f in fixed):
            hits.add(i)
    return hits


@pytest.mark.skipif(getattr(_native._C, "fisher_guard_first_overlap", None) is None, reason="mgcl._C not built")
def test_overlap_recheck_native_equals_numpy_and_the_pairwise_rule():
    """native.first_overlap (numpy) and the C++ loop return the same index on random
    span sets (touching, nested, equal starts, empty spans, below / between / above
    the fixed spans); -1 exactly when no pair overlaps, else a span that does."""
    from mgcl.ops.fisher_guard import native

    rng = np.random.default_rng(0)
    for trial in range(400):
        m = int(rng.integers(0, 5))
        edges = np.sort(rng.choice(np.arange(0, 400, 2), size=2 * m, replace=False)).reshape(-1, 2) \
            if m else np.zeros((0, 2), dtype=np.int64)
        fs, fe = edges[:, 0].astype(np.int64).copy(), edges[:, 1].astype(np.int64).copy()
        n = int(rng.integers(1, 9))
        spread = 60 if trial % 2 else 420  # crowded (overlaps likely) or sparse
        start = rng.integers(0, spread, size=n).astype(np.int64)
        nbytes = rng.integers(0, 12, size=n).astype(np.int64) * (rng.random(n) > 0.15)
        if trial % 3 == 0:  # spans that touch end to start: never an overlap
            start = np.cumsum(np.concatenate([[int(rng.integers(0, 400))], nbytes[:-1]])).astype(np.int64)
        got_c = _native._C.fisher_guard_first_overlap(start.ctypes.data, nbytes.ctypes.data, n, fs.ctypes.data,
                                                      fe.ctypes.data, len(fs))
        got_np = native.first_overlap(start, nbytes, fs, fe)
        assert got_c == got_np, (trial, start, nbytes, edges)
        hits = _first_overlap_by_pairs(start.tolist(), nbytes.tolist(), edges.tolist())
        assert (got_c == -1) == (not hits) and (got_c == -1 or got_c in hits), (trial, start, nbytes, edges)


def test_prepared_unchanged_path_repoints_when_a_param_or_a_grad_moves():
    """The no-re-check step (every address as validated) is taken only while
    nothing moved: a param re-pointed by ``.data =``, a grad whose storage was
    swapped by ``set_`` (same object), or a None grad each leave it."""
    from mgcl.ops.fisher_guard import Prepared

    grads, params, anchors, _ = make([(33,), (4, 5), (0,), (2, 3, 4)], torch.float32, "cpu", seed=6)
    prep = Prepared(params, anchors, None, lam=0.3, mode="dfg", ema=0.0, normalize=None)

    def want(g):
        g_o = clone(g)
        return fisher_guard(g_o, prep.params, anchors, lam=0.3), g_o

    g = clone(grads)
    assert prep.if_unchanged(g) is None  # nothing validated yet
    pen_o, g_o = want(g)
    assert torch.equal(prep(g), pen_o) and all(map(torch.equal, g, g_o))
    pen_o, g_o = want(g)
    pen = prep.if_unchanged(g)  # the same grads and params: no re-check
    assert pen is not None and torch.equal(pen, pen_o) and all(map(torch.equal, g, g_o))
    prep.params[1].data = prep.params[1].data + 1.0  # a param moved
    assert prep.if_unchanged(g) is None
    pen_o, g_o = want(g)
    assert torch.equal(prep(g), pen_o) and all(map(torch.equal, g, g_o))
    g[3].set_(torch.randn(2, 3, 4))  # a grad's storage swapped, the object kept
    assert prep.if_unchanged(g) is None
    pen_o, g_o = want(g)
    assert torch.equal(prep(g), pen_o) and all(map(torch.equal, g, g_o))
    assert prep.if_unchanged([*g[:2], None, g[3]]) is None  # a None grad: the full path names it
    assert prep.if_unchanged(g) is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_misaligned_views_fall_back_to_scalar_path(dtype):
    flat = torch.randn(10_003, device="cuda").to(dtype)
    views = [flat[1:5001], flat[5001:10_003]]  # odd offsets: not 16-byte aligned
    params = [torch.randn_like(v) for v in views]
    anchors = [torch.randn_like(v) for v in views]
    g_ref = clone(views)
    pen_ref = fisher_guard(g_ref, params, anchors, lam=0.3, backend="torch")
    pen = fisher_guard(views, params, anchors, lam=0.3, backend="cuda")
    check((g_ref, [], pen_ref), (views, [], pen), dtype)


@pytest.mark.gpu
def test_cuda_is_deterministic_and_cached_meta_reused():
    grads, params, anchors, _ = make([(100_003,), (7, 9)], torch.float32, "cuda")
    pens = []
    for _ in range(3):
        g = clone(grads)
        pens.append(float(fisher_guard(g, params, anchors, lam=0.5, normalize="mean", backend="cuda")))
    assert pens[0] == pens[1] == pens[2]


@pytest.mark.gpu
def test_cuda_prepared_repoints_when_addresses_change():
    from mgcl.ops.fisher_guard import Prepared

    grads, params, anchors, _ = make([(70_001,), (7, 9)], torch.float32, "cuda", seed=6)
    prep = Prepared(params, anchors, None, lam=0.5, mode="dfg", ema=0.0, normalize="mean", backend="cuda")
    for step in range(4):
        g = clone(grads)  # new addresses every step (a loop that sets grads to None)
        g_ref = clone(grads)
        pen = prep(g)
        pen_ref = fisher_guard(g_ref, params, anchors, lam=0.5, normalize="mean", backend="torch")
        check((g_ref, [], pen_ref), (g, [], pen), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_tensors_on_a_gpu_that_is_not_the_current_one():
    grads, params, anchors, _ = make([(1000,), (3, 7)], torch.float32, "cuda:1", seed=7)
    g_ref = clone(grads)
    with torch.cuda.device(0):
        pen = fisher_guard(grads, params, anchors, lam=0.5, backend="cuda")
    pen_ref = fisher_guard(g_ref, params, anchors, lam=0.5, backend="torch")
    assert pen.device == torch.device("cuda:1")
    check((g_ref, [], pen_ref), (grads, [], pen), torch.float32)
