"""Corpus cleansing: compound figures split into panels, their captions into
sub-captions, so that a bank entry pairs one panel with the text about it.

Panels. A detector is any callable ``detector(image) -> boxes``: ``image`` an
RGB ``PIL.Image.Image``, boxes ``(x0, y0, x1, y1)`` in pixels (a sequence of
4-sequences or an [n, 4] array / tensor; a detector that scores its boxes
returns them best first). ``find_panels`` clips and rounds them, drops
duplicates and containers, and sorts them into reading order.
- ``GutterSplitter`` (the default, no weights): recursive XY-cuts along
  gutters, i.e. runs of near-uniform rows or columns (any colour: white,
  black, grey, tinted) crossing the whole region being cut. Each region is
  first trimmed of its uniform margins; of the two directions the one with
  the widest gutter is cut; pieces smaller than the minimum panel side or
  thinner than the aspect limit (labels, titles, colour bars) are dropped; a
  cut needs two pieces left (a cut leaving one only trims the strips off it);
  each piece is cut again the same way. Abutting panels without a gutter are
  not separated.
- ``TorchvisionDetector``: a torchvision detection model (Faster R-CNN,
  RetinaNet, FCOS, SSD, ...) loaded from a local safetensors checkpoint
  (``save_detector`` writes one, with the architecture in its header).

Sub-captions. ``split_caption`` finds panel markers: letters with or without
parentheses ("(a)", "(A)", "a)", "A.", "A,", "A:"), lists and ranges
("(a, b)", "(b-d)", "(b–d)", "(A and B)", "Panels B-D:"), roman numerals
("(i)", "(ii)", "iii)"), and position phrases ("Left:", "(right)", "Top
left,", "Upper panel:"). Bare markers count only at the start of a sentence;
letters must run a, b, c, ... from the first marker (one case per caption);
a marker that only repeats earlier letters inside a sentence ("compared with
(a)") is text. Markers usually open their text ("(A) Chest x-ray. (B) CT.");
when they close it ("Chest x-ray (A) and CT (B) of a patient"), the text
after the last marker is shared. The lead (the text before the first
marker's text, a figure label such as "Figure 2." included) is kept with
every sub-caption. ``assign_subcaptions`` gives each panel (reading order)
its sub-caption: letters and numerals by rank, positions by where the panel
lies in the grid of panels; a caption without markers stays whole (every
panel gets all of it). When the markers do not fit the panels (the caption
names four panels, the image splits into three) the figure stays whole.

``split_record`` is the builder's record-expansion step
(``build_bank(split_compound=True)``): a record's figure becomes one record
per panel (id ``<id>#p<k>``, image ``<ref>#crop=x0,y0,x1,y1``, see
``images``), or stays whole with the reason.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from .corpus import Record
from .images import MAX_PIXELS, UnreadableImage, crop_ref, open_image, problem

Box = tuple[int, int, int, int]          # x0, y0, x1, y1: pixels, half-open
Detector = Callable[..., object]         # detector(PIL RGB image) -> boxes

MAX_PANELS = 64


# ---- boxes ----------------------------------------------------------------------------------

def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _inside(a: Box, b: Box) -> float:
    """The share of ``a``'s area that lies inside ``b``."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    area = (a[2] - a[0]) * (a[3] - a[1])
    return max(0, w) * max(0, h) / area if area > 0 else 0.0


def _overlap(a0, a1, b0, b1) -> float:
    """Overlap of intervals [a0, a1) and [b0, b1) as a share of the shorter one."""
    return max(0, min(a1, b1) - max(a0, b0)) / max(1, min(a1 - a0, b1 - b0))


def reading_order(boxes: Sequence[Box]) -> list[Box]:
    """Rows top to bottom, left to right within a row. A row is the topmost
    remaining box (the leftmost of equals) and every box overlapping it
    vertically by at least half the shorter height; a tall panel beside two
    stacked ones comes first, then the upper, then the lower."""
    rest = sorted(boxes, key=lambda b: (b[1], b[0]))
    out: list[Box] = []
    while rest:
        seed = rest[0]
        row = [b for b in rest if _overlap(b[1], b[3], seed[1], seed[3]) >= 0.5]
        out += sorted(row, key=lambda b: (b[0], b[1]))
        rest = [b for b in rest if b not in row]
    return out


def _groups(boxes: Sequence[Box], lo: int, hi: int) -> list[int]:
    """Index of each box's column (lo, hi = 0, 2) or row (1, 3): boxes whose
    extents overlap by at least half the shorter one share it; ordered by position."""
    order = sorted(range(len(boxes)), key=lambda i: (boxes[i][lo] + boxes[i][hi], i))
    spans: list[list[int]] = []
    group = [0] * len(boxes)
    for i in order:
        b = boxes[i]
        if spans and _overlap(b[lo], b[hi], spans[-1][0], spans[-1][1]) >= 0.5:
            spans[-1] = [min(spans[-1][0], b[lo]), max(spans[-1][1], b[hi])]
        else:
            spans.append([b[lo], b[hi]])
        group[i] = len(spans) - 1
    return group


def find_panels(image, detector: Detector) -> list[Box]:
    """The panels ``detector`` finds in ``image`` (a PIL image), as integer
    boxes clipped to the image, in reading order. Of two boxes with IoU above
    0.7 the first is kept; a box holding two or more others (a whole-figure
    box around its panels) and a box lying inside another are dropped."""
    w, h = image.size
    raw = detector(image)
    if hasattr(raw, "detach"):
        raw = raw.detach().cpu().numpy()
    try:
        arr = np.asarray(raw, dtype=np.float64).reshape(-1, 4) if len(raw) else np.zeros((0, 4))
    except (TypeError, ValueError):
        raise TypeError(f"panel detector {detector_name(detector)!r} returned {type(raw).__name__}, "
                        "not boxes (x0, y0, x1, y1)") from None
    if not np.isfinite(arr).all():
        raise ValueError(f"panel detector {detector_name(detector)!r} returned a box with NaN or inf")
    boxes: list[Box] = []
    for x0, y0, x1, y1 in arr:
        b = (int(np.clip(np.floor(x0), 0, w)), int(np.clip(np.floor(y0), 0, h)),
             int(np.clip(np.ceil(x1), 0, w)), int(np.clip(np.ceil(y1), 0, h)))
        if b[2] > b[0] and b[3] > b[1] and all(iou(b, k) <= 0.7 for k in boxes):
            boxes.append(b)
    boxes = [b for b in boxes if sum(_inside(k, b) >= 0.9 for k in boxes if k != b) < 2]
    boxes = [b for b in boxes if not any(_inside(b, k) >= 0.9 and _area(k) > _area(b) for k in boxes)]
    return reading_order(boxes)


def _area(b: Box) -> int:
    return (b[2] - b[0]) * (b[3] - b[1])


def detector_name(detector) -> str:
    return str(getattr(detector, "name", None) or getattr(detector, "__name__", None) or type(detector).__name__)


# ---- the gutter splitter --------------------------------------------------------------------


@dataclass(frozen=True)
class GutterSplitter:
    """Panels of a compound figure from its gutters (module doc).

    ``tol``: a row or column is uniform when the standard deviation of its
    pixels' luma (Rec. 601, 0-255) is at most ``tol``: a flat
    gutter through JPEG noise, ringing and chroma subsampling (which smears a
    thin coloured gutter's chroma, not its luma) is, a line crossing any
    sizeable structure is not. ``colour_tol``: the gutters of one figure share a
    colour (the background its margins show, else that of its widest
    gutter) within this many levels per channel, so that flat background
    inside a panel (between cells of a smear) is no gutter. ``min_gutter``:
    the narrowest gutter, in pixels. ``min_panel`` / ``min_fraction``: a
    panel's shorter side is at least ``min_panel`` pixels and ``min_fraction``
    of the figure's shorter side. ``max_aspect``: a panel's long side is at
    most that many times its short side. ``max_depth``: levels of recursion.
    ``analysis_pixels``: larger figures are analysed reduced by an integer
    factor (box filter), the boxes scaled back. ``edge``: a run of uniform
    lines without a flat core is a gutter only where the lines beside it are
    not near-uniform (luma std above ``edge`` x ``tol``), so smooth
    background inside a single image is not cut (0: no such test).
    """

    tol: float = 4.0
    colour_tol: float = 12.0
    min_gutter: int = 1
    min_panel: int = 16
    min_fraction: float = 0.08
    max_aspect: float = 8.0
    max_depth: int = 6
    analysis_pixels: int = 4_000_000
    edge: float = 3.0

    def __post_init__(self):
        for f in ("min_gutter", "min_panel", "max_depth", "analysis_pixels"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GutterSplitter: {f} must be an integer >= 1, got {v!r}")
        for f in ("tol", "colour_tol"):
            if not 0 <= getattr(self, f) < 256:
                raise ValueError(f"GutterSplitter: {f} must be in [0, 256), got {getattr(self, f)!r}")
        if not 0 <= self.min_fraction < 0.5:
            raise ValueError(f"GutterSplitter: min_fraction must be in [0, 0.5), got {self.min_fraction!r}")
        if not self.max_aspect >= 1:
            raise ValueError(f"GutterSplitter: max_aspect must be >= 1, got {self.max_aspect!r}")

    @property
    def name(self) -> str:
        return "gutter(" + ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)) + ")"

    def __call__(self, image) -> list[Box]:
        img = image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image
        f = 1
        while img.width * img.height > self.analysis_pixels * f * f:
            f += 1
        a = _Sums(img.reduce(f) if f > 1 else img)
        h, w = a.shape
        min_side = max(self.min_panel / f, self.min_fraction * min(h, w))
        out: list[Box] = []
        self._split(a, (0, 0, w, h), self.max_depth, min_side, out, self._canvas(a))
        if f > 1:
            out = [(x0 * f, y0 * f, min(img.width, x1 * f), min(img.height, y1 * f)) for x0, y0, x1, y1 in out]
        return out

    # A region is cut where a run of uniform lines crosses it. Prefix sums of
    # the luma, its square and the colour along rows and along columns, made
    # once per figure (O(area)), give any line segment's mean and variance in
    # O(1), so testing a region's lines costs O(h + w), not O(area).

    def _uniform(self, s: "_Sums", box: Box):
        """(uniform rows [h], uniform columns [w], row colours [h, 3], column
        colours [w, 3]) of ``box``: a line is uniform when the standard
        deviation of its luma is at most ``tol``."""
        lim = float(self.tol) ** 2
        return (s.variances(box, 0) <= lim, s.variances(box, 1) <= lim, s.means(box, 0), s.means(box, 1))

    def _canvas(self, a: "_Sums") -> Optional[np.ndarray]:
        """The figure's background colour when its margins show one: the
        innermost uniform line of each margin, where they agree."""
        rows, cols, rmean, cmean = self._uniform(a, (0, 0, a.shape[1], a.shape[0]))
        if rows.all() or cols.all():
            return None
        found = []
        for lines, means in ((rows, rmean), (cols, cmean)):
            first, last = int(np.argmin(lines)), len(lines) - 1 - int(np.argmin(lines[::-1]))
            found += [means[i] for i in (first - 1, last + 1) if 0 <= i < len(lines)]
        if not found or np.ptp(np.stack(found), axis=0).max() > self.colour_tol:
            return None
        return sum(found) / len(found)

    def _trim(self, a: "_Sums", box: Box):
        """``box`` without its uniform margins, and ``_uniform`` of it; None when blank."""
        x0, y0, x1, y1 = box
        for _ in range(4):  # trimming one direction can make lines of the other uniform
            u = self._uniform(a, (x0, y0, x1, y1))
            rows, cols = u[0], u[1]
            if rows.all() or cols.all():
                return None
            t, b = int(np.argmin(rows)), len(rows) - int(np.argmin(rows[::-1]))
            lft, r = int(np.argmin(cols)), len(cols) - int(np.argmin(cols[::-1]))
            if (t, b, lft, r) == (0, len(rows), 0, len(cols)):
                return (x0, y0, x1, y1), u
            x0, y0, x1, y1 = x0 + lft, y0 + t, x0 + r, y0 + b
        return (x0, y0, x1, y1), self._uniform(a, (x0, y0, x1, y1))

    def _ok(self, box: Box, min_side: float) -> bool:
        w, h = box[2] - box[0], box[3] - box[1]
        return min(w, h) >= min_side and max(w, h) <= self.max_aspect * min(w, h)

    def _runs(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
        return np.nonzero(d == 1)[0], np.nonzero(d == -1)[0]

    def _cut(self, a: "_Sums", box: Box, lines: np.ndarray, means: np.ndarray, axis: int, min_side: float,
             colour):
        """(widest gutter, trimmed pieces, gutter colour) of cutting ``box``
        along the runs of uniform ``lines`` (rows: axis 0, columns: axis 1)
        of the gutter ``colour`` (None: that of the widest run of uniform
        lines of one colour); (0, [piece], None) when the cut leaves one
        piece and only strips too small for a panel beside it; else None."""
        if colour is not None:
            return self._cut_colour(a, box, lines, means, axis, min_side, colour)
        # no colour yet: try the colours of the runs of uniform lines, widest run first, each run
        # cut where its colour changes (a panel's own dark border beside a white gutter)
        same = np.concatenate([[True], np.abs(np.diff(means, axis=0)).max(1) <= self.colour_tol])
        runs = []
        for s, e in zip(*self._runs(lines)):
            breaks = [s, *(s + np.nonzero(~same[s + 1:e])[0] + 1).tolist(), e]
            runs += [(b1 - b0, -b0, sum(means[b0:b1]) / (b1 - b0)) for b0, b1 in zip(breaks[:-1], breaks[1:])]
        tried: list = []
        single = None
        for _, _, c in sorted(runs, key=lambda r: r[:2], reverse=True):
            if any(np.abs(c - t).max() <= self.colour_tol for t in tried):
                continue
            tried.append(c)
            cut = self._cut_colour(a, box, lines, means, axis, min_side, c)
            if cut and len(cut[1]) >= 2:
                return cut
            single = single or cut
        return single

    def _edged(self, a: "_Sums", box: Box, axis: int, s: int, e: int, colour) -> bool:
        """Whether the run [s, e) of uniform lines of ``box`` is a drawn gutter:
        it has a flat core (a line of luma std at most tol / 4), or it ends
        sharply on each side inside ``box``, the line beyond it being no
        near-uniform line of the gutter colour (luma std above ``edge`` x
        ``tol`` or colour off by more than ``colour_tol``). Flat background
        fading into structure (between the cells of a smear) is neither."""
        if not self.edge or a.variances(_band(box, axis, s, e), axis).min() <= (self.tol / 4) ** 2:
            return True
        n = (box[3] - box[1]) if axis == 0 else (box[2] - box[0])
        for i in (s - 1, e):
            if 0 <= i < n:
                line = _band(box, axis, i, i + 1)
                var, mean = a.variances(line, axis)[0], a.means(line, axis)[0]
                if var <= (self.edge * self.tol) ** 2 and np.abs(mean - colour).max() <= self.colour_tol:
                    return False
        return True

    def _cut_colour(self, a, box, lines, means, axis, min_side, colour):
        starts, ends = self._runs(lines & (np.abs(means - colour).max(1) <= self.colour_tol))
        keep = (ends - starts >= self.min_gutter) & np.array(
            [self._edged(a, box, axis, s, e, colour) for s, e in zip(starts, ends)], bool)
        starts, ends = starts[keep], ends[keep]
        if not len(starts):
            return None
        bounds = [0, *np.column_stack([starts, ends]).ravel().tolist(), len(lines)]
        pieces = []
        for s, e in zip(bounds[::2], bounds[1::2]):
            if e <= s:
                continue
            t = self._trim(a, _band(box, axis, s, e))
            if t is not None and self._ok(t[0], min_side):
                pieces.append(t)
        if len(pieces) == 1 and pieces[0][0] != tuple(box):
            return 0, pieces, None  # only a label or title strip was cut off: no cut, the rest is split again
        return (int((ends - starts).max()), pieces, colour) if len(pieces) >= 2 else None

    def _split(self, a: "_Sums", box: Box, depth: int, min_side: float, out: list, colour,
               trimmed=None) -> None:
        t = trimmed or self._trim(a, box)
        if t is None:
            return
        box, (rows, cols, rmean, cmean) = t
        found = [c for c in (self._cut(a, box, rows, rmean, 0, min_side, colour),
                             self._cut(a, box, cols, cmean, 1, min_side, colour)) if c]
        cuts = [c for c in found if len(c[1]) >= 2]
        if depth == 0 or not found:
            out.append(box)
        elif cuts:
            _, pieces, colour = max(cuts, key=lambda c: c[0])  # the widest gutter; rows first on a tie
            for p in pieces:
                self._split(a, p[0], depth - 1, min_side, out, colour, trimmed=p)
        else:  # a strip too small to be a panel (a label, a title, a colour bar) cut off: split the rest
            self._split(a, found[0][1][0][0], depth - 1, min_side, out, colour, trimmed=found[0][1][0])


def _band(box: Box, axis: int, s: int, e: int) -> Box:
    """Rows (axis 0) or columns (axis 1) [s, e) of ``box``, as a box."""
    x0, y0, x1, y1 = box
    return (x0, y0 + s, x1, y0 + e) if axis == 0 else (x0 + s, y0, x0 + e, y1)


class _Sums:
    """Prefix sums of a figure for ``GutterSplitter``: of its luma y (0-255,
    PIL's integer Rec. 601 conversion), of y^2 and of its colour, along each
    row (``row_*[r, x]``: the first x pixels of row r) and along each column
    (``col_*[y, c]``). Integers, exact."""

    def __init__(self, img):
        a = np.asarray(img)
        y = np.asarray(img.convert("L")).astype(np.int32)
        q = y * y
        self.shape = a.shape[:2]
        typed = ((y, np.int32), (q, np.int64), (a, np.int32))
        self.row_y, self.row_q, self.row_c = (_prefix(v, 1, t) for v, t in typed)
        self.col_y, self.col_q, self.col_c = (_prefix(v, 0, t) for v, t in typed)


    def _sums(self, box: Box, axis: int, row, col):
        x0, y0, x1, y1 = box
        return (x1 - x0, row[y0:y1, x1] - row[y0:y1, x0]) if axis == 0 else (y1 - y0, col[y1, x0:x1] - col[y0, x0:x1])

    def variances(self, box: Box, axis: int) -> np.ndarray:
        """Luma variance of each row (axis 0) or column (axis 1) of ``box``:
        Q / n - (S / n)^2 of the exact integer sums S, Q of its luma and its
        square (elementwise IEEE operations on exact integers: no summation
        order, so the same values on every CPU)."""
        n, sy = self._sums(box, axis, self.row_y, self.col_y)
        return self._sums(box, axis, self.row_q, self.col_q)[1] / n - (sy / n) ** 2

    def means(self, box: Box, axis: int) -> np.ndarray:
        """Mean colour [., 3] of each row (axis 0) or column (axis 1) of ``box``."""
        n, sc = self._sums(box, axis, self.row_c, self.col_c)
        return sc / n


def _prefix(v: np.ndarray, axis: int, dtype) -> np.ndarray:
    shape = list(v.shape)
    shape[axis] += 1
    out = np.zeros(shape, dtype)
    np.cumsum(v, axis=axis, dtype=dtype, out=out[(slice(None),) * axis + (slice(1, None),)])
    return out


# ---- a torchvision detector ----------------------------------------------------------------

CHECKPOINT_FORMAT = "mgcl-panel-detector"


class TorchvisionDetector:
    """A torchvision detection model (``torchvision.models.detection``) as a
    panel detector: the boxes it scores at least ``score_threshold`` (of class
    ``label``, any class when None), best first. Calls are serialised (the
    builder checks images from several threads) and run without gradients on
    the model's device."""

    def __init__(self, model, *, score_threshold: float = 0.5, label: Optional[int] = None,
                 name: str = "torchvision"):
        if not 0 <= float(score_threshold) <= 1:
            raise ValueError(f"TorchvisionDetector: score_threshold must be in [0, 1], got {score_threshold!r}")
        self.model = model.eval()
        self.score_threshold = float(score_threshold)
        self.label = label
        self.name = f"{name} score>={self.score_threshold:g}" + (f" label={label}" if label is not None else "")
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, path: str, *, arch: Optional[str] = None, num_classes: Optional[int] = None,
                        score_threshold: Optional[float] = None, label: Optional[int] = None,
                        device: Optional[str] = None, **model_kwargs) -> "TorchvisionDetector":
        """Load ``path`` (a safetensors state dict; ``save_detector`` writes
        one with ``arch``, ``num_classes``, the model's keyword arguments and
        optionally ``score_threshold`` / ``label`` in its header; arguments
        given here take precedence) into ``torchvision.models.get_model(arch,
        weights=None, weights_backbone=None, num_classes=..., **model_kwargs)``.
        Nothing is downloaded and nothing is unpickled."""
        import torch  # noqa: PLC0415
        from safetensors import SafetensorError, safe_open  # noqa: PLC0415

        if not os.path.isfile(path):
            raise FileNotFoundError(f"panel detector checkpoint {path!r} does not exist")
        try:
            with safe_open(path, "pt") as fh:
                header = fh.metadata() or {}
                state = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"panel detector checkpoint {path!r}: not a safetensors file ({exc})") from None
        try:
            saved = json.loads(header.get("kwargs", "{}"))
        except json.JSONDecodeError:
            raise ValueError(f"panel detector checkpoint {path!r}: its header's kwargs are not JSON") from None
        arch = arch or header.get("arch")
        if not arch:
            raise ValueError(f"panel detector checkpoint {path!r} names no architecture (pass arch=..., "
                             "e.g. 'fasterrcnn_resnet50_fpn')")
        num_classes = int(num_classes if num_classes is not None else header.get("num_classes", 2))
        if score_threshold is None:
            score_threshold = float(header.get("score_threshold", 0.5))
        if label is None and header.get("label") not in (None, ""):
            label = int(header["label"])
        try:
            from torchvision.models import get_model, list_models  # noqa: PLC0415
            from torchvision.models import detection  # noqa: PLC0415
        except ImportError as exc:
            raise ImportError("a torchvision panel detector needs torchvision "
                              f"(pip install 'mgcl[models]'): {exc}") from None
        known = list_models(module=detection)
        if arch not in known:
            raise ValueError(f"panel detector checkpoint {path!r}: unknown torchvision detection model {arch!r}; "
                             f"known: {', '.join(known)}")
        model = get_model(arch, weights=None, weights_backbone=None, num_classes=num_classes,
                          **{**saved, **model_kwargs})
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise ValueError(f"panel detector checkpoint {path!r} does not fit {arch} with {num_classes} classes "
                             f"({first[1].strip() if len(first) > 1 else first[0]})") from None
        if device is not None:
            model = model.to(torch.device(device))
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        return cls(model, score_threshold=score_threshold, label=label,
                   name=f"torchvision {arch} sha256:{digest[:16]}")

    def __call__(self, image):
        import torch  # noqa: PLC0415

        try:
            dev = next(self.model.parameters()).device
        except StopIteration:
            dev = torch.device("cpu")
        x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float().div_(255)
        with self._lock, torch.no_grad():
            out = self.model([x.to(dev)])[0]
        keep = out["scores"] >= self.score_threshold
        if self.label is not None:
            keep &= out["labels"] == self.label
        boxes, scores = out["boxes"][keep].cpu(), out["scores"][keep].cpu()
        return boxes[torch.argsort(scores, descending=True, stable=True)]


def save_detector(model, path: str, *, arch: str, num_classes: int, score_threshold: Optional[float] = None,
                  label: Optional[int] = None, **model_kwargs) -> None:
    """Write ``model``'s state dict as a checkpoint ``TorchvisionDetector.from_checkpoint`` reads."""
    from .._io import atomic_write_tensors  # noqa: PLC0415

    meta = {"format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": str(int(num_classes)),
            "kwargs": json.dumps(model_kwargs, sort_keys=True)}
    if score_threshold is not None:
        meta["score_threshold"] = repr(float(score_threshold))
    if label is not None:
        meta["label"] = str(int(label))
    atomic_write_tensors(path, model.state_dict(), metadata=meta)  # umask's mode (save_file alone makes 0600)


# ---- captions -------------------------------------------------------------------------------

_DASHES = "\u2010\u2011\u2012\u2013\u2014\u2212-"  # "-" last: literal inside [...]
_FIG = re.compile(r"\s*(?:supplementary\s+)?(?:fig(?:ure)?s?\.?)\s*S?\d+[A-Za-z]?\s*(?:[.:|]\s*|(?=\s))", re.I)
_SEP = re.compile(rf"\s*(?:,?\s*and|,?\s*&|,|/)\s*|\s*(?:[{_DASHES}]|to)\s*")
_ROMAN = {"i": 1, "ii": 2, "iii": 3, "iv": 4, "v": 5, "vi": 6, "vii": 7, "viii": 8, "ix": 9, "x": 10, "xi": 11,
          "xii": 12, "xiii": 13, "xiv": 14, "xv": 15, "xvi": 16}
_LIST = rf"[A-Za-z]{{1,4}}(?:(?:\s*(?:,?\s*and|,?\s*&|,|/|[{_DASHES}]|to)\s*)[A-Za-z]{{1,4}})*"
_PAREN = re.compile(rf"\(\s*(?:(?i:panels?)\s+)?({_LIST})\s*\)")
_BARE = re.compile(rf"(?:(?i:panels?)\s+)?({_LIST})(?:\s*[.):,]|\s+[{_DASHES}])\s+")
_PHRASE = re.compile(rf"(?i:panels?)\s+({_LIST})\s+(?=[a-z])")  # "Panels A and B show ...": the words stay text
_BETWEEN = re.compile(r"\s*(?:,|&|and|or|,\s*and)?\s*")  # "(a) and (b) show ...": one marker
_POS_WORD = r"(?:top|bottom|upper|lower|middle|centre|center|left|right)"
_POS = rf"{_POS_WORD}(?:[\s{_DASHES}]+{_POS_WORD})?"
_POS_NOUN = r"(?:panels?|images?|columns?|rows?|sides?|figures?)"
_POS_PAREN = re.compile(rf"\(\s*(?:on\s+the\s+|at\s+)?({_POS})(?:\s+{_POS_NOUN})?\s*\)", re.I)
_POS_BARE = re.compile(
    rf"(?:on\s+the\s+|at\s+|in\s+the\s+)?({_POS})(?:(?:\s+{_POS_NOUN})?\s*[:,]\s+|\s+{_POS_NOUN}\s+)", re.I)
_BOUNDARY = re.compile(r"[.;:!?]\s+")
_CLOSES = re.compile(r"\s*(?:[,;.:)]|and\b|or\b|$)")
_POS_CANON = {"upper": "top", "lower": "bottom", "centre": "middle", "center": "middle"}


@dataclass(frozen=True)
class Segment:
    """The text of one marker: ``panels`` (ranks, 0 = "a" / "i") for letters
    and numerals, ``where`` (words such as "top", "left") for positions."""

    text: str
    panels: tuple[int, ...] = ()
    where: tuple[str, ...] = ()


@dataclass(frozen=True)
class CaptionParts:
    """A caption cut at its panel markers. ``kind``: "letter", "roman",
    "position" or "" (no markers: ``segments`` is empty). ``count``: panels
    the letters / numerals name (a, b, ... up to the highest)."""

    caption: str
    lead: str
    segments: tuple[Segment, ...]
    tail: str = ""
    kind: str = ""
    count: int = 0

    def labels(self) -> str:
        """The named panels as the caption writes them, e.g. "a-d"."""
        if self.kind == "position":
            return ", ".join(" ".join(s.where) for s in self.segments)
        names = [_label_name(k, self.kind) for k in range(self.count)]
        return f"{names[0]}-{names[-1]}" if names else ""


@dataclass(frozen=True)
class _Marker:
    start: int
    end: int
    labels: tuple[str, ...] = ()     # raw labels, ranges expanded later
    ranges: tuple[bool, ...] = ()    # labels[i] - labels[i+1] is a range
    where: tuple[str, ...] = ()
    boundary: bool = False           # at the start of a sentence
    closes: bool = False             # followed by punctuation, a conjunction or the end


def _label_name(k: int, kind: str) -> str:
    if kind == "roman":
        return next(r for r, v in _ROMAN.items() if v == k + 1)
    return chr(ord("a") + k)


def _parse_list(s: str):
    """Labels and range flags of a marker's list ("b-d", "a, c and d"), or None."""
    labels = re.split(_SEP, s.strip())
    seps = re.findall(_SEP, s.strip())
    if not labels or any(not x for x in labels):
        return None
    ranges = tuple(bool(re.fullmatch(rf"\s*(?:[{_DASHES}]|to)\s*", p)) for p in seps)
    if any(len(x) > 1 and x.lower() not in _ROMAN for x in labels):
        return None
    return tuple(labels), ranges


def _ranks(m: _Marker, kind: str, case: str) -> Optional[list[int]]:
    """The panel ranks a marker names under ``kind`` ("letter" / "roman") and
    ``case`` ("lower" / "upper"), or None when it is not such a marker."""
    vals = []
    for x in m.labels:
        if (x.islower() if case == "lower" else x.isupper()) is False:
            return None
        if kind == "letter":
            if len(x) != 1:
                return None
            vals.append(ord(x.lower()) - ord("a"))
        else:
            if x.lower() not in _ROMAN:
                return None
            vals.append(_ROMAN[x.lower()] - 1)
    out = [vals[0]]
    for v, rng in zip(vals[1:], m.ranges):
        if rng:
            if v <= out[-1]:
                return None
            out += list(range(out[-1] + 1, v + 1))
        else:
            out.append(v)
    return out


def _markers(text: str, start: int) -> tuple[list[_Marker], list[_Marker]]:
    """Candidate (label markers, position markers) of ``text[start:]``, in order."""
    bounds = {start} | {m.end() for m in _BOUNDARY.finditer(text, start)}
    labels: dict[int, _Marker] = {}
    where: dict[int, _Marker] = {}
    for m in _PAREN.finditer(text, start):
        parsed = _parse_list(m.group(1))
        if parsed:
            labels[m.start()] = _Marker(m.start(), m.end(), *parsed, boundary=_opens(text, start, m.start()),
                                        closes=bool(_CLOSES.match(text, m.end())))
    for m in _POS_PAREN.finditer(text, start):
        where[m.start()] = _Marker(m.start(), m.end(), where=_where(m.group(1)),
                                   boundary=_opens(text, start, m.start()), closes=bool(_CLOSES.match(text, m.end())))
    for b in sorted(bounds):
        m = _BARE.match(text, b)
        if m and b not in labels:
            parsed = _parse_list(m.group(1))
            if parsed:
                labels[b] = _Marker(b, m.end(), *parsed, boundary=True)
        m = None if b in labels else _PHRASE.match(text, b)
        if m:
            parsed = _parse_list(m.group(1))
            if parsed:
                labels[b] = _Marker(b, b, *parsed, boundary=True)
        m = _POS_BARE.match(text, b)
        if m and b not in where:
            where[b] = _Marker(b, m.end(), where=_where(m.group(1)), boundary=True)
    return [labels[k] for k in sorted(labels)], [where[k] for k in sorted(where)]


def _opens(text: str, start: int, at: int) -> bool:
    """Whether position ``at`` starts a sentence (or the caption, after its figure label)."""
    pre = text[start:at].rstrip()
    return not pre or pre[-1] in ".;:!?"


def _where(phrase: str) -> tuple[str, ...]:
    words = re.split(rf"[\s{_DASHES}]+", phrase.lower().strip())
    return tuple(_POS_CANON.get(w, w) for w in words)


def _label_scheme(cands: list[_Marker]):
    """(kind, accepted markers with their ranks, count) of the first scheme
    that runs from "a" (or "i"): letters or numerals of one case, each marker
    naming the next panels; repeats of earlier panels only at a sentence start."""
    for first in cands:
        for kind in ("letter", "roman"):
            case = "lower" if first.labels[0].islower() else "upper"
            r = _ranks(first, kind, case)
            if not r or r[0] != 0:
                continue
            out, seen = [], 0
            for m in cands[cands.index(first):]:
                ranks = _ranks(m, kind, case)
                if ranks is None:
                    continue
                new = [k for k in ranks if k >= seen]
                if not new:
                    if m.boundary:                  # "(a, b) Scale bars ..." opens a shared segment
                        out.append((m, ranks))
                    continue                        # "compared with (a)": text
                if new != list(range(seen, seen + len(new))) or len(set(ranks)) != len(ranks):
                    continue                        # a gap ("(a) ... (c)"), or a stray "(i)" among letters: text
                out.append((m, ranks))
                seen += len(new)
            if seen >= 2:
                return kind, out, seen
    return None


def split_caption(caption: str) -> CaptionParts:
    """``caption`` cut at its panel markers (module doc)."""
    text = " ".join(str(caption).split())
    fig = _FIG.match(text)
    start = fig.end() if fig else 0
    cands, wheres = _markers(text, start)
    scheme = _label_scheme(cands)
    if scheme:
        kind, accepted, count = scheme
        marks = [m for m, _ in accepted]
        spans = [tuple(r) for _, r in accepted]
    else:
        if len(wheres) < 2:
            return CaptionParts(text, text, ())
        kind, marks, count = "position", wheres, 0
        spans = [() for _ in wheres]
    marks, spans = _merge_adjacent(text, marks, spans)
    closing = marks[0].closes and not marks[0].boundary  # "x-ray (A) and ...": the first marker ends its text
    segs, tail = [], ""
    if closing:  # "Chest x-ray (A) and CT (B) of ...": each marker closes its text; the rest is shared
        pos = max([b for b in [start] + [m.end() for m in _BOUNDARY.finditer(text, start)] if b <= marks[0].start])
        lead, prev = text[:pos].strip(), pos
        for m, span in zip(marks, spans):
            segs.append(Segment(_clean(text[prev:m.start]), span, m.where))
            prev = m.end
        tail = re.sub(r"^[\s,;]+", "", text[prev:]).strip()
    else:
        lead = text[:marks[0].start].strip()
        for i, (m, span) in enumerate(zip(marks, spans)):
            end = marks[i + 1].start if i + 1 < len(marks) else len(text)
            segs.append(Segment(_clean(text[m.end:end]), span, m.where))
    return CaptionParts(text, lead, tuple(segs), tail, kind, count)


def _merge_adjacent(text: str, marks: list, spans: list) -> tuple[list, list]:
    """Markers with only a conjunction or a comma between them ("(a) and (b)
    show ...") as one marker naming the panels of both."""
    out_m, out_s = [marks[0]], [spans[0]]
    for m, span in zip(marks[1:], spans[1:]):
        prev = out_m[-1]
        if prev.end > prev.start and _BETWEEN.fullmatch(text, prev.end, m.start):
            out_m[-1] = dataclasses.replace(prev, end=m.end, where=prev.where + m.where, closes=m.closes)
            out_s[-1] = tuple(sorted(set(out_s[-1]) | set(span)))
        else:
            out_m.append(m)
            out_s.append(span)
    return out_m, out_s


def _clean(s: str) -> str:
    s = re.sub(r"^[\s,;:.]+|^(?:and|or)\s+", "", s.strip()).strip()
    s = re.sub(r"^(?:and|or)\s+", "", s)
    return re.sub(r"(?:[\s,;]+|\s+(?:and|or))+$", "", s).strip()


def _join(*parts: str) -> str:
    out = ""
    for p in parts:
        p = p.strip()
        if p:
            out = p if not out else out + ("" if p[0] in ".,;:)" else " ") + p
    return out


def assign_subcaptions(caption: str, boxes: Sequence[Box]) -> tuple[Optional[list[str]], str]:
    """(one sub-caption per box, "") for ``boxes`` in reading order; (None,
    reason) when the caption's markers do not fit them. A caption without
    markers stays whole for every box."""
    parts = split_caption(caption)
    n = len(boxes)
    if not parts.segments:
        return [parts.caption] * n, ""
    texts: list[list[str]] = [[] for _ in range(n)]
    if parts.kind == "position":
        cols, rows = _groups(boxes, 0, 2), _groups(boxes, 1, 3)
        ncol, nrow = max(cols) + 1, max(rows) + 1
        for seg in parts.segments:
            hit = _where_panels(seg.where, cols, rows, ncol, nrow)
            if not hit:
                return None, (f"caption and panels disagree: {' '.join(seg.where)!r} names no panel of the "
                              f"{nrow}x{ncol} grid of {n} panels")
            for k in hit:
                texts[k].append(seg.text)
        missing = [k for k in range(n) if not texts[k]]
        if missing:
            return None, (f"caption and panels disagree: the positions ({parts.labels()}) leave panel(s) "
                          f"{', '.join(str(k + 1) for k in missing)} of {n} undescribed")
    else:
        if parts.count != n:
            return None, (f"caption and panels disagree: the caption names {parts.count} panels "
                          f"({parts.labels()}), the image splits into {n}")
        for seg in parts.segments:
            for k in seg.panels:
                texts[k].append(seg.text)
    return [_join(parts.lead, *t, parts.tail) for t in texts], ""


def _where_panels(where: tuple[str, ...], cols, rows, ncol: int, nrow: int) -> list[int]:
    """Panels named by position words; a row word needs two rows or more, a column word two columns."""
    keep = set(range(len(cols)))
    for w in where:
        if w in ("left", "right"):
            if ncol < 2:
                return []
            keep &= {k for k, c in enumerate(cols) if c == (0 if w == "left" else ncol - 1)}
        elif w in ("top", "bottom"):
            if nrow < 2:
                return []
            keep &= {k for k, r in enumerate(rows) if r == (0 if w == "top" else nrow - 1)}
        elif w == "middle":
            if ncol >= 3 and ncol % 2 and len(where) == 1:
                keep &= {k for k, c in enumerate(cols) if c == ncol // 2}
            elif nrow >= 3 and nrow % 2:
                keep &= {k for k, r in enumerate(rows) if r == nrow // 2}
            elif ncol >= 3 and ncol % 2:
                keep &= {k for k, c in enumerate(cols) if c == ncol // 2}
            else:
                return []
    return sorted(keep)


# ---- the builder's record-expansion step ----------------------------------------------------

def split_record(rec: Record, max_pixels: int = MAX_PIXELS, *, detector: Detector) -> list[tuple]:
    """``[(record, image problem, kept-whole reason)]`` for one corpus record:
    one record per panel of its figure (each with its sub-caption, ``parent``
    and ``panel`` set), or the record itself, with why it stays whole when
    that is not simply a one-panel figure, or with why its image cannot be read."""
    if not rec.image:
        return [(rec, None, None)]
    try:
        img = open_image(rec.image, max_pixels)
    except (OSError, UnreadableImage) as exc:
        return [(rec, problem(rec.image, exc), None)]
    try:
        boxes = find_panels(img, detector)
    except Exception as exc:  # noqa: BLE001 - a user's detector may raise anything; the figure stays whole
        return [(rec, None, f"panel detector failed: {type(exc).__name__}: {str(exc)[:200]}")]
    if len(boxes) < 2:
        parts = split_caption(rec.caption)
        if parts.segments:
            return [(rec, None, f"no panels found: the caption names panels ({parts.labels()}) but the image "
                                f"does not split ({detector_name(detector)})")]
        return [(rec, None, None)]
    if len(boxes) > MAX_PANELS:
        return [(rec, None, f"too many panels: {len(boxes)} found, more than {MAX_PANELS}")]
    subs, reason = assign_subcaptions(rec.caption, boxes)
    if subs is None:
        return [(rec, None, reason)]
    return [(dataclasses.replace(rec, id=f"{rec.id}#p{k}", caption=sub, image=crop_ref(rec.image, box),
                                 repaired=rec.repaired if k == 0 else "", parent=rec.id, panel=k), None, None)
            for k, (box, sub) in enumerate(zip(boxes, subs))]


__all__ = ["GutterSplitter", "TorchvisionDetector", "save_detector", "find_panels", "reading_order", "iou",
           "split_caption", "assign_subcaptions", "split_record", "CaptionParts", "Segment", "detector_name",
           "Box", "Detector", "MAX_PANELS"]
