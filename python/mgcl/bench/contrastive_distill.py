"""Bench: contrastive_distill forward + backward over the reference batch size B.

Implementations timed (``kd=1, cmc=0.25``, per-pair weights off):
- ``torch``: the dense reference (the baseline; B x B matrices, autograd);
- ``chunked`` (CPU) / ``triton`` (GPU): the fused backend of the device;
- GPU only, the CMC part alone (``kd=0, cmc=1``): ``torch cmc``, ``triton cmc``
  and, when the ``inf-cl`` package is installed, its fused CLIP loss as an
  outside peer: ``cal_flash_loss`` both ways with the scale applied to the
  query (its single-process path; inf-cl 1.2.1's ``cal_inf_loss(..., scale=)``
  all-reduces the scale's gradient without a process group and raises there).

Per (B, implementation): median / min / max seconds of one forward+backward,
the peak memory above the inputs (``harness.peak_extra_memory``), the loss value
(the cmc rows, inf-cl's included, compute the same number), the speed-up over
the reference and the ratio to the GEMM floor: a forward+backward needs the
four B x B x d products S, T, dL/dS @ txt and dL/dS.T @ img, 8*B^2*d flops,
timed against the measured matmul rate of this device and dtype; on a GPU also
the device time (CUDA events). A row that fails is recorded with its error and
the bench goes on (``harness.run_rows``).

``crossover``: the smallest B from which the fused backend is never slower than
the reference (over the sizes run), beside the crossover the dispatch table
declares (``CHUNKED_MIN_BATCH`` on the CPU) and, per B, the backend the default
dispatch picks and its speed-up over the reference. ``targets`` (GPU): the
acceptance numbers, speed-up at B = 8192 in bf16 (>= 5) and the extra memory at
B = 65536 (<= 1 GiB), when those rows ran.

Sizes: CPU B in {64, ..., 1024} (the crossover sweep) and {1024, 2048, 4096} *
scale, d = 256, float32 (``--scale 4`` gives the 16384 target); GPU B in {256,
1024, 4096, ..., 65536} * scale, d = 512, bfloat16. The reference is skipped on
the CPU when it would not fit in the free memory, and marked OOM on the GPU when
it fails.
"""
from __future__ import annotations

import torch

from .. import _backend
from ..ops import contrastive_distill as op
from ..testing import distill_batch
from . import harness

CPU_SIZES = (1024, 2048, 4096)
CPU_CROSSOVER_SIZES = (64, 128, 256, 384, 512, 768, 1024)
GPU_SIZES = (256, 1024, 4096, 8192, 16384, 32768, 65536)
KD, CMC = 1.0, 0.25
TARGET_SPEEDUP = (8192, 5.0)           # B, at least this many times the reference (GPU, bf16)
TARGET_MEMORY = (65536, 2**30)         # B, at most this many bytes above the inputs


def sizes(device: torch.device, scale: float) -> list[int]:
    if device.type == "cuda":
        return sorted({max(16, int(round(b * scale))) for b in GPU_SIZES})
    big = {max(16, int(round(b * scale))) for b in CPU_SIZES}
    return sorted(big | {b for b in CPU_CROSSOVER_SIZES if b <= max(big)})


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Measured flop/s of an n x n x n matmul (the GEMM floor's denominator)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = harness.time_fn(lambda: a @ b, device=device, repeats=5, warmup=2)
    del a, b
    return 2.0 * n**3 / t["median"]


def _inf_cl():
    try:
        from inf_cl import cal_flash_loss  # noqa: PLC0415
    except ImportError:
        return None
    return cal_flash_loss


def fused_name(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "chunked"


def _impls(device: torch.device) -> dict:
    """name -> (kind, backend, kd, cmc)."""
    fused = fused_name(device)
    impls = {"torch": ("op", "torch", KD, CMC), fused: ("op", fused, KD, CMC)}
    if device.type == "cuda":
        impls.update({"torch cmc": ("op", "torch", 0.0, 1.0), "triton cmc": ("op", "triton", 0.0, 1.0)})
        if _inf_cl() is not None:
            impls["inf-cl cmc"] = ("inf-cl", None, 0.0, 1.0)
    return impls


def _reference_fits(B: int, device: torch.device) -> tuple[bool, str]:
    """CPU: the dense reference keeps about 11 B x B float32 matrices alive."""
    if device.type != "cpu":
        return True, ""
    need = 11 * B * B * 4
    try:
        import psutil  # noqa: PLC0415

        free = psutil.virtual_memory().available
    except ImportError:
        return True, ""
    if need > 0.8 * free:
        return False, f"skipped: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return True, ""


def _case(kind, backend, kd, cmc, feats):
    img, txt, img_t, txt_t = feats
    x = img.clone().requires_grad_()
    y = txt.clone().requires_grad_()
    s = torch.tensor(14.3, device=img.device, requires_grad=True)
    if kind == "inf-cl":
        cal_flash_loss = _inf_cl()
        head_dim = next(h for h in (256, 128, 64, 32, 16) if img.shape[1] % h == 0)

        def fn():  # both CE directions, each a mean over its rows: our cmc=1 loss
            loss = (cal_flash_loss(x, y, scale=s, head_dim=head_dim).mean()
                    + cal_flash_loss(y, x, scale=s, head_dim=head_dim).mean())
            loss.backward()
            return loss
    else:
        def fn():
            loss = op.contrastive_distill(x, y, img_t, txt_t, s, 20.0, kd=kd, cmc=cmc, backend=backend)
            loss.backward()
            return loss

    def setup():
        x.grad = y.grad = s.grad = None

    return fn, setup


def _free(device: torch.device) -> None:
    """Release freed memory: the CUDA cache, and on the CPU glibc's free heap
    (else RSS stays high after a warm-up and a later peak reads as ~0)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _measure(impl, feats, dev: torch.device, repeats: int, max_seconds: float) -> dict:
    """The measured fields of one row: its loss, peak extra memory and times."""
    fn, setup = _case(*impl, feats)
    try:
        setup()
        out = {"loss": float(fn().detach())}  # warm-up: Triton compiles and autotunes here (with scratch memory)
        harness.sync(dev)
        setup()
        _free(dev)
        out["peak_bytes"] = harness.peak_extra_memory(fn, dev)
        out.update(harness.time_fn(fn, device=dev, repeats=repeats, warmup=0, setup=setup, max_seconds=max_seconds))
        return out
    finally:
        del fn, setup
        _free(dev)


def run(device: str = "cpu", scale: float = 1.0, repeats: int = 5, d: int | None = None, dtype=None,
        max_seconds: float = 60.0) -> dict:
    dev = torch.device(device)
    d = d or (512 if dev.type == "cuda" else 256)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    rate = matmul_rate(dev, dtype)
    impls = _impls(dev)
    Bs = sizes(dev, scale)
    held = {}  # the features of one B at a time

    def feats_for(B):
        if B not in held:
            held.clear()
            _free(dev)
            held[B] = distill_batch(B, d, dtype=dtype, device=dev, seed=B)
        return held[B]

    def cases():
        for B in Bs:
            for name, impl in impls.items():
                row = {"B": B, "d": d, "impl": name, "kd": impl[2], "cmc": impl[3], "median": None, "min": None,
                       "max": None, "n": 0, "peak_bytes": None, "loss": None}
                fits, why = _reference_fits(B, dev) if impl[1] == "torch" else (True, "")
                if not fits:
                    yield {**row, "status": why}, dict
                    continue
                yield row, lambda impl=impl, B=B: _measure(impl, feats_for(B), dev, repeats, max_seconds)

    rows = harness.run_rows(cases(), "contrastive_distill")
    held.clear()
    for r in rows:
        r["floor_ratio"] = r["median"] / (8.0 * r["B"] ** 2 * d / rate) if r["median"] else None
        base = _row(rows, r["B"], "torch cmc" if (r["kd"], r["cmc"]) == (0.0, 1.0) else "torch")
        ok = base is not None and base["median"] and r["median"]
        r["vs_torch"] = base["median"] / r["median"] if ok else None
    return {
        "bench": "contrastive_distill",
        "machine": harness.machine(dev),
        "config": {"scale": scale, "d": d, "dtype": str(dtype), "sizes": Bs, "repeats": repeats, "kd": KD,
                   "cmc": CMC, "impls": list(impls)},
        "matmul_tflops": rate / 1e12,
        "crossover": crossover(rows, dev, dtype),
        "targets": targets(rows) if dev.type == "cuda" else None,
        "rows": rows,
    }


def _row(rows: list[dict], B: int, impl: str):
    return next((r for r in rows if r["B"] == B and r["impl"] == impl), None)


def crossover(rows: list[dict], dev: torch.device, dtype: torch.dtype) -> dict:
    """Where the fused backend stops being slower than the reference, measured and declared,
    and what the default dispatch picks at each B (with its speed-up over the reference)."""
    fused = fused_name(dev)
    ratio, default = {}, {}
    for B in sorted({r["B"] for r in rows}):
        ref, fast = _row(rows, B, "torch"), _row(rows, B, fused)
        if ref and fast and ref["median"] and fast["median"]:
            ratio[B] = fast["median"] / ref["median"]
        pick = _backend.select("contrastive_distill", op.BACKENDS, dev, dtypes=(dtype,), B=B)
        picked = _row(rows, B, pick)
        default[B] = {"backend": pick, "vs_torch": 1.0 if pick == "torch" else (picked or {}).get("vs_torch")}
    measured = None
    for B in sorted(ratio, reverse=True):  # the smallest B from which fused is never slower
        if ratio[B] > 1.0:
            break
        measured = B
    return {"backend": fused, "measured": measured, "declared": op.CHUNKED_MIN_BATCH if fused == "chunked" else None,
            "fused_over_torch": ratio, "default": default}


def targets(rows: list[dict]) -> dict:
    B, want = TARGET_SPEEDUP
    fast = _row(rows, B, "triton")
    Bm, limit = TARGET_MEMORY
    mem = _row(rows, Bm, "triton")
    peak = mem["peak_bytes"] if mem else None
    return {
        f"speedup_B{B}": {"target": want, "measured": fast["vs_torch"] if fast else None,
                          "met": None if not fast or fast["vs_torch"] is None else fast["vs_torch"] >= want},
        f"extra_memory_B{Bm}": {"target_bytes": limit, "measured_bytes": peak,
                                "met": None if peak is None else peak <= limit},
    }


def table(result: dict) -> str:
    cfg = result["config"]
    head = (f"contrastive_distill forward+backward ({cfg['dtype']}, d={cfg['d']}) on {result['machine']['device']}; "
            f"measured matmul {result['matmul_tflops']:.2f} TFLOP/s (GEMM floor = 8*B^2*d at that rate); "
            f"'x torch' = speed-up over the dense reference (cmc rows: over 'torch cmc')")
    rows = []
    for r in result["rows"]:
        rows.append({
            **r,
            "median_ms": harness.ms(r["median"]), "min_ms": harness.ms(r["min"]), "max_ms": harness.ms(r["max"]),
            "device_ms": harness.ms(r.get("device_median")),
            "peak_mib": None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20,
        })
    cols = [("B", "B"), ("impl", "impl"), ("median_ms", "median ms"), ("min_ms", "min ms"), ("max_ms", "max ms")]
    if any(r["device_ms"] is not None for r in rows):  # CUDA events (GPU)
        cols.append(("device_ms", "device ms"))
    cols += [("peak_mib", "peak MiB"), ("loss", "loss"), ("vs_torch", "x torch"), ("floor_ratio", "x floor"),
             ("status", "status")]
    c = result["crossover"]
    lines = [head, harness.format_table(rows, cols),
             f"crossover ({c['backend']} vs torch): measured B >= {c['measured']}, declared B >= {c['declared']}; "
             "default dispatch: " + ", ".join(f"B={B} {v['backend']}" for B, v in c["default"].items())]
    for name, t in (result.get("targets") or {}).items():
        lines.append(f"target {name}: {t}")
    return "\n".join(lines)
