"""Bench: compound-figure splitting (``mgcl.retrieval.cleanse``) on a
generated set of SYNTHETIC compound figures.

Each figure is a mosaic of 1-6 panels rendered by the synthetic benchmark
(``mgtil.synth.render``: x-ray, histology, fundus, dermoscopy, endoscopy,
cytology, CT, ultrasound), each resized to its own size (48-150 pixels a
side), in a layout (one row or column, grids, rows of unequal length, a tall
panel beside two stacked ones), with gutters 1-16 pixels wide in white,
black, grey or a random colour, or no gutters at all (panels abutting, about
one figure in six), a margin, and stored as PNG or JPEG (quality 90).
Captions describe each panel with the synthetic corpus's vocabulary, under
one of the marker styles of PubMed captions ("(a) ...", "(A) ...", "A. ...",
"A, ...", "a) ...", ranges "(b-d)" / "(b–d)", "(i) ...", markers that close
their text "... (A) and ... (B) of ...", "Left: ... Right: ...", "Top left,
...") or with no markers; an optional lead ("Figure 3. Imaging of ...").

Measured, per subset (all figures; with gutters; without; of one panel):
- panel detection (``GutterSplitter`` through ``find_panels``) against the
  true panel boxes: precision and recall at IoU 0.5 (one-to-one matching,
  best IoU first), and the share of one-panel figures split into two or more;
- caption assignment: the share of true panels of marked captions whose
  matched box gets the expected sub-caption (``assign_subcaptions``), and the
  same with the true boxes given (the caption logic alone);
- throughput: figures per second through decode, panel detection and
  caption assignment (one thread, the encoded figures in memory; median of
  ``repeats`` passes).
"""
from __future__ import annotations

import io
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from . import harness

GUTTERS = (1, 2, 3, 4, 6, 8, 12, 16)
COLOURS = {"white": (255, 255, 255), "black": (0, 0, 0), "light grey": (230, 230, 230), "grey": (128, 128, 128)}
STYLES = ("paren_lower", "paren_upper", "bare_dot", "bare_comma", "close_paren", "range", "roman", "closing",
          "position", "none")
LEADS = ("Imaging findings in a {age}-year-old {sex}.", "Representative images of case {case}.",
         "Multimodal imaging of the {site}.", "Findings at presentation.")


@dataclass
class Figure:
    """One generated compound figure: ``boxes`` the true panels in reading
    order, ``expected`` each panel's sub-caption (the whole caption when the
    caption has no markers), ``marked`` whether it has markers."""

    data: bytes
    fmt: str
    size: tuple[int, int]
    boxes: list
    caption: str
    expected: list
    style: str
    gutter: int
    colour: str
    marked: bool
    layout: str = ""
    meta: dict = field(default_factory=dict)


def _layout(rng, n: int) -> tuple[str, list[int]]:
    """(name, panels per row); "L" is a tall panel beside two stacked ones."""
    options = {1: [[1]], 2: [[2], [1, 1]], 3: [[3], [1, 1, 1], [2, 1], [1, 2], "L"], 4: [[2, 2], [4], [1, 3]],
               5: [[2, 3], [3, 2]], 6: [[3, 3], [2, 2, 2], [3, 2, 1]]}[n]
    pick = options[int(rng.integers(len(options)))]
    return ("L", [1, 1, 1]) if pick == "L" else ("x".join(map(str, pick)), list(pick))


def _boxes(rng, layout: str, rows: list[int], g: int, m: int) -> tuple[list, int, int]:
    """True panel boxes in reading order and the figure size."""
    lo, hi = 48, 150
    if layout == "L":
        h = int(rng.integers(lo, hi // 2 + 30))
        wt, wr = int(rng.integers(lo, hi)), int(rng.integers(lo, hi))
        boxes = [(m, m, m + wt, m + 2 * h + g), (m + wt + g, m, m + wt + g + wr, m + h),
                 (m + wt + g, m + h + g, m + wt + g + wr, m + 2 * h + g)]
        return boxes, m + wt + g + wr + m, m + 2 * h + g + m
    heights = [int(rng.integers(lo, hi)) for _ in rows]
    widths = [[int(np.clip(h * rng.uniform(0.75, 1.4), lo, 1.4 * hi)) for _ in range(c)] for h, c in zip(heights, rows)]
    row_w = [sum(ws) + g * (len(ws) - 1) for ws in widths]
    W = max(row_w) + 2 * m
    boxes, y = [], m
    for h, ws, rw in zip(heights, widths, row_w):
        x = m + (W - 2 * m - rw) // 2  # rows centred
        for w in ws:
            boxes.append((x, y, x + w, y + h))
            x += w + g
        y += h + g
    return boxes, W, y - g + m


def _desc(rng, domain: str, finding: str) -> str:
    from ..mgtil.synth import DOMAINS  # noqa: PLC0415

    spec = DOMAINS[domain]
    phrases, sites = spec.findings[finding]
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    mod, site, find = pick(spec.modalities), pick(sites or spec.sites), pick(phrases)
    d = f"{mod} of the {site} with {find}" if rng.random() < 0.5 else f"{mod} showing {find}"
    if rng.random() < 0.25:
        d += f" ({pick(spec.details + ('arrow', 'arrowheads'))})"
    return d


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _roman(k: int) -> str:
    return ("i", "ii", "iii", "iv", "v", "vi")[k]


def _join(*parts: str) -> str:
    out = ""
    for p in parts:
        if p:
            out = p if not out else out + ("" if p[0] in ".,;:" else " ") + p
    return out


def _caption(rng, descs: list[str], boxes: list, layout: str, rows: list[int]):
    """(caption, expected sub-captions, style, marked)."""
    n = len(descs)
    lead = ""
    r = rng.random()
    if r < 0.3:
        lead = f"Figure {int(rng.integers(1, 9))}."
    if r < 0.15 or 0.3 <= r < 0.6:
        lead = _join(lead, LEADS[int(rng.integers(len(LEADS)))].format(
            age=int(rng.integers(18, 90)), sex=("man", "woman")[int(rng.integers(2))],
            case=int(rng.integers(1, 20)), site=("chest", "abdomen", "retina", "colon")[int(rng.integers(4))]))
    if n == 1:
        cap = _join(lead, _cap(descs[0]) + ".")
        return cap, [cap], "none", False
    styles = [s for s in STYLES if (s != "range" or n >= 3) and (s != "position" or layout in ("2", "1x1", "2x2"))]
    style = styles[int(rng.integers(len(styles)))]
    upper = rng.random() < 0.5
    if style == "none":
        cap = _join(lead, _cap(", ".join(descs[:-1]) + " and " + descs[-1]) + ".")
        return cap, [cap] * n, style, False
    if style == "closing":
        tail = "" if rng.random() < 0.5 else f"in a {int(rng.integers(18, 90))}-year-old patient"
        marks = [f"({chr(65 + k) if upper else chr(97 + k)})" for k in range(n)]
        body = ", ".join(f"{d} {mk}" for d, mk in zip(descs[:-1], marks[:-1])) + f" and {descs[-1]} {marks[-1]}"
        cap = _join(lead, _cap(body), tail, ".") if tail else _join(lead, _cap(body), ".")
        return cap, [_join(lead, _cap(d) if k == 0 else d, tail, ".") for k, d in enumerate(descs)], style, True
    if style == "position":
        if n == 4:
            names = ["Top left", "Top right", "Bottom left", "Bottom right"]
        elif layout == "2":
            names = ["Left", "Right"] if rng.random() < 0.6 else ["Left panel", "Right panel"]
        else:
            names = ["Top", "Bottom"] if rng.random() < 0.5 else ["Upper panel", "Lower panel"]
        sep = ":" if rng.random() < 0.5 else ","
        segs = [_cap(d) + "." for d in descs]
        cap = _join(lead, *[f"{nm}{sep} {s}" for nm, s in zip(names, segs)])
        return cap, [_join(lead, s) for s in segs], style, True
    # markers that open their text; "range" groups consecutive panels under one marker
    groups = [[k] for k in range(n)]
    if style == "range":
        a = int(rng.integers(1, n - 1))
        b = int(rng.integers(a + 2, n + 1))
        groups = [[k] for k in range(a)] + [list(range(a, b))] + [[k] for k in range(b, n)]
    segs, expected = [], [""] * n
    for grp in groups:
        k0, k1 = grp[0], grp[-1]
        if style == "roman":
            label = _roman(k0) if k0 == k1 else f"{_roman(k0)}-{_roman(k1)}"
        else:
            a, b = (chr(65 + k0), chr(65 + k1)) if upper else (chr(97 + k0), chr(97 + k1))
            dash = "\u2013" if rng.random() < 0.5 else "-"
            label = a if k0 == k1 else f"{a}{dash}{b}"
        text = _cap(descs[k0]) + "."
        if style == "bare_comma":
            text = descs[k0] + "."
        mark = {"paren_lower": f"({label.lower()})", "paren_upper": f"({label.upper()})", "range": f"({label})",
                "roman": f"({label})", "bare_dot": f"{label.upper()}.", "bare_comma": f"{label.upper()},",
                "close_paren": f"{label})"}[style]
        segs.append(f"{mark} {text}")
        for k in grp:
            expected[k] = _join(lead, text)
    return _join(lead, *segs), expected, style, True


def make_figures(n: int, seed: int = 0, *, no_gutter: float = 1 / 6, jpeg: float = 1 / 3) -> list[Figure]:
    """``n`` generated compound figures (module doc), deterministic for ``seed``."""
    from PIL import Image  # noqa: PLC0415

    from ..mgtil.synth import DOMAINS, render  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    domains = sorted(DOMAINS)
    out = []
    for i in range(n):
        npanels = int(rng.integers(1, 7))
        layout, rows = _layout(rng, npanels)
        gutter = 0 if rng.random() < no_gutter else int(GUTTERS[int(rng.integers(len(GUTTERS)))])
        margin = int(rng.integers(0, gutter + 1)) if gutter else 0
        cname = ([*COLOURS, "random"][int(rng.integers(len(COLOURS) + 1))]) if gutter else "none"
        colour = COLOURS.get(cname) or tuple(int(v) for v in rng.integers(0, 256, 3))
        boxes, W, H = _boxes(rng, layout, rows, gutter, margin)
        canvas = np.empty((H, W, 3), np.uint8)
        canvas[:] = colour if gutter else 255
        picks = [(domains[int(rng.integers(len(domains)))],) for _ in boxes]
        descs = []
        for k, (b, (dom,)) in enumerate(zip(boxes, picks)):
            keys = list(DOMAINS[dom].findings)
            fnd = keys[int(rng.integers(len(keys)))]
            tile = render(dom, [fnd], (seed, i, k))[0]
            w, h = b[2] - b[0], b[3] - b[1]
            canvas[b[1]:b[3], b[0]:b[2]] = np.asarray(Image.fromarray(tile).resize((w, h), Image.BILINEAR))
            descs.append(_desc(rng, dom, fnd))
        caption, expected, style, marked = _caption(rng, descs, boxes, layout, rows)
        fmt = "jpeg" if rng.random() < jpeg else "png"
        buf = io.BytesIO()
        Image.fromarray(canvas).save(buf, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
        out.append(Figure(buf.getvalue(), fmt, (W, H), boxes, caption, expected, style, gutter, cname, marked,
                          layout))
    return out


def match(pred: list, truth: list, threshold: float = 0.5) -> list[tuple[int, int]]:
    """One-to-one (pred, truth) index pairs with IoU >= threshold, best IoU first."""
    from ..retrieval.cleanse import iou  # noqa: PLC0415

    pairs = sorted(((iou(p, t), i, j) for i, p in enumerate(pred) for j, t in enumerate(truth)), reverse=True)
    used_p, used_t, out = set(), set(), []
    for v, i, j in pairs:
        if v >= threshold and i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            out.append((i, j))
    return out


def evaluate(figures: list[Figure], detector=None, progress: bool = False) -> dict:
    """Detection and caption-assignment counts per figure, and the rates per subset."""
    from PIL import Image  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from ..retrieval.cleanse import GutterSplitter, assign_subcaptions, find_panels  # noqa: PLC0415

    det = detector or GutterSplitter()
    rows = []
    for f in tqdm(figures, desc="cleanse: evaluating", unit="fig", disable=not progress):
        img = Image.open(io.BytesIO(f.data)).convert("RGB")
        pred = find_panels(img, det)
        pairs = match(pred, f.boxes)
        subs, _ = assign_subcaptions(f.caption, pred) if len(pred) >= 2 else ([f.caption] * len(pred), "")
        right = sum(1 for i, j in pairs if subs is not None and subs[i] == f.expected[j])
        truth_subs, _ = assign_subcaptions(f.caption, f.boxes)
        right_given = sum(1 for j in range(len(f.boxes)) if truth_subs is not None and truth_subs[j] == f.expected[j])
        rows.append({"tp": len(pairs), "fp": len(pred) - len(pairs), "fn": len(f.boxes) - len(pairs),
                     "panels": len(f.boxes), "gutter": f.gutter, "marked": f.marked, "style": f.style,
                     "caption_right": right, "caption_right_given_boxes": right_given})
    subsets = {"all": rows, "with gutters": [r for r in rows if r["gutter"]],
               "without gutters": [r for r in rows if not r["gutter"]],
               "one panel": [r for r in rows if r["panels"] == 1]}
    return {"figures": rows, "subsets": {k: _rates(v) for k, v in subsets.items()}}


def _rates(rows: list[dict]) -> dict:
    tp, fp, fn = (sum(r[k] for r in rows) for k in ("tp", "fp", "fn"))
    marked = [r for r in rows if r["marked"]]
    n_marked = sum(r["panels"] for r in marked)
    single = [r for r in rows if r["panels"] == 1]
    return {"figures": len(rows), "panels": sum(r["panels"] for r in rows),
            "single_split": sum(r["tp"] + r["fp"] >= 2 for r in single) / len(single) if single else None,
            "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
            "marked_figures": len(marked),
            "caption_accuracy": sum(r["caption_right"] for r in marked) / n_marked if n_marked else None,
            "caption_accuracy_given_boxes": (sum(r["caption_right_given_boxes"] for r in marked) / n_marked
                                             if n_marked else None)}


def throughput(figures: list[Figure], repeats: int, detector=None) -> dict:
    """Figures per second through decode, ``find_panels`` and ``assign_subcaptions``."""
    from PIL import Image  # noqa: PLC0415

    from ..retrieval.cleanse import GutterSplitter, assign_subcaptions, find_panels  # noqa: PLC0415

    det = detector or GutterSplitter()

    def one_pass():
        for f in figures:
            img = Image.open(io.BytesIO(f.data)).convert("RGB")
            boxes = find_panels(img, det)
            if len(boxes) >= 2:
                assign_subcaptions(f.caption, boxes)

    t = harness.time_fn(one_pass, repeats=max(1, repeats), warmup=1)
    pixels = sum(f.size[0] * f.size[1] for f in figures)
    return {"figures": len(figures), "seconds_per_pass": t, "figures_per_s": len(figures) / t["median"],
            "megapixels_per_s": pixels / t["median"] / 1e6}


def run(device: str = "cpu", scale: float = 1.0, repeats: int = 5, seed: int = 0) -> dict:
    """``600 * scale`` figures (at least 60). ``device`` is recorded only: the splitter runs on the CPU."""
    n = max(60, int(600 * scale))
    t0 = time.perf_counter()
    figures = make_figures(n, seed)
    gen_s = time.perf_counter() - t0
    ev = evaluate(figures, progress=True)
    by_style = {}
    for s in STYLES:
        rows = [r for r in ev["figures"] if r["style"] == s and r["panels"] >= 2]
        if rows:
            by_style[s] = {"figures": len(rows), **{k: v for k, v in _rates(rows).items()
                                                    if k.startswith("caption") or k in ("precision", "recall")}}
    from ..retrieval.cleanse import GutterSplitter  # noqa: PLC0415

    return {"bench": "cleanse", "machine": harness.machine(device),
            "config": {"scale": scale, "figures": n, "seed": seed, "repeats": repeats, "generate_seconds": gen_s,
                       "detector": GutterSplitter().name,
                       "jpeg_figures": sum(f.fmt == "jpeg" for f in figures),
                       "panels_per_figure": statistics.mean(len(f.boxes) for f in figures)},
            "subsets": ev["subsets"], "styles": by_style, "throughput": throughput(figures, repeats)}


def table(result: dict) -> str:
    cfg, tp = result["config"], result["throughput"]
    lines = [f"cleanse bench on {result['machine']['cpu']}: {cfg['figures']} generated compound figures (SYNTHETIC "
             f"panels, {cfg['panels_per_figure']:.1f} per figure, {cfg['jpeg_figures']} JPEG), {cfg['detector']}"]
    rows = [{"subset": k, **v} for k, v in result["subsets"].items()]
    lines.append(harness.format_table(rows, [("subset", "subset"), ("figures", "figures"), ("panels", "panels"),
                                             ("precision", "precision@0.5"), ("recall", "recall@0.5"),
                                             ("caption_accuracy", "caption acc."),
                                             ("caption_accuracy_given_boxes", "caption acc. (true boxes)"),
                                             ("single_split", "1-panel split")]))
    lines.append("marked-caption styles (figures of 2+ panels):")
    rows = [{"style": k, **v} for k, v in result["styles"].items()]
    lines.append(harness.format_table(rows, [("style", "style"), ("figures", "figures"), ("precision", "precision"),
                                             ("recall", "recall"), ("caption_accuracy", "caption acc."),
                                             ("caption_accuracy_given_boxes", "(true boxes)")]))
    lines.append(f"throughput: {tp['figures_per_s']:.1f} figures/s ({tp['megapixels_per_s']:.2f} Mpixel/s; decode + "
                 f"panels + sub-captions, one thread, median of {tp['seconds_per_pass']['n']} pass(es))")
    return "\n".join(lines)
