"""The strategy extensions of the trainer: wrapping the model, choosing the
trainable parameters in groups with their own learning rates, the optimizer,
and taking part in evaluation (task-aware, or routing on the images)."""
import copy

import pytest
import torch

from mgcl.cl import ContinualTrainer
from mgcl.cl.evaluate import evaluate_all, head_logits, zero_shot_head
from mgcl.cl.strategies.base import OptimizerSpec, ParamGroup, Strategy
from mgcl.cl.toy import toy_tasks, toy_vocabulary
from mgcl.models import TinyCLIP, WordTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(iters_per_task=4, batch_size=6, lr=2e-3, warmup=1, device="cpu", log_every=2, progress=False,
          eval_batch_size=64)


@pytest.fixture(scope="module")
def tasks3():
    return toy_tasks(3, n_train=5, n_test=4, image_size=32)


def tiny_model(tasks, seed=0):
    torch.manual_seed(seed)
    tok = WordTokenizer.build(toy_vocabulary(tasks), context_length=12)
    return TinyCLIP(tok, vision="cnn", image_size=32, vision_width=16, text_width=16, text_heads=2, text_layers=1,
                    embed_dim=16)


class Adapted(torch.nn.Module):
    """A VLM with a residual linear adapter on the image features (zero at the start)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        d = inner.encode_image(torch.zeros(1, 3, 32, 32)).shape[-1]
        self.adapter = torch.nn.Linear(d, d)
        torch.nn.init.zeros_(self.adapter.weight)
        torch.nn.init.zeros_(self.adapter.bias)
        self.logit_scale = inner.logit_scale

    def encode_image(self, images):
        f = self.inner.encode_image(images)
        return f + self.adapter(f)

    def encode_text(self, tokens):
        return self.inner.encode_text(tokens)

    def tokenize(self, texts):
        return self.inner.tokenize(texts)

    def transform(self, train):
        return self.inner.transform(train)


class AdapterSGD(Strategy):
    """Backbone frozen; the adapter's weight and bias in two groups (their own lr), SGD."""

    name = "adapter-sgd"

    def __init__(self, lr_weight: float = 0.05, lr_bias: float = 0.01):
        self.lr_weight, self.lr_bias = lr_weight, lr_bias
        self.seen_lrs = []

    def wrap_model(self, trainer, model):
        return Adapted(model)

    def param_groups(self, trainer, t):
        return [ParamGroup(["adapter.weight"], lr=self.lr_weight), ParamGroup(["adapter.bias"], lr=self.lr_bias,
                                                                              weight_decay=0.0)]

    def optimizer(self, trainer, t):
        return OptimizerSpec("sgd", momentum=0.9)

    def after_step(self, trainer, step):
        self.seen_lrs.append([g["lr"] for g in trainer.optimizer.param_groups])


def test_wrapped_model_groups_and_sgd(tasks3, tmp_path):
    model = tiny_model(tasks3)
    before = copy.deepcopy(model.state_dict())
    z_plain, _ = evaluate_all(model, tasks3, "cpu")
    strat = AdapterSGD()
    tr = ContinualTrainer(model, strat, tasks3, out_dir=str(tmp_path), **KW)
    res = tr.run()["methods"]["adapter-sgd"]
    assert isinstance(tr.model, Adapted) and tr.model.inner is model
    assert res["zero_shot"] == z_plain, "a zero adapter leaves the zero-shot row as it was"
    assert isinstance(tr.optimizer, torch.optim.SGD) and tr.optimizer.defaults["momentum"] == 0.9
    assert tr.param_names == ["adapter.weight", "adapter.bias"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k}: the backbone is frozen"
    assert tr.model.adapter.weight.abs().sum() > 0, "the adapter trained"
    assert not any(p.requires_grad for p in model.parameters())
    # every group follows the schedule from its own base lr
    for step, lrs in enumerate(strat.seen_lrs[:KW["iters_per_task"]]):
        assert lrs == [tr.lr_at(step, 0.05), tr.lr_at(step, 0.01)]
    assert res["R"][-1] != res["zero_shot"], "the adapter changed what evaluation sees"
    # the checkpoint holds the adapter: a resumed (finished) run reports the same rows
    again = ContinualTrainer(tiny_model(tasks3, seed=5), AdapterSGD(), tasks3, out_dir=str(tmp_path), resume=True,
                             **KW).run()["methods"]["adapter-sgd"]
    assert again["R"] == res["R"]


class PerTask(Strategy):
    """Task t trains only the text tower (t even) or only the image tower (t odd): groups change per task."""

    name = "per-task"

    def __init__(self):
        self.optimizers = []

    def param_groups(self, trainer, t):
        tower = "text." if t % 2 == 0 else "visual."
        return [ParamGroup([n for n, _ in trainer.model.named_parameters() if n.startswith(tower)])]

    def before_task(self, trainer, t):
        self.snapshot = copy.deepcopy(trainer.model.state_dict())

    def after_task(self, trainer, t):
        self.optimizers.append(id(trainer.optimizer))
        frozen = "visual." if t % 2 == 0 else "text."
        for k, v in trainer.model.state_dict().items():
            if k.startswith(frozen):
                assert torch.equal(v, self.snapshot[k]), f"task {t}: {k} is frozen"


def test_groups_change_per_task_and_renew_the_optimizer(tasks3, tmp_path):
    strat = PerTask()
    full = ContinualTrainer(tiny_model(tasks3), strat, tasks3, out_dir=str(tmp_path / "a"), reset_optimizer=False,
                            **KW).run()["methods"]["per-task"]
    assert len(set(strat.optimizers)) == 3, "new groups, new optimizer, even with reset_optimizer false"

    class Crash(PerTask):
        def before_task(self, trainer, t):
            if t == 2:
                raise KeyboardInterrupt
            super().before_task(trainer, t)

    with pytest.raises(KeyboardInterrupt):
        ContinualTrainer(tiny_model(tasks3), Crash(), tasks3, out_dir=str(tmp_path / "b"), reset_optimizer=False,
                         **KW).run()
    resumed = ContinualTrainer(tiny_model(tasks3), PerTask(), tasks3, out_dir=str(tmp_path / "b"),
                               reset_optimizer=False, resume=True, **KW).run()["methods"]["per-task"]
    assert resumed["R"] == full["R"], "the optimizer is rebuilt from the groups it was saved with"


class Routed(Strategy):
    """Evaluation routes every image to a frozen copy of the initial model
    (as a selector that picks the 'initial expert' would), ignoring the task
    id for the features; records the task ids the hooks saw."""

    name = "routed"

    def __init__(self):
        self.calls = []

    def setup(self, trainer):
        from mgcl.cl.strategies.base import frozen_copy

        self.expert = frozen_copy(trainer.model)

    def eval_head(self, trainer, task):
        self.calls.append(("head", task))
        return zero_shot_head(self.expert, trainer.tasks[task], trainer.device)

    def eval_logits(self, trainer, images, task, head):
        assert not torch.is_grad_enabled() and not trainer.model.training
        self.calls.append(("logits", task))
        return head_logits(self.expert.encode_image(images), head, self.expert.logit_scale)


def test_evaluation_hooks_route_without_the_task_id(tasks3, tmp_path):
    strat = Routed()
    res = ContinualTrainer(tiny_model(tasks3), strat, tasks3, out_dir=str(tmp_path), **KW).run()["methods"]["routed"]
    assert all(row == res["zero_shot"] for row in res["R"]), "every image scored by the initial expert"
    heads = [t for kind, t in strat.calls if kind == "head"]
    assert heads == [0, 1, 2] * 4, "the zero-shot row and every row after a task, each task in turn"
    assert {t for kind, t in strat.calls if kind == "logits"} == {0, 1, 2}
    # the default hooks score as evaluate() does: finetune's rows equal a plain evaluation of its model
    tr = ContinualTrainer(tiny_model(tasks3), "finetune", tasks3, out_dir=str(tmp_path / "ft"), **KW)
    last = tr.run()["methods"]["finetune"]["R"][-1]
    assert last == evaluate_all(tr.model, tasks3, "cpu")[0]


def test_bad_hooks_fail_in_one_line(tasks3, tmp_path):
    class Unknown(Strategy):
        name = "unknown"

        def param_groups(self, trainer, t):
            return [ParamGroup(["no.such.weight"])]

    class Twice(Strategy):
        name = "twice"

        def param_groups(self, trainer, t):
            first = next(iter(trainer.model.named_parameters()))[0]
            return [ParamGroup([first]), ParamGroup([first])]

    class Empty(Strategy):
        name = "empty"

        def param_groups(self, trainer, t):
            return []

    class NotAModule(Strategy):
        name = "not-a-module"

        def wrap_model(self, trainer, model):
            return lambda x: x

    for strat, msg in ((Unknown(), "unknown parameter"), (Twice(), "twice"), (Empty(), "no trainable"),
                       (NotAModule(), "nn.Module")):
        with pytest.raises(ValueError, match=msg):
            ContinualTrainer(tiny_model(tasks3), strat, tasks3[:2], out_dir=str(tmp_path / strat.name), **KW).run()
    for kw, msg in (({"kind": "adam"}, "kind"), ({"kind": "sgd", "momentum": 1.0}, "momentum"),
                    ({"nesterov": True}, "nesterov")):
        with pytest.raises(ValueError, match=msg):
            OptimizerSpec(**kw)

