"""Model adapters: open_clip (ViT-B/16, BiomedCLIP), Hugging Face CLIP, TinyCLIP.

Everything is randomly initialised offline; each adapter runs one forward and
backward through both towers.
"""
import json
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mgcl import models
from mgcl.models import HFCLIP, OpenCLIP, TinyCLIP, VLM, WordTokenizer

pytest.importorskip("open_clip")
pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # one cache dir for the whole session (the BiomedBERT config dir is built once)
    monkeypatch.setenv("MGCL_CACHE", str(tmp_path_factory.getbasetemp() / "mgcl_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _forward_backward(m, image_size, text_len=None):
    tokens = m.tokenize(["a chest x-ray showing pneumonia", "a fundus photograph"])
    assert tokens.dtype == torch.int64 and tokens.device.type == "cpu" and tokens.ndim == 2
    if text_len:
        tokens = tokens[:, :text_len]
    images = torch.randn(2, 3, image_size, image_size)
    img, txt = m.encode_image(images), m.encode_text(tokens)
    assert img.shape == txt.shape and img.shape[0] == 2
    assert not torch.allclose(F.normalize(img, dim=-1).norm(dim=-1), img.norm(dim=-1)), "features must be unnormalised"
    loss = (m.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T).logsumexp(1).mean()
    loss.backward()
    return img, txt


def _grad_fraction(module):
    ps = [p for p in module.parameters() if p.requires_grad]
    return sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in ps) / len(ps)


def _check_transforms(m, size):
    img = Image.new("RGB", (size + 37, size + 11), (120, 30, 200))
    for train in (True, False):
        x = m.transform(train)(img)
        assert x.shape == (3, size, size) and x.dtype == torch.float32


def test_open_clip_vit_b16_random_init_forward_backward():
    m = OpenCLIP.create("ViT-B-16")
    assert isinstance(m, VLM)
    assert m.logit_scale.ndim == 0 and isinstance(m.logit_scale, torch.nn.Parameter)
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(149.6e6, rel=0.01)
    assert m.tokenize(["x"]).shape == (1, 77)
    img, txt = _forward_backward(m, 224)
    assert img.shape[1] == 512
    assert _grad_fraction(m.model.visual) > 0.95 and _grad_fraction(m.model.transformer) > 0.95
    _check_transforms(m, 224)


@pytest.fixture(scope="module")
def biomedclip(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MGCL_CACHE", str(tmp_path_factory.getbasetemp() / "mgcl_cache"))
    m = OpenCLIP.create("biomedclip")
    yield m
    mp.undo()


def test_biomedclip_architecture_offline(biomedclip):
    m = biomedclip
    assert m.name == models.BIOMEDCLIP
    # ViT-B/16 image tower (timm), token pooling off, linear projection to 512
    trunk = m.model.visual.trunk
    assert trunk.patch_embed.proj.kernel_size == (16, 16) and trunk.embed_dim == 768 and len(trunk.blocks) == 12
    assert m.model.visual.head.proj.out_features == 512
    # BERT-base text tower, CLS of the last hidden state, MLP projection 768 -> 640 -> 512
    bert = m.model.text.transformer
    assert type(bert).__name__ == "BertModel" and bert.pooler is None
    cfg = bert.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) \
        == (30522, 768, 12, 12, 3072)
    assert type(m.model.text.pooler).__name__ == "ClsLastHiddenStatePooler"
    assert [l.out_features for l in m.model.text.proj if isinstance(l, torch.nn.Linear)] == [640, 512]
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(195.9e6, rel=0.01)
    # offline tokenizer: 256 tokens, [CLS] ... [SEP] then [PAD] = 0
    assert m.tokenizer_source == "offline-stand-in"
    tok = m.tokenize(["Pneumonia!", "a"])
    assert tok.shape == (2, 256) and tok[0, 0] == 2 and int(tok[0].ne(0).sum()) == 2 + len("pneumonia!")
    assert int(tok.max()) < 30522
    _check_transforms(m, 224)


def test_biomedclip_forward_backward(biomedclip):
    m = biomedclip
    m.zero_grad(set_to_none=True)
    img, txt = _forward_backward(m, 224, text_len=40)  # BERT takes any length <= 512; 40 keeps the test fast
    assert img.shape == (2, 512) and txt.shape == (2, 512)
    assert _grad_fraction(m.model.visual) > 0.95
    assert _grad_fraction(m.model.text.transformer.encoder) > 0.95


def test_biomedclip_hub_layout_directory_loads_offline(biomedclip, tmp_path):
    """A local copy of the hub repo (open_clip_config.json naming the BiomedBERT hub
    model, weights, tokenizer files) loads without the network, weights intact."""
    from safetensors.torch import save_file

    m = biomedclip
    d = tmp_path / "snapshot"
    d.mkdir()
    cfg = models.openclip.biomedclip_config(models.openclip.BIOMEDBERT_HUB)
    with open(d / "open_clip_config.json", "w") as fh:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                         "std": [0.26862954, 0.26130258, 0.27577711]}}, fh)
    sd = {k: v.detach().half().contiguous() for k, v in m.model.state_dict().items()}
    save_file(sd, str(d / "open_clip_model.safetensors"))
    tok_dir = m.tokenizer.tokenizer.name_or_path
    for f in os.listdir(tok_dir):
        if f.startswith(("vocab", "tokenizer", "special")):
            (d / f).write_bytes(open(os.path.join(tok_dir, f), "rb").read())
    loaded = models.load(str(d))
    assert isinstance(loaded, OpenCLIP) and loaded.tokenizer_source == str(d)
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, sd[k].float(), rtol=0, atol=0, msg=k)
    texts = ["retinal fundus photograph"]
    assert torch.equal(loaded.tokenize(texts), m.tokenize(texts))
    # pretrained weights with the stand-in vocabulary are refused
    with pytest.raises(ValueError, match="tokenizer"):
        OpenCLIP.create("biomedclip", pretrained=str(d / "open_clip_model.safetensors"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mgcl_pwned_by_pickle",))


def test_checkpoint_files_are_read_weights_only(tmp_path):
    from safetensors.torch import save_file

    src = OpenCLIP.create("ViT-S-32-alt")
    sd = {k: v.detach().clone() for k, v in src.model.state_dict().items()}
    torch.save(sd, tmp_path / "m.bin")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    for f in ("m.bin", "m.safetensors"):
        m = models.load(str(tmp_path / f), arch="ViT-S-32-alt")
        for k, v in m.model.state_dict().items():
            assert torch.equal(v, sd[k]), (f, k)
    if os.path.exists("/tmp/mgcl_pwned_by_pickle"):
        os.remove("/tmp/mgcl_pwned_by_pickle")
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"state_dict": _Evil()}, fh)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported"):
        models.load(str(tmp_path / "evil.pt"), arch="ViT-S-32-alt")
    assert not os.path.exists("/tmp/mgcl_pwned_by_pickle")
    with pytest.raises(ValueError, match="expected one of"):
        (tmp_path / "m.pkl").write_bytes(b"x")
        OpenCLIP.create("ViT-S-32-alt", pretrained=str(tmp_path / "m.pkl"))
    with pytest.raises(ValueError, match="architecture"):
        models.load(str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="unknown config"):
        OpenCLIP.create("ViT-Nonexistent")


def _small_clip_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=48)


def test_hf_clip_random_init_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = HFCLIP(_small_clip_config())
    assert isinstance(m, VLM) and m.logit_scale.ndim == 0
    tok = m.tokenize(["a photo of a cat"])
    # the OpenAI CLIP BPE: <|startoftext|> a photo of a cat <|endoftext|> padding
    assert tok[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and tok.shape == (1, 77)
    img, txt = _forward_backward(m, 32)
    assert img.shape == (2, 48)
    assert _grad_fraction(m.model.vision_model) > 0.9 and _grad_fraction(m.model.text_model) > 0.9
    _check_transforms(m, 32)
    # the text feature is pooled at the end-of-text token: padding after it changes nothing
    with torch.no_grad():
        a = m.encode_text(tok)
        b = m.encode_text(torch.cat([tok[:, :7], torch.full((1, 70), 49407)], 1))
    torch.testing.assert_close(a, b)
    m.model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    loaded = models.load(str(tmp_path / "hf"))
    assert isinstance(loaded, HFCLIP)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x), m.encode_image(x))
        torch.testing.assert_close(loaded.encode_text(tok), m.encode_text(tok))


def test_word_tokenizer():
    tok = WordTokenizer.build(["A red circle.", "a blue circle", "red, red"], context_length=6)
    assert tok.words[:2] == ["red", "a"]  # frequency, then alphabetical
    ids = tok(["a red square!", "red red red red red red red"])
    assert ids.dtype == torch.int64 and ids.shape == (2, 6)
    a, red, unk, bang = tok.index["a"], tok.index["red"], WordTokenizer.UNK, tok.index.get("!", WordTokenizer.UNK)
    assert ids[0].tolist() == [WordTokenizer.SOT, a, red, unk, bang, WordTokenizer.EOT]
    assert ids[1].tolist() == [WordTokenizer.SOT] + [red] * 4 + [WordTokenizer.EOT]  # cut, <eot> kept
    assert WordTokenizer.from_json(json.loads(json.dumps(tok.to_json()))).words == tok.words
    assert WordTokenizer.build(["x y z"], max_size=2).vocab_size == 6
    with pytest.raises(ValueError):
        WordTokenizer(["a", "a"])


@pytest.mark.parametrize("vision", ["vit", "cnn"])
def test_tinyclip_forward_backward_save_load(tmp_path, vision, one_thread):
    torch.manual_seed(0)
    tok = WordTokenizer.build(["a photo of a red circle", "a blue square"], context_length=10)
    m = TinyCLIP(tok, vision=vision, image_size=32, patch_size=8, vision_width=32, vision_heads=2, text_width=32,
                 text_heads=2, text_layers=1, embed_dim=24)
    assert isinstance(m, VLM) and m.logit_scale.ndim == 0
    img, txt = _forward_backward(m, 32)
    assert img.shape == (2, 24)
    assert _grad_fraction(m) > 0.95
    _check_transforms(m, 32)
    m.save(str(tmp_path / "tiny"))
    assert sorted(os.listdir(tmp_path / "tiny")) == ["model.safetensors", "tinyclip.json"]
    loaded = models.load(str(tmp_path / "tiny"))
    assert isinstance(loaded, TinyCLIP) and loaded.tokenizer.words == tok.words and loaded.config == m.config
    x, t = torch.randn(3, 3, 32, 32), m.tokenize(["a red square", "unknown words here"])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), m.encode_image(x))
        assert torch.equal(loaded.encode_text(t), m.encode_text(t))
    # padding does not change a text feature (mean over non-pad tokens, masked attention)
    full = tok(["a red circle"])  # <sot> a red circle <eot> + 5 pads
    with torch.no_grad():
        torch.testing.assert_close(m.encode_text(full[:, :6]), m.encode_text(full))


def test_tinyclip_learns_on_cpu(one_thread):
    """Twenty CLIP-loss steps on coloured shapes pull matching pairs together."""
    from mgcl.cl.toy import toy_tasks

    task = toy_tasks(2, n_train=16, image_size=32)[1]  # colours
    tok = WordTokenizer.build(task.prompts(None))
    torch.manual_seed(0)
    m = TinyCLIP(tok, vision="cnn", image_size=32, vision_width=32, text_width=32, text_heads=2, text_layers=1,
                 embed_dim=32)
    tf = m.transform(True)
    data = [task.train[i] for i in range(len(task.train))]
    images = torch.stack([tf(im) for im, _ in data])
    labels = torch.tensor([y for _, y in data])
    texts = m.tokenize(task.prompts(0))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)

    def acc():
        with torch.no_grad():
            return float(((F.normalize(m.encode_image(images), dim=-1) @ F.normalize(m.encode_text(texts), dim=-1).T)
                          .argmax(1) == labels).float().mean())
    for _ in range(20):
        logits = m.logit_scale.exp() * F.normalize(m.encode_image(images), dim=-1) @ \
            F.normalize(m.encode_text(texts), dim=-1).T
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert acc() > 0.9


def test_tinyclip_without_a_vocabulary_hashes_words(tmp_path, one_thread):
    """TinyCLIP() needs no tokenizer: an open vocabulary of hashed words, saved with the model."""
    torch.manual_seed(0)
    m = TinyCLIP(vision="cnn", image_size=32, vision_width=16, text_width=16, text_heads=2, text_layers=1,
                 embed_dim=8)
    assert isinstance(models.create("tinyclip", vision="cnn", image_size=32, vision_width=16, text_width=16,
                                    text_heads=2, text_layers=1, embed_dim=8), TinyCLIP)
    ids = m.tokenize(["pneumothorax", "cardiomegaly", "pneumothorax"])
    assert ids[0, 1] == ids[2, 1] != ids[1, 1] and int(ids[:, 1].min()) > WordTokenizer.EOT
    assert int(ids.max()) < m.tokenizer.vocab_size
    _forward_backward(m, 32)
    m.save(str(tmp_path / "open"))
    loaded = models.load(str(tmp_path / "open"))
    assert torch.equal(loaded.tokenize(["pneumothorax"]), m.tokenize(["pneumothorax"]))


def test_transforms_take_image_tensors_and_arrays():
    """Generated datasets may hold tensors ([3,H,W] float / uint8, [H,W]) or arrays ([H,W,3])."""
    import numpy as np

    tiny = TinyCLIP(vision="cnn", image_size=32, vision_width=16, text_width=16, text_heads=2, text_layers=1,
                    embed_dim=8)
    hf = HFCLIP(_small_clip_config())
    oc = OpenCLIP(__import__("open_clip").create_model("RN50"))
    for m, size in ((tiny, 32), (hf, 32), (oc, 224)):
        for img in (torch.rand(3, 40, 48), torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8),
                    torch.rand(40, 48), np.random.randint(0, 256, (40, 48, 3), dtype=np.uint8)):
            for train in (True, False):
                x = m.transform(train)(img)
                assert x.shape == (3, size, size) and x.dtype == torch.float32
    # a uint8 tensor and the same PIL image are prepared alike
    arr = np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8)
    torch.testing.assert_close(tiny.transform(False)(torch.from_numpy(arr).permute(2, 0, 1)),
                               tiny.transform(False)(Image.fromarray(arr)))
    with pytest.raises(ValueError, match="image tensor"):
        tiny.transform(False)(torch.rand(2, 3, 32, 32))


def test_wrapped_open_clip_and_test_sized_hf_config_tokenize():
    import open_clip
    from transformers import CLIPConfig

    m = OpenCLIP(open_clip.create_model("RN50"))
    assert m.tokenize(["a cat"])[0, :4].tolist() == [49406, 320, 2368, 49407]
    cfg = CLIPConfig(text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=16),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=4, image_size=16, patch_size=8), projection_dim=8)
    hf = HFCLIP(cfg)
    tok = hf.tokenize(["a photo of a cat", "a dog"])
    assert tok.shape == (2, 16) and int(tok.max()) < 99 and hf.tokenizer_source == "open_clip-bpe-folded"
    _forward_backward(hf, 16)
    # start / end of text map to the config's bos / eos ids when they fit, id 0 included
    cfg.text_config.bos_token_id, cfg.text_config.eos_token_id = 0, 2
    assert HFCLIP(cfg).tokenize(["a cat"])[0, :4].tolist() == [0, 320 % 99, 2368 % 99, 2]


def test_create_and_load_errors(tmp_path):
    m = models.create("tinyclip", texts=["a b c"], image_size=32, vision="cnn", vision_width=16, text_width=16,
                      text_heads=2, text_layers=1, embed_dim=8)
    assert isinstance(m, TinyCLIP)
    with pytest.raises(ValueError, match="unknown config fields"):
        TinyCLIP(WordTokenizer(["a"]), widht=3)
    with pytest.raises(ValueError, match="neither"):
        models.load("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        models.load(str(tmp_path / "empty"))
