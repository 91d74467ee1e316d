"""contrastive_distill's Triton kernels (under TRITON_INTERPRET=1 on the CPU):
the one-sweep statistics, both gradient products from one tile (the product
count), the fp16 gradient scale, the deterministic path, the autotune buckets,
the float32 dot precision; on a GPU, no host sync and the device guard."""
import math
import time

import pytest
import torch

from conftest import available_backends
from mgcl.ops.contrastive_distill import BACKENDS, contrastive_distill
from mgcl.testing import TOLERANCES, distill_batch

pytestmark = pytest.mark.filterwarnings("ignore:tl.make_block_ptr is deprecated")

if "triton" not in available_backends(BACKENDS, "cpu") + available_backends(BACKENDS, "cuda"):
    pytest.skip("triton cannot run here", allow_module_level=True)

from mgcl.ops.contrastive_distill import triton as tr  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
interpreter_only = pytest.mark.skipif(not tr.INTERPRET, reason="counts the interpreter's work")


def rel_err(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def block(M, N, K, KT, seed, dtype=torch.float32, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    Xt, Yt = torch.randn(M, KT, generator=g), torch.randn(N, KT, generator=g)
    return [z.mul(spread).to(DEV, dtype) for z in (X, Y, Xt, Yt)]


def dense(X, Y, Xt, Yt, s, t):
    """float64 S, T and the statistics of rows and columns."""
    S, T = s * X.double() @ Y.double().T, t * Xt.double() @ Yt.double().T

    def stats(dim):
        return S.logsumexp(dim), T.logsumexp(dim), (T.softmax(dim) * (T - S)).sum(dim)

    return S, T, stats(1), stats(0)


def dense_g(S, T, a, g, b, e):
    a, g, b, e = (z.double().cpu() for z in (a, g, b, e))
    S, T = S.cpu(), T.cpu()
    return (a[:, None] * S.softmax(1) - g[:, None] * T.softmax(1) + b[None, :] * S.softmax(0)
            - e[None, :] * T.softmax(0))


@pytest.mark.parametrize("M,N,split,groups", [(257, 130, 1, 1), (257, 130, 1, 3), (200, 300, 3, 2),
                                              (64, 64, 1, 1), (1, 70, 2, 1)])
def test_one_sweep_statistics_with_row_groups_and_column_splits(M, N, split, groups):
    X, Y, Xt, Yt = block(M, N, 40, 24, seed=M + N)
    row, col = tr.block_stats(X, Y, Xt, Yt, torch.tensor(0.7, device=DEV), torch.tensor(1.1, device=DEV),
                              split=split, groups=groups)
    _, _, want_row, want_col = dense(X, Y, Xt, Yt, 0.7, 1.1)
    for a, b in zip(row + col, want_row + want_col):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert rel_err(a, b) <= 2e-6


@pytest.mark.parametrize("off", [0, 30, -20])
def test_diagonal_logits_of_a_rectangular_block(off):
    """S[i, i + off] lands in row i and column i + off; entries without a pair are kept."""
    M, N = 90, 150
    X, Y, Xt, Yt = block(M, N, 33, 33, seed=3)
    d_row, d_col = torch.full((M,), 7.0, device=DEV), torch.full((N,), 7.0, device=DEV)
    tr.block_stats(X, Y, Xt, Yt, torch.tensor(0.5, device=DEV), torch.tensor(1.0, device=DEV), split=2, groups=2,
                   diag=(d_row, d_col), off=off)
    S = 0.5 * X.double() @ Y.double().T
    for i in range(M):
        want = float(S[i, i + off]) if 0 <= i + off < N else 7.0
        assert float(d_row[i]) == pytest.approx(want, rel=1e-6, abs=1e-6)
    for j in range(N):
        want = float(S[j - off, j]) if 0 <= j - off < M else 7.0
        assert float(d_col[j]) == pytest.approx(want, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("M,N,K,split", [(130, 70, 33, 1), (70, 200, 70, 2), (64, 64, 64, 1)])
def test_both_gradient_products(M, N, K, split, deterministic):
    X, Y, Xt, Yt = block(M, N, K, 20, seed=K)
    S, T, want_row, want_col = dense(X, Y, Xt, Yt, 0.4, 0.9)
    g = torch.Generator().manual_seed(7)
    a, gg, b, e = (torch.rand(n, generator=g).to(DEV) for n in (M, M, N, N))
    row = (want_row[0].float(), want_row[1].float(), a, gg)
    col = (want_col[0].float(), want_col[1].float(), b, e)
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        U, V = tr.block_grads(X, Y, Xt, Yt, torch.tensor(0.4, device=DEV), torch.tensor(0.9, device=DEV), row, col,
                              split=split)
    finally:
        torch.use_deterministic_algorithms(saved)
    G = dense_g(S, T, a, gg, b, e)
    assert rel_err(U, G @ Y.double().cpu()) <= 1e-5
    assert rel_err(V, G.T @ X.double().cpu()) <= 1e-5


@interpreter_only
def test_forward_backward_does_six_block_products(monkeypatch):
    """The acceptance's 6 B^2 d: 2 products (S, T) in the statistics sweep, then
    S and T once more and both gradient products from that tile. Counted as the
    multiply-adds of every tl.dot the interpreter runs (tile-aligned sizes and
    d = BD, so no padding and no feature chunks)."""
    from triton.runtime import interpreter

    macs = []
    real = interpreter.InterpreterBuilder.create_dot

    def counting(self, a, b, d, *args):
        macs.append(a.data.shape[-2] * a.data.shape[-1] * b.data.shape[-1])
        return real(self, a, b, d, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting)
    B, d = 128, tr._INTERP["BD"]
    feats = distill_batch(B, d, seed=1)
    x, y = feats[0].clone().requires_grad_(), feats[1].clone().requires_grad_()
    contrastive_distill(x, y, feats[2], feats[3], 10.0, 12.0, kd=1.0, cmc=0.25, backend="triton").backward()
    assert sum(macs) == 6 * B * B * d
    macs.clear()
    contrastive_distill(x, y, feats[2], feats[3], 10.0, 12.0, kd=0.0, cmc=1.0, backend="triton").backward()
    assert sum(macs) == 5 * B * B * d  # kd = 0: the gradient sweep skips T


def test_fp16_gradient_scale_never_overflows():
    """|G| up to 1e4 (> 256, where the old sqrt(N) scale overflowed fp16 at
    N = 65536; at N = 300 it overflowed above |G| = 4096): finite and accurate."""
    M, N, K = 64, 300, 32
    X, Y, Xt, Yt = (z / z.norm(dim=1, keepdim=True) for z in block(M, N, K, K, seed=5))
    X, Y, Xt, Yt = (z.half() for z in (X, Y, Xt, Yt))
    s, t = 60.0, 50.0  # peaked softmaxes: single entries near 1
    S, T, want_row, want_col = dense(X, Y, Xt, Yt, s, t)
    big = torch.full((M,), 1.0e4, device=DEV)
    small = torch.full((N,), 3.0, device=DEV)
    row = (want_row[0].float(), want_row[1].float(), big, 0.5 * big)
    col = (want_col[0].float(), want_col[1].float(), small, small)
    G = dense_g(S, T, *row[2:], *col[2:])
    assert float(G.abs().max()) > 4096
    U, V = tr.block_grads(X, Y, Xt, Yt, torch.tensor(s, device=DEV), torch.tensor(t, device=DEV), row, col)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    rtol = TOLERANCES[torch.float16][0]
    assert rel_err(U, G @ Y.double().cpu()) <= rtol
    assert rel_err(V, G.T @ X.double().cpu()) <= rtol
    scale = float(tr.g_scale(torch.stack(row), torch.stack(col)))
    assert scale * float(G.abs().max()) <= tr.G_CEILING and math.frexp(scale)[0] == 0.5  # a power of two


def test_fp16_op_with_large_weights_matches_the_reference():
    """The public op, fp16 features, pair weights of 15000: |G| > 256 (and > 8192, where
    the old scale 8 of N = 150 overflowed)."""
    B = 150
    feats = distill_batch(B, 24, seed=4, dtype=torch.float16, device=DEV)
    w = torch.full((B,), 1.5e4, device=DEV)
    out, ref = [], []
    for backend, dst in (("triton", out), ("torch", ref)):
        x, y = feats[0].clone().requires_grad_(), feats[1].clone().requires_grad_()
        s = torch.tensor(50.0, device=DEV, requires_grad=True)
        loss = contrastive_distill(x, y, feats[2], feats[3], s, 40.0, kd=1.0, cmc=0.25, row_weight=w, col_weight=w,
                                   backend=backend)
        loss.backward()
        dst += [loss.detach(), x.grad, y.grad, s.grad]
    for a, b in zip(out, ref):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) <= TOLERANCES[torch.float16][0]


@interpreter_only
def test_autotune_is_keyed_by_a_size_bucket(monkeypatch):
    """Two configs and a host-clock benchmark (the interpreter has no GPU timer):
    batches 70, 100 and 120 share the bucket 128 (one tuning), 130 is the next;
    the call that tunes returns what an untuned call returns (the tuning runs
    restore COLP and zero V)."""
    import triton

    feats = {M: distill_batch(M, 16, seed=M) for M in (70, 100, 120, 130)}
    plain = {M: contrastive_distill(*f, 3.0, 4.0, kd=1.0, cmc=0.3, backend="triton", return_parts=True)
             for M, f in feats.items()}
    grads_plain = {}
    for M, f in feats.items():
        x = f[0].clone().requires_grad_()
        contrastive_distill(x, *f[1:], 3.0, 4.0, kd=1.0, cmc=0.3, backend="triton").backward()
        grads_plain[M] = x.grad

    def host_bench(fn, quantiles):
        t0 = time.perf_counter()
        fn()
        ms = 1e3 * (time.perf_counter() - t0)
        return [ms] * len(quantiles)

    for kernel in (tr._stats_kernel, tr._grad_kernel):
        c = kernel.configs[0]
        monkeypatch.setattr(kernel, "configs", [c, triton.Config(dict(c.kwargs), num_warps=8)])
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "_do_bench", host_bench)
    for M, f in feats.items():
        x = f[0].clone().requires_grad_()
        loss, ckt, cmc = contrastive_distill(x, *f[1:], 3.0, 4.0, kd=1.0, cmc=0.3, backend="triton",
                                             return_parts=True)
        loss.backward()
        for a, b in zip((loss, ckt, cmc), plain[M]):
            assert float(a) == pytest.approx(float(b), rel=1e-6)
        assert rel_err(x.grad, grads_plain[M]) <= 1e-6
    assert len(tr._stats_kernel.cache) == 2 and len(tr._grad_kernel.cache) == 2


def test_float32_dots_follow_torch_matmul_precision():
    saved = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert tr._prec(torch.float32) == "ieee"
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert tr._prec(torch.float32) == "tf32"
        assert tr._prec(torch.bfloat16) == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved


@interpreter_only
def test_gpu_configs_by_feature_width_and_the_one_config_mode(monkeypatch):
    """16-bit and float32 features get their own tiles; MGCL_TRITON_AUTOTUNE=0
    keeps the first of each; output chunks much wider than d are pruned."""
    monkeypatch.setattr(tr, "INTERPRET", False)
    full = tr._grad_configs(), tr._stats_configs()
    monkeypatch.setattr(tr, "ONE_CONFIG", True)
    one = tr._grad_configs(), tr._stats_configs()
    for f, o in zip(full, one):
        for width in (2, 4):
            mine = [c for c in f if c.feature_bytes == width]
            assert len(mine) > 1 and [c.kwargs for c in o if c.feature_bytes == width] == [mine[0].kwargs]
    grads = full[0]

    def pruned(dtype, K):
        return tr._prune_configs(grads, {"X": torch.empty(0, dtype=dtype), "K": K})

    assert {c.feature_bytes for c in pruned(torch.bfloat16, 512)} == {2}
    assert 512 in {c.kwargs["BD"] for c in pruned(torch.bfloat16, 512)}
    assert {c.feature_bytes for c in pruned(torch.float32, 512)} == {4}
    small = pruned(torch.bfloat16, 40)  # every 16-bit chunk is wider than 64: the narrowest one
    assert len(small) == 1 and small[0].kwargs["BD"] == min(c.kwargs["BD"] for c in grads if c.feature_bytes == 2)


# ---- GPU --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_no_host_sync_per_call(dtype):
    feats = distill_batch(3000, 256, dtype=dtype, device="cuda", seed=1)
    w = torch.rand(3000, device="cuda")

    def step():
        x, y = feats[0].clone().requires_grad_(), feats[1].clone().requires_grad_()
        s = torch.tensor(14.0, device="cuda", requires_grad=True)
        loss, ckt, cmc = contrastive_distill(x, y, feats[2], feats[3], s, 20.0, kd=1.0, cmc=0.25, row_weight=w,
                                             col_weight=w, backend="triton", return_parts=True)
        loss.backward()
        return loss, x.grad

    step()  # compile and autotune (they synchronise) outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, grad = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.gpu
def test_gpu_bad_tensor_values_give_nan_not_a_sync():
    feats = distill_batch(64, 32, device="cuda", seed=2)
    w = torch.ones(64, device="cuda")
    w[3] = -1.0
    x = feats[0].clone().requires_grad_()
    loss = contrastive_distill(x, *feats[1:], 10.0, 10.0, row_weight=w, backend="triton")
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(x.grad).all()
    loss = contrastive_distill(*feats, torch.tensor(float("inf"), device="cuda"), 10.0, backend="torch")
    assert torch.isnan(loss)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_tensors_on_the_second_device():
    feats = distill_batch(500, 64, device="cuda:1", seed=3)
    with torch.cuda.device(0):
        out, ref = [], []
        for backend, dst in (("triton", out), ("torch", ref)):
            x = feats[0].clone().requires_grad_()
            loss = contrastive_distill(x, *feats[1:], 12.0, 15.0, kd=1.0, cmc=0.25, backend=backend)
            loss.backward()
            dst += [loss.detach(), x.grad]
    assert out[0].device == torch.device("cuda:1")
    for a, b in zip(out, ref):
        assert rel_err(a, b) <= 1e-5
