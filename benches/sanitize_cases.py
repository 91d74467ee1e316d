"""One small case per GPU kernel, run under compute-sanitizer by benches/gpu_check.sh
(memcheck, racecheck). Small sizes: a sanitized launch is slow.

    compute-sanitizer --tool memcheck python benches/sanitize_cases.py

Kernels: fisher_guard's wsum / mean / update / penalty (normalize and ema,
fp32 and bf16, an unaligned view for the scalar path); similarity_topk's
select (ties and plain, a cap above 48 KiB of shared memory); the Triton
stats and gradient kernels of contrastive_distill. Prints one line per op.
"""
import sys

import torch

from mgcl.ops.contrastive_distill import contrastive_distill
from mgcl.ops.fisher_guard import fisher_guard
from mgcl.ops.similarity_topk import similarity_topk
from mgcl.testing import distill_batch


def fisher_guard_cases(dev):
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        shapes = [(70_001,), (3, 5), (0,), ()]
        ts = [[torch.randn(s, generator=g).to(dev, dtype) for s in shapes] for _ in range(3)]
        fisher = [torch.rand(s, generator=g).to(dev) for s in shapes]
        fisher_guard(ts[0], ts[1], ts[2], lam=0.5, fisher=fisher, ema=0.9, normalize="mean", backend="cuda")
        fisher_guard(ts[0], ts[1], ts[2], lam=0.5, mode="ewc", fisher=fisher, backend="cuda")
    flat = torch.randn(1001, device=dev)
    fisher_guard([flat[1:501]], [torch.randn(500, device=dev)], [torch.randn(500, device=dev)], lam=0.5,
                 backend="cuda")


def similarity_topk_cases(dev):
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(7, 64, generator=g), dim=1).to(dev)
    keys = torch.nn.functional.normalize(torch.randn(5000, 64, generator=g), dim=1).to(dev)
    for k, ties in ((10, True), (10, False), (1200, True), (2000, False)):
        similarity_topk(q, keys, k, ties=ties, backend="cuda")


def contrastive_distill_cases(dev):
    feats = distill_batch(96, 64, dtype=torch.bfloat16, device=dev, seed=2)
    x, y = feats[0].clone().requires_grad_(), feats[1].clone().requires_grad_()
    s = torch.tensor(14.0, device=dev, requires_grad=True)
    contrastive_distill(x, y, feats[2], feats[3], s, 20.0, kd=1.0, cmc=0.25, backend="triton").backward()


def main(ops):
    dev = torch.device("cuda")
    cases = {"fisher_guard": fisher_guard_cases, "similarity_topk": similarity_topk_cases,
             "contrastive_distill": contrastive_distill_cases}
    for op in ops or cases:
        cases[op](dev)
        torch.cuda.synchronize()
        print(f"sanitize {op}: ran")


if __name__ == "__main__":
    main(sys.argv[1:])
