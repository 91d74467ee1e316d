"""mgtil-synth: a SYNTHETIC benchmark, so the whole method can run on a laptop
with no data and no GPU (``mgcl demo``). Nothing here is a medical image.

It mimics the structure that matters for retrieval-guided continual learning:

- three "imaging principles" (domains), each with two fine-grained tasks:
  a grey radiograph-like domain (chest silhouette, ribs, trachea; findings are
  nodules, consolidation, effusion, pneumothorax, and tubes whose tip position
  is the class), a stained-tissue domain (Beer-Lambert H&E colour model;
  findings are gland architecture, nuclear density, size and atypia) and a
  fundus domain (orange field, optic disc and cup, branching vessels; findings
  are microaneurysms, haemorrhages, exudates, new vessels, cup size). Images of
  one domain look alike and differ in small lesion details; domains differ
  completely;
- five distractor domains that appear only in the captioned corpus
  (dermoscopy, endoscopy, blood-smear cytology, head CT, ultrasound);
- a captioned corpus (>= 20,000 image-caption pairs, WebDataset tar shards)
  whose captions name domain, site and finding in varied PubMed-like wording,
  with several images sharing one caption (multi-panel figures), so a text
  query for a task's class prompt retrieves relevant pairs.

Task images carry a mild per-task acquisition shift (blur, noise, gain, tint)
that corpus images do not, so a model pretrained on the corpus transfers
zero-shot but still gains from fine-tuning.

The benchmark itself (tasks, classes and the finding each draws, sizes) is
data in ``mgcl.mgtil.benchmarks`` (``SYNTH_TASKS``, ``SYNTH_SIZES``); this
module draws it. ``build(cache_dir=None, seed=0, quick=False)`` generates
everything (numpy, vectorised over images; deterministic for a seed on a given
numpy build) into ``<mgcl cache>/synth/v<version>-seed<seed>[-quick]`` (the
cache: ``mgcl._env.cache_dir``) with one atomic rename,
and returns a ``SynthData``. The task folders follow the data-root layout of
``mgcl.mgtil.data`` (``<root>/tasks/<task>/{train,test}/<class>/*.png``), so
``mgcl mgtil check --root <root>/tasks --benchmark mgtil-synth`` works on them.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .._env import cache_dir as mgcl_cache_dir
from .._io import atomic_write, publish_dir
from .benchmarks import MGTIL_SYNTH, MGTIL_SYNTH_QUICK, SYNTH_NOTICE, SYNTH_SIZES, SYNTH_TASKS, BenchmarkDef
from .data import load_benchmark, normalise_label
from .synth_images import (H, SIZE, W, _acquire, render_ct, render_cytology, render_dermoscopy, render_endoscopy,
                           render_fundus, render_histo, render_ultrasound, render_xray)

VERSION = "1"
LABEL = "mgtil-synth (SYNTHETIC)"
_CHUNK = 256          # images per numpy batch (and per RNG stream)

# ---- domains, findings and caption vocabulary ----------------------------------------------------

@dataclass(frozen=True)
class Domain:
    """One imaging domain of the corpus: its renderer and the words its captions use."""

    name: str                        # domain tag, as in the corpus json and Task.domain
    render: Callable                 # render_<domain>(rng, findings) -> float RGB [n, 64, 64, 3]
    modalities: tuple[str, ...]      # ways a caption names the image type
    sites: tuple[str, ...]           # anatomical sites (unless a finding brings its own)
    details: tuple[str, ...]         # acquisition / magnification / laterality remarks
    findings: dict                   # finding key -> (caption phrases, sites or None for the domain's)


DOMAINS = {
    "x-ray": Domain(
        "x-ray", render_xray,
        ("chest radiograph", "chest x-ray", "frontal chest radiograph", "PA chest x-ray",
         "portable AP chest radiograph", "plain chest film"),
        ("chest", "thorax", "lungs"),
        ("right upper zone", "left lower zone", "right lower lobe", "left upper lobe", "right mid zone",
         "left mid zone", "ICU patient", "emergency department"),
        {
            "normal": (("no finding", "no acute cardiopulmonary abnormality", "clear lungs and a normal cardiac "
                        "silhouette", "no support device or line", "a normal chest radiograph appearance"), None),
            "nodule": (("a pulmonary nodule", "a solitary pulmonary nodule", "a small rounded lung nodule",
                        "a well-circumscribed nodular opacity"), None),
            "mass": (("a lung mass", "a large pulmonary mass", "a mass lesion in the lung"), None),
            "consolidation": (("consolidation", "lobar consolidation", "an area of airspace consolidation",
                               "a patchy consolidative opacity"), None),
            "effusion": (("a pleural effusion", "a pleural effusion with blunting of the costophrenic angle",
                          "layering pleural fluid", "a meniscus-shaped pleural effusion"), None),
            "pneumothorax": (("a pneumothorax", "a pneumothorax with a visible pleural line",
                              "a pneumothorax with absent lung markings", "an apical pneumothorax"), None),
            "cardiomegaly": (("cardiomegaly", "an enlarged cardiac silhouette",
                              "cardiomegaly with increased cardiothoracic ratio"), None),
            "ett_normal": (("an endotracheal tube in normal position",
                            "an endotracheal tube with its tip well above the carina",
                            "a correctly positioned endotracheal tube"), None),
            "ett_low": (("an endotracheal tube in abnormal position", "a low endotracheal tube at the carina",
                         "an endotracheal tube malpositioned in the right main bronchus"), None),
            "ngt": (("a nasogastric tube", "a nasogastric tube coursing below the diaphragm into the stomach",
                     "an enteric feeding tube in the stomach"), None),
        }),
    "histopathology": Domain(
        "histopathology", render_histo,
        ("H&E stained section", "histopathology image", "photomicrograph", "hematoxylin and eosin stained slide",
         "histological section"),
        ("tissue",),
        ("H&E, x200", "H&E, original magnification x400", "high power view", "low magnification",
         "hematoxylin and eosin, 20x", "biopsy specimen", "resection specimen"),
        {
            "normal_mucosa": (("normal colonic mucosa", "normal colonic crypts with regular glands",
                               "benign colonic mucosa"), ("colon", "large bowel", "rectum")),
            "adenoma": (("colorectal adenoma", "a tubular adenoma with crowded elongated nuclei",
                         "adenomatous epithelium with low-grade dysplasia"), ("colon", "large bowel", "rectum")),
            "adenocarcinoma": (("colorectal adenocarcinoma", "invasive adenocarcinoma with irregular glands",
                                "moderately differentiated adenocarcinoma with dirty necrosis"),
                               ("colon", "large bowel", "rectum")),
            "stroma": (("cancer-associated stroma", "desmoplastic stroma with spindle cells", "fibrous stroma"),
                       ("colon", "large bowel")),
            "lymphocytes": (("lymphocytes", "a dense lymphocytic infiltrate", "a lymphoid aggregate"),
                            ("colon", "lymph node")),
            "fibroadenoma": (("fibroadenoma", "a breast fibroadenoma with slit-like compressed ducts",
                              "a benign fibroepithelial lesion"), ("breast",)),
            "dcis": (("ductal carcinoma in situ", "DCIS filling a duct with an intact myoepithelial layer",
                      "intraductal carcinoma"), ("breast",)),
            "idc": (("invasive ductal carcinoma", "infiltrating ductal carcinoma with nests of atypical cells",
                     "invasive breast carcinoma"), ("breast",)),
            "necrosis": (("tumour necrosis", "necrotic debris", "coagulative necrosis"), ("colon", "breast")),
            "adipose": (("adipose tissue", "mature fat cells", "normal adipose tissue"), ("breast", "colon")),
        }),
    "fundus": Domain(
        "fundus", render_fundus,
        ("fundus photograph", "color fundus photo", "retinal photograph", "fundus image",
         "retinal fundus photograph"),
        ("retina", "right eye", "left eye", "posterior pole"),
        ("right eye", "left eye", "macula-centred field", "45-degree field", "screening programme"),
        {
            "no_dr": (("no diabetic retinopathy", "a normal retina without diabetic retinopathy",
                       "no signs of retinopathy"), None),
            "mild_npdr": (("mild diabetic retinopathy", "mild non-proliferative diabetic retinopathy with "
                           "scattered microaneurysms", "a few microaneurysms"), None),
            "moderate_npdr": (("moderate diabetic retinopathy", "moderate non-proliferative diabetic retinopathy "
                               "with dot-blot haemorrhages and hard exudates",
                               "retinal haemorrhages and hard exudates"), None),
            "pdr": (("proliferative diabetic retinopathy", "neovascularisation of the disc with extensive "
                     "haemorrhages", "proliferative retinopathy with new vessels"), None),
            "healthy_disc": (("a healthy optic disc", "a normal cup-to-disc ratio", "a healthy optic nerve head"),
                             ("optic disc", "optic nerve head")),
            "glaucoma_suspect": (("glaucoma suspect", "a borderline enlarged optic cup",
                                  "a suspicious cup-to-disc ratio of 0.6"), ("optic disc", "optic nerve head")),
            "glaucoma": (("glaucomatous optic neuropathy", "glaucoma with a large cup-to-disc ratio",
                          "advanced glaucomatous cupping of the optic disc"), ("optic disc", "optic nerve head")),
            "drusen": (("macular drusen", "drusen in age-related macular degeneration"), ("macula",)),
            "papilledema": (("papilledema", "a swollen optic disc with blurred margins"), ("optic disc",)),
        }),
    "dermoscopy": Domain(
        "dermoscopy", render_dermoscopy,
        ("dermoscopy image", "dermoscopic photograph", "dermatoscopic view", "polarised dermoscopy image"),
        ("skin", "back", "forearm", "lower leg", "trunk"),
        ("clinical follow-up", "excised lesion", "contact dermoscopy"),
        {
            "nevus": (("a benign melanocytic nevus", "a nevus with a regular pigment network"), None),
            "melanoma": (("melanoma", "an invasive melanoma with irregular borders and a blue-white veil"), None),
            "seb_keratosis": (("seborrheic keratosis", "a seborrheic keratosis with milia-like cysts"), None),
            "bcc": (("basal cell carcinoma", "basal cell carcinoma with arborizing vessels"), None),
        }),
    "endoscopy": Domain(
        "endoscopy", render_endoscopy,
        ("colonoscopy image", "endoscopic view", "gastroscopy image", "endoscopy frame"),
        ("colon", "stomach", "duodenum", "sigmoid colon"),
        ("white light", "narrow-band imaging", "screening colonoscopy"),
        {
            "normal": (("normal mucosa", "unremarkable mucosa"), None),
            "polyp": (("a sessile polyp", "a pedunculated polyp", "a colonic polyp"), None),
            "ulcer": (("an ulcer with a fibrin base", "a peptic ulcer"), None),
            "bleeding": (("active bleeding", "fresh blood in the lumen"), None),
        }),
    "cytology": Domain(
        "cytology", render_cytology,
        ("peripheral blood smear", "bone marrow aspirate", "Wright-Giemsa stained smear", "cytology image"),
        ("blood", "bone marrow"),
        ("oil immersion, x1000", "May-Grunwald-Giemsa stain"),
        {
            "neutrophil": (("a segmented neutrophil", "a neutrophil with a multilobed nucleus"), None),
            "lymphocyte": (("a mature lymphocyte", "a small lymphocyte"), None),
            "blast": (("a myeloblast", "blast cells with fine chromatin"), None),
            "eosinophil": (("an eosinophil", "an eosinophil with orange granules"), None),
        }),
    "ct": Domain(
        "ct", render_ct,
        ("non-contrast head CT", "axial CT image", "computed tomography of the brain", "CT scan"),
        ("brain", "head"),
        ("axial slice", "brain window"),
        {
            "normal": (("no acute intracranial abnormality", "a normal brain CT"), None),
            "haemorrhage": (("an intracerebral haemorrhage", "a hyperdense haematoma"), None),
            "infarct": (("an ischaemic infarct", "a hypodense territorial infarct"), None),
            "hydrocephalus": (("hydrocephalus", "hydrocephalus with enlarged ventricles"), None),
        }),
    "ultrasound": Domain(
        "ultrasound", render_ultrasound,
        ("ultrasound image", "abdominal sonography", "B-mode ultrasound", "sonogram"),
        ("liver", "gallbladder", "right upper quadrant"),
        ("transverse view", "longitudinal view"),
        {
            "normal": (("normal liver echotexture", "an unremarkable liver"), None),
            "gallstone": (("a gallstone with posterior acoustic shadowing", "cholelithiasis"), None),
            "cyst": (("a simple anechoic cyst", "a hepatic cyst with posterior enhancement"), None),
            "mass": (("a hyperechoic liver lesion", "a solid hepatic mass"), None),
        }),
}
PRINCIPLES = ("x-ray", "histopathology", "fundus")
DISTRACTORS = ("dermoscopy", "endoscopy", "cytology", "ct", "ultrasound")
# share of the corpus per domain
DOMAIN_WEIGHTS = {"x-ray": 0.2, "histopathology": 0.2, "fundus": 0.2, "dermoscopy": 0.08, "endoscopy": 0.08,
                  "cytology": 0.08, "ct": 0.08, "ultrasound": 0.08}


def render(domain: str, findings, key, style: dict | None = None, workers: int = 1) -> np.ndarray:
    """uint8 images [n, 64, 64, 3] of ``domain``, one per finding key. ``key`` (a
    sequence of ints) seeds the RNG of each chunk of ``_CHUNK`` images as
    ``(*key, chunk)``, so the result does not depend on ``workers`` (threads:
    numpy releases the GIL in its array loops)."""
    spec = DOMAINS[domain]
    findings = np.asarray(findings)
    unknown = set(findings.tolist()) - set(spec.findings)
    if unknown:
        raise ValueError(f"render: {domain} has no finding(s) {sorted(unknown)}; known: {list(spec.findings)}")
    out = np.empty((len(findings), H, W, 3), np.uint8)

    def one(c: int) -> None:
        rng = np.random.default_rng([*key, c])
        f = findings[c * _CHUNK:(c + 1) * _CHUNK]
        rgb = spec.render(rng, f)
        if style:
            rgb = _acquire(rgb, rng, style)
        out[c * _CHUNK:c * _CHUNK + len(f)] = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)

    _parallel(one, range(-(-len(findings) // _CHUNK)), workers)
    return out


def _parallel(fn, items, workers: int) -> None:
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        for it in items:
            fn(it)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as ex:
        for _ in ex.map(fn, items):
            pass


# ---- the tasks ---------------------------------------------------------------------------------

# ---- captions ------------------------------------------------------------------------------------

CAPTION_TEMPLATES = (
    "{Mod} of the {site} showing {find}.",
    "{Mod} demonstrating {find} ({det}).",
    "{Find} on {mod}.",
    "{Mod}: {find}.",
    "Figure {fig}. {Mod} of a {age}-year-old {sex} with {find}.",
    "{Mod} reveals {find}, {det}.",
    "Representative {mod} showing {find}.",
    "Case {fig}: {find} seen on {mod} of the {site}.",
    "{Mod} of the {site}. Note {find} (arrow).",
)
# captions that name no finding (PubMed has plenty); they duplicate across figures
WEAK_TEMPLATES = ("{Mod} of the {site}.", "{Mod}, {det}.", "Figure {fig}. {Mod}.")
WEAK_SHARE = 0.06
GROUP_SIZES = (1, 1, 1, 2, 2, 3, 4, 6)     # images per caption (multi-panel figures share one)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _caption(rng, domain: str, finding: str) -> str:
    spec = DOMAINS[domain]
    phrases, sites = spec.findings[finding]
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    mod, site, find, det = pick(spec.modalities), pick(sites or spec.sites), pick(phrases), pick(spec.details)
    weak = rng.random() < WEAK_SHARE
    tpl = pick(WEAK_TEMPLATES if weak else CAPTION_TEMPLATES)
    return tpl.format(Mod=_cap(mod), mod=mod, site=site, find=find, Find=_cap(find), det=det,
                      fig=int(rng.integers(1, 9)), age=int(rng.integers(18, 90)),
                      sex=pick(("man", "woman", "male patient", "female patient")))


def _corpus_plan(rng, n_total: int) -> list[tuple[str, str, str, int]]:
    """(domain, finding, caption, group id) per corpus entry, in corpus order."""
    doms = list(DOMAIN_WEIGHTS)
    p = np.array([DOMAIN_WEIGHTS[d] for d in doms])
    plan: list[tuple[str, str, str, int]] = []
    gid = 0
    while len(plan) < n_total:
        d = doms[int(rng.choice(len(doms), p=p / p.sum()))]
        keys = list(DOMAINS[d].findings)
        fnd = keys[int(rng.integers(len(keys)))]
        cap = _caption(rng, d, fnd)
        k = min(GROUP_SIZES[int(rng.integers(len(GROUP_SIZES)))], n_total - len(plan))
        plan += [(d, fnd, cap, gid)] * k
        gid += 1
    return plan


# ---- writing -------------------------------------------------------------------------------------

def _stream(name: str) -> int:
    return zlib.crc32(name.encode())


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png(img: np.ndarray) -> bytes:
    """A standard 8-bit RGB PNG (filter "Up" on every row, zlib level 1): three
    times faster than PIL's encoder for 64x64 images and byte-stable for a given zlib."""
    h, w, _ = img.shape
    rows = img.reshape(h, w * 3)
    up = rows.copy()
    up[1:] -= rows[:-1]                                 # uint8 arithmetic wraps mod 256, as PNG wants
    raw = np.concatenate([np.full((h, 1), 2, np.uint8), up], axis=1).tobytes()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(raw, 1)) + _png_chunk(b"IEND", b""))


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def _pngs(images: np.ndarray, workers: int) -> list[bytes]:
    out: list[bytes] = [b""] * len(images)

    def one(s0: int) -> None:
        for i in range(s0, min(s0 + 256, len(images))):
            out[i] = _png(images[i])

    _parallel(one, range(0, len(images), 256), workers)
    return out


def _generate(out: Path, seed: int, quick: bool, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from ..retrieval.store import sha256_file

    workers = min(4, os.cpu_count() or 1)
    sz = SYNTH_SIZES[bool(quick)]
    bench = MGTIL_SYNTH_QUICK if quick else MGTIL_SYNTH
    task_meta = []
    bar = tqdm(total=len(SYNTH_TASKS) * 2 + len(DOMAINS) + 1, desc="mgtil-synth (SYNTHETIC)", unit="step",
               disable=not progress)
    for t in SYNTH_TASKS:
        for split_no, split in enumerate(("train", "test")):
            per = sz[split]
            findings = np.repeat([k for _, k in t.classes], per)
            pngs = _pngs(render(t.domain, findings, (seed, _stream(t.name), split_no), t.style, workers), workers)
            for c, (cname, _) in enumerate(t.classes):
                d = out / "tasks" / t.name / split / normalise_label(cname)
                d.mkdir(parents=True, exist_ok=True)
                for j in range(per):
                    (d / f"{split}-{j:04d}.png").write_bytes(pngs[c * per + j])
            bar.update(1)
        task_meta.append({"name": t.name, "domain": t.domain, "site": t.site,
                          "classes": [c for c, _ in t.classes], "findings": [k for _, k in t.classes],
                          "folders": [normalise_label(c) for c, _ in t.classes], "templates": list(t.templates),
                          "n_train": sz["train"] * len(t.classes), "n_test": sz["test"] * len(t.classes),
                          "style": t.style})
    plan = _corpus_plan(np.random.default_rng([seed, _stream("corpus-plan")]), sz["corpus"])
    pngs: list[bytes] = [b""] * len(plan)
    for d in DOMAINS:
        idx = [i for i, rec in enumerate(plan) if rec[0] == d]
        if idx:
            imgs = render(d, np.array([plan[i][1] for i in idx]), (seed, _stream("corpus:" + d)), workers=workers)
            for i, png in zip(idx, _pngs(imgs, workers)):
                pngs[i] = png
        bar.update(1)
    (out / "corpus").mkdir()
    shards = []
    for s0 in range(0, len(plan), sz["shard"]):
        rel = f"corpus/shard-{s0 // sz['shard']:05d}.tar"
        with tarfile.open(out / rel, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s0, min(s0 + sz["shard"], len(plan))):
                d, fnd, cap, gid = plan[i]
                key = f"{i:06d}"
                meta = {"id": f"synth-{i:06d}", "domain": d, "finding": fnd, "figure": gid, "synthetic": True}
                _tar_add(tar, key + ".png", pngs[i])
                _tar_add(tar, key + ".txt", cap.encode())
                _tar_add(tar, key + ".json", json.dumps(meta, sort_keys=True).encode())
        shards.append(rel)
    bar.update(1)
    bar.close()
    counts = {d: sum(1 for rec in plan if rec[0] == d) for d in DOMAINS}
    return {
        "name": bench.name, "synthetic": True, "notice": SYNTH_NOTICE, "version": VERSION, "seed": seed,
        "quick": bool(quick), "image_size": SIZE, "order": [t.name for t in SYNTH_TASKS], "tasks": task_meta,
        "principles": list(PRINCIPLES), "distractors": list(DISTRACTORS), "domains": list(DOMAINS),
        "corpus": {"format": "webdataset", "shards": shards, "size": len(plan),
                   "captions": len({rec[2] for rec in plan}), "figures": plan[-1][3] + 1 if plan else 0,
                   "domains": counts, "sha256": {rel: sha256_file(str(out / rel)) for rel in shards}},
    }


def default_cache_dir(seed: int = 0, quick: bool = False) -> Path:
    return mgcl_cache_dir("synth", f"v{VERSION}-seed{seed}{'-quick' if quick else ''}")


def build(cache_dir=None, seed: int = 0, quick: bool = False, *, progress: bool = True) -> "SynthData":
    """Generate mgtil-synth into ``cache_dir`` (default ``default_cache_dir(seed, quick)``),
    or reuse it when it already holds this version / seed / size. The whole
    directory appears at once (built beside it, then renamed)."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"synth.build: seed must be a non-negative int, got {seed!r}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(seed, quick)
    if not (root / "manifest.json").is_file():
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise ValueError(f"synth.build: {root} exists and is not an mgtil-synth cache; remove it or pass "
                             f"another cache_dir")
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            manifest = _generate(tmp, seed, quick, progress)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
            try:
                publish_dir(str(tmp), str(root))  # atomic; also replaces an empty directory
            except OSError:
                if not (root / "manifest.json").is_file():   # not a concurrent build that won the race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load(root, seed=seed, quick=quick)


# ---- reading -------------------------------------------------------------------------------------

class CorpusDataset:
    """The captioned corpus, map-style: ``ds[i] = (PIL image, caption)``. Reads
    the WebDataset shards through an index of member offsets (no extraction)."""

    def __init__(self, shards, transform=None):
        self.shards = [str(s) for s in shards]
        self.transform = transform
        self.ids, self.captions, self.domains, self.findings, self.figures, self.keys = [], [], [], [], [], []
        self._loc: list[tuple[int, int, int]] = []
        for si, path in enumerate(self.shards):
            recs: dict[str, dict] = {}
            with tarfile.open(path, "r") as tar:
                for m in tar:
                    key, ext = m.name.rsplit(".", 1)
                    r = recs.setdefault(key, {})
                    if ext == "png":
                        r["png"] = (si, m.offset_data, m.size)
                    else:
                        r[ext] = tar.extractfile(m).read().decode()
            for key, r in recs.items():
                meta = json.loads(r["json"])
                self.keys.append(f"{key}.png")
                self.ids.append(meta["id"]), self.domains.append(meta["domain"])
                self.findings.append(meta["finding"]), self.figures.append(meta["figure"])
                self.captions.append(r["txt"]), self._loc.append(r["png"])

    def __len__(self) -> int:
        return len(self.ids)

    def png_bytes(self, i: int) -> bytes:
        si, off, size = self._loc[i]
        with open(self.shards[si], "rb") as fh:
            fh.seek(off)
            return fh.read(size)

    def image_ref(self, i: int) -> str:
        """The image reference convention of the retrieval bank: ``"<tar path>::<member>"``."""
        from ..retrieval.images import tar_ref

        return tar_ref(self.shards[self._loc[i][0]], self.keys[i])

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(io.BytesIO(self.png_bytes(i))) as im:
            img = im.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.captions[i]

    def decode_all(self, progress: bool = False) -> np.ndarray:
        """Every image as one uint8 array [N, 64, 64, 3] (fast pretraining input)."""
        from PIL import Image
        from tqdm.auto import tqdm

        out = np.empty((len(self), H, W, 3), np.uint8)
        for i in tqdm(range(len(self)), desc="decode corpus (SYNTHETIC)", disable=not progress):
            with Image.open(io.BytesIO(self.png_bytes(i))) as im:
                out[i] = np.asarray(im.convert("RGB"))
        return out


@dataclass
class SynthData:
    """What ``build`` returns; every name in it says SYNTHETIC.

    - ``tasks``: the ``mgcl.cl.Task`` sequence (lazy datasets of (PIL image, int));
    - ``benchmark``: its ``BenchmarkDef`` (``mgtil-synth`` / ``mgtil-synth-quick``);
    - ``corpus_shards``: WebDataset tars (``<key>.png``, ``<key>.txt`` caption,
      ``<key>.json`` with id, domain, finding, figure) for ``mgcl db build``;
    - ``domains``: every corpus domain; ``task_domains`` / ``distractor_domains`` split them;
    - ``class_prompts``: task name -> one prompt per class (template 0).
    """

    root: Path
    seed: int
    quick: bool
    benchmark: BenchmarkDef
    tasks: list
    corpus_shards: list[Path]
    corpus_size: int
    domains: tuple[str, ...]
    task_domains: tuple[str, ...]
    distractor_domains: tuple[str, ...]
    class_prompts: dict[str, list[str]]
    manifest: dict
    label: str = LABEL

    @property
    def tasks_root(self) -> Path:
        return self.root / "tasks"

    def corpus(self, transform=None) -> CorpusDataset:
        return CorpusDataset(self.corpus_shards, transform)

    def corpus_records(self):
        """Dicts ``{"id", "caption", "domain", "image"}`` (image: ``"<tar>::<member>"``)."""
        c = self.corpus()
        for i in range(len(c)):
            yield {"id": c.ids[i], "caption": c.captions[i], "domain": c.domains[i], "image": c.image_ref(i)}

    def write_jsonl(self, path) -> Path:
        """The corpus as jsonl (``id``, ``image`` = ``"<tar>::<member>"``, ``caption``, ``domain``), atomically."""
        path = Path(path)

        def write(tmp):
            with open(tmp, "w") as fh:
                for r in self.corpus_records():
                    fh.write(json.dumps(r) + "\n")

        atomic_write(str(path), write)
        return path

    def __repr__(self) -> str:
        return (f"SynthData({self.label}, root={str(self.root)!r}, seed={self.seed}, quick={self.quick}, "
                f"{len(self.tasks)} tasks, corpus {self.corpus_size} pairs in {len(self.corpus_shards)} shards)")


def load(root, seed: int | None = None, quick: bool | None = None) -> SynthData:
    """Open a built mgtil-synth directory; ``seed`` / ``quick``, when given, must match it."""
    root = Path(root).expanduser().absolute()      # image refs are "<absolute tar path>::<member>"
    try:
        m = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{root} is not an mgtil-synth cache (manifest.json: {e})") from None
    want = {"version": VERSION, "seed": seed, "quick": None if quick is None else bool(quick)}
    for k, v in want.items():
        if v is not None and m.get(k) != v:
            raise ValueError(f"{root} holds mgtil-synth {k}={m.get(k)!r}, not {v!r}; pass another cache_dir "
                             f"or delete it")
    bench = MGTIL_SYNTH_QUICK if m["quick"] else MGTIL_SYNTH
    tasks = load_benchmark(bench, root / "tasks")
    return SynthData(
        root=root, seed=m["seed"], quick=m["quick"], benchmark=bench, tasks=tasks,
        corpus_shards=[root / s for s in m["corpus"]["shards"]], corpus_size=m["corpus"]["size"],
        domains=tuple(m["domains"]), task_domains=tuple(m["principles"]), distractor_domains=tuple(m["distractors"]),
        class_prompts={t.name: t.prompts(0) for t in tasks}, manifest=m)
