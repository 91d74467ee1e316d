"""Reference batches for the distilling strategies (ZSCL, PRIMED): a Siphon
(given, or opened from a bank directory), an endless stream of its reference
set's batches, and a background thread that prepares the next batches (image
decoding) while the GPU works."""
from __future__ import annotations

import itertools
import queue
import threading
from typing import Iterator, Optional


def open_siphon(siphon, bank: Optional[str], siphon_options: Optional[dict], who: str):
    """``siphon`` as given, or ``Siphon(MemoryBank.open(bank), load_pool(), **siphon_options)``."""
    if siphon is not None:
        return siphon
    if bank is None:
        raise ValueError(f"{who}: needs a reference set: pass siphon=mgcl.retrieval.Siphon(...) or bank=<bank dir>")
    from ...retrieval import MemoryBank, Siphon, load_pool  # noqa: PLC0415

    opts = dict(siphon_options or {})
    pool = opts.pop("pool", None)
    pool = load_pool() if pool is None else (load_pool(pool) if isinstance(pool, str) else pool)
    embedder = opts.pop("embedder", None)
    return Siphon(MemoryBank.open(bank), pool, embedder, **opts)


def endless(refset, vlm, batch_size: int, *, seed: int, level_weights=None) -> Iterator:
    """Reshuffled passes over ``refset`` (pass k seeded ``seed + k``), forever.
    Batches are full-size when the set holds at least one batch."""
    if len(refset) == 0:
        raise RuntimeError("the reference set is empty (nothing retrieved)")
    drop_last = len(refset) >= batch_size
    for k in itertools.count():
        yield from refset.batches(vlm, batch_size, level_weights=level_weights, shuffle=True, seed=seed + k,
                                  drop_last=drop_last)


class Prefetch:
    """Pulls items from ``source`` in a daemon thread, ``depth`` ahead (order kept).
    ``close()`` stops the thread; an exception in the source is re-raised by ``next``."""

    _END = object()

    def __init__(self, source: Iterator, depth: int = 2):
        self.q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(source,), daemon=True)
        self.thread.start()

    def _run(self, source):
        try:
            for item in source:
                if not self._put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(exc)
            return
        self._put(self._END)

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        item = self.q.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)
