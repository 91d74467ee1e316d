"""Every strategy end to end on two tiny tasks (TinyCLIP, coloured shapes, a toy
memory bank), and the semantics of each: what the guard saw, what was merged,
what was remembered."""
import dataclasses
import json
import os

import pytest
import torch

from mgcl import _backend
from mgcl.cl import ContinualTrainer, Task
from mgcl.cl import strategies as S
from mgcl.cl.strategies.replay import herding
from mgcl.cl.toy import COLOURS, SHAPES, SIDES, SIZES, ToyGenerator, ToyImages, toy_tasks, toy_vocabulary
from mgcl.models import TinyCLIP, WordTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ITERS, BS = 4, 8


@pytest.fixture(scope="module")
def tasks():
    return toy_tasks(2, n_train=6, n_test=4, image_size=32)


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    """A toy memory bank of captioned shapes (hashing embedder) and a pool of toy questions."""
    from mgcl.retrieval import build_bank
    from mgcl.retrieval.pool import Question

    root = tmp_path_factory.mktemp("bank")
    (root / "img").mkdir()
    data = ToyImages("shape", SHAPES, 12, 32, seed=99)
    lines = []
    for i in range(len(data)):
        img, _ = data[i]
        img.save(root / "img" / f"{i}.png")
        # the image's factors are not exposed; captions name a shape and a colour word
        cap = f"a {list(COLOURS)[i % 3]} {SHAPES[data.labels[i]]} drawn {SIDES[i % 2]}, {SIZES[i % 2]}"
        lines.append(json.dumps({"image": f"img/{i}.png", "caption": cap, "id": f"t{i}",
                                 "domain": ["toy-shape", "toy-colour"][i % 2]}))
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    build_bank([str(root / "corpus.jsonl")], str(root / "bank"), embedder="hashing", progress=False)
    pool = [Question(f"a {c} object", "toy-colour", "object", c) for c in COLOURS] + \
           [Question(f"a {s}", "toy-shape", "object", s) for s in SHAPES] + \
           [Question(f"something {w}", "toy-size", "object", w) for w in SIZES]
    return str(root / "bank"), pool


def siphon_for(bank):
    from mgcl.retrieval import MemoryBank, Siphon

    path, pool = bank
    return Siphon(MemoryBank.open(path), pool, None, a=4, b=2, c=2, n_general=2, k_v=1, seed=0)


def tiny_model(tasks, seed=0):
    torch.manual_seed(seed)
    tok = WordTokenizer.build(toy_vocabulary(tasks) + ["a red green blue circle square triangle drawn left right "
                                                       "small large object something"], context_length=12)
    return TinyCLIP(tok, vision="cnn", image_size=32, vision_width=16, text_width=16, text_heads=2, text_layers=1,
                    embed_dim=16)


def run(model, strategy, tasks, tmp_path, **kw):
    args = dict(iters_per_task=ITERS, batch_size=BS, lr=1e-3, warmup=1, device="cpu", out_dir=str(tmp_path),
                log_every=2, progress=False, eval_batch_size=64)
    args.update(kw)
    return ContinualTrainer(model, strategy, tasks, **args).run()


OPTIONS = {
    "zscl": lambda bank: dict(siphon=siphon_for(bank), uniform_size=12, uniform_keywords=["red", "circle", "left"],
                              ref_batch_size=6, we_every=2),
    "primed": lambda bank: dict(siphon=siphon_for(bank), ref_batch_size=6),
    "icarl": lambda bank: dict(memory=8),
    "snd": lambda bank: dict(siphon=siphon_for(bank), uniform_size=12, uniform_keywords=["red", "circle", "left"],
                             ref_batch_size=6),
    "gift": lambda bank: dict(generator=ToyGenerator(32), images_per_task=12, ref_batch_size=6),
}


def test_available_names():
    assert S.available() == ["zero-shot", "finetune", "l2", "ewc", "lwf", "wise-ft", "zscl", "icarl", "primed",
                             "moe-adapters", "diki", "snd", "gift"]


@pytest.mark.parametrize("name", S.available())
def test_every_strategy_runs_two_tasks(name, tasks, bank, tmp_path):
    if getattr(S.get(name), "needs_transformer_towers", False):
        pytest.skip("needs transformer towers (the CNN TinyCLIP here has none): tests/test_moe_diki.py trains it")
    model = tiny_model(tasks)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = S.create(name, **OPTIONS.get(name, lambda b: {})(bank))
    res = run(model, strategy, tasks, tmp_path)
    assert list(res["methods"]) == [name] and res["config"]["trainer"]["strategy"] == name
    m = res["methods"][name]
    assert len(m["R"]) == 2 and all(len(r) == 2 for r in m["R"])
    assert all(0 <= a <= 100 for r in m["R"] for a in r) and len(m["auc_matrix"][-1]) == 2
    assert all(m[k] is not None for k in ("transfer", "avg", "last", "bwt", "forgetting", "auc"))
    assert strategy.needs_reference_set == (name in ("zscl", "primed", "snd"))
    changed = any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if name == "zero-shot":
        assert m["R"] == [m["zero_shot"], m["zero_shot"]] and not changed
        assert not os.path.exists(tmp_path / "train_log.jsonl")
    else:
        assert changed
        assert torch.equal(model.logit_scale, before["logit_scale"]), "the logit scale is frozen"
        log = [json.loads(x) for x in open(tmp_path / "train_log.jsonl")]
        assert len(log) == 2 * ITERS // 2 and all("ce" in x and "loss" in x for x in log)
        if name in ("primed", "zscl"):
            assert all(k in log[-1] for k in (("ce", "ckt", "cmc", "distill", "penalty") if name == "primed"
                                              else ("ce", "kd", "penalty")))


def _grads(params):
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def test_primed_order_distill_then_guard_then_ce(tasks, bank, tmp_path):
    """The guard must see exactly the distillation gradient; CE must come after it."""
    seen = []

    class Spy(S.get("primed")):
        def training_loss(self, trainer, batch):
            self._last = super().training_loss(trainer, batch)
            return self._last

        def after_backward(self, trainer, part):
            params = trainer.params
            if part == 0:
                distill, ce = self._last.parts
                g_kd = torch.autograd.grad(distill, params, retain_graph=True, allow_unused=True)
                g_ce = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
                at_guard = _grads(params)
                super().after_backward(trainer, part)
                seen.append({"g_kd": g_kd, "g_ce": g_ce, "at_guard": at_guard, "after_guard": _grads(params),
                             "anchors": [a.clone() for a in self.guard.fisher_guard.anchors],
                             "theta": [p.detach().clone() for p in params]})
            else:
                super().after_backward(trainer, part)
                seen[-1]["final"] = _grads(params)

    model = tiny_model(tasks)
    strategy = Spy(siphon=siphon_for(bank), ref_batch_size=6, lam=0.5, normalize=None)
    run(model, strategy, tasks, tmp_path, iters_per_task=2)
    assert len(seen) == 4
    for s in seen:
        n_kd = 0
        for i in range(len(s["theta"])):
            g_kd, g_ce, at = s["g_kd"][i], s["g_ce"][i], s["at_guard"][i]
            after, fin = s["after_guard"][i], s["final"][i]
            if g_kd is None:
                assert at is None  # a weight the distillation does not reach: the guard leaves it alone
                continue
            n_kd += 1
            torch.testing.assert_close(at, g_kd, rtol=1e-5, atol=1e-8)  # the guard saw g_kd, not g_kd + g_ce
            d = s["theta"][i] - s["anchors"][i]
            torch.testing.assert_close(after, g_kd + 2 * 0.5 * g_kd ** 2 * d, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(fin, after + (g_ce if g_ce is not None else 0), rtol=1e-5, atol=1e-7)
        assert n_kd > 0
    # in the second task the anchors are the weights after the first, so the guard moves gradients
    assert any(float((s["after_guard"][i] - s["at_guard"][i]).abs().max()) > 0
               for s in seen[2:] for i in range(len(s["theta"])) if s["at_guard"][i] is not None)


def test_guard_and_losses_use_the_default_fused_backends(tasks, bank, tmp_path, monkeypatch):
    from mgcl.ops import contrastive_distill as cd
    from mgcl.ops import fisher_guard as fg

    calls = []
    for mod, op in ((fg, "fisher_guard"), (cd, "contrastive_distill")):
        for name, entry in list(mod.BACKENDS.items()):
            def wrapped(*a, _fn=entry.fn, _name=name, _op=op, **k):
                calls.append((_op, _name))
                return _fn(*a, **k)
            monkeypatch.setitem(mod.BACKENDS, name, dataclasses.replace(entry, fn=wrapped))
    monkeypatch.delenv("MGCL_BACKEND", raising=False)
    monkeypatch.setattr(cd, "CHUNKED_MIN_BATCH", 1)  # a reference batch of 6 is below chunked's CPU crossover
    run(tiny_model(tasks), S.create("primed", siphon=siphon_for(bank), ref_batch_size=6), tasks, tmp_path,
        iters_per_task=2)
    expect = {("fisher_guard", _backend.select("fisher_guard", fg.BACKENDS, "cpu")),
              ("contrastive_distill", _backend.select("contrastive_distill", cd.BACKENDS, "cpu"))}
    assert set(calls) == expect, set(calls)
    assert expect == {("fisher_guard", "cpp"), ("contrastive_distill", "chunked")} or not mgcl_has_c()


def mgcl_has_c():
    from mgcl import _native

    return _native.HAS_C


def test_primed_teacher_and_reference_options(tasks, bank, tmp_path):
    calls = []
    siphon = siphon_for(bank)
    real = siphon.reference_set

    def spy(history, stages="multi-stage"):
        calls.append([t.name for t in history])
        return real(history, stages)
    siphon.reference_set = spy

    class Spy(S.get("primed")):
        def before_task(self, trainer, t):
            self.init_copy = [p.detach().clone() for p in self.reference.initial]
            self.now = [p.detach().clone() for p in trainer.params]
            super().before_task(trainer, t)
            tp = dict(self.reference.teacher_model.named_parameters())
            for n, p0, p in zip(trainer.param_names, self.init_copy, self.now):
                torch.testing.assert_close(tp[n], 0.5 * (p0 + p))
                assert not tp[n].requires_grad
            self.checked = getattr(self, "checked", 0) + 1

    st = Spy(siphon=siphon, ref_batch_size=6, teacher="avg", direction="image", regularizer="l2")
    run(tiny_model(tasks), st, tasks, tmp_path)
    assert st.checked == 2
    assert calls == [[], ["shape"]], "dynamic retrieval: rebuilt before each task from the finished tasks"
    assert (st.reference.loss.i2t, st.reference.loss.t2i) == (1.0, 0.0)

    uni = siphon_for(bank)
    made = []
    uni.uniform_set = lambda size, kw=None, stages="multi-stage", _f=uni.uniform_set: \
        made.append((size, kw)) or _f(size, kw, stages)
    uni.reference_set = lambda h, stages=None: pytest.fail("uniform retrieval must not rebuild")
    for opts in (dict(retrieval="uniform", uniform_size=10, uniform_keywords=["circle", "red"], teacher="initial",
                      regularizer="ewc", cmc=False, direction="text"),
                 dict(regularizer="none", ckt=False, level_weights={"task": 2.0})):
        run(tiny_model(tasks), S.create("primed", siphon=uni if opts.get("retrieval") else siphon_for(bank),
                                        ref_batch_size=6, **opts), tasks, tmp_path / str(len(made)))
    assert made == [(10, ["circle", "red"])], "uniform_size and uniform_keywords reach the Siphon"


def test_primed_without_distillation_needs_no_reference_set(tasks, tmp_path):
    st = S.create("primed", ckt=False, cmc=False, regularizer="l2")
    assert not st.needs_reference_set and st.reference is None
    res = run(tiny_model(tasks), st, tasks, tmp_path)
    assert len(res["methods"]["primed"]["R"]) == 2


@pytest.mark.parametrize("anchor", ["pretrained", "previous"])
def test_l2_adds_twice_the_distance_to_its_anchor(anchor, tasks, tmp_path):
    seen = []
    model = tiny_model(tasks)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}

    class Spy(S.get("l2")):
        def after_backward(self, trainer, part):
            g = _grads(trainer.params)
            super().after_backward(trainer, part)
            seen.append([(a, b, p.detach() - anc) for a, b, p, anc in
                         zip(g, _grads(trainer.params), trainer.params, self.guard.fisher_guard.anchors)])

        def after_task(self, trainer, t):
            super().after_task(trainer, t)
            for p, a, n in zip(trainer.params, self.guard.fisher_guard.anchors, trainer.param_names):
                if anchor == "previous":
                    assert torch.equal(p.detach(), a), "anchors move to the weights after each task"
                else:
                    assert torch.equal(initial[n], a), "anchors stay at the pre-trained weights"

    st = Spy(anchor=anchor) if anchor == "previous" else Spy()
    assert st.options()["anchor"] == anchor
    run(model, st, tasks, tmp_path)
    moved = 0
    for step in seen:
        for before, after, d in step:
            if before is not None:
                torch.testing.assert_close(after, before + 2.0 * d, rtol=1e-5, atol=1e-7)
                moved += int(float(d.abs().max()) > 0)
    assert moved > 0


def test_ewc_fisher_accumulates(tasks, tmp_path):
    fishers = []

    class Spy(S.get("ewc")):
        def after_task(self, trainer, t):
            super().after_task(trainer, t)
            fishers.append([f.clone() for f in self.guard.fisher_guard.fisher])

    st = Spy(fisher_batches=2)
    run(tiny_model(tasks), st, tasks, tmp_path)
    assert len(fishers) == 2
    assert all(torch.all(b >= a) for a, b in zip(*fishers)) and any(torch.any(b > a) for a, b in zip(*fishers))


def test_wise_ft_merges_with_the_previous_weights(tasks, tmp_path):
    snaps = []

    class Spy(S.get("wise-ft")):
        def before_task(self, trainer, t):
            super().before_task(trainer, t)
            self.prev = [p.detach().clone() for p in trainer.params]

        def after_task(self, trainer, t):
            prev = self.prev
            new = [p.detach().clone() for p in trainer.params]
            super().after_task(trainer, t)
            for p, a, b in zip(trainer.params, new, prev):
                torch.testing.assert_close(p.detach(), 0.8 * a + 0.2 * b)
            snaps.append(t)

    run(tiny_model(tasks), Spy(), tasks, tmp_path)
    assert snaps == [0, 1]


def test_zscl_teacher_is_initial_and_weight_ensemble(tasks, bank, tmp_path):
    model = tiny_model(tasks)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}

    class Spy(S.get("zscl")):
        def before_task(self, trainer, t):
            super().before_task(trainer, t)
            tp = dict(self.reference.teacher_model.named_parameters())
            assert all(torch.equal(tp[n], initial[n]) for n in trainer.param_names)
            self.snaps = [[p.detach().clone() for p in trainer.params]]

        def after_step(self, trainer, step):
            super().after_step(trainer, step)
            if step % self.we_every == 0 or step == ITERS - 1:
                self.snaps.append([p.detach().clone() for p in trainer.params])

        def after_task(self, trainer, t):
            expect = [torch.stack(ps).mean(0) for ps in zip(*self.snaps)]
            # ZSCL's membership: the start, after steps 1, 1 + we_every, ..., and the last (4 steps, every 2: 4)
            assert len(self.snaps) == 4
            super().after_task(trainer, t)
            for p, e in zip(trainer.params, expect):
                torch.testing.assert_close(p.detach(), e)
            # the l2 anchor moves to the merged weights at each task's end (ZSCL's --load of the previous task)
            for p, a in zip(trainer.params, self.guard.fisher_guard.anchors):
                assert torch.equal(p.detach(), a)

    run(model, Spy(**OPTIONS["zscl"](bank)), tasks, tmp_path)


def test_zscl_task_shorter_than_we_every_ensembles_start_first_step_and_end(tasks, bank, tmp_path):
    model = tiny_model(tasks)

    class Spy(S.get("zscl")):
        def before_task(self, trainer, t):
            super().before_task(trainer, t)
            self.start = [p.detach().clone() for p in trainer.params]

        def after_step(self, trainer, step):
            super().after_step(trainer, step)
            if step == 0:
                self.first = [p.detach().clone() for p in trainer.params]

        def after_task(self, trainer, t):
            expect = [(a + b + p.detach()) / 3 for a, b, p in zip(self.start, self.first, trainer.params)]
            super().after_task(trainer, t)
            for p, e in zip(trainer.params, expect):
                torch.testing.assert_close(p.detach(), e)

    run(model, Spy(**{**OPTIONS["zscl"](bank), "we_every": 100}), tasks[:1], tmp_path, iters_per_task=3)


def test_icarl_memory_policy_per_dataset_as_zscl(tmp_path):
    """Task 1: its first images; then each old dataset keeps its first memory // t,
    the new one memory - memory // t herded on the trained model's features."""
    three = toy_tasks(3, n_train=4, n_test=2, image_size=32)
    herded = []

    class Spy(S.get("icarl")):
        def after_task(self, trainer, t):
            if t > 0:
                pool = torch.utils.data.Subset(trainer.tasks[t].train, list(range(len(trainer.tasks[t].train))))
                herded.append(herding(trainer.features_of(pool), self.memory - self.memory // (t + 1)))
            super().after_task(trainer, t)
            self.after.append(self.entries.clone())

    st = Spy(memory=9)
    st.after = []
    run(tiny_model(three), st, three, tmp_path)
    n = [len(t.train) for t in three]
    assert min(n) >= 6
    first, second, third = st.after
    assert first.tolist() == [[0, i] for i in range(min(9, n[0]))], "task 1: its first images, no herding"
    assert second[:, 0].tolist() == [0] * 4 + [1] * 5 and second[:4, 1].tolist() == [0, 1, 2, 3]
    assert second[4:, 1].tolist() == herded[0].tolist()
    # ZSCL's policy overshoots from the third dataset on: 3 + 3 + (9 - 3)
    assert third[:, 0].tolist() == [0] * 3 + [1] * 3 + [2] * 6
    assert third[3:6, 1].tolist() == herded[0][:3].tolist() and third[6:, 1].tolist() == herded[1].tolist()


def test_icarl_and_lwf_distil_on_the_current_prompts_with_their_teacher(tasks, tmp_path):
    model = tiny_model(tasks)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []

    def spy(base, teacher_is):
        class Spy(base):
            def before_task(self, trainer, t):
                start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
                super().before_task(trainer, t)
                if self.teacher is None:
                    seen.append((self.name, t, None))
                    return
                want = initial if teacher_is == "initial" else start
                tp = dict(self.teacher.named_parameters())
                assert all(torch.equal(tp[n], want[n]) for n in trainer.param_names)
                with torch.no_grad():
                    txt = trainer.text_features(trainer.class_tokens(t), model=self.teacher)
                torch.testing.assert_close(self.teacher_text, txt)
                seen.append((self.name, t, teacher_is))
        return Spy

    run(model, spy(S.get("lwf"), "start")(), tasks, tmp_path / "lwf")
    run(tiny_model(tasks), spy(S.get("icarl"), "initial")(memory=8), tasks, tmp_path / "icarl")
    initial = {n: p.detach().clone() for n, p in tiny_model(tasks).named_parameters()}
    run(tiny_model(tasks), spy(S.get("icarl"), "start")(memory=8, teacher="previous"), tasks, tmp_path / "prev")
    assert seen == [("lwf", 0, "start"), ("lwf", 1, "start"), ("icarl", 0, None), ("icarl", 1, "initial"),
                    ("icarl", 0, None), ("icarl", 1, "start")]


def test_teacher_text_kd_is_zscl_distillation_on_both_axes(tasks, tmp_path):
    """KL(teacher || student) at T over the texts of each image and the images of each
    text, against the teacher's text embeddings: no gradient reaches the student's text tower."""
    from mgcl.cl.strategies.parts import teacher_text_kd

    student, teacher = tiny_model(tasks, seed=1), tiny_model(tasks, seed=2).eval().requires_grad_(False)
    trainer = ContinualTrainer(student, "finetune", tasks, device="cpu", out_dir=str(tmp_path), batch_size=BS,
                               progress=False)
    images = torch.stack([student.transform(False)(tasks[0].train[i][0]) for i in range(5)])
    with torch.no_grad():
        ttxt = torch.nn.functional.normalize(teacher.encode_text(student.tokenize(tasks[1].prompts(0))), dim=-1)
    kd = teacher_text_kd(trainer, images, teacher, ttxt, 2.0)

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True)

    s = student.logit_scale.exp() * unit(student.encode_image(images)) @ ttxt.T
    t = teacher.logit_scale.exp() * unit(teacher.encode_image(images)) @ ttxt.T

    def ce(tl, sl):  # ZSCL's distillation(t, s, T=2): soft cross-entropy, mean over rows, times T^2
        return -(torch.softmax(tl / 2, 1) * torch.log_softmax(sl / 2, 1)).sum(1).mean() * 4

    def entropy(tl):
        p = torch.softmax(tl / 2, 1)
        return -(p * p.log()).sum(1).mean() * 4

    want = ce(t, s) - entropy(t) + ce(t.T, s.T) - entropy(t.T)   # KL = soft CE - the teacher's entropy
    torch.testing.assert_close(kd, want, rtol=1e-5, atol=1e-6)
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    grads = dict(zip(names, torch.autograd.grad(kd, [p for p in student.parameters() if p.requires_grad],
                                                allow_unused=True)))
    assert all(grads[n] is not None for n in names if n.startswith("visual."))
    assert any(n.startswith("text.") for n in names)
    assert all(grads[n] is None for n in names if n.startswith("text."))


def test_herding_is_greedy_mean_matching():
    # herding picks, greedily, the sample that keeps the running mean closest to the class mean
    g = torch.Generator().manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(12, 5, generator=g), dim=1)
    order = herding(f, 4).tolist()
    mu, chosen = f.mean(0), []
    for k in range(1, 5):
        best = min((i for i in range(12) if i not in chosen),
                   key=lambda i: float(((mu - (f[chosen].sum(0) + f[i]) / k) ** 2).sum()))
        chosen.append(best)
    assert order == chosen


def test_bad_configs_fail_before_training(tasks, tmp_path):
    calls = []

    class Watch(S.get("finetune")):
        def setup(self, trainer):
            calls.append("setup")

    with pytest.raises(ValueError, match="unknown strategy 'sgd'"):
        S.create("sgd")
    with pytest.raises(ValueError, match="unknown option"):
        S.create("l2", lamda=1.0)
    with pytest.raises(ValueError, match="teacher"):
        S.create("primed", teacher="best")
    with pytest.raises(ValueError, match="regularizer"):
        S.create("primed", regularizer="si")
    with pytest.raises(ValueError, match="direction"):
        S.create("primed", direction="sideways")
    with pytest.raises(ValueError, match="dfg"):
        S.create("primed", ckt=False, cmc=False)
    for name in ("primed", "zscl"):
        with pytest.raises(ValueError, match=f"^{name}: needs a reference set"):
            ContinualTrainer(tiny_model(tasks), name, tasks, device="cpu", out_dir=str(tmp_path), batch_size=BS)
    with pytest.raises(ValueError, match="level_weights"):
        S.create("primed", level_weights={"tsak": 2.0})
    with pytest.raises(ValueError, match="lam must be a finite number"):
        S.create("l2", lam=float("inf"))
    with pytest.raises(ValueError, match="empty"):
        ContinualTrainer(tiny_model(tasks), Watch(), [], device="cpu", out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="at least 2 classes"):
        Task("one", "x", ["only"], ["{}"], tasks[0].train, tasks[0].test)
    broken = toy_tasks(2, n_train=2, n_test=2)
    broken[1].classnames = ["only"]
    with pytest.raises(ValueError, match="1 class"):
        ContinualTrainer(tiny_model(tasks), Watch(), broken, device="cpu", out_dir=str(tmp_path), batch_size=BS)
    assert calls == []


def test_primed_under_bf16_autocast(tasks, bank, tmp_path):
    """The model runs in bf16 under autocast; logits, losses and the guard stay float32."""
    seen = []

    class Spy(S.get("primed")):
        def training_loss(self, trainer, batch):
            loss = super().training_loss(trainer, batch)
            seen.append({k: v.dtype for k, v in loss.terms.items()})
            return loss

    res = run(tiny_model(tasks), Spy(siphon=siphon_for(bank), ref_batch_size=6), tasks, tmp_path, amp="bf16",
              iters_per_task=2)
    assert res["config"]["trainer"]["amp"] == "bf16"
    assert seen and all(d == torch.float32 for s in seen for d in s.values())
    log = [json.loads(x) for x in open(tmp_path / "train_log.jsonl")]
    assert all(all(v == v for v in x.values() if isinstance(v, float)) for x in log)


@pytest.mark.parametrize("retrieval,stages", [("dynamic", "dense-only"), ("uniform", "bm25-only")])
def test_primed_stages_reach_the_siphon_and_combine_with_retrieval(retrieval, stages, tasks, bank, tmp_path):
    siphon = siphon_for(bank)
    calls = []
    real_ref, real_uni = siphon.reference_set, siphon.uniform_set
    siphon.reference_set = lambda h, stages: calls.append(("dynamic", stages)) or real_ref(h, stages)
    siphon.uniform_set = lambda n, kw, stages: calls.append(("uniform", stages)) or real_uni(n, kw, stages)
    st = S.create("primed", siphon=siphon, ref_batch_size=6, retrieval=retrieval, stages=stages,
                  uniform_size=10, uniform_keywords=["circle", "red"])
    assert st.options()["stages"] == stages and S.create("primed").options()["stages"] == "multi-stage"
    run(tiny_model(tasks), st, tasks, tmp_path)
    assert calls == ([("dynamic", stages)] * 2 if retrieval == "dynamic" else [("uniform", stages)])
    with pytest.raises(ValueError, match="stages must be one of"):
        S.create("primed", stages="embedding-only")
