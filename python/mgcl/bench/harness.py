"""Timing, memory and machine-description helpers shared by every bench.

Rules (DESIGN.md, Benches): medians over repeats with min-max, the reference
as the baseline, the GPU synchronised inside every timed call, peak memory,
and results written as JSON with the machine and versions.
"""
from __future__ import annotations

import statistics
import sys
import threading
import time
from typing import Callable, Optional

import torch

from .._env import machine  # noqa: F401  (the one machine description, re-exported for the benches)
from .._io import atomic_write_json


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], *, device="cpu", repeats: int = 5, warmup: int = 1,
            setup: Optional[Callable[[], object]] = None, max_seconds: float = 120.0) -> dict:
    """Run ``fn`` ``warmup`` + ``repeats`` times (``setup`` untimed before each);
    seconds per call: median, min, max (wall clock, the GPU synchronised inside
    the timed call) and, on CUDA, ``device_median`` / ``device_min`` /
    ``device_max`` from CUDA events around the call. Stops early past ``max_seconds``."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        if setup:
            setup()
        fn()
        sync(device)
    times: list[float] = []
    device_times: list[float] = []
    t_start = time.perf_counter()
    for _ in range(repeats):
        if setup:
            setup()
        sync(device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn()
        if cuda:
            end.record()
        sync(device)
        times.append(time.perf_counter() - t0)
        if cuda:
            device_times.append(start.elapsed_time(end) / 1e3)
        if time.perf_counter() - t_start > max_seconds and len(times) >= 1:
            break
    out = {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}
    if device_times:
        out.update(device_median=statistics.median(device_times), device_min=min(device_times),
                   device_max=max(device_times))
    return out


TIMING_KEYS = ("median", "min", "max", "n", "device_median", "device_min", "device_max")


def run_rows(cases, desc: str) -> list[dict]:
    """The bench row loop: ``cases`` yields ``(row, measure)``; ``measure()``
    returns the row's measured fields (e.g. ``time_fn``'s). Each row gets a
    ``status``: "ok", "OOM", or "error: <type>: <message>" when ``measure``
    raised; one failing case (an outside peer's bug, say) never ends the bench,
    so the bench still writes its JSON with every other row."""
    from tqdm import tqdm  # noqa: PLC0415

    rows = []
    for row, measure in tqdm(list(cases), desc=desc, leave=False):
        row = dict(row)
        try:
            row.update(measure())
            row.setdefault("status", "ok")
        except Exception as exc:  # noqa: BLE001  (a row's failure is data, not the bench's end)
            oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
            message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            row["status"] = "OOM" if oom else f"error: {type(exc).__name__}: {message}"
            print(f"{desc}: {row.get('impl', row)}: {row['status']}", file=sys.stderr)
        rows.append(row)
    return rows


# ---- peak memory -----------------------------------------------------------------

def _read_status(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


class _RssSampler:
    """Fallback when VmHWM cannot be reset: sample RSS every millisecond."""

    def __init__(self):
        import psutil  # noqa: PLC0415

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()


def peak_extra_memory(fn: Callable[[], object], device="cpu") -> int:
    """Bytes allocated above the level before ``fn`` at its peak.

    CUDA: torch's allocator statistics. CPU: the process's peak resident set
    (VmHWM, reset before the call) minus the resident set before it.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        del out
        return int(peak - base)
    import gc  # noqa: PLC0415

    gc.collect()
    base = _read_status("VmRSS")
    if base is not None and _reset_hwm():
        out = fn()
        peak = _read_status("VmHWM")
        del out
        return int(max(0, peak - base))
    with _RssSampler() as s:
        base = s.peak
        out = fn()
    del out
    return int(max(0, s.peak - base))


# ---- bandwidth and machine ----------------------------------------------------------

def copy_bandwidth(device="cpu", nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Measured device copy rate in GB/s (bytes read + bytes written per second)."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, repeats=repeats, warmup=1)
    del src, dst
    return 2 * nbytes / t["median"] / 1e9


def write_json(path: str, payload: dict) -> None:
    atomic_write_json(path, payload, indent=2)


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Plain-text table; ``columns`` = [(key, header)], floats printed compactly."""

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            if v != v:
                return "nan"
            a = abs(v)
            if a == 0:
                return "0"
            if a >= 100:
                return f"{v:.0f}"
            if a >= 1:
                return f"{v:.2f}"
            return f"{v:.3g}"
        return str(v)

    cells = [[h for _, h in columns]] + [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1e3
