"""The evaluation setting ``prompts``: "ensemble" (default: every template, averaged)
or "first" (one prompt per class); the trainer evaluates with the configured one."""
import pytest
import torch

from mgcl.cl import ContinualTrainer, TrainConfig, zero_shot_head
from mgcl.cl.config import ConfigError
from mgcl.cl.evaluate import evaluate
from mgcl.cl.toy import toy_tasks, toy_vocabulary
from mgcl.models import TinyCLIP, WordTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(tasks):
    torch.manual_seed(0)
    tok = WordTokenizer.build(toy_vocabulary(tasks) + ["a photo of"], context_length=12)
    return TinyCLIP(tok, vision="cnn", image_size=32, vision_width=16, text_width=16, text_heads=2, text_layers=1,
                    embed_dim=16)


def test_heads_ensemble_and_first():
    tasks = toy_tasks(1, n_train=2, n_test=2, image_size=32)
    task = tasks[0]
    task.templates = ["a {}", "a photo of {}"]
    m = _model(tasks).eval()
    with torch.no_grad():
        per = [torch.nn.functional.normalize(m.encode_text(m.tokenize(task.prompts(t))), dim=-1) for t in (0, 1)]
    torch.testing.assert_close(zero_shot_head(m, task, "cpu"),
                               torch.nn.functional.normalize((per[0] + per[1]) / 2, dim=-1))
    torch.testing.assert_close(zero_shot_head(m, task, "cpu", prompts="first"), per[0])
    with pytest.raises(ValueError, match="prompts"):
        zero_shot_head(m, task, "cpu", prompts="all")


def test_train_config_prompts(tmp_path):
    assert TrainConfig().prompts == "ensemble"
    with pytest.raises(ConfigError, match=r"train\.prompts"):
        TrainConfig(prompts="second")
    tasks = toy_tasks(2, n_train=2, n_test=3, image_size=32)
    for t in tasks:
        t.templates = ["a {}", "a photo of {}"]
    z = {}
    for prompts in ("ensemble", "first"):
        res = ContinualTrainer(_model(tasks), "zero-shot", tasks, device="cpu", out_dir=str(tmp_path / prompts),
                               progress=False, batch_size=2, prompts=prompts).run()
        assert res["config"]["trainer"]["prompts"] == prompts
        z[prompts] = res["methods"]["zero-shot"]["zero_shot"]
    m = _model(tasks)
    for prompts, row in z.items():
        assert row == [evaluate(m, t, "cpu", prompts=prompts)["acc"] for t in tasks]
