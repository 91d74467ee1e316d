"""BM25 (Okapi) over a bank's captions with global document frequencies.

The cache (``bm25/`` in the bank) holds every caption's term counts as CSR
arrays (term ids sorted within a document) plus the document frequency of
every term, so scoring a query against any subset of the bank costs only the
subset. The formula is rank_bm25's ``BM25Okapi`` (tested against it):

    idf(t)   = ln(N - df(t) + 0.5) - ln(df(t) + 0.5), and idf values below 0
               are replaced by epsilon * mean(idf over the vocabulary)
    score(q, d) = sum over query tokens t (repeats counted) of
               idf(t) * tf(t,d) (k1 + 1) / (tf(t,d) + k1 (1 - b + b |d| / avgdl))
"""
from __future__ import annotations

import json
import os
import re
from array import array
from collections import Counter

import numpy as np

TOKENIZER = "lower-alnum-v1"
_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased runs of ASCII letters and digits."""
    return _WORD.findall(text.lower())


def build_cache(captions, out_dir: str, progress=None) -> dict:
    """Tokenise ``captions`` and write ``out_dir/{vocab.json,tokens.safetensors}``
    atomically; returns the manifest entry (paths relative to the bank)."""
    import torch  # noqa: PLC0415

    from .store import atomic_write_bytes, atomic_write_tensors, sha256_file  # noqa: PLC0415

    # Term ids and counts go into C arrays (4 or 8 bytes an item), not lists of Python ints.
    ids: dict[str, int] = {}
    terms, tfs, indptr, doc_len = array("i"), array("i"), array("q", [0]), array("i")
    for cap in captions:
        toks = tokenize(cap)
        c = Counter(ids.setdefault(t, len(ids)) for t in toks)
        terms.extend(c.keys())
        tfs.extend(c.values())
        indptr.append(len(terms))
        doc_len.append(len(toks))
        if progress is not None:
            progress.update(1)
    # Renumber terms in sorted order so the cache does not depend on first-seen order.
    vocab = sorted(ids)
    remap = np.empty(len(ids), dtype=np.int32)
    for new, t in enumerate(vocab):
        remap[ids[t]] = new
    del ids
    terms = remap[np.frombuffer(terms, dtype=np.intc)] if terms else np.zeros(0, dtype=np.int32)
    tfs = np.frombuffer(tfs, dtype=np.intc).astype(np.int32)
    indptr = np.frombuffer(indptr, dtype=np.longlong).astype(np.int64)
    doc_len = np.frombuffer(doc_len, dtype=np.intc).astype(np.int32)
    # sort terms inside each document
    doc_of = np.repeat(np.arange(len(doc_len), dtype=np.int64), np.diff(indptr))
    order = np.lexsort((terms, doc_of))
    del doc_of
    terms, tfs = terms[order], tfs[order]
    del order
    df = np.bincount(terms, minlength=len(vocab)).astype(np.int64)
    os.makedirs(out_dir, exist_ok=True)
    vpath, tpath = os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "tokens.safetensors")
    atomic_write_bytes(vpath, json.dumps(vocab).encode())
    atomic_write_tensors(tpath, {
        "indptr": torch.from_numpy(indptr), "terms": torch.from_numpy(terms), "tf": torch.from_numpy(tfs),
        "doc_len": torch.from_numpy(doc_len), "df": torch.from_numpy(df),
    })
    n = len(doc_len)
    return {"tokenizer": TOKENIZER, "n_docs": n, "n_terms": len(vocab),
            "avgdl": float(np.sum(doc_len, dtype=np.float64) / n) if n else 0.0,
            "vocab": {"path": "bm25/vocab.json", "sha256": sha256_file(vpath)},
            "tokens": {"path": "bm25/tokens.safetensors", "sha256": sha256_file(tpath)}}


class BM25:
    """BM25 scorer over a cached bank (``BM25.open(bank_dir, entry)``)."""

    def __init__(self, vocab: list[str], indptr, terms, tf, doc_len, df, *, k1: float = 1.5, b: float = 0.75,
                 epsilon: float = 0.25):
        for name, v in (("k1", k1), ("b", b), ("epsilon", epsilon)):
            if not isinstance(v, (int, float)) or v != v or v < 0:
                raise ValueError(f"BM25: {name} must be a number >= 0, got {v!r}")
        if b > 1:
            raise ValueError(f"BM25: b must be in [0, 1], got {b}")
        self.vocab = {t: i for i, t in enumerate(vocab)}
        self.indptr, self.terms, self.tf = np.asarray(indptr), np.asarray(terms), np.asarray(tf)
        self.doc_len = np.asarray(doc_len).astype(np.float64)
        self.df = np.asarray(df)
        self.k1, self.b, self.epsilon = float(k1), float(b), float(epsilon)
        n = len(self.doc_len)
        self.n_docs = n
        self.avgdl = float(self.doc_len.sum() / n) if n else 0.0
        idf = np.log(n - self.df + 0.5) - np.log(self.df + 0.5) if len(self.df) else np.zeros(0)
        if len(idf):
            idf = np.where(idf < 0, self.epsilon * idf.mean(), idf)
        self.idf = idf

    @classmethod
    def open(cls, bank_dir: str, entry: dict, **params) -> "BM25":
        from .store import mmap_tensor  # noqa: PLC0415

        if entry.get("tokenizer") != TOKENIZER:
            raise ValueError(f"{bank_dir}: BM25 cache uses tokenizer {entry.get('tokenizer')!r}; "
                             f"this mgcl reads {TOKENIZER!r} (rebuild the bank)")
        with open(os.path.join(bank_dir, entry["vocab"]["path"])) as fh:
            vocab = json.load(fh)
        tpath = os.path.join(bank_dir, entry["tokens"]["path"])
        t = {k: mmap_tensor(tpath, k).numpy() for k in ("indptr", "terms", "tf", "doc_len", "df")}
        return cls(vocab, t["indptr"], t["terms"], t["tf"], t["doc_len"], t["df"], **params)

    def scores(self, query: str, docs) -> np.ndarray:
        """BM25 score of ``query`` against each bank entry in ``docs`` (float64)."""
        docs = np.asarray(docs, dtype=np.int64).reshape(-1)
        out = np.zeros(len(docs), dtype=np.float64)
        if not len(docs):
            return out
        if docs.min() < 0 or docs.max() >= self.n_docs:
            raise ValueError(f"BM25.scores: document index out of range [0, {self.n_docs})")
        q = Counter(self.vocab[t] for t in tokenize(query) if t in self.vocab)
        if not q:
            return out
        starts, ends = self.indptr[docs], self.indptr[docs + 1]
        lens = ends - starts
        seg = np.concatenate([self.terms[s:e] for s, e in zip(starts, ends)]) if lens.sum() else np.zeros(0, np.int32)
        seg_tf = np.concatenate([self.tf[s:e] for s, e in zip(starts, ends)]) if lens.sum() else np.zeros(0, np.int32)
        owner = np.repeat(np.arange(len(docs)), lens)
        norm = self.k1 * (1.0 - self.b + self.b * self.doc_len[docs] / self.avgdl)
        for term, mult in q.items():
            hit = seg == term
            tf = np.zeros(len(docs), dtype=np.float64)
            tf[owner[hit]] = seg_tf[hit]
            out += mult * self.idf[term] * (tf * (self.k1 + 1.0) / (tf + norm))
        return out
