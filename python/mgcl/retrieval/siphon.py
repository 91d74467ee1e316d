"""The Dynamic Siphon (SPEC.md section 4): the reference set a task distils on.

For task i with finished tasks T_1..T_{i-1} (``history``):
- task level: every class prompt of the finished tasks, top-a each;
- domain level: every pool question whose domain is one of the finished
  tasks' domains (mapper Phi_D), top-b each;
- general level: a seeded sample of ``n_general`` pool questions from the other
  domains, top-c each.
Each query runs the multi-stage retrieval (``rerank.retrieve``). The union is
de-duplicated by bank entry; an entry found at several levels keeps the
highest one (task > domain > general), and within a level its best score.

Uniform mode (PRIMED_uni): ``uniform_set(size)`` retrieves a fixed number of
entries spread evenly over ~30 domain keywords.

Both take ``stages`` ("multi-stage", "dense-only" or "bm25-only"), the
retrieval pipeline each query runs (``rerank.retrieve``; the paper's
retrieval ablation).

``Siphon.from_bank(dir, ...)`` is the one way to make a Siphon from a bank
directory. Every Siphon embeds its queries through a ``CachedEmbedder`` one
text at a time, so a resumed run retrieves exactly what an uninterrupted one
did. A finished task is a ``FinishedTask`` (``mgcl.cl.Task.finished()`` makes
one). A ``ReferenceSet`` is rows (save / load, level counts); batching and
image decoding are the training side's (``mgcl.cl``).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from . import pool as pool_mod
from .embedders import CachedEmbedder, for_bank
from .rerank import retrieve
from .vlm import encode_images, encode_texts

LEVELS = ("task", "domain", "general", "uniform")
COLUMNS = ("index", "id", "caption", "image", "domain", "level", "query", "score")


class ReferenceSet:
    """Image-caption pairs with their bank index, level and the query that found them."""

    def __init__(self, rows: Optional[list[dict]] = None):
        self.rows = list(rows or [])
        for r in self.rows:
            missing = [c for c in COLUMNS if c not in r]
            if missing:
                raise ValueError(f"ReferenceSet: row lacks {missing}")
            if r["level"] not in LEVELS:
                raise ValueError(f"ReferenceSet: unknown level {r['level']!r}; expected one of {LEVELS}")

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def __repr__(self) -> str:
        return f"ReferenceSet({len(self)} pairs, {self.level_counts()})"

    def level_counts(self) -> dict[str, int]:
        out = {lvl: 0 for lvl in LEVELS}
        for r in self.rows:
            out[r["level"]] += 1
        return {k: v for k, v in out.items() if v or k != "uniform"}

    def indices(self) -> list[int]:
        return [r["index"] for r in self.rows]

    def save(self, path: str) -> None:
        import pyarrow as pa  # noqa: PLC0415

        from .store import atomic_write_table  # noqa: PLC0415

        types = {"index": pa.int64(), "score": pa.float32()}
        table = pa.table({c: pa.array([r[c] for r in self.rows], types.get(c, pa.string())) for c in COLUMNS})
        atomic_write_table(os.fspath(path), table)

    @classmethod
    def load(cls, path: str) -> "ReferenceSet":
        import pyarrow.parquet as pq  # noqa: PLC0415

        t = pq.read_table(os.fspath(path))
        missing = [c for c in COLUMNS if c not in t.column_names]
        if missing:
            raise ValueError(f"{path}: not a reference set (missing columns {missing})")
        cols = {c: t.column(c).to_pylist() for c in COLUMNS}
        return cls([{c: cols[c][i] for c in COLUMNS} for i in range(t.num_rows)])


@dataclass(frozen=True)
class FinishedTask:
    """What the Siphon needs of a finished task: its ``name``, its declared
    ``domain`` ("" when unknown), one ``prompts`` per class, and optionally
    ``images``, a map-style dataset of its training images (items are images or
    ``(image, label)`` pairs; Phi_D looks at a few when the domain is unknown)."""

    name: str
    domain: str
    prompts: tuple
    images: Optional[Sequence] = None

    def __post_init__(self):
        p = self.prompts
        if isinstance(p, str) or not p or not all(isinstance(x, str) for x in p):
            raise ValueError(f"FinishedTask {self.name!r}: needs a non-empty list of class prompts, got {p!r}")
        object.__setattr__(self, "prompts", tuple(p))


def _finished(task) -> FinishedTask:
    if not isinstance(task, FinishedTask):
        raise ValueError(f"Siphon: a finished task is a mgcl.retrieval.FinishedTask (mgcl.cl.Task.finished() "
                         f"makes one), got {type(task).__name__}")
    return task


def _int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"Siphon: {name} must be an integer >= {lo}, got {v!r}")
    return int(v)


class Siphon:
    """Builds reference sets from a bank and a question pool (module doc).

    Args:
        bank: an opened ``MemoryBank`` (from a directory: ``Siphon.from_bank``).
        pool: ``list[Question]`` (``load_pool()``).
        embedder: the query embedder (an object or a name; None: the one named
            in the bank's manifest), wrapped in a one-text-at-a-time
            ``CachedEmbedder`` unless it is one.
        vlm: a VLM (``mgcl.models`` protocol) for the visual rerank and the
            zero-shot domain mapper; None: S_v is the dense score.
        a, b, c: candidates per task / domain / general query.
        n_general: general questions sampled per reference set.
        k_v: images kept per caption group.
        seed: the general sample's seed.
    """

    def __init__(self, bank, pool, embedder=None, *, vlm=None, a: int = 30, b: int = 30, c: int = 80,
                 n_general: int = 100, k_v: int = 1, seed: int = 0, k1: float = 1.5, bm25_b: float = 0.75,
                 backend: str = "exact", taxonomy: Optional[str] = None):
        self.bank, self.vlm = bank, vlm
        self.pool = list(pool)
        if not self.pool:
            raise ValueError("Siphon: empty question pool")
        self.a, self.b, self.c = _int("a", a, 1), _int("b", b, 1), _int("c", c, 1)
        self.n_general, self.k_v, self.seed = _int("n_general", n_general, 0), _int("k_v", k_v, 1), int(seed)
        self.k1, self.bm25_b, self.backend, self.taxonomy = k1, bm25_b, backend, taxonomy
        embedder = bank.embedder if embedder is None else for_bank(embedder, bank)
        if not (isinstance(embedder, CachedEmbedder) and embedder.one_by_one):
            embedder = CachedEmbedder(embedder, one_by_one=True)
        self.embedder = embedder
        if int(embedder.dim) != bank.dim:
            raise ValueError(f"Siphon: embedder {getattr(embedder, 'name', '?')!r} gives {embedder.dim}-d vectors; "
                             f"the bank has dim {bank.dim}")
        self.domains = pool_mod.domains(self.pool)
        self.image_cache: dict = {}
        self.last_domains: dict[str, str] = {}
        self.last_timings: dict[str, float] = {}

    @classmethod
    def from_bank(cls, path: str, *, pool=None, pool_per_domain: Optional[int] = None, embedder=None, vlm=None,
                  **options) -> "Siphon":
        """A Siphon over the bank directory ``path``: ``pool`` is a question-pool
        file, a list of questions or None (the built-in pool); ``pool_per_domain``
        keeps a sample of at most that many questions per domain (seeded with the
        Siphon's ``seed``); ``embedder`` and ``vlm`` and the other ``options`` as in
        the constructor."""
        from .bank import MemoryBank  # noqa: PLC0415

        questions = pool_mod.load_pool(pool) if pool is None or isinstance(pool, str) else list(pool)
        questions = sample_per_domain(questions, pool_per_domain, options.get("seed", 0))
        return cls(MemoryBank.open(path), questions, embedder, vlm=vlm, **options)

    # ---- Phi_D --------------------------------------------------------------------------

    def _domain_prompts(self) -> list[str]:
        desc = pool_mod.domain_descriptions(self.taxonomy)
        return [f"a {desc.get(d, d)}" for d in self.domains]

    def map_domain(self, task) -> str:
        """Phi_D: the task's declared domain when the pool knows it (names and
        taxonomy aliases), else zero-shot classification over the pool's domains:
        the VLM's image embeddings of up to 32 training images (or, without
        images, its text embeddings of the class prompts) against one prompt per
        domain; without a VLM, the text embedder on the class prompts."""
        task = _finished(task)
        hit = pool_mod.resolve_domain(task.domain, self.domains, self.taxonomy)
        if hit is not None:
            return hit
        dom_prompts = self._domain_prompts()
        if self.vlm is not None:
            dt = encode_texts(self.vlm, dom_prompts)
            feats = self._task_image_features(task)
            if feats is None:
                feats = encode_texts(self.vlm, list(task.prompts))
            votes = np.bincount((feats @ dt.T).argmax(1).numpy(), minlength=len(self.domains))
            return self.domains[int(votes.argmax())]
        pe = torch.from_numpy(self.embedder.encode(list(task.prompts), 64)).mean(0)
        de = torch.from_numpy(self.embedder.encode(dom_prompts, 64))
        return self.domains[int((de @ pe).argmax())]

    def _task_image_features(self, task, n: int = 32):
        data = task.images
        try:
            size = len(data)
        except TypeError:
            return None
        if not size:
            return None
        pick = sorted({int(i) for i in np.linspace(0, size - 1, min(n, size))})
        items = [data[i] for i in pick]
        imgs = [item[0] if isinstance(item, (tuple, list)) else item for item in items]
        return encode_images(self.vlm, imgs, batch_size=len(imgs))[0]

    # ---- retrieval --------------------------------------------------------------------

    def _retrieve(self, queries: list[str], k: int, stages: str = "multi-stage") -> list:
        if not queries:
            return []
        emb = None if stages == "bm25-only" else torch.from_numpy(self.embedder.encode(queries, 64))
        return retrieve(self.bank, queries, k, vlm=self.vlm, k_v=self.k_v, k1=self.k1, b=self.bm25_b,
                        query_embeddings=emb, backend=self.backend, image_cache=self.image_cache,
                        timings=self.last_timings, stages=stages)

    def queries(self, history) -> dict[str, list[str]]:
        """The task / domain / general queries for a history (deterministic)."""
        history = [_finished(t) for t in history]
        task_q = list(dict.fromkeys(p for t in history for p in t.prompts))
        self.last_domains = {t.name: self.map_domain(t) for t in history}
        doms = set(self.last_domains.values())
        task_set = set(task_q)
        domain_q = [q.text for q in self.pool if q.domain in doms and q.text not in task_set]
        rest = [q.text for q in self.pool if q.domain not in doms and q.text not in task_set]
        rng = random.Random(self.seed)
        general_q = [rest[i] for i in sorted(rng.sample(range(len(rest)), min(self.n_general, len(rest))))]
        return {"task": task_q, "domain": domain_q, "general": general_q}

    def reference_set(self, history, stages: str = "multi-stage") -> ReferenceSet:
        """The reference set for the task after ``history`` (``FinishedTask`` s, in
        order), each query run through the ``stages`` pipeline; see the module doc."""
        self.last_timings = {}
        qs = self.queries(history)
        best: dict[int, dict] = {}
        for rank, (level, k) in enumerate((("task", self.a), ("domain", self.b), ("general", self.c))):
            for query, hits in zip(qs[level], self._retrieve(qs[level], k, stages)):
                for h in hits:
                    cur = best.get(h.index)
                    if cur is not None and (cur["_rank"] < rank or (cur["_rank"] == rank and cur["score"] >= h.score)):
                        continue
                    best[h.index] = {"index": h.index, "id": h.id, "caption": h.caption, "image": h.image,
                                     "domain": h.domain, "level": level, "query": query, "score": h.score,
                                     "_rank": rank}
        rows = sorted(best.values(), key=lambda r: (r["_rank"], -r["score"], r["index"]))
        for r in rows:
            del r["_rank"]
        return ReferenceSet(rows)

    def uniform_set(self, size: int, keywords: Optional[list[str]] = None,
                    stages: str = "multi-stage") -> ReferenceSet:
        """PRIMED_uni: ``size`` distinct entries spread evenly over ``keywords``
        (default: the taxonomy's ~30 domain keywords), each retrieved through the
        ``stages`` pipeline; a keyword short of its share leaves it to the others
        in round-robin order."""
        size = _int("size", size, 1)
        kws = list(keywords) if keywords is not None else pool_mod.keywords(self.taxonomy)
        if not kws:
            raise ValueError("uniform_set: no keywords")
        size = min(size, self.bank.count)
        quota = [size // len(kws) + (1 if i < size % len(kws) else 0) for i in range(len(kws))]
        k = max(quota) * 2 + 8
        self.last_timings = {}
        ranked = self._retrieve(kws, k, stages)
        taken: dict[int, dict] = {}
        pos = [0] * len(kws)
        counts = [0] * len(kws)

        def take(j) -> bool:
            while pos[j] < len(ranked[j]):
                h = ranked[j][pos[j]]
                pos[j] += 1
                if h.index not in taken:
                    taken[h.index] = {"index": h.index, "id": h.id, "caption": h.caption, "image": h.image,
                                      "domain": h.domain, "level": "uniform", "query": kws[j], "score": h.score}
                    counts[j] += 1
                    return True
            return False

        for j in range(len(kws)):  # each keyword's share, in keyword order
            while counts[j] < quota[j] and take(j):
                pass
        progress = True
        while len(taken) < size and progress:  # shortfalls go round-robin to the others
            progress = False
            for j in range(len(kws)):
                if len(taken) >= size:
                    break
                progress |= take(j)
        return ReferenceSet(list(taken.values()))


def sample_per_domain(pool: list, per_domain: Optional[int], seed: int = 0) -> list:
    """A seeded sample of at most ``per_domain`` questions of each domain (pool order kept; None: all)."""
    if per_domain is None:
        return list(pool)
    by: dict[str, list[int]] = {}
    for i, q in enumerate(pool):
        by.setdefault(q.domain, []).append(i)
    rng = random.Random(seed)
    keep = set()
    for idx in by.values():
        keep.update(idx if len(idx) <= per_domain else rng.sample(idx, per_domain))
    return [q for i, q in enumerate(pool) if i in keep]


__all__ = ["Siphon", "ReferenceSet", "FinishedTask", "LEVELS", "sample_per_domain"]
