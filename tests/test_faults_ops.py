"""Fault injection for the ops and the guard (issue 15): aliased tensors, bad
settings, bad state dicts, odd memory layouts, bad backend choices. Every case
ends in either a clear one-line ValueError or the reference's result; nothing
is changed by a refused call."""
import math
import re

import pytest
import torch

from conftest import available_backends
from mgcl import FisherGuard
from mgcl.ops.contrastive_distill import BACKENDS as CD
from mgcl.ops.fisher_guard import BACKENDS, fisher_guard
from mgcl.ops.similarity_topk import similarity_topk

HERE = available_backends(BACKENDS, "cpu")  # torch (+ cpp)


def _ref_same(fn_inputs, **kw):
    """The op on every backend here: the same penalty and grads as the reference."""
    outs = []
    for b in HERE:
        g, p, a = fn_inputs()
        outs.append((fisher_guard(g, p, a, backend=b, **kw), [t.clone() for t in g]))
    for pen, gs in outs[1:]:
        torch.testing.assert_close(pen, outs[0][0], rtol=1e-5, atol=0)
        for x, y in zip(gs, outs[0][1]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# ---- aliasing: refused by every backend with the same ValueError ----------------------------

def _aliased():
    """name -> inputs (grads, params, anchors, fisher) sharing memory, and the pair named."""
    def issue_case():  # issue 15: grad = buf[1:], param = buf[:-1]
        buf = torch.randn(100)
        return [buf[1:]], [buf[:-1]], [torch.randn(99)], None, "grads\\[0\\] and params\\[0\\]"

    def grads_share():
        buf = torch.randn(30)
        return ([buf[:20], buf[10:30]], [torch.randn(20), torch.randn(20)], [torch.randn(20), torch.randn(20)], None,
                "grads\\[0\\] and grads\\[1\\]")

    def same_grad_twice():
        g = torch.randn(8)
        return [g, g], [torch.randn(8), torch.randn(8)], [torch.randn(8), torch.randn(8)], None, "grads\\[0\\] and grads\\[1\\]"

    def param_is_anchor():
        p = torch.randn(6)
        return [torch.randn(6)], [p], [p], None, "params\\[0\\] and anchors\\[0\\]"

    def fisher_is_param():
        p = torch.randn(6)
        return [torch.randn(6)], [p], [torch.randn(6)], [p], "params\\[0\\] and fisher\\[0\\]"

    def transposed_view_of_a_param():
        w = torch.randn(7, 5)
        return [w.t()], [w.t()], [torch.randn(7, 5).t()], None, "grads\\[0\\] and params\\[0\\]"

    return {f.__name__: f for f in (issue_case, grads_share, same_grad_twice, param_is_anchor, fisher_is_param,
                                    transposed_view_of_a_param)}


@pytest.mark.parametrize("case", list(_aliased()))
@pytest.mark.parametrize("backend", HERE)
def test_aliased_tensors_are_refused_by_every_backend(case, backend):
    g, p, a, f, pair = _aliased()[case]()
    mode = "ewc" if f is not None else "dfg"
    before = [t.clone() for t in g]
    messages = []
    for b in HERE:  # the same message whichever backend
        with pytest.raises(ValueError, match="overlap in memory") as exc:
            fisher_guard(g, p, a, lam=1.0, mode=mode, fisher=f, backend=b)
        messages.append(str(exc.value))
    assert len(set(messages)) == 1
    assert re.search(pair, messages[0]), messages[0]
    assert all(torch.equal(x, y) for x, y in zip(g, before)), "a refused call changed a grad"


def test_aliasing_through_the_guard_is_refused_too():
    model = torch.nn.Linear(4, 3)
    guard = FisherGuard(model.parameters(), lam=1.0)
    model.weight.grad = torch.randn(3, 4)
    model.bias.grad = model.weight.grad[0, :3]  # the bias's grad inside the weight's
    with pytest.raises(ValueError, match="overlap in memory"):
        guard.apply()


@pytest.mark.parametrize("case", ["disjoint_views", "zero_size_inside", "views_of_one_flat_buffer"])
def test_memory_sharing_that_is_not_overlap_gives_correct_results(case):
    def inputs():
        if case == "disjoint_views":
            buf = torch.randn(40, generator=torch.Generator().manual_seed(1))
            return [buf[:20].clone(), buf[20:].clone()], [buf[:20], buf[20:]], [torch.zeros(20), torch.ones(20)]
        if case == "zero_size_inside":
            p = torch.randn(12, generator=torch.Generator().manual_seed(2))
            return [torch.randn(12, generator=torch.Generator().manual_seed(3)), p[5:5]], [p, torch.zeros(0)], \
                [torch.zeros(12), torch.zeros(0)]
        flat = torch.randn(3 * 30, generator=torch.Generator().manual_seed(4))  # DDP-style bucket views
        g = [t.view(5, 6) for t in flat.clone().split(30)]
        return g, [t.view(5, 6) for t in flat.split(30)], [torch.full((5, 6), float(i)) for i in range(3)]

    _ref_same(inputs, lam=0.7, normalize="mean")


# ---- bad lam / ema / mode / normalize -----------------------------------------------------------

BAD_SETTINGS = [
    dict(lam=float("nan")), dict(lam=float("inf")), dict(lam=-1e-9), dict(lam="1e3"), dict(lam=True), dict(lam=None),
    dict(lam=torch.tensor(1.0)), dict(lam=[1.0]), dict(lam=1.0, ema=float("nan")), dict(lam=1.0, ema=1.0),
    dict(lam=1.0, ema=-0.1), dict(lam=1.0, ema="0.9"), dict(lam=1.0, ema=float("inf")),
    dict(lam=1.0, mode="DFG"), dict(lam=1.0, mode=None), dict(lam=1.0, mode="fisher"), dict(lam=1.0, mode=0),
    dict(lam=1.0, mode="ewc", ema=0.5), dict(lam=1.0, mode="l2", ema=0.5), dict(lam=1.0, normalize="sum"),
    dict(lam=1.0, normalize=""), dict(lam=1.0, normalize=True),
]
GOOD_SETTINGS = [dict(lam=0), dict(lam=1), dict(lam=1e30), dict(lam=0.5, ema=0.0), dict(lam=0.5, ema=0.999999),
                 dict(lam=2.0, mode="l2"), dict(lam=2.0, normalize="mean")]


@pytest.mark.parametrize("kw", BAD_SETTINGS, ids=repr)
def test_bad_settings_are_refused_by_the_guard_at_construction_and_by_the_op(kw):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="lam|ema|mode|normalize"):
        FisherGuard(model.parameters(), **kw)
    g = [torch.randn(3)]
    before = g[0].clone()
    with pytest.raises(ValueError, match="lam|ema|mode|normalize"):
        fisher_guard(g, [torch.randn(3)], [torch.randn(3)], fisher=[torch.rand(3)], **kw)
    assert torch.equal(g[0], before)


@pytest.mark.parametrize("kw", GOOD_SETTINGS, ids=repr)
def test_edge_settings_that_are_valid_give_the_reference(kw):
    model = torch.nn.Linear(3, 2)
    guard = FisherGuard(model.parameters(), **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
            p.grad = torch.full_like(p, 1e-3)
    want = [p.grad.clone() for p in model.parameters()]
    fis = [torch.zeros_like(p) for p in model.parameters()] if kw.get("ema") else None
    pen_ref = fisher_guard(want, list(model.parameters()), guard.anchors, fisher=fis, backend="torch", **kw)
    pen = guard.apply()
    assert math.isfinite(float(pen)) or kw["lam"] == 1e30
    torch.testing.assert_close(pen, pen_ref, rtol=1e-5, atol=0)
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)


# ---- bad state dicts: refused before anything changes ------------------------------------------

def _guard():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    return FisherGuard(model.parameters(), lam=0.5, ema=0.5), model


def _bad_state_dicts():
    guard, _ = _guard()
    good = {k: v.clone() for k, v in guard.state_dict().items()}
    n = len(guard.params)

    def edit(**changes):
        sd = dict(good)
        for k, v in changes.items():
            if v is None:
                sd.pop(k)
            else:
                sd[k] = v
        return sd

    return {
        "not a dict": ([("anchor.0", good["anchor.0"])], "dict"),
        "missing anchor": (edit(**{f"anchor.{n - 1}": None}), "missing"),
        "extra anchor": (edit(**{f"anchor.{n}": torch.zeros(1)}), "unexpected keys"),
        "unknown key": (edit(step=torch.tensor(3.0)), "unexpected keys"),
        "wrong shape": (edit(**{"anchor.0": torch.zeros(3, 4)}), "anchor.0 has shape"),
        "nan anchor": (edit(**{"anchor.1": torch.full((4,), float("nan"))}), "inf or NaN"),
        "inf fisher": (edit(**{"fisher.2": torch.full((2, 4), float("inf"))}), "inf or NaN"),
        "int anchor": (edit(**{"anchor.0": torch.zeros(4, 3, dtype=torch.int64)}), "floating tensor"),
        "not a tensor": (edit(**{"anchor.0": [[0.0] * 3] * 4}), "floating tensor"),
        "partial fisher": (edit(**{"fisher.0": None}), "all or none"),
        "nan lam": (edit(lam=torch.tensor(float("nan"), dtype=torch.float64)), "lam"),
        "negative lam": (edit(lam=torch.tensor(-1.0, dtype=torch.float64)), "lam"),
        "ema 1.5": (edit(ema=torch.tensor(1.5, dtype=torch.float64)), "ema"),
        "lam as a vector": (edit(lam=torch.tensor([1.0, 2.0])), "one-element"),
        "lam as an int tensor": (edit(lam=torch.tensor(3)), "one-element floating"),
    }


@pytest.mark.parametrize("case", list(_bad_state_dicts()))
def test_bad_state_dicts_are_refused_before_anything_changes(case):
    sd, pattern = _bad_state_dicts()[case]
    guard, _ = _guard()
    with torch.no_grad():
        for f in guard.fisher:
            f.fill_(0.25)
    anchors, fisher = list(guard.anchors), list(guard.fisher)
    values = [a.clone() for a in anchors] + [f.clone() for f in fisher]
    lam, ema = guard.lam, guard.ema
    with pytest.raises(ValueError, match=pattern):
        guard.load_state_dict(sd)
    assert all(x is y for x, y in zip(guard.anchors + guard.fisher, anchors + fisher)), "lists were replaced"
    assert all(torch.equal(x, y) for x, y in zip(guard.anchors + guard.fisher, values)), "values were changed"
    assert (guard.lam, guard.ema) == (lam, ema)


def test_ema_state_needs_its_fisher_and_a_good_state_dict_loads():
    guard, _ = _guard()
    l2_model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    l2 = FisherGuard(l2_model.parameters(), lam=0.5, mode="l2")
    sd = {k: v for k, v in guard.state_dict().items() if not k.startswith("fisher")}
    with pytest.raises(ValueError, match="ema applies to mode 'dfg' only"):
        l2.load_state_dict(sd)  # ema=0.5 in the state dict, an l2 guard
    other, _ = _guard()
    other.fisher = None
    with pytest.raises(ValueError, match="needs the fisher"):
        other.load_state_dict(sd)
    fresh, _ = _guard()
    fresh.load_state_dict(guard.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.anchors, guard.anchors))


# ---- memory layouts of parameters ----------------------------------------------------------------

def test_channels_last_and_transposed_parameters_are_accepted():
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    lin = torch.nn.Linear(5, 6)
    lin.weight.data = lin.weight.data.t().contiguous().t()
    params = list(conv.parameters()) + list(lin.parameters())
    assert not conv.weight.is_contiguous() and not lin.weight.is_contiguous()
    guard = FisherGuard(params, lam=0.5, ema=0.5)
    assert [a.stride() for a in guard.anchors] == [p.stride() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
            p.grad = torch.randn_like(p)  # randn_like keeps the layout, as autograd does
    want = [p.grad.clone(memory_format=torch.contiguous_format) for p in params]
    fis = [torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format) for p in params]
    pen_ref = fisher_guard(want, [p.detach().contiguous() for p in params], [a.contiguous() for a in guard.anchors],
                           lam=0.5, ema=0.5, fisher=fis, backend="torch")
    torch.testing.assert_close(guard.apply(), pen_ref, rtol=1e-5, atol=0)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad.contiguous(), w, rtol=1e-5, atol=1e-6)


def test_a_grad_in_another_layout_than_its_param_is_refused_with_why():
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    guard = FisherGuard(conv.parameters(), lam=0.5)
    conv.weight.grad = torch.randn(conv.weight.shape)  # contiguous, the param channels_last
    conv.bias.grad = torch.randn(4)
    with pytest.raises(ValueError, match="must share one memory layout"):
        guard.apply()


@pytest.mark.parametrize("make", ["expanded", "strided", "sparse", "complex", "int"])
def test_parameters_the_guard_cannot_walk_are_refused_at_construction(make):
    p = {"expanded": lambda: torch.randn(1, 4).expand(3, 4), "strided": lambda: torch.randn(8, 4)[::2],
         "sparse": lambda: torch.randn(3, 3).to_sparse(), "complex": lambda: torch.randn(3, dtype=torch.complex64),
         "int": lambda: torch.arange(3)}[make]()
    with pytest.raises(ValueError, match="not dense|floating"):
        FisherGuard([torch.randn(2), p], lam=1.0)


# ---- backend choices ------------------------------------------------------------------------------

@pytest.mark.parametrize("env,pattern", [
    ("fisher_guard=chunked", "known but not offered by this op"),
    ("fisher_guard=bogus", "unknown backend 'bogus'"),
    ("fisher_gaurd=torch", "unknown op 'fisher_gaurd'"),
    ("bogus", "unknown backend 'bogus'"),
    ("fisher_guard=cuda", "cannot run this call: it runs on cuda tensors, not cpu"),
])
def test_bad_backend_overrides_say_what_is_wrong(monkeypatch, env, pattern):
    monkeypatch.setenv("MGCL_BACKEND", env)
    g = [torch.randn(3)]
    with pytest.raises(ValueError, match=pattern):
        fisher_guard(g, [torch.randn(3)], [torch.randn(3)], lam=1.0)


@pytest.mark.parametrize("call,pattern", [
    (lambda: fisher_guard([torch.randn(3)], [torch.randn(3)], [torch.randn(3)], lam=1.0, backend="triton"),
     "known but not offered"),
    (lambda: similarity_topk(torch.randn(2, 4), torch.randn(5, 4), 2, backend="cuda"),
     "cannot run this call: it runs on cuda tensors, not cpu"),
    (lambda: fisher_guard([torch.randn(3)], [torch.randn(3)], [torch.randn(3)], lam=1.0, backend="chunked"),
     "known but not offered"),  # (similarity_topk offers every known name since its triton backend)
    (lambda: FisherGuard([torch.randn(3)], lam=1.0, backend="Torch"), "unknown backend 'Torch'"),
])
def test_bad_explicit_backends_say_what_is_wrong(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()
    assert "chunked" in CD  # the names in these messages are the tables'
