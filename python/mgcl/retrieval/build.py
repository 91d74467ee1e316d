"""The resumable bank builder behind ``mgcl db build``.

Good records are numbered in corpus order and cut into shards of
``shard_size``; shard j is embedded in batches that never cross a shard
boundary, so its bytes do not depend on where a previous run stopped. Each
shard's files (embeddings, VLM image embeddings, a meta part) are written
atomically and only then recorded in ``.build/state.json``; a restarted build
re-reads the corpus, skips the recorded shards and redoes any shard that was
in flight. When every shard exists, meta.parquet, the BM25 cache and finally
manifest.json are written, so a build killed anywhere and restarted yields the
same files (sha256) as one that never stopped.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from typing import Callable, Optional

import numpy as np
import torch

from . import bank as bank_mod
from . import store
from .corpus import Record, Skipped, expand, read_corpus

STATE_VERSION = 1


def _corpus_fingerprint(files: list[str]) -> list[dict]:
    out = []
    for f in files:
        st = os.stat(f)
        out.append({"path": f, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _encode_images(vlm, refs: list[str], batch_size: int, device) -> tuple[torch.Tensor, int]:
    """Unit VLM image embeddings for ``refs`` (zero rows, counted, for unreadable images)."""
    from .images import open_image  # noqa: PLC0415

    tf = vlm.transform(False)
    rows, bad = [None] * len(refs), 0
    dim = None
    for s in range(0, len(refs), batch_size):
        chunk, pos = [], []
        for i in range(s, min(s + batch_size, len(refs))):
            try:
                chunk.append(tf(open_image(refs[i])))
                pos.append(i)
            except (OSError, ValueError, SyntaxError):
                bad += 1
        if chunk:
            with torch.no_grad():
                f = vlm.encode_image(torch.stack(chunk).to(device)).float().cpu()
            f = torch.nn.functional.normalize(f, dim=1)
            dim = f.shape[1]
            for i, r in zip(pos, f):
                rows[i] = r
    if dim is None:
        with torch.no_grad():
            dim = int(vlm.encode_text(vlm.tokenize(["x"]).to(device)).shape[1])
    zero = torch.zeros(dim)
    return torch.stack([r if r is not None else zero for r in rows]) if rows else torch.zeros(0, dim), bad


def build_bank(corpus, out: str, *, embedder="minilm", vlm=None, vlm_name: str | None = None,
               shard_size: int = 100_000, batch_size: int = 64, device: str | None = None,
               image_root: str | None = None, progress: bool = True,
               _hook: Optional[Callable[[str, int], None]] = None) -> dict:
    """Build (or resume building) the bank at ``out`` from ``corpus`` files/folders.

    ``embedder``: a name (see ``mgcl.retrieval.embedders``) or an object with
    ``name``, ``dim`` and ``encode``. ``vlm``: an object following the VLM
    protocol whose image embeddings are stored for reranking (``vlm_name`` is
    recorded in the manifest). Returns the manifest; its ``build`` entry counts
    the records used and the ones skipped, by reason (each skipped record is
    listed in ``skipped.jsonl``). Rerunning a finished build with the same
    settings returns its manifest and changes nothing. ``_hook(stage, shard)``
    is called at every commit point (tests inject failures there).
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    from .embedders import get_embedder  # noqa: PLC0415

    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"build_bank: shard_size must be an integer >= 1, got {shard_size!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"build_bank: batch_size must be an integer >= 1, got {batch_size!r}")
    hook = _hook or (lambda stage, j: None)
    files = expand(corpus)
    if not files:
        raise ValueError("build_bank: no corpus files (expected .jsonl, .parquet or WebDataset .tar)")
    out = os.path.abspath(out)
    mpath = os.path.join(out, "manifest.json")
    emb = get_embedder(embedder, device=device) if isinstance(embedder, str) or embedder is None else embedder
    if vlm is not None and vlm_name is None:
        vlm_name = getattr(vlm, "name", type(vlm).__name__)
    work = os.path.join(out, ".build")
    config = {"version": STATE_VERSION, "corpus": _corpus_fingerprint(files), "embedder": emb.name,
              "dim": int(emb.dim), "vlm": vlm_name, "shard_size": shard_size, "batch_size": batch_size,
              "image_root": os.path.abspath(image_root) if image_root else None}
    if os.path.exists(mpath):  # finished (maybe killed before cleaning up): a rerun of the same build is a no-op
        with open(mpath) as fh:
            manifest = json.load(fh)
        if manifest.get("build", {}).get("config") != config:
            raise bank_mod.BankError(f"build_bank: {out!r} already holds a finished bank built with other "
                                     "settings (remove it to rebuild)")
        shutil.rmtree(work, ignore_errors=True)
        return manifest
    os.makedirs(work, exist_ok=True)
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

    skipped: Counter = Counter()
    skipped_rows: list[dict] = []
    shards, vshards = [], []
    image_failures = 0
    buf: list[Record] = []
    n_good = 0
    dev = torch.device(device) if device else torch.device("cpu")

    def flush(j: int, recs: list[Record]):
        nonlocal image_failures
        rel = bank_mod.shard_name(j)
        part = os.path.join(work, f"meta-{j:05d}.json")
        if j < done:  # committed by an earlier run: reuse it if its files are intact
            with open(part) as fh:
                info = json.load(fh)
            files_ok = all(os.path.exists(os.path.join(out, e["path"]))
                           and store.sha256_file(os.path.join(out, e["path"])) == e["sha256"]
                           for e in (info["shard"], info.get("vlm")) if e)
            if files_ok and info["rows"] == len(recs):
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
        hook("embedded", j)
        entry = bank_mod.write_shard(out, j, torch.from_numpy(vecs))
        info = {"shard": entry, "rows": len(recs)}
        hook("shard_written", j)
        if vlm is not None:
            v, bad = _encode_images(vlm, [r.image for r in recs], batch_size, dev)
            info["vlm"] = bank_mod.write_shard(out, j, v, "vlm", bank_mod.VLM_KEY)
            info["vlm_dim"] = int(v.shape[1])
            info["image_failures"] = bad
            image_failures += bad
            vshards.append(info["vlm"])
            hook("vlm_written", j)
        store.atomic_write_json(part, info)
        shards.append(entry)
        hook("part_written", j)
        store.atomic_write_json(spath, {"config": config, "done": max(done, j + 1)})
        hook("committed", j)

    ids, caps, imgs, doms = [], [], [], []
    total_bytes = sum(f["size"] for f in config["corpus"])
    with tqdm(total=None, desc=f"embedding ({emb.name})", unit="rec", disable=not progress) as bar:
        for item in read_corpus(files, image_root=image_root):
            if isinstance(item, Skipped):
                skipped[item.reason.split(":")[0]] += 1
                skipped_rows.append({"source": item.source, "reason": item.reason})
                continue
            buf.append(item)
            ids.append(item.id)
            caps.append(item.caption)
            imgs.append(item.image)
            doms.append(item.domain)
            n_good += 1
            if len(buf) == shard_size:
                flush(len(shards), buf)
                bar.update(len(buf))
                buf = []
        if buf:
            flush(len(shards), buf)
            bar.update(len(buf))
    if n_good == 0:
        reasons = ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())) or "no records"
        raise ValueError(f"build_bank: the corpus has no usable records ({reasons}) in {len(files)} file(s)")
    if len(set(ids)) != len(ids):
        dup = len(ids) - len(set(ids))
        skipped_note = {"duplicate_ids": dup}
    else:
        skipped_note = {}
    hook("before_finalize", len(shards))
    store.atomic_write_bytes(os.path.join(out, "skipped.jsonl"),
                             "".join(json.dumps(r, sort_keys=True) + "\n" for r in skipped_rows).encode())
    vinfo = None
    if vlm is not None:
        with open(os.path.join(work, f"meta-{0:05d}.json")) as fh:
            vdim = json.load(fh)["vlm_dim"]
        vinfo = {"name": vlm_name, "dim": vdim, "shards": vshards}
    build = {"corpus": [f["path"] for f in config["corpus"]], "corpus_bytes": total_bytes, "records": n_good,
             "skipped": dict(sorted(skipped.items())), "skipped_total": sum(skipped.values()),
             "image_failures": image_failures, "shard_size": shard_size, **skipped_note, "config": config}
    manifest = bank_mod.finalize(out, ids=ids, captions=caps, images=imgs, domains=doms, shards=shards,
                                 dim=emb.dim, embedder=emb.name, vlm=vinfo, build=build, progress=progress)
    hook("finalized", len(shards))
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def report(manifest: dict) -> str:
    """A few lines summarising a build for the command line."""
    b = manifest.get("build", {})
    lines = [f"bank: {manifest['count']} entries, dim {manifest['dim']}, {len(manifest['shards'])} shard(s), "
             f"embedder {manifest['embedder']}" + (f", VLM {manifest['vlm']['name']}" if manifest.get("vlm") else "")]
    if b.get("skipped_total"):
        lines.append(f"skipped {b['skipped_total']} record(s) (listed in skipped.jsonl): "
                     + ", ".join(f"{v} {k}" for k, v in b["skipped"].items()))
    else:
        lines.append("skipped 0 records")
    if b.get("image_failures"):
        lines.append(f"{b['image_failures']} image(s) could not be read for VLM embeddings (zero vectors stored)")
    if b.get("duplicate_ids"):
        lines.append(f"warning: {b['duplicate_ids']} duplicate id(s) in the corpus")
    return "\n".join(lines)
