"""mgcl.integrations: the guarded step inside a transformers Trainer and a Lightning
Trainer (CPU, tiny random models): accumulation gives W from the accumulated
distillation gradient, equal to mgcl's own guarded loop and to one step on the
concatenated batch; the terms reach each framework's log; the examples run."""
import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import mgcl
from mgcl.integrations import PrimedLosses
from mgcl.models import HFCLIP, TinyCLIP, WordTokenizer
from mgcl.nn import PrimedLoss

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "a photo of red green blue circle square triangle chest x-ray lesion".split()


class Ref:
    def __init__(self, images, tokens, weights):
        self.images, self.tokens, self.weights = images, tokens, weights


def references(tokenize, size, n=4, seed=0):
    """An endless, deterministic iterator of reference batches (a fresh one per call)."""
    g = torch.Generator().manual_seed(seed)
    batches = [Ref(torch.randn(n, 3, size, size, generator=g),
                   tokenize([" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (5,), generator=g))
                             for _ in range(n)]),
                   torch.rand(n, generator=g) + 0.5) for _ in range(3)]
    while True:
        yield from batches


def task_items(size, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"images": torch.randn(3, size, size, generator=g), "labels": int(torch.randint(0, 3, (), generator=g))}
            for _ in range(n)]


def moved(model, seed=3, sd=0.05):
    """The student a little off the teacher's weights, so the guard acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(sd * torch.randn(p.shape, generator=g))
    return model


def student_and_teacher(base):
    """(student, teacher, class tokens): the teacher a frozen copy of ``base``, the student moved off it."""
    teacher = copy.deepcopy(base).eval().requires_grad_(False)
    student = moved(base)
    return student, teacher, student.tokenize([f"a photo of {c}" for c in ("red", "green", "blue")])


def primed_losses(student, teacher, tokens):
    """PRIMED's losses with a fresh (so replayable) iterator of reference batches."""
    return PrimedLosses(teacher, tokens, references(student.tokenize, 16), PrimedLoss(alpha=1.0, beta=0.25))


def recorded_primed(base):
    """(student, a factory of fresh PRIMED losses, a Recording of one for the trainer under test)."""
    base, teacher, tokens = student_and_teacher(base)

    def primed():
        return primed_losses(base, teacher, tokens)
    return base, primed, Recording(primed())


class Recording:
    """Wraps a losses callable; remembers each micro-batch's inputs (to replay them)."""

    def __init__(self, losses):
        self.losses, self.seen = losses, []

    def __call__(self, model, inputs):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return self.losses(model, inputs)


def replay(student, losses, seen, groups, lr, guard_options):
    """mgcl's own guarded loop (FisherGuard's documented accumulation recipe) over
    the micro-batches ``seen``, in steps of ``groups`` micro-batches each."""
    guard = mgcl.FisherGuard([p for p in student.parameters() if p.requires_grad], **guard_options)
    opt = torch.optim.SGD(student.parameters(), lr=lr)
    pens, i = [], 0
    for n in groups:
        for inputs in seen[i:i + n]:
            out = losses(student, inputs)
            guard.backward(out.distill / n, out.ce / n)
        i += n
        pens.append(float(guard.apply()))
        opt.step()
        opt.zero_grad()
    return pens


def assert_same_weights(a, b):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def moved_a_lot(a, b):
    return max(float((x - y).detach().abs().max()) for x, y in zip(a.parameters(), b.parameters())) > 1e-4


# ---- transformers ---------------------------------------------------------------------


def tiny_hf_clip():
    from transformers import CLIPConfig

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=12,
                                      bos_token_id=2, eos_token_id=3, pad_token_id=0),  # WordTokenizer's ids
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8),
                     projection_dim=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HFCLIP(cfg, tokenizer=WordTokenizer.build(WORDS, context_length=12))


def hf_args(tmp_path, **kw):
    from transformers import TrainingArguments

    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
                learning_rate=0.05, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    args.update(kw)
    return TrainingArguments(**args)


def hf_train(student, losses, data, args, guard_options):
    from mgcl.integrations.transformers import PrimedTrainer

    opt = torch.optim.SGD(student.parameters(), lr=args.learning_rate)
    trainer = PrimedTrainer(model=student, args=args, train_dataset=data, losses=losses, guard=dict(guard_options),
                            optimizers=(opt, None))
    trainer.train()
    return trainer


GUARD = {"lam": 30.0, "mode": "dfg"}


def test_hf_trainer_accumulation_is_mgcl_guarded_loop(tmp_path):
    """gradient_accumulation_steps = 2 (plus a one-micro-batch last step): the
    weights after the Trainer equal mgcl's guarded loop over the same micro-batches
    (W from the accumulated g_kd), and the terms reach the Trainer's log."""
    base, primed, rec = recorded_primed(tiny_hf_clip())
    student = copy.deepcopy(base)
    trainer = hf_train(student, rec, task_items(16, 12), hf_args(tmp_path, max_steps=-1, num_train_epochs=1),
                       GUARD)
    assert [len(x["images"]) for x in rec.seen] == [4, 4, 4]
    again = copy.deepcopy(base)
    pens = replay(again, primed(), rec.seen, [2, 1], 0.05, GUARD)
    assert_same_weights(student, again)
    assert moved_a_lot(student, base)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all({"ce", "ckt", "cmc", "distill", "penalty"} <= set(h) for h in logs)
    assert pens[0] == 0 and pens[1] > 0, "the anchors are the weights at the start: no penalty in step 1"
    assert [h["penalty"] for h in logs] == pytest.approx(pens, rel=1e-5)
    # with W taken per micro-batch (the bug the guarded step fixes) the weights would differ
    wrong = copy.deepcopy(base)
    replay(wrong, primed(), rec.seen, [1, 1, 1], 0.05, GUARD)
    assert moved_a_lot(wrong, student)


def per_sample_losses(teacher, tokens):
    """A loss that splits over samples (CE + a per-sample feature distillation), so
    micro-batches (each / N) must give the step of their concatenation."""
    def losses(model, inputs):
        images = inputs["images"]
        img = F.normalize(model.encode_image(images).float(), dim=-1)
        head = F.normalize(model.encode_text(tokens).float(), dim=-1)
        ce = F.cross_entropy(model.logit_scale.exp() * img @ head.T, inputs["labels"])
        with torch.no_grad():
            want = F.normalize(teacher.encode_image(images).float(), dim=-1)
        distill = ((img - want) ** 2).sum(1).mean()
        return {"distill": distill, "ce": ce}
    return losses


def test_hf_trainer_accumulation_equals_one_step_on_the_concatenated_batch(tmp_path):
    base = tiny_hf_clip()
    base, teacher, tokens = student_and_teacher(base)
    data = task_items(16, 8)
    out = []
    for bs, ga in ((8, 1), (4, 2), (2, 4)):
        student = copy.deepcopy(base)
        hf_train(student, per_sample_losses(teacher, tokens), data,
                 hf_args(tmp_path / str(ga), per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                         max_steps=1), GUARD)
        out.append(student)
    assert moved_a_lot(out[0], base)
    assert_same_weights(out[1], out[0])
    assert_same_weights(out[2], out[0])


def test_hf_trainer_bad_arguments(tmp_path):
    from mgcl.integrations.transformers import PrimedTrainer

    m = tiny_hf_clip()
    with pytest.raises(ValueError, match="losses must be a callable"):
        PrimedTrainer(model=m, args=hf_args(tmp_path), train_dataset=task_items(16, 4), losses=None, guard=GUARD)
    t = PrimedTrainer(model=m, args=hf_args(tmp_path), train_dataset=task_items(16, 8),
                      losses=lambda model, inputs: {"ce": torch.zeros(())}, guard={"mode": "dfg"})
    with pytest.raises(ValueError, match="guard must be a mgcl.FisherGuard or a dict"):
        t.train()


# ---- lightning ------------------------------------------------------------------------


def tiny_clip():
    # vision_width 16, not 8: at width 8 the last block's GroupNorm has one channel per group over a 1x1 map,
    # so its output is exactly its bias and the gradient into the image tower below it is rounding noise
    # (50-70% of the weights' movement differed between batch splits on an AVX-512 Xeon)
    torch.manual_seed(0)
    return TinyCLIP(WordTokenizer.build(WORDS, context_length=8), vision="cnn", image_size=16, vision_width=16,
                    text_width=8, text_heads=2, text_layers=1, embed_dim=8)


def lightning_fit(student, losses, data, batch_size, accumulate, lr, epochs=1):
    import lightning as L

    from mgcl.integrations.lightning import GuardedModule

    class Module(GuardedModule, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.student, self.guard, self.accumulate = student, dict(GUARD), accumulate

        def compute_losses(self, batch):
            return losses(self.student, batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.student.parameters(), lr=lr)

    module = Module()
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    return trainer


def test_lightning_accumulation_is_mgcl_guarded_loop():
    base, primed, rec = recorded_primed(tiny_clip())
    student = copy.deepcopy(base)
    trainer = lightning_fit(student, rec, task_items(16, 12), 4, 2, 0.05)  # groups of 2, then 1
    assert [len(x["images"]) for x in rec.seen] == [4, 4, 4] and trainer.global_step == 2
    again = copy.deepcopy(base)
    pens = replay(again, primed(), rec.seen, [2, 1], 0.05, GUARD)
    assert_same_weights(student, again)
    assert moved_a_lot(student, base)
    logged = trainer.callback_metrics
    assert {"ce", "ckt", "cmc", "distill", "penalty"} <= set(logged)
    assert float(logged["penalty"]) == pytest.approx(pens[-1], rel=1e-5)


def test_lightning_accumulation_equals_one_step_on_the_concatenated_batch():
    base = tiny_clip()
    base, teacher, tokens = student_and_teacher(base)
    data = task_items(16, 8)
    out = []
    for bs, acc in ((8, 1), (4, 2), (2, 4)):
        student = copy.deepcopy(base)
        lightning_fit(student, per_sample_losses(teacher, tokens), data, bs, acc, 0.05)
        out.append(student)
    assert moved_a_lot(out[0], base)
    assert_same_weights(out[1], out[0])
    assert_same_weights(out[2], out[0])


# ---- the examples and the import rule --------------------------------------------------


@pytest.mark.parametrize("example", ["hf_trainer_primed.py", "lightning_primed.py"])
def test_example_runs(example, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", example), "--steps", "2", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "penalty" in r.stdout and "ce" in r.stdout


def test_importing_mgcl_imports_neither_framework():
    code = ("import sys, mgcl, mgcl.integrations; "
            "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
