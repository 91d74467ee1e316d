"""Bench: fisher_guard over the parameter shapes of CLIP ViT-B/16.

Implementations timed (one DFG update of every tensor, lam small so repeated
calls stay finite):
- ``loop``: the reference, one tensor at a time (the baseline);
- ``foreach``: the same math with ``torch._foreach_*`` (the best a user gets
  from stock PyTorch without a kernel);
- ``cpp`` (CPU) / ``cuda`` (GPU): the fused backends.
"""
from __future__ import annotations

import math

import torch

from ..ops.fisher_guard import BACKENDS, fisher_guard
from ..ops.fisher_guard import reference
from . import harness


def vit_b16_shapes(scale: float = 1.0) -> list[tuple[int, ...]]:
    """The ~302 parameter shapes of open_clip ViT-B-16 (~149.6M elements).

    ``scale`` < 1 shrinks the leading dimension of every tensor (at least 1),
    so the element count scales about linearly while the tensor count stays.
    """
    shapes: list[tuple[int, ...]] = []
    w, tw = 768, 512
    shapes += [(w, 3, 16, 16), (w,), (197, w), (w,), (w,)]  # conv1, class_emb, pos_emb, ln_pre
    for _ in range(12):
        shapes += [(w,), (w,), (3 * w, w), (3 * w,), (w, w), (w,), (w,), (w,), (4 * w, w), (4 * w,), (w, 4 * w), (w,)]
    shapes += [(w,), (w,), (w, tw)]  # ln_post, proj
    shapes += [(49408, tw), (77, tw)]  # token_embedding, positional_embedding
    for _ in range(12):
        shapes += [(tw,), (tw,), (3 * tw, tw), (3 * tw,), (tw, tw), (tw,), (tw,), (tw,), (4 * tw, tw), (4 * tw,),
                   (tw, 4 * tw), (tw,)]
    shapes += [(tw,), (tw,), (tw, tw), ()]  # ln_final, text_projection, logit_scale
    if scale != 1.0:
        shapes = [s if not s else (max(1, math.ceil(s[0] * scale)),) + s[1:] for s in shapes]
    return shapes


def make_case(scale: float, device, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = vit_b16_shapes(scale)
    def mk(s, sd):
        return (torch.randn(s, generator=g) * sd).to(device=device, dtype=dtype)
    grads = [mk(s, 1e-3) for s in shapes]
    params = [mk(s, 2e-2) for s in shapes]
    anchors = [p + mk(p.shape, 1e-3) for p in params]
    return grads, params, anchors


def foreach_dfg(grads, params, anchors, lam: float) -> torch.Tensor:
    """DFG with stock torch._foreach ops (fp32 tensors)."""
    w = torch._foreach_mul(grads, grads)
    d = torch._foreach_sub(params, anchors)
    wd = torch._foreach_mul(w, d)
    torch._foreach_add_(grads, wd, alpha=2.0 * lam)
    wdd = torch._foreach_mul(wd, d)
    return lam * torch.stack([t.sum() for t in wdd]).sum()


def run(device: str = "cpu", scale: float = 1.0, repeats: int = 5, dtype=torch.float32, lam: float = 1e-3) -> dict:
    dev = torch.device(device)
    grads, params, anchors = make_case(scale, dev, dtype)
    n_elem = sum(t.numel() for t in grads)
    esize = grads[0].element_size()
    nbytes = 4 * n_elem * esize  # DFG: read grad, param, anchor; write grad
    impls = {
        "loop": lambda: reference.fisher_guard(grads, params, anchors, None, lam, "dfg", 0.0, None),
        "foreach": lambda: foreach_dfg(grads, params, anchors, lam),
    }
    fused = "cuda" if dev.type == "cuda" else "cpp"
    from .. import _backend  # noqa: PLC0415

    if _backend.runs(BACKENDS, fused, dev.type):
        impls[fused] = lambda: fisher_guard(grads, params, anchors, lam=lam, backend=fused)
    rows = []
    for name, fn in impls.items():
        t = harness.time_fn(fn, device=dev, repeats=repeats, warmup=1)
        rows.append({"impl": name, **{k: t[k] for k in ("median", "min", "max")}, "n": t["n"],
                     "gbps": nbytes / t["median"] / 1e9})
    base = {r["impl"]: r["median"] for r in rows}
    for r in rows:
        r["vs_loop"] = base["loop"] / r["median"]
        r["vs_foreach"] = base["foreach"] / r["median"]
    copy_gbps = harness.copy_bandwidth(dev, nbytes=min(1 << 30, nbytes), repeats=3)
    for r in rows:
        r["pct_copy_bw"] = 100.0 * r["gbps"] / copy_gbps
    return {
        "bench": "fisher_guard",
        "machine": harness.machine(dev),
        "config": {"scale": scale, "dtype": str(dtype), "mode": "dfg", "tensors": len(grads),
                   "elements": n_elem, "bytes_moved": nbytes, "lam": lam, "repeats": repeats},
        "copy_gbps": copy_gbps,
        "rows": rows,
    }


def table(result: dict) -> str:
    cfg = result["config"]
    head = (f"fisher_guard (dfg, {cfg['dtype']}) on {result['machine']['device']}: {cfg['tensors']} tensors, "
            f"{cfg['elements'] / 1e6:.1f}M elements, {cfg['bytes_moved'] / 1e9:.2f} GB moved; "
            f"measured copy rate {result['copy_gbps']:.1f} GB/s")
    rows = [{**r, "median_ms": harness.ms(r["median"]), "min_ms": harness.ms(r["min"]), "max_ms": harness.ms(r["max"])}
            for r in result["rows"]]
    cols = [("impl", "impl"), ("median_ms", "median ms"), ("min_ms", "min ms"), ("max_ms", "max ms"),
            ("vs_loop", "x loop"), ("vs_foreach", "x foreach"), ("gbps", "GB/s"), ("pct_copy_bw", "% copy")]
    return head + "\n" + harness.format_table(rows, cols)
