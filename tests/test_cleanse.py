"""Corpus cleansing (issue 21): compound figures split into panels (the gutter
splitter, the detector protocol, the torchvision adapter), captions into
sub-captions, ``build_bank(split_compound=True)`` / ``db build
--split-compound`` (panel entries, meta, groups, resume, bad input, the pixel
limit), and the floors on the generated compound-figure set."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from mgcl.bench import cleanse as gen
from mgcl.retrieval import BankError, MemoryBank, UnreadableImage, build_bank, open_image
from mgcl.retrieval.cleanse import (GutterSplitter, TorchvisionDetector, assign_subcaptions, find_panels,
                                    reading_order, save_detector, split_caption)
from mgcl.retrieval.images import check_image, crop_ref, split_crop
from retrieval_fixtures import FixtureVLM, file_hashes
from test_retrieval_faults import bomb_png, build_cli, cli, one_line, skipped_rows

EMB = "hashing:64"


# ---- helpers ------------------------------------------------------------------------------

def mosaic(boxes, size, gutter=(255, 255, 255), seed=0) -> Image.Image:
    """Textured panels (noise plus a gradient: no row or column inside is
    uniform) at ``boxes`` on a canvas of the gutter colour."""
    rng = np.random.default_rng(seed)
    w, h = size
    a = np.empty((h, w, 3), np.uint8)
    a[:] = gutter
    for x0, y0, x1, y1 in boxes:
        yy, xx = np.mgrid[y0:y1, x0:x1]
        base = (xx * 3 + yy * 2) % 200
        a[y0:y1, x0:x1] = np.clip(base[..., None] + rng.integers(0, 50, (y1 - y0, x1 - x0, 3)), 0, 255)
    return Image.fromarray(a)


GRID = [(4, 4, 64, 54), (68, 4, 128, 54), (4, 58, 64, 108), (68, 58, 128, 108)]  # 2x2, 4 px gutters


def write_figures(root, figures, *, extra=()) -> str:
    """A jsonl corpus of ``figures`` (``gen.Figure``) plus ``extra`` rows; returns its path."""
    os.makedirs(root / "img", exist_ok=True)
    rows = []
    for i, f in enumerate(figures):
        name = f"img/f{i}.{'jpg' if f.fmt == 'jpeg' else 'png'}"
        (root / name).write_bytes(f.data)
        rows.append({"id": f"f{i}", "caption": f.caption, "image": name})
    rows += list(extra)
    path = root / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def figures():
    return gen.make_figures(72, seed=3)


# ---- 1. panels ----------------------------------------------------------------------------

@pytest.mark.parametrize("colour", [(255, 255, 255), (0, 0, 0), (128, 128, 128), (40, 160, 90)])
def test_gutters_of_any_colour(colour):
    img = mosaic(GRID, (132, 112), colour)
    assert find_panels(img, GutterSplitter()) == GRID


def test_recursive_cuts_and_reading_order():
    # a tall panel beside two stacked ones, under a full-width panel: cut by rows, then columns, then rows
    boxes = [(2, 2, 150, 40), (2, 44, 50, 140), (54, 44, 150, 90), (54, 94, 150, 140)]
    img = mosaic(boxes, (152, 142), (255, 255, 255), seed=1)
    assert find_panels(img, GutterSplitter()) == boxes
    assert reading_order([boxes[3], boxes[0], boxes[2], boxes[1]]) == boxes


def test_minimum_panel_size_and_aspect_limits():
    # a thin label strip under two panels is no panel: the two panels remain, the strip is dropped
    boxes = [(4, 4, 64, 64), (70, 4, 130, 64)]
    img = np.asarray(mosaic(boxes, (134, 80), seed=2)).copy()
    img[70:76, 10:120] = 30  # a 6-pixel line of "text"
    found = find_panels(Image.fromarray(img), GutterSplitter())
    assert found == boxes
    # a cut needs two pieces of at least min_panel a side: with min_panel=70 the figure stays one piece
    assert len(find_panels(mosaic(boxes, (134, 68)), GutterSplitter(min_panel=70))) < 2
    # panels of 60x20 exceed an aspect limit of 2: not a cut; within a limit of 4 they are
    strips = [(4, 4, 64, 24), (70, 4, 130, 24)]
    assert len(find_panels(mosaic(strips, (134, 28)), GutterSplitter(max_aspect=2.0))) < 2
    assert find_panels(mosaic(strips, (134, 28)), GutterSplitter(max_aspect=4.0)) == strips
    with pytest.raises(ValueError, match="max_aspect"):
        GutterSplitter(max_aspect=0.5)


def test_abutting_panels_without_gutters_stay_one():
    img = mosaic([(0, 0, 60, 50), (60, 0, 120, 50)], (120, 50))
    assert len(find_panels(img, GutterSplitter())) < 2


def test_single_images_with_smooth_background_are_not_split():
    """Flat background between the cells of a smear or around a lesion is no
    gutter (it fades into structure): the synthetic benchmark's single images stay whole."""
    from mgcl.mgtil.synth import DOMAINS, render

    images = [(dom, Image.fromarray(img).resize((128, 128), Image.BILINEAR)) for dom in sorted(DOMAINS)
              for img in render(dom, [list(DOMAINS[dom].findings)[i % len(DOMAINS[dom].findings)]
                                      for i in range(12)], (7,))]
    split = [dom for dom, img in images if len(find_panels(img, GutterSplitter())) > 1]
    assert len(split) <= 1, split
    # without the edge test, smooth background is cut: the images are a real test of it
    assert sum(len(find_panels(img, GutterSplitter(edge=0))) > 1 for _, img in images) >= 3


def test_large_figures_are_analysed_reduced_and_boxes_scaled_back():
    scale = 12
    big = [(x0 * scale, y0 * scale, x1 * scale, y1 * scale) for x0, y0, x1, y1 in GRID]
    img = mosaic(GRID, (132, 112), (0, 0, 0)).resize((132 * scale, 112 * scale), Image.NEAREST)
    found = find_panels(img, GutterSplitter(analysis_pixels=200_000))
    assert len(found) == 4
    for f, b in zip(found, big):
        assert max(abs(u - v) for u, v in zip(f, b)) <= scale


def test_detector_protocol_any_callable_returning_boxes():
    img = Image.new("RGB", (100, 80))
    want = [(0, 0, 50, 40), (50, 0, 100, 40), (0, 40, 100, 80)]
    shuffled = [want[2], want[0], want[1]]
    for out in (shuffled, np.array(shuffled, float), torch.tensor(shuffled, dtype=torch.float32)):
        assert find_panels(img, lambda im, out=out: out) == want
    # clipped to the image, rounded outwards; duplicates (IoU > 0.7), a whole-figure box and nested boxes dropped
    noisy = [(-5, -3, 50.4, 40), (1, 1, 49, 39), (0, 0, 100, 80), (50, 0, 120, 40), (60, 10, 70, 20), (0, 40, 100, 80)]
    assert find_panels(img, lambda im: noisy) == [(0, 0, 51, 40), (50, 0, 100, 40), (0, 40, 100, 80)]
    assert find_panels(img, lambda im: []) == []
    with pytest.raises(TypeError, match="not boxes"):
        find_panels(img, lambda im: "boxes")
    with pytest.raises(ValueError, match="NaN"):
        find_panels(img, lambda im: [(0, 0, float("nan"), 1)])


def test_torchvision_adapter_random_detector_saved_and_loaded(tmp_path):
    """A randomly initialised torchvision detector (no weights can be downloaded
    here) saved with ``save_detector`` and loaded with ``from_checkpoint``: the
    loaded model finds the same boxes as the one built, through ``find_panels``."""
    get_model = pytest.importorskip("torchvision.models").get_model  # an optional extra (mgcl[models])

    torch.manual_seed(0)
    arch = "ssdlite320_mobilenet_v3_large"
    model = get_model(arch, weights=None, weights_backbone=None, num_classes=2, detections_per_img=20).eval()
    ckpt = str(tmp_path / "det.safetensors")
    save_detector(model, ckpt, arch=arch, num_classes=2, score_threshold=0.0, detections_per_img=20)
    loaded = TorchvisionDetector.from_checkpoint(ckpt)
    assert loaded.score_threshold == 0.0 and loaded.name.startswith(f"torchvision {arch} sha256:")
    img = mosaic(GRID, (132, 112))
    direct = TorchvisionDetector(model, score_threshold=0.0)(img)
    got = loaded(img)
    assert got.shape[1] == 4 and len(got) > 0
    torch.testing.assert_close(got, direct)
    a, b = find_panels(img, loaded), find_panels(img, TorchvisionDetector(model, score_threshold=0.0))
    assert a == b and all(0 <= x0 < x1 <= 132 and 0 <= y0 < y1 <= 112 for x0, y0, x1, y1 in a)
    assert len(TorchvisionDetector.from_checkpoint(ckpt, score_threshold=1.0)(img)) == 0
    # bad checkpoints: one clear line each
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TorchvisionDetector.from_checkpoint(str(tmp_path / "none.safetensors"))
    (tmp_path / "junk").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a safetensors file"):
        TorchvisionDetector.from_checkpoint(str(tmp_path / "junk"))
    with pytest.raises(ValueError, match="does not fit"):
        TorchvisionDetector.from_checkpoint(ckpt, num_classes=5)
    with pytest.raises(ValueError, match="unknown torchvision detection model"):
        TorchvisionDetector.from_checkpoint(ckpt, arch="resnet18")


def test_torchvision_adapter_without_torchvision_says_so_in_one_line(tmp_path, monkeypatch):
    """torchvision is optional: loading a detector checkpoint without it is one clear error, not a traceback."""
    from safetensors.torch import save_file

    ckpt = str(tmp_path / "det.safetensors")
    save_file({"w": torch.zeros(1)}, ckpt, metadata={"arch": "ssdlite320_mobilenet_v3_large", "num_classes": "2"})
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision raises ImportError
    with pytest.raises(ImportError, match=r"needs torchvision \(pip install 'mgcl\[models\]'\)"):
        TorchvisionDetector.from_checkpoint(ckpt)
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": "g", "caption": "(a) x. (b) y."}) + "\n")
    rc, _, err = build_cli([tmp_path / "c.jsonl"], tmp_path / "b", "--split-compound", "--panel-detector", ckpt)
    assert rc == 2 and "needs torchvision" in one_line(err)


# ---- 2. captions --------------------------------------------------------------------------

def test_letters_with_and_without_parentheses_and_the_lead():
    cap = "Figure 1. A 45-year-old man. (A) Chest radiograph. (B) CT of the chest."
    subs, why = assign_subcaptions(cap, GRID[:2])
    assert why == "" and subs == ["Figure 1. A 45-year-old man. Chest radiograph.",
                                  "Figure 1. A 45-year-old man. CT of the chest."]
    for cap in ("a) Fundus photograph. b) OCT of the macula.", "A. Fundus photograph. B. OCT of the macula.",
                "A: Fundus photograph. B: OCT of the macula.", "(a) Fundus photograph. (b) OCT of the macula."):
        assert assign_subcaptions(cap, GRID[:2])[0] == ["Fundus photograph.", "OCT of the macula."], cap


@pytest.mark.parametrize("dash", ["-", "\u2013"])
def test_ranges_and_lists(dash):
    cap = f"Case 4. (a) Axial CT. (b{dash}d) Coronal reconstructions."
    assert split_caption(cap).segments[1].panels == (1, 2, 3)
    subs, _ = assign_subcaptions(cap, GRID)
    assert subs == ["Case 4. Axial CT."] + ["Case 4. Coronal reconstructions."] * 3
    subs, _ = assign_subcaptions("(A, B) Endoscopy. (C and D) Histology.", GRID)
    assert subs == ["Endoscopy.", "Endoscopy.", "Histology.", "Histology."]
    subs, _ = assign_subcaptions("Figure 2: (a) and (b) show X-rays; (c) shows CT.", GRID[:3])
    assert subs == ["Figure 2: show X-rays"] * 2 + ["Figure 2: shows CT."]
    subs, _ = assign_subcaptions("Panels A and B show the X-ray; panel C shows the CT.", GRID[:3])
    assert subs == ["Panels A and B show the X-ray"] * 2 + ["panel C shows the CT."]


def test_roman_numerals():
    subs, _ = assign_subcaptions("Histology. (i) H&E, x40. (ii) Ki-67. (iii) CD20.", GRID[:3])
    assert subs == ["Histology. H&E, x40.", "Histology. Ki-67.", "Histology. CD20."]


def test_markers_that_close_their_text():
    subs, _ = assign_subcaptions("Chest x-ray (A), CT (B) and MRI (C) of a patient with sarcoidosis.", GRID[:3])
    assert subs == [f"{m} of a patient with sarcoidosis." for m in ("Chest x-ray", "CT", "MRI")]


def test_position_phrases():
    two = [(0, 0, 50, 50), (60, 0, 110, 50)]
    assert assign_subcaptions("Left: preoperative MRI. Right: postoperative MRI.", two)[0] == [
        "preoperative MRI.", "postoperative MRI."]
    assert assign_subcaptions("Fundus (left) and OCT (right) of the right eye.", two)[0] == [
        "Fundus of the right eye.", "OCT of the right eye."]
    stacked = [(0, 0, 50, 50), (0, 60, 50, 110)]
    assert assign_subcaptions("Upper panel: axial view. Lower panel: sagittal view.", stacked)[0] == [
        "axial view.", "sagittal view."]
    subs, _ = assign_subcaptions("MRI. Top left: T1. Top right: T2. Bottom left: FLAIR. Bottom right: DWI.", GRID)
    assert subs == ["MRI. T1.", "MRI. T2.", "MRI. FLAIR.", "MRI. DWI."]
    subs, why = assign_subcaptions("Top: T1. Bottom: T2.", two)  # a row word, but the panels lie in one row
    assert subs is None and "names no panel" in why


def test_captions_without_markers_stay_whole():
    for cap in ("Representative images of tumour sections. Scale bar, 50 um.",
                "The patient was seen at a clinic. A CT scan was done.",
                "Vitamin A deficiency (see text)."):
        assert split_caption(cap).segments == ()
        assert assign_subcaptions(cap, GRID) == ([cap] * 4, "")


def test_markers_that_do_not_fit_the_panels():
    subs, why = assign_subcaptions("(a) One. (b) Two. (c) Three. (d) Four.", GRID[:3])
    assert subs is None and "names 4 panels (a-d), the image splits into 3" in why
    # a repeated earlier letter inside a sentence is text, a gap is not a scheme
    assert split_caption("(A) X-ray. (B) CT compared with (A).").segments[1].text == "CT compared with (A)."


# ---- 4. the generated compound-figure set: the floors ------------------------------------

def test_floors_on_mosaics_with_gutters(figures):
    ev = gen.evaluate(figures)
    g = ev["subsets"]["with gutters"]
    assert g["figures"] >= 50 and g["marked_figures"] >= 30
    assert g["precision"] >= 0.9 and g["recall"] >= 0.9, g
    # caption assignment: right for every panel of every marked caption, given the panels ...
    assert ev["subsets"]["all"]["caption_accuracy_given_boxes"] == 1.0
    # ... and for every figure whose panels the splitter found exactly
    exact = [r for r in ev["figures"] if r["marked"] and r["fp"] == r["fn"] == 0]
    assert len(exact) >= 30 and all(r["caption_right"] == r["panels"] for r in exact)


# ---- 3. the builder -------------------------------------------------------------------------

def entries(bank) -> dict:
    return MemoryBank.open(str(bank)).meta


def test_split_compound_build_entries_meta_and_groups(figures, tmp_path):
    figs = [f for f in figures if f.gutter and f.marked][:10]
    corpus = write_figures(tmp_path, figs, extra=[{"id": "t", "caption": "a record without an image"}])
    m = build_bank([corpus], str(tmp_path / "bank"), embedder=EMB, split_compound=True, shard_size=16,
                   progress=False)
    meta = entries(tmp_path / "bank")
    assert meta["parent"][-1] == "t" and meta["panel"][-1] == -1 and meta["id"][-1] == "t"
    by_parent = {}
    for i, (p, k) in enumerate(zip(meta["parent"], meta["panel"])):
        by_parent.setdefault(p, []).append((int(k), i))
    for j, f in enumerate(figs):
        rows = by_parent[f"f{j}"]
        if len(rows) == 1 and rows[0][0] == -1:  # kept whole (listed in skipped.jsonl)
            continue
        assert [k for k, _ in rows] == list(range(len(rows)))
        for k, i in rows:
            assert meta["id"][i] == f"f{j}#p{k}"
            base, box = split_crop(meta["image"][i])
            assert base.endswith(f"img/f{j}.{'jpg' if f.fmt == 'jpeg' else 'png'}") and box is not None
            crop = open_image(meta["image"][i])
            assert crop.size == (box[2] - box[0], box[3] - box[1])
        if len(rows) == len(f.boxes):
            assert [meta["caption"][i] for _, i in rows] == f.expected
    # the caption group follows the sub-caption: panels sharing one ("(b-d) ...") share a group
    g = meta["group"]
    for i in range(len(g)):
        assert g[i] == min(j for j in range(len(g)) if meta["caption"][j] == meta["caption"][i])
    assert m["build"]["compound"]["figures_split"] >= 8 and m["build"]["records"] == len(g)
    assert m["build"]["files"][0]["read"] == len(figs) + 1 == m["build"]["files"][0]["kept"]


def test_panel_references_feed_the_visual_rerank(figures, tmp_path):
    figs = [f for f in figures if f.gutter][:4]
    corpus = write_figures(tmp_path, figs)
    vlm = FixtureVLM()
    build_bank([corpus], str(tmp_path / "bank"), embedder=EMB, vlm=vlm, split_compound=True, progress=False)
    bank = MemoryBank.open(str(tmp_path / "bank"))
    assert len(bank) > len(figs)
    from mgcl.retrieval.vlm import encode_images

    want, ok = encode_images(vlm, bank.meta["image"])
    assert ok.all()
    torch.testing.assert_close(bank.image_embeddings(np.arange(len(bank))).float(), want.float(), atol=2e-3, rtol=0)


def test_split_compound_build_resumes_after_a_kill(figures, tmp_path):
    corpus = write_figures(tmp_path, figures[:24])
    kw = dict(embedder=EMB, split_compound=True, shard_size=8, batch_size=3, progress=False)
    ref = tmp_path / "ref"
    build_bank([corpus], str(ref), **kw)
    want = file_hashes(str(ref))
    for stage, shard in (("shard_written", 2), ("committed", 3), ("before_finalize", 0)):
        out = tmp_path / f"run-{stage}"

        def hook(s, j, stage=stage, shard=shard):
            if s == stage and (j == shard or stage == "before_finalize"):
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            build_bank([corpus], str(out), _hook=hook, **kw)
        build_bank([corpus], str(out), **kw)
        assert file_hashes(str(out)) == want, stage
    # a build left unfinished with one splitter is not resumed with another
    def stop(s, j):
        if s == "committed":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_bank([corpus], str(tmp_path / "x"), _hook=stop, **kw)
    with pytest.raises(BankError, match="different settings .*split_compound"):
        build_bank([corpus], str(tmp_path / "x"), panel_detector=GutterSplitter(min_panel=20), **kw)


def test_split_compound_build_resumes_after_sigkill(figures, tmp_path):
    """A real kill -9 while shard 1 is being written, then a restart: the same files as an unbroken build."""
    corpus = write_figures(tmp_path, figures[:16])
    out, ref = tmp_path / "killed", tmp_path / "ref"
    script = textwrap.dedent(f"""
        import os, signal
        from mgcl.retrieval import build_bank
        def hook(stage, j):
            if stage == "shard_written" and j == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        build_bank([{corpus!r}], {str(out)!r}, embedder={EMB!r}, split_compound=True, shard_size=8,
                   progress=False, _hook=hook)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    assert json.loads((out / ".build/state.json").read_text())["done"] == 1
    build_bank([corpus], str(out), embedder=EMB, split_compound=True, shard_size=8, progress=False)
    build_bank([corpus], str(ref), embedder=EMB, split_compound=True, shard_size=8, progress=False)
    assert file_hashes(str(out)) == file_hashes(str(ref))


def test_without_the_flag_nothing_changes(figures, tmp_path):
    corpus = write_figures(tmp_path, figures[:12])
    m = build_bank([corpus], str(tmp_path / "plain"), embedder=EMB, progress=False)
    meta = entries(tmp_path / "plain")
    assert set(meta) == {"id", "caption", "image", "domain", "group"}
    assert meta["id"] == [f"f{i}" for i in range(12)] and not any("#crop=" in r for r in meta["image"])
    assert "compound" not in m["build"] and "split_compound" not in m["build"]["config"]
    import pyarrow.parquet as pq

    assert pq.read_schema(tmp_path / "plain" / "meta.parquet").names == ["id", "caption", "image", "domain", "group"]
    with pytest.raises(ValueError, match="only with split_compound"):
        build_bank([corpus], str(tmp_path / "x"), embedder=EMB, panel_detector=GutterSplitter(), progress=False)


# ---- 5. bad input ---------------------------------------------------------------------------

def test_figures_that_cannot_be_split_stay_whole_with_the_reason(tmp_path):
    os.makedirs(tmp_path / "img")
    mosaic(GRID, (132, 112)).save(tmp_path / "img/grid.png")
    mosaic([(0, 0, 60, 50), (60, 0, 120, 50)], (120, 50)).save(tmp_path / "img/abut.png")
    (tmp_path / "img/junk.png").write_bytes(b"not an image")
    (tmp_path / "img/bomb.png").write_bytes(bomb_png())
    rows = [{"id": "grid3", "caption": "(a) One. (b) Two. (c) Three.", "image": "img/grid.png"},
            {"id": "abut", "caption": "(A) Left image. (B) Right image.", "image": "img/abut.png"},
            {"id": "plain", "caption": "Two abutting images.", "image": "img/abut.png"},
            {"id": "junk", "caption": "(a) x. (b) y.", "image": "img/junk.png"},
            {"id": "bomb", "caption": "(a) x. (b) y.", "image": "img/bomb.png"},
            {"id": "grid", "caption": "(a) One. (b) Two. (c) Three. (d) Four.", "image": "img/grid.png"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = build_cli([tmp_path / "c.jsonl"], tmp_path / "bank", "--split-compound", "--allow-skipped")
    assert rc == 0, err
    meta = entries(tmp_path / "bank")
    assert meta["id"] == ["grid3", "abut", "plain", "junk", "bomb", "grid#p0", "grid#p1", "grid#p2", "grid#p3"]
    assert meta["caption"][:5] == [r["caption"] for r in rows[:5]]  # kept whole: the whole caption
    notes = {r["position"]: r for r in skipped_rows(tmp_path / "bank")}
    assert set(notes) == {"line 1", "line 2", "line 4", "line 5"}
    assert notes["line 1"]["action"] == "kept whole" and "names 3 panels (a-c), the image splits into 4" in \
        notes["line 1"]["reason"]
    assert notes["line 2"]["action"] == "kept whole" and notes["line 2"]["reason"].startswith("no panels found")
    assert notes["line 4"]["action"] == "kept without a readable image" and "junk.png" in notes["line 4"]["reason"]
    assert "pixel" in notes["line 5"]["reason"] and "bomb.png" in notes["line 5"]["reason"]
    assert all(set(r) >= {"file", "position", "reason", "action"} for r in notes.values())
    assert "split 1 compound figure(s) into 4 panel entries; 2 figure(s) that could not be split kept whole" in out


def test_a_failing_detector_keeps_the_figure_whole(tmp_path):
    os.makedirs(tmp_path / "img")
    mosaic(GRID, (132, 112)).save(tmp_path / "img/grid.png")
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": "g", "caption": "(a) x. (b) y.", "image": "img/grid.png"}))

    def broken(image):
        raise RuntimeError("out of memory")

    build_bank([str(tmp_path / "c.jsonl")], str(tmp_path / "bank"), embedder=EMB, split_compound=True,
               panel_detector=broken, progress=False)
    assert entries(tmp_path / "bank")["id"] == ["g"]
    (row,) = skipped_rows(tmp_path / "bank")
    assert row["action"] == "kept whole" and row["reason"] == "panel detector failed: RuntimeError: out of memory"


def test_a_figure_of_more_than_max_panels_stays_whole(tmp_path):
    from mgcl.retrieval.cleanse import MAX_PANELS, split_record
    from mgcl.retrieval.corpus import Record

    mosaic(GRID, (132, 112)).save(tmp_path / "g.png")
    rec = Record("g", "(a) x. (b) y.", str(tmp_path / "g.png"), "", "c.jsonl", "line 1")
    grid = [(x, y, x + 4, y + 4) for x in range(0, 130, 5) for y in range(0, 15, 5)]  # 26 x 3 = 78 boxes
    assert len(grid) > MAX_PANELS
    ((out, problem, why),) = split_record(rec, detector=lambda im: grid)
    assert out is rec and problem is None and why == f"too many panels: {len(grid)} found, more than {MAX_PANELS}"
    assert len(split_record(rec, detector=lambda im: grid[:2])) == 2  # two panels: split


def test_the_pixel_limit_bounds_figures_and_panels(tmp_path):
    os.makedirs(tmp_path / "img")
    mosaic(GRID, (132, 112)).save(tmp_path / "img/grid.png")
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": "g", "caption": "(a) a. (b) b. (c) c. (d) d.",
                                                  "image": "img/grid.png"}))
    rc, _, err = build_cli([tmp_path / "c.jsonl"], tmp_path / "bank", "--split-compound", "--max-image-pixels",
                           10_000, "--allow-skipped")
    assert rc == 0, err
    assert entries(tmp_path / "bank")["id"] == ["g"]
    (row,) = skipped_rows(tmp_path / "bank")
    assert row["action"] == "kept without a readable image" and "pixel" in row["reason"]
    # a panel reference is held to the limit of the whole image, and to the image's bounds
    ref = crop_ref(str(tmp_path / "img/grid.png"), GRID[0])
    assert open_image(ref).size == (60, 50)
    with pytest.raises(UnreadableImage, match="pixel"):
        open_image(ref, 10_000)
    bad = crop_ref(str(tmp_path / "img/grid.png"), (100, 100, 200, 200))
    assert "outside the 132x112 image" in check_image(bad)
    assert crop_ref(ref, (1, 2, 3, 4)) == str(tmp_path / "img/grid.png") + "#crop=5,6,7,8"


def test_cli_flags(tmp_path):
    os.makedirs(tmp_path / "img")
    mosaic(GRID, (132, 112)).save(tmp_path / "img/grid.png")
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": "g", "caption": "(a) a. (b) b. (c) c. (d) d.",
                                                  "image": "img/grid.png"}))
    rc, _, err = build_cli([tmp_path / "c.jsonl"], tmp_path / "b1", "--panel-detector", tmp_path / "x")
    assert rc == 2 and "--panel-detector is used only with --split-compound" in one_line(err)
    rc, _, err = build_cli([tmp_path / "c.jsonl"], tmp_path / "b2", "--split-compound", "--panel-detector",
                           tmp_path / "none.safetensors")
    assert rc == 2 and "none.safetensors" in one_line(err)
    rc, out, err = build_cli([tmp_path / "c.jsonl"], tmp_path / "b3", "--split-compound")
    assert rc == 0, err
    assert entries(tmp_path / "b3")["caption"] == ["a.", "b.", "c.", "d."]
