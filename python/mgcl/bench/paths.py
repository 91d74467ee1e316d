"""Bench: two slow paths around training (issue 19).

- ``macro_auc``: mgcl's vectorised macro one-vs-rest ROC-AUC
  (``mgcl.cl.metrics.macro_auc``) against scikit-learn's ``roc_auc_score``
  (``multi_class="ovr", average="macro"``, the baseline) on the same softmax
  probabilities, n = 20,000 samples, C = 15 classes (``scale`` shrinks n);
  target: at most 1.5x scikit-learn's time, with equal values (checked here too).
- ``reference decode``: one reference batch of 64 JPEG images of 1024 x 768
  decoded and resized to 224 px through ``refdata.reference_batches``, in this
  thread (``workers=1``, the baseline) and in its thread pool (the default);
  the batches are the same (checked).
"""
from __future__ import annotations

import os
import tempfile

import torch

from . import harness

AUC_TARGET = 1.5


def _auc_case(n: int, C: int):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, C, (n,), generator=g)
    logits = torch.randn(n, C, generator=g) + 1.5 * torch.nn.functional.one_hot(labels, C)
    return ((logits * 8).round() / 8).softmax(-1), labels  # ties, as softmaxes of low-precision logits have


def _decode_case(root: str, n: int, width: int, height: int):
    from PIL import Image  # noqa: PLC0415
    from torchvision import transforms as T  # noqa: PLC0415

    from ..cl.strategies.refdata import ReferencePairs  # noqa: PLC0415
    from ..models.images import as_image, to_tensor  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        # smooth content (a JPEG of noise decodes slower than a photograph does)
        small = (torch.rand(height // 32, width // 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        path = os.path.join(root, f"{i}.jpg")
        Image.fromarray(small).resize((width, height), Image.BILINEAR).save(path, quality=90)
        rows.append({"id": f"r{i}", "index": i, "image": path, "caption": "a chest x-ray", "level": "task"})
    transform = T.Compose([as_image, T.Resize(224, antialias=True), T.CenterCrop(224), to_tensor,
                           T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    return ReferencePairs(rows, transform)


def run(device: str = "cpu", scale: float = 1.0, repeats: int = 5) -> dict:
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415

    from ..cl.metrics import macro_auc  # noqa: PLC0415
    from ..cl.strategies.refdata import reference_batches  # noqa: PLC0415
    from ..models import WordTokenizer  # noqa: PLC0415

    n, C = max(100, round(20_000 * scale)), 15
    probs, labels = _auc_case(n, C)
    p_np, y_np = probs.numpy(), labels.numpy()
    ours, ref = macro_auc(probs, labels), roc_auc_score(y_np, p_np, multi_class="ovr", average="macro")
    rows = []
    for impl, fn in (("macro_auc, scikit-learn", lambda: roc_auc_score(y_np, p_np, multi_class="ovr",
                                                                        average="macro")),
                     ("macro_auc, mgcl", lambda: macro_auc(probs, labels))):
        t = harness.time_fn(fn, repeats=repeats, warmup=1)
        rows.append({"path": "macro_auc", "impl": impl, **{k: t[k] for k in harness.TIMING_KEYS if k in t}})
    rows[1]["vs_baseline"] = rows[1]["median"] / rows[0]["median"]
    n_img = max(4, round(64 * scale))
    tok = WordTokenizer(["a", "chest", "x-ray"], context_length=8)
    with tempfile.TemporaryDirectory(prefix="mgcl-bench-paths-") as root:
        pairs = _decode_case(root, n_img, 1024, 768)
        pool = min(8, os.cpu_count() or 1, n_img)
        batches = {}
        for impl, workers in (("reference decode, 1 thread", 1), (f"reference decode, {pool} threads", None)):
            def one(workers=workers, impl=impl):
                batches[impl] = next(reference_batches(pairs, tok, n_img, seed=0, workers=workers))
            t = harness.time_fn(one, repeats=repeats, warmup=1)
            rows.append({"path": "reference decode", "impl": impl,
                         **{k: t[k] for k in harness.TIMING_KEYS if k in t}})
        first, second = batches.values()
        same = torch.equal(first.images, second.images) and torch.equal(first.index, second.index)
    rows[3]["vs_baseline"] = rows[3]["median"] / rows[2]["median"]
    ratio = rows[1]["vs_baseline"]
    return {
        "bench": "paths",
        "machine": harness.machine(torch.device("cpu")),
        "config": {"auc_n": n, "auc_classes": C, "images": n_img, "image_size": [1024, 768], "resize": 224,
                   "threads": pool, "repeats": repeats, "scale": scale},
        "rows": rows,
        "checks": {"auc_mgcl": ours, "auc_sklearn": ref, "auc_equal": abs(ours - ref) <= 1e-12,
                   "same_batches": same},
        "target": {"auc_over_sklearn": ratio, "target": AUC_TARGET, "met": ratio <= AUC_TARGET},
    }


def table(result: dict) -> str:
    c, chk, tgt = result["config"], result["checks"], result["target"]
    head = (f"slow paths on {result['machine']['device']}: macro AUC at n = {c['auc_n']}, C = {c['auc_classes']}; "
            f"a reference batch of {c['images']} JPEGs {c['image_size'][0]}x{c['image_size'][1]} -> {c['resize']} px")
    rows = [{**r, **{f"{k}_ms": harness.ms(r.get(k)) for k in ("median", "min", "max")}} for r in result["rows"]]
    cols = [("impl", "impl"), ("median_ms", "median ms"), ("min_ms", "min ms"), ("max_ms", "max ms"),
            ("vs_baseline", "x baseline")]
    foot = (f"macro AUC: mgcl / scikit-learn = {tgt['auc_over_sklearn']:.2f}x (target <= {tgt['target']}x: "
            f"{'met' if tgt['met'] else 'NOT met'}); values {chk['auc_mgcl']:.12f} vs {chk['auc_sklearn']:.12f} "
            f"({'equal' if chk['auc_equal'] else 'DIFFERENT'}); decoded batches "
            f"{'the same' if chk['same_batches'] else 'DIFFERENT'} in one thread and in the pool")
    return head + "\n" + harness.format_table(rows, cols) + "\n" + foot
