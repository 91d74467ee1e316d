"""Bench: fisher_guard over the parameter shapes of CLIP ViT-B/16.

Implementations timed (one DFG update of every tensor, lam small so repeated
calls stay finite):
- ``loop``: the reference, one tensor at a time (the baseline);
- ``foreach``: the same math with ``torch._foreach_*`` (the best a user gets
  from stock PyTorch without a kernel);
- ``cpp`` (CPU) / ``cuda`` (GPU): the fused backends.

Plus the host cost of ``FisherGuard.apply()`` (its prepared path), apart from
the kernel: see :func:`host_cost`.
"""
from __future__ import annotations

import math
import operator
import statistics
import time

import torch

from .. import _backend
from ..ops.fisher_guard import BACKENDS, fisher_guard, reference
from . import harness

_grad = operator.attrgetter("grad")


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


class _TimedNative:
    """Stands in for ``mgcl._native._C`` while the host cost is measured: every
    attribute is the real module's, and ``fisher_guard`` also records how long
    the native call took (so each apply()'s own kernel time is subtracted from
    that same apply(), not a separately timed launch: the OpenMP team's wake-up
    and the caches are those of the call itself)."""

    def __init__(self, real):
        self._real, self.inner = real, []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def fisher_guard(self, *args):
        t0 = time.perf_counter()
        self._real.fisher_guard(*args)
        self.inner.append(time.perf_counter() - t0)


def host_cost(device, repeats: int = 5, calls: int = 200) -> dict:
    """Host time of one ``FisherGuard.apply()`` over the 302 ViT-B/16 tensors
    (dfg), on the prepared path: with the same grad tensors every step; with
    new grad tensors at new addresses every step (two sets alternating: the
    worst case of a loop that sets grads to None); and in a loop that sets the
    grads to None and lets a backward allocate them (what ``zero_grad()``
    does by default: the allocator may hand back the same addresses); and in
    that loop with the new grads read once before ``apply()`` (``_read``: the
    first read of a grad autograd just made creates its Python object, a cost
    whoever reads the grads first pays, the optimizer when nothing else does).

    The tensors are the real shapes shrunk (``scale`` 1e-4: the tensor count,
    which the host cost scales with, stays 302). CPU: the time of each apply()
    minus the time of the native call inside it (``_TimedNative``). CUDA: the
    time for ``apply()`` to return, the kernels only enqueued. Seconds per
    call, the median over ``repeats`` runs of ``calls`` calls (medians, so a
    busy machine's outliers drop out); ``kernel`` is the median native call."""
    from .. import _native  # noqa: PLC0415
    from ..guard import FisherGuard  # noqa: PLC0415

    dev = torch.device(device)
    shapes = vit_b16_shapes(1e-4)
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dev)) for s in shapes]
    guard = FisherGuard(params, lam=1e-3, mode="dfg")
    grad_sets = [[torch.randn(s, generator=g).to(dev) * 1e-3 for s in shapes] for _ in range(2)]
    timed = dev.type == "cpu" and _native.HAS_C and _backend.select("fisher_guard", BACKENDS, dev) != "torch"
    inner_all: list[float] = []

    def per_call(step) -> tuple[float, float]:
        runs, hosts = [], []
        for _ in range(repeats):
            harness.sync(dev)
            times, host = [], []
            for i in range(calls):
                step(i)
                proxy = _TimedNative(_native._C) if timed else None
                if timed:
                    _native._C = proxy
                try:
                    t0 = time.perf_counter()
                    guard.apply()
                    t = time.perf_counter() - t0
                finally:
                    if timed:
                        _native._C = proxy._real
                times.append(t)
                inner = sum(proxy.inner) if timed else 0.0
                inner_all.append(inner)
                host.append(t - inner)
            harness.sync(dev)
            runs.append(statistics.median(times))
            hosts.append(statistics.median(host))
        return statistics.median(runs), statistics.median(hosts)

    def same(i):
        for p, t in zip(params, grad_sets[0]):
            p.grad = t

    def new(i):
        for p, t in zip(params, grad_sets[i % 2]):
            p.grad = t

    weights = [torch.randn(s, generator=g).to(dev) for s in shapes]

    def loop(i):  # a training loop's step: zero_grad(set_to_none=True), then autograd allocates the grads
        for p in params:
            p.grad = None
        torch.stack([(p * w).sum() for p, w in zip(params, weights)]).sum().backward()

    def loop_read(i):  # the same, the new grads' Python objects made before apply() (by a grad clip, a logger)
        loop(i)
        list(map(_grad, params))

    same(0)
    guard.apply()  # prepare
    out = {"tensors": len(params), "elements": sum(p.numel() for p in params)}
    out["same_grads_apply"], out["same_grads_host"] = per_call(same)
    out["new_grads_apply"], out["new_grads_host"] = per_call(new)
    out["zero_grad_loop_apply"], out["zero_grad_loop_host"] = per_call(loop)
    out["zero_grad_loop_read_apply"], out["zero_grad_loop_read_host"] = per_call(loop_read)
    out["kernel"] = statistics.median(inner_all) if timed else 0.0
    return out


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
    if _backend.runs(BACKENDS, fused, dev.type):
        impls[fused] = lambda: fisher_guard(grads, params, anchors, lam=lam, backend=fused)

    def measure(fn):
        def go():
            t = harness.time_fn(fn, device=dev, repeats=repeats, warmup=1)
            return {**{k: t[k] for k in harness.TIMING_KEYS if k in t}, "gbps": nbytes / t["median"] / 1e9}
        return go

    rows = harness.run_rows([({"impl": name}, measure(fn)) for name, fn in impls.items()], "fisher_guard")
    base = {r["impl"]: r.get("median") for r in rows}
    copy_gbps = harness.copy_bandwidth(dev, nbytes=min(1 << 30, nbytes), repeats=3)
    for r in rows:
        if r.get("median"):
            r["vs_loop"] = base["loop"] / r["median"] if base.get("loop") else None
            r["vs_foreach"] = base["foreach"] / r["median"] if base.get("foreach") else None
            r["pct_copy_bw"] = 100.0 * r["gbps"] / copy_gbps
    return {
        "bench": "fisher_guard",
        "machine": harness.machine(dev),
        "config": {"scale": scale, "dtype": str(dtype), "mode": "dfg", "tensors": len(grads),
                   "elements": n_elem, "bytes_moved": nbytes, "lam": lam, "repeats": repeats},
        "copy_gbps": copy_gbps,
        "rows": rows,
        "host": host_cost(dev, repeats=repeats),
    }


def table(result: dict) -> str:
    cfg = result["config"]
    head = (f"fisher_guard (dfg, {cfg['dtype']}) on {result['machine']['device']}: {cfg['tensors']} tensors, "
            f"{cfg['elements'] / 1e6:.1f}M elements, {cfg['bytes_moved'] / 1e9:.2f} GB moved; "
            f"measured copy rate {result['copy_gbps']:.1f} GB/s")
    rows = [{**r, **{f"{k}_ms": harness.ms(r.get(k)) for k in ("median", "min", "max", "device_median")}}
            for r in result["rows"]]
    cols = [("impl", "impl"), ("median_ms", "median ms"), ("min_ms", "min ms"), ("max_ms", "max ms")]
    if any(r.get("device_median") is not None for r in rows):
        cols.append(("device_median_ms", "device ms"))
    cols += [("vs_loop", "x loop"), ("vs_foreach", "x foreach"), ("gbps", "GB/s"), ("pct_copy_bw", "% copy"),
             ("status", "status")]
    h = result["host"]
    us = 1e6
    foot = (f"FisherGuard.apply() host cost over {h['tensors']} tensors (prepared path"
            + (f"; each call's own native kernel time subtracted, median {h['kernel'] * us:.0f} us"
               if h["kernel"] else "; kernels enqueued")
            + f"): same grads {h['same_grads_host'] * us:.0f} us, new grads at new addresses every step "
            f"{h['new_grads_host'] * us:.0f} us"
            + (f", grads set to None and allocated by a backward {h['zero_grad_loop_host'] * us:.0f} us"
               if "zero_grad_loop_host" in h else "")
            + (f" ({h['zero_grad_loop_read_host'] * us:.0f} us when they were read once before)"
               if "zero_grad_loop_read_host" in h else "")
            + " (target: at most 100 us)")
    return head + "\n" + harness.format_table(rows, cols) + "\n" + foot
