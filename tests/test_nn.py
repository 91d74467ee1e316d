"""mgcl.nn: ContrastiveDistillLoss and PrimedLoss (eager, autocast, torch.compile)."""
import doctest

import pytest
import torch
import torch.nn.functional as F

import mgcl
import mgcl.nn
from mgcl.nn import ContrastiveDistillLoss, PrimedLoss, PrimedLossOutput
from mgcl.ops.contrastive_distill import reference
from mgcl.testing import distill_batch


def rel_err(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max())


def raw_batch(B=24, d=16, seed=0):
    """Features that are not unit norm (the modules normalise them)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, d, generator=g) * (1 + i) for i in range(4)]


def test_docstring_examples_run():
    res = doctest.testmod(mgcl.nn, verbose=False)
    assert res.attempted >= 8 and res.failed == 0


@pytest.mark.parametrize("backend", [None, "torch"])
def test_contrastive_distill_loss_normalises_and_weights(backend):
    img, txt, img_t, txt_t = raw_batch()
    w = torch.rand(24)
    mod = ContrastiveDistillLoss(kd=1.0, cmc=0.25, i2t=0.5, t2i=2.0, backend=backend)
    assert "kd=1.0" in repr(mod)
    x = img.clone().requires_grad_()
    loss = mod(x, txt, img_t, txt_t, 14.0, 20.0, w)
    loss.backward()
    xr = img.clone().requires_grad_()
    n = [F.normalize(t, dim=-1) for t in (xr, txt, img_t, txt_t)]
    want = reference.contrastive_distill(*n, 14.0, 20.0, 1.0, 0.25, 0.5, 2.0, w, w)
    want.backward()
    assert rel_err(loss, want) <= 1e-5
    assert rel_err(x.grad, xr.grad) <= 1e-5
    # per-direction overrides; normalize=False passes the features through
    raw = ContrastiveDistillLoss(normalize=False, cmc=0.0)(img, txt, img_t, txt_t, 0.1, 0.2, row_weight=w)
    assert rel_err(raw, reference.contrastive_distill(img, txt, img_t, txt_t, 0.1, 0.2, 1.0, 0.0, 1.0, 1.0, w,
                                                      None)) <= 1e-5


def test_primed_loss_parts_and_gradients():
    torch.manual_seed(0)
    logits, labels = torch.randn(10, 7, requires_grad=True), torch.randint(0, 7, (10,))
    img, txt, img_t, txt_t = distill_batch(33, 20, seed=4)
    x, y = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s = torch.tensor(12.0, requires_grad=True)
    w = torch.rand(33)
    fn = PrimedLoss(alpha=0.8, beta=0.3, label_smoothing=0.1)
    out = fn(logits, labels, x, y, img_t, txt_t, s, 18.0, w)
    assert isinstance(out, PrimedLossOutput)
    assert out._fields == ("total", "ce", "ckt", "cmc", "distill")
    ckt, cmc = reference.parts(img, txt, img_t, txt_t, 12.0, 18.0, 1.0, 1.0, w, w)
    assert rel_err(out.ckt, ckt) <= 1e-5 and rel_err(out.cmc, cmc) <= 1e-5
    assert not out.ckt.requires_grad and not out.cmc.requires_grad
    assert rel_err(out.distill, 0.8 * ckt + 0.3 * cmc) <= 1e-5
    assert rel_err(out.ce, F.cross_entropy(logits, labels, label_smoothing=0.1)) <= 1e-6
    assert torch.equal(out.total, out.ce + out.distill)
    # the distillation gradient alone, then CE on top (the Fisher-guard order)
    out.distill.backward(retain_graph=True)
    assert logits.grad is None
    xr, yr, sr = (t.detach().clone().requires_grad_() for t in (img, txt, s))
    reference.contrastive_distill(F.normalize(xr, dim=-1), F.normalize(yr, dim=-1), img_t, txt_t, sr, 18.0, 0.8, 0.3,
                                  1.0, 1.0, w, w).backward()
    for a, b in ((x.grad, xr.grad), (y.grad, yr.grad), (s.grad, sr.grad)):
        assert rel_err(a, b) <= 1e-5
    out.ce.backward()
    assert logits.grad is not None


def test_primed_loss_rejects_bad_smoothing():
    with pytest.raises(ValueError, match="label_smoothing"):
        PrimedLoss(label_smoothing=1.5)


@pytest.mark.parametrize("ls,ok", [(0.0, True), (0.2, True), (0.999, True), (1.0, False), (1.5, False),
                                   (-0.1, False), (True, False), ("0.1", False)])
def test_primed_loss_and_train_config_share_the_smoothing_rule(ls, ok):
    """One rule for label_smoothing, [0, 1), in the loss and in the run's settings."""
    from mgcl.cl.config import TrainConfig

    for make in (lambda: PrimedLoss(label_smoothing=ls), lambda: TrainConfig(label_smoothing=ls)):
        if ok:
            make()
        else:
            with pytest.raises(ValueError, match="label_smoothing"):
                make()


class TinyClip(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.img = torch.nn.Linear(12, 16)
        self.txt = torch.nn.Linear(10, 16)
        self.head = torch.nn.Linear(12, 5)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.6))

    def forward(self, task_x, ref_img, ref_txt):
        return self.head(task_x), self.img(ref_img), self.txt(ref_txt), self.logit_scale.exp()


def step_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(6, 12, generator=g), torch.randint(0, 5, (6,), generator=g), torch.randn(20, 12, generator=g),
            torch.randn(20, 10, generator=g))


def run_step(model, teacher, fn, inputs, autocast=False):
    task_x, labels, ref_img, ref_txt = inputs
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, img_s, txt_s, scale = model(task_x, ref_img, ref_txt)
        with torch.no_grad():
            _, img_t, txt_t, scale_t = teacher(task_x, ref_img, ref_txt)
        out = fn(logits, labels, img_s, txt_s, img_t, txt_t, scale, scale_t)
    out.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out, grads, (img_s, txt_s, img_t, txt_t, scale, scale_t)


def test_primed_loss_under_autocast_cpu():
    model, teacher = TinyClip(0), TinyClip(1)
    out, grads, feats = run_step(model, teacher, PrimedLoss(), step_inputs(), autocast=True)
    assert feats[0].dtype == torch.bfloat16  # the features really are 16-bit
    assert out.distill.dtype == torch.float32 and torch.isfinite(out.total)
    assert all(torch.isfinite(g).all() and g.dtype == torch.float32 for g in grads.values())
    assert float(grads["logit_scale"].abs()) > 0
    # the distillation loss is the float32 math of those bf16 features
    n = [F.normalize(t.detach().float(), dim=-1) for t in feats[:4]]
    want = reference.contrastive_distill(*n, feats[4].detach(), feats[5], 1.0, 0.25)
    assert rel_err(out.distill, want) <= 1e-2  # F.normalize ran in bf16 under autocast
    # and the whole step is close to the float32 step
    out32, _, _ = run_step(model, teacher, PrimedLoss(), step_inputs(), autocast=False)
    assert abs(out.total.item() - out32.total.item()) <= 0.05 * abs(out32.total.item())


def test_primed_loss_under_torch_compile_cpu():
    model, teacher = TinyClip(0), TinyClip(1)
    out_e, grads_e, _ = run_step(model, teacher, PrimedLoss(alpha=1.0, beta=0.25), step_inputs())
    compiled = torch.compile(PrimedLoss(alpha=1.0, beta=0.25), fullgraph=True)  # inductor
    for _ in range(2):  # the second call reuses the compiled graph
        out_c, grads_c, _ = run_step(model, teacher, compiled, step_inputs())
    for a, b in zip(out_c, out_e):
        assert rel_err(a, b) <= 1e-5
    for name in grads_e:
        assert rel_err(grads_c[name], grads_e[name]) <= 1e-5, name


def test_contrastive_distill_loss_under_torch_compile_cpu():
    img, txt, img_t, txt_t = raw_batch(18, 9, seed=3)
    eager = ContrastiveDistillLoss()
    compiled = torch.compile(ContrastiveDistillLoss(), fullgraph=True, backend="aot_eager")
    res = []
    for fn in (eager, compiled):
        x = img.clone().requires_grad_()
        s = torch.tensor(10.0, requires_grad=True)
        loss = fn(x, txt, img_t, txt_t, s, 15.0)
        loss.backward()
        res.append((loss.detach(), x.grad, s.grad))
    for a, b in zip(*res):
        assert rel_err(a, b) <= 1e-6


def test_with_fisher_guard_in_the_documented_order():
    model, teacher = TinyClip(0), TinyClip(1)
    guard = mgcl.FisherGuard(model.parameters(), lam=10.0, mode="dfg")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # move away from the anchors so the guard acts
    task_x, labels, ref_img, ref_txt = step_inputs()
    logits, img_s, txt_s, scale = model(task_x, ref_img, ref_txt)
    with torch.no_grad():
        _, img_t, txt_t, scale_t = teacher(task_x, ref_img, ref_txt)
    out = PrimedLoss()(logits, labels, img_s, txt_s, img_t, txt_t, scale, scale_t)
    out.distill.backward(retain_graph=True)
    g_kd = model.img.weight.grad.clone()
    assert model.head.weight.grad is None  # only the distillation gradient so far
    penalty = guard.apply()
    assert float(penalty) > 0
    want = g_kd + 2 * 10.0 * g_kd**2 * 0.01
    assert torch.allclose(model.img.weight.grad, want, rtol=1e-5, atol=1e-8)
    out.ce.backward()
    assert model.head.weight.grad is not None


# ---- conventions: open_clip's ClipLoss and DistillClipLoss ----------------------------------------

def teacher_entropy(img_t, txt_t, t):
    """Mean row entropy + mean column entropy of the teacher softmaxes."""
    T = t * img_t.double() @ txt_t.double().T
    return float(-(T.softmax(1) * T.log_softmax(1)).sum(1).mean() - (T.softmax(0) * T.log_softmax(0)).sum(0).mean())


@pytest.mark.parametrize("backend", [None, "torch", "chunked"])
def test_open_clip_convention_reproduces_open_clip(backend):
    """kd / cmc with convention="open_clip" are DistillClipLoss's weights: same
    gradients as ``w_d * distill_loss + w_c * contrastive_loss``, the CMC value
    of ClipLoss, the CKT value of distill_loss less half the teacher entropy."""
    oc = pytest.importorskip("open_clip.loss")
    img, txt, img_t, txt_t = distill_batch(37, 24, seed=21)
    w_d, w_c = 0.7, 1.3
    grads = []
    x, y = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s = torch.tensor(9.0, requires_grad=True)
    contrastive, distill = oc.DistillClipLoss()(x, y, s, img_t, txt_t, torch.tensor(13.0))
    (w_d * distill + w_c * contrastive).backward()
    grads.append((x.grad, y.grad, s.grad))
    x, y = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s = torch.tensor(9.0, requires_grad=True)
    # normalize=False: open_clip takes the features as given (F.normalize would project its gradient)
    ours = ContrastiveDistillLoss(kd=w_d, cmc=w_c, normalize=False, convention="open_clip", backend=backend)
    loss = ours(x, y, img_t, txt_t, s, 13.0)
    loss.backward()
    grads.append((x.grad, y.grad, s.grad))
    for a, b in zip(*grads):
        assert rel_err(a, b) <= 1e-5
    H = teacher_entropy(img_t, txt_t, 13.0)
    assert float(loss) == pytest.approx(w_d * (float(distill) - H / 2) + w_c * float(contrastive), rel=1e-5)
    clip = oc.ClipLoss()(img, txt, torch.tensor(9.0))
    cmc_only = ContrastiveDistillLoss(kd=0.0, cmc=1.0, convention="open_clip", backend=backend)
    assert float(cmc_only(img, txt, img_t, txt_t, 9.0, 13.0)) == pytest.approx(float(clip), rel=1e-6)
    # and the default convention is twice each (the statement in mgcl.nn's docstring)
    mgcl_cmc = ContrastiveDistillLoss(kd=0.0, cmc=1.0, backend=backend)(img, txt, img_t, txt_t, 9.0, 13.0)
    mgcl_ckt = ContrastiveDistillLoss(kd=1.0, cmc=0.0, backend=backend)(img, txt, img_t, txt_t, 9.0, 13.0)
    assert float(mgcl_cmc) == pytest.approx(2 * float(clip), rel=1e-6)
    assert float(mgcl_ckt) == pytest.approx(2 * float(distill) - H, rel=1e-5)


def test_primed_loss_open_clip_convention_parts():
    oc = pytest.importorskip("open_clip.loss")
    torch.manual_seed(1)
    logits, labels = torch.randn(6, 4), torch.randint(0, 4, (6,))
    img, txt, img_t, txt_t = distill_batch(30, 16, seed=22)
    out = PrimedLoss(alpha=1.0, beta=0.25, convention="open_clip")(logits, labels, img, txt, img_t, txt_t, 8.0, 11.0)
    contrastive, distill = oc.DistillClipLoss()(img, txt, torch.tensor(8.0), img_t, txt_t, torch.tensor(11.0))
    assert float(out.cmc) == pytest.approx(float(contrastive), rel=1e-6)
    assert float(out.ckt) == pytest.approx(float(distill) - teacher_entropy(img_t, txt_t, 11.0) / 2, rel=1e-5)
    assert float(out.distill) == pytest.approx(float(out.ckt) + 0.25 * float(out.cmc), rel=1e-6)
    mgcl_out = PrimedLoss(alpha=1.0, beta=0.25)(logits, labels, img, txt, img_t, txt_t, 8.0, 11.0)
    assert float(mgcl_out.ckt) == pytest.approx(2 * float(out.ckt), rel=1e-6)
    assert float(mgcl_out.cmc) == pytest.approx(2 * float(out.cmc), rel=1e-6)


@pytest.mark.parametrize("cls", [ContrastiveDistillLoss, PrimedLoss])
def test_unknown_convention_is_refused(cls):
    with pytest.raises(ValueError, match=r"convention must be one of mgcl, open_clip, got 'openclip'"):
        cls(convention="openclip")


def test_readme_shows_the_docstring_numbers():
    """README's loss-conventions subsection quotes the numbers mgcl.nn's doctest computes."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    quoted = re.findall(r"^    (ClipLoss .*|distill_loss .*)$", mgcl.nn.__doc__, flags=re.M)
    assert len(quoted) == 2
    for line in quoted:
        assert line in readme, line


@pytest.mark.parametrize("backend", [None, "torch", "chunked"])
def test_primed_loss_parts_are_cheap_detached_logging_values(backend):
    """ce, ckt, cmc, distill for a trainer's log: ckt and cmc hold no graph and
    are 0-d float32 on the features' device; ce and distill carry gradients."""
    img, txt, img_t, txt_t = distill_batch(20, 8, seed=23)
    x = img.clone().requires_grad_()
    logits = torch.randn(5, 3, requires_grad=True)
    out = PrimedLoss(backend=backend)(logits, torch.tensor([0, 1, 2, 0, 1]), x, txt, img_t, txt_t, 10.0, 10.0)
    for part in (out.ckt, out.cmc):
        assert part.grad_fn is None and not part.requires_grad
        assert part.dim() == 0 and part.dtype == torch.float32 and part.device == x.device
        assert part.untyped_storage().nbytes() <= 8  # a view of the two parts, nothing batch-sized
    assert out.ce.grad_fn is not None and out.distill.grad_fn is not None
    logged = {k: float(getattr(out, k)) for k in ("ce", "ckt", "cmc", "distill")}
    assert all(v == v for v in logged.values())
