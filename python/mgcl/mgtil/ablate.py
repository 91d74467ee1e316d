"""``mgcl ablate`` (= ``mgcl demo --ablations``): the shape of the paper's
ablation table for PRIMED on the SYNTHETIC benchmark mgtil-synth, each
variant at several training seeds (mean ± std).

Groups (SPEC.md's ablations; the first row of each is the demo's PRIMED, run
once and shown in every group):

- losses: CKT only / CKT + CMC (both without the guard) / all three;
- teacher: last / initial;
- regulariser: dfg / l2 / ewc;
- retrieval: multi-stage / dense-only / bm25-only (``primed(stages=)``);
- reference set: dynamic / uniform (the ZSCL demo's uniform set size).

Settings: the demo's (``mgcl.mgtil.demo.settings``) with ``TRAIN`` changes
(fewer iterations per task, to fit 27 runs in the time budget; stated in the
output). Writes ``ablation.json`` (the results schema, one "method" per
variant, plus the groups), ``ablation.md``, ``ablation.csv`` and
``ablation.png`` (Transfer / Avg / Last per group, error bars = std).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from .. import _env
from .._io import atomic_write_bytes
from ..cl.config import ConfigError, output_dir_problem
from . import demo, report
from . import seeds as seeds_mod

SEEDS = 3
# iterations per task (the demo's: 100 full, 30 --quick): 9 variants x 3 seeds must fit 30 minutes
TRAIN = {False: {"iters_per_task": 50, "warmup": 5, "log_every": 50}, True: {}}

# variant -> PRIMED options on top of the demo's; "primed" is the full method
VARIANTS = {
    "primed": {},
    "ckt-only": {"cmc": False, "regularizer": "none"},
    "ckt+cmc": {"regularizer": "none"},
    "teacher-initial": {"teacher": "initial"},
    "l2": {"regularizer": "l2"},
    "ewc": {"regularizer": "ewc"},
    "dense-only": {"stages": "dense-only"},
    "bm25-only": {"stages": "bm25-only"},
    "uniform": {"retrieval": "uniform"},   # uniform_size: the demo's ZSCL set (SPEC: ZSCL's size)
}
GROUPS = (
    ("losses", (("CKT only", "ckt-only"), ("CKT + CMC", "ckt+cmc"), ("all three (+ DFG)", "primed"))),
    ("teacher", (("last", "primed"), ("initial", "teacher-initial"))),
    ("regulariser", (("dfg", "primed"), ("l2", "l2"), ("ewc", "ewc"))),
    ("retrieval", (("multi-stage", "primed"), ("dense-only", "dense-only"), ("bm25-only", "bm25-only"))),
    ("reference set", (("dynamic", "primed"), ("uniform", "uniform"))),
)
# SPEC.md: the paper's ablations on HieraMedTransfer order I (BiomedCLIP), Transfer / Avg / Last, for the shape
PAPER = {"ckt-only": (56.2, 71.8, 82.6), "ckt+cmc": (57.2, 72.8, 82.5), "primed": (58.3, 73.1, 82.1),
         "teacher-initial": (57.9, 70.7, 78.2), "l2": (57.2, 72.9, 81.8), "ewc": (57.2, 71.3, 80.6),
         "bm25-only": (55.1, 72.2, 81.8), "dense-only": (56.1, 72.5, 81.5)}


def variant_options(cfg: dict, variant: str) -> dict:
    opts = {**cfg["strategies"]["primed"], **VARIANTS[variant]}
    if opts.get("retrieval") == "uniform":
        opts["uniform_size"] = cfg["strategies"]["zscl"]["uniform_size"]
    return opts


def run_ablation(out_dir="mgcl-ablate", *, quick: bool = False, seed: int = 0, seeds: int = SEEDS, cache_dir=None,
                 progress: bool = True, variants: Optional[list] = None, workers: Optional[int] = None) -> dict:
    """Every variant at ``seeds`` training seeds; writes the files (module doc); returns the results dict."""
    import torch  # noqa: PLC0415

    from ..cl.results import results as make_results  # noqa: PLC0415

    if not isinstance(seeds, int) or isinstance(seeds, bool) or not 1 <= seeds <= 100:
        raise ConfigError(f"ablate: --seeds must be an integer in [1, 100], got {seeds!r}")
    names = list(VARIANTS) if variants is None else list(variants)
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise ConfigError(f"ablate: variants must be a non-empty subset of {list(VARIANTS)}, got {names}")
    demo.check_workers(workers)
    out = Path(out_dir).expanduser().absolute()
    problem = output_dir_problem(out)
    if problem:
        raise ConfigError(f"ablate: --out: {problem}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cfg = demo.settings(quick)
    changes = TRAIN[bool(quick)]
    train_seeds = demo.seed_list(cfg, seeds)
    threads = torch.get_num_threads()
    try:
        assets = demo.prepare(seed, quick, cache_dir=cache_dir, progress=progress)
        t_assets = round(time.time() - t0, 2)
        torch.set_num_threads(1)
        jobs = [j for v in names for j in demo.jobs_for(f"ablation/{v}", "primed", variant_options(cfg, v),
                                                        train_seeds, changes)]
        workers = demo.default_workers(len(jobs)) if workers is None else workers
        demo._log(f"ablate: {len(names)} PRIMED variants x seeds {train_seeds}", progress)
        t1 = time.time()
        got = demo.run_jobs(assets, cfg, jobs, out, workers=workers, progress=progress, seed=seed, quick=quick,
                            cache_dir=cache_dir, tag="ablate")
        entries = {label.split("/", 1)[1]: e for label, e in got.items()}
        seconds = {v: round(sum(p["seconds"] for p in e["per_seed"]), 2) for v, e in entries.items()}
        t_runs = round(time.time() - t1, 2)
    finally:
        torch.set_num_threads(threads)
    smaller = (f"iterations per task {changes['iters_per_task']} instead of the demo's "
               f"{cfg['train']['iters_per_task']}" if changes else "the demo's --quick settings")
    groups = [{"group": g, "rows": [{"label": lab, "variant": v} for lab, v in rows if v in entries]}
              for g, rows in GROUPS]
    res = make_results(
        "demo", entries, benchmark="mgtil-synth", synthetic=True, tasks=[t.name for t in assets.data.tasks],
        domains=[t.domain for t in assets.data.tasks],
        config={"seed": seed, "seeds": train_seeds, "quick": bool(quick), "settings": cfg, "train_changes": changes,
                "variants": {v: variant_options(cfg, v) for v in names}},
        versions=_env.versions(), quick=bool(quick), label=assets.data.label, ablation=groups, smaller=smaller,
        notice="SYNTHETIC: procedural images and captions made by mgcl.mgtil.synth; not medical data",
        machine={**_env.machine(), "torch_threads_training": 1},
        timings={"assets": t_assets, "assets_reused": assets.reused, "variants": seconds, "workers": workers,
                 "runs_wall": t_runs, "total": round(time.time() - t0, 2)})
    report.write_json(str(out / "ablation.json"), res)
    files = [str(out / "ablation.json")]
    for name, text in (("ablation.md", ablation_md(res)), ("ablation.csv", ablation_csv(res))):
        atomic_write_bytes(str(out / name), text.encode())
        files.append(str(out / name))
    png = plot(res, str(out / "ablation.png"))
    res["files"] = files + ([png] if png else [])
    return res


def ablation_md(res: dict) -> str:
    m = res["methods"]
    lines = [f"**{report.SYNTHETIC_NOTE}** (mgtil-synth{', --quick' if res.get('quick') else ''})\n",
             f"PRIMED ablations, mean ± std over the training seeds {res['config']['seeds']}. Smaller settings than "
             f"the demo: {res['smaller']}. The paper's numbers (SPEC.md: HieraMedTransfer order I, BiomedCLIP; "
             "Transfer / Avg / Last) are there for the shape only.\n"]
    for g in res["ablation"]:
        rows = {r["label"]: m[r["variant"]] for r in g["rows"]}
        if not rows:
            continue
        lines.append(f"## {g['group']}\n")
        table = seeds_mod.table_md(rows, label=g["group"]).splitlines()
        paper = ["paper T / A / L", "---"] + ["{:.1f} / {:.1f} / {:.1f}".format(*PAPER[r["variant"]])
                                               if r["variant"] in PAPER else "-" for r in g["rows"]]
        lines.extend(f"{row} {p} |" for row, p in zip(table, paper))
        first = g["rows"][0]["label"]
        ref = "all three (+ DFG)" if g["group"] == "losses" else first
        lines.append("\n" + seeds_mod.differences_md(rows, [(lab, ref) for lab in rows if lab != ref]))
    return "\n".join(lines)


def ablation_csv(res: dict) -> str:
    extra = {}
    for g in res["ablation"]:
        for r in g["rows"]:
            extra.setdefault(r["variant"], {"groups": []})["groups"].append(f"{g['group']}: {r['label']}")
    extra = {v: {"groups": "; ".join(e["groups"])} for v, e in extra.items()}
    return seeds_mod.to_csv(res["methods"], label="variant", extra=extra)


def plot(res: dict, path: str, dpi: int = 90) -> Optional[str]:
    """Transfer / Avg / Last of every group's rows, bars with std error bars; None without matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    groups = [g for g in res["ablation"] if g["rows"]]
    metrics = ("transfer", "avg", "last")
    fig, axes = plt.subplots(len(metrics), len(groups), figsize=(3.0 * len(groups), 2.4 * len(metrics)),
                             squeeze=False)
    for j, g in enumerate(groups):
        for i, k in enumerate(metrics):
            ax = axes[i][j]
            ms = [res["methods"][r["variant"]] for r in g["rows"]]
            ax.bar(range(len(ms)), [m[k] for m in ms], yerr=[m["std"][k] for m in ms], capsize=3,
                   color=[f"C{n}" for n in range(len(ms))])
            lo = min(m[k] - m["std"][k] for m in ms)
            hi = max(m[k] + m["std"][k] for m in ms)
            ax.set_ylim(lo - 0.5 * (hi - lo) - 0.5, hi + 0.2 * (hi - lo) + 0.5)
            ax.set_xticks(range(len(ms)))
            ax.set_xticklabels([r["label"] for r in g["rows"]], rotation=20, fontsize=7)
            if i == 0:
                ax.set_title(g["group"], fontsize=9)
            if j == 0:
                ax.set_ylabel(report.HEADERS[k])
    fig.suptitle(f"PRIMED ablations on mgtil-synth (SYNTHETIC), mean ± std over {len(res['config']['seeds'])} "
                 f"seeds; {res['smaller']}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    tmp = str(Path(path).with_name(f".tmp-{Path(path).name}"))
    fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    Path(tmp).replace(path)
    return path


def main(out_dir="mgcl-ablate", quick: bool = False, seed: int = 0, seeds: int = SEEDS, progress: bool = True,
         workers: Optional[int] = None) -> int:
    res = run_ablation(out_dir, quick=quick, seed=seed, seeds=seeds, progress=progress, workers=workers)
    print(ablation_md(res))
    t = res["timings"]
    print(f"{res['notice']}.")
    print(f"wall time {t['total']:.0f} s (assets {t['assets']:.0f} s, "
          f"{'reused' if t['assets_reused'] else 'built'}; runs {t['runs_wall']:.0f} s in {t['workers']} "
          "process(es); per variant, all seeds: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in t["variants"].items()) + ")")
    print("wrote " + ", ".join(res["files"]))
    return 0


__all__ = ["run_ablation", "ablation_md", "ablation_csv", "plot", "main", "VARIANTS", "GROUPS", "PAPER", "SEEDS",
           "TRAIN"]
