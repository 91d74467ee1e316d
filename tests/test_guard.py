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
                   {"lam": 1.0, "normalize": "sum"}):
        with pytest.raises(ValueError):
            FisherGuard(model.parameters(), **kwargs)
    doc = mgcl.FisherGuard.__doc__
    order = [doc.index(s) for s in (".backward(", "guard.apply()", "ce.backward()", "opt.step()")]
    assert order == sorted(order), "the docstring must show: backward(distill) -> apply -> backward(CE) -> step"
