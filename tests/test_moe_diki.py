"""MoE-Adapters and DIKI: the model surgery, two tiny tasks through the
trainer, and each method's distinctive mechanism (MoE-Adapters: experts
frozen per task, new data through the new task's router, DDAS routing
without the task id; DIKI: the right task's prompts chosen on separable
data, and the calibration weight)."""
import numpy as np
import pytest
import torch
from PIL import Image

from mgcl.cl import ContinualTrainer
from mgcl.cl.strategies import available, create, get
from mgcl.cl.toy import toy_tasks, toy_vocabulary
from mgcl.cl.tasks import Task
from mgcl.models import TinyCLIP, WordTokenizer
from mgcl.models.surgery import Adapted, Experts, PrefixKV, depth_count, widths

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(iters_per_task=6, batch_size=8, warmup=0, device="cpu", log_every=3, progress=False, eval_batch_size=64)


class Tinted(torch.utils.data.Dataset):
    """A toy dataset with every image shifted towards one colour: tasks that are
    separable by their image distribution."""

    def __init__(self, base, rgb):
        self.base, self.rgb = base, np.array(rgb, dtype=np.float32)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        a = 0.4 * np.asarray(img, dtype=np.float32) + 0.6 * self.rgb
        return Image.fromarray(a.clip(0, 255).astype(np.uint8)), label


def separable_tasks(n_train=12, n_test=6):
    tasks = toy_tasks(2, n_train=n_train, n_test=n_test, image_size=32)
    out = []
    for t, rgb in zip(tasks, ((250, 250, 250), (0, 0, 0))):
        out.append(Task(name=t.name, domain=t.domain, classnames=t.classnames, templates=t.templates,
                        train=Tinted(t.train, rgb), test=Tinted(t.test, rgb)))
    return out


def vit(tasks, seed=0):
    torch.manual_seed(seed)
    tok = WordTokenizer.build(toy_vocabulary(tasks), context_length=12)
    return TinyCLIP(tok, vision="vit", image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
                    text_width=32, text_layers=2, text_heads=2, embed_dim=16)


def run_frozen(strategy, tasks, tmp_path):
    """Run ``strategy`` on a ViT TinyCLIP over ``tasks``; every backbone weight must stay as it was."""
    model = vit(tasks)
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    tr = ContinualTrainer(model, strategy, tasks, out_dir=str(tmp_path), **KW)
    res = tr.run()
    for p, s in zip(params, saved):
        assert torch.equal(p, s)
    return tr, res


# ---- surgery --------------------------------------------------------------------------------


def test_surgery_starts_as_the_backbone_and_route_minus_one_is_the_backbone():
    tasks = toy_tasks(2, n_train=2, n_test=2, image_size=32)
    m = vit(tasks).eval()
    x, tok = torch.randn(3, 3, 32, 32), m.tokenize(tasks[0].prompts(0))
    with torch.no_grad():
        img, txt = m.encode_image(x), m.encode_text(tok)
    w, d = widths(m), depth_count(m)
    a = Adapted(m, experts={k: [Experts(w[k], 2, 4, 2) for _ in range(d[k])] for k in w},
                prefix={k: [PrefixKV(w[k], 2, 3) for _ in range(d[k])] for k in w}).eval()
    with torch.no_grad():
        with a.routing(0):  # zero-initialised up-projections and prompt values: nothing added yet
            torch.testing.assert_close(a.encode_image(x), img)
            torch.testing.assert_close(a.encode_text(tok), txt)
        for k in w:
            for b in a.blocks(k):
                b.experts.adapters[1].up.weight.normal_()
                b.prefix.prompts[1].data[1].normal_()
        with a.routing(torch.tensor([1, -1, 1])):
            out = a.encode_image(x)
        torch.testing.assert_close(out[1], img[1])            # route -1: the pre-trained model
        assert (out[0] - img[0]).abs().max() > 1e-3
        with a.routing(1, 0.0):                               # weight 0: the prompts add nothing
            for b in a.blocks("image"):
                b.experts.adapters[1].up.weight.zero_()
            torch.testing.assert_close(a.encode_image(x), img)


def test_surgery_refuses_a_model_without_transformer_towers():
    tasks = toy_tasks(2, n_train=4, n_test=2, image_size=32)
    cnn = TinyCLIP(WordTokenizer.build(toy_vocabulary(tasks)), vision="cnn", image_size=32, vision_width=16,
                   text_width=16, text_heads=2, text_layers=1, embed_dim=16)
    for name in ("moe-adapters", "diki"):
        with pytest.raises(ValueError, match="CNN"):
            ContinualTrainer(cnn, name, tasks, out_dir="unused", **KW)


def test_both_are_registered_and_check_their_options():
    assert {"moe-adapters", "diki"} <= set(available())
    assert get("moe-adapters").needs_transformer_towers and get("diki").needs_transformer_towers
    with pytest.raises(ValueError, match="top_k"):
        create("moe-adapters", top_k=30)
    with pytest.raises(ValueError, match="ddas_route"):
        create("moe-adapters", ddas_route="task")
    with pytest.raises(ValueError, match="momentum"):
        create("diki", momentum=1.5)
    with pytest.raises(ValueError, match="depth"):
        create("diki", depth_image=0, depth_text=0)
    tasks = toy_tasks(2, n_train=4, n_test=2, image_size=32)
    with pytest.raises(ValueError, match="missing"):
        ContinualTrainer(vit(tasks), create("moe-adapters", lr={tasks[0].name: 1e-3}), tasks, out_dir="unused", **KW)
    with pytest.raises(ValueError, match="2 tasks"):
        ContinualTrainer(vit(tasks), create("moe-adapters", lr=[1e-3]), tasks, out_dir="unused", **KW)


# ---- MoE-Adapters -----------------------------------------------------------------------------


def test_moe_adapters_trains_two_tasks_with_the_backbone_frozen(tmp_path):
    tasks = toy_tasks(2, n_train=4, n_test=3, image_size=32)
    strat = create("moe-adapters", lr={tasks[0].name: 5e-3, tasks[1].name: 1e-3}, n_experts=4, ddas_iters=5)
    tr, res = run_frozen(strat, tasks, tmp_path)
    R = res["methods"]["moe-adapters"]["R"]
    assert len(R) == 2 and all(len(r) == 2 for r in R)
    assert [g["lr"] for g in tr.optimizer.param_groups] == [pytest.approx(tr.lr_at(KW["iters_per_task"] - 1, 1e-3))]
    assert len(strat.autoencoders) == 2


def test_moe_adapters_freezes_the_most_used_experts_and_trains_the_new_router(tmp_path):
    tasks = separable_tasks()
    strat = create("moe-adapters", lr=1e-2, n_experts=6, top_k=2, ddas_iters=60)
    tr = ContinualTrainer(vit(tasks), strat, tasks, out_dir=str(tmp_path), loggers=[],  # driven step by step
                          **{**KW, "iters_per_task": 8})
    tr.start()
    tr.begin_task(0)
    tr._train_task(0)
    counts = {(tw, i): ex.counts.clone() for tw, i, ex in strat._experts(tr)}
    strat.after_task(tr, 0)
    # the two experts each block's router picked most often during task 0 are frozen
    for (tw, i), c in counts.items():
        assert c.sum() > 0
        top = set(torch.topk(c, 2).indices.tolist())
        assert {e for (t2, j, e) in strat.frozen if (t2, j) == (tw, i)} == top
    snap = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.begin_task(1)
    trainable = set(tr.param_names)
    tr._train_task(1)
    names = {id(p): n for n, p in tr.model.named_parameters()}
    moved = {n for n, p in tr.model.named_parameters() if not torch.equal(p, snap[n])}
    for tw, i, ex in strat._experts(tr):
        assert names[id(ex.routers[0])] not in trainable and names[id(ex.routers[0])] not in moved
        assert names[id(ex.routers[1])] in moved           # the new task's own router learns
        for e, ad in enumerate(ex.adapters):
            ad_names = {names[id(p)] for p in ad.parameters()}
            if (tw, i, e) in strat.frozen:
                assert not ad_names & (moved | trainable), (tw, i, e)
        assert ex.counts.sum() > 0                            # task 1's data went through router 1
    assert moved <= trainable
    strat.after_task(tr, 1)
    # DDAS: without the task id, each task's test images go to its own router
    tr.model.eval()
    for t in range(2):
        images = torch.stack([tr.model.transform(False)(tasks[t].test[i][0]) for i in range(6)])
        strat.ddas_route = "sample"
        assert strat.routes(tr, images).tolist() == [t] * 6
        strat.ddas_route = "batch"
        assert strat.routes(tr, images).tolist() == [t] * 6
    # above the threshold: the pre-trained model, scored exactly as zero-shot
    strat.ddas_threshold = 1e-12
    assert strat.routes(tr, images).tolist() == [-1] * 6
    head = strat.eval_head(tr, 1)
    with torch.no_grad():
        ref = tr.logits(tr.image_features(images), head)
        torch.testing.assert_close(strat.eval_logits(tr, images, 1, head), ref)
    # the strategy's state round-trips
    again = create("moe-adapters", n_experts=6)
    again.load_state_dict(strat.state_dict())
    assert again.frozen == strat.frozen and len(again.autoencoders) == 2


# ---- DIKI -------------------------------------------------------------------------------------------


def test_diki_trains_two_tasks_with_sgd_and_only_the_task_prompts(tmp_path):
    tasks = toy_tasks(2, n_train=4, n_test=3, image_size=32)
    strat = create("diki", depth_image=1, length_image=4, length_text=4)
    tr, res = run_frozen(strat, tasks, tmp_path)
    assert len(res["methods"]["diki"]["R"]) == 2
    assert isinstance(tr.optimizer, torch.optim.SGD) and tr.optimizer.param_groups[0]["weight_decay"] == 0
    assert all(n.endswith("prompts.1") for n in tr.param_names)
    blocks = tr.model.blocks("image")
    assert blocks[0].prefix is not None and blocks[1].prefix is None   # depth 1 of 2
    assert all(b.prefix is not None for b in tr.model.blocks("text"))
    assert len(strat.means) == 2


def test_diki_selects_the_right_task_prompts_on_separable_data(tmp_path):
    tasks = separable_tasks()
    strat = create("diki", lr=1.0)
    tr = ContinualTrainer(vit(tasks), strat, tasks, out_dir=str(tmp_path), **KW)
    tr.run()
    tr.model.eval()
    weights = []
    for t in range(2):
        images = torch.stack([tr.model.transform(False)(tasks[t].test[i][0]) for i in range(6)])
        strat.batchwise_prompt = False
        ids, w, f0 = strat.select(tr, images)
        assert ids.tolist() == [t] * 6
        assert ((w > 0) & (w < 1)).all()
        weights.append(w)
        strat.batchwise_prompt = True
        assert strat.select(tr, images)[0].tolist() == [t] * 6
        # the weight is the calibration of the best log-density
        logp = strat.log_densities(f0)
        torch.testing.assert_close(w.double(), torch.sigmoid(logp.max(1).values / f0.shape[1] - 1))
    # an image from neither distribution gets (almost) no prompt
    odd = torch.stack([tr.model.transform(False)(Image.new("RGB", (32, 32), (255, 0, 0)))])
    _, w_odd, _ = strat.select(tr, odd)
    assert float(w_odd) < 1e-3 < float(torch.cat(weights).min())


# ---- open_clip ViT-B-16 ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["moe-adapters", "diki"])
def test_on_open_clip_vit_b16(tmp_path, name):
    from mgcl.models import OpenCLIP

    torch.manual_seed(0)
    model = OpenCLIP.create("ViT-B-16")
    tasks = toy_tasks(2, n_train=1, n_test=1, image_size=32, specs=None)
    opts = {"n_experts": 3, "ddas_iters": 1} if name == "moe-adapters" else {"depth_image": 8, "depth_text": 8}
    strat = create(name, **opts)
    tr = ContinualTrainer(model, strat, tasks, out_dir=str(tmp_path), **{**KW, "iters_per_task": 1, "batch_size": 2})
    tr.start()
    assert len(tr.model.blocks("image")) == 12 and len(tr.model.blocks("text")) == 12
    tr.begin_task(0)
    images = torch.stack([tr.model.transform(True)(tasks[0].train[i][0]) for i in range(2)])
    labels = torch.tensor([tasks[0].train[i][1] for i in range(2)])
    loss = tr.train_step(images, labels, 0)
    assert torch.isfinite(loss.parts[0])
    assert tr.param_names and all((".experts." in n) if name == "moe-adapters" else (".prefix." in n)
                                  for n in tr.param_names)
    strat.after_task(tr, 0)
    tr.model.eval()
    head = strat.eval_head(tr, 0)
    out = strat.eval_logits(tr, images, 0, head)
    assert out.shape == (2, len(tasks[0].classnames)) and torch.isfinite(out).all()


# ---- shipped configs ----------------------------------------------------------------------------


@pytest.mark.parametrize("bench", ["hmt-order1", "hmt-order2", "medxtreme-order1", "medxtreme-order2"])
@pytest.mark.parametrize("name", ["moe-adapters", "diki"])
def test_a_shipped_config_per_mgtil_sequence(bench, name):
    from mgcl.mgtil.benchmarks import BENCHMARKS
    from mgcl.mgtil.run import load_config

    cfg = load_config(f"{bench}-vit-b-16-{name}")
    assert cfg.strategy.name == name and cfg.data["benchmark"] == bench
    if name == "moe-adapters":     # a learning rate per dataset, every dataset of the sequence named
        assert sorted(cfg.strategy.lr) == sorted(BENCHMARKS[bench].names)
