"""Tables and plots of MGTIL runs (SPEC.md section 7): what ``mgcl demo``,
``mgcl run`` and ``mgcl report`` print and write.

Every results file has one schema (``mgcl.cl.results``), written by the
trainer, ``mgcl run`` and the demo alike. ``load`` reads one (a file, or a
directory holding ``results.json``); ``combine`` puts several side by side;
``render`` writes results.csv, results.md, curves.png (accuracy of each task
across the sequence, one panel per method), curves_by_task.png (one panel per
task, one line per method) and heatmaps.png (each R). Percentages throughout.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Optional, Sequence

from .._io import atomic_write_bytes, atomic_write_json
from ..cl.results import FORMAT, METRICS, results, validate

HEADERS = {"transfer": "Transfer", "avg": "Avg", "last": "Last", "bwt": "BWT", "forgetting": "Forgetting",
           "auc": "AUC"}
SYNTHETIC_NOTE = "SYNTHETIC benchmark: procedural images and captions, not medical data"


def write_json(path: str, payload: dict) -> None:
    atomic_write_json(path, payload, indent=1)


def load(path: str) -> dict:
    """A results file, or a directory holding ``results.json`` (ValueError naming the file)."""
    p = os.path.join(path, "results.json") if os.path.isdir(path) else path
    try:
        with open(p, "rb") as fh:
            res = json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no results.json (is it an mgcl run or demo output?)") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise ValueError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    return validate(res, p)


def combine(results_list: Sequence[dict], labels: Optional[Sequence[str]] = None) -> dict:
    """Several results side by side. A method name that occurs in more than one
    file is shown as ``name [label]`` (label: the run's directory name)."""
    if not results_list:
        raise ValueError("combine: no results")
    if len(results_list) == 1:
        return results_list[0]
    labels = list(labels) if labels is not None else [r.get("benchmark") or f"run{i}"
                                                      for i, r in enumerate(results_list)]
    counts: dict[str, int] = {}
    for r in results_list:
        for name in r["methods"]:
            counts[name] = counts.get(name, 0) + 1
    methods, tasks_of = {}, {}
    for r, lab in zip(results_list, labels):
        for name, m in r["methods"].items():
            key = name if counts[name] == 1 else f"{name} [{lab}]"
            while key in methods:
                key += "'"
            methods[key] = {**m, "run": lab, "benchmark": r.get("benchmark", "")}
            tasks_of[key] = r.get("tasks") or [f"task {j + 1}" for j in range(len(m["zero_shot"]))]
    benches = list(dict.fromkeys(r.get("benchmark", "") for r in results_list))
    same_tasks = len({tuple(t) for t in tasks_of.values()}) == 1
    return results("report", methods, tasks=next(iter(tasks_of.values())) if same_tasks else None,
                   benchmark=" + ".join(b for b in benches if b),
                   synthetic=any(r.get("synthetic") for r in results_list), task_names=tasks_of, runs=labels)


# ---- tables ---------------------------------------------------------------------------------

def _fmt(v, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def rows(res: dict) -> list[dict]:
    """One dict per method: name + the metrics (None where undefined)."""
    return [{"method": name, **{k: m.get(k) for k in METRICS}} for name, m in res["methods"].items()]


def title(res: dict) -> str:
    t = f"MGTIL results: {res.get('benchmark') or 'benchmark'}"
    if res.get("synthetic"):
        t += f" -- {SYNTHETIC_NOTE}"
    return t


def format_table(res: dict) -> str:
    """The paper-style table as plain text (Transfer / Avg / Last / BWT / Forgetting / AUC)."""
    rs = rows(res)
    w = max([len("method")] + [len(r["method"]) for r in rs])
    head = f"{'method':<{w}}  " + "  ".join(f"{HEADERS[k]:>10}" for k in METRICS)
    lines = [title(res), head, "-" * len(head)]
    for r in rs:
        lines.append(f"{r['method']:<{w}}  " + "  ".join(f"{_fmt(r[k], k == 'bwt'):>10}" for k in METRICS))
    tasks = res.get("tasks")
    if tasks:
        lines.append(f"{len(tasks)} tasks in order: " + ", ".join(tasks))
    return "\n".join(lines)


def markdown(res: dict) -> str:
    lines = []
    if res.get("synthetic"):
        lines.append(f"**{SYNTHETIC_NOTE}** ({res.get('benchmark')})\n")
    lines.append("| method | " + " | ".join(HEADERS[k] for k in METRICS) + " |")
    lines.append("|---|" + "---:|" * len(METRICS))
    for r in rows(res):
        lines.append(f"| {r['method']} | " + " | ".join(_fmt(r[k], k == "bwt") for k in METRICS) + " |")
    return "\n".join(lines) + "\n"


def to_csv(res: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["benchmark", "synthetic", "method", *METRICS])
    for name, m in res["methods"].items():
        w.writerow([m.get("benchmark", res.get("benchmark", "")), bool(res.get("synthetic")), name,
                    *("" if m.get(k) is None else f"{m[k]:.4f}" for k in METRICS)])
    return buf.getvalue()


# ---- plots ----------------------------------------------------------------------------------

def _plt():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _tasks(res: dict, name: str) -> list[str]:
    tn = res.get("task_names")
    if tn and name in tn:
        return tn[name]
    T = len(res["methods"][name]["zero_shot"])
    return res.get("tasks") or [f"task {j + 1}" for j in range(T)]


def _short(task: str) -> str:
    return task.replace("synth-", "")


def _suptitle(res: dict, what: str) -> str:
    s = f"{what}: {res.get('benchmark') or ''}"
    return s + ("  [SYNTHETIC data]" if res.get("synthetic") else "")


def _save_grid(plt, fig, axes, used: int, res: dict, title: str, bottom: float, path: str, dpi: int) -> str:
    """Blank the grid's unused panels, add one legend below and the title, save and close."""
    rows, cols = len(axes), len(axes[0])
    for k in range(used, rows * cols):
        axes[k // cols][k % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=7, frameon=False)
    fig.suptitle(_suptitle(res, title), fontsize=9)
    fig.tight_layout(rect=(0, bottom, 1, 0.95))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _sequence_axis(ax, T: int, first_column: bool) -> None:
    """x axis: zero-shot, then after each of the T tasks; y: accuracy (labelled in the first column)."""
    ax.set_xticks(list(range(T + 1)))
    ax.set_xticklabels(["zs"] + [str(t + 1) for t in range(T)], fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(alpha=0.3)
    if first_column:
        ax.set_ylabel("accuracy (%)", fontsize=8)


def plot_curves(res: dict, path: str, dpi: int = 90) -> str:
    """One panel per method: the accuracy of every task (one line each) at every
    point of the sequence (zero-shot, then after each task); the task's own
    training step is marked. Rising into the diagonal and falling after it
    draws the mirrored Z of forgetting."""
    plt = _plt()
    names = list(res["methods"])
    cols = min(len(names), 5)
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.7 * cols, 2.5 * nrows + 0.5), sharey=True, squeeze=False)
    cmap = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        ax = axes[i // cols][i % cols]
        m = res["methods"][name]
        tasks, R, z = _tasks(res, name), m["R"], m["zero_shot"]
        T = len(z)
        xs = list(range(T + 1))
        for j in range(T):
            ys = [z[j]] + [R[t][j] for t in range(T)]
            ax.plot(xs, ys, color=cmap(j % 10), lw=1.4, label=_short(tasks[j]))
            ax.plot([j + 1], [R[j][j]], "o", color=cmap(j % 10), ms=3.5)
        ax.set_title(name, fontsize=9)
        _sequence_axis(ax, T, i % cols == 0)
        ax.set_xlabel("after task", fontsize=8)
    return _save_grid(plt, fig, axes, len(names), res, "accuracy of each task across the sequence", 0.08, path, dpi)


def plot_curves_by_task(res: dict, path: str, dpi: int = 90) -> Optional[str]:
    """One panel per task, one line per method (only when every method ran the same tasks)."""
    tasks = res.get("tasks")
    if not tasks:
        return None
    plt = _plt()
    names = list(res["methods"])
    T = len(tasks)
    cols = min(T, 3)
    nrows = -(-T // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.0 * cols, 2.3 * nrows + 0.5), sharey=True, squeeze=False)
    cmap = plt.get_cmap("tab10")
    xs = list(range(T + 1))
    for j in range(T):
        ax = axes[j // cols][j % cols]
        for i, name in enumerate(names):
            m = res["methods"][name]
            ax.plot(xs, [m["zero_shot"][j]] + [m["R"][t][j] for t in range(T)], color=cmap(i % 10), lw=1.4,
                    label=name, ls="--" if name == "zero-shot" else "-")
        ax.axvline(j + 1, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{j + 1}. {_short(tasks[j])}", fontsize=8)
        _sequence_axis(ax, T, j % cols == 0)
    title = "each task's accuracy after each task (dotted: trained here)"
    return _save_grid(plt, fig, axes, T, res, title, 0.07, path, dpi)


def plot_heatmaps(res: dict, path: str, dpi: int = 90) -> str:
    """Each method's R as a heatmap (rows: after task t; columns: task j), annotated."""
    plt = _plt()
    names = list(res["methods"])
    cols = min(len(names), 5)
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.8 * cols, 2.7 * nrows + 0.3), squeeze=False)
    im = None
    for i, name in enumerate(names):
        ax = axes[i // cols][i % cols]
        R = res["methods"][name]["R"]
        T = len(R)
        im = ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
        for t in range(T):
            for j in range(T):
                ax.text(j, t, f"{R[t][j]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if R[t][j] < 60 else "black")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(T))
        ax.set_yticks(range(T))
        ax.set_xticklabels([str(j + 1) for j in range(T)], fontsize=7)
        ax.set_yticklabels([str(t + 1) for t in range(T)], fontsize=7)
        ax.set_xlabel("task evaluated", fontsize=7)
        if i % cols == 0:
            ax.set_ylabel("after training on task", fontsize=7)
    for k in range(len(names), nrows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(_suptitle(res, "accuracy matrix R (%)"), fontsize=9)
    fig.tight_layout(rect=(0, 0.02, 0.93, 0.94))
    if im is not None:
        cax = fig.add_axes((0.945, 0.15, 0.012, 0.7))
        fig.colorbar(im, cax=cax).ax.tick_params(labelsize=7)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def render(res: dict, out_dir: str, *, plots: bool = True) -> list[str]:
    """Write results.csv, results.md and the plots into ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    out = []
    for name, text in (("results.csv", to_csv(res)), ("results.md", markdown(res))):
        p = os.path.join(out_dir, name)
        atomic_write_bytes(p, text.encode())
        out.append(p)
    if plots:
        for name, fn in (("curves.png", plot_curves), ("curves_by_task.png", plot_curves_by_task),
                         ("heatmaps.png", plot_heatmaps)):
            final = os.path.join(out_dir, name)
            tmp = os.path.join(out_dir, f".tmp-{os.getpid()}-{name}")
            if fn(res, tmp):
                os.replace(tmp, final)
                out.append(final)
    return out


__all__ = ["FORMAT", "METRICS", "load", "combine", "validate", "rows", "format_table", "markdown", "to_csv",
           "plot_curves", "plot_curves_by_task", "plot_heatmaps", "render", "write_json"]
