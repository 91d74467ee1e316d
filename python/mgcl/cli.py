"""The ``mgcl`` command. Each subcommand is a small function below; heavy
imports happen inside them so ``mgcl --help`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import sys

from .bench import BENCHES  # a tuple of names: importing mgcl.bench loads no bench


# ---- mgcl info ------------------------------------------------------------------------

def cmd_info(args) -> int:
    import torch

    from . import __version__, _backend, _native
    from .ops import OPS

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    gpu = torch.cuda.is_available()
    lines = [
        f"mgcl      {__version__}",
        f"python    {platform.python_version()}",
        f"torch     {torch.__version__}",
        f"triton    {triton_version}",
        "native modules:",
        f"  mgcl._C       {'built' if _native.HAS_C else 'missing (' + str(_native.C_ERROR) + ')'}"
        + (f", OpenMP {'on' if _native._C.openmp else 'off'}" if _native.HAS_C else ""),
        f"  mgcl._C_cuda  "
        + (f"built for {_native.cuda_archs()} (CUDA {_native.cuda_version()} runtime; "
           f"the driver here supports {_native.driver_version() or 'no CUDA'})" if _native.HAS_C_CUDA
           else "not built (no nvcc at build time, or MGCL_CUDA=OFF)"),
        "GPU       " + (f"{torch.cuda.device_count()} visible: {torch.cuda.get_device_name(0)}" if gpu else "none visible"),
        "backends: the default for CPU / CUDA tensors, then each op's table in order of preference",
    ]
    table = {}
    for op in OPS:
        mod = importlib.import_module(f"mgcl.ops.{op}")
        cpu = _backend.default_for(op, mod.BACKENDS, "cpu")
        cuda = _backend.default_for(op, mod.BACKENDS, "cuda")
        entries = _backend.describe(mod.BACKENDS)
        table[op] = {"cpu": cpu, "cuda": cuda, "offered": list(mod.BACKENDS), "entries": entries}
        lines.append(f"  {op:<20} {cpu} / {cuda}")
        for e in entries:
            limits = "".join(f"; {k}: {e[k]}" for k in ("limit", "prefer") if e[k])
            why = "".join(f"; not on {d} here: {w}" for d, w in e["why_not"].items())
            lines.append(f"    {e['backend']:<8} {'+'.join(e['devices']):<9} {', '.join(e['dtypes'])}{limits}{why}")
    if args.json:
        print(json.dumps({
            "mgcl": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_version, "C": _native.HAS_C, "C_cuda": _native.HAS_C_CUDA,
            "cuda_archs": _native.cuda_archs(), "cuda_driver": _native.driver_version(), "gpu": gpu,
            "backends": table,
        }, indent=2))
    else:
        print("\n".join(lines))
    return 0


# ---- mgcl bench -----------------------------------------------------------------------

def cmd_bench(args) -> int:
    from .bench import harness

    if args.op not in BENCHES:
        print(f"mgcl bench: unknown bench {args.op!r}; available: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    try:
        mod = importlib.import_module(f"mgcl.bench.{args.op}")
    except ModuleNotFoundError:
        print(f"mgcl bench: the {args.op!r} bench is not part of this build yet", file=sys.stderr)
        return 2
    import os

    from .cl.config import output_dir_problem

    bad = None  # checked before the bench runs (minutes), not after
    if not (math.isfinite(args.scale) and args.scale > 0):
        bad = f"--scale must be a finite number > 0, got {args.scale}"
    elif args.repeats < 1:
        bad = f"--repeats must be >= 1, got {args.repeats}"
    elif args.json and os.path.isdir(args.json):
        bad = f"--json {args.json}: is a directory"
    elif args.json and output_dir_problem(os.path.dirname(os.path.abspath(args.json))):
        bad = f"--json {args.json}: {output_dir_problem(os.path.dirname(os.path.abspath(args.json)))}"
    if bad:
        print(f"mgcl bench: {bad}", file=sys.stderr)
        return 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("mgcl bench: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    result = mod.run(device=args.device, scale=args.scale, repeats=args.repeats)
    print(mod.table(result))
    if args.json:
        harness.write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


# ---- mgcl db -----------------------------------------------------------------------------

def _printable(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (\\x1b),
    so a caption or a file name cannot drive the terminal."""
    return "".join(c if c.isprintable() or c in " \n" else c.encode("unicode_escape").decode("ascii") for c in text)


def _load_vlm(name: str, device: str | None):
    """A VLM by name through mgcl.models (imported only here: retrieval never imports models).
    A hub name is checked first: offline and not in the cache, it fails at once."""
    import os  # noqa: PLC0415

    from ._hub import check  # noqa: PLC0415
    from .models import BIOMEDCLIP_HUB, load  # noqa: PLC0415

    source = name
    if not os.path.exists(name) and (name.startswith("hf-hub:") or name.lower() == "biomedclip"):
        hub = BIOMEDCLIP_HUB if name.lower() == "biomedclip" else name
        local = check(hub.removeprefix("hf-hub:"), what=f"--vlm {name!r}",
                      how="download it elsewhere and pass its folder (--vlm /path/to/model, holding "
                          "open_clip_config.json and the weights)")
        source = local or hub
    try:
        model = load(source, device=device or "cpu")
    except (ValueError, OSError, RuntimeError, ImportError) as exc:
        raise ValueError(f"--vlm {name!r}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}") from None
    if hasattr(model, "eval"):
        model.eval()
    return model


def _db_fail(cmd: str, exc: Exception) -> int:
    print(_printable(f"mgcl db {cmd}: {exc}"), file=sys.stderr)
    return 2


def _warned(cmd: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, its Python warnings printed as one line each."""
    import warnings  # noqa: PLC0415

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    for w in caught:
        print(_printable(f"mgcl db {cmd}: warning: {w.message}"), file=sys.stderr)
    return out


DB_ERRORS = (ValueError, OSError, ImportError)  # user input: a bad path, file, name or option (BankError included)


def _corpus_inputs(args) -> list:
    """The corpus arguments, saved Hugging Face dataset folders given their columns."""
    import os  # noqa: PLC0415

    from .retrieval.corpus import HFDataset, is_saved_dataset  # noqa: PLC0415

    if args.image_column is None and args.caption_column is None:
        return args.corpus
    out = [HFDataset(p, args.image_column, args.caption_column) if os.path.isdir(p) and is_saved_dataset(p) else p
           for p in args.corpus]
    if not any(isinstance(p, HFDataset) for p in out):
        raise ValueError("--image-column / --caption-column name the columns of a saved Hugging Face dataset "
                         "folder; none is among the corpus paths")
    return out


def cmd_db_build(args) -> int:
    from .retrieval.bank import resolve_device
    from .retrieval.build import build_bank, problems, report

    try:
        resolve_device(args.device)
        vlm = _load_vlm(args.vlm, args.device) if args.vlm else None
        detector = None
        if args.panel_detector:
            if not args.split_compound:
                raise ValueError("--panel-detector is used only with --split-compound")
            from .retrieval.cleanse import TorchvisionDetector

            detector = TorchvisionDetector.from_checkpoint(args.panel_detector, device=args.device)
        options = dict(vlm=vlm, vlm_name=args.vlm, shard_size=args.shard_size, batch_size=args.batch_size,
                       image_root=args.image_root, missing_images=args.missing_images,
                       max_image_pixels=args.max_image_pixels, external_images=args.allow_external_images,
                       split_compound=args.split_compound, panel_detector=detector)
        if args.ray is not None:  # the same bank, read and embedded on a Ray cluster
            from .retrieval.distributed import build_bank_ray

            manifest = build_bank_ray(_corpus_inputs(args), args.out, embedder=args.embedder, address=args.ray or None,
                                      workers=args.workers, device=args.device, **options)
        else:
            manifest = build_bank(_corpus_inputs(args), args.out, embedder=args.embedder, device=args.device, **options)
        print(_printable(report(manifest)))
        _print_problems(args.out)
        if args.index:
            from .retrieval import MemoryBank
            from .retrieval.faiss_index import build_index

            entry = _warned("build", build_index, MemoryBank.open(args.out), args.index)
            print(f"FAISS {entry['kind']} index: {entry['path']}")
    except DB_ERRORS as exc:
        return _db_fail("build", exc)
    print(_printable(f"wrote {args.out}"))
    n = problems(manifest)
    if n and not args.allow_skipped:
        print(_printable(f"mgcl db build: {n} problem(s) with the corpus (see above and {args.out}/skipped.jsonl); "
                         "the bank holds every readable record. Exit status 1; --allow-skipped accepts them"),
              file=sys.stderr)
        return 1
    return 0


def cmd_db_index(args) -> int:
    from .retrieval import MemoryBank
    from .retrieval.faiss_index import build_index

    try:
        entry = _warned("index", build_index, MemoryBank.open(args.bank), args.index, nlist=args.nlist, m=args.m,
                        nbits=args.nbits)
    except DB_ERRORS as exc:
        return _db_fail("index", exc)
    print(f"FAISS {entry['kind']} index written: {entry['path']}")
    return 0


def cmd_db_query(args) -> int:
    from .retrieval import BankError, MemoryBank

    try:
        bank = MemoryBank.open(args.bank, embedder=args.embedder, device=args.device)
        have = (bank.manifest.get("index") or {}).get("kind")
        if args.index not in (None, "any") and have != args.index:
            raise BankError(f"bank {bank.path!r} has {'a ' + have if have else 'no'} FAISS index, not {args.index!r} "
                            f"(mgcl db index {args.bank} --index {args.index})")
        hits = bank.search(args.text, k=args.k, ties=not args.no_ties,
                           backend="exact" if args.index is None else "faiss")
    except DB_ERRORS as exc:
        return _db_fail("query", exc)
    rows = []
    for text, hs in zip(args.text, hits):
        if args.json:
            rows.append({"query": text, "hits": [h.__dict__ for h in hs]})
            continue
        print(_printable(f"query: {text}  ({len(hs)} hit(s))"))
        for h in hs:
            cap = h.caption if len(h.caption) <= 100 else h.caption[:97] + "..."
            print(_printable(f"  {h.score:7.4f}  [{h.domain or '-'}]  {cap}"))
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def cmd_db_info(args) -> int:
    from .retrieval import MemoryBank
    from .retrieval.build import report

    try:
        bank = MemoryBank.open(args.bank, verify=args.verify)
    except DB_ERRORS as exc:
        return _db_fail("info", exc)
    print(_printable(report(bank.manifest)))
    idx = bank.manifest.get("index")
    params = ", ".join(f"{k} {idx[k]}" for k in ("nlist", "m", "nbits") if idx and k in idx)
    print(f"FAISS index: {idx['kind']} ({idx['path']}{', ' + params if params else ''})" if idx
          else "FAISS index: none (mgcl db index BANK builds one)")
    print(f"size on disk: {_size(_disk_bytes(bank.path))}")
    if args.verify:
        print("checksums: all files match the manifest; embeddings finite")
    return 0


def _disk_bytes(folder: str) -> int:
    """Bytes of every file under ``folder`` (what the bank takes on disk)."""
    import os  # noqa: PLC0415

    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n:,} B"
    k = min(3, int(math.log(n, 1024)))
    return f"{n / 1024 ** k:.1f} {('KiB', 'MiB', 'GiB')[k - 1]}"


def _print_problems(out: str, limit: int = 10) -> None:
    """The first ``limit`` lines of OUT/skipped.jsonl, each naming its file and position."""
    import os  # noqa: PLC0415

    try:
        with open(os.path.join(out, "skipped.jsonl"), encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    except (OSError, ValueError):
        return
    for r in rows[:limit]:
        where = ", ".join(x for x in (r.get("file"), r.get("position")) if x)
        print(_printable(f"  {r.get('action')}: {where}: {r.get('reason')}"))
    if len(rows) > limit:
        print(f"  ... and {len(rows) - limit} more in {os.path.join(out, 'skipped.jsonl')}")


def _add_db(sub) -> None:
    from .retrieval.images import MAX_PIXELS

    db = sub.add_parser("db", help="build and query a retrieval bank").add_subparsers(dest="db_command", required=True)
    s = db.add_parser("build", help="embed a corpus into a bank (resumes an interrupted build)",
                      description="Exit status: 0 when every record was used, 1 when the bank was written but "
                                  "records were skipped, containers damaged or images unreadable (all listed in "
                                  "OUT/skipped.jsonl; --allow-skipped makes this 0), 2 on an error (nothing "
                                  "written).")
    s.add_argument("corpus", nargs="+",
                   help="jsonl / parquet / WebDataset .tar files or folders, brace patterns "
                        "(shard-{000000..000999}.tar), fsspec URLs (file://, hf://, ...) or a saved Hugging Face "
                        "dataset folder (save_to_disk)")
    s.add_argument("--image-column", help="a Hugging Face dataset's image column (default: image, img_path, ...)")
    s.add_argument("--caption-column", help="a Hugging Face dataset's caption column (default: caption, text, ...)")
    s.add_argument("--out", required=True, help="bank directory")
    s.add_argument("--embedder", default="minilm", help="minilm (default) | hashing[:DIM] | a sentence-transformers folder or hub name")
    s.add_argument("--vlm", help="store this VLM's image embeddings for reranking (mgcl.models name or folder)")
    s.add_argument("--shard-size", type=int, default=100_000,
                   help="records per embeddings shard, the unit a resumed build restarts from (default 100,000)")
    s.add_argument("--batch-size", type=int, default=64, help="captions (and images) embedded per batch (default 64)")
    s.add_argument("--device", default=None, help="cpu | cuda (default: cpu)")
    s.add_argument("--image-root", help="folder that relative image paths in jsonl/parquet refer to")
    s.add_argument("--allow-external-images", action="store_true",
                   help="accept image paths outside the corpus root (--image-root, else the corpus folder)")
    s.add_argument("--missing-images", choices=["skip", "keep"], default=None,
                   help="records without a readable image: skip (default with --vlm) or keep (default without)")
    s.add_argument("--max-image-pixels", type=int, default=MAX_PIXELS,
                   help=f"larger images count as unreadable (default {MAX_PIXELS:,})")
    s.add_argument("--split-compound", action="store_true",
                   help="one entry per panel of each compound figure, with its sub-caption (parent id and panel "
                        "index in meta); figures that cannot be split stay whole, listed in skipped.jsonl")
    s.add_argument("--panel-detector", metavar="CHECKPOINT",
                   help="with --split-compound: find panels with this torchvision detection model (a safetensors "
                        "checkpoint, see mgcl.retrieval.cleanse.save_detector) instead of the gutter splitter")
    s.add_argument("--allow-skipped", action="store_true",
                   help="exit 0 even when records were skipped or containers damaged (still listed in skipped.jsonl)")
    s.add_argument("--index", choices=["flat", "ivfpq"],
                   help="also build a FAISS index: flat (exact) | ivfpq (compressed; needs a large bank)")
    s.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="read and embed on a Ray cluster (ADDRESS of a running one, 'auto'; none: RAY_ADDRESS or a "
                        "new local instance); the same bank as without")
    s.add_argument("--workers", type=int, help="with --ray: embedding actors (default: one per GPU, else CPUs - 1)")
    s.set_defaults(func=cmd_db_build)
    s = db.add_parser("index", help="build a FAISS index for a bank")
    s.add_argument("bank", help="bank directory (mgcl db build --out)")
    s.add_argument("--index", choices=["flat", "ivfpq"], default="flat",
                   help="flat: exact inner product (default) | ivfpq: inverted lists + product quantizer")
    s.add_argument("--nlist", type=int, help="ivfpq inverted lists (default 4*sqrt(bank size), at most 65,536)")
    s.add_argument("--m", type=int, help="ivfpq sub-quantizers (must divide the dimension)")
    s.add_argument("--nbits", type=int, default=8, help="ivfpq bits per sub-quantizer code, 1 to 16 (default 8)")
    s.set_defaults(func=cmd_db_index)
    s = db.add_parser("query", help="print the nearest captions of one or more texts")
    s.add_argument("bank", help="bank directory (mgcl db build --out)")
    s.add_argument("text", nargs="+", help="query text(s), one result list each")
    s.add_argument("-k", type=int, default=10, help="hits per query (default 10; more with ties at the k-th score)")
    s.add_argument("--no-ties", action="store_true", help="exactly k hits (ties broken by index)")
    s.add_argument("--index", nargs="?", const="any", choices=["flat", "ivfpq", "any"],
                   help="search the bank's FAISS index (flat | ivfpq: the kind it must be), re-scored exactly")
    s.add_argument("--embedder", help="override the embedder named in the manifest")
    s.add_argument("--device", default=None, help="cpu | cuda (default: cpu)")
    s.add_argument("--json", action="store_true", help="print the hits as JSON")
    s.set_defaults(func=cmd_db_query)
    s = db.add_parser("info", help="summary of a bank; --verify checks every sha256")
    s.add_argument("bank", help="bank directory (mgcl db build --out)")
    s.add_argument("--verify", action="store_true", help="also check every file's sha256 and that embeddings are finite")
    s.set_defaults(func=cmd_db_info)


# ---- mgcl mgtil -----------------------------------------------------------------------

def cmd_mgtil_check(args) -> int:
    from .mgtil import data

    try:
        report = data.check(args.root, args.benchmark)
    except ValueError as e:
        print(f"mgcl mgtil check: {e}", file=sys.stderr)
        return 2
    print(report.format())
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}")
    return 1 if report.errors or (args.strict and report.warnings) else 0


def cmd_mgtil_list(args) -> int:
    from .mgtil.benchmarks import benchmark_names, get_benchmark

    try:
        benches = [get_benchmark(n) for n in ([args.benchmark] if args.benchmark else benchmark_names())]
    except ValueError as e:
        print(f"mgcl mgtil list: {e}", file=sys.stderr)
        return 2
    for b in benches:
        print(f"{b.display_name}: {b.title}; order: {b.order}")
        for i, d in enumerate(b.datasets, 1):
            tag = "  [SYNTHETIC]" if d.synthetic else ""
            print(f"  {i:>2}. {d.name:<24} {d.domain:<15} {d.num_classes:>3} classes {d.n_images:>9,} images{tag}")
            if args.classes:
                print("      " + " | ".join(d.classes))
        print()
    return 0


def _add_mgtil(sub) -> None:
    s = sub.add_parser("mgtil", help="MGTIL benchmarks: the definitions, and checking a data root")
    msub = s.add_subparsers(dest="mgtil_command", required=True)
    m = msub.add_parser("check", help="report what a data root holds for a benchmark, without loading images")
    m.add_argument("--root", required=True,
                   help="data root: ROOT/<dataset>/{train,test}/<class>/* or "
                        "ROOT/<dataset>/{train,test}.csv (columns path,label)")
    m.add_argument("--benchmark", default=None,
                   help="hmt-order1 | hmt-order2 | medxtreme-order1 | medxtreme-order2 | mgtil-synth | "
                        "mgtil-synth-quick (default: every real dataset)")
    m.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    m.add_argument("--strict", action="store_true",
                   help="exit 1 on warnings too (image counts, classes without images)")
    m.set_defaults(func=cmd_mgtil_check)
    m = msub.add_parser("list", help="the benchmarks, their task order and datasets")
    m.add_argument("--benchmark", default=None, help="one benchmark (default: all)")
    m.add_argument("--classes", action="store_true", help="also print each dataset's class labels")
    m.set_defaults(func=cmd_mgtil_list)


# ---- mgcl demo / run / report -----------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    """An error on user input as one line (a multi-line message joined with '; ')."""
    return "; ".join(x.strip() for x in str(exc).splitlines() if x.strip()) or type(exc).__name__


def cmd_demo(args) -> int:
    from .cl.config import ConfigError
    from .mgtil import demo
    from .retrieval import BankError

    try:
        if args.ablations:
            from .mgtil import ablate

            return ablate.main(args.out, quick=args.quick, seed=args.seed,
                               seeds=ablate.SEEDS if args.seeds is None else args.seeds,
                               progress=not args.no_progress, workers=args.jobs)
        return demo.main(args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress,
                         methods=args.methods.split(",") if args.methods else demo.METHODS,
                         seeds=demo.SEEDS if args.seeds is None else args.seeds, workers=args.jobs)
    except (ConfigError, BankError, OSError) as exc:  # bad options, a damaged cache, the disk
        print(f"mgcl demo: {_one_line(exc)}", file=sys.stderr)
        return 2


def cmd_ablate(args) -> int:
    args.ablations = True
    return cmd_demo(args)


def cmd_run(args) -> int:
    from .cl.checkpoint import CheckpointError
    from .mgtil import report, run
    from .retrieval import BankError

    try:
        cfg = run.load_config(args.config)
        if args.check:
            run.check_paths(cfg.data)
            d = cfg.data
            print(f"{args.config}: OK ({d['benchmark']}, {d['model']['adapter']}, {d['strategy']['name']})")
            return 0
        res = run.run(cfg, resume=args.resume, progress=not args.no_progress, plot_format=args.format, dpi=args.dpi)
    except (run.ConfigError, CheckpointError, BankError, OSError) as exc:  # a tampered bank: first read
        print(f"mgcl run: {_one_line(exc)}", file=sys.stderr)
        return 2
    print(report.format_table(res))
    print(f"wrote {cfg.data['output_dir']}")
    return 0


def cmd_report(args) -> int:
    import os

    from .cl.config import output_dir_problem
    from .mgtil import report

    try:
        loaded = [report.load(p) for p in args.runs]
        problem = output_dir_problem(args.out)
        if problem:
            raise ValueError(f"--out: {problem}")
        labels = [os.path.basename(os.path.normpath(p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))))
                  for p in args.runs]
        res = report.combine(loaded, labels)
        files = report.render(res, args.out, plots=not args.no_plots, fmt=args.format, dpi=args.dpi)
        report.write_json(os.path.join(args.out, "combined.json"), res)
    except (ValueError, OSError) as exc:
        print(f"mgcl report: {_one_line(exc)}", file=sys.stderr)
        return 2
    print(report.format_table(res))
    print("wrote " + ", ".join(files + [os.path.join(args.out, "combined.json")]))
    return 0


def _add_plot_options(s) -> None:
    from .mgtil.report import DPI, FORMATS

    s.add_argument("--format", choices=FORMATS, default="png", help="file format of the plots (default png)")
    s.add_argument("--dpi", type=int, default=DPI, help=f"resolution of png plots (default {DPI})")


def _add_experiments(sub) -> None:
    s = sub.add_parser("demo", help="the whole method on the SYNTHETIC benchmark mgtil-synth (no data, no GPU)")
    s.add_argument("--out", default="mgcl-demo", help="output directory (default: ./mgcl-demo)")
    s.add_argument("--quick", action="store_true", help="a smaller, faster run (smoke test, noisy numbers)")
    s.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the pretraining")
    s.add_argument("--seeds", type=int, default=None,
                   help="training seeds per method, reported as mean ± std (default: 3, from train.seed 42 on)")
    s.add_argument("--methods", default=None,
                   help="comma-separated strategies (default: zero-shot,finetune,l2,zscl,primed), or 'all' (every "
                        "strategy in mgcl.cl.strategies.available()); moe-adapters and diki run on a ViT TinyCLIP, "
                        "reported with its zero-shot-vit row")
    s.add_argument("--jobs", type=int, default=None,
                   help="processes for the runs, one thread each (default: one per core; results do not change)")
    s.add_argument("--ablations", action="store_true",
                   help="the paper's ablation table for PRIMED instead (the same as `mgcl ablate`)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars or log lines")
    s.set_defaults(func=cmd_demo)
    s = sub.add_parser("ablate", help="the paper's ablation table for PRIMED on mgtil-synth (SYNTHETIC), "
                                      "mean ± std over seeds")
    s.add_argument("--out", default="mgcl-ablate", help="output directory (default: ./mgcl-ablate)")
    s.add_argument("--quick", action="store_true", help="the demo's --quick assets and settings (smoke test)")
    s.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the pretraining")
    s.add_argument("--seeds", type=int, default=None, help="training seeds per variant (default: 3)")
    s.add_argument("--jobs", type=int, default=None,
                   help="processes for the runs, one thread each (default: one per core; results do not change)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars or log lines")
    s.set_defaults(func=cmd_ablate)
    s = sub.add_parser("run", help="one continual-learning run from a YAML config (see configs/)")
    s.add_argument("config", help="YAML config (benchmark, data_root, model, strategy, retrieval, train, output_dir), "
                                  "or a shipped config's name (mgcl run NAME; an unknown name lists them)")
    s.add_argument("--resume", action="store_true", help="continue after the last finished task")
    s.add_argument("--check", action="store_true", help="only check the config: every key, value and path")
    s.add_argument("--no-progress", action="store_true", help="no progress bars or log lines")
    _add_plot_options(s)
    s.set_defaults(func=cmd_run)
    s = sub.add_parser("report", help="tables and plots of one or several runs / demo outputs, side by side")
    s.add_argument("runs", nargs="+", help="run or demo output directories (or their results.json)")
    s.add_argument("--out", default="mgcl-report", help="where the tables and plots go (default: ./mgcl-report)")
    s.add_argument("--no-plots", action="store_true", help="only the tables (results.csv, .md, .tex)")
    _add_plot_options(s)
    s.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(prog="mgcl", description="Retrieval-guided continual learning for medical VLMs")
    p.add_argument("--version", action="version", version=f"mgcl {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="versions, native modules, GPU and the backend each op uses")
    s.add_argument("--json", action="store_true", help="print as JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("bench", help="benchmark an op's backends against its reference")
    s.add_argument("op", help=" | ".join(BENCHES))
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the bench runs (default cpu)")
    s.add_argument("--scale", type=float, default=1.0, help="shrink the problem (e.g. 0.1 on a small CPU)")
    s.add_argument("--repeats", type=int, default=5, help="timed repetitions per case; the median is reported")
    s.add_argument("--json", metavar="FILE", help="write the result (with machine and versions) as JSON")
    s.set_defaults(func=cmd_bench)

    _add_db(sub)
    _add_mgtil(sub)
    _add_experiments(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    import os

    # Third-party progress bars (transformers' "Loading weights", hub downloads) stay
    # out of mgcl's output; HF_HUB_DISABLE_PROGRESS_BARS=0 brings them back.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
