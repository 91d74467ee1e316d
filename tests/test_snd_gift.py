"""SnD and GIFT: each trains on two tiny tasks, and each one's distinctive
mechanism: SnD's per-sample teacher weights follow the teachers' disagreement
(and only the image tower trains); GIFT's generated images are what its loss
sees (procedural mgtil-synth images and a tiny random diffusers pipeline built
here), with soft targets for repeated prompts, T = 2 and AWC between the two
backward passes."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mgcl.cl import ContinualTrainer, Task
from mgcl.cl import generators as G
from mgcl.cl import strategies as S
from mgcl.cl.strategies.gift import Gift, duplicate_targets
from mgcl.cl.strategies.snd import SnD, image_tower, selection_weights
from mgcl.cl.toy import toy_vocabulary
from mgcl.models import TinyCLIP, WordTokenizer
from test_cl_strategies import bank, siphon_for, tasks  # noqa: F401 - the toy tasks and bank fixtures
from test_cl_strategies import tiny_model as toy_model

pytestmark = pytest.mark.usefixtures("one_thread")

ITERS, BS = 4, 8


def run(model, strategy, tasks, tmp_path, **kw):
    args = dict(iters_per_task=ITERS, batch_size=BS, lr=1e-3, warmup=1, device="cpu", out_dir=str(tmp_path),
                log_every=2, progress=False, eval_batch_size=64)
    args.update(kw)
    return ContinualTrainer(model, strategy, tasks, **args).run()


def word_model(words, seed=0, image_size=32):
    torch.manual_seed(seed)
    tok = WordTokenizer.build(list(words), context_length=16)
    return TinyCLIP(tok, vision="cnn", image_size=image_size, vision_width=16, text_width=16, text_heads=2,
                    text_layers=1, embed_dim=16)


def check_two_task_result(res, name, tmp_path, keys):
    m = res["methods"][name]
    assert len(m["R"]) == 2 and all(len(r) == 2 for r in m["R"])
    assert all(0 <= a <= 100 for r in m["R"] for a in r)
    assert all(m[k] is not None for k in ("transfer", "avg", "last", "bwt", "forgetting", "auc"))
    log = [json.loads(x) for x in open(tmp_path / "train_log.jsonl")]
    assert len(log) == 2 * ITERS // 2
    assert all(k in log[-1] and math.isfinite(log[-1][k]) for k in keys), log[-1]
    return log


def test_registered():
    assert {"snd", "gift"} <= set(S.available())
    assert isinstance(S.create("snd"), SnD) and isinstance(S.create("gift"), Gift)
    with pytest.raises(ValueError, match="threshold"):
        S.create("snd", threshold=-1)
    with pytest.raises(ValueError, match="temperature"):
        S.create("gift", temperature=0)
    with pytest.raises(ValueError, match="unknown generator"):
        G.resolve("stable-diffusion")


# ---- SnD ---------------------------------------------------------------------------------------

def test_snd_trains_two_tasks_image_tower_only(tasks, bank, tmp_path):
    model = toy_model(tasks)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = S.create("snd", siphon=siphon_for(bank), uniform_size=12, uniform_keywords=["red", "circle", "left"],
                        ref_batch_size=6)
    assert strategy.needs_reference_set
    res = run(model, strategy, tasks, tmp_path)
    check_two_task_result(res, "snd", tmp_path, ("ce", "prev_kd", "pretrained_kd", "w_prev"))
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("visual.") for k in changed), changed  # the text tower is frozen
    assert set(strategy.trainable) == {n for n, _ in model.visual.named_parameters(prefix="visual")}
    assert not strategy.pretrained.training and not any(p.requires_grad for p in strategy.pretrained.parameters())


def test_snd_image_tower_probe_finds_the_visual_parameters(tasks):
    model = toy_model(tasks)
    model.visual.requires_grad_(False)  # the probe does not depend on requires_grad, and restores it
    names = image_tower(model, torch.device("cpu"))
    assert set(names) == {n for n, _ in model.named_parameters() if n.startswith("visual.")}
    assert not any(p.requires_grad for p in model.visual.parameters())


def test_snd_weights_follow_the_teachers_disagreement():
    torch.manual_seed(0)
    f_pre = F.normalize(torch.randn(6, 8), dim=-1)
    # the previous teacher's features rotated away from the initial one's by growing angles
    u = torch.randn(6, 8)
    u = F.normalize(u - (u * f_pre).sum(-1, keepdim=True) * f_pre, dim=-1)   # orthogonal to f_pre
    angle = torch.linspace(0, 2.0, 6)[:, None]
    moved = torch.cos(angle) * f_pre + torch.sin(angle) * u
    w = selection_weights(f_pre, moved, threshold=0.2, scale=6.0)
    d = (f_pre - moved).norm(dim=-1)
    torch.testing.assert_close(w, torch.sigmoid(6.0 * (d - 0.2)))
    assert torch.all(w[1:] > w[:-1]), "more disagreement, more weight on the previous teacher"
    assert abs(float(w[0]) - 1 / (1 + math.exp(1.2))) < 1e-6      # identical teachers: sigmoid(-1.2)


def test_snd_teachers_initial_and_previous(tasks, bank, tmp_path):
    """Task 1: both teachers are the initial model, so every weight is sigmoid(-1.2); task 2: the
    previous teacher is the model after task 1, the weights move with the disagreement."""
    checked = []

    class Spy(SnD):
        def before_task(self, trainer, t):
            super().before_task(trainer, t)
            now = trainer.model.state_dict()
            prev = self.reference.teacher_model.state_dict()
            assert all(torch.equal(prev[k], now[k]) for k in now)
            init = self.pretrained.state_dict()
            assert all(torch.equal(init[k], initial[k]) for k in initial)
            checked.append(t)

    model = toy_model(tasks)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = Spy(siphon=siphon_for(bank), uniform_size=12, uniform_keywords=["red", "circle", "left"],
                   ref_batch_size=6)
    run(model, strategy, tasks, tmp_path, lr=1e-2)
    assert checked == [0, 1]
    log = [json.loads(x) for x in open(tmp_path / "train_log.jsonl")]
    same = 1 / (1 + math.exp(1.2))
    assert all(abs(r["w_prev"] - same) < 1e-5 and r["selected"] == 0 for r in log if r["task"] == 0)
    assert all(abs(r["w_prev"] - same) > 1e-4 for r in log if r["task"] == 1)


# ---- GIFT --------------------------------------------------------------------------------------

def synth_tasks(n_per_class=4):
    """Two mgtil-synth tasks drawn in memory (x-ray, then histopathology)."""
    from mgcl.mgtil.benchmarks import SYNTH_TASKS
    from mgcl.mgtil.synth import render
    from PIL import Image

    tasks = []
    for k, st in enumerate((SYNTH_TASKS[0], SYNTH_TASKS[2])):
        split = {}
        for s, name in enumerate(("train", "test")):
            labels = [c for c in range(len(st.classes)) for _ in range(n_per_class)]
            ims = render(st.domain, np.array([st.classes[c][1] for c in labels]), (k, s), style=st.style)
            split[name] = [(Image.fromarray(im), y) for im, y in zip(ims, labels)]
        tasks.append(Task(st.name, st.domain, [c for c, _ in st.classes], list(st.templates), split["train"],
                          split["test"]))
    return tasks


@pytest.fixture(scope="module")
def synth():
    tasks = synth_tasks()
    words = [p for t in tasks for p in t.prompts(None)] + G.resolve("mgtil-synth").base_prompts
    return tasks, words


class Recording:
    """A generator that keeps what the wrapped one made."""

    def __init__(self, inner):
        self.inner, self.name, self.made = inner, f"recording:{inner.name}", []
        self.base_prompts = getattr(inner, "base_prompts", None)

    def generate(self, prompts, seed):
        out = self.inner.generate(prompts, seed)
        self.made.append((list(prompts), out))
        return out


def test_synth_generator_draws_class_and_base_prompts(synth):
    from mgcl.mgtil.synth import DOMAINS

    gen = G.resolve("mgtil-synth")
    tasks, _ = synth
    prompts = tasks[0].prompts(0) + gen.base_prompts[:3]
    a, b = gen.generate(prompts, 3), gen.generate(prompts, 3)
    assert len(a) == len(prompts) and all(im.size == (64, 64) and im.mode == "RGB" for im in a)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(gen.generate(prompts, 4)[0]))
    assert len(gen.base_prompts) == sum(len(d.findings) for d in DOMAINS.values())
    with pytest.raises(ValueError, match="cannot draw"):
        gen.generate(["a photo of a cat."], 0)


def test_gift_trains_two_tasks_on_generated_images(synth, tmp_path):
    tasks, words = synth
    gen = Recording(G.resolve("mgtil-synth"))
    strategy = S.create("gift", generator=gen, images_per_task=12, ref_batch_size=6)
    assert not strategy.needs_reference_set
    res = run(word_model(words), strategy, tasks, tmp_path)
    check_two_task_result(res, "gift", tmp_path, ("ce", "distill", "ita", "penalty"))
    assert res["methods"]["gift"]["strategy_options"]["generator"] == "recording:mgtil-synth"
    # task 1 replays the base prompts, task 2 those and the first task's class prompts
    (p1, _), (p2, _) = gen.made
    assert set(p1) <= set(gen.base_prompts) and set(p2) <= set(gen.base_prompts + tasks[0].prompts(0))
    assert len(p1) == len(p2) == 12


def test_gift_generated_images_reach_the_loss(synth, tmp_path):
    tasks, words = synth
    gen = Recording(G.resolve("mgtil-synth"))
    got = []

    class Spy(Gift):
        def replay_loss(self, trainer, images, tokens):
            out = super().replay_loss(trainer, images, tokens)
            got.append((trainer.t, images.clone(), tokens.clone(), [float(v.detach()) for v in out]))
            return out

    model = word_model(words)
    run(model, Spy(generator=gen, images_per_task=12, ref_batch_size=6, prefetch=0), tasks, tmp_path)
    assert len(got) == 2 * ITERS
    tf = model.transform(False)
    for t, (prompts, images) in enumerate(gen.made):
        made = torch.stack([tf(im) for im in images])
        batches = [g for g in got if g[0] == t]
        for _, x, tokens, (part, distill, ita) in batches:
            # every reference image is one the generator made for this task, with its own prompt's tokens
            match = (x[:, None] - made[None]).flatten(2).abs().amax(-1) == 0
            assert match.any(1).all()
            for i in range(len(x)):
                js = match[i].nonzero().flatten().tolist()
                assert any(torch.equal(tokens[i], model.tokenize([prompts[j]])[0]) for j in js)
            assert math.isfinite(part) and ita > 0 and abs(part - (distill + 0.25 * ita)) < 1e-4


def test_gift_loss_terms_temperature_and_soft_targets(synth):
    """The replay loss on one batch against GIFT's formulas written out: soft
    cross-entropy distillation at T = 2 (minus the teacher entropy: the KL) and
    the ITA cross-entropy with soft targets and label smoothing."""
    tasks, words = synth
    model, teacher = word_model(words, seed=1), word_model(words, seed=2)
    prompts = [tasks[0].prompts(0)[i] for i in (0, 1, 1, 2, 0, 3)]
    tokens = model.tokenize(prompts)
    Y = duplicate_targets(tokens)
    assert torch.equal(Y, Y.T) and torch.allclose(Y.sum(1), torch.ones(6))
    assert float(Y[1, 2]) == 0.5 and float(Y[0, 4]) == 0.5 and float(Y[3, 3]) == 1.0 and float(Y[0, 1]) == 0.0
    images = torch.randn(6, 3, 32, 32)

    class FakeTrainer:  # the trainer's helpers the loss uses, on plain modules
        train_config = type("C", (), {"label_smoothing": 0.2})()

        def __init__(self):
            self.model = model

        def fp32(self):
            return torch.autocast("cpu", enabled=False)

    g = Gift(generator="mgtil-synth")
    g.teacher = teacher
    part, distill, ita = g.replay_loss(FakeTrainer(), images, tokens)
    with torch.no_grad():
        s = model.logit_scale.exp()
        zs = s * F.normalize(model.encode_image(images), dim=-1) @ F.normalize(model.encode_text(tokens), dim=-1).T
        zt = s * F.normalize(teacher.encode_image(images), dim=-1) @ F.normalize(teacher.encode_text(tokens),
                                                                                dim=-1).T

        def soft_ce(t, st, T=2.0):       # GIFT's ``distillation``, minus the teacher entropy
            p = F.softmax(t / T, dim=1)
            return (F.cross_entropy(st / T, p) + (p * p.log()).sum(1).mean()) * T * T

        want_distill = soft_ce(zt, zs) + soft_ce(zt.T, zs.T)
        want_ita = F.cross_entropy(zs, Y, label_smoothing=0.2) + F.cross_entropy(zs.T, Y, label_smoothing=0.2)
    torch.testing.assert_close(distill.detach(), want_distill, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ita.detach(), want_ita, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(part.detach(), want_distill + 0.25 * want_ita, rtol=1e-4, atol=1e-5)


def test_gift_awc_reads_the_replay_gradient_mean_normalised(synth, tmp_path):
    """Between the replay and the CE backward: grad += 2 * l2 * (g^2 / mean g^2) * (p - p*) per tensor."""
    tasks, words = synth
    checked = []

    class Spy(Gift):
        def after_backward(self, trainer, part):
            if part == 0 and trainer.t == 1 and trainer.step == ITERS - 1:
                g = [p.grad.detach().clone() for p in trainer.params]
                anchors = [a.detach().clone() for a in self.guard.fisher_guard.anchors]
                super().after_backward(trainer, part)
                for p, g0, a in zip(trainer.params, g, anchors):
                    W = g0 ** 2 / (g0 ** 2).mean()
                    if torch.isfinite(W).all() and (p.detach() != a).any():
                        torch.testing.assert_close(p.grad, g0 + 2 * 1.0 * W * (p.detach() - a), rtol=1e-4,
                                                   atol=1e-7)
                        checked.append(p.numel())
            else:
                super().after_backward(trainer, part)

    run(word_model(words), Spy(generator="mgtil-synth", images_per_task=12, ref_batch_size=6), tasks, tmp_path)
    assert checked


# ---- the diffusers adapter -------------------------------------------------------------------

def tiny_pipeline(path):
    """A randomly initialised Stable Diffusion pipeline (a few thousand weights), saved to ``path``."""
    import string

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    # a byte-level BPE vocabulary of single letters (no merges): every prompt gets its own tokens
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for c in string.ascii_lowercase + string.digits + ".,":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (path / "_vocab").mkdir(parents=True)
    (path / "_vocab" / "vocab.json").write_text(json.dumps(vocab))
    (path / "_vocab" / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "_vocab" / "vocab.json"), str(path / "_vocab" / "merges.txt"), model_max_length=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                        bos_token_id=0, pad_token_id=1, eos_token_id=2))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok,
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path / "pipe"))
    return str(path / "pipe")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    pytest.importorskip("diffusers")
    return tiny_pipeline(tmp_path_factory.mktemp("tinysd"))


def test_diffusers_adapter_loads_a_local_pipeline(pipeline_dir, tmp_path):
    gen = G.resolve(f"diffusers:{pipeline_dir}")
    assert isinstance(gen, G.DiffusersGenerator) and isinstance(gen, G.ImageGenerator)
    gen.steps = 2
    prompts = ["a red circle.", "a blue square.", "a red circle."]
    a = gen.generate(prompts, 11)
    assert len(a) == 3 and all(im.mode == "RGB" and im.size == (16, 16) for im in a)
    b = gen.generate(prompts, 11)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b)), "deterministic per seed"
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[2])), "each image its own noise"
    with pytest.raises(ValueError, match="not a directory"):
        G.resolve(f"diffusers:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="cannot load"):
        G.DiffusersGenerator(str(tmp_path))


def test_gift_with_a_diffusers_pipeline_trains_two_tasks(pipeline_dir, tasks, tmp_path):
    gen = Recording(G.DiffusersGenerator(pipeline_dir, steps=2))
    words = toy_vocabulary(tasks)
    strategy = S.create("gift", generator=gen, images_per_task=6, ref_batch_size=3,
                        base_prompts=["a photo of a circle.", "a photo of a square."])
    res = run(word_model(words), strategy, tasks, tmp_path)
    check_two_task_result(res, "gift", tmp_path, ("ce", "distill", "ita", "penalty"))
    base = {"a photo of a circle.", "a photo of a square."}
    (p1, i1), (p2, i2) = gen.made
    assert set(p1) <= base and set(p2) <= base | set(tasks[0].prompts(0)) and len(i1) == len(i2) == 6


def test_gift_checks_the_prompts_before_training(tasks, tmp_path):
    with pytest.raises(ValueError, match="mgtil-synth generator: cannot draw .*circle"):
        ContinualTrainer(toy_model(tasks), S.create("gift"), tasks, device="cpu", out_dir=str(tmp_path),
                         batch_size=4, progress=False)
    assert not (tmp_path / "train_log.jsonl").exists()


def test_toy_generator_draws_what_the_prompt_names():
    from mgcl.cl.toy import COLOURS, ToyGenerator

    gen = ToyGenerator(image_size=32)
    assert isinstance(gen, G.ImageGenerator)
    red, blue = gen.generate(["a red circle on the left.", "a blue square."], 5)
    count = lambda im, c: int((np.abs(np.asarray(im, np.int32) - np.array(c)).sum(-1) < 30).sum())  # noqa: E731
    assert count(red, COLOURS["red"]) > 20 and count(red, COLOURS["blue"]) == 0
    assert count(blue, COLOURS["blue"]) > 20 and count(blue, COLOURS["red"]) == 0
    left = np.asarray(red, np.int32)
    assert count(left[:, :16], COLOURS["red"]) > count(left[:, 16:], COLOURS["red"])
    again = gen.generate(["a red circle on the left.", "a blue square."], 5)
    assert np.array_equal(np.asarray(again[0]), np.asarray(red))


def test_synthetic_pairs_drop_blank_images():
    from PIL import Image

    class Blanks:
        name = "blanks"

        def generate(self, prompts, seed):
            return [Image.new("RGB", (8, 8), (0, 0, 0) if i % 2 else (9, 9, 9)) for i, _ in enumerate(prompts)]

    pairs = G.synthetic_pairs(Blanks(), ["x", "y"], 10, 0, lambda im: torch.tensor(np.asarray(im)), chunk=4)
    assert len(pairs) == 5 and pairs.dropped == 5 and "5 blank images dropped" in repr(pairs)
    img, prompt, w = pairs[0]
    assert prompt in ("x", "y") and w == 1.0 and int(img.max()) == 9
    with pytest.raises(ValueError, match="empty"):
        G.synthetic_pairs(Blanks(), [], 4, 0, lambda im: im)
