"""``mgcl run CONFIG.yaml [--resume]``: one continual-learning run from a config
file: a benchmark (the four MGTIL sequences or mgtil-synth) x a model adapter
(tinyclip / open_clip incl. biomedclip / hf) x a strategy with its options.

The config (YAML, UTF-8; every key is checked before anything is loaded,
unknown keys are errors)::

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
    train:                           # mgcl.cl.TrainConfig (defaults: SPEC.md's protocol)
      iters_per_task: 1000
      batch_size: 64
      lr: 1.0e-5
      checkpoint_every: null         # N: a mid-task checkpoint every N steps (--resume continues there)
      loggers: [csv]                 # csv | tensorboard | wandb (mgcl.cl.logging)
      ...

``validate`` checks every key and value and builds the strategy, once, without
touching the disk; ``check_paths`` (``mgcl run --check``, and ``run``) checks
every path the config names. Every problem is a ``ConfigError`` naming the
key or the file.

Outputs under ``output_dir``: results.json (``mgcl.mgtil.report`` format, one
method), results.csv / results.md, curves.png, curves_by_task.png,
heatmaps.png, config.yaml (the checked config) and ``runs/<strategy>/`` (the
trainer's files: its own results.json, train_log.jsonl, checkpoint/). With
``--resume`` the trainer continues after its last finished task.

**Several processes**: under ``torchrun`` (``WORLD_SIZE`` > 1 in the
environment) ``run`` joins the process group (gloo on the CPU, NCCL on
GPUs, each rank on ``cuda:LOCAL_RANK``), opens the Siphon on rank 0 only
(retrieval there, the reference sets broadcast) and hands the trainer the
group (``mgcl.cl.ContinualTrainer``'s module doc: each rank trains on its
share of ``train.batch_size``, PRIMED's reference batch gathered); only rank 0
writes the output files::

    torchrun --standalone --nproc_per_node 4 -m mgcl run CONFIG.yaml
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import os
from dataclasses import dataclass
from typing import Optional

from .._io import atomic_write_bytes
from ..cl.config import ConfigError, TrainConfig, check_keys, output_dir_problem
from . import report

ADAPTERS = ("tinyclip", "open_clip", "hf")
VLM_CHOICES = ("model", "none")
# Strategy options that the retrieval section fills in (objects, not config values).
RETRIEVAL_OPTIONS = ("siphon", "bank", "siphon_options")
SECTIONS = {
    "model": {"adapter": None, "name": None, "checkpoint": None, "tokenizer": None},
    "strategy": {"name": None, "options": {}},
    "retrieval": {"bank": None, "pool": None, "pool_per_domain": None, "embedder": None, "vlm": "model",
                  "siphon": {}},
}
TOP = {"benchmark": None, "data_root": None, "tasks": None, "output_dir": None, "device": "cpu", "threads": None,
       "train": None, **{k: None for k in SECTIONS}}
PATHS = ((None, "data_root"), (None, "output_dir"), ("model", "checkpoint"), ("model", "tokenizer"),
         ("retrieval", "bank"), ("retrieval", "pool"))


@dataclass
class RunConfig:
    """A checked config: ``data`` (every default filled in; written as config.yaml),
    ``train`` (its TrainConfig) and ``strategy``, built once from ``strategy.name``
    and ``options``. A RunConfig runs once: ``run`` hands the strategy its Siphon
    and trains it."""

    data: dict
    train: TrainConfig
    strategy: object
    ran: bool = False


# ---- validation ------------------------------------------------------------------------------

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
    check_keys(name, raw, SECTIONS[name])
    return {**copy.deepcopy(SECTIONS[name]), **raw}


def _check_strategy(s: dict):
    """The strategy, built from its name and options (its constructor checks the values)."""
    import difflib  # noqa: PLC0415

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
    check_keys(f"strategy.options ({name})", opts, params or ["(none)"])
    try:
        strategy = S.create(name, **opts)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"strategy.options ({name}): {exc}") from None
    s["options"] = opts
    return strategy


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
    check_keys("retrieval.siphon", sip, [p for p, v in sig.items() if v.kind == inspect.Parameter.KEYWORD_ONLY
                                         and p != "vlm"])
    for k in ("a", "b", "c", "k_v"):
        if k in sip:
            _int(f"retrieval.siphon.{k}", sip[k], 1)
    for k in ("n_general", "seed"):
        if k in sip:
            _int(f"retrieval.siphon.{k}", sip[k], 0)
    r["siphon"] = sip
    if strategy.needs_reference_set and r["bank"] is None:
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


def validate(raw, where: str = "config") -> RunConfig:
    """The checked config (ConfigError on any problem). Nothing is loaded and no
    path has to exist (``check_paths`` checks them)."""
    from .benchmarks import get_benchmark  # noqa: PLC0415

    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    check_keys(where, raw, TOP)
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
    datasets = bench.datasets
    if cfg["tasks"] is not None:
        names = [d.name for d in bench.datasets]
        if not isinstance(cfg["tasks"], list) or not cfg["tasks"]:
            raise ConfigError(f"tasks: expected a non-empty list of task names from {names}")
        check_keys("tasks", cfg["tasks"], names)
        if len(set(cfg["tasks"])) != len(cfg["tasks"]):
            raise ConfigError("tasks: a task is listed twice")
        datasets = [d for d in bench.datasets if d.name in cfg["tasks"]]
    dev = _str("device", cfg["device"])
    if not (dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"device: expected cpu, cuda or cuda:N, got {dev!r}")
    _int("threads", cfg["threads"], 1, optional=True)
    for name in SECTIONS:
        cfg[name] = _section(cfg, name)
    _check_model(cfg["model"])
    train = TrainConfig.from_dict(cfg["train"])
    train.check_fits(largest_train_set=max(d.n_train or d.n_images for d in datasets))
    cfg["train"] = train.to_dict()
    strategy = _check_strategy(cfg["strategy"])
    _check_retrieval(cfg["retrieval"], strategy)
    for sec, key in PATHS:                              # "~/..." and "$MGCL_CACHE/..." work in every path
        d = cfg if sec is None else cfg[sec]
        if d[key] is not None:
            d[key] = expand_path(d[key])
    return RunConfig(cfg, train, strategy)


def expand_path(p: str) -> str:
    """A config path with ``~`` and environment variables expanded; ``$MGCL_CACHE``
    (or ``${MGCL_CACHE}``) is mgcl's cache even when the variable is unset
    (``mgcl._env.cache_dir``: else ``$XDG_CACHE_HOME/mgcl``, else ``~/.cache/mgcl``)."""
    from .. import _env  # noqa: PLC0415

    for var in ("${MGCL_CACHE}", "$MGCL_CACHE"):
        if p == var or p.startswith(var + "/"):
            p = str(_env.cache_dir()) + p[len(var):]
    return os.path.expanduser(os.path.expandvars(p))


def load_config(path: str) -> RunConfig:
    """Read (UTF-8) and validate a YAML (or JSON) config file, or a shipped config by name."""
    import yaml  # noqa: PLC0415

    from . import configs  # noqa: PLC0415

    path = configs.resolve(path)
    try:
        with open(path, "rb") as fh:
            text = fh.read().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file, nor a shipped config "
                          f"({', '.join(configs.shipped()) or 'none found'})") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    return validate(raw, os.path.basename(path))


def check_paths(cfg: dict) -> None:
    """Every path the config names: the data root, the model checkpoint and
    tokenizer, the bank and the pool must exist as what they are; the output
    directory must be a directory or creatable. One ConfigError lists them all."""
    problems = []

    def want(key: str, p: Optional[str], kind: str) -> None:
        if p is None:
            return
        if not os.path.exists(p):
            problems.append(f"{key}: {p} does not exist")
        elif kind == "dir" and not os.path.isdir(p):
            problems.append(f"{key}: {p} is not a directory")
        elif kind == "file" and not os.path.isfile(p):
            problems.append(f"{key}: {p} is not a file")

    m, r = cfg["model"], cfg["retrieval"]
    want("data_root", cfg["data_root"], "dir")
    want("model.checkpoint", m["checkpoint"], "any" if m["adapter"] == "open_clip" else "dir")
    want("model.tokenizer", m["tokenizer"], "dir")
    want("retrieval.bank", r["bank"], "dir")
    if r["bank"] is not None and os.path.isdir(r["bank"]) and not os.path.isfile(os.path.join(r["bank"],
                                                                                               "manifest.json")):
        problems.append(f"retrieval.bank: {r['bank']} holds no manifest.json (not a finished mgcl bank)")
    want("retrieval.pool", r["pool"], "file")
    bad_out = output_dir_problem(cfg["output_dir"])
    if bad_out:
        problems.append(f"output_dir: {bad_out}")
    if problems:
        raise ConfigError("; ".join(problems))


# ---- loading ---------------------------------------------------------------------------------

def load_model(m: dict, device: str = "cpu"):
    """The model of a config's ``model`` section (on ``device``); ConfigError when it cannot be read."""
    import pickle  # noqa: PLC0415

    from safetensors import SafetensorError  # noqa: PLC0415

    from ..models import HFCLIP, OpenCLIP, TinyCLIP, load  # noqa: PLC0415

    a, name, ckpt, tok = m["adapter"], m["name"], m["checkpoint"], m["tokenizer"]
    if ckpt is not None and not os.path.exists(ckpt):
        raise ConfigError(f"model.checkpoint: {ckpt} does not exist")
    try:
        if a == "tinyclip":
            return TinyCLIP.load(ckpt, map_location=device)
        if a == "open_clip":
            if ckpt is None:
                return OpenCLIP.from_hub(name, device=device)
            return load(ckpt, arch=name, tokenizer=tok, device=device)    # a file of config `name`, or a model dir
        return HFCLIP.from_pretrained(ckpt or name, device=device)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError,
            SafetensorError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"model.checkpoint: cannot load {ckpt or name!r} as a {a} model: {first}") from None


def load_tasks(cfg: dict) -> list:
    """The config's task sequence. The data root is checked against the benchmark
    first (only the datasets of ``tasks`` when the config names a subset)."""
    from . import synth  # noqa: PLC0415
    from .benchmarks import get_benchmark  # noqa: PLC0415
    from .data import load_benchmark  # noqa: PLC0415

    bench = get_benchmark(cfg["benchmark"])
    if cfg["tasks"]:
        want = set(cfg["tasks"])
        bench = dataclasses.replace(bench, datasets=tuple(d for d in bench.datasets if d.name in want))
    root = cfg["data_root"]
    if root is None:                                   # mgtil-synth: build or reuse the cached copy
        try:
            root = str(synth.build(quick=bench.name.endswith("-quick")).tasks_root)
        except ValueError as exc:
            raise ConfigError(f"data_root (null: the mgtil-synth cache): {exc}") from None
    if not os.path.isdir(root):
        raise ConfigError(f"data_root: {root} is not a directory")
    try:
        return load_benchmark(bench, root)
    except ValueError as exc:
        raise ConfigError(f"data_root: {exc}") from None


def run_dir(cfg: dict) -> str:
    return os.path.join(cfg["output_dir"], "runs", cfg["strategy"]["name"])


def run(cfg: RunConfig, *, resume: bool = False, progress: bool = True, plot_format: str = "png",
        dpi: int = report.DPI) -> dict:
    """Run a checked config (``validate`` / ``load_config``); returns the results dict.
    The plots are written as ``plot_format`` (png | pdf | svg) at ``dpi``."""
    import torch  # noqa: PLC0415

    if cfg.ran:
        raise ConfigError("this RunConfig has run already (its strategy holds that run's state); validate the "
                          "config again")
    cfg.ran = True
    d = cfg.data
    check_paths(d)
    out, rdir = d["output_dir"], run_dir(d)
    if not resume and os.path.exists(os.path.join(rdir, "checkpoint")):
        raise ConfigError(f"output_dir: {out} already holds a {d['strategy']['name']} run; pass --resume to "
                          "continue it, or choose another output_dir")
    if d["device"].startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {d['device']} but no GPU is visible")
    device, rank, world, joined = _join_processes(d["device"])
    try:
        return _run(cfg, d, out, rdir, device, rank, world, resume=resume, progress=progress,
                    plot_format=plot_format, dpi=dpi)
    finally:
        if joined:
            import torch.distributed as dist  # noqa: PLC0415

            dist.destroy_process_group()


def _join_processes(device: str) -> tuple[str, int, int, bool]:
    """Under torchrun (``WORLD_SIZE`` > 1): join the process group (unless the
    caller did) and pick this rank's device. Returns (device, rank, world size,
    joined here)."""
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device, 0, 1, False
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.barrier()          # every rank has checked the output directory before rank 0 writes to it
    return device, dist.get_rank(), world, joined


def _run(cfg: RunConfig, d: dict, out: str, rdir: str, device: str, rank: int, world: int, *, resume: bool,
         progress: bool, plot_format: str = "png", dpi: int = report.DPI) -> dict:
    import torch  # noqa: PLC0415
    import yaml  # noqa: PLC0415

    from ..cl import ContinualTrainer  # noqa: PLC0415
    from ..cl.strategies.base import frozen_copy  # noqa: PLC0415
    from ..cl.trainer import RankZeroSiphon  # noqa: PLC0415
    from ..retrieval import BankError, Siphon  # noqa: PLC0415

    threads = torch.get_num_threads()
    if d["threads"]:
        torch.set_num_threads(d["threads"])
    try:
        tasks = load_tasks(d)
        model = load_model(d["model"], device)
        strategy = cfg.strategy
        if strategy.needs_reference_set:
            r = d["retrieval"]
            siphon = None
            if rank == 0:
                vlm = frozen_copy(model) if r["vlm"] == "model" else None
                try:
                    siphon = Siphon.from_bank(r["bank"], pool=r["pool"], pool_per_domain=r["pool_per_domain"],
                                              embedder=r["embedder"], vlm=vlm, **r["siphon"])
                except (BankError, ValueError, OSError, ImportError) as exc:
                    raise ConfigError(f"retrieval: {exc}") from None
            strategy.reference.siphon = RankZeroSiphon(siphon, rank) if world > 1 else siphon
        if rank == 0:
            atomic_write_bytes(os.path.join(out, "config.yaml"), yaml.safe_dump(d, sort_keys=False).encode())
        trainer = ContinualTrainer(model, strategy, tasks, device=device, out_dir=rdir, resume=resume,
                                   progress=progress and rank == 0, train_config=cfg.train)
        res = trainer.run()
    finally:
        torch.set_num_threads(threads)
    res.update(kind="run", config={"run": d, **res["config"]})
    if rank == 0:
        report.write_json(os.path.join(out, "results.json"), res)
        report.render(res, out, fmt=plot_format, dpi=dpi)
    return res


__all__ = ["ConfigError", "RunConfig", "validate", "expand_path", "load_config", "check_paths", "run", "load_model",
           "load_tasks"]
