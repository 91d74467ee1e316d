"""FisherGuard: the training-loop API around the fused fisher_guard op."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import mgcl
from mgcl import FisherGuard
from mgcl.ops.fisher_guard import fisher_guard


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 128), torch.nn.Tanh(), torch.nn.Linear(128, 4))


def task_data(seed, n=512):
    """A 4-class problem: labels from a random linear rule on 8-d inputs that
    sit in their own region of input space (tasks differ, both learnable)."""
    g = torch.Generator().manual_seed(seed)
    centre = 3.0 * torch.nn.functional.normalize(torch.randn(8, generator=g), dim=0)
    z = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 4, generator=g)
    return z + centre, (z @ w).argmax(1)


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(model, x, y, steps, guard=None, teacher=None, ref_x=None, lr=0.05, seed=0):
    """CE on (x, y); with a guard: the DFG order of SPEC.md section 6."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    seen = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        ce = F.cross_entropy(model(x[idx]), y[idx])
        if guard is not None:
            # distillation on reference inputs: student vs the previous model
            r = ref_x[torch.randint(0, len(ref_x), (64,), generator=g)]
            with torch.no_grad():
                t_logits = teacher(r)
            kd = F.kl_div(F.log_softmax(model(r), 1), F.softmax(t_logits, 1), reduction="batchmean")
            kd.backward()                               # 1. p.grad = g_kd
            seen.append([p.grad.clone() for p in model.parameters()])
            guard.apply()                               # 2. p.grad += 2*lam*g_kd^2*(p - p*)
            ce.backward()                               # 3. CE on top
        else:
            ce.backward()
        opt.step()
    return seen


def weighted_distance(model, anchor, fisher):
    return sum(float((f * (p.detach() - a) ** 2).sum()) for p, a, f in zip(model.parameters(), anchor, fisher))


class _NoGuard:
    def apply(self):
        return None


def test_guarded_run_stays_closer_to_first_task_and_both_learn_second():
    x1, y1 = task_data(1)
    x2, y2 = task_data(2)
    base = tiny_model()
    train(base, x1, y1, 300)
    assert accuracy(base, x1, y1) > 0.85 and accuracy(base, x2, y2) < 0.4
    anchor = [p.detach().clone() for p in base.parameters()]
    # importance of each weight for task 1 (EWC's diagonal): the yardstick
    yardstick = FisherGuard(base.parameters(), lam=1.0, mode="ewc")
    fisher = yardstick.estimate_fisher(lambda b: F.cross_entropy(base(b[0]), b[1]),
                                       [(x1[i:i + 64], y1[i:i + 64]) for i in range(0, 512, 64)])

    def second_task(guard_lam):
        model, teacher = tiny_model(), tiny_model()
        model.load_state_dict(base.state_dict())
        teacher.load_state_dict(base.state_dict())
        guard = FisherGuard(model.parameters(), lam=guard_lam, mode="dfg") if guard_lam else _NoGuard()
        seen = train(model, x2, y2, 600, guard=guard, teacher=teacher, ref_x=x1)
        return model, seen

    unguarded, _ = second_task(0.0)   # the same loop (distillation + CE) without guard.apply()
    guarded, seen = second_task(100.0)
    assert any(float(s.abs().sum()) > 0 for step in seen for s in step), "the guard never saw a KD gradient"

    d_unguarded = weighted_distance(unguarded, anchor, fisher)
    d_guarded = weighted_distance(guarded, anchor, fisher)
    assert d_guarded < 0.6 * d_unguarded, (d_guarded, d_unguarded)
    assert accuracy(unguarded, x2, y2) > 0.75
    assert accuracy(guarded, x2, y2) > 0.75


def test_apply_equals_op_and_skips_params_without_grad():
    model = tiny_model()
    guard = FisherGuard(model.parameters(), lam=0.7, mode="dfg", normalize="mean")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = list(model.parameters())
    for p in params[:-1]:
        p.grad = torch.randn_like(p)
    params[-1].grad = None
    expect_g = [p.grad.clone() for p in params[:-1]]
    expect = fisher_guard(expect_g, params[:-1], guard.anchors[:-1], lam=0.7, normalize="mean", backend="torch")
    pen = guard.apply()
    assert params[-1].grad is None
    torch.testing.assert_close(pen, expect, rtol=1e-5, atol=0)
    for p, e in zip(params[:-1], expect_g):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)


def test_modes_l2_and_ewc():
    model = tiny_model()
    params = list(model.parameters())
    l2 = FisherGuard(params, lam=0.5, mode="l2")
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    for p in params:
        p.grad = torch.zeros_like(p)
    pen = l2.apply()
    n = sum(p.numel() for p in params)
    assert float(pen) == pytest.approx(0.5 * n, rel=1e-5)  # W = 1, d = 1
    assert all(torch.allclose(p.grad, torch.ones_like(p)) for p in params)  # 2*0.5*1*1

    ewc = FisherGuard(params, lam=1.0, mode="ewc")
    with pytest.raises(RuntimeError, match="estimate_fisher"):
        ewc.apply()
    grads_before = [p.grad.clone() for p in params]
    x, y = task_data(3, 128)
    f1 = [f.clone() for f in ewc.estimate_fisher(lambda b: F.cross_entropy(model(b[0]), b[1]), [(x, y)])]
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads_before)), "estimate_fisher must restore .grad"
    f2 = ewc.estimate_fisher(lambda b: F.cross_entropy(model(b[0]), b[1]), [(x, y)], accumulate=True)
    assert all(torch.allclose(b, 2 * a) for a, b in zip(f1, f2))


def test_ema_state_and_safetensors_roundtrip(tmp_path):
    model = tiny_model()
    guard = FisherGuard(model.parameters(), lam=0.3, mode="dfg", ema=0.9)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    guard.apply()
    assert any(float(f.abs().sum()) > 0 for f in guard.fisher)
    sd = guard.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "guard.safetensors")
    other = FisherGuard(tiny_model(seed=5).parameters(), lam=0.0, mode="dfg", ema=0.5)
    other.load_state_dict(load_file(tmp_path / "guard.safetensors"))
    assert other.lam == pytest.approx(0.3) and other.ema == pytest.approx(0.9)
    for a, b in zip(other.anchors, guard.anchors):
        assert torch.equal(a, b)
    for a, b in zip(other.fisher, guard.fisher):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="anchor"):
        other.load_state_dict({"anchor.0": torch.zeros(1)})


def test_consolidate_moves_anchor_and_bad_settings():
    model = tiny_model()
    guard = FisherGuard(model.parameters(), lam=1.0, mode="l2")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    guard.consolidate()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    assert float(guard.apply()) == 0.0
    for kwargs in ({"lam": -1.0}, {"lam": 1.0, "mode": "x"}, {"lam": 1.0, "mode": "l2", "ema": 0.5},
                   {"lam": 1.0, "normalize": "sum"}, {"lam": float("nan")}, {"lam": float("inf")}, {"lam": "1e3"},
                   {"lam": True}, {"lam": None}, {"lam": 1.0, "ema": float("nan")}, {"lam": 1.0, "ema": 1.0},
                   {"lam": 1.0, "ema": "0.5"}, {"lam": 1.0, "mode": None}, {"lam": 1.0, "mode": "DFG"},
                   {"lam": 1.0, "backend": "bogus"}, {"lam": 1.0, "backend": "triton"}, {"lam": 1.0, "scaler": 3}):
        with pytest.raises(ValueError):
            FisherGuard(model.parameters(), **kwargs)


def test_docstrings_show_the_guarded_step_in_order():
    doc = mgcl.guard.__doc__
    order = [doc.index(s) for s in ("guard.backward(out.distill, out.ce)", "guard.apply()", "opt.step()")]
    assert order == sorted(order), "the module doc must show: backward(distill, ce) per micro-batch -> apply -> step"
    old = [doc.index(s) for s in ("out.distill.backward(retain_graph=True)", "guard.apply();", "out.ce.backward()")]
    assert old == sorted(old), "and the original order for plain loops"
    assert "guard.backward" in mgcl.FisherGuard.backward.__doc__ or "micro-batch" in mgcl.FisherGuard.backward.__doc__


# ---- the guarded step: guard.backward(distill, ce) per micro-batch, guard.apply() ----------

import guard_fixtures as gf  # noqa: E402


def _grads(module):
    return [p.grad.detach().clone() for p in module.parameters()]


def _close(a, b, rtol=1e-5, atol=1e-7):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


GUARDS = [dict(mode="dfg"), dict(mode="dfg", ema=0.8), dict(mode="dfg", normalize="mean"), dict(mode="l2"),
          dict(mode="ewc")]


def _with_fisher(g, student, teacher):
    if g.mode == "ewc":
        x, y, r = gf.batch(99)
        g.estimate_fisher(lambda b: gf.losses(student, teacher, *b)[1], [(x, y, r)])
    return g


@pytest.mark.parametrize("opts", GUARDS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_plain_loop_equals_the_original_order(opts):
    """One micro-batch, no DDP: guard.backward + apply gives what
    distill.backward(); apply(); ce.backward() gives (and W = g_kd**2 exactly)."""
    out = []
    for recipe in ("new", "old"):
        student, teacher, g = gf.setup(**opts)
        _with_fisher(g, student, teacher)
        x, y, r = gf.batch(0)
        distill, ce = gf.losses(student, teacher, x, y, r)
        if recipe == "new":
            g.backward(distill, ce)
            pen = g.apply()
        else:
            distill.backward(retain_graph=True)
            kd = _grads(student)
            pen = g.apply()
            ce.backward()
        out.append((_grads(student), pen, [f.clone() for f in g.fisher or []]))
    (g_new, p_new, f_new), (g_old, p_old, f_old) = out
    _close(g_new, g_old)
    torch.testing.assert_close(p_new, p_old, rtol=1e-5, atol=0)
    _close(f_new, f_old)
    if opts == dict(mode="dfg"):  # and the definition, by hand
        student, teacher, g = gf.setup(**opts)
        distill, ce = gf.losses(student, teacher, x, y, r)
        gce = torch.autograd.grad(ce, list(student.parameters()), retain_graph=True)
        want = [c + k + 2 * 3.0 * k ** 2 * (p.detach() - a) for c, k, p, a in zip(gce, kd, student.parameters(),
                                                                               g.anchors)]
        _close(g_new, want)


@pytest.mark.parametrize("opts", GUARDS, ids=lambda o: "-".join(str(v) for v in o.values()))
@pytest.mark.parametrize("micro", [2, 3])
def test_accumulation_equals_one_step_on_the_concatenated_batch(opts, micro):
    """N micro-batches (losses / N) give the gradient, the penalty and the EMA
    state of one step on their concatenation: W comes from the accumulated g_kd."""
    out = []
    for n in (1, micro):
        student, teacher, g = gf.setup(**opts)
        _with_fisher(g, student, teacher)
        x, y, r = gf.batch(0)
        for xs, ys, rs in zip(x.chunk(n), y.chunk(n), r.chunk(n)):
            distill, ce = gf.losses(student, teacher, xs, ys, rs)
            g.backward(distill / n, ce / n)
        pen = g.apply()
        out.append((_grads(student), pen, [f.clone() for f in g.fisher or []]))
    (g1, p1, f1), (gn, pn, fn) = out
    _close(gn, g1)
    torch.testing.assert_close(pn, p1, rtol=1e-5, atol=0)
    _close(fn, f1)


def test_original_order_under_accumulation_is_what_the_new_step_fixes():
    """(the HF Trainer bug) the original order reads the earlier micro-batch's gradient as g_kd."""
    grads = []
    for recipe in ("new", "old"):
        student, teacher, g = gf.setup()
        x, y, r = gf.batch(0)
        for xs, ys, rs in zip(x.chunk(2), y.chunk(2), r.chunk(2)):
            distill, ce = gf.losses(student, teacher, xs, ys, rs)
            if recipe == "new":
                g.backward(distill / 2, ce / 2)
            else:
                (distill / 2).backward(retain_graph=True)
                g.apply()
                (ce / 2).backward()
        if recipe == "new":
            g.apply()
        grads.append(_grads(student))
    assert max(float((a - b).abs().max()) for a, b in zip(*grads)) > 1e-3


def test_a_distillation_loss_without_gradient_is_just_ce():
    """The first task has no teacher: a constant distill loss leaves W = 0 and p.grad = g_ce."""
    student, teacher, g = gf.setup()
    x, y, r = gf.batch(0)
    _, ce = gf.losses(student, teacher, x, y, r)
    want = torch.autograd.grad(ce, list(student.parameters()), retain_graph=True)
    g.backward(torch.zeros(()), ce)
    assert float(g.apply()) == 0.0
    _close(_grads(student), want)


def test_a_step_without_apply_is_refused():
    student, teacher, g = gf.setup()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    g.backward(*gf.losses(student, teacher, *gf.batch(0)))
    opt.step()  # forgot guard.apply()
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="call guard.apply\\(\\) before optimizer.step\\(\\)"):
        g.backward(*gf.losses(student, teacher, *gf.batch(1)))
    g.backward(*gf.losses(student, teacher, *gf.batch(1)))  # the stale g_kd was dropped: a fresh step works
    assert float(g.apply()) > 0


def test_bf16_autocast():
    """Under bf16 autocast the guard sees the fp32 parameter gradients: the
    guarded gradient is the definition applied to the autocast g_kd and g_ce,
    and close to the fp32 run."""
    student, teacher, g = gf.setup()
    x, y, r = gf.batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distill, ce = gf.losses(student, teacher, x, y, r)
    params = list(student.parameters())
    kd = torch.autograd.grad(distill, params, retain_graph=True)
    gce = torch.autograd.grad(ce, params, retain_graph=True)
    g.backward(distill, ce)
    pen = g.apply()
    want = [c + k + 2 * 3.0 * k ** 2 * (p.detach() - a) for c, k, p, a in zip(gce, kd, params, g.anchors)]
    assert all(p.grad.dtype == torch.float32 for p in params)
    _close(_grads(student), want)
    student32, teacher32, g32 = gf.setup()
    g32.backward(*gf.losses(student32, teacher32, x, y, r))
    pen32 = g32.apply()
    torch.testing.assert_close(pen, pen32, rtol=0.05, atol=0)
    for a, b in zip(_grads(student), _grads(student32)):
        assert float((a - b).norm()) <= 0.05 * float(b.norm()) + 1e-6


@pytest.mark.parametrize("opts", [dict(ema=0.5), dict(mode="l2")], ids=["dfg-ema", "l2"])
def test_grad_scaler_gives_the_unscaled_step_exactly(opts):
    """A GradScaler (here without autocast, so scaling is the only difference):
    p.grad is the fp32 guarded gradient times the scale (not its square), and
    the steps equal the unscaled run."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    student, teacher, g = gf.setup(scaler=scaler, **opts)
    ref, teacher_r, g_r = gf.setup(**opts)
    x, y, r = gf.batch(0)
    g.backward(*gf.losses(student, teacher, x, y, r))
    pen = g.apply()
    g_r.backward(*gf.losses(ref, teacher_r, x, y, r))
    pen_r = g_r.apply()
    torch.testing.assert_close(pen, pen_r, rtol=1e-6, atol=0)
    _close([t / 1024.0 for t in _grads(student)], _grads(ref), rtol=1e-6, atol=1e-9)
    _close(g.fisher or [], g_r.fisher or [], rtol=1e-6, atol=1e-12)
    student, teacher, g = gf.setup(scaler=torch.amp.GradScaler("cpu", init_scale=1024.0), **opts)
    ref, teacher_r, g_r = gf.setup(**opts)
    gf.train(student, teacher, g, steps=3, micro=2, scaler=g.scaler)
    gf.train(ref, teacher_r, g_r, steps=3, micro=2)
    torch.testing.assert_close(gf.flat(student), gf.flat(ref), rtol=1e-5, atol=1e-6)


def test_fp16_autocast_with_grad_scaler_equals_fp32_within_tolerance():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    student, teacher, g = gf.setup(scaler=scaler)
    ref, teacher_r, g_r = gf.setup()
    pens = gf.train(student, teacher, g, steps=4, micro=2, scaler=scaler,
                    autocast=lambda: torch.autocast("cpu", dtype=torch.float16))
    pens_r = gf.train(ref, teacher_r, g_r, steps=4, micro=2)
    assert scaler.get_scale() == 2.0 ** 12, "no step should have been skipped"
    a, b = gf.flat(student), gf.flat(ref)
    assert float((a - b).norm()) <= 2e-3 * float(b.norm())
    for p, q in zip(pens, pens_r):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=0)


@pytest.mark.parametrize("where", ["distill", "ce"])
def test_a_step_the_scaler_skips_leaves_the_guard_state_alone(where):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    student, teacher, g = gf.setup(scaler=scaler, ema=0.5)
    gf.train(student, teacher, g, steps=1, scaler=scaler)  # one good step: the EMA holds something
    fisher, weights = [f.clone() for f in g.fisher], gf.flat(student)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    distill, ce = gf.losses(student, teacher, *gf.batch(5))
    if where == "distill":
        distill = distill * float("inf")
    else:
        ce = ce * float("inf")
    g.backward(distill, ce)
    pen = g.apply()
    scaler.step(opt)
    scaler.update()
    assert torch.isnan(pen)
    assert scaler.get_scale() == 512.0, "the scaler skipped the step"
    assert torch.equal(gf.flat(student), weights)
    assert all(torch.equal(a, b) for a, b in zip(g.fisher, fisher)), "the skipped step changed the guard's EMA"


def test_grad_scaler_misuse_is_refused():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    student, teacher, g = gf.setup(scaler=scaler)
    distill, ce = gf.losses(student, teacher, *gf.batch(0))
    with pytest.raises(ValueError, match="already scaled by the guard's GradScaler"):
        g.backward(scaler.scale(distill), ce)
    scaler.scale(distill).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="GradScaler: use guard.backward"):
        g.apply()


@pytest.mark.parametrize("compile_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_model(compile_backend):
    """The guarded step through a torch.compile'd model equals the eager one."""
    student, teacher, g = gf.setup(ema=0.5)
    eager, teacher_e, g_e = gf.setup(ema=0.5)
    compiled = torch.compile(student, backend=compile_backend)
    pens = gf.train(student, teacher, g, steps=2, micro=2, forward=compiled)
    pens_e = gf.train(eager, teacher_e, g_e, steps=2, micro=2)
    torch.testing.assert_close(gf.flat(student), gf.flat(eager), rtol=1e-5, atol=1e-6)
    for p, q in zip(pens, pens_e):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=0)


def test_compiled_apply():
    """torch.compile(guard.apply) (issue 13: the schema's 'mode' broke it)."""
    out = []
    for compiled in (False, True):
        student, teacher, g = gf.setup(ema=0.5, normalize="mean")
        distill, ce = gf.losses(student, teacher, *gf.batch(0))
        distill.backward(retain_graph=True)
        apply = torch.compile(g.apply, backend="aot_eager") if compiled else g.apply
        pen = apply()
        ce.backward()
        out.append((pen, _grads(student), [f.clone() for f in g.fisher]))
    (p_e, g_e, f_e), (p_c, g_c, f_c) = out
    torch.testing.assert_close(p_c, p_e)
    _close(g_c, g_e)
    _close(f_c, f_e)


def test_channels_last_and_transposed_parameters():
    """A conv net in channels_last (and a transposed linear weight): the guard
    takes the parameters' own layout and gives what the contiguous copy gives."""
    def net():
        torch.manual_seed(3)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                   torch.nn.Linear(5 * 4 * 4, 3))

    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 1])
    results = []
    for layout in ("contiguous", "channels_last"):
        student, teacher = net(), net()
        if layout == "channels_last":
            student = student.to(memory_format=torch.channels_last)
            with torch.no_grad():
                w = student[3].weight
                w.data = w.data.t().contiguous().t()  # a dense, non-contiguous linear weight
            assert not student[0].weight.is_contiguous() and not student[3].weight.is_contiguous()
        g = FisherGuard(student.parameters(), lam=2.0, ema=0.5, normalize="mean")
        with torch.no_grad():
            for p in student.parameters():
                p.mul_(1.1)
        xi = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        for _ in range(2):
            ce = F.cross_entropy(student(xi), y)
            with torch.no_grad():
                t = F.softmax(teacher(x), 1)
            distill = F.kl_div(F.log_softmax(student(xi), 1), t, reduction="batchmean")
            g.backward(distill, ce)
            pen = g.apply()
            for p in student.parameters():
                p.grad = None
        results.append((pen, [a.contiguous() for a in g.anchors], [f.contiguous() for f in g.fisher]))
        assert all(a.stride() == p.stride() for a, p in zip(g.anchors, student.parameters()))
    (p0, a0, f0), (p1, a1, f1) = results
    torch.testing.assert_close(p1, p0, rtol=1e-5, atol=0)
    _close(f1, f0)
