"""torch.library.opcheck with all four checks on the three custom ops, and the
guard's op under torch.compile(fullgraph=True)."""
import pytest
import torch

from conftest import available_backends
import mgcl.ops.contrastive_distill as cd
import mgcl.ops.fisher_guard as fg
import mgcl.ops.similarity_topk as tk
from mgcl.testing import distill_batch

CHECKS = ("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic")


def opcheck(op, args):
    """Each check on its own, so a failure names the check."""
    for check in CHECKS:
        assert torch.library.opcheck(op, args, test_utils=(check,)) == {check: "SUCCESS"}, check


def fg_args(mode, ema, backend, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shapes = [(7,), (3, 5), (2, 3, 4)]
    r = [torch.randn(s, generator=g).to(dtype) for s in shapes * 3]
    grads, params, anchors = r[:3], r[3:6], r[6:]
    fisher = [torch.rand(s, generator=g) for s in shapes] if (mode == "ewc" or ema) else []
    return grads, params, anchors, fisher, 0.5, mode, ema, "mean", backend


@pytest.mark.parametrize("backend", available_backends(fg.BACKENDS, "cpu"))
@pytest.mark.parametrize("mode,ema", [("dfg", 0.0), ("dfg", 0.5), ("ewc", 0.0), ("l2", 0.0)])
def test_fisher_guard_opcheck(backend, mode, ema):
    opcheck(torch.ops.mgcl.fisher_guard.default, fg_args(mode, ema, backend))
    args = list(fg_args(mode, ema, backend, torch.bfloat16))
    args[7] = None  # normalize: Optional[str]
    opcheck(torch.ops.mgcl.fisher_guard.default, tuple(args))


def test_fisher_guard_schema_has_no_mode_and_optional_normalize():
    schema = str(torch.ops.mgcl.fisher_guard.default._schema)
    assert " mode" not in schema and "str importance" in schema and "str? normalize" in schema, schema


def test_optional_arguments_are_optional_in_the_schemas():
    """No sentinel values: an absent cap or weight is None in the schema too."""
    topk = str(torch.ops.mgcl.similarity_topk.default._schema)
    assert "SymInt? max_per_query" in topk, topk
    distill = str(torch.ops.mgcl.contrastive_distill.default._schema)
    assert "Tensor? row_weight" in distill and "Tensor? col_weight" in distill, distill


@pytest.mark.parametrize("backend", available_backends(fg.BACKENDS, "cpu"))
def test_fisher_guard_compiles_with_fullgraph(backend):
    grads, params, anchors, *_ = fg_args("dfg", 0.0, backend)

    def step(g, p, a):
        return fg.fisher_guard(g, p, a, lam=0.5, normalize="mean", backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    g_eager, g_comp = [t.clone() for t in grads], [t.clone() for t in grads]
    expect = step(g_eager, params, anchors)
    got = compiled(g_comp, params, anchors)
    torch.testing.assert_close(got, expect)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


def test_fisher_guard_compiles_with_inductor():
    grads, params, anchors, *_ = fg_args("dfg", 0.0, "torch")
    compiled = torch.compile(lambda g, p, a: fg.fisher_guard(g, p, a, lam=0.5), fullgraph=True)
    g_comp, g_eager = [t.clone() for t in grads], [t.clone() for t in grads]
    torch.testing.assert_close(compiled(g_comp, params, anchors), fg.fisher_guard(g_eager, params, anchors, lam=0.5))
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


# similarity_topk's result is ragged: its length is data-dependent (an unbacked
# size in the fake implementation). AOT dispatch without a shape environment
# (the static check) cannot represent that, so that one check cannot pass for
# this op as defined; strict, so a fix shows up here.
TOPK_STATIC = pytest.mark.xfail(reason="data-dependent output length: DynamicOutputShapeException without a "
                                       "ShapeEnv", strict=True, raises=AssertionError)


@pytest.mark.parametrize("backend", available_backends(tk.BACKENDS, "cpu"))
@pytest.mark.parametrize("ties,cap", [(True, None), (False, None), (True, 3)])
@pytest.mark.parametrize("check", [c if c != "test_aot_dispatch_static" else pytest.param(c, marks=TOPK_STATIC)
                                   for c in CHECKS])
def test_similarity_topk_opcheck(backend, ties, cap, check):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(4, 8, generator=g), torch.randn(29, 8, generator=g)
    # no cap is None (an Optional in the schema); quantized [] makes the int8 codes inside the op
    args = (q, [k[:10], k[10:]], 5, ties, cap, backend, [])
    try:
        result = torch.library.opcheck(torch.ops.mgcl.similarity_topk.default, args, test_utils=(check,))
    except torch.testing._internal.optests.generate_tests.OpCheckError as exc:
        raise AssertionError(f"{check}: {exc.__cause__!r}") from exc
    assert result == {check: "SUCCESS"}


@pytest.mark.parametrize("backend", available_backends(cd.BACKENDS, "cpu"))
@pytest.mark.parametrize("need_grad", [True, False])
def test_contrastive_distill_opcheck(backend, need_grad):
    if backend == "torch":
        pytest.skip("the torch backend is not wrapped in the op (it is the differentiable definition)")
    img_s, txt_s, img_t, txt_t = distill_batch(6, 5, seed=3)
    scale_s, scale_t = torch.tensor(3.0), torch.tensor(4.0)
    if need_grad:
        img_s, txt_s, scale_s = (t.clone().requires_grad_() for t in (img_s, txt_s, scale_s))
    w = torch.rand(6, generator=torch.Generator().manual_seed(2))
    args = (img_s, txt_s, img_t, txt_t, scale_s, scale_t, w, None, 1.0, 0.25, 1.0, 0.5, need_grad, backend)
    opcheck(torch.ops.mgcl.contrastive_distill.default, args)
