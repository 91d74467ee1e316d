"""contrastive_distill: every available backend against the reference, gradients,
invariants, the open_clip oracle, bad input, the torch.library op."""
import math

import pytest
import torch

from conftest import available_backends
from mgcl.ops import contrastive_distill as cd_mod
from mgcl.ops.contrastive_distill import BACKENDS, chunked, contrastive_distill, reference
from mgcl.testing import TOLERANCES, distill_batch

# Triton warns about block pointers in every interpreted launch (see triton.py)
pytestmark = pytest.mark.filterwarnings("ignore:tl.make_block_ptr is deprecated")

CPU_FAST = [b for b in available_backends(BACKENDS, "cpu") if b != "torch"]
HAS_TRITON_CPU = "triton" in CPU_FAST

# (kd, cmc, i2t, t2i, weighted)
CONFIGS = {
    "kd+cmc+weights": (1.0, 0.25, 0.7, 1.3, True),
    "kd+cmc": (1.0, 0.25, 1.0, 1.0, False),
    "kd-only": (1.0, 0.0, 1.0, 1.0, False),
    "cmc-only": (0.0, 1.0, 1.0, 1.0, False),
    "i2t-only": (1.0, 0.0, 1.0, 0.0, True),
    "t2i-only": (2.0, 0.0, 0.0, 1.0, True),
}


def weights(B, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed + 100)
    w = 2 * torch.rand(B, generator=g)
    w[::5] = 0.0  # some pairs switched off
    return w.to(device=device, dtype=dtype)


def run(backend, feats, scale_s=14.3, scale_t=25.0, kd=1.0, cmc=0.0, i2t=1.0, t2i=1.0, w=None, v=None, grad=True):
    """(loss, d_img, d_txt, d_scale) from ``backend``."""
    img, txt, img_t, txt_t = feats
    x = img.clone().requires_grad_(grad)
    y = txt.clone().requires_grad_(grad)
    s = torch.tensor(scale_s, dtype=torch.float32 if img.dtype != torch.float64 else torch.float64,
                     device=img.device, requires_grad=grad)
    loss = contrastive_distill(x, y, img_t, txt_t, s, scale_t, kd=kd, cmc=cmc, i2t=i2t, t2i=t2i, row_weight=w,
                               col_weight=v, backend=backend)
    if not grad:
        return (loss,)
    loss.backward()
    return loss.detach(), x.grad, y.grad, s.grad


def rel_err(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def assert_rel(out, ref, rtol, what=""):
    names = ("loss", "d_img", "d_txt", "d_scale")
    for name, a, b in zip(names, out, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        assert torch.isfinite(a).all(), f"{what} {name} is not finite"
        if float(b.abs().max()) < 1e-12:  # B = 1: float32 rounding of logits of size ~10 is ~1e-6
            assert float(a.abs().max()) < 1e-6, f"{what} {name}: {a} vs zero"
            continue
        err = rel_err(a, b)
        assert err <= rtol, f"{what} {name}: relative error {err:.3g} > {rtol}"


def fast_cases():
    cases = []
    for b in CPU_FAST:
        cases.append(pytest.param(b, None, id=b))
    if "chunked" in CPU_FAST:
        cases.append(pytest.param("chunked", 1000, id="chunked-small-blocks"))
    return cases


@pytest.mark.parametrize("backend,block_elems", fast_cases())
@pytest.mark.parametrize("B", [1, 7, 64, 257])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_reference_fp32(backend, block_elems, B, config, monkeypatch):
    if block_elems is not None:
        monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", block_elems)
    kd, cmc, i2t, t2i, weighted = CONFIGS[config]
    d, dt = (33, None) if B != 64 else (19, 45)  # teacher dim differs from the student's at B = 64
    feats = distill_batch(B, d, dt, seed=B)
    w = weights(B, 1) if weighted else None
    v = weights(B, 2) if weighted else None
    kw = dict(kd=kd, cmc=cmc, i2t=i2t, t2i=t2i, w=w, v=v)
    ref = run("torch", feats, **kw)
    out = run(backend, feats, **kw)
    assert_rel(out, ref, TOLERANCES[torch.float32][0], f"{backend} B={B} {config}")


@pytest.mark.parametrize("backend", CPU_FAST)
def test_large_scale_and_nonunit_features(backend):
    """Logit scale 100 (a trained CLIP) and features that are not unit norm."""
    feats = distill_batch(96, 41, seed=5)
    feats = (feats[0] * 1.7, feats[1] * 0.6, feats[2], feats[3] * 2.0)
    kw = dict(scale_s=100.0, scale_t=60.0, kd=1.0, cmc=0.5, w=weights(96, 3), v=weights(96, 4))
    assert_rel(run(backend, feats, **kw), run("torch", feats, **kw), 1e-5, backend)


@pytest.mark.skipif("chunked" not in CPU_FAST, reason="chunked unavailable")
def test_16bit_inputs_on_cpu_match_upcast_reference():
    """Mixed precisions: bf16 student, fp32 teacher; the math is fp32 in both."""
    img, txt, img_t, txt_t = distill_batch(50, 24, seed=9)
    feats = (img.bfloat16(), txt.bfloat16(), img_t, txt_t)
    kw = dict(kd=1.0, cmc=0.25)
    out, ref = run("chunked", feats, **kw), run("torch", feats, **kw)
    assert out[1].dtype == torch.bfloat16
    assert_rel(out[:1] + out[3:], ref[:1] + ref[3:], 1e-5)
    assert_rel(out[1:3], ref[1:3], TOLERANCES[torch.bfloat16][0])


# ---- float64 gradcheck ----------------------------------------------------------------------

@pytest.mark.parametrize("backend,block", [("torch", None), ("chunked", None), ("chunked", 2)])
def test_gradcheck_float64(backend, block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", block * 6)  # 2-row chunks of the 6 x 6 block
    img, txt, img_t, txt_t = distill_batch(6, 5, seed=11, dtype=torch.float64)
    w, v = weights(6, 5, torch.float64), weights(6, 6, torch.float64)
    x = img.clone().requires_grad_()
    y = txt.clone().requires_grad_()
    s = torch.tensor(3.7, dtype=torch.float64, requires_grad=True)

    def f(x, y, s):
        return contrastive_distill(x, y, img_t, txt_t, s, 4.1, kd=1.3, cmc=0.4, i2t=0.8, t2i=1.1, row_weight=w,
                                   col_weight=v, backend=backend)

    assert torch.autograd.gradcheck(f, (x, y, s), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch"] + CPU_FAST)
def test_double_backward(backend):
    """create_graph=True (issue 15): the fused backends give the gradient with its
    graph (re-derived through the reference), so a gradient penalty trains."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    img, txt, img_t, txt_t = distill_batch(9, 7, seed=14, dtype=dtype)
    w = weights(9, 7, dtype)
    outs = []
    for b in ("torch", backend):
        x, y = img.clone().requires_grad_(), txt.clone().requires_grad_()
        s = torch.tensor(4.0, dtype=dtype, requires_grad=True)
        loss = contrastive_distill(x, y, img_t, txt_t, s, 5.0, kd=1.0, cmc=0.3, row_weight=w, backend=b)
        gx, gs = torch.autograd.grad(loss, [x, s], create_graph=True)
        assert gx.requires_grad and gs.requires_grad
        ((gx**2).sum() + gs**2).backward()
        outs.append((gx.detach(), x.grad, y.grad, s.grad))
    for a, b in zip(*outs):
        assert rel_err(a, b) <= (1e-5 if dtype == torch.float32 else 1e-12)
    if dtype == torch.float64:
        def f(x, y, s):
            return contrastive_distill(x, y, img_t, txt_t, s, 5.0, kd=1.0, cmc=0.3, row_weight=w, backend=backend)

        args = (img.clone().requires_grad_(), txt.clone().requires_grad_(),
                torch.tensor(4.0, dtype=dtype, requires_grad=True))
        assert torch.autograd.gradgradcheck(f, args)


def test_default_dispatch_follows_the_declared_crossover():
    """Below CHUNKED_MIN_BATCH the dense reference is faster on the CPU (measured by
    `mgcl bench contrastive_distill`), so the default picks it; an explicit
    backend= still runs chunked."""
    from mgcl import _backend

    n = cd_mod.CHUNKED_MIN_BATCH
    for B, want in ((1, "torch"), (n - 1, "torch"), (n, "chunked"), (4 * n, "chunked")):
        assert _backend.select("contrastive_distill", BACKENDS, "cpu", dtypes=(torch.float32,), B=B) == want
    assert _backend.select("contrastive_distill", BACKENDS, "cpu", "chunked", dtypes=(torch.float32,), B=2) == "chunked"
    assert str(n) in _backend.describe(BACKENDS)[1]["prefer"]
    # the call passes its batch: a small call really runs the reference (a graph through its ops)
    img, txt, img_t, txt_t = distill_batch(12, 5, seed=1)
    x = img.clone().requires_grad_()
    loss = contrastive_distill(x, txt, img_t, txt_t, 3.0, 4.0)
    assert "mgcl" not in type(loss.grad_fn).__name__.lower()
    loss = contrastive_distill(x, txt, img_t, txt_t, 3.0, 4.0, backend="chunked")
    assert "mgcl" in type(loss.grad_fn).__name__.lower()


# ---- invariants ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch"] + CPU_FAST)
def test_teacher_equals_student_gives_zero_kd(backend):
    img, txt, _, _ = distill_batch(37, 21, seed=3)
    x, y = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s = torch.tensor(12.0, requires_grad=True)
    loss = contrastive_distill(x, y, img, txt, s, 12.0, kd=1.0, cmc=0.0, row_weight=weights(37, 8), backend=backend)
    loss.backward()
    assert abs(loss.item()) <= 1e-6
    for g in (x.grad, y.grad, s.grad):
        assert float(g.abs().max()) <= 1e-7
    # with the CMC term on, only the CLIP part remains
    both = run(backend, (img, txt, img, txt), scale_s=12.0, scale_t=12.0, kd=1.0, cmc=0.5)
    clip = run(backend, (img, txt, img, txt), scale_s=12.0, scale_t=12.0, kd=0.0, cmc=0.5)
    assert_rel(both, clip, 1e-6, "kd on top of equal teacher")


@pytest.mark.parametrize("backend", ["torch"] + CPU_FAST)
@pytest.mark.parametrize("kd,cmc", [(1.0, 0.0), (0.0, 1.0), (1.0, 0.25)])
def test_single_pair_gives_exactly_zero(backend, kd, cmc):
    # B = 1: every softmax is over one entry, so KL and CE are 0 and so is every
    # gradient; the fused paths must not leave rounding residue (the diagonal
    # logit comes from the same products as its log-sum-exp).
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        img, txt, img_t, txt_t = (torch.nn.functional.normalize(torch.randn(1, 19, generator=g), dim=1)
                                  for _ in range(4))
        img.requires_grad_()
        txt.requires_grad_()
        scale = torch.tensor(100.0, requires_grad=True)
        loss = contrastive_distill(img, txt, img_t, txt_t, scale, 90.0, kd=kd, cmc=cmc, backend=backend)
        grads = torch.autograd.grad(loss, [img, txt, scale])
        assert loss.item() == 0.0
        assert all(gr.abs().max().item() == 0.0 for gr in grads)


@pytest.mark.parametrize("backend", ["torch"] + CPU_FAST)
def test_zero_weights_remove_rows_and_columns_exactly(backend):
    img, txt, img_t, txt_t = distill_batch(23, 16, seed=4)
    w = weights(23, 10)  # zero at rows 0, 5, 10, 15, 20
    off = w == 0
    # i2t only: row i of T only enters r_i, so a zero-weight row's teacher can be anything
    img_t2 = img_t.clone()
    img_t2[off] = 7.0 * torch.randn(int(off.sum()), 16)
    a = run(backend, (img, txt, img_t, txt_t), kd=1.0, cmc=0.0, t2i=0.0, w=w)
    b = run(backend, (img, txt, img_t2, txt_t), kd=1.0, cmc=0.0, t2i=0.0, w=w)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # t2i only: column j of T only enters c_j
    txt_t2 = txt_t.clone()
    txt_t2[off] = 7.0 * torch.randn(int(off.sum()), 16)
    a = run(backend, (img, txt, img_t, txt_t), kd=1.0, cmc=0.0, i2t=0.0, v=w)
    b = run(backend, (img, txt, img_t, txt_t2), kd=1.0, cmc=0.0, i2t=0.0, v=w)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # and all-zero weights leave nothing
    z = run(backend, (img, txt, img_t, txt_t), kd=1.0, cmc=0.0, w=torch.zeros(23), v=torch.zeros(23))
    assert all(float(t.abs().max()) == 0.0 for t in z)


@pytest.mark.parametrize("backend", ["torch"] + CPU_FAST)
def test_known_values_b2(backend):
    """B = 2, d = 1: logits small enough to write down."""
    img = torch.tensor([[1.0], [-1.0]])
    txt = torch.tensor([[1.0], [0.5]])
    # S = 2 * [[1, .5], [-1, -.5]]; T = 0 (uniform teacher)
    S = 2.0 * img @ txt.T
    lq_r, lq_c = S.log_softmax(1), S.log_softmax(0)
    kl_r = (0.5 * (math.log(0.5) - lq_r)).sum(1)
    kl_c = (0.5 * (math.log(0.5) - lq_c)).sum(0)
    ce = -lq_r.diagonal().sum() - lq_c.diagonal().sum()
    want = (kl_r.sum() + kl_c.sum()) / 2 + 0.5 * ce / 2
    got = contrastive_distill(img, txt, torch.zeros(2, 3), torch.zeros(2, 3), 2.0, 1.0, kd=1.0, cmc=0.5,
                              backend=backend)
    assert float(got) == pytest.approx(float(want), rel=1e-6)


# ---- external oracle: open_clip ----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch"] + CPU_FAST)
def test_open_clip_distill_clip_loss_oracle(backend):
    loss_mod = pytest.importorskip("open_clip.loss")
    img, txt, img_t, txt_t = distill_batch(29, 24, seed=6)
    s_val, t_val = 11.0, 17.0
    oc = loss_mod.DistillClipLoss()

    x, y = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s = torch.tensor(s_val, requires_grad=True)
    out = oc(x, y, s, img_t, txt_t, torch.tensor(t_val), output_dict=True)
    out["distill_loss"].backward()
    oc_grads = (x.grad, y.grad, s.grad)
    # open_clip: (soft-CE rows mean + soft-CE cols mean) / 2, soft-CE = KL + teacher entropy
    ours = run(backend, (img, txt, img_t, txt_t), scale_s=s_val, scale_t=t_val, kd=1.0, cmc=0.0)
    for a, b in zip(ours[1:], oc_grads):
        assert rel_err(a, 2 * b) <= 1e-5
    T = t_val * img_t @ txt_t.T
    ent = -(T.softmax(1) * T.log_softmax(1)).sum() - (T.softmax(0) * T.log_softmax(0)).sum()
    assert float(ours[0]) == pytest.approx(float(2 * out["distill_loss"] - ent / 29), rel=1e-5)
    # CMC: open_clip's contrastive loss is the mean of the two CE directions
    cmc = run(backend, (img, txt, img_t, txt_t), scale_s=s_val, scale_t=t_val, kd=0.0, cmc=1.0, grad=False)[0]
    assert float(cmc) == pytest.approx(2 * float(out["contrastive_loss"]), rel=1e-5)


# ---- NaN, no-grad, bad input ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch"] + CPU_FAST)
@pytest.mark.parametrize("where", ["img_s", "txt_s", "img_t", "txt_t"])
def test_nan_features_give_nan_loss(backend, where):
    feats = list(distill_batch(9, 7, seed=2))
    k = ("img_s", "txt_s", "img_t", "txt_t").index(where)
    feats[k] = feats[k].clone()
    feats[k][4, 3] = float("nan")
    loss = run(backend, feats, kd=1.0, cmc=0.25, grad=False)[0]
    assert torch.isnan(loss)


@pytest.mark.parametrize("backend", CPU_FAST)
def test_no_grad_and_inference_give_the_same_loss(backend):
    feats = distill_batch(31, 10, seed=8)
    with_grad = run(backend, feats, kd=1.0, cmc=0.3)[0]
    with torch.no_grad():
        plain = run(backend, feats, kd=1.0, cmc=0.3, grad=False)[0]
    with torch.inference_mode():
        inf = run(backend, feats, kd=1.0, cmc=0.3, grad=False)[0]
    assert float(plain) == float(with_grad) == float(inf)
    assert not plain.requires_grad


@pytest.mark.parametrize("backend", CPU_FAST)
def test_float_scale_and_noncontiguous_inputs(backend):
    img, txt, img_t, txt_t = distill_batch(40, 12, seed=12)
    # transposed copies: same values, other strides
    nc = [t.T.contiguous().T for t in (img, txt, img_t, txt_t)]
    assert not nc[0].is_contiguous()
    x = nc[0].clone().T.contiguous().T.requires_grad_()
    ref = contrastive_distill(img.requires_grad_(), txt, img_t, txt_t, 9.0, 15.0, cmc=0.3, backend="torch")
    out = contrastive_distill(x, nc[1], nc[2], nc[3], 9.0, 15.0, cmc=0.3, backend=backend)
    ref.backward()
    out.backward()
    assert rel_err(out, ref) <= 1e-5 and rel_err(x.grad, img.grad) <= 1e-5


def _bad_cases():
    def base():
        return list(distill_batch(8, 6, seed=0)), dict(scale_s=10.0, scale_t=10.0)

    def shape(f, k):
        f[1] = torch.randn(8, 5)
        return "txt_s has shape"

    def batch(f, k):
        f[2], f[3] = torch.randn(7, 6), torch.randn(7, 6)
        return "teacher batch"

    def empty(f, k):
        f[:] = [torch.randn(0, 6) for _ in range(4)]
        return "B = 0"

    def one_d(f, k):
        f[0] = torch.randn(8)
        return "2-D"

    def scale_inf(f, k):
        k["scale_s"] = float("inf")
        return "scale_s must be finite"

    def scale_nan_tensor(f, k):
        k["scale_t"] = torch.tensor(float("nan"))
        return "scale_t must be finite"

    def scale_shape(f, k):
        k["scale_s"] = torch.ones(1)
        return "0-d"

    def weight_len(f, k):
        k["row_weight"] = torch.ones(7)
        return "row_weight has shape"

    def weight_neg(f, k):
        w = torch.ones(8)
        w[3] = -0.5
        k["col_weight"] = w
        return "col_weight must be finite and >= 0"

    def weight_nan(f, k):
        w = torch.ones(8)
        w[3] = float("nan")
        k["row_weight"] = w
        return "row_weight must be finite"

    def mixed_dtype(f, k):
        f[1] = f[1].double()
        return "dtype"

    def int_dtype(f, k):
        f[0] = torch.ones(8, 6, dtype=torch.int64)
        return "dtype"

    def mixed_device(f, k):
        f[3] = torch.randn(8, 6, device="meta")
        return "mixed devices"

    def coef_nan(f, k):
        k["kd"] = float("nan")
        return "kd must be a finite number"

    for fn in (shape, batch, empty, one_d, scale_inf, scale_nan_tensor, scale_shape, weight_len, weight_neg,
               weight_nan, mixed_dtype, int_dtype, mixed_device, coef_nan):
        yield pytest.param(base, fn, id=fn.__name__)


@pytest.mark.parametrize("base,mutate", list(_bad_cases()))
@pytest.mark.parametrize("backend", ["torch", None])
def test_bad_input_raises(base, mutate, backend):
    feats, kw = base()
    pattern = mutate(feats, kw)
    scale_s, scale_t = kw.pop("scale_s"), kw.pop("scale_t")
    with pytest.raises(ValueError, match=pattern):
        contrastive_distill(*feats, scale_s, scale_t, backend=backend, **kw)


def test_triton_rejects_float64():
    if not HAS_TRITON_CPU:
        pytest.skip("triton not runnable on this machine")
    feats = distill_batch(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="triton"):
        contrastive_distill(*feats, 1.0, 1.0, backend="triton")


def test_gather_without_process_group_is_an_error():
    with pytest.raises(ValueError, match="torch.distributed"):
        contrastive_distill(*distill_batch(4, 3), 1.0, 1.0, gather=True)


# ---- the block primitives: rectangular blocks, column splits ----------------------------------------

def dense_stats(X, Y, Xt, Yt, s, t):
    S, T = s * X.double() @ Y.double().T, t * Xt.double() @ Yt.double().T

    def stats(S, T, dim):
        P = T.softmax(dim)
        return S.logsumexp(dim), T.logsumexp(dim), (P * (T - S)).sum(dim)

    return stats(S, T, 1), stats(S, T, 0)


def engines():
    out = [pytest.param(chunked, {}, id="chunked"), pytest.param(chunked, {"block": 3}, id="chunked-block3")]
    if HAS_TRITON_CPU:
        from mgcl.ops.contrastive_distill import triton as tr

        out += [pytest.param(tr, {}, id="triton"), pytest.param(tr, {"split": 3}, id="triton-split3")]
    return out


@pytest.mark.parametrize("engine,kw", engines())
@pytest.mark.parametrize("M,N", [(70, 257), (130, 5)])
def test_block_primitives_rectangular(engine, kw, M, N):
    g = torch.Generator().manual_seed(M + N)
    X, Y = torch.randn(M, 33, generator=g), torch.randn(N, 33, generator=g)
    Xt, Yt = torch.randn(M, 20, generator=g), torch.randn(N, 20, generator=g)
    s, t = torch.tensor(0.9), torch.tensor(1.3)
    row, col = engine.block_stats(X, Y, Xt, Yt, s, t, **kw)
    want_row, want_col = dense_stats(X, Y, Xt, Yt, 0.9, 1.3)
    for a, b in zip(row + col, want_row + want_col):
        assert a.dtype == torch.float32
        assert rel_err(a, b) <= 2e-6
    a_r, g_r = torch.rand(M, generator=g), torch.rand(M, generator=g)
    b_c, e_c = torch.rand(N, generator=g), torch.rand(N, generator=g)
    U, V = engine.block_grads(X, Y, Xt, Yt, s, t, (row[0], row[1], a_r, g_r), (col[0], col[1], b_c, e_c), **kw)
    S, T = 0.9 * X.double() @ Y.double().T, 1.3 * Xt.double() @ Yt.double().T
    G = (a_r.double()[:, None] * S.softmax(1) - g_r.double()[:, None] * T.softmax(1)
         + b_c.double()[None, :] * S.softmax(0) - e_c.double()[None, :] * T.softmax(0))
    assert rel_err(U, G @ Y.double()) <= 1e-5
    assert rel_err(V, G.T @ X.double()) <= 1e-5


# ---- the torch.library op ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("need_grad", [True, False])
def test_custom_op_opcheck(backend, need_grad):
    img, txt, img_t, txt_t = distill_batch(7, 5, seed=1)
    x, y = img.requires_grad_(need_grad), txt.requires_grad_(need_grad)
    s = torch.tensor(5.0, requires_grad=need_grad)
    args = (x, y, img_t, txt_t, s, torch.tensor(6.0), weights(7, 0), None, 1.0, 0.25, 1.0, 0.5, need_grad, backend)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
              "test_aot_dispatch_dynamic")
    result = torch.library.opcheck(torch.ops.mgcl.contrastive_distill.default, args, test_utils=checks)
    assert set(result) == set(checks) and all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("backend", [b for b in CPU_FAST if b == "chunked"])
def test_torch_compile_sees_one_op(backend):
    feats = distill_batch(20, 8, seed=7)

    def f(x, y, s):
        return contrastive_distill(x, y, feats[2], feats[3], s, 9.0, kd=1.0, cmc=0.25, backend=backend)

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend=capture)(feats[0].requires_grad_(), feats[1], torch.tensor(8.0))
    feats[0].requires_grad_(False)
    calls = [n for g in graphs for n in g.graph.nodes if "contrastive_distill" in str(n.target)]
    assert len(graphs) == 1 and len(calls) == 1, [str(n.target) for g in graphs for n in g.graph.nodes]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (f, compiled):
        x, y = feats[0].clone().requires_grad_(), feats[1].clone().requires_grad_()
        s = torch.tensor(8.0, requires_grad=True)
        loss = fn(x, y, s)
        loss.backward()
        outs.append((loss.detach(), x.grad, y.grad, s.grad))
    assert_rel(outs[1], outs[0], 1e-6, "compiled")


def test_info_lists_the_op():
    from mgcl import _backend
    from mgcl.ops import OPS

    assert "contrastive_distill" in OPS
    assert _backend.select("contrastive_distill", BACKENDS, "cpu") == "chunked"
    assert cd_mod.BACKENDS is BACKENDS


# ---- GPU ------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("B,d", [(1, 33), (7, 512), (257, 33), (1000, 512), (4099, 96)])
def test_gpu_triton_matches_reference(dtype, B, d):
    feats = distill_batch(B, d, dtype=dtype, device="cuda", seed=B)
    kw = dict(kd=1.0, cmc=0.25, i2t=0.7, t2i=1.3, w=weights(B, 1, device="cuda"), v=weights(B, 2, device="cuda"))
    out = run("triton", feats, **kw)
    ref = run("torch", feats, **kw)  # the reference upcasts the same 16-bit inputs to float32
    rtol = TOLERANCES[dtype][0]
    assert_rel(out, ref, rtol, f"triton {dtype} B={B} d={d}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("split", [1, 3, 16])
def test_gpu_triton_block_primitives_with_splits(dtype, split):
    from mgcl.ops.contrastive_distill import triton as tr

    g = torch.Generator().manual_seed(split)
    X, Y = torch.randn(300, 130, generator=g), torch.randn(2049, 130, generator=g)
    Xt, Yt = torch.randn(300, 70, generator=g), torch.randn(2049, 70, generator=g)
    s, t = torch.tensor(0.3), torch.tensor(0.4)
    cu = [z.to("cuda", dtype) for z in (X, Y, Xt, Yt)]
    row, col = tr.block_stats(*cu, s.cuda(), t.cuda(), split=split)
    want_row, want_col = dense_stats(*(z.float() for z in cu), 0.3, 1.0 * 0.4)
    for a, b in zip(row + col, want_row + want_col):
        assert rel_err(a, b) <= max(1e-5, TOLERANCES[dtype][0] / 4)


@pytest.mark.gpu
def test_gpu_triton_memory_is_linear_in_batch():
    B, d = 16384, 256
    feats = distill_batch(B, d, dtype=torch.bfloat16, device="cuda")
    x, y = feats[0].clone().requires_grad_(), feats[1].clone().requires_grad_()
    contrastive_distill(x, y, feats[2], feats[3], 14.0, 20.0, cmc=0.25, backend="triton").backward()  # autotune
    x.grad = y.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    contrastive_distill(x, y, feats[2], feats[3], 14.0, 20.0, cmc=0.25, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 64 * B * d  # a B x B fp32 matrix alone would be 1 GiB; this is 256 MiB


@pytest.mark.parametrize("backend", ["torch"] + CPU_FAST)
def test_return_parts(backend):
    img, txt, img_t, txt_t = distill_batch(21, 13, seed=13)
    w = weights(21, 3)
    loss, ckt, cmc = contrastive_distill(img, txt, img_t, txt_t, 9.0, 11.0, kd=0.6, cmc=0.2, i2t=1.5, row_weight=w,
                                         backend=backend, return_parts=True)
    want_ckt, want_cmc = reference.parts(img, txt, img_t, txt_t, 9.0, 11.0, 1.5, 1.0, w, None)
    assert rel_err(ckt, want_ckt) <= 1e-5 and rel_err(cmc, want_cmc) <= 1e-5
    assert float(loss) == pytest.approx(0.6 * float(ckt) + 0.2 * float(cmc), rel=1e-6)
    assert not ckt.requires_grad and not cmc.requires_grad


SM90_COMPILE = r"""
import os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mgcl.ops.contrastive_distill import triton as tr

PTRS = {"SCALE_S", "SCALE_T", "ROWP", "COLP", "DROW", "DCOL", "GSCALE", "ROW", "COL", "U", "V"}
UNIT = {"sxk", "syk", "stk", "suk"}  # contiguous features: the JIT specialises unit strides to 1
for kernel, extra in ((tr._stats_kernel, {"HAS_DIAG": True}), (tr._grad_kernel, {"HAS_T": True, "WITH_V": True})):
    fn = kernel.fn
    for dt in ("bf16", "fp32"):
        cfg = next(c for c in kernel.configs if c.feature_bytes == (4 if dt == "fp32" else 2))
        prec = "ieee" if dt == "fp32" else "tf32"
        consts = dict(cfg.kwargs, PREC=prec, PREC_T=prec, **extra, **{k: 1 for k in UNIT})
        sig = {}
        for name in fn.arg_names:
            sig[name] = ("constexpr" if name in consts else f"*{dt}" if name in ("X", "Y", "XT", "YT")
                         else "*fp32" if name in PTRS else "i32")
        # sizes and strides that are multiples of 16 (B, d = 512, ...) as the JIT would specialise them
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n] != "constexpr"}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                        attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        ptx = k.asm["ptx"]
        print(fn.__name__, dt, "wgmma" if "wgmma" in ptx else "no-wgmma",
              "pipelined" if "cp.async" in ptx else "not-pipelined", len(k.asm["cubin"]) > 0,
              "atomics" if re.search(r"\b(red|atom)\.global", ptx) else "no-atomics")
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90_without_a_gpu():
    """The CUDA code path (not the interpreter): both kernels lower to PTX/cubin for
    Hopper, bf16 tiles on wgmma tensor cores with the K loop software-pipelined
    (cp.async), fp32 (IEEE) on the CUDA cores."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SM90_COMPILE], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0 and ("ptxas" in r.stderr.lower() and "not found" in r.stderr.lower()):
        pytest.skip("no ptxas for the CUDA backend here")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.split("\n")
    assert any(line.startswith("_stats_kernel bf16 wgmma pipelined True") for line in lines), r.stdout
    assert any(line.startswith("_grad_kernel bf16 wgmma pipelined True atomics") for line in lines), r.stdout
    assert any(line.startswith("_stats_kernel fp32 no-wgmma") for line in lines), r.stdout
    assert not any(line.startswith("_stats_kernel") and line.endswith(" atomics") for line in lines), r.stdout


def test_bench_runs_small_and_formats(tmp_path, monkeypatch):
    from mgcl.bench import contrastive_distill as bench
    from mgcl.bench import harness

    rate = bench.matmul_rate
    monkeypatch.setattr(bench, "matmul_rate", lambda dev, dt: rate(dev, dt, n=256))
    result = bench.run("cpu", scale=1 / 32, repeats=1)
    assert [r["B"] for r in result["rows"]] == [32, 32, 64, 64, 128, 128]
    for r in result["rows"]:
        assert r["status"] == "ok" and r["median"] > 0 and r["peak_bytes"] is not None
        assert r["vs_torch"] > 0 and r["floor_ratio"] > 0
    for B in (32, 64, 128):  # the two implementations compute one loss
        a, b = (r["loss"] for r in result["rows"] if r["B"] == B)
        assert a == pytest.approx(b, rel=1e-5)
    c = result["crossover"]
    assert c["backend"] == "chunked" and c["declared"] == cd_mod.CHUNKED_MIN_BATCH
    assert set(c["fused_over_torch"]) == {32, 64, 128}
    assert c["measured"] in (None, 32, 64, 128)
    for B, v in c["default"].items():
        assert v["backend"] == ("torch" if B < cd_mod.CHUNKED_MIN_BATCH else "chunked")
    text = bench.table(result)
    assert "chunked" in text and "x floor" in text and "crossover (chunked vs torch)" in text
    harness.write_json(str(tmp_path / "cd.json"), result)
    assert (tmp_path / "cd.json").stat().st_size > 100


def test_bench_survives_a_failing_peer(tmp_path, monkeypatch):
    """inf-cl 1.2.1's cal_inf_loss(..., scale=) raised ValueError outside a process
    group: a peer that raises is recorded and the rest of the bench, and its JSON, go on."""
    from mgcl.bench import contrastive_distill as bench
    from mgcl.bench import harness

    def raising_peer(q, k, scale=None, head_dim=256):
        raise ValueError("Default process group has not been initialized")

    rate = bench.matmul_rate
    monkeypatch.setattr(bench, "matmul_rate", lambda dev, dt: rate(dev, dt, n=128))
    monkeypatch.setattr(bench, "_inf_cl", lambda: raising_peer)
    monkeypatch.setattr(bench, "_impls", lambda dev: {"torch": ("op", "torch", 0.0, 1.0),
                                                      "inf-cl cmc": ("inf-cl", None, 0.0, 1.0),
                                                      "chunked": ("op", "chunked", 0.0, 1.0)})
    result = bench.run("cpu", scale=1 / 64, repeats=1)
    peer = [r for r in result["rows"] if r["impl"] == "inf-cl cmc"]
    assert peer and all(r["status"].startswith("error: ValueError: Default process group") for r in peer)
    assert all(r["status"] == "ok" for r in result["rows"] if r["impl"] != "inf-cl cmc")
    assert "error: ValueError" in bench.table(result)
    harness.write_json(str(tmp_path / "cd.json"), result)
    assert (tmp_path / "cd.json").stat().st_size > 100


def _gpu_configs():
    """The CUDA autotune configs (the interpreter otherwise runs only its own)."""
    if not HAS_TRITON_CPU:
        return []
    from mgcl.ops.contrastive_distill import triton as tr

    saved = tr.INTERPRET
    tr.INTERPRET = False
    try:
        stats, grads = tr._stats_configs(), tr._grad_configs()
    finally:
        tr.INTERPRET = saved
    def name(which, c):
        tiles = "-".join(f"{k}{v}" for k, v in sorted(c.kwargs.items()))
        return f"{which}-{c.feature_bytes}B-{tiles}-w{c.num_warps}-s{c.num_stages}"

    uniq = {(which, tuple(sorted(c.kwargs.items()))): (which, c) for which, cs in (("stats", stats), ("grads", grads))
            for c in reversed(cs)}  # the interpreter ignores warps and stages: one run per tile shape
    return [pytest.param(which, c, id=name(which, c)) for which, c in reversed(list(uniq.values()))]


@pytest.mark.slow
@pytest.mark.parametrize("which,config", _gpu_configs())
def test_triton_gpu_tile_configs_in_the_interpreter(which, config, monkeypatch):
    """Every CUDA tile shape (BN = 128, BD = 512, BM = 128, ...) on sizes that leave
    partial tiles in rows, columns, K and output features, with a column split."""
    from mgcl.ops.contrastive_distill import triton as tr

    kernel = tr._stats_kernel if which == "stats" else tr._grad_kernel
    monkeypatch.setattr(kernel, "configs", [config])
    monkeypatch.setattr(kernel, "cache", {})
    g = torch.Generator().manual_seed(1)
    M, N, K, KT = 70, 200, 70, 20
    X, Y = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    Xt, Yt = torch.randn(M, KT, generator=g), torch.randn(N, KT, generator=g)
    s, t = torch.tensor(0.3), torch.tensor(0.5)
    want_row, want_col = dense_stats(X, Y, Xt, Yt, 0.3, 0.5)
    if which == "stats":
        row, col = tr.block_stats(X, Y, Xt, Yt, s, t, split=2)
        for a, b in zip(row + col, want_row + want_col):
            assert rel_err(a, b) <= 2e-6
        return
    S, T = 0.3 * X.double() @ Y.double().T, 0.5 * Xt.double() @ Yt.double().T
    a, gg, b, e = (torch.rand(n, generator=g) for n in (M, M, N, N))
    G = (a.double()[:, None] * S.softmax(1) - gg.double()[:, None] * T.softmax(1) + b.double() * S.softmax(0)
         - e.double() * T.softmax(0))
    row = (want_row[0].float(), want_row[1].float(), a, gg)
    col = (want_col[0].float(), want_col[1].float(), b, e)
    U, V = tr.block_grads(X, Y, Xt, Yt, s, t, row, col, split=2)
    assert rel_err(U, G @ Y.double()) <= 1e-5 and rel_err(V, G.T @ X.double()) <= 1e-5
