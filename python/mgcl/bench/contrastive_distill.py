"""Bench: contrastive_distill forward + backward over the reference batch size B.

Implementations timed (``kd=1, cmc=0.25``, per-pair weights off):
- ``torch``: the dense reference (the baseline; B x B matrices, autograd);
- ``chunked`` (CPU) / ``triton`` (GPU): the fused backends;
- GPU only, the CMC part alone (``kd=0, cmc=1``): ``torch cmc``, ``triton cmc``
  and the ``inf-cl`` package's ``cal_inf_loss`` (both directions) as an outside
  peer, when it is installed.

Per (B, implementation): median / min / max seconds of one forward+backward,
the peak memory above the inputs (``harness.peak_extra_memory``), the speed-up
over the reference and the ratio to the GEMM floor: a forward+backward needs
the four B x B x d products S, T, dL/dS @ txt and dL/dS.T @ img, 8*B^2*d
flops, timed against the measured matmul rate of this device and dtype.

Sizes: CPU B in {1024, 2048, 4096} * scale, d = 256, float32 (``--scale 4``
gives the 16384 target); GPU B in {1024, ..., 65536} * scale, d = 512,
bfloat16. The reference is skipped on the CPU when it would not fit in the
free memory, and marked OOM on the GPU when it fails.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from ..ops.contrastive_distill import contrastive_distill
from ..testing import distill_batch
from . import harness

CPU_SIZES = (1024, 2048, 4096)
GPU_SIZES = (1024, 4096, 8192, 16384, 32768, 65536)
KD, CMC = 1.0, 0.25


def sizes(device: torch.device, scale: float) -> list[int]:
    base = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    return sorted({max(16, int(round(b * scale))) for b in base})


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
        from inf_cl import cal_inf_loss  # noqa: PLC0415
    except ImportError:
        return None
    return cal_inf_loss


def _impls(device: torch.device) -> dict:
    """name -> (kind, backend, kd, cmc)."""
    if device.type == "cuda":
        impls = {
            "torch": ("op", "torch", KD, CMC),
            "triton": ("op", "triton", KD, CMC),
            "torch cmc": ("op", "torch", 0.0, 1.0),
            "triton cmc": ("op", "triton", 0.0, 1.0),
        }
        if _inf_cl() is not None:
            impls["inf-cl cmc"] = ("inf-cl", None, 0.0, 1.0)
        return impls
    return {"torch": ("op", "torch", KD, CMC), "chunked": ("op", "chunked", KD, CMC)}


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
        cal_inf_loss = _inf_cl()

        def fn():
            loss = cal_inf_loss(x, y, scale=s) + cal_inf_loss(y, x, scale=s)
            loss.backward()
            return loss
    else:
        def fn():
            loss = contrastive_distill(x, y, img_t, txt_t, s, 20.0, kd=kd, cmc=cmc, backend=backend)
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


def run(device: str = "cpu", scale: float = 1.0, repeats: int = 5, d: int | None = None, dtype=None,
        max_seconds: float = 60.0) -> dict:
    dev = torch.device(device)
    d = d or (512 if dev.type == "cuda" else 256)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    rate = matmul_rate(dev, dtype)
    impls = _impls(dev)
    rows = []
    Bs = sizes(dev, scale)
    feats_B, feats = None, None
    for B, name in tqdm([(B, n) for B in Bs for n in impls], desc="contrastive_distill", leave=False):
        if feats_B != B:
            feats, feats_B = None, None
            _free(dev)
            feats, feats_B = distill_batch(B, d, dtype=dtype, device=dev, seed=B), B
        kind, backend, kd, cmc = impls[name]
        row = {"B": B, "d": d, "impl": name, "kd": kd, "cmc": cmc, "status": "ok", "median": None, "min": None,
               "max": None, "n": 0, "peak_bytes": None}
        if backend == "torch":
            fits, why = _reference_fits(B, dev)
            if not fits:
                row["status"] = why
                rows.append(row)
                continue
        fn, setup = _case(kind, backend, kd, cmc, feats)
        try:
            setup()
            fn()  # warm-up: Triton compiles and autotunes here (its autotuner allocates scratch memory)
            harness.sync(dev)
            setup()
            _free(dev)
            row["peak_bytes"] = harness.peak_extra_memory(fn, dev)
            t = harness.time_fn(fn, device=dev, repeats=repeats, warmup=0, setup=setup, max_seconds=max_seconds)
            row.update(median=t["median"], min=t["min"], max=t["max"], n=t["n"])
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM"
        except RuntimeError as exc:  # CPU allocation failures, missing kernels
            if "out of memory" in str(exc).lower() or "alloc" in str(exc).lower():
                row["status"] = "OOM"
            else:
                raise
        finally:
            del fn, setup
            _free(dev)
        if row["median"] is not None:
            row["floor_ratio"] = row["median"] / (8.0 * B * B * d / rate)
        rows.append(row)
    for r in rows:
        base = next((b for b in rows if b["B"] == r["B"] and b["impl"] == ("torch cmc" if r["cmc"] == 1.0 and
                                                                            r["kd"] == 0.0 else "torch")), None)
        ok = base is not None and base["median"] and r["median"]
        r["vs_torch"] = base["median"] / r["median"] if ok else None
    return {
        "bench": "contrastive_distill",
        "machine": harness.machine(dev),
        "config": {"scale": scale, "d": d, "dtype": str(dtype), "sizes": Bs, "repeats": repeats, "kd": KD,
                   "cmc": CMC, "impls": list(impls)},
        "matmul_tflops": rate / 1e12,
        "rows": rows,
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
            "peak_mib": None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20,
        })
    cols = [("B", "B"), ("impl", "impl"), ("median_ms", "median ms"), ("min_ms", "min ms"), ("max_ms", "max ms"),
            ("peak_mib", "peak MiB"), ("vs_torch", "x torch"), ("floor_ratio", "x floor"), ("status", "status")]
    return head + "\n" + harness.format_table(rows, cols)
