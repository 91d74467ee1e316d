"""MGTIL metrics (SPEC.md section 7) and per-task scoring (accuracy, macro AUC)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mgcl.cl import evaluate, macro_auc, summarize, zero_shot_head
from mgcl.cl.toy import toy_tasks
from mgcl.models import TinyCLIP, WordTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = [[80, 45, 35], [70, 85, 32], [60, 75, 90]]


def test_worked_example():
    m = summarize(EXAMPLE)
    assert set(m) == {"transfer", "avg", "last", "bwt", "forgetting", "auc"}
    assert m["transfer"] == pytest.approx(39.25)  # (45 + (35+32)/2) / 2, not the upper-triangle mean 37.33
    assert m["avg"] == pytest.approx(63.5556, abs=1e-4)
    assert m["last"] == pytest.approx(75.0)
    assert m["bwt"] == pytest.approx(-15.0)
    assert m["forgetting"] == pytest.approx(15.0)
    assert m["auc"] is None


def test_edge_cases_t1_t2():
    m = summarize([[70.0]], auc=[81.0])
    assert m == {"transfer": None, "avg": 70.0, "last": 70.0, "bwt": None, "forgetting": None, "auc": 81.0}
    m = summarize([[80, 40], [60, 90]], auc=[[70, 50], [65, 95]])
    assert m["transfer"] == pytest.approx(40.0)
    assert m["avg"] == pytest.approx((70 + 65) / 2)
    assert m["last"] == pytest.approx(75.0)
    assert m["bwt"] == pytest.approx(-20.0)
    assert m["forgetting"] == pytest.approx(20.0)
    assert m["auc"] == pytest.approx(80.0)  # last row of the AUC matrix
    # forgetting starts at t = j: a task that improves later is not forgotten
    assert summarize([[50, 0], [60, 0]])["forgetting"] == pytest.approx(-10.0)


def test_forgetting_uses_the_best_earlier_row():
    R = [[50, 10, 10, 10], [70, 60, 10, 10], [65, 80, 70, 10], [40, 50, 60, 90]]
    m = summarize(R)
    # j=0: max(50,70,65)-40 = 30; j=1: max(60,80)-50 = 30; j=2: 70-60 = 10
    assert m["forgetting"] == pytest.approx(70 / 3)
    assert m["bwt"] == pytest.approx(((40 - 50) + (50 - 60) + (60 - 70)) / 3)
    assert m["transfer"] == pytest.approx((10 + 10 + 10) / 3)


def test_zero_shot_baseline_and_errors():
    z = [30.0, 40.0, 50.0]
    m = summarize(None, z=z)
    assert m["transfer"] == pytest.approx(45.0) and m["avg"] == pytest.approx(40.0) and m["last"] == pytest.approx(40.0)
    assert m["bwt"] == 0 and m["forgetting"] == 0
    with pytest.raises(ValueError, match="square"):
        summarize([[1, 2], [3]])
    with pytest.raises(ValueError, match="empty"):
        summarize([])
    with pytest.raises(ValueError, match="z has"):
        summarize(EXAMPLE, z=[1, 2])
    with pytest.raises(ValueError, match="auc has"):
        summarize(EXAMPLE, auc=[1, 2])
    with pytest.raises(ValueError):
        summarize(None)


@pytest.mark.parametrize("C", [2, 3, 7])
def test_macro_auc_matches_sklearn(C):
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(C)
    n = 200
    labels = torch.randint(0, C, (n,), generator=g)
    logits = torch.randn(n, C, generator=g) + 1.5 * F.one_hot(labels, C)
    logits = (logits * 4).round() / 4  # many ties
    probs = logits.softmax(-1)
    ours = macro_auc(probs, labels)
    if C == 2:
        ref = roc_auc_score(labels.numpy(), probs[:, 1].numpy())
    else:
        ref = roc_auc_score(labels.numpy(), probs.numpy(), multi_class="ovr", average="macro")
    assert ours == pytest.approx(ref, abs=1e-12)


def test_macro_auc_skips_absent_classes():
    from sklearn.metrics import roc_auc_score

    probs = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    labels = torch.tensor([0, 1, 0, 1])  # class 2 never occurs
    expect = np.mean([roc_auc_score(labels.numpy() == c, probs[:, c].numpy()) for c in (0, 1)])
    assert macro_auc(probs, labels) == pytest.approx(expect)
    assert np.isnan(macro_auc(probs, torch.zeros(4, dtype=torch.long)))


def test_macro_auc_at_scale_with_ties_and_a_class_without_positives():
    """n = 20,000, C = 15 (issue 19's size): equal to scikit-learn, many ties, class 4 never a label."""
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(19)
    n, C = 20_000, 15
    labels = torch.randint(0, C - 1, (n,), generator=g)
    labels[labels == 4] = C - 1
    logits = torch.randn(n, C, generator=g) + F.one_hot(labels, C)
    probs = ((logits * 2).round() / 2).softmax(-1)  # few distinct values: long runs of ties
    present = [c for c in range(C) if bool((labels == c).any())]
    assert 4 not in present
    ref = np.mean([roc_auc_score((labels == c).numpy(), probs[:, c].numpy()) for c in present])
    assert macro_auc(probs, labels) == pytest.approx(ref, abs=1e-12)
    # float32 probabilities, as evaluate() passes them, and numpy inputs give the same
    assert macro_auc(probs.float().numpy(), labels.numpy()) == pytest.approx(
        np.mean([roc_auc_score((labels == c).numpy(), probs.float()[:, c].numpy()) for c in present]), abs=1e-12)


def test_macro_auc_bad_input():
    with pytest.raises(ValueError, match="probs must be"):
        macro_auc(torch.rand(5, 3), torch.zeros(4, dtype=torch.long))
    probs = torch.rand(6, 2)
    probs[2, 1] = float("nan")
    assert np.isnan(macro_auc(probs, torch.tensor([0, 1, 0, 1, 0, 1])))


def test_arrays_and_tensors():
    m = summarize(np.array(EXAMPLE), auc=np.array([[1, 2, 3], [4, 5, 6], [70, 80, 90]]))
    assert m["transfer"] == pytest.approx(39.25) and m["auc"] == pytest.approx(80.0)
    assert summarize(torch.tensor(EXAMPLE, dtype=torch.float64), auc=torch.tensor([70.0, 80, 90]))["auc"] == \
        pytest.approx(80.0)


@pytest.fixture(scope="module")
def tiny():
    tasks = toy_tasks(2, n_train=4, n_test=10, image_size=32)
    tok = WordTokenizer.build([p for t in tasks for p in t.prompts(None)])
    torch.manual_seed(0)
    m = TinyCLIP(tok, vision="cnn", image_size=32, vision_width=16, text_width=16, text_heads=2, text_layers=1,
                 embed_dim=16)
    return m, tasks


def test_zero_shot_head_is_the_renormalised_template_mean(tiny):
    m, tasks = tiny
    task = tasks[0]
    head = zero_shot_head(m, task, "cpu")
    with torch.no_grad():
        per_template = [F.normalize(m.encode_text(m.tokenize([t.format(c) for c in task.classnames])), dim=-1)
                        for t in task.templates]
    expect = F.normalize(torch.stack(per_template).mean(0), dim=-1)
    torch.testing.assert_close(head, expect)
    assert head.shape == (len(task.classnames), 16)


def test_evaluate_scores_among_the_tasks_own_classes(tiny):
    from sklearn.metrics import roc_auc_score

    m, tasks = tiny
    task = tasks[1]
    out = evaluate(m, task, "cpu", batch_size=7)
    tf = m.transform(False)
    with torch.no_grad():
        x = torch.stack([tf(task.test[i][0]) for i in range(len(task.test))])
        y = torch.tensor([task.test[i][1] for i in range(len(task.test))])
        head = zero_shot_head(m, task, "cpu")
        p = (m.logit_scale.exp() * F.normalize(m.encode_image(x), dim=-1) @ head.T).softmax(-1)
    assert out["n"] == len(task.test)
    assert out["acc"] == pytest.approx(100 * float((p.argmax(1) == y).float().mean()))
    assert out["auc"] == pytest.approx(100 * roc_auc_score(y.numpy(), p.numpy(), multi_class="ovr"), abs=1e-6)
    assert m.training  # evaluate restores the mode


def test_templates_may_be_callables_or_one_string(tiny):
    from mgcl.cl import Task

    m, tasks = tiny
    t = tasks[0]
    fns = [lambda c, f=f: f.format(c) for f in t.templates]
    as_fn = Task(t.name, t.domain, t.classnames, fns, t.train, t.test)
    assert as_fn.prompts(None) == t.prompts(None)
    torch.testing.assert_close(zero_shot_head(m, as_fn, "cpu"), zero_shot_head(m, t, "cpu"))
    one = Task(t.name, t.domain, t.classnames, t.templates[0], t.train, t.test)
    assert one.templates == [t.templates[0]] and one.prompts(None) == t.prompts(0)
    with pytest.raises(ValueError, match="exactly one"):
        Task(t.name, t.domain, t.classnames, ["no slot"], t.train, t.test)
