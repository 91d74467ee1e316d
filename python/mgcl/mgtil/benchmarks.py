"""The MGTIL benchmark definitions (SPEC.md section 7): every dataset's name,
domain, class labels, prompt templates and expected size, and the task orders
of HieraMedTransfer (HMT) and MedXtreme.

Nothing here touches the disk or imports another module of the package: it
is data. ``mgcl.mgtil.data`` reads a user's data root against these
definitions (``check`` and ``load_benchmark``); ``mgcl.mgtil.synth`` generates
the SYNTHETIC benchmark ``mgtil-synth`` defined at the end of this file.

Class labels. ``DatasetDef.classes`` are the labels as the dataset itself
spells them (the names a data root's class folders or csv labels are matched
against, see ``mgcl.mgtil.data``); ``DatasetDef.prompt_names`` are the same
classes in plain words, the text that goes into the prompt templates
(``Task.classnames``). Class index i is the i-th entry of both.

Sizes. ``n_images`` is the total image count of SPEC.md. The paper's train /
test split sizes are not in SPEC.md, so ``n_train`` / ``n_test`` are None for
the real datasets and ``mgcl mgtil check`` compares the total only.

Where a label set is reconstructed from memory rather than from the dataset's
own files, ``DatasetDef.notes`` says so; ``mgcl mgtil check`` on a user's root
is the way to catch a mismatch (it reports class folders / labels it does not
know).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

# Domain tags of the real datasets, lower case, one per imaging modality: SPEC.md's words where
# it uses one as a domain (x-ray, pathology, fundus, endoscopy); the retrieval taxonomy knows
# "pathology" as an alias of its "histopathology" (the Siphon's Phi_D resolves it). BMC and
# ISIC2024, "bone-marrow cells" and "skin" in SPEC.md, are tagged by modality (cytology,
# dermoscopy); the subject is their ``site``.
DOMAINS = ("x-ray", "pathology", "fundus", "cytology", "dermoscopy", "endoscopy")


@dataclass(frozen=True)
class DatasetDef:
    """One dataset of a benchmark (one task of a sequence)."""

    name: str                       # folder name under a data root, e.g. "RANZCR"
    domain: str                     # imaging domain tag (DOMAINS for the real datasets)
    site: str                       # anatomical site / subject, e.g. "chest", "retina"
    classes: tuple[str, ...]        # the dataset's own labels, index order
    prompt_names: tuple[str, ...]   # the same classes in words, for prompts
    templates: tuple[str, ...]      # prompt formats with one "{}"; index 0 is the canonical one
    n_images: int                   # total images (train + test), SPEC.md
    n_train: int | None = None      # expected train / test sizes where known
    n_test: int | None = None
    aliases: tuple[tuple[str, str], ...] = ()  # (other spelling, class label) pairs a root may use
    source: str = ""                # where the dataset comes from
    notes: str = ""                 # uncertainty about the label set, choices made by mgcl
    synthetic: bool = False         # True for mgtil-synth: generated data, not medical images

    def __post_init__(self):
        if len(self.classes) != len(self.prompt_names):
            raise ValueError(f"{self.name}: {len(self.classes)} classes but {len(self.prompt_names)} prompt names")
        if len(set(self.classes)) != len(self.classes) or len(set(self.prompt_names)) != len(self.prompt_names):
            raise ValueError(f"{self.name}: duplicated class labels or prompt names")
        for t in self.templates:
            if t.count("{}") != 1:
                raise ValueError(f"{self.name}: template {t!r} must contain exactly one '{{}}'")
        for alias, label in self.aliases:
            if label not in self.classes:
                raise ValueError(f"{self.name}: alias {alias!r} names unknown class {label!r}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def prompts(self, template: int = 0) -> list[str]:
        return [self.templates[template].format(c) for c in self.prompt_names]


@dataclass(frozen=True)
class BenchmarkDef:
    """A task sequence: ``datasets`` in training order."""

    name: str
    title: str
    datasets: tuple[DatasetDef, ...]
    order: str                      # how the order was made, in words
    seed: int | None = None         # the seed of a seeded permutation
    synthetic: bool = False
    aliases: tuple[str, ...] = field(default=(), compare=False)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.datasets]

    def dataset(self, name: str) -> DatasetDef:
        for d in self.datasets:
            if d.name == name:
                return d
        raise KeyError(f"{self.name}: no dataset {name!r}; datasets: {', '.join(self.names)}")

    @property
    def display_name(self) -> str:
        return f"{self.name} (SYNTHETIC data)" if self.synthetic else self.name


# ---- prompt templates per domain ---------------------------------------------------------

_XRAY = ("a chest x-ray showing {}.", "a chest radiograph with {}.", "a frontal chest x-ray demonstrating {}.")
_XRAY_DEVICE = ("a chest x-ray with {}.", "a chest radiograph showing {}.", "a portable chest x-ray with {}.")
_PATH = ("a histopathology image of {}.", "an H&E stained tissue section showing {}.",
         "a microscopy image of {} tissue.")
_NUCLEI = ("a histopathology image of {}.", "an H&E stained image patch showing {}.",
           "a microscopy image of {} in breast cancer tissue.")
_FUNDUS = ("a fundus photograph of {}.", "a retinal fundus image showing {}.", "a color fundus photo with {}.")
_CELL = ("a microscopy image of a bone marrow {}.", "a bone marrow smear showing a {}.",
         "a May-Grunwald-Giemsa stained {} from bone marrow.")
_DERM = ("a dermoscopy image of {}.", "a dermoscopic photograph showing {}.", "a skin lesion image of {}.")
_ENDO = ("an endoscopic pituitary surgery frame during {}.", "an endoscopic video frame showing {}.",
         "a surgical endoscopy image of the {} step.")


# ---- HieraMedTransfer datasets (SPEC order) ------------------------------------------

RANZCR = DatasetDef(
    name="RANZCR", domain="x-ray", site="chest (catheters and tubes)",
    classes=("ETT - Abnormal", "ETT - Borderline", "ETT - Normal",
             "NGT - Abnormal", "NGT - Borderline", "NGT - Incompletely Imaged", "NGT - Normal",
             "CVC - Abnormal", "CVC - Borderline", "CVC - Normal", "Swan Ganz Catheter Present"),
    prompt_names=("endotracheal tube in abnormal position", "endotracheal tube in borderline position",
                  "endotracheal tube in normal position",
                  "nasogastric tube in abnormal position", "nasogastric tube in borderline position",
                  "incompletely imaged nasogastric tube", "nasogastric tube in normal position",
                  "central venous catheter in abnormal position", "central venous catheter in borderline position",
                  "central venous catheter in normal position", "Swan-Ganz catheter"),
    templates=_XRAY_DEVICE, n_images=33_665,
    source="RANZCR CLiP - Catheter and Line Position Challenge (Kaggle 2021)",
    notes="The 11 labels are the competition's target columns. RANZCR is multi-label; a single-label "
          "task needs one label per image (how the paper resolved this is not in SPEC.md).",
)

CHEXCHONET = DatasetDef(
    name="CheXchoNet", domain="x-ray", site="chest (heart)",
    classes=("No SLVH or DLV", "SLVH", "DLV", "SLVH and DLV"),
    prompt_names=("no left ventricular abnormality", "severe left ventricular hypertrophy",
                  "dilated left ventricle", "severe left ventricular hypertrophy and dilated left ventricle"),
    templates=_XRAY, n_images=71_589,
    source="CheXchoNet, PhysioNet 2024 (Bhave et al., Eur Heart J 2024)",
    notes="UNCERTAIN: CheXchoNet ships two binary echo labels (SLVH, DLV) and their composite; the 4 "
          "classes here are mgcl's reading of '4 classes' as the four SLVH x DLV combinations.",
)

PD = DatasetDef(
    name="PD", domain="x-ray", site="lung",
    classes=("COVID-19", "Pneumonia", "Normal"),
    prompt_names=("COVID-19", "pneumonia", "normal lungs"),
    templates=_XRAY, n_images=4_575,
    source="chest x-ray pneumonia / COVID-19 collection ('PD' in the paper)",
    notes="Class order (COVID-19, Pneumonia, Normal) is mgcl's choice.",
)

BREAKHIS = DatasetDef(
    name="BreakHis", domain="pathology", site="breast",
    classes=("benign", "malignant"),
    prompt_names=("benign breast tumor", "malignant breast tumor"),
    templates=_PATH, n_images=7_909,
    source="BreakHis (Spanhol et al., 2016)",
)

CHAOYANG = DatasetDef(
    name="Chaoyang", domain="pathology", site="colon",
    classes=("normal", "serrated", "adenocarcinoma", "adenoma"),
    prompt_names=("normal colonic mucosa", "serrated colorectal lesion", "colorectal adenocarcinoma",
                  "colorectal adenoma"),
    templates=_PATH, n_images=6_160,
    source="Chaoyang colon pathology dataset (Zhu et al., ICCV 2021); label indices 0-3 as in its json files",
)

NUCLS = DatasetDef(
    name="NuCLS", domain="pathology", site="breast (nuclei)",
    classes=("tumor", "non-tumor"),
    prompt_names=("tumor cell nuclei", "non-tumor cell nuclei"),
    templates=_NUCLEI, n_images=33_284,
    source="NuCLS nucleus classification dataset (Amgad et al., 2022)",
    notes="UNCERTAIN: NuCLS has ~13 nucleus classes grouped into super-classes; the binary split "
          "tumor / non-tumor is mgcl's reading of '2 classes'.",
)

EYEPACS = DatasetDef(
    name="EyePACS", domain="fundus", site="retina",
    classes=("No DR", "Mild", "Moderate", "Severe", "Proliferative DR"),
    prompt_names=("no diabetic retinopathy", "mild diabetic retinopathy", "moderate diabetic retinopathy",
                  "severe diabetic retinopathy", "proliferative diabetic retinopathy"),
    templates=_FUNDUS, n_images=35_126,
    source="EyePACS / Kaggle Diabetic Retinopathy Detection (2015), levels 0-4 (folders 0-4 also resolve)",
)

AIROGS = DatasetDef(
    name="AIROGS", domain="fundus", site="retina (optic disc)",
    classes=("NRG", "RG"),
    prompt_names=("no referable glaucoma", "referable glaucoma"),
    templates=_FUNDUS, n_images=101_442,
    source="Rotterdam EyePACS AIROGS challenge (2022): labels NRG / RG",
)

FARFUM_ROP = DatasetDef(
    name="FARFUM-RoP", domain="fundus", site="retina (infant)",
    classes=("Normal", "Pre-Plus", "Plus"),
    prompt_names=("normal retinal vessels", "pre-plus disease of retinopathy of prematurity",
                  "plus disease of retinopathy of prematurity"),
    templates=_FUNDUS, n_images=1_533,
    source="FARFUM-RoP (Farabi hospital retinopathy of prematurity dataset)",
    notes="Plus-disease grading Normal / Pre-Plus / Plus, from memory of the dataset description.",
)

# ---- MedXtreme datasets ---------------------------------------------------------------------

AOD = DatasetDef(
    name="AOD", domain="fundus", site="retina",
    classes=("Normal", "Diabetes", "Glaucoma", "Cataract", "AMD", "Hypertension", "Myopia", "Other"),
    prompt_names=("normal fundus", "diabetic retinopathy", "glaucoma", "cataract",
                  "age-related macular degeneration", "hypertensive retinopathy", "pathological myopia",
                  "other fundus abnormality"),
    templates=_FUNDUS, n_images=10_000,
    source="ocular disease fundus set, 10,000 images",
    aliases=(("N", "Normal"), ("D", "Diabetes"), ("G", "Glaucoma"), ("C", "Cataract"), ("A", "AMD"),
             ("H", "Hypertension"), ("M", "Myopia"), ("O", "Other")),
    notes="UNCERTAIN: mgcl reads 'AOD' as the ODIR-5K ocular disease set (5,000 patients x 2 eyes = "
          "10,000 images, 8 labels N/D/G/C/A/H/M/O; the single letters resolve as aliases).",
)

BMC = DatasetDef(
    name="BMC", domain="cytology", site="bone marrow",
    classes=("ABE", "ART", "BAS", "BLA", "EBO", "EOS", "FGC", "HAC", "KSC", "LYI", "LYT",
             "MMZ", "MON", "MYB", "NGB", "NGS", "NIF", "OTH", "PEB", "PLM", "PMO"),
    prompt_names=("abnormal eosinophil", "artefact", "basophil", "blast", "erythroblast", "eosinophil",
                  "faggot cell", "hairy cell", "smudge cell", "immature lymphocyte", "lymphocyte",
                  "metamyelocyte", "monocyte", "myelocyte", "band neutrophil", "segmented neutrophil",
                  "not identifiable cell", "other cell", "proerythroblast", "plasma cell", "promyelocyte"),
    templates=_CELL, n_images=171_375,
    source="Bone marrow cytomorphology (Matek et al., Blood 2021), 21 class folders",
)

ISIC2024 = DatasetDef(
    name="ISIC2024", domain="dermoscopy", site="skin",
    classes=("AIMP", "acrochordon", "actinic keratosis", "angiofibroma or fibrous papule", "angiokeratoma",
             "angioma", "atypical melanocytic proliferation", "atypical spitz tumor", "basal cell carcinoma",
             "cafe-au-lait macule", "clear cell acanthoma", "dermatofibroma", "lentigo NOS", "lentigo simplex",
             "lichenoid keratosis", "melanoma", "melanoma metastasis", "mucosal melanosis", "neurofibroma",
             "nevus", "nevus spilus", "other", "pigmented benign keratosis", "porokeratosis",
             "pyogenic granuloma", "scar", "sebaceous adenoma", "sebaceous hyperplasia", "seborrheic keratosis",
             "solar lentigo", "squamous cell carcinoma", "vascular lesion", "verruca"),
    prompt_names=("atypical intraepidermal melanocytic proliferation", "acrochordon", "actinic keratosis",
                  "angiofibroma or fibrous papule", "angiokeratoma", "angioma",
                  "atypical melanocytic proliferation", "atypical Spitz tumor", "basal cell carcinoma",
                  "cafe-au-lait macule", "clear cell acanthoma", "dermatofibroma", "lentigo",
                  "lentigo simplex", "lichenoid keratosis", "melanoma", "melanoma metastasis",
                  "mucosal melanosis", "neurofibroma", "melanocytic nevus", "nevus spilus", "other skin lesion",
                  "pigmented benign keratosis", "porokeratosis", "pyogenic granuloma", "scar",
                  "sebaceous adenoma", "sebaceous hyperplasia", "seborrheic keratosis", "solar lentigo",
                  "squamous cell carcinoma", "vascular lesion", "verruca"),
    templates=_DERM, n_images=81_722,
    source="ISIC archive, 2024 release",
    notes="UNCERTAIN: 33 ISIC-archive 'diagnosis' values reconstructed from memory; the exact 33 used by "
          "MedXtreme (and how the 2024 hierarchical iddx labels were flattened) are not in SPEC.md.",
)

NCT_CRC = DatasetDef(
    name="NCT-CRC-HE-100K", domain="pathology", site="colon",
    classes=("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"),
    prompt_names=("adipose tissue", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
    templates=_PATH, n_images=100_000,
    source="NCT-CRC-HE-100K (Kather et al., 2018), 9 tissue class folders",
)

NIH_CXR = DatasetDef(
    name="NIH ChestX-ray", domain="x-ray", site="chest",
    classes=("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
             "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
             "No Finding"),
    prompt_names=("atelectasis", "cardiomegaly", "pleural effusion", "infiltration", "lung mass",
                  "lung nodule", "pneumonia", "pneumothorax", "consolidation", "pulmonary edema", "emphysema",
                  "pulmonary fibrosis", "pleural thickening", "hernia", "no finding"),
    templates=_XRAY, n_images=112_120,
    source="NIH ChestX-ray14 (Wang et al., CVPR 2017): 14 findings + No Finding",
    notes="ChestX-ray14 is multi-label; a single-label task needs one label per image.",
)

PITVIS = DatasetDef(
    name="PITVIS", domain="endoscopy", site="pituitary (endonasal surgery)",
    classes=("operation not started", "nasal corridor creation", "anterior sphenoidotomy", "septum displacement",
             "sphenoid sinus clearance", "sellotomy", "durotomy", "tumour excision", "haemostasis",
             "synthetic graft placement", "fat graft placement", "gasket seal construct", "dural sealant",
             "nasal packing", "debris clearance"),
    prompt_names=("no surgical step", "nasal corridor creation", "anterior sphenoidotomy", "septum displacement",
                  "sphenoid sinus clearance", "sellotomy", "durotomy", "tumour excision", "haemostasis",
                  "synthetic graft placement", "fat graft placement", "gasket seal construct", "dural sealant",
                  "nasal packing", "debris clearance"),
    templates=_ENDO, n_images=120_024,
    source="PitVis 2023 challenge (endoscopic pituitary surgery videos), step labels",
    notes="The 14 surgical steps follow the challenge's step map; the 15th class, the frames outside any "
          "step (labelled -1 / 'operation not started' in the challenge files), is mgcl's reading of "
          "'15 steps' - UNCERTAIN.",
)


# ---- orders --------------------------------------------------------------------------------

def alphabetical(datasets) -> tuple[DatasetDef, ...]:
    """Case-insensitive alphabetical order of dataset names."""
    return tuple(sorted(datasets, key=lambda d: d.name.casefold()))


def seeded_permutation(datasets, seed: int, salt: str) -> tuple[DatasetDef, ...]:
    """A permutation that depends only on ``seed``, ``salt`` and the names (not on
    any RNG implementation): sort by sha256 of ``f"{salt}/{seed}/{name}"``."""
    return tuple(sorted(datasets, key=lambda d: hashlib.sha256(f"{salt}/{seed}/{d.name}".encode()).hexdigest()))


HMT_DATASETS = (RANZCR, CHEXCHONET, PD, BREAKHIS, CHAOYANG, NUCLS, EYEPACS, AIROGS, FARFUM_ROP)
MEDX_DATASETS = (AOD, BMC, ISIC2024, NCT_CRC, NIH_CXR, PITVIS)

MEDX_ORDER2_SEED = 0
MEDX_ORDER2_SALT = "mgcl/medxtreme"
# The result of seeded_permutation(MEDX_DATASETS, 0, "mgcl/medxtreme"), recorded so a change is caught.
MEDX_ORDER2_NAMES = ("BMC", "NCT-CRC-HE-100K", "PITVIS", "AOD", "ISIC2024", "NIH ChestX-ray")

HMT_ORDER1 = BenchmarkDef(
    name="hmt-order1", title="HieraMedTransfer, Order I", datasets=HMT_DATASETS,
    order="SPEC order: x-ray, then pathology, then fundus", aliases=("hmt-1", "hmt-i", "hieramedtransfer-i"),
)
HMT_ORDER2 = BenchmarkDef(
    name="hmt-order2", title="HieraMedTransfer, Order II", datasets=alphabetical(HMT_DATASETS),
    order="alphabetical", aliases=("hmt-2", "hmt-ii", "hieramedtransfer-ii"),
)
MEDX_ORDER1 = BenchmarkDef(
    name="medxtreme-order1", title="MedXtreme, Order I", datasets=alphabetical(MEDX_DATASETS),
    order="alphabetical", aliases=("medx-1", "medx-i", "medxtreme-i"),
)
MEDX_ORDER2 = BenchmarkDef(
    name="medxtreme-order2", title="MedXtreme, Order II",
    datasets=tuple(next(d for d in MEDX_DATASETS if d.name == n) for n in MEDX_ORDER2_NAMES),
    order=f"seeded permutation: sha256 sort, seed {MEDX_ORDER2_SEED}, salt {MEDX_ORDER2_SALT!r}",
    seed=MEDX_ORDER2_SEED, aliases=("medx-2", "medx-ii", "medxtreme-ii"),
)

# ---- mgtil-synth: the SYNTHETIC benchmark (generated by mgcl.mgtil.synth) ---------------------

SYNTH_NOTICE = "SYNTHETIC data generated by mgcl.mgtil.synth: procedural images, not medical images"


@dataclass(frozen=True)
class SynthTask:
    """One mgtil-synth task: each class is a finding the generator draws (its key in
    ``mgcl.mgtil.synth.DOMAINS``); ``style`` is the task's acquisition shift."""

    name: str
    domain: str
    site: str
    classes: tuple[tuple[str, str], ...]    # (class name used in prompts, finding key)
    templates: tuple[str, ...]
    style: dict = field(default_factory=dict, compare=False)


SYNTH_TASKS = (
    SynthTask("synth-chest-findings", "x-ray", "chest",
              (("no finding", "normal"), ("pulmonary nodule", "nodule"), ("consolidation", "consolidation"),
               ("pleural effusion", "effusion"), ("pneumothorax", "pneumothorax")),
              ("a chest x-ray showing {}.", "a chest radiograph with {}.",
               "a frontal chest radiograph demonstrating {}."),
              {"blur": 0.6, "noise": 0.02}),
    SynthTask("synth-chest-devices", "x-ray", "chest (tubes and lines)",
              (("no support device", "normal"), ("endotracheal tube in normal position", "ett_normal"),
               ("endotracheal tube in abnormal position", "ett_low"), ("nasogastric tube", "ngt")),
              ("a chest x-ray with {}.", "a portable chest radiograph showing {}.",
               "a chest x-ray of an ICU patient with {}."),
              {"gain": 0.88, "noise": 0.015}),
    SynthTask("synth-colon-histology", "histopathology", "colon",
              (("normal colonic mucosa", "normal_mucosa"), ("colorectal adenoma", "adenoma"),
               ("colorectal adenocarcinoma", "adenocarcinoma"), ("cancer-associated stroma", "stroma")),
              ("a histopathology image of {}.", "an H&E stained section of {}.", "a photomicrograph showing {}."),
              {"tint": (0.95, 1.0, 1.05)}),
    SynthTask("synth-breast-histology", "histopathology", "breast",
              (("fibroadenoma", "fibroadenoma"), ("ductal carcinoma in situ", "dcis"),
               ("invasive ductal carcinoma", "idc")),
              ("a histopathology image of {}.", "an H&E stained breast section showing {}.",
               "a photomicrograph of {}."),
              {"tint": (1.04, 0.97, 0.96), "blur": 0.5}),
    SynthTask("synth-dr-grading", "fundus", "retina",
              (("no diabetic retinopathy", "no_dr"), ("mild diabetic retinopathy", "mild_npdr"),
               ("moderate diabetic retinopathy", "moderate_npdr"), ("proliferative diabetic retinopathy", "pdr")),
              ("a fundus photograph of {}.", "a retinal image showing {}.", "a color fundus photo with {}."),
              {"gain": 0.9, "noise": 0.015}),
    SynthTask("synth-glaucoma", "fundus", "optic disc",
              (("healthy optic disc", "healthy_disc"), ("glaucoma suspect", "glaucoma_suspect"),
               ("glaucomatous optic neuropathy", "glaucoma")),
              ("a fundus photograph of {}.", "a retinal image of the optic disc showing {}.",
               "a color fundus photo with {}."),
              {"blur": 0.5}),
)

# images per class (train, test) and corpus size
SYNTH_SIZES = {False: {"train": 64, "test": 32, "corpus": 20_480, "shard": 4096},
               True: {"train": 32, "test": 16, "corpus": 4_096, "shard": 1024}}


def _synth_benchmark(quick: bool) -> BenchmarkDef:
    """The mgtil-synth task sequence (``-quick``: fewer images), as a BenchmarkDef
    so the loaders and ``mgcl mgtil check`` read it like the real benchmarks."""
    sz = SYNTH_SIZES[quick]
    datasets = tuple(
        DatasetDef(name=t.name, domain=t.domain, site=t.site, classes=tuple(c for c, _ in t.classes),
                   prompt_names=tuple(c for c, _ in t.classes), templates=t.templates,
                   n_images=(sz["train"] + sz["test"]) * len(t.classes), n_train=sz["train"] * len(t.classes),
                   n_test=sz["test"] * len(t.classes), source=SYNTH_NOTICE, synthetic=True,
                   notes=f"{sz['train']} train / {sz['test']} test images per class (mgcl's choice)")
        for t in SYNTH_TASKS)
    return BenchmarkDef(name="mgtil-synth-quick" if quick else "mgtil-synth",
                        title="mgtil-synth, SYNTHETIC benchmark" + (" (quick)" if quick else ""),
                        datasets=datasets, order="domain by domain (x-ray, histopathology, fundus), like HMT Order I",
                        synthetic=True)


MGTIL_SYNTH = _synth_benchmark(False)
MGTIL_SYNTH_QUICK = _synth_benchmark(True)


BENCHMARKS = {b.name: b for b in (HMT_ORDER1, HMT_ORDER2, MEDX_ORDER1, MEDX_ORDER2, MGTIL_SYNTH, MGTIL_SYNTH_QUICK)}


def benchmark_names() -> list[str]:
    return list(BENCHMARKS)


def _canonical(name: str) -> str:
    """A benchmark name with spelling differences removed: case, punctuation, the
    long names, the word "order" and Roman numerals all fold ("HieraMedTransfer
    Order II", "hmt_order2" and "HMT-II" all give "hmt2"); a bare "hmt" or
    "medxtreme" means Order I, the order SPEC.md lists first."""
    key = re.sub(r"[^0-9a-z]+", "", name.casefold())
    key = key.replace("hieramedtransfer", "hmt").replace("medxtreme", "medx").replace("order", "")
    key = re.sub(r"^(hmt|medx)(ii|i)?$", lambda m: m.group(1) + ("2" if m.group(2) == "ii" else "1"), key)
    return key


def get_benchmark(name: str) -> BenchmarkDef:
    """A benchmark by name or alias, spelt loosely (``_canonical``)."""
    key = name.strip().lower()
    for b in BENCHMARKS.values():
        if key == b.name or key in b.aliases or _canonical(key) == _canonical(b.name):
            return b
    raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(benchmark_names())}")


def all_real_datasets() -> tuple[DatasetDef, ...]:
    """The 15 real datasets, HMT then MedXtreme (each once)."""
    return HMT_DATASETS + MEDX_DATASETS
