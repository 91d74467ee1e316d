"""mgtil.report: the paper-style tables (markdown, LaTeX) and the plots, at
1, 3 and 9 methods: nothing clipped, the colour-blind-safe palette, heatmap
text contrast, --format / --dpi."""
from __future__ import annotations

import random

import matplotlib
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from mgcl.cl.metrics import summarize
from mgcl.cl.results import method_entry, results
from mgcl.mgtil import report

matplotlib.use("Agg")
NAMES = ["zero-shot", "finetune", "l2", "zscl", "primed", "ewc", "wise-ft", "icarl", "a-long-method-name"]
WORKED = [[80, 45, 35], [70, 85, 32], [60, 75, 90]]


def fake(n: int, T: int, bench: str = "medxtreme-order1", kind: str = "demo", seed: int = 0) -> dict:
    rng = random.Random(seed)
    ms = {}
    for name in NAMES[:n]:
        z = [rng.uniform(20, 60) for _ in range(T)]
        R = [[min(100.0, z[j] + (40 if j == t else 25 - 3 * (t - j) if j < t else rng.uniform(-5, 5)))
              for j in range(T)] for t in range(T)]
        ms[name] = method_entry(R, z, [[rng.uniform(50, 99) for _ in range(T)] for _ in range(T)], z)
    return results(kind, ms, tasks=[f"synth-dataset-with-a-long-name-{j + 1}" for j in range(T)], benchmark=bench,
                   synthetic=True)


# ---- tables ------------------------------------------------------------------------------------

def test_transfer_table_per_task_and_its_mean_is_the_summary():
    res = results("run", {"m": method_entry(WORKED, [10, 20, 30], [], [])}, tasks=["a", "b", "c"])
    (g,) = report.transfer_tables(res)
    row = g["methods"]["m"]
    assert row["transfer"] == [None, 45, (35 + 32) / 2, pytest.approx(39.25)]
    assert row["avg"][:3] == [70, pytest.approx(205 / 3), pytest.approx(157 / 3)]
    assert row["last"] == [60, 75, 90, 75]
    want = summarize(WORKED)
    assert row["avg"][-1] == pytest.approx(want["avg"]) and row["transfer"][-1] == pytest.approx(want["transfer"])


def test_sequence_table_joins_one_method_over_its_sequences():
    a, b = fake(2, 3, "medxtreme-order1"), fake(2, 3, "medxtreme-order2", seed=1)
    res = report.combine([a, b], ["o1", "o2"])
    st = report.sequence_table(res)
    assert st["sequences"] == ["medxtreme-order1", "medxtreme-order2"]
    assert list(st["methods"]) == ["zero-shot", "finetune"]
    cell = st["methods"]["finetune"]["medxtreme-order2"]
    m = b["methods"]["finetune"]
    assert (cell["acc"], cell["auc"], cell["bwt"]) == (m["last"], m["auc"], m["bwt"])


def test_markdown_and_latex_hold_the_paper_tables_with_the_best_in_bold():
    res = fake(3, 4)
    md, tex = report.markdown(res), report.latex(res)
    assert "Transfer / Avg / Last per task" in md and "ACC / AUC / BWT per MGTIL sequence" in md
    best = max(res["methods"][n]["last"] for n in ("finetune", "l2"))
    assert f"**{best:.1f}**" in md
    assert tex.count("\\begin{tabular}") == tex.count("\\end{tabular}") == 2
    assert "\\multicolumn{3}{c}{medxtreme-order1}" in tex and "\\textbf{" in tex
    for block in tex.split("\\begin{tabular}")[1:]:
        spec = block[1:block.index("}")]
        body = block[block.index("\\midrule"):block.index("\\bottomrule")]
        rows = [r for r in body.split("\\\\") if "&" in r]
        assert rows and all(r.count("&") == len(spec) - 1 for r in rows), "every row fills every column"


def test_a_trainer_run_is_titled_by_the_run_not_a_placeholder():
    res = fake(1, 3, bench="", kind="trainer")
    one = report.combine([res], ["my-run"])
    t = report.title(one)
    assert "results: benchmark" not in t and "my-run" in t and "zero-shot" in t and "3 task" in t
    assert report.format_table(one).splitlines()[0] == t


# ---- plots ---------------------------------------------------------------------------------

def _capture(monkeypatch):
    """The figures the plot functions close (to inspect what they saved)."""
    import matplotlib.pyplot as plt

    figs, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig) or close(fig))
    return figs


def _inside(inner, outer, tol=1.0) -> bool:
    return (inner.x0 >= outer.x0 - tol and inner.y0 >= outer.y0 - tol and inner.x1 <= outer.x1 + tol
            and inner.y1 <= outer.y1 + tol)


@pytest.mark.parametrize("n", [1, 3, 9])
def test_plots_are_never_clipped(n, tmp_path, monkeypatch):
    res = fake(n, 5)
    figs = _capture(monkeypatch)
    files = report.render(res, str(tmp_path), dpi=60)
    pngs = [f for f in files if f.endswith(".png")]
    assert len(pngs) == 3 and len(figs) == 3
    for path, fig in zip(pngs, figs):
        renderer = FigureCanvasAgg(fig).get_renderer()
        saved = fig.get_tightbbox(renderer)  # inches: every artist of the figure
        w, h = Image.open(path).size
        assert w >= saved.width * 60 - 2 and h >= saved.height * 60 - 2, f"{path}: the saved image cuts the figure"
        texts = [fig._suptitle] + list(fig.legends)
        for ax in fig.axes:
            texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
        for t in texts:
            if t is not None and (not hasattr(t, "get_text") or t.get_text()):
                box = t.get_window_extent(renderer).transformed(fig.dpi_scale_trans.inverted())
                assert _inside(box, saved), (path, getattr(t, "get_text", lambda: "legend")())


def test_palette_and_heatmap_text_contrast(tmp_path, monkeypatch):
    from matplotlib.colors import to_rgb

    res = fake(9, 4)
    figs = _capture(monkeypatch)
    report.plot_curves_by_task(res, str(tmp_path / "c.png"), dpi=40)
    report.plot_heatmaps(res, str(tmp_path / "h.png"), dpi=40)
    lines = [ln for ax in figs[0].axes for ln in ax.get_lines() if ln.get_label() in NAMES]
    assert {to_rgb(ln.get_color()) for ln in lines} <= {to_rgb(c) for c in report.PALETTE}
    assert len({(ln.get_color(), ln.get_linestyle()) for ln in lines if ln.axes is figs[0].axes[0]}) == 9
    heat = figs[1]
    n = 0
    for ax in heat.axes:
        if not ax.images:
            continue
        im = ax.images[0]
        for t in ax.texts:
            j, i = t.get_position()
            bg = im.cmap(im.norm(im.get_array()[int(i)][int(j)]))
            assert report.contrast(bg, to_rgb(t.get_color())) >= 4.5, t.get_text()
            n += 1
    assert n == 9 * 16
    cbar = [ax for ax in heat.axes if ax.get_ylabel() == "accuracy (%)"]
    assert cbar, "the colorbar is labelled"


def test_format_and_dpi(tmp_path):
    res = fake(2, 3)
    svg = report.render(res, str(tmp_path / "s"), fmt="svg")
    assert [f for f in svg if f.endswith(".svg")]
    assert (tmp_path / "s" / "curves.svg").read_text()[:200].lstrip().startswith("<?xml")
    report.render(res, str(tmp_path / "p"), fmt="pdf")
    assert (tmp_path / "p" / "heatmaps.pdf").read_bytes()[:5] == b"%PDF-"
    report.render(res, str(tmp_path / "a"), dpi=50)
    report.render(res, str(tmp_path / "b"), dpi=100)
    wa, _ = Image.open(tmp_path / "a" / "curves.png").size
    wb, _ = Image.open(tmp_path / "b" / "curves.png").size
    assert 1.9 <= wb / wa <= 2.1, (wa, wb)
    assert (tmp_path / "a" / "results.tex").is_file()
    with pytest.raises(ValueError, match="png, pdf, svg"):
        report.render(res, str(tmp_path / "x"), fmt="jpg")
    with pytest.raises(ValueError, match="dpi"):
        report.render(res, str(tmp_path / "x"), dpi=0)


def test_trainer_runs_of_the_same_tasks_share_one_sequence():
    """Runs that name no benchmark (library trainer runs, one method each) are on the
    sequence of their task list: one ACC / AUC / BWT group, not one per run."""
    a, b, c = (fake(1, 3, bench="", kind="trainer", seed=s) for s in range(3))
    b["methods"] = {"l2": b["methods"].pop("zero-shot")}
    c["tasks"] = ["other-1", "other-2", "other-3"]
    c["methods"] = {"ewc": c["methods"].pop("zero-shot")}
    res = report.combine([a, b, c], ["run-a", "run-b", "run-c"])
    st = report.sequence_table(res)
    same = "dataset-with-a-long-name-1 ..."  # whole task names while they fit
    assert st["sequences"] == [same, "other-1, other-2, other-3"]
    assert set(st["methods"]["zero-shot"]) == set(st["methods"]["l2"]) == {same}
    assert st["methods"]["l2"][same]["acc"] == b["methods"]["l2"]["last"]
    tex = report.latex(res)
    assert f"\\multicolumn{{3}}{{c}}{{{same}}}" in tex and "run-b" not in tex.split("\\caption{ACC")[1]
    twin = fake(1, 3, bench="", kind="trainer")
    twin["tasks"] = twin["tasks"][:1] + [t + "-x" for t in twin["tasks"][1:]]  # the same shortened name
    st = report.sequence_table(report.combine([a, twin], ["p", "q"]))
    assert len(st["sequences"]) == 2 and len(set(st["sequences"])) == 2
