"""``mgcl demo [--out DIR] [--quick]``: the whole method on a laptop, on the
SYNTHETIC benchmark mgtil-synth (no data, no GPU, no download).

1. the data: ``mgcl.mgtil.synth.build`` (6 tasks over 3 imaging principles, a
   captioned corpus with distractor domains), cached;
2. a TinyCLIP pretrained on the synthetic corpus with the CLIP loss (entries
   with the same caption are joint positives), so zero-shot accuracy is well
   above chance and fine-tuning has something to forget; cached;
3. the retrieval bank: the real builder (``mgcl db build``) with the MiniLM
   text embedder and the pretrained TinyCLIP's image embeddings stored for the
   visual rerank; cached;
4. zero-shot, continual fine-tuning, l2, ZSCL (uniform reference set) and
   PRIMED (Dynamic Siphon + CKT/CMC + Dynamic Fisher Guard), or every
   strategy of the registry (``methods="all"``), each from the same
   pretrained weights, through ``mgcl.cl.ContinualTrainer``; the strategies
   whose surgery needs transformer towers (moe-adapters, diki) start from a
   ViT TinyCLIP pretrained the same way (cached apart, ``...-vit``, with no
   bank) and are reported with its zero-shot row ``zero-shot-vit`` and
   ``"model": "vit"`` (every other row: ``"cnn"``); all at ``SEEDS``
   training seeds (42, 43, 44: the batch order, augmentation and reference
   batches change; data, model and bank do not). The runs share what does
   not depend on the seed: the decoded images and every reference set
   (``SharedRetrieval``); ``workers`` processes run them side by side, one
   thread each, which changes no result;
5. the paper-style table (mean ± std, ``mgcl.mgtil.seeds``), ``DIR/results.json``
   (the one results schema, ``mgcl.cl.results``), results.csv, results.md
   (with the differences that exceed the seed spread) and the plots.

Cache: ``<mgcl cache>/demo/v<version>-seed<seed>[-quick][-vit]`` (``mgcl._env.cache_dir``:
``$MGCL_CACHE``, else ``$XDG_CACHE_HOME/mgcl``, else ``~/.cache/mgcl``) holds the
pretrained model and the bank (built beside it, then renamed in one
step); the synthetic data lives under ``synth/`` of the same root. A cache made
with other settings is rebuilt.

Every setting is in ``SETTINGS`` and is written to results.json with
``CHOICES``, which says how each was picked. Deterministic for a seed on a
given machine and torch build (the tiny model trains on one thread).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .. import _env
from .._io import atomic_write_bytes, publish_dir
from ..cl.config import ConfigError, output_dir_problem
from . import report

VERSION = "1"
METHODS = ("zero-shot", "finetune", "l2", "zscl", "primed")
SEEDS = 3                      # training seeds per method (train.seed, +1, +2)
VIT_ZERO_SHOT = "zero-shot-vit"  # the row of the ViT model's zero-shot accuracy
MAX_SEED = 2**32 - 1

# TinyCLIP: a CNN image tower of width 64 (0.21M parameters in all).
_MODEL = dict(vision="cnn", image_size=64, vision_width=64, text_width=64, text_heads=4, text_layers=2, embed_dim=64)
# The ViT TinyCLIP of the methods whose model surgery needs transformer blocks in both towers
# (``needs_transformer_towers``: moe-adapters, diki): patch 8 on 64x64 images (64 patch tokens and a class
# token), 4 blocks of width 64 with 4 heads, the same text tower; pretrained the same way, cached apart.
_VIT_MODEL = dict(vision="vit", image_size=64, patch_size=8, vision_width=64, vision_layers=4, vision_heads=4,
                  text_width=64, text_heads=4, text_layers=2, embed_dim=64)
TOWERS = ("cnn", "vit")        # the demo's two pretrained models; "cnn" is every other method's
_STRATEGIES = {
    "zero-shot": {},
    "finetune": {},
    "l2": {"lam": 1.0},
    "zscl": {"uniform_size": 5000, "we_every": 10},
    "primed": {"retrieval": "dynamic", "alpha": 1.0, "beta": 0.25, "lam": 1.0, "regularizer": "dfg",
               "teacher": "last"},
    "moe-adapters": {"ddas_iters": 100},
    "diki": {},
    "snd": {"uniform_size": 5000},
    "gift": {},
}
_FULL = {
    "model": _MODEL, "vit_model": _VIT_MODEL, "context_length": 32,
    "pretrain": {"steps": 800, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.1, "warmup": 100},
    "bank": {"embedder": "minilm", "shard_size": 8192, "batch_size": 256},
    "pool_per_domain": 40,
    "siphon": {"a": 30, "b": 30, "c": 80, "n_general": 100, "k_v": 1, "seed": 0},
    "train": {"iters_per_task": 100, "batch_size": 32, "lr": 1e-4, "warmup": 10, "weight_decay": 0.0,
              "label_smoothing": 0.2, "seed": 42, "log_every": 100},
    "strategies": _STRATEGIES,
}
SETTINGS = {
    False: _FULL,
    True: {                                                # --quick: only these differ from the full run
        **_FULL,
        "pretrain": {**_FULL["pretrain"], "steps": 400, "warmup": 50},
        "bank": {**_FULL["bank"], "shard_size": 2048},
        "pool_per_domain": 20,
        "siphon": {**_FULL["siphon"], "a": 20, "b": 20, "c": 50, "n_general": 50},
        "train": {**_FULL["train"], "iters_per_task": 30, "warmup": 5, "log_every": 30},
        "strategies": {**_STRATEGIES, "zscl": {"uniform_size": 1500, "we_every": 5}, "snd": {"uniform_size": 1500},
                       "moe-adapters": {"ddas_iters": 30}},
    },
}
CHOICES = {
    "threads": "torch runs the tiny model on 1 thread: on this 2-core machine a 32-image training step took 38 ms "
               "on 1 thread and 28 ms on 2 when idle, but 112 ms on 2 (35 ms on 1) with one core busy; the MiniLM "
               "bank embedding uses every core (213 vs 431 captions/s on 1 vs 2 threads)",
    "model": "the smallest TinyCLIP measured (CNN width 64, 0.2M parameters; 68 / 47 ms per 64-image step on "
             "1 / 2 threads)",
    "pretrain": "800 steps of 64 (2.5 passes over the 20,480-pair corpus) gave 68-70% mean zero-shot accuracy "
                "(chance 27%); a 2,000-step trial reached 84%, leaving fine-tuning little to learn, so the "
                "shorter run was kept",
    "train": "lr 1e-4 of {1e-4, 5e-4} tried with finetune in a trial (5e-4: BWT -36 vs -15); 100 iterations of "
             "32 per task to fit the time budget; label smoothing 0.2 and seed 42 as in SPEC.md",
    "strategies": "the paper's defaults, not tuned: PRIMED alpha 1, beta 0.25, lambda 1 (W mean-normalised), "
                  "dynamic Siphon a/b/c 30/30/80 (HieraMedTransfer's b:c), teacher = last; l2 lambda 1; ZSCL "
                  "weight averaging every 10 steps (ZSCL's 100 of 1,000) and a 5,000-pair uniform set (PRIMED's "
                  "dynamic sets held 4,600-6,000 pairs in a first run); PRIMED forgot less than fine-tuning with "
                  "the first settings tried",
    "vit_model": "moe-adapters and diki declare needs_transformer_towers (their surgery adds adapters / prefix "
                 "prompts to the transformer blocks of both towers), which the CNN image tower lacks; they start "
                 "from a ViT TinyCLIP instead (patch 8, 4 blocks of width 64, 4 heads: 0.36M parameters, the "
                 "smallest ViT of the brief's size; the text tower as the CNN model's), pretrained by the same "
                 "road and settings, cached apart; its zero-shot row is zero-shot-vit",
    "new_methods": "diki and gift with their public code's defaults (gift: 1,000 procedural mgtil-synth images "
                   "per task, as configs/mgtil-synth-tinyclip-gift.yaml); moe-adapters with its defaults but "
                   "DDAS autoencoder steps = the demo's iterations per task (100, --quick 30) instead of 300: "
                   "with 300, one --quick run took 282 s against 62-85 s for gift, snd and diki (each DDAS "
                   "step runs the frozen ViT on a batch of 32; 6 x 300 of them outnumber the 180 training "
                   "steps); snd's uniform set sized as ZSCL's (5,000, --quick 1,500: the same set, built "
                   "once) where SnD distils on 100,000 ImageNet images (class default 10,000)",
    "pool": "the built-in question pool sampled to 40 questions per domain (seeded) to keep the number of "
            "MiniLM queries small",
    "seeds": "3 training seeds (SPEC's 42, then 43, 44) per method, reported as mean ± std: one seed's numbers moved "
             "by about a point between machines and between variants, more than some differences between methods; "
             "the data, the pretrained model and the bank keep one seed so that every method starts from the same "
             "model; zero-shot does not train and runs once",
    "quick": "--quick: the 4,096-pair corpus, 400 pretraining steps, 30 iterations per task, a/b/c 20/20/50, "
             "n_general 50, 20 questions per domain, ZSCL uniform set 1,500 (PRIMED's: 1,400-1,800): a smoke "
             "test, its numbers are noisy",
}


def settings(quick: bool = False) -> dict:
    return json.loads(json.dumps(SETTINGS[bool(quick)]))


def cache_root(cache_dir=None) -> Path:
    """The cache base: ``cache_dir``, else mgcl's cache (``mgcl._env.cache_dir``)."""
    return Path(cache_dir).expanduser().absolute() if cache_dir is not None else _env.cache_dir()


def _log(msg: str, progress: bool) -> None:
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        tqdm.write(msg, file=sys.stderr)


# ---- pretraining ----------------------------------------------------------------------------

def _augment(x, g):
    """Random scale/shift/flip, gain, tint and noise on a uint8 batch [n, H, W, 3] -> normalised [n, 3, H, W]."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    n = x.shape[0]
    x = x.permute(0, 3, 1, 2).float() / 255.0
    s = 1.0 - 0.15 * torch.rand(n, generator=g)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = s * flip, s
    theta[:, 0, 2], theta[:, 1, 2] = (torch.rand(n, generator=g) - 0.5) * 0.2, (torch.rand(n, generator=g) - 0.5) * 0.2
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), padding_mode="border",
                      align_corners=False)
    gain = 1 + (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.3
    tint = 1 + (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.12
    noise = 0.03 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return (x * gain * tint + noise - 0.5) / 0.5


def pretrain(data, cfg: dict, seed: int = 0, *, progress: bool = True):
    """A TinyCLIP trained from scratch on ``data``'s captioned corpus with the
    CLIP loss; entries sharing a caption are joint positives (the target of a
    row is uniform over them). AdamW, linear warmup, cosine decay; the logit
    scale is learnt (at most 100). Returns ``(model, log)``."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from ..models import TinyCLIP, WordTokenizer  # noqa: PLC0415

    p = cfg["pretrain"]
    corpus = data.corpus()
    images = torch.from_numpy(corpus.decode_all(progress=progress))
    captions = corpus.captions
    prompts = [q for t in data.tasks for q in t.prompts(None)]
    tok = WordTokenizer.build(captions + prompts, context_length=cfg["context_length"])
    torch.manual_seed(seed)
    model = TinyCLIP(tok, **cfg["model"])
    uniq, cid = np.unique(np.array(captions, dtype=object).astype(str), return_inverse=True)
    tokens, cid = tok(list(uniq)), torch.from_numpy(cid.astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    g = torch.Generator().manual_seed(seed)
    steps, n, log = p["steps"], len(captions), []
    model.train()
    bar = tqdm(total=steps, desc="pretrain TinyCLIP on the SYNTHETIC corpus", disable=not progress, leave=False)
    for step in range(steps):
        lr = p["lr"] * min(1.0, (step + 1) / p["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, n, (p["batch_size"],), generator=g)
        c = cid[idx]
        img = torch.nn.functional.normalize(model.encode_image(_augment(images[idx], g)), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokens[c]), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        target = (c[:, None] == c[None, :]).float()
        target = target / target.sum(1, keepdim=True)          # symmetric: the column sums are the same
        loss = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0)).sum(0).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(100.0))
        bar.update(1)
        if (step + 1) % 50 == 0 or step == steps - 1:
            lv = float(loss.detach())
            log.append({"step": step + 1, "loss": round(lv, 4), "lr": lr,
                        "scale": round(float(model.logit_scale.detach().exp()), 3)})
            bar.set_postfix(loss=f"{lv:.3f}")
    bar.close()
    model.eval()
    return model, log


# ---- cached assets: pretrained model + bank -----------------------------------------------

@dataclass
class Assets:
    data: object            # synth.SynthData
    dir: Path               # the demo cache directory
    model_dir: Path
    bank_dir: Optional[Path]  # None for the ViT model (its methods retrieve nothing)
    info: dict              # assets.json
    reused: bool
    embedder: object = None  # the CachedEmbedder used to build the bank (this process only)
    tower: str = "cnn"      # which of TOWERS


def _valid(d: Path, want: dict) -> Optional[dict]:
    try:
        info = json.loads((d / "assets.json").read_text())
    except (OSError, ValueError):
        return None
    if {k: info.get(k) for k in want} != want:
        return None
    if not (d / "model" / "tinyclip.json").is_file():
        return None
    if "bank" in want["settings"] and not (d / "bank" / "manifest.json").is_file():
        return None
    return info


def tower_of(name: str) -> str:
    """The demo model a strategy runs on: "vit" when its model surgery needs transformer towers, else "cnn"."""
    from ..cl import strategies as S  # noqa: PLC0415

    return "vit" if getattr(S.get(name), "needs_transformer_towers", False) else "cnn"


def prepare(seed: int = 0, quick: bool = False, *, cache_dir=None, progress: bool = True,
            embed_threads: Optional[int] = None, tower: str = "cnn") -> Assets:
    """The synthetic data, the pretrained TinyCLIP and the bank: reused from the
    cache when it holds them for this version / seed / size / settings, else built.
    ``tower="vit"``: the ViT TinyCLIP instead (``settings()["vit_model"]``, the same
    pretraining), in its own cache directory (``...-vit``) and without a bank."""
    import torch  # noqa: PLC0415

    from ..cl.evaluate import evaluate_all  # noqa: PLC0415
    from . import synth  # noqa: PLC0415

    if tower not in TOWERS:
        raise ConfigError(f"demo: tower must be one of {TOWERS}, got {tower!r}")
    base = cache_root(cache_dir)
    cfg = settings(quick)
    vit = tower == "vit"
    if vit:
        cfg["model"] = cfg["vit_model"]
    t0 = time.time()
    try:
        data = synth.build(base / "synth" / synth.default_cache_dir(seed, quick).name, seed=seed, quick=quick,
                           progress=progress)
    except ValueError as exc:                          # a folder in the cache that is not mgtil-synth's
        raise ConfigError(f"demo: the cache: {exc}") from None
    t_data = time.time() - t0
    final = base / "demo" / f"v{VERSION}-seed{seed}{'-quick' if quick else ''}{'-vit' if vit else ''}"
    want = {"format": "mgcl.demo.assets", "version": VERSION, "seed": seed, "quick": bool(quick),
            "settings": {k: cfg[k] for k in ("model", "context_length", "pretrain") + (() if vit else ("bank",))},
            "synth_root": str(data.root)}
    what = "ViT TinyCLIP" if vit else "TinyCLIP"
    info = _valid(final, want)
    if info is not None:
        _log(f"demo: reusing the pretrained {what}{'' if vit else ' and the bank'} from {final}", progress)
        return Assets(data, final, final / "model", None if vit else final / "bank", info, True, tower=tower)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    threads = torch.get_num_threads()
    try:
        t1 = time.time()
        torch.set_num_threads(1)
        _log(f"demo: pretraining {what} on the SYNTHETIC corpus ({cfg['pretrain']['steps']} steps)", progress)
        model, plog = pretrain(data, cfg, seed, progress=progress)
        model.save(str(tmp / "model"))
        z, _ = evaluate_all(model, data.tasks, "cpu")
        t_pre = time.time() - t1
        _log(f"demo: {what}: zero-shot after pretraining: "
             + " ".join(f"{t.name}={a:.1f}" for t, a in zip(data.tasks, z)), progress)
        emb, t_bank = (None, 0.0) if vit else _bank(data, cfg, model, tmp / "bank", embed_threads, progress)
        info = {**want, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                "parameters": sum(p.numel() for p in model.parameters()), "vocabulary": model.tokenizer.vocab_size,
                "pretrain_log": plog, "zero_shot_after_pretraining": dict(zip([t.name for t in data.tasks], z)),
                **({} if vit else {"distinct_captions_embedded": len(emb.cache)}),
                "seconds": {"data": round(t_data, 2), "pretrain": round(t_pre, 2), "bank": round(t_bank, 2)}}
        (tmp / "assets.json").write_text(json.dumps(info, indent=1))
        if final.exists():                                 # stale (other settings / version): replace it
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        try:
            publish_dir(str(tmp), str(final))
        except OSError:
            if _valid(final, want) is None:                # not a concurrent build that finished first
                raise
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return Assets(data, final, final / "model", None if vit else final / "bank", info, False, emb, tower)


def _bank(data, cfg: dict, model, path: Path, embed_threads: Optional[int], progress: bool):
    """The retrieval bank of ``data``'s corpus at ``path``: ``(embedder, seconds)``."""
    import torch  # noqa: PLC0415

    from ..retrieval import CachedEmbedder, build_bank, get_embedder  # noqa: PLC0415

    threads = torch.get_num_threads()
    try:
        t2 = time.time()
        torch.set_num_threads(embed_threads or os.cpu_count() or 1)
        emb = CachedEmbedder(get_embedder(cfg["bank"]["embedder"]))
        _log(f"demo: building the retrieval bank ({data.corpus_size} pairs, {emb.name} + TinyCLIP image "
             "embeddings)", progress)
        build_bank([str(s) for s in data.corpus_shards], str(path), embedder=emb, vlm=model,
                   vlm_name="tinyclip (mgcl demo, pretrained on the SYNTHETIC corpus)",
                   shard_size=cfg["bank"]["shard_size"], batch_size=cfg["bank"]["batch_size"], progress=progress)
        return emb, time.time() - t2
    finally:
        torch.set_num_threads(threads)


# ---- the methods --------------------------------------------------------------------------

class _Decoded:
    """A task's images decoded once, in memory (``(image, label)`` items as the
    trainer reads them): the training split as PIL images (the training
    transform's random crop runs on PIL, as before), the test split as uint8
    ``[3, H, W]`` tensors (the eval transform gives the same tensor as from
    the PIL image, checked by the tests). Decoding the PNGs once per process
    instead of once per read is what every method and seed share."""

    def __init__(self, dataset, as_tensor: bool):
        import numpy as np  # noqa: PLC0415
        import torch  # noqa: PLC0415

        items = [dataset[i] for i in range(len(dataset))]
        self.labels = [int(y) for _, y in items]
        rgb = [im.convert("RGB") for im, _ in items]
        self.images = [torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous() for im in rgb] if as_tensor \
            else rgb

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def decoded_tasks(tasks) -> list:
    """``tasks`` with their images decoded once (``_Decoded``)."""
    import dataclasses  # noqa: PLC0415

    return [dataclasses.replace(t, train=_Decoded(t.train, False), test=_Decoded(t.test, True)) for t in tasks]


class SharedRetrieval:
    """One Siphon for every method and seed of a process, each reference set
    built once: retrieval does not depend on the training seed or on the
    method (the key is the finished tasks, or the uniform set's size and
    keywords, and the stages), so a set retrieved again is the same rows."""

    def __init__(self, siphon):
        self.siphon = siphon
        self.memo: dict = {}

    def get(self, key, build):
        if key not in self.memo:
            t0 = time.time()
            rs = build()
            self.memo[key] = (rs, round(time.time() - t0, 3))
        return self.memo[key]


class _RecordingSiphon:
    """A method's view of the shared Siphon: records each reference set's size,
    levels and build time (0 with ``cached``: built for an earlier run)."""

    def __init__(self, shared: SharedRetrieval):
        self._shared = shared
        self.sets: list[dict] = []

    def _record(self, kind, key, build, **more):
        cached = key in self._shared.memo
        rs, seconds = self._shared.get(key, build)
        self.sets.append({"kind": kind, "pairs": len(rs), "levels": rs.level_counts(),
                          "seconds": 0.0 if cached else seconds, "cached": cached, **more})
        return rs

    def reference_set(self, history, stages="multi-stage"):
        history = list(history)
        return self._record("dynamic", ("dynamic", tuple(t.name for t in history), stages),
                            lambda: self._shared.siphon.reference_set(history, stages=stages),
                            before_task=len(history) + 1, stages=stages)

    def uniform_set(self, size, keywords=None, stages="multi-stage"):
        key = ("uniform", size, None if keywords is None else tuple(keywords), stages)
        return self._record("uniform", key, lambda: self._shared.siphon.uniform_set(size, keywords, stages=stages),
                            stages=stages)

    def __getattr__(self, name):
        return getattr(self._shared.siphon, name)


class Runner:
    """Runs strategies on the demo's assets (one process): the decoded tasks, the
    query embedder, the rerank VLM and the shared Siphon are made once, on first use.
    ``assets``: the CNN model and the bank (None when no job runs on it), ``vit``:
    the ViT model's (None when no job runs on it)."""

    def __init__(self, assets: Optional[Assets], cfg: dict, progress: bool, vit: Optional[Assets] = None):
        self.assets, self.vit, self.cfg, self.progress = assets, vit, cfg, progress
        self.tasks = decoded_tasks((assets or vit).data.tasks)
        self.shared = None

    def model_dir(self, tower: str) -> Path:
        a = self.vit if tower == "vit" else self.assets
        if a is None:
            raise ValueError(f"demo: no {tower} model prepared for this run")
        return a.model_dir

    def retrieval(self) -> SharedRetrieval:
        if self.shared is None:
            from ..models import TinyCLIP  # noqa: PLC0415
            from ..retrieval import CachedEmbedder, Siphon, get_embedder  # noqa: PLC0415

            a, cfg = self.assets, self.cfg
            inner = a.embedder.inner if a.embedder is not None else get_embedder(cfg["bank"]["embedder"])
            vlm = TinyCLIP.load(str(a.model_dir)).eval().requires_grad_(False)  # the rerank: the frozen pretrained
            self.shared = SharedRetrieval(Siphon.from_bank(str(a.bank_dir), vlm=vlm,
                                                           embedder=CachedEmbedder(inner, one_by_one=True),
                                                           pool_per_domain=cfg["pool_per_domain"], **cfg["siphon"]))
        return self.shared

    def run(self, name: str, options: dict, seed: int, run_dir: Path, train_changes: Optional[dict] = None,
            model: str = "cnn") -> dict:
        """One method (``name`` with ``options``) at training seed ``seed``, on the
        ``model`` TinyCLIP ("cnn" or "vit"): its results entry."""
        from ..cl import ContinualTrainer, TrainConfig  # noqa: PLC0415
        from ..cl import strategies as S  # noqa: PLC0415
        from ..models import TinyCLIP  # noqa: PLC0415

        t0 = time.time()
        train = TrainConfig.from_dict({**self.cfg["train"], **(train_changes or {}), "seed": seed})
        strategy = S.create(name, **options)
        recorder = None
        if strategy.needs_reference_set:
            recorder = _RecordingSiphon(self.retrieval())
            strategy.reference.siphon = recorder
        if run_dir.exists():
            shutil.rmtree(run_dir)
        res = ContinualTrainer(TinyCLIP.load(str(self.model_dir(model))), strategy, self.tasks, device="cpu",
                               out_dir=str(run_dir), progress=self.progress, train_config=train).run()
        entry = res["methods"][name]
        if recorder is not None:
            entry["reference_sets"] = recorder.sets
        entry["seconds"] = round(time.time() - t0, 2)
        return entry


def seed_list(cfg: dict, seeds: int) -> list[int]:
    """The training seeds: the configured seed (SPEC's 42) and the next ``seeds - 1``."""
    return [cfg["train"]["seed"] + k for k in range(seeds)]


@dataclass
class Job:
    """One run: ``label`` (the row, e.g. a method or an ablation variant), the
    strategy ``name`` with ``options``, the training ``seed``, ``train`` changes,
    the ``model`` it starts from (one of TOWERS)."""

    label: str
    name: str
    options: dict
    seed: int
    train: Optional[dict] = None
    model: str = "cnn"


def jobs_for(label: str, name: str, options: dict, seeds: Sequence[int], train: Optional[dict] = None,
             model: str = "cnn") -> list[Job]:
    """One job per seed (one only when the strategy does not train: zero-shot is deterministic)."""
    from ..cl import strategies as S  # noqa: PLC0415

    return [Job(label, name, options, s, train, model)
            for s in (list(seeds) if S.get(name).trains else list(seeds)[:1])]


_WORKER: dict = {}


def _worker_init(seed: int, quick: bool, cache_dir, cfg: dict, towers: Sequence[str] = ("cnn",)) -> None:
    import torch  # noqa: PLC0415

    torch.set_num_threads(1)
    got = {t: prepare(seed, quick, cache_dir=cache_dir, progress=False, tower=t) for t in towers}
    _WORKER["runner"] = Runner(got.get("cnn"), cfg, False, vit=got.get("vit"))


def _worker_run(job: Job, out: str) -> dict:
    return _WORKER["runner"].run(job.name, job.options, job.seed, Path(out) / "runs" / job.label / f"seed-{job.seed}",
                                 job.train, job.model)


def run_jobs(assets: Optional[Assets], cfg: dict, jobs: Sequence[Job], out: Path, *, workers: int, progress: bool,
             seed: int, quick: bool, cache_dir=None, tag: str = "demo", vit: Optional[Assets] = None) -> dict:
    """Every job; ``workers`` > 1 runs them in that many processes (each on one
    thread, each run as deterministic as in one process: the order they run in
    changes nothing). ``assets`` / ``vit``: the CNN / ViT model's assets (those
    the jobs' ``model`` names). Returns {label: entry over its seeds} in job order."""
    from .seeds import over_seeds  # noqa: PLC0415

    def done(job, e):
        _log(f"{tag}: {job.label} seed {job.seed}: Transfer {e['transfer']:.1f}  Avg {e['avg']:.1f}  "
             f"Last {e['last']:.1f}  BWT {e['bwt']:+.1f}  ({e['seconds']:.0f} s)", progress)
        return e

    if workers <= 1:
        runner = Runner(assets, cfg, progress, vit=vit)
        got = [done(j, runner.run(j.name, j.options, j.seed, out / "runs" / j.label / f"seed-{j.seed}", j.train,
                                  j.model))
               for j in jobs]
    else:
        import concurrent.futures as cf  # noqa: PLC0415
        import multiprocessing  # noqa: PLC0415

        from tqdm.auto import tqdm  # noqa: PLC0415

        _log(f"{tag}: {len(jobs)} runs in {workers} processes (one thread each)", progress)
        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_worker_init,
                                    initargs=(seed, quick, cache_dir, cfg,
                                              tuple(t for t, a in (("cnn", assets), ("vit", vit)) if a))) as ex:
            futures = {ex.submit(_worker_run, j, str(out)): j for j in jobs}
            bar = tqdm(total=len(jobs), desc=f"{tag} runs", disable=not progress, leave=False)
            for f in cf.as_completed(futures):
                done(futures[f], f.result())
                bar.update(1)
            bar.close()
            got = [f.result() for f in futures]
    by: dict = {}
    for j, e in zip(jobs, got):
        by.setdefault(j.label, ([], []))
        by[j.label][0].append(e)
        by[j.label][1].append(j.seed)
    return {label: over_seeds(es, ss) for label, (es, ss) in by.items()}


def check_workers(workers) -> None:
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"--jobs must be an integer >= 1, got {workers!r}")


def default_workers(n_jobs: int) -> int:
    """One process per core, at most one per run."""
    return max(1, min(os.cpu_count() or 1, n_jobs))


def resolve_methods(methods) -> list[str]:
    """``methods``: names, or ``["all"]`` / "all" (every strategy in the registry, in its order)."""
    from ..cl import strategies as S  # noqa: PLC0415

    names = list(S.available()) if methods == "all" or list(methods) == ["all"] else list(methods)
    unknown = [m for m in names if m not in S.available()]
    if unknown or not names:
        raise ConfigError(f"demo: methods must be a non-empty subset of {S.available()} or 'all', got {list(methods)}")
    return names


def rows_for(methods: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(label, strategy, model)`` per results row: each method on its model
    (``tower_of``); with any method on the ViT model, its zero-shot row
    ``zero-shot-vit`` comes just before the first of them (the reference those
    rows compare with: they are not comparable one-to-one with the CNN rows)."""
    rows = []
    for name in methods:
        model = tower_of(name)
        if model == "vit" and VIT_ZERO_SHOT not in [r[0] for r in rows]:
            rows.append((VIT_ZERO_SHOT, "zero-shot", "vit"))
        rows.append((name, name, model))
    return rows


def run_demo(out_dir="mgcl-demo", *, quick: bool = False, seed: int = 0, cache_dir=None,
             methods: Sequence[str] = METHODS, seeds: int = SEEDS, progress: bool = True,
             embed_threads: Optional[int] = None, workers: Optional[int] = None) -> dict:
    """Build or reuse the assets, run ``methods`` (names or "all") at ``seeds``
    training seeds each (in ``workers`` processes; None: one per core), write
    results.json, the tables and the plots into ``out_dir``; returns the results dict."""
    import torch  # noqa: PLC0415

    from ..cl.results import results as make_results  # noqa: PLC0415

    methods = resolve_methods(methods)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"demo: --seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    if not isinstance(seeds, int) or isinstance(seeds, bool) or not 1 <= seeds <= 100:
        raise ConfigError(f"demo: --seeds must be an integer in [1, 100], got {seeds!r}")
    check_workers(workers)
    t0 = time.time()
    out = Path(out_dir).expanduser().absolute()
    for what, path in (("--out", out), ("the cache", cache_root(cache_dir))):
        problem = output_dir_problem(path)
        if problem:
            raise ConfigError(f"demo: {what}: {problem}")
    out.mkdir(parents=True, exist_ok=True)
    cfg = settings(quick)
    train_seeds = seed_list(cfg, seeds)
    rows = rows_for(methods)
    towers = {label: model for label, _, model in rows}
    threads = torch.get_num_threads()
    try:
        assets = prepare(seed, quick, cache_dir=cache_dir, progress=progress, embed_threads=embed_threads) \
            if "cnn" in towers.values() else None
        vit = prepare(seed, quick, cache_dir=cache_dir, progress=progress, tower="vit") \
            if "vit" in towers.values() else None
        t_assets = round(time.time() - t0, 2)
        torch.set_num_threads(1)
        jobs = [j for label, name, model in rows
                for j in jobs_for(label, name, cfg["strategies"].get(name, {}), train_seeds, model=model)]
        workers = default_workers(len(jobs)) if workers is None else workers
        data = (assets or vit).data
        _log(f"demo: {', '.join(methods)} on {data.benchmark.name} (SYNTHETIC), training seeds {train_seeds}"
             + (f"; {', '.join(n for n, m in towers.items() if m == 'vit')} on the ViT TinyCLIP" if vit else ""),
             progress)
        t1 = time.time()
        entries = run_jobs(assets, cfg, jobs, out, workers=workers, progress=progress, seed=seed, quick=quick,
                           cache_dir=cache_dir, vit=vit)
        for label, e in entries.items():
            e["model"] = towers[label]
        seconds = {name: round(sum(p["seconds"] for p in e["per_seed"]), 2) for name, e in entries.items()}
        t_methods = round(time.time() - t1, 2)
    finally:
        torch.set_num_threads(threads)
    info_keys = ("parameters", "vocabulary", "zero_shot_after_pretraining", "distinct_captions_embedded", "created",
                 "seconds")
    prepared = {t: a for t, a in (("cnn", assets), ("vit", vit)) if a is not None}
    results = make_results(
        # The benchmark is mgtil-synth either way; "quick" says it ran the smoke-test size
        # (data.benchmark.name is then mgtil-synth-quick, the name `mgcl run` configs use for it).
        "demo", entries, benchmark="mgtil-synth", synthetic=True, tasks=[t.name for t in data.tasks],
        domains=[t.domain for t in data.tasks],
        config={"seed": seed, "seeds": train_seeds, "quick": bool(quick), "methods": list(methods), "settings": cfg,
                "choices": CHOICES,
                **({"assets": {k: assets.info.get(k) for k in info_keys}} if assets else {}),
                **({"assets_vit": {k: vit.info.get(k) for k in info_keys if k in vit.info}} if vit else {})},
        versions=_env.versions(), quick=bool(quick), label=data.label,
        notice="SYNTHETIC: procedural images and captions made by mgcl.mgtil.synth; not medical data, and "
               "the numbers say nothing about medical performance",
        machine={**_env.machine(), "torch_threads_training": 1},
        timings={"assets": t_assets, "assets_reused": all(a.reused for a in prepared.values()), "methods": seconds,
                 "workers": workers, "methods_wall": t_methods, "total": round(time.time() - t0, 2)},
        cache=str((assets or vit).dir), **({"cache_vit": str(vit.dir)} if assets and vit else {}))
    report.write_json(str(out / "results.json"), results)
    files = report.render(results, str(out))
    md = out / "results.md"            # the mean ± std table and the spread, in place of render's plain table
    atomic_write_bytes(str(md), results_md(results).encode())
    results["files"] = [str(out / "results.json")] + files
    return results


def results_md(res: dict) -> str:
    """results.md: mean ± std over the training seeds, and which differences exceed the seed spread."""
    from .seeds import differences_md, table_md  # noqa: PLC0415

    methods = res["methods"]
    vit = [n for n, m in methods.items() if m.get("model") == "vit"]
    shown = {f"{n} †" if n in vit else n: m for n, m in methods.items()}
    lines = [f"**{report.SYNTHETIC_NOTE}** ({res.get('benchmark')}{', --quick' if res.get('quick') else ''})\n",
             f"Mean ± std over the training seeds {res['config']['seeds']} (zero-shot does not train: one run). "
             "Every method starts from the same pretrained TinyCLIP, data and bank; a seed changes the batch "
             "order, the augmentation and the reference batches, not the benchmark.\n", table_md(shown)]
    if vit:
        lines.append("† on the ViT TinyCLIP (patch 8, 4 blocks of width 64; results.json: \"model\": \"vit\"), "
                     "pretrained the same way: their model surgery needs transformer towers. Compare them with "
                     f"{VIT_ZERO_SHOT} and with each other, not one-to-one with the CNN rows.\n")
    lines += ["\n## Which differences exceed the seed spread\n",
              "A difference of two means counts when it is larger than the sum of their standard deviations "
              "(bold below); with a few seeds a coarse screen, not a significance test"
              + (" (pairs on the same model only)" if vit else "") + ".\n"]
    pairs = []
    for group in ([n for n in methods if n not in vit], vit):   # a model's rows are compared with each other only
        if not group:
            continue
        lead = "primed" if "primed" in group else group[-1]
        pairs += [(lead, n) for n in group if n != lead] + [(a, b) for i, a in enumerate(group)
                                                            for b in group[i + 1:] if lead not in (a, b)]
    lines.append(differences_md(methods, pairs))
    return "\n".join(lines)


def main(out_dir="mgcl-demo", quick: bool = False, seed: int = 0, progress: bool = True,
         methods: Sequence[str] = METHODS, seeds: int = SEEDS, workers: Optional[int] = None) -> int:
    res = run_demo(out_dir, quick=quick, seed=seed, progress=progress, methods=methods, seeds=seeds, workers=workers)
    print(report.title(res))
    print(results_md(res))
    t = res["timings"]
    print(f"{res['notice']}.")
    how = "cached assets" if t["assets_reused"] else "built the data, model and bank"
    per = ", ".join(f"{k} {v:.0f} s" for k, v in t["methods"].items())
    print(f"wall time {t['total']:.0f} s ({how}; assets {t['assets']:.0f} s; runs {t['methods_wall']:.0f} s in "
          f"{t['workers']} process(es); per method, all seeds: {per})")
    print("wrote " + ", ".join(res["files"]))
    return 0


__all__ = ["run_demo", "prepare", "pretrain", "settings", "SETTINGS", "CHOICES", "METHODS", "SEEDS", "VERSION", "main",
           "Runner", "SharedRetrieval", "decoded_tasks", "Job", "jobs_for", "run_jobs", "default_workers", "seed_list",
           "resolve_methods", "results_md"]
