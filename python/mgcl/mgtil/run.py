"""``mgcl run CONFIG.yaml [--resume]``: one continual-learning run from a config
file: a benchmark (the four MGTIL sequences or mgtil-synth) x a model adapter
(tinyclip / open_clip incl. biomedclip / hf) x a strategy with its options.

The config (YAML; every key is checked before anything is loaded, unknown keys
are errors)::

    benchmark: hmt-order1            # mgcl mgtil list
    data_root: /data/mgtil           # ROOT/<dataset>/{train,test}/<class>/* or {train,test}.csv;
                                     #   mgtil-synth: optional (built or reused from ~/.cache/mgcl)
    tasks: null                      # optional: a subset of the task names, run in benchmark order
    output_dir: runs/hmt1-primed
    device: cuda                     # cpu | cuda | cuda:N
    threads: null                    # torch intra-op threads (null: torch's default)
    model:
      adapter: open_clip             # tinyclip | open_clip | hf
      name: biomedclip               # open_clip config name (or hf-hub:org/name); hf: hub name
      checkpoint: /models/BiomedCLIP # tinyclip: a saved TinyCLIP dir; open_clip: a file (of config
                                     #   `name`) or an open_clip model dir; hf: a CLIPModel dir
      tokenizer: null                # open_clip with a checkpoint FILE: the tokenizer dir (vocab.txt)
    strategy:
      name: primed                   # mgcl.cl.strategies.available()
      options: {alpha: 1.0, beta: 0.25}
    retrieval:                       # zscl and primed: where reference pairs come from
      bank: /banks/pubmed            # mgcl db build output
      pool: null                     # question pool file (null: the built-in taxonomy pool)
      pool_per_domain: null          # keep a seeded sample of N questions per domain
      embedder: null                 # query embedder (null: the one the bank was built with)
      vlm: model                     # visual rerank with a frozen copy of the initial model | none
      siphon: {a: 30, b: 30, c: 80, n_general: 100, k_v: 1, seed: 0}
    train:                           # ContinualTrainer settings (defaults: SPEC.md's protocol)
      iters_per_task: 1000
      batch_size: 64
      lr: 1.0e-5
      ...

Outputs under ``output_dir``: results.json (``mgcl.mgtil.report`` format, one
method), results.csv / results.md, curves.png, curves_by_task.png,
heatmaps.png, config.yaml (the checked config) and ``runs/<strategy>/`` (the
trainer's files: its own results.json, train_log.jsonl, checkpoint/). With
``--resume`` the trainer continues after its last finished task.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import os
import random
from typing import Optional

import numpy as np

from .._io import atomic_write_bytes
from . import report

ADAPTERS = ("tinyclip", "open_clip", "hf")
VLM_CHOICES = ("model", "none")
# Strategy options that the retrieval section fills in (objects, not config values).
RETRIEVAL_OPTIONS = ("siphon", "bank", "siphon_options")
TRAIN_DEFAULTS = {
    "iters_per_task": 1000, "batch_size": 64, "lr": 1e-5, "weight_decay": 0.0, "warmup": 100,
    "schedule": "cosine", "label_smoothing": 0.2, "amp": None, "seed": 42, "reset_optimizer": True,
    "log_every": 50, "eval_batch_size": 256, "num_workers": None,
}
SECTIONS = {
    "model": {"adapter": None, "name": None, "checkpoint": None, "tokenizer": None},
    "strategy": {"name": None, "options": {}},
    "retrieval": {"bank": None, "pool": None, "pool_per_domain": None, "embedder": None, "vlm": "model",
                  "siphon": {}},
    "train": TRAIN_DEFAULTS,
}
TOP = {"benchmark": None, "data_root": None, "tasks": None, "output_dir": None, "device": "cpu", "threads": None,
       **{k: None for k in SECTIONS}}


PATHS = ((None, "data_root"), (None, "output_dir"), ("model", "checkpoint"), ("model", "tokenizer"),
         ("retrieval", "bank"), ("retrieval", "pool"))


class ConfigError(ValueError):
    """A config that cannot run; the message names the key."""


# ---- validation ------------------------------------------------------------------------------

def _unknown(where: str, given, allowed) -> None:
    bad = [k for k in given if k not in allowed]
    if bad:
        hints = []
        for k in bad:
            close = difflib.get_close_matches(str(k), list(allowed), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{where}: unknown key(s) {', '.join(hints)}; allowed: {', '.join(allowed)}")


def _need(where: str, v, types, what: str, *, optional: bool = False):
    if v is None and optional:
        return v
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ConfigError(f"{where}: expected {what}, got {v!r}")
    if not isinstance(v, types):
        raise ConfigError(f"{where}: expected {what}, got {v!r}")
    return v


def _int(where, v, lo, optional=False):
    _need(where, v, int, f"an integer >= {lo}", optional=optional)
    if v is not None and v < lo:
        raise ConfigError(f"{where}: expected an integer >= {lo}, got {v!r}")
    return v


def _num(where, v, lo=None, hi=None, *, lo_open=False, hi_open=False):
    _need(where, v, (int, float), "a number")
    v = float(v)
    if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and (v >= hi if hi_open else v > hi):
        lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
        raise ConfigError(f"{where}: expected a number {' and '.join(s for s in (lo_s, hi_s) if s)}, got {v!r}")
    return v


def _str(where, v, optional=False):
    _need(where, v, str, "a string", optional=optional)
    if v is not None and not v.strip():
        raise ConfigError(f"{where}: empty string")
    return v


def _section(cfg: dict, name: str) -> dict:
    raw = cfg.get(name)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping, got {raw!r}")
    _unknown(name, raw, SECTIONS[name])
    return {**copy.deepcopy(SECTIONS[name]), **raw}


def _check_train(t: dict) -> dict:
    w = "train"
    for k in ("iters_per_task", "batch_size", "log_every", "eval_batch_size"):
        _int(f"{w}.{k}", t[k], 1)
    _int(f"{w}.warmup", t["warmup"], 0)
    _int(f"{w}.seed", t["seed"], 0)
    _int(f"{w}.num_workers", t["num_workers"], 0, optional=True)
    t["lr"] = _num(f"{w}.lr", t["lr"], 0, lo_open=True)
    t["weight_decay"] = _num(f"{w}.weight_decay", t["weight_decay"], 0)
    t["label_smoothing"] = _num(f"{w}.label_smoothing", t["label_smoothing"], 0, 1, hi_open=True)
    if t["schedule"] not in ("cosine", "constant"):
        raise ConfigError(f"{w}.schedule: expected 'cosine' or 'constant', got {t['schedule']!r}")
    if t["amp"] not in (None, False, "off", "bf16"):
        raise ConfigError(f"{w}.amp: expected null, 'off' or 'bf16', got {t['amp']!r} (fp16 loss scaling would "
                          "distort the Fisher guard's squared gradients)")
    _need(f"{w}.reset_optimizer", t["reset_optimizer"], bool, "true or false")
    return t


def _check_strategy(s: dict):
    from ..cl import strategies as S  # noqa: PLC0415

    name = _str("strategy.name", s["name"])
    if name not in S.available():
        close = difflib.get_close_matches(name, S.available(), n=1)
        raise ConfigError(f"strategy.name: unknown strategy {name!r}" + (f" (did you mean {close[0]!r}?)" if close
                          else "") + f"; available: {', '.join(S.available())}")
    opts = s["options"] if s["options"] is not None else {}
    if not isinstance(opts, dict):
        raise ConfigError(f"strategy.options: expected a mapping, got {opts!r}")
    fixed = [k for k in opts if k in RETRIEVAL_OPTIONS]
    if fixed:
        raise ConfigError(f"strategy.options: {fixed} come from the retrieval section (retrieval.bank, "
                          "retrieval.siphon), not from strategy options")
    params = [p for p in inspect.signature(S.get(name).__init__).parameters
              if p != "self" and p not in RETRIEVAL_OPTIONS]
    _unknown(f"strategy.options ({name})", opts, params or ["(none)"])
    try:
        strategy = S.create(name, **opts)          # the constructor checks the values
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"strategy.options ({name}): {exc}") from None
    s["options"] = opts
    return strategy


def needs_retrieval(strategy) -> bool:
    """ZSCL always distils on reference pairs; PRIMED unless both its losses are off."""
    if strategy.name == "zscl":
        return True
    return strategy.name == "primed" and bool(getattr(strategy, "distills", True))


def _check_retrieval(r: dict, strategy) -> dict:
    from ..retrieval import Siphon  # noqa: PLC0415

    _str("retrieval.bank", r["bank"], optional=True)
    _str("retrieval.pool", r["pool"], optional=True)
    _str("retrieval.embedder", r["embedder"], optional=True)
    _int("retrieval.pool_per_domain", r["pool_per_domain"], 1, optional=True)
    if r["vlm"] not in VLM_CHOICES:
        raise ConfigError(f"retrieval.vlm: expected one of {list(VLM_CHOICES)}, got {r['vlm']!r}")
    sip = r["siphon"] if r["siphon"] is not None else {}
    if not isinstance(sip, dict):
        raise ConfigError(f"retrieval.siphon: expected a mapping, got {sip!r}")
    sig = inspect.signature(Siphon.__init__).parameters
    allowed = [p for p, v in sig.items() if v.kind == inspect.Parameter.KEYWORD_ONLY and p != "vlm"]
    _unknown("retrieval.siphon", sip, allowed)
    for k in ("a", "b", "c", "k_v"):
        if k in sip:
            _int(f"retrieval.siphon.{k}", sip[k], 1)
    for k in ("n_general", "seed"):
        if k in sip:
            _int(f"retrieval.siphon.{k}", sip[k], 0)
    r["siphon"] = sip
    if needs_retrieval(strategy) and r["bank"] is None:
        raise ConfigError(f"retrieval.bank: strategy {strategy.name!r} distils on retrieved reference pairs; "
                          "give the bank directory (mgcl db build --out DIR)")
    return r


def _check_model(m: dict) -> dict:
    a = m["adapter"]
    if a not in ADAPTERS:
        raise ConfigError(f"model.adapter: expected one of {list(ADAPTERS)}, got {a!r}")
    for k in ("name", "checkpoint", "tokenizer"):
        _str(f"model.{k}", m[k], optional=True)
    if a == "tinyclip" and m["checkpoint"] is None:
        raise ConfigError("model.checkpoint: a tinyclip model needs its saved directory (tinyclip.json + weights)")
    if a == "open_clip":
        if m["name"] is None and m["checkpoint"] is None:
            raise ConfigError("model: an open_clip model needs a name (e.g. biomedclip) and/or a checkpoint")
        if m["checkpoint"] is None and not str(m["name"]).startswith("hf-hub:"):
            raise ConfigError(f"model.checkpoint: open_clip {m['name']!r} without a checkpoint would be randomly "
                              "initialised; give the checkpoint file or model directory (or an hf-hub: name)")
    if a == "hf" and m["checkpoint"] is None and m["name"] is None:
        raise ConfigError("model: an hf model needs a checkpoint directory or a hub name")
    if m["tokenizer"] is not None and a != "open_clip":
        raise ConfigError("model.tokenizer: only for the open_clip adapter")
    return m


def validate(raw, where: str = "config") -> dict:
    """The checked config with every default filled in (ConfigError on any problem).
    Nothing is loaded and no path has to exist: ``run`` checks the data."""
    from .benchmarks import get_benchmark  # noqa: PLC0415

    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    _unknown(where, raw, TOP)
    cfg = {**copy.deepcopy(TOP), **copy.deepcopy(raw)}
    for k in ("benchmark", "output_dir"):
        if cfg[k] is None:
            raise ConfigError(f"{where}: {k!r} is required")
    try:
        bench = get_benchmark(_str("benchmark", cfg["benchmark"]))
    except ValueError as exc:
        raise ConfigError(f"benchmark: {exc}") from None
    cfg["benchmark"] = bench.name
    _str("data_root", cfg["data_root"], optional=True)
    if cfg["data_root"] is None and not bench.synthetic:
        raise ConfigError(f"data_root: benchmark {bench.name!r} needs the data root "
                          "(check it first with `mgcl mgtil check --root ROOT --benchmark NAME`)")
    _str("output_dir", cfg["output_dir"])
    if cfg["tasks"] is not None:
        names = [d.name for d in bench.datasets]
        if not isinstance(cfg["tasks"], list) or not cfg["tasks"]:
            raise ConfigError(f"tasks: expected a non-empty list of task names from {names}")
        _unknown("tasks", cfg["tasks"], names)
        if len(set(cfg["tasks"])) != len(cfg["tasks"]):
            raise ConfigError("tasks: a task is listed twice")
    dev = _str("device", cfg["device"])
    if not (dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"device: expected cpu, cuda or cuda:N, got {dev!r}")
    _int("threads", cfg["threads"], 1, optional=True)
    for name in SECTIONS:
        cfg[name] = _section(cfg, name)
    _check_model(cfg["model"])
    _check_train(cfg["train"])
    strategy = _check_strategy(cfg["strategy"])
    _check_retrieval(cfg["retrieval"], strategy)
    for sec, key in PATHS:                              # "~/..." works in every path
        d = cfg if sec is None else cfg[sec]
        if d[key] is not None:
            d[key] = os.path.expanduser(d[key])
    return cfg


def load_config(path: str) -> dict:
    """Read and validate a YAML (or JSON) config file, or a shipped config by name."""
    import yaml  # noqa: PLC0415

    from . import configs  # noqa: PLC0415

    path = configs.resolve(path)
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file, nor a shipped config "
                          f"({', '.join(configs.shipped()) or 'none found'})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    return validate(raw, os.path.basename(path))


# ---- pieces shared with the demo ----------------------------------------------------------------

class CachedEmbedder:
    """Wraps a text embedder: each distinct text is embedded once per process
    (the bank's duplicated captions; the Siphon's queries, asked again before
    every task). Same ``name`` and ``dim`` as the wrapped embedder.

    ``one_by_one=True`` embeds each new text on its own: a transformer's output
    for a text moves in the last bits with the batch it shares (padding, kernel
    shapes), so this makes a text's vector independent of which other texts
    were new in the same call; a resumed run then retrieves exactly what an
    uninterrupted one did (about 10 ms per text with MiniLM on a CPU core)."""

    def __init__(self, inner, one_by_one: bool = False):
        self.inner, self.name, self.dim, self.one_by_one = inner, inner.name, int(inner.dim), one_by_one
        self.cache: dict[str, np.ndarray] = {}

    def encode(self, texts, batch_size: int = 64) -> np.ndarray:
        texts = list(texts)
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            if self.one_by_one:
                vecs = [self.inner.encode([t], 1)[0] for t in new]
            else:
                vecs = self.inner.encode(new, batch_size)
            for t, v in zip(new, vecs):
                self.cache[t] = v
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self.cache[t] for t in texts]).astype(np.float32, copy=False)


def subsample_pool(pool: list, per_domain: Optional[int], seed: int = 0) -> list:
    """A seeded sample of at most ``per_domain`` questions of each domain (pool order kept)."""
    if per_domain is None:
        return list(pool)
    by: dict[str, list[int]] = {}
    for i, q in enumerate(pool):
        by.setdefault(q.domain, []).append(i)
    rng = random.Random(seed)
    keep = set()
    for dom in by:
        idx = by[dom]
        keep.update(idx if len(idx) <= per_domain else rng.sample(idx, per_domain))
    return [q for i, q in enumerate(pool) if i in keep]


def make_siphon(bank_dir: str, *, vlm=None, pool: Optional[str] = None, pool_per_domain: Optional[int] = None,
                embedder=None, siphon_options: Optional[dict] = None):
    """A Siphon over the bank at ``bank_dir``; queries go through a ``CachedEmbedder``
    (one text at a time) around ``embedder`` (an object, a name, or None: the bank's)."""
    from ..retrieval import MemoryBank, Siphon, get_embedder, load_pool  # noqa: PLC0415

    bank = MemoryBank.open(bank_dir)
    emb = embedder if embedder is not None and not isinstance(embedder, str) else \
        get_embedder(embedder or bank.embedder_name)
    if not (isinstance(emb, CachedEmbedder) and emb.one_by_one):
        emb = CachedEmbedder(emb, one_by_one=True)
    opts = dict(siphon_options or {})
    questions = subsample_pool(load_pool(pool), pool_per_domain, opts.get("seed", 0))
    return Siphon(bank, questions, emb, vlm=vlm, **opts)


def load_model(m: dict, device: str = "cpu"):
    """The model of a config's ``model`` section (on ``device``)."""
    from ..models import HFCLIP, OpenCLIP, TinyCLIP, load  # noqa: PLC0415

    a, name, ckpt, tok = m["adapter"], m["name"], m["checkpoint"], m["tokenizer"]
    if ckpt is not None and not os.path.exists(ckpt):
        raise ConfigError(f"model.checkpoint: {ckpt} does not exist")
    if a == "tinyclip":
        return TinyCLIP.load(ckpt, map_location=device)
    if a == "open_clip":
        if ckpt is None:
            return OpenCLIP.from_hub(name, device=device)
        return load(ckpt, arch=name, tokenizer=tok, device=device)    # a file of config `name`, or a model dir
    return HFCLIP.from_pretrained(ckpt or name, device=device)


def load_tasks(cfg: dict) -> list:
    """The config's task sequence. The data root is checked against the benchmark
    first (only the datasets of ``tasks`` when the config names a subset)."""
    import dataclasses  # noqa: PLC0415

    from . import synth  # noqa: PLC0415
    from .benchmarks import get_benchmark  # noqa: PLC0415
    from .data import load_benchmark  # noqa: PLC0415

    bench = get_benchmark(cfg["benchmark"])
    if cfg["tasks"]:
        want = set(cfg["tasks"])
        bench = dataclasses.replace(bench, datasets=tuple(d for d in bench.datasets if d.name in want))
    root = cfg["data_root"]
    if root is None:                                   # mgtil-synth: build or reuse the cached copy
        root = str(synth.build(quick=bench.name.endswith("-quick")).tasks_root)
    if not os.path.isdir(root):
        raise ConfigError(f"data_root: {root} is not a directory")
    try:
        return load_benchmark(bench, root)
    except ValueError as exc:
        raise ConfigError(f"data_root: {exc}") from None


def run_dir(cfg: dict) -> str:
    return os.path.join(cfg["output_dir"], "runs", cfg["strategy"]["name"])


def run(cfg: dict, *, resume: bool = False, progress: bool = True) -> dict:
    """Run a validated config (``validate`` / ``load_config``); returns the results dict."""
    import torch  # noqa: PLC0415
    import yaml  # noqa: PLC0415

    from ..cl import ContinualTrainer  # noqa: PLC0415
    from ..cl import strategies as S  # noqa: PLC0415
    from ..cl.strategies.base import frozen_copy  # noqa: PLC0415
    from ..cl.trainer import versions  # noqa: PLC0415

    out, rdir = cfg["output_dir"], run_dir(cfg)
    if not resume and os.path.exists(os.path.join(rdir, "checkpoint")):
        raise ConfigError(f"output_dir: {out} already holds a {cfg['strategy']['name']} run; pass --resume to "
                          "continue it, or choose another output_dir")
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {cfg['device']} but no GPU is visible")
    r = cfg["retrieval"]
    if r["bank"] is not None and not os.path.isdir(r["bank"]):
        raise ConfigError(f"retrieval.bank: {r['bank']} is not a directory")
    threads = torch.get_num_threads()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    try:
        tasks = load_tasks(cfg)
        model = load_model(cfg["model"], cfg["device"])
        options = dict(cfg["strategy"]["options"])
        probe = S.create(cfg["strategy"]["name"], **options)
        if needs_retrieval(probe):
            vlm = frozen_copy(model) if r["vlm"] == "model" else None
            options["siphon"] = make_siphon(r["bank"], vlm=vlm, pool=r["pool"], pool_per_domain=r["pool_per_domain"],
                                            embedder=r["embedder"], siphon_options=r["siphon"])
        strategy = S.create(cfg["strategy"]["name"], **options)
        atomic_write_bytes(os.path.join(out, "config.yaml"), yaml.safe_dump(cfg, sort_keys=False).encode())
        trainer = ContinualTrainer(model, strategy, tasks, device=cfg["device"], out_dir=rdir, resume=resume,
                                   progress=progress, **cfg["train"])
        res = trainer.run()
    finally:
        torch.set_num_threads(threads)
    bench = cfg["benchmark"]
    results = report.from_trainer(res, benchmark=bench, synthetic=bench.startswith("mgtil-synth"))
    results.update({"kind": "run", "config": {"run": cfg, "trainer": res["config"]}, "versions": versions(),
                    "domains": [t.domain for t in tasks]})
    report.write_json(os.path.join(out, "results.json"), results)
    report.render(results, out)
    return results


__all__ = ["ConfigError", "validate", "load_config", "run", "load_model", "load_tasks", "make_siphon",
           "subsample_pool", "CachedEmbedder", "needs_retrieval", "TRAIN_DEFAULTS"]
