"""Reference batches, the training side of a reference set: its pairs as a
map-style dataset (image decoded through the student's eval transform,
caption, weight of the pair's level), an endless stream of reshuffled batches
(captions tokenized by the student), and a background thread that prepares
the next batches (image decoding) while the model works."""
from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch


@dataclass
class RefBatch:
    images: torch.Tensor   # float [B, 3, H, W], the student's eval transform
    tokens: torch.Tensor   # the student's tokenize(captions)
    weights: torch.Tensor  # float32 [B]: the weight of each pair's level (1.0 by default)


class ReferencePairs(torch.utils.data.Dataset):
    """A ``ReferenceSet``'s rows as training pairs: item i = (image tensor,
    caption, weight), the image opened from the bank's reference and passed
    through ``transform``, the weight ``level_weights.get(level, 1.0)``."""

    def __init__(self, refset, transform: Callable, level_weights: Optional[dict] = None):
        self.refset, self.transform, self.level_weights = refset, transform, dict(level_weights or {})

    def __len__(self) -> int:
        return len(self.refset)

    def __getitem__(self, i: int):
        from ...retrieval.images import open_image  # noqa: PLC0415

        r = self.refset[i]
        try:
            image = self.transform(open_image(r["image"]))
        except (OSError, ValueError, SyntaxError) as exc:
            raise ValueError(f"reference pair {r['id']!r} (bank index {r['index']}): cannot open image "
                             f"{r['image']!r}: {exc}") from None
        return image, r["caption"], float(self.level_weights.get(r["level"], 1.0))


def reference_batches(pairs, tokenize: Callable, batch_size: int, *, seed: int) -> Iterator[RefBatch]:
    """Reshuffled passes over ``pairs`` (pass k ordered by ``randperm`` seeded
    ``seed + k``), forever. Batches are full-size when the set holds at least one
    batch (the last partial batch of a pass is dropped then)."""
    n = len(pairs)
    if n == 0:
        raise RuntimeError("the reference set is empty (nothing retrieved)")
    stop = n - n % batch_size if n >= batch_size else n
    for k in itertools.count():
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + k)).tolist()
        for s in range(0, stop, batch_size):
            items = [pairs[i] for i in order[s:s + batch_size]]
            yield RefBatch(images=torch.stack([x[0] for x in items]), tokens=tokenize([x[1] for x in items]),
                           weights=torch.tensor([x[2] for x in items], dtype=torch.float32))


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
