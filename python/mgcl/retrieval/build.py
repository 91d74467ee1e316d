"""The resumable bank builder behind ``mgcl db build``.

Good records are numbered in corpus order and cut into shards of
``shard_size``; shard j is embedded in batches that never cross a shard
boundary, so its bytes do not depend on where a previous run stopped. Each
shard's files (embeddings, VLM image embeddings, a meta part) are written
atomically and only then recorded in ``.build/state.json``; a restarted build
re-reads the corpus, skips the recorded shards whose records and files are
unchanged and redoes any other (the one in flight, a damaged one). When every
shard exists, meta.parquet, the BM25 cache and finally manifest.json are
written, so a build killed anywhere and restarted yields the same files
(sha256) as one that never stopped.

Nothing readable is lost (``corpus`` says how records are read): every
record that is skipped, repaired or kept without a readable image, and every
damaged container, is a line of ``skipped.jsonl`` (file, position, reason,
action) and is counted per file in the manifest's ``build`` entry. Every image
reference is opened at build time (readable, at most ``max_image_pixels``
pixels). A bank built with a VLM serves the visual rerank, so by default it
refuses entries without a readable image (``missing_images="skip"``); without
a VLM they are kept and listed (``"keep"``). ``problems(manifest)`` counts what
went wrong; ``mgcl db build`` exits 1 when it is not zero, unless
``--allow-skipped``.

``split_compound=True`` (``--split-compound``) adds one record-expansion
step after reading (``cleanse.split_record``): each figure is split into its
panels, one entry per panel with its sub-caption (``meta.parquet`` gains the
``parent`` and ``panel`` columns), or stays whole, with the reason as a
"kept whole" line of ``skipped.jsonl`` when its caption names panels that
its image does not show. Without it, nothing of the build changes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np
import torch

from .. import _io
from . import bank as bank_mod
from . import store
from .corpus import Damaged, Record, Skipped, expand, read_files
from .images import MAX_PIXELS, check_image

STATE_VERSION = 1
MISSING_IMAGES = ("skip", "keep")


def _corpus_fingerprint(files: list[str]) -> list[dict]:
    out = []
    for f in files:
        st = os.stat(f)
        out.append({"path": f, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _records_digest(recs: list[Record]) -> str:
    """What a shard holds, so a resumed build reuses it only for the same records."""
    h = hashlib.sha256()
    for r in recs:
        h.update(json.dumps([r.id, r.caption, r.image, r.domain]).encode())
    return h.hexdigest()


def _with_image_checks(items, max_pixels: int, split=None, chunk: int = 256):
    """``(item, reason, whole)`` in order: ``reason`` is why a record's image
    cannot be used (None when it can, or when the record has no image
    reference). ``split(record, max_pixels)`` (``cleanse.split_record``)
    replaces a record by its panels, ``whole`` saying why one stays whole."""
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        buf = []
        for item in items:
            buf.append(item)
            if len(buf) == chunk:
                yield from _check_chunk(pool, buf, max_pixels, split)
                buf = []
        yield from _check_chunk(pool, buf, max_pixels, split)


def _check_chunk(pool, items, max_pixels, split):
    def one(it):
        if not (isinstance(it, Record) and it.image):
            return [(it, None, None)]
        return split(it, max_pixels) if split else [(it, check_image(it.image, max_pixels), None)]

    return (row for rows in pool.map(one, items) for row in rows)


def _remove_temps(out: str) -> None:
    """Temporary files of the bank's writes killed before their rename: in the
    folders the builder owns, and beside the bank's top-level files."""
    for sub, names in ((".build", None), ("embeddings", None), ("vlm", None), ("bm25", None),
                       ("", ("manifest.json", "meta.parquet", "skipped.jsonl"))):
        folder = os.path.join(out, sub)
        for f in os.listdir(folder) if os.path.isdir(folder) else []:
            if any(_io.is_temp(f, n) for n in names) if names else _io.is_temp(f):
                os.remove(os.path.join(folder, f))


def build_bank(corpus, out: str, *, embedder="minilm", vlm=None, vlm_name: str | None = None,
               shard_size: int = 100_000, batch_size: int = 64, device: str | None = None,
               image_root: str | None = None, missing_images: str | None = None,
               max_image_pixels: int = MAX_PIXELS, external_images: bool = False, split_compound: bool = False,
               panel_detector=None, progress: bool = True,
               _hook: Optional[Callable[[str, int], None]] = None) -> dict:
    """Build (or resume building) the bank at ``out`` from ``corpus`` files/folders.

    ``embedder``: a name (see ``mgcl.retrieval.embedders``) or an object with
    ``name``, ``dim`` and ``encode``. ``vlm``: an object following the VLM
    protocol whose image embeddings are stored for reranking (``vlm_name`` is
    recorded in the manifest). ``missing_images``: ``"skip"`` (the default
    with a VLM) leaves out records without a readable image, ``"keep"`` (the
    default without) keeps them (a zero VLM vector). ``max_image_pixels``:
    larger images are unreadable. ``external_images``: accept image paths
    outside the corpus root. ``split_compound``: one entry per panel of each
    compound figure (module doc), found by ``panel_detector`` (a callable
    returning boxes, see ``cleanse``; default ``cleanse.GutterSplitter()``).
    Folders holding a bank, ``out`` among them, are not read as corpus.
    Returns the manifest; its ``build`` entry counts records kept, skipped
    (by reason), repaired and damaged, per file and in total (each one listed
    in ``skipped.jsonl``). Rerunning a finished build
    with the same settings returns its manifest and changes nothing.
    ``_hook(stage, shard)`` is called at every commit point (tests inject
    failures there).
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    from .embedders import get_embedder  # noqa: PLC0415
    from .vlm import encode_images  # noqa: PLC0415

    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"build_bank: shard_size must be an integer >= 1, got {shard_size!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"build_bank: batch_size must be an integer >= 1, got {batch_size!r}")
    if missing_images is None:
        missing_images = "skip" if vlm is not None else "keep"
    if missing_images not in MISSING_IMAGES:
        raise ValueError(f"build_bank: missing_images must be one of {MISSING_IMAGES}, got {missing_images!r}")
    if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1:
        raise ValueError(f"build_bank: max_image_pixels must be an integer >= 1, got {max_image_pixels!r}")
    if panel_detector is not None and not split_compound:
        raise ValueError("build_bank: panel_detector is used only with split_compound=True")
    if image_root is not None and not os.path.isdir(image_root):
        raise FileNotFoundError(f"build_bank: image root {image_root!r} is not a folder")
    hook = _hook or (lambda stage, j: None)
    out = os.path.abspath(out)
    excluded: list[str] = []
    files = expand(corpus, exclude=[out], excluded=excluded)
    if not files:
        what = f" (left out bank folder(s): {', '.join(excluded)})" if excluded else ""
        raise ValueError(f"build_bank: no corpus files (expected .jsonl, .parquet or WebDataset .tar){what}")
    mpath = os.path.join(out, "manifest.json")
    emb = get_embedder(embedder, device=device) if isinstance(embedder, str) or embedder is None else embedder
    if vlm is not None and vlm_name is None:
        vlm_name = getattr(vlm, "name", type(vlm).__name__)
    work = os.path.join(out, ".build")
    config = {"version": STATE_VERSION, "corpus": _corpus_fingerprint([f.path for f in files]), "embedder": emb.name,
              "dim": int(emb.dim), "vlm": vlm_name, "shard_size": shard_size, "batch_size": batch_size,
              "image_root": os.path.abspath(image_root) if image_root else None,
              "missing_images": missing_images, "max_image_pixels": max_image_pixels,
              "external_images": bool(external_images)}
    split = None
    if split_compound:  # only then in the config: a build without it stays byte for byte what it was
        from functools import partial  # noqa: PLC0415

        from . import cleanse  # noqa: PLC0415

        detector = panel_detector if panel_detector is not None else cleanse.GutterSplitter()
        split = partial(cleanse.split_record, detector=detector)
        config["split_compound"] = cleanse.detector_name(detector)
    if os.path.exists(mpath):  # finished (maybe killed before cleaning up): a rerun of the same build is a no-op
        with open(mpath) as fh:
            manifest = json.load(fh)
        if manifest.get("build", {}).get("config") != config:
            raise bank_mod.BankError(f"build_bank: {out!r} already holds a finished bank built with other "
                                     "settings (remove it to rebuild)")
        shutil.rmtree(work, ignore_errors=True)
        return manifest
    os.makedirs(work, exist_ok=True)
    _remove_temps(out)
    spath = os.path.join(work, "state.json")
    done = 0
    if os.path.exists(spath):
        with open(spath) as fh:
            state = json.load(fh)
        if state.get("config") != config:
            diff = sorted(k for k in config if state.get("config", {}).get(k) != config[k])
            raise bank_mod.BankError(f"build_bank: {out!r} holds an unfinished build with different settings "
                                     f"({', '.join(diff)}); use another --out or delete it")
        done = int(state["done"])
    else:
        store.atomic_write_json(spath, {"config": config, "done": 0})

    shards, vshards = [], []
    image_failures = 0

    def flush(j: int, recs: list[Record]):
        nonlocal image_failures
        part = os.path.join(work, f"meta-{j:05d}.json")
        digest = _records_digest(recs)
        if j < done:  # committed by an earlier run: reuse it if its records and files are the same
            with open(part) as fh:
                info = json.load(fh)
            files_ok = all(os.path.exists(os.path.join(out, e["path"]))
                           and store.sha256_file(os.path.join(out, e["path"])) == e["sha256"]
                           for e in (info["shard"], info.get("vlm")) if e)
            if files_ok and info["rows"] == len(recs) and info.get("records") == digest:
                shards.append(info["shard"])
                if info.get("vlm"):
                    vshards.append(info["vlm"])
                image_failures += info.get("image_failures", 0)
                return
        caps = [r.caption for r in recs]
        vecs = np.concatenate([emb.encode(caps[s:s + batch_size], batch_size)
                               for s in range(0, len(caps), batch_size)])
        if vecs.shape != (len(caps), emb.dim):
            raise RuntimeError(f"embedder {emb.name!r} returned {vecs.shape}, expected {(len(caps), emb.dim)}")
        bad = np.nonzero(~np.isfinite(vecs).all(1))[0]
        if len(bad):
            raise RuntimeError(f"embedder {emb.name!r} returned NaN or inf for {len(bad)} record(s), the first "
                               f"{recs[bad[0]].file}, {recs[bad[0]].position} (caption {recs[bad[0]].caption[:60]!r})")
        hook("embedded", j)
        entry = bank_mod.write_shard(out, j, torch.from_numpy(vecs))
        info = {"shard": entry, "rows": len(recs), "records": digest}
        hook("shard_written", j)
        if vlm is not None:
            v, ok = encode_images(vlm, [r.image for r in recs], batch_size)
            info["vlm"] = bank_mod.write_shard(out, j, v, "vlm", bank_mod.VLM_KEY)
            info["vlm_dim"] = int(v.shape[1])
            info["image_failures"] = int((~ok).sum())
            image_failures += info["image_failures"]
            vshards.append(info["vlm"])
            hook("vlm_written", j)
        store.atomic_write_json(part, info)
        shards.append(entry)
        hook("part_written", j)
        store.atomic_write_json(spath, {"config": config, "done": max(done, j + 1)})
        hook("committed", j)

    per_file = {f.path: {"path": f.path, "read": 0, "kept": 0, "skipped": 0, "repaired": 0, "unreadable_images": 0,
                         "damaged": []} for f in files}
    skipped: Counter = Counter()
    counts: Counter = Counter()
    rows: list[dict] = []  # skipped.jsonl

    def note(item, action: str, reason: str, **extra):
        rows.append({"file": item.file, "position": item.position, "reason": reason, "action": action, **extra})

    buf: list[Record] = []
    ids, caps, imgs, doms = [], [], [], []
    parents, panels = [], []  # with split_compound
    kept_whole: Counter = Counter()
    items = read_files(files, image_root, external_images=external_images)
    with tqdm(total=None, desc=f"embedding ({emb.name})", unit="rec", disable=not progress) as bar:
        for item, image_problem, whole in _with_image_checks(items, max_image_pixels, split):
            pf = per_file[item.file]
            if isinstance(item, Damaged):
                pf["damaged"].append({"position": item.position, "reason": item.reason,
                                      "records_read": item.records_read})
                note(item, "damaged", item.reason, records_read=item.records_read)
                continue
            later_panel = isinstance(item, Record) and item.panel > 0  # read and kept once, as panel 0
            pf["read"] += not later_panel
            if isinstance(item, Record) and missing_images == "skip" and (image_problem or not item.image):
                item = Skipped(item.file, item.position, f"unreadable image: {image_problem}" if image_problem
                               else "no image: the bank serves the visual rerank (--missing-images keep keeps it)")
            if isinstance(item, Skipped):
                pf["skipped"] += 1
                skipped[item.reason.split(":")[0]] += 1
                note(item, "skipped", item.reason)
                continue
            pf["kept"] += not later_panel
            if item.repaired:
                pf["repaired"] += 1
                counts["repaired"] += 1
                note(item, "repaired", item.repaired)
            if image_problem:
                pf["unreadable_images"] += 1
                counts["unreadable_images"] += 1
                note(item, "kept without a readable image", image_problem)
            elif not item.image:
                counts["without_image"] += 1
            if whole:
                kept_whole[whole.split(":")[0]] += 1
                note(item, "kept whole", whole)
            buf.append(item)
            ids.append(item.id)
            caps.append(item.caption)
            imgs.append(item.image)
            doms.append(item.domain)
            if split:
                parents.append(item.parent or item.id)
                panels.append(item.panel)
                counts["figures_split"] += item.panel == 0
            if len(buf) == shard_size:
                flush(len(shards), buf)
                bar.update(len(buf))
                buf = []
        if buf:
            flush(len(shards), buf)
            bar.update(len(buf))
    damaged = sum(bool(p["damaged"]) for p in per_file.values())
    if not ids:
        reasons = ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())) or "no records"
        hurt = f"; {damaged} damaged file(s)" if damaged else ""
        raise ValueError(f"build_bank: the corpus has no usable records ({reasons}{hurt}) in {len(files)} file(s)")
    dup = len(ids) - len(set(ids))
    hook("before_finalize", len(shards))
    store.atomic_write_bytes(os.path.join(out, "skipped.jsonl"),
                             "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
    vinfo = None
    if vlm is not None:
        with open(os.path.join(work, f"meta-{0:05d}.json")) as fh:
            vdim = json.load(fh)["vlm_dim"]
        vinfo = {"name": vlm_name, "dim": vdim, "shards": vshards}
    build = {"corpus": [f["path"] for f in config["corpus"]], "corpus_bytes": sum(f["size"] for f in config["corpus"]),
             "records": len(ids), "skipped": dict(sorted(skipped.items())), "skipped_total": sum(skipped.values()),
             "repaired": counts["repaired"], "damaged_files": damaged,
             "unreadable_images": counts["unreadable_images"], "without_image": counts["without_image"],
             "image_failures": image_failures, "excluded": excluded, "files": list(per_file.values()),
             "shard_size": shard_size, **({"duplicate_ids": dup} if dup else {}), "config": config}
    extra = None
    if split:
        build["compound"] = {"detector": config["split_compound"], "figures_split": counts["figures_split"],
                             "panels": sum(p >= 0 for p in panels), "kept_whole": sum(kept_whole.values()),
                             "kept_whole_reasons": dict(sorted(kept_whole.items()))}
        extra = {"parent": parents, "panel": panels}
    manifest = bank_mod.finalize(out, ids=ids, captions=caps, images=imgs, domains=doms, shards=shards,
                                 dim=emb.dim, embedder=emb.name, vlm=vinfo, build=build, extra=extra,
                                 progress=progress)
    hook("finalized", len(shards))
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def problems(manifest: dict) -> int:
    """Records skipped, containers damaged and entries kept without a readable
    image: what makes ``mgcl db build`` exit 1 (unless --allow-skipped)."""
    b = manifest.get("build", {})
    return int(b.get("skipped_total", 0)) + int(b.get("damaged_files", 0)) + int(b.get("unreadable_images", 0))


def report(manifest: dict, max_files: int = 20) -> str:
    """A few lines summarising a build for the command line."""
    b = manifest.get("build", {})
    lines = [f"bank: {manifest['count']} entries, dim {manifest['dim']}, {len(manifest['shards'])} shard(s), "
             f"embedder {manifest['embedder']}" + (f", VLM {manifest['vlm']['name']}" if manifest.get("vlm") else "")]
    if b.get("skipped_total"):
        lines.append(f"skipped {b['skipped_total']} record(s) (listed in skipped.jsonl): "
                     + ", ".join(f"{v} {k}" for k, v in b["skipped"].items()))
    else:
        lines.append("skipped 0 records")
    if b.get("repaired"):
        lines.append(f"repaired the text of {b['repaired']} record(s) (kept; listed in skipped.jsonl)")
    if b.get("unreadable_images"):
        lines.append(f"{b['unreadable_images']} record(s) kept without a readable image (listed in skipped.jsonl)")
    if b.get("image_failures"):
        lines.append(f"{b['image_failures']} image(s) could not be read for VLM embeddings (zero vectors stored)")
    c = b.get("compound")
    if c:
        lines.append(f"split {c['figures_split']} compound figure(s) into {c['panels']} panel entries; "
                     f"{c['kept_whole']} figure(s) that could not be split kept whole (listed in skipped.jsonl)"
                     + "".join(f"; {v} {k}" for k, v in c["kept_whole_reasons"].items()))
    for p in b.get("excluded", []):
        lines.append(f"left out {p}: an mgcl bank, not corpus")
    hurt = [f for f in b.get("files", []) if f["damaged"] or f["skipped"] or f["repaired"] or f["unreadable_images"]]
    if hurt:
        lines.append(f"per file (read / kept / skipped; {len(b['files']) - len(hurt)} other file(s) clean):")
        for f in hurt[:max_files]:
            line = f"  {f['path']}: {f['read']} / {f['kept']} / {f['skipped']}"
            for d in f["damaged"]:
                line += f"; DAMAGED at {d['position'] or 'start'}: {d['reason']} ({d['records_read']} records read)"
            lines.append(line)
        if len(hurt) > max_files:
            lines.append(f"  ... and {len(hurt) - max_files} more (manifest.json build.files, skipped.jsonl)")
    if b.get("duplicate_ids"):
        lines.append(f"warning: {b['duplicate_ids']} duplicate id(s) in the corpus")
    return "\n".join(lines)
