"""Past one machine: bank build and sharded search on Ray.

Build (``build_bank_ray``, ``mgcl db build ... --ray [ADDRESS]``): the
builder of ``build.py`` runs on the driver with a ``RayEngine``. Each corpus
file is read (records parsed, images checked) by a Ray task, several files at
once; the driver takes the records in corpus order, so records are numbered
and cut into shards exactly as a single-process build does. Each shard's
captions go to one of ``workers`` embedding actors (each holds its own model,
on a GPU where the cluster has them), up to two shards per actor in flight;
the driver writes the shards in order, atomically, with the same state file,
manifest, sha256 and meta as the single-process builder, so a build killed
anywhere restarts (with or without Ray) and skips the shards that are
complete, and the result equals the serial build of the same corpus (same
embedder bits: the same model on the same kind of hardware). Workers read
the corpus and the driver writes the bank, so on a multi-node cluster the
corpus must sit at the same path on every node (a shared filesystem).

Search (``serve``, ``ShardedSearch``): the bank's text shards are split into
``workers`` contiguous ranges, each served by a ``ShardServer`` actor that
opens the bank, checks and memory-maps its shards and their screening codes,
and answers ``similarity_topk`` over them. The driver merges the per-range
candidates with ``search.select``: a range's own k-th distinct score is never
above the global one, so every globally kept entry is in its range's answer,
and the scores are exact (the op's definition), so the merged result is
bit-identical to the single-process search. ``serve(bank)`` sets
``bank.server``; ``MemoryBank.search``, ``retrieve`` and the Siphon then run
unchanged on top of it.
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch

from .build import build_bank, encode_shard


def _ray():
    try:
        import ray  # noqa: PLC0415
    except ImportError:
        raise ImportError("--ray needs Ray: pip install 'mgcl[ray]' (or pip install ray)") from None
    return ray


def _check_fits(ray, what: str, workers: int, cpus_per_worker: float) -> None:
    """ValueError when the cluster cannot place ``workers`` actors (they would wait forever)."""
    cpus = float(ray.cluster_resources().get("CPU", 0))
    if workers * cpus_per_worker > cpus:
        raise ValueError(f"{what}: {workers} workers x {cpus_per_worker} CPU do not fit the cluster's {cpus:g} CPUs "
                         "(fewer workers, or a smaller cpus_per_worker)")


def connect(address: str | None = None):
    """Ray, initialised: ``address`` of a running cluster (``ray start --head``
    prints it; "auto" finds one on this node), or None: the cluster of
    ``RAY_ADDRESS``, else a new local instance. Already initialised: as it is."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    return ray


# ---- build ------------------------------------------------------------------------------

def _read_file(cf, image_root, external_images: bool, max_pixels: int, split) -> list:
    """One corpus file's items with their image problems (a Ray task)."""
    from .build import _with_image_checks  # noqa: PLC0415
    from .corpus import read_files  # noqa: PLC0415

    return list(_with_image_checks(read_files([cf], image_root, external_images=external_images), max_pixels, split))


class _Embedder:
    """A Ray actor holding one text embedder (a name, or a picklable object)."""

    def __init__(self, embedder, device):
        from .embedders import get_embedder  # noqa: PLC0415

        self.emb = get_embedder(embedder, device=device) if isinstance(embedder, str) or embedder is None else embedder

    def info(self) -> tuple[str, int]:
        return self.emb.name, int(self.emb.dim)

    def encode(self, captions: list[str], batch_size: int) -> np.ndarray:
        return encode_shard(self.emb, captions, batch_size)


class RayEngine:
    """``build_bank``'s engine on a Ray cluster (module doc): file-reading
    tasks and ``workers`` embedding actors. ``workers`` default: one per GPU
    where the cluster has GPUs, else the cluster's CPUs less one (at least 1).
    ``cpus_per_worker``: CPUs reserved by each actor (and its torch threads)."""

    def __init__(self, embedder="minilm", *, workers: int | None = None, device: str | None = None,
                 cpus_per_worker: float = 1, address: str | None = None, read_ahead: int | None = None):
        ray = connect(address)
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        if device is None and gpus:
            device = "cuda"
        if workers is None:
            workers = gpus if device == "cuda" and gpus else max(1, int(res.get("CPU", 1)) - 1)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"build_bank_ray: workers must be an integer >= 1, got {workers!r}")
        _check_fits(ray, "build_bank_ray", workers, cpus_per_worker)
        opts = {"num_cpus": cpus_per_worker, "num_gpus": 1 if device == "cuda" else 0,
                "scheduling_strategy": "SPREAD"}
        actor = ray.remote(_Embedder).options(**opts)
        self.actors = [actor.remote(embedder, device) for _ in range(workers)]
        names = ray.get([a.info.remote() for a in self.actors])
        self.name, self.dim = names[0]
        self.window = 2 * workers
        self.read_ahead = read_ahead or max(2, int(res.get("CPU", 1)))
        self._reader = ray.remote(_read_file).options(num_cpus=0, scheduling_strategy="SPREAD")
        self._next = 0
        self._ray = ray

    def items(self, files, image_root, external_images: bool, max_pixels: int, split=None):
        """Every file read (and its compound figures split) by a task
        (``read_ahead`` at once), yielded in corpus order."""
        todo, running = deque(files), deque()
        while todo or running:
            while todo and len(running) < self.read_ahead:
                running.append(self._reader.remote(todo.popleft(), image_root, external_images, max_pixels, split))
            yield from self._ray.get(running.popleft())

    def submit(self, captions: list[str], batch_size: int):
        actor = self.actors[self._next % len(self.actors)]
        self._next += 1
        return actor.encode.remote(captions, batch_size)

    def collect(self, handle) -> np.ndarray:
        return np.array(self._ray.get(handle))  # a writable copy (Ray's zero-copy arrays are read-only)

    def close(self) -> None:
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []


def build_bank_ray(corpus, out: str, *, embedder="minilm", address: str | None = None, workers: int | None = None,
                   device: str | None = None, cpus_per_worker: float = 1, **options) -> dict:
    """``build_bank(corpus, out, ...)`` on a Ray cluster (module doc): the same
    files as the single-process build, resumable the same way. ``address``:
    see ``connect``; ``workers``, ``cpus_per_worker``: see ``RayEngine``;
    ``options``: those of ``build_bank`` (shard_size, batch_size, vlm, ...;
    a VLM's image embeddings are computed on the driver)."""
    engine = RayEngine(embedder, workers=workers, device=device, cpus_per_worker=cpus_per_worker, address=address)
    try:
        return build_bank(corpus, out, engine=engine, **options)
    finally:
        engine.close()


# ---- sharded search -----------------------------------------------------------------------

class ShardServer:
    """A Ray actor serving text shards ``lo..hi-1`` of a bank (module doc)."""

    def __init__(self, path: str, lo: int, hi: int):
        from .bank import MemoryBank  # noqa: PLC0415

        bank = MemoryBank.open(path)
        self.base = int(bank.offsets[lo])
        self.shards, self.codes = bank.part(lo, hi)

    def topk(self, q: torch.Tensor, k: int, ties: bool):
        from .search import exact_topk  # noqa: PLC0415

        v, i, o = exact_topk(q, self.shards, k, ties, quantized=self.codes)
        return v, i + self.base, o


def split(rows: list[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous shard ranges ``(lo, hi)``, at most ``parts``, none empty,
    balanced by rows (the cut after shard j falls where the running row count
    first reaches the next multiple of total / parts)."""
    n = len(rows)
    parts = max(1, min(parts, n))
    csum = np.cumsum(rows, dtype=np.int64)
    total = int(csum[-1]) if n else 0
    cuts = [0]
    for p in range(1, parts):
        j = int(np.searchsorted(csum, total * p / parts, side="left")) + 1
        j = min(max(j, cuts[-1] + 1), n - (parts - p))
        cuts.append(j)
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:]))


class ShardedSearch:
    """The dense search of a bank split over ``workers`` Ray actors (module
    doc). ``topk(q, k, ties)`` returns what ``search.exact_topk`` over the
    whole bank returns, bit for bit. ``cpus_per_worker``: CPUs each actor reserves."""

    def __init__(self, bank, workers: int = 2, *, address: str | None = None, cpus_per_worker: float = 1):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"serve: workers must be an integer >= 1, got {workers!r}")
        ray = connect(address)
        self._ray = ray
        self.ranges = split([e["rows"] for e in bank.manifest["shards"]], workers)
        _check_fits(ray, "serve", len(self.ranges), cpus_per_worker)
        actor = ray.remote(ShardServer).options(num_cpus=cpus_per_worker, scheduling_strategy="SPREAD")
        self.actors = [actor.remote(bank.path, lo, hi) for lo, hi in self.ranges]
        ray.get([a.__ray_ready__.remote() for a in self.actors])  # opened and checked, or the error now

    def topk(self, q: torch.Tensor, k: int, ties: bool):
        from .search import select  # noqa: PLC0415

        n_q = q.shape[0]
        ref = self._ray.put(q.float().contiguous())
        parts = self._ray.get([a.topk.remote(ref, k, ties) for a in self.actors])
        qid = np.concatenate([np.repeat(np.arange(n_q), np.diff(o)) for _, _, o in parts])
        values = np.concatenate([v for v, _, _ in parts])
        indices = np.concatenate([i for _, i, _ in parts])
        return select(qid, values, indices, n_q, k, ties)

    def close(self) -> None:
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []


def serve(bank, workers: int = 2, *, address: str | None = None, cpus_per_worker: float = 1):
    """Serve ``bank``'s dense search from ``workers`` Ray actors: sets and
    returns ``bank.server`` (a ``ShardedSearch``); ``bank.server.close()``
    and ``bank.server = None`` go back to local search."""
    bank.server = ShardedSearch(bank, workers, address=address, cpus_per_worker=cpus_per_worker)
    return bank.server


__all__ = ["build_bank_ray", "RayEngine", "serve", "ShardedSearch", "ShardServer", "split", "connect"]
