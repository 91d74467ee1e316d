"""fisher_guard: every available backend against the reference."""

import pytest
import torch

from conftest import HAS_GPU, available_backends
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


@pytest.mark.parametrize("backend", ["torch"] + [b for b, _ in CASES])
def test_empty_list(backend):
    dev = "cuda" if backend == "cuda" else "cpu"
    pen = fisher_guard([], [], [], lam=1.0, backend=backend if dev == "cpu" or HAS_GPU else "torch")
    assert pen.shape == () and float(pen) == 0.0


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
        return dict(grads=g, params=p, anchors=a), "grads\\[1\\]"

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

    for fn in (shape, length, device, dtype, noncontig, no_fisher, no_fisher_ema, fisher_shape, neg_lam, bad_mode,
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


def test_custom_op_registration():
    grads, params, anchors, fisher = make([(7,), (3, 5)], torch.float32, "cpu")
    op = torch.ops.mgcl.fisher_guard.default
    for backend in ["torch"] + CPU_FAST:
        for mode in ("dfg", "ewc", "l2"):
            args = (clone(grads), params, anchors, clone(fisher) if mode == "ewc" else [], 0.5, mode, 0.0, "", backend)
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


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
