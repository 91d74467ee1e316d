"""Bench: time per training step, continual fine-tuning vs PRIMED.

Both run the real trainer step (``ContinualTrainer.train_step``) on the same
model, batch and optimizer settings:

- ``finetune``: task forward (images + class prompts), CE backward, AdamW step;
- ``primed``: the same plus a reference batch (student forward, teacher
  forward), the distillation backward, ``guard.apply()`` (dfg), the CE
  backward, the step;
- ``primed, ref batch B/4``: PRIMED with a quarter-size reference batch;
- ``primed-reference``: PRIMED with the pure-PyTorch references of both
  fused ops (``backend="torch"``): what the fused ops save inside a step;
- ``primed, teacher recomputed``: PRIMED without the teacher cache (the
  frozen teacher's forward of every reference batch, as with a random
  reference transform): what caching the teacher's features saves.

PRIMED's extra model work is the student forward + backward of the
reference batch, and the teacher forward of it until the teacher cache holds
its pairs (the reference set is fixed within a task and its transform is
deterministic, so after one pass the teacher runs no more: the steps timed
here come after warm-up passes over the bench's set); the fused ops keep the
loss and the guard small beside it.

Inputs are tensors already on the device (task images, labels, reference
images drawn once at random; reference captions tokenized per step, as in a
run): the bench times the compute of a step, not image decoding. CPU: TinyCLIP (64x64, ViT). GPU: open_clip
ViT-B-16 (random init) under bf16 autocast. ``scale`` shrinks both batch
sizes (64 at scale 1). Target (GPU): PRIMED step <= 1.3x the FT step.
"""
from __future__ import annotations

import copy
import tempfile

import torch

from . import harness

TARGET = 1.3
N_CLASSES = 10


class _SyntheticReferenceSet(torch.utils.data.Dataset):
    """Fixed random reference pairs held in memory, ready for training: (image on the device, caption, weight 1)."""

    deterministic = True  # fixed tensors: the teacher cache applies, as with a run's eval transform

    def __init__(self, images: torch.Tensor, captions: list[str]):
        self.images, self.captions = images, captions

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.captions[i], 1.0

    def __repr__(self):
        return f"{len(self)} synthetic reference pairs"


class _SyntheticSiphon:
    def __init__(self, refset):
        self.refset = refset

    def reference_set(self, history, stages="multi-stage"):
        return self.refset


def _model(name: str, device):
    from .. import models  # noqa: PLC0415

    if name == "tinyclip":
        words = [f"w{i}" for i in range(500)]
        torch.manual_seed(0)
        return models.TinyCLIP(models.WordTokenizer(words, context_length=32)), 64
    import open_clip  # noqa: PLC0415

    m = models.OpenCLIP.create(name)
    size = open_clip.get_model_preprocess_cfg(m.model)["size"]
    return m, size if isinstance(size, int) else size[0]


def _captions(n: int, g: torch.Generator) -> list[str]:
    words = ["chest", "x-ray", "fundus", "photograph", "of", "a", "retina", "with", "lesion", "nodule", "benign",
             "malignant", "tissue", "section", "showing", "the", "left", "lung", "opacity", "normal"]
    return [" ".join(words[int(i)] for i in torch.randint(0, len(words), (12,), generator=g)) for _ in range(n)]


def run(device: str = "cpu", scale: float = 1.0, repeats: int = 5, model: str | None = None,
        ref_batch: int | None = None) -> dict:
    from ..cl import ContinualTrainer, Task  # noqa: PLC0415
    from ..cl import strategies  # noqa: PLC0415

    dev = torch.device(device)
    name = model or ("ViT-B-16" if dev.type == "cuda" else "tinyclip")
    base, size = _model(name, dev)
    bs = max(4, round(64 * scale))
    rb = ref_batch or bs
    g = torch.Generator().manual_seed(0)
    images = torch.randn(bs, 3, size, size, generator=g).to(dev)
    labels = torch.randint(0, N_CLASSES, (bs,), generator=g).to(dev)
    n_ref = 4 * rb  # the warm-up is one pass over the set: the teacher cache holds all of it when timing starts
    refset = _SyntheticReferenceSet(torch.randn(n_ref, 3, size, size, generator=g).to(dev), _captions(n_ref, g))
    classes = [f"finding {i}" for i in range(N_CLASSES)]
    task = Task("bench", "x-ray", classes, ["a chest x-ray showing {}."], [(None, 0)] * bs, [(None, 0)])
    rows = []
    small = max(2, rb // 4)
    configs = {
        "finetune": lambda: strategies.create("finetune"),
        "primed": lambda: strategies.create("primed", siphon=_SyntheticSiphon(refset), ref_batch_size=rb,
                                            prefetch=0),
        f"primed, ref batch {small}": lambda: strategies.create("primed", siphon=_SyntheticSiphon(refset),
                                                                ref_batch_size=small, prefetch=0),
        "primed-reference": lambda: strategies.create("primed", siphon=_SyntheticSiphon(refset), ref_batch_size=rb,
                                                      prefetch=0, backend="torch"),
        "primed, teacher recomputed": lambda: strategies.create("primed", siphon=_SyntheticSiphon(refset),
                                                                ref_batch_size=rb, prefetch=0),
    }
    # the trainer needs an out_dir; steps write nothing there, so a temporary one is removed afterwards
    with tempfile.TemporaryDirectory(prefix="mgcl-bench-step-") as out_dir:
        for impl, make in configs.items():
            m = copy.deepcopy(base)
            tr = ContinualTrainer(m, make(), [task], iters_per_task=10_000, batch_size=bs, lr=1e-5, warmup=0,
                                  device=dev, out_dir=out_dir, progress=False)
            tr.start()
            if impl == "primed-reference":
                tr.strategy.guard.fisher_guard.backend = "torch"
            if impl == "primed, teacher recomputed":
                tr.strategy.reference.cache_teacher = False
            tr.begin_task(0)
            m.train()
            counter = iter(range(10**9))
            fn = lambda tr=tr: tr.train_step(images, labels, 0, next(counter))  # noqa: E731
            reference = getattr(tr.strategy, "reference", None)
            warmup = max(2, -(-n_ref // reference.batch_size)) if reference is not None else 2
            t = harness.time_fn(fn, device=dev, repeats=repeats, warmup=warmup)
            mem = harness.peak_extra_memory(fn, device=dev) if dev.type == "cuda" else None
            rows.append({"impl": impl, **{k: t[k] for k in ("median", "min", "max")}, "n": t["n"], "peak_bytes": mem})
            amp = tr.amp
            del tr, m, fn
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    ft = rows[0]["median"]
    for r in rows:
        r["vs_finetune"] = r["median"] / ft
    ratio = next(r["vs_finetune"] for r in rows if r["impl"] == "primed")
    from .. import _backend  # noqa: PLC0415
    from ..ops import contrastive_distill as cd, fisher_guard as fg  # noqa: PLC0415

    return {
        "bench": "step",
        "machine": harness.machine(dev),
        "config": {"model": name, "params": sum(p.numel() for p in base.parameters()), "image_size": size,
                   "batch": bs, "ref_batch": rb, "classes": N_CLASSES, "amp": amp,
                   "repeats": repeats, "scale": scale,
                   "backends": {"fisher_guard": _backend.select("fisher_guard", fg.BACKENDS, dev),
                                "contrastive_distill": _backend.select("contrastive_distill", cd.BACKENDS, dev, B=rb)}},
        "rows": rows,
        "target": {"primed_over_finetune": ratio, "target": TARGET, "met": ratio <= TARGET,
                   "applies": dev.type == "cuda"},
    }


def table(result: dict) -> str:
    c = result["config"]
    tgt = result["target"]
    head = (f"train step on {result['machine']['device']}: {c['model']} ({c['params'] / 1e6:.1f}M params, "
            f"{c['image_size']}px), batch {c['batch']}, reference batch {c['ref_batch']}, {c['classes']} classes, "
            f"amp {c['amp']}; fused backends {c['backends']}")
    rows = [{**r, "median_ms": harness.ms(r["median"]), "min_ms": harness.ms(r["min"]), "max_ms": harness.ms(r["max"]),
             "peak_mib": None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20} for r in result["rows"]]
    cols = [("impl", "impl"), ("median_ms", "median ms"), ("min_ms", "min ms"), ("max_ms", "max ms"),
            ("vs_finetune", "x finetune"), ("peak_mib", "peak MiB")]
    foot = (f"PRIMED / FT = {tgt['primed_over_finetune']:.2f}x (target <= {tgt['target']}x on a GPU"
            + ("" if tgt["applies"] else "; not a GPU run, target not assessed") + ")"
            + (f": {'met' if tgt['met'] else 'NOT met'}" if tgt["applies"] else ""))
    return head + "\n" + harness.format_table(rows, cols) + "\n" + foot
