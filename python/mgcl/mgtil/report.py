"""Tables and plots of MGTIL runs (SPEC.md section 7): what ``mgcl demo``,
``mgcl run`` and ``mgcl report`` print and write.

Every results file has one schema (``mgcl.cl.results``), written by the
trainer, ``mgcl run`` and the demo alike. ``load`` reads one (a file, or a
directory holding ``results.json``); ``combine`` puts several side by side;
``render`` writes results.csv, results.md (the summary and the paper-style
tables: Transfer / Avg / Last per task, ACC / AUC / BWT per MGTIL sequence),
results.tex (those tables in LaTeX), curves.<fmt> (accuracy of each task
across the sequence, one panel per method), curves_by_task.<fmt> (one panel per
task, one line per method) and heatmaps.<fmt> (each R); fmt is png, pdf or
svg. Percentages throughout.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Optional, Sequence

from .._io import atomic_write_bytes, atomic_write_json, fsync_dir
from ..cl.results import FORMAT, METRICS, results, validate

SEQUENCE_COLUMNS = ("ACC", "AUC", "BWT")
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
    labels = list(labels) if labels is not None else [r.get("benchmark") or f"run{i}"
                                                      for i, r in enumerate(results_list)]
    if len(results_list) == 1:
        return {**results_list[0], "runs": results_list[0].get("runs") or labels[:1]}
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
            methods[key] = {**m, "name": name, "run": lab, "benchmark": r.get("benchmark", "")}
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


def run_name(res: dict) -> str:
    """What the results are of: the benchmark, else the run(s), method(s) and task count
    (a trainer's own results.json names no benchmark)."""
    if res.get("benchmark"):
        return res["benchmark"]
    runs = ", ".join(r for r in res.get("runs") or [] if r)
    T = len(next(iter(res["methods"].values()))["zero_shot"])
    return (f"{res.get('kind', 'run')} run{' ' + runs if runs else ''}: "
            f"{', '.join(res['methods'])} on {T} task(s)")


def title(res: dict) -> str:
    """The heading of the tables."""
    t = f"MGTIL results: {res['benchmark']}" if res.get("benchmark") else f"results of the {run_name(res)}"
    if res.get("synthetic"):
        t += f" -- {SYNTHETIC_NOTE}"
    return t


def format_table(res: dict) -> str:
    """The summary table as plain text (Transfer / Avg / Last / BWT / Forgetting / AUC)."""
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


def _per_task(R: list) -> dict:
    """Transfer / Avg / Last of each task j (SPEC.md section 7 before the mean over
    tasks), then that mean: the columns of the paper's Transfer / Avg / Last table."""
    T = len(R)
    cols = {"transfer": [None] + [sum(R[t][j] for t in range(j)) / j for j in range(1, T)],
            "avg": [sum(R[t][j] for t in range(T)) / T for j in range(T)],
            "last": list(R[T - 1])}
    for k, v in cols.items():
        known = [x for x in v if x is not None]
        v.append(sum(known) / len(known) if known else None)
    return cols


def transfer_tables(res: dict) -> list[dict]:
    """The paper's Transfer / Avg / Last table, one per task list (methods that ran
    the same tasks): ``{"tasks", "methods": {name: {"transfer"|"avg"|"last": T+1 values}}}``,
    the last value of each row being the mean over tasks (the summary metric)."""
    groups: dict[tuple, dict] = {}
    for name, m in res["methods"].items():
        tasks = tuple(_tasks(res, name))
        groups.setdefault(tasks, {})[name] = _per_task(m["R"])
    return [{"tasks": list(t), "methods": ms} for t, ms in groups.items()]


def sequence_table(res: dict) -> dict:
    """ACC (= Last) / AUC / BWT of each method on each MGTIL sequence (benchmark):
    ``{"sequences": [names], "methods": {name: {sequence: {"acc", "auc", "bwt"}}}}``.
    A method that ran several sequences (``mgcl report`` of one run per order) is one row.
    A run that names no benchmark (a trainer run of the library) is on the sequence of
    its task list: runs of the same tasks share one column group."""
    seqs: list[str] = []
    table: dict[str, dict] = {}
    named: dict[tuple, str] = {}  # task list -> its sequence name, when no benchmark names it
    for key, m in res["methods"].items():
        seq = m.get("benchmark") if "run" in m else res.get("benchmark")
        if not seq:
            tasks = tuple(_tasks(res, key))
            if tasks not in named:
                name = _task_sequence(tasks)
                named[tasks] = name if name not in named.values() else f"{name} #{len(named) + 1}"
            seq = named[tasks]
        base = m.get("name", key)
        row = base if seq not in table.get(base, {}) else key
        table.setdefault(row, {})[seq] = {"acc": m.get("last"), "auc": m.get("auc"), "bwt": m.get("bwt")}
        if seq not in seqs:
            seqs.append(seq)
    return {"sequences": seqs, "methods": table}


def _task_sequence(tasks: list) -> str:
    """The name of a sequence that is no benchmark: its tasks in order, whole names
    while they fit in about 48 characters, then " ..."."""
    names = [_short(t) for t in tasks]
    k = 1
    while k < len(names) and len(", ".join(names[:k + 1])) <= 48:
        k += 1
    return ", ".join(names[:k]) + (" ..." if k < len(names) else "")


def _best(values: list, names: list) -> Optional[float]:
    """The best value of a column (higher is better for every metric here), the
    zero-shot baseline left out as in the paper; None when no method has one."""
    known = [v for v, n in zip(values, names) if v is not None and n != "zero-shot"]
    return max(known) if known else None


def _cells(values: list, names: list, signed: bool, bold) -> list[str]:
    best = _best(values, names)
    return [bold(_fmt(v, signed)) if v is not None and best is not None and round(v, 1) == round(best, 1)
            and n != "zero-shot" else _fmt(v, signed) for v, n in zip(values, names)]


def _paper_rows(res: dict, bold) -> list[tuple[str, list[str], list[list[str]]]]:
    """(caption, header, rows) of every paper table, cells formatted (``bold`` marks the best)."""
    out = []
    for g in transfer_tables(res):
        names = list(g["methods"])
        header = ["metric", "method", *[_short(t) for t in g["tasks"]], "mean"]
        body = []
        for k in ("transfer", "avg", "last"):
            cols = list(zip(*[g["methods"][n][k] for n in names]))
            cells = [_cells(list(c), names, False, bold) for c in cols]
            for i, n in enumerate(names):
                body.append([HEADERS[k] if i == 0 else "", n, *[c[i] for c in cells]])
        out.append((f"Transfer / Avg / Last per task (%), {len(g['tasks'])} tasks", header, body))
    st = sequence_table(res)
    names = list(st["methods"])
    header = ["method"] + [f"{s} {h}" for s in st["sequences"] for h in SEQUENCE_COLUMNS]
    cols = []
    for s in st["sequences"]:
        for k in ("acc", "auc", "bwt"):
            vals = [st["methods"][n].get(s, {}).get(k) for n in names]
            cols.append(_cells(vals, names, k == "bwt", bold))
    out.append(("ACC / AUC / BWT per MGTIL sequence (%)", header,
                [[n, *[c[i] for c in cols]] for i, n in enumerate(names)]))
    return out


def markdown(res: dict) -> str:
    """The summary table, then the paper-style tables (best method in bold)."""
    lines = [f"**{title(res)}**\n"]
    lines.append("| method | " + " | ".join(HEADERS[k] for k in METRICS) + " |")
    lines.append("|---|" + "---:|" * len(METRICS))
    for r in rows(res):
        lines.append(f"| {r['method']} | " + " | ".join(_fmt(r[k], k == "bwt") for k in METRICS) + " |")
    for caption, header, body in _paper_rows(res, lambda s: f"**{s}**"):
        lines += ["", f"*{caption}*", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join("---" if h in ("metric", "method") else "---:" for h in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(s: str) -> str:
    return "".join(_TEX.get(c, c) for c in s)


def latex(res: dict) -> str:
    """The paper-style tables as LaTeX (booktabs; best method in bold)."""
    out = [f"% {title(res)}", "% needs \\usepackage{booktabs}"]
    for caption, header, body in _paper_rows(res, lambda s: f"\\textbf{{{s}}}"):
        spec = "".join("l" if h in ("metric", "method") else "r" for h in header)
        out += ["\\begin{table}[t]", "\\centering", f"\\caption{{{_tex(caption)}}}", f"\\begin{{tabular}}{{{spec}}}",
                "\\toprule"]
        if header[0] == "method":  # the sequence table: one group of ACC / AUC / BWT per sequence
            n = len(SEQUENCE_COLUMNS)
            seqs = [h.rsplit(" ", 1)[0] for h in header[1::n]]
            out.append(" & " + " & ".join(f"\\multicolumn{{{n}}}{{c}}{{{_tex(q)}}}" for q in seqs) + " \\\\")
            out.append("".join(f"\\cmidrule(lr){{{2 + n * i}-{1 + n * (i + 1)}}}" for i in range(len(seqs))))
            header = ["method"] + [h.rsplit(" ", 1)[1] for h in header[1:]]
        out += [" & ".join(_tex(h) for h in header) + " \\\\", "\\midrule"]
        for i, r in enumerate(body):
            if header[0] == "metric" and i and r[0]:
                out.append("\\midrule")
            out.append(" & ".join(c if c.startswith("\\textbf") else _tex(c) for c in r) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)


def to_csv(res: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["benchmark", "synthetic", "method", *METRICS])
    for name, m in res["methods"].items():
        w.writerow([m.get("benchmark", res.get("benchmark", "")), bool(res.get("synthetic")), name,
                    *("" if m.get(k) is None else f"{m[k]:.4f}" for k in METRICS)])
    return buf.getvalue()


# ---- plots ----------------------------------------------------------------------------------
# Every figure uses constrained layout and is saved with a tight bounding box, so a
# title, legend or colorbar label is never cut, whatever the number of panels.

FORMATS = ("png", "pdf", "svg")
DPI = 150
# Okabe & Ito's palette, safe for the common colour-vision deficiencies (yellow
# last: it is faint on white). Past 8 lines the dash pattern and marker change too.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
HEATMAP_CMAP = "cividis"  # perceptually uniform and colour-blind safe


def luminance(rgb) -> float:
    """WCAG relative luminance of an sRGB colour (components 0..1)."""
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a, b) -> float:
    """WCAG contrast ratio of two colours (1 to 21; 4.5 is AA for normal text)."""
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_colour(background) -> str:
    """Black or white, whichever contrasts more with ``background`` (never below 4.58:1)."""
    return "black" if contrast(background, (0, 0, 0)) >= contrast(background, (1, 1, 1)) else "white"


def _style(i: int) -> dict:
    return {"color": PALETTE[i % len(PALETTE)], "ls": ("-", "--", "-.", ":")[(i // len(PALETTE)) % 4],
            "marker": "o^sDv<>p"[(i // len(PALETTE)) % 8]}


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


def _grid(plt, n: int, max_cols: int, panel: tuple[float, float], sharey: bool = False):
    """A figure of ``n`` panels (unused ones blanked), at least wide enough for a title."""
    cols = max(1, min(n, max_cols))
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(max(panel[0] * cols, 5.5), panel[1] * nrows + 0.8),
                             sharey=sharey, squeeze=False, layout="constrained")
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n], cols


def _finish(plt, fig, res: dict, what: str, path: str, dpi: int, legend: bool = True) -> str:
    import textwrap  # noqa: PLC0415

    if legend:
        handles, labels = fig.axes[0].get_legend_handles_labels()
        ncol = max(1, min(len(labels), int(fig.get_figwidth() / 1.7)))
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)
    text = f"{what}: {run_name(res)}" + ("  [SYNTHETIC data]" if res.get("synthetic") else "")
    fig.suptitle(textwrap.fill(text, width=max(40, int(fig.get_figwidth() * 13)), break_on_hyphens=False),
                 fontsize=9)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.1,
                format=os.path.splitext(path)[1].lstrip(".") or "png")
    plt.close(fig)
    return path


def _sequence_axis(ax, T: int, first_column: bool) -> None:
    """x axis: zero-shot, then after each of the T tasks; y: accuracy (labelled in the first column)."""
    ax.set_xticks(list(range(T + 1)))
    ax.set_xticklabels(["zs"] + [str(t + 1) for t in range(T)], fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(alpha=0.3)
    if first_column:
        ax.set_ylabel("accuracy (%)", fontsize=9)


def plot_curves(res: dict, path: str, dpi: int = DPI) -> str:
    """One panel per method: the accuracy of every task (one line each) at every
    point of the sequence (zero-shot, then after each task); the task's own
    training step is marked. Rising into the diagonal and falling after it
    draws the mirrored Z of forgetting."""
    plt = _plt()
    names = list(res["methods"])
    fig, axes, cols = _grid(plt, len(names), 4, (3.3, 2.8), sharey=True)
    for i, (ax, name) in enumerate(zip(axes, names)):
        m = res["methods"][name]
        tasks, R, z = _tasks(res, name), m["R"], m["zero_shot"]
        T = len(z)
        for j in range(T):
            st = _style(j)
            ax.plot(range(T + 1), [z[j]] + [R[t][j] for t in range(T)], color=st["color"], ls=st["ls"], lw=1.5,
                    label=_short(tasks[j]))
            ax.plot([j + 1], [R[j][j]], st["marker"], color=st["color"], ms=4)
        ax.set_title(name, fontsize=9)
        _sequence_axis(ax, T, i % cols == 0)
        ax.set_xlabel("after task", fontsize=9)
    return _finish(plt, fig, res, "accuracy of each task across the sequence (marker: trained here)", path, dpi)


def plot_curves_by_task(res: dict, path: str, dpi: int = DPI) -> Optional[str]:
    """One panel per task, one line per method (only when every method ran the same tasks)."""
    tasks = res.get("tasks")
    if not tasks:
        return None
    plt = _plt()
    names = list(res["methods"])
    T = len(tasks)
    fig, axes, cols = _grid(plt, T, 3, (3.3, 2.6), sharey=True)
    for j, ax in enumerate(axes):
        for i, name in enumerate(names):
            m = res["methods"][name]
            st = _style(i)
            ax.plot(range(T + 1), [m["zero_shot"][j]] + [m["R"][t][j] for t in range(T)], color=st["color"],
                    lw=1.5, label=name, ls=":" if name == "zero-shot" else st["ls"])
        ax.axvline(j + 1, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{j + 1}. {_short(tasks[j])}", fontsize=9)
        _sequence_axis(ax, T, j % cols == 0)
    return _finish(plt, fig, res, "each task's accuracy after each task (dotted line: trained here)", path, dpi)


def plot_heatmaps(res: dict, path: str, dpi: int = DPI) -> str:
    """Each method's R as a heatmap (rows: after task t; columns: task j), every
    cell annotated in black or white, whichever contrasts more with its colour."""
    plt = _plt()
    from matplotlib.colors import Normalize  # noqa: PLC0415

    names = list(res["methods"])
    T = max(len(res["methods"][n]["R"]) for n in names)
    side = max(2.6, 0.34 * T + 1.0)
    fig, axes, cols = _grid(plt, len(names), 4, (side + 0.2, side))
    cmap, norm = plt.get_cmap(HEATMAP_CMAP), Normalize(0, 100)
    size = max(6.0, min(9.0, 26.0 / max(T, 1) + 4.0))
    im = None
    for i, (ax, name) in enumerate(zip(axes, names)):
        R = res["methods"][name]["R"]
        T = len(R)
        im = ax.imshow(R, cmap=cmap, norm=norm)
        for t in range(T):
            for j in range(T):
                ax.text(j, t, f"{R[t][j]:.0f}", ha="center", va="center", fontsize=size,
                        color=text_colour(cmap(norm(R[t][j]))))
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(T), [str(j + 1) for j in range(T)], fontsize=8)
        ax.set_yticks(range(T), [str(t + 1) for t in range(T)], fontsize=8)
        ax.set_xlabel("task evaluated", fontsize=8)
        if i % cols == 0:
            ax.set_ylabel("after training on task", fontsize=8)
    cb = fig.colorbar(im, ax=axes, shrink=0.85, aspect=25)
    cb.set_label("accuracy (%)", fontsize=8)
    cb.ax.tick_params(labelsize=8)
    return _finish(plt, fig, res, "accuracy matrix R (%)", path, dpi, legend=False)


PLOTS = (("curves", plot_curves), ("curves_by_task", plot_curves_by_task), ("heatmaps", plot_heatmaps))


def render(res: dict, out_dir: str, *, plots: bool = True, fmt: str = "png", dpi: int = DPI) -> list[str]:
    """Write results.csv, results.md, results.tex and the plots (``fmt``: png, pdf
    or svg; ``dpi`` for png) into ``out_dir``; returns the paths."""
    if fmt not in FORMATS:
        raise ValueError(f"plot format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if isinstance(dpi, bool) or not isinstance(dpi, int) or not 10 <= dpi <= 1200:
        raise ValueError(f"dpi must be an integer from 10 to 1200, got {dpi!r}")
    os.makedirs(out_dir, exist_ok=True)
    out = []
    for name, text in (("results.csv", to_csv(res)), ("results.md", markdown(res)), ("results.tex", latex(res))):
        p = os.path.join(out_dir, name)
        atomic_write_bytes(p, text.encode())
        out.append(p)
    if plots:
        for stem, fn in PLOTS:
            final = os.path.join(out_dir, f"{stem}.{fmt}")
            tmp = os.path.join(out_dir, f".tmp-{os.getpid()}-{stem}.{fmt}")
            if fn(res, tmp, dpi):  # (matplotlib picks the format from the name: not _io.atomic_write's)
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, final)
                fsync_dir(out_dir)
                out.append(final)
    return out


__all__ = ["FORMAT", "METRICS", "FORMATS", "load", "combine", "validate", "rows", "title", "format_table",
           "transfer_tables", "sequence_table", "markdown", "latex", "to_csv", "plot_curves", "plot_curves_by_task",
           "plot_heatmaps", "render", "run_name", "write_json"]
