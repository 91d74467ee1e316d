"""Reference batches, the training side of a reference set: its pairs as a
map-style dataset (image decoded through the student's eval transform,
caption, weight of the pair's level), an endless stream of reshuffled batches
(captions tokenized by the student, images decoded by a thread pool), a
background thread that prepares the next batches while the model works, and
the test of whether a transform is deterministic (the frozen teacher's
features of a pair are then cached for the task, ``parts.TeacherCache``)."""
from __future__ import annotations

import itertools
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch


@dataclass
class RefBatch:
    images: torch.Tensor   # float [B, 3, H, W], the student's eval transform
    tokens: torch.Tensor   # the student's tokenize(captions)
    weights: torch.Tensor  # float32 [B]: the weight of each pair's level (1.0 by default)
    index: torch.Tensor    # int64 [B]: each pair's position in the reference set


class ReferencePairs(torch.utils.data.Dataset):
    """A ``ReferenceSet``'s rows as training pairs: item i = (image tensor,
    caption, weight), the image opened from the bank's reference and passed
    through ``transform``, the weight ``level_weights.get(level, 1.0)``."""

    def __init__(self, refset, transform: Callable, level_weights: Optional[dict] = None):
        self.refset, self.transform, self.level_weights = refset, transform, dict(level_weights or {})
        self.deterministic = is_deterministic(transform)

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


def images_checked(bank) -> bool:
    """True when ``bank``'s builder opened every entry's image and found none
    unreadable or absent (its manifest's build record says so): its reference
    pairs need no second check. False for a bank that records otherwise, or
    nothing (``write_bank``, a bank of an older mgcl)."""
    build = (getattr(bank, "manifest", None) or {}).get("build") or {}
    return build.get("unreadable_images") == 0 and build.get("without_image") == 0


def readable_pairs(refset, workers: Optional[int] = None):
    """``refset`` without its pairs whose image does not open (missing, unreadable
    or over the pixel limit: a bank built with ``--missing-images keep``), and the
    reasons of those left out, in order. Checked once, before the task trains,
    so that no image fails mid-task."""
    from ...retrieval import ReferenceSet  # noqa: PLC0415
    from ...retrieval.images import check_image  # noqa: PLC0415

    rows = list(refset)
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if workers > 1 and len(rows) > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="mgcl-refcheck") as pool:
            why = list(pool.map(lambda r: check_image(r["image"]), rows))
    else:
        why = [check_image(r["image"]) for r in rows]
    if not any(why):
        return refset, []
    return (ReferenceSet([r for r, w in zip(rows, why) if w is None]),
            [f"{r['id']!r} (bank index {r['index']}): {w}" for r, w in zip(rows, why) if w is not None])


def reference_batches(pairs, tokenize: Callable, batch_size: int, *, seed: int,
                      workers: Optional[int] = None) -> Iterator[RefBatch]:
    """Reshuffled passes over ``pairs`` (pass k ordered by ``randperm`` seeded
    ``seed + k``), forever. Batches are full-size when the set holds at least one
    batch (the last partial batch of a pass is dropped then).

    A batch's items are read by ``workers`` threads (None: up to 8, the CPU
    count; 0 or 1: in this thread); PIL decodes and resizes without the GIL.
    The order of the items, hence every batch, depends on ``seed`` only, and
    an item is the same whichever thread reads it (the eval transform draws
    no random numbers)."""
    n = len(pairs)
    if n == 0:
        raise RuntimeError("the reference set is empty (nothing retrieved)")
    if workers is None:
        workers = min(8, os.cpu_count() or 1, batch_size)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"reference_batches: workers must be an integer >= 0, got {workers!r}")
    pool = ThreadPoolExecutor(workers, thread_name_prefix="mgcl-refdata") if workers > 1 else None
    read = pool.map if pool is not None else map
    stop = n - n % batch_size if n >= batch_size else n
    try:
        for k in itertools.count():
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + k)).tolist()
            for s in range(0, stop, batch_size):
                index = order[s:s + batch_size]
                items = list(read(pairs.__getitem__, index))
                yield RefBatch(images=torch.stack([x[0] for x in items]), tokens=tokenize([x[1] for x in items]),
                               weights=torch.tensor([x[2] for x in items], dtype=torch.float32),
                               index=torch.tensor(index, dtype=torch.int64))
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def is_deterministic(transform) -> bool:
    """Whether ``transform`` maps an image to the same tensor every time: an object
    that says so (a ``deterministic`` attribute), a torchvision ``Compose`` of
    deterministic steps, or a step known to draw no random numbers (resize,
    crop, conversion, normalisation; open_clip's eval steps; mgcl's own
    converters). Anything else (a random augmentation, an unknown callable)
    counts as random: the teacher's features are then recomputed every step."""
    said = getattr(transform, "deterministic", None)
    if isinstance(said, bool):
        return said
    inner = getattr(transform, "transforms", None)
    if type(transform).__name__ == "Compose" and isinstance(inner, (list, tuple)):
        return all(is_deterministic(t) for t in inner)
    cls = type(transform)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if name.startswith("torchvision.transforms.") and cls.__name__ in _TORCHVISION_FIXED:
        return True
    if name.startswith("open_clip.transform.") and cls.__name__ in ("MaybeConvertMode", "MaybeToTensor",
                                                                     "CenterCropOrPad"):
        return True
    if name == "open_clip.transform.ResizeKeepRatio":
        return not getattr(transform, "random_scale_prob", 0) and not getattr(transform, "random_aspect_prob", 0)
    fn = f"{getattr(transform, '__module__', '')}.{getattr(transform, '__qualname__', '')}"
    return fn in ("mgcl.models.images.as_image", "mgcl.models.images.to_tensor", "open_clip.transform._convert_to_rgb")


# torchvision steps (v1 and v2) that draw no random numbers
_TORCHVISION_FIXED = frozenset({
    "Resize", "CenterCrop", "Pad", "ToTensor", "PILToTensor", "ToPILImage", "ConvertImageDtype", "Normalize",
    "Grayscale", "ToImage", "ToDtype", "ToPureTensor", "Identity",
})


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
        finally:
            if callable(getattr(source, "close", None)):
                source.close()  # a generator's own clean-up (reference_batches' thread pool)
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
