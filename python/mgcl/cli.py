"""The ``mgcl`` command. Each subcommand is a small function below; heavy
imports happen inside them so ``mgcl --help`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys


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
        + (f"built for {_native.cuda_archs()} (CUDA {_native.cuda_version()})" if _native.HAS_C_CUDA
           else "not built (no nvcc at build time, or MGCL_CUDA=OFF)"),
        "GPU       " + (f"{torch.cuda.device_count()} visible: {torch.cuda.get_device_name(0)}" if gpu else "none visible"),
        "backends (CPU tensors / CUDA tensors):",
    ]
    table = {}
    for op in OPS:
        mod = importlib.import_module(f"mgcl.ops.{op}")
        cpu = _backend.default_for(op, mod.BACKENDS, "cpu")
        cuda = _backend.default_for(op, mod.BACKENDS, "cuda")
        table[op] = {"cpu": cpu, "cuda": cuda, "offered": sorted(mod.BACKENDS)}
        lines.append(f"  {op:<20} {cpu:<8} / {cuda:<8} (offered: {', '.join(sorted(mod.BACKENDS))})")
    if args.json:
        print(json.dumps({
            "mgcl": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_version, "C": _native.HAS_C, "C_cuda": _native.HAS_C_CUDA,
            "cuda_archs": _native.cuda_archs(), "gpu": gpu, "backends": table,
        }, indent=2))
    else:
        print("\n".join(lines))
    return 0


# ---- mgcl bench -----------------------------------------------------------------------

def cmd_bench(args) -> int:
    from .bench import BENCHES, harness

    if args.op not in BENCHES:
        print(f"mgcl bench: unknown bench {args.op!r}; available: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    try:
        mod = importlib.import_module(f"mgcl.bench.{args.op}")
    except ModuleNotFoundError:
        print(f"mgcl bench: the {args.op!r} bench is not part of this build yet", file=sys.stderr)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mgcl", description="Retrieval-guided continual learning for medical VLMs")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="versions, native modules, GPU and the backend each op uses")
    s.add_argument("--json", action="store_true", help="print as JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("bench", help="benchmark an op's backends against its reference")
    s.add_argument("op", help="fisher_guard | contrastive_distill | similarity_topk | retrieval | step")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--scale", type=float, default=1.0, help="shrink the problem (e.g. 0.1 on a small CPU)")
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--json", metavar="FILE", help="write the result (with machine and versions) as JSON")
    s.set_defaults(func=cmd_bench)

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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
