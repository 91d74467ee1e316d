"""Shared helpers for the retrieval tests: a generated corpus (jsonl, parquet,
WebDataset tar) with duplicated captions and several domains, and a small
deterministic VLM test fixture (fixed projections of pixel statistics and
hashed words) that exercises the rerank logic without a real model."""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile

import numpy as np
import torch
from PIL import Image

DOMAINS = {
    "x-ray": ["chest x-ray with {f}", "radiograph of the chest showing {f}"],
    "histopathology": ["H&E section of breast tissue with {f}", "histology of {f}"],
    "fundus": ["fundus photograph of the retina with {f}", "retinal image showing {f}"],
    "dermoscopy": ["dermoscopy image of {f}", "skin lesion under dermoscopy: {f}"],
    "endoscopy": ["colonoscopy image of {f}", "endoscopic view of {f}"],
}
FINDINGS = {
    "x-ray": ["pneumothorax", "pleural effusion", "cardiomegaly", "pneumonia"],
    "histopathology": ["invasive ductal carcinoma", "fibroadenoma", "lobular carcinoma"],
    "fundus": ["glaucoma", "diabetic retinopathy", "drusen"],
    "dermoscopy": ["melanoma", "nevus", "basal cell carcinoma"],
    "endoscopy": ["adenomatous polyp", "ulcerative colitis", "esophagitis"],
}


def color_image(red: float, seed: int) -> Image.Image:
    """A small RGB image whose mean red level is about ``red`` (0..1)."""
    rng = np.random.default_rng(seed)
    a = np.empty((12, 12, 3), dtype=np.float64)
    a[..., 0] = red
    a[..., 1] = rng.uniform(0, 1, (12, 12))
    a[..., 2] = rng.uniform(0, 1, (12, 12))
    return Image.fromarray((a * 255).round().astype(np.uint8), "RGB")


def make_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` records; about a quarter repeat an earlier caption verbatim."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if out and rng.random() < 0.25:
            cap = rng.choice(out)["caption"]
            dom = next(r["domain"] for r in out if r["caption"] == cap)
        else:
            dom = rng.choice(sorted(DOMAINS))
            cap = rng.choice(DOMAINS[dom]).format(f=rng.choice(FINDINGS[dom]))
            if rng.random() < 0.5:
                cap += f" (case {rng.randint(1, 40)})"
        out.append({"id": f"r{i:05d}", "caption": cap, "domain": dom, "red": round(rng.random(), 3)})
    return out


def write_corpus(root: str, records: list[dict], *, with_images: bool = True) -> list[str]:
    """Split ``records`` over a jsonl file, a parquet file and a WebDataset tar,
    in the shapes of PMC-OA (jsonl), a parquet table and BIOMEDICA (tar)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    n = len(records)
    a, b = n // 3, 2 * n // 3
    # PMC-OA jsonl: relative image paths, no id, domain given
    jl = os.path.join(root, "a_pmc_oa.jsonl")
    with open(jl, "w") as fh:
        for i, r in enumerate(records[:a]):
            name = f"images/{r['id']}.png"
            if with_images:
                color_image(r["red"], i).save(os.path.join(root, name))
            fh.write(json.dumps({"image": name, "caption": r["caption"], "id": r["id"], "domain": r["domain"]}) + "\n")
    # parquet with absolute image paths
    pqp = os.path.join(root, "b_table.parquet")
    rows = records[a:b]
    paths = []
    for j, r in enumerate(rows):
        p = os.path.join(root, "images", f"{r['id']}.png")
        if with_images:
            color_image(r["red"], a + j).save(p)
        paths.append(p)
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "caption": [r["caption"] for r in rows],
                             "image": paths, "domain": [r["domain"] for r in rows]}), pqp)
    # WebDataset tar (BIOMEDICA-like: jpg/png + txt + json with a cluster label)
    tp = os.path.join(root, "c_shard-000000.tar")
    with tarfile.open(tp, "w") as tf:
        for j, r in enumerate(records[b:]):
            key = f"{r['id']}"
            buf = io.BytesIO()
            color_image(r["red"], b + j).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", r["caption"].encode()),
                              ("json", json.dumps({"image_primary_label": [r["domain"]], "id": r["id"]}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tf.addfile(info, io.BytesIO(data))
    return [jl, pqp, tp]


def file_hashes(bank: str) -> dict[str, str]:
    """sha256 of every file in a bank directory (relative path -> hex)."""
    out = {}
    for root, dirs, files in os.walk(bank):
        dirs[:] = [d for d in dirs if d != ".build"]
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, bank)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _word_id(w: str, vocab: int) -> int:
    return int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "little") % vocab + 1


class FixtureVLM(torch.nn.Module):
    """A deterministic CLIP-shaped test fixture, not a model: the image feature
    is ``[4 (mean red - 0.5), fixed projection of the other pixel statistics]``;
    the text feature is ``[1, 0.5 * mean of fixed word vectors]``: S_v favours
    red images for every query, with a query-dependent part, and spreads
    widely enough that near-equal scores are rare."""

    def __init__(self, dim: int = 8, vocab: int = 997, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.proj = torch.nn.Parameter(torch.randn(5, dim - 1, generator=g), requires_grad=False)
        self.words = torch.nn.Parameter(torch.randn(vocab + 1, dim - 1, generator=g), requires_grad=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(np.log(100.0))))

    def transform(self, train: bool):
        def tf(img):
            a = np.asarray(img.convert("RGB").resize((12, 12)), dtype=np.float32) / 255.0
            return torch.from_numpy(a).permute(2, 0, 1).contiguous()
        return tf

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        red = images[:, 0].mean((1, 2))
        stats = torch.stack([images[:, 1].mean((1, 2)), images[:, 2].mean((1, 2)), images[:, 1].std((1, 2)),
                             images[:, 2].std((1, 2)), images[:, 0].std((1, 2))], 1)
        return torch.cat([(red[:, None] - 0.5) * 4, stats @ self.proj], 1)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), 16, dtype=torch.int64)
        for i, t in enumerate(texts):
            ids = [_word_id(w, self.vocab) for w in t.lower().split()][:16]
            out[i, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens > 0).float()
        v = (self.words[tokens] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return torch.cat([torch.ones(tokens.shape[0], 1), 0.5 * v], 1)
