"""The op part of the wheel smoke test (scripts/smoke_test.sh runs it inside the
fresh venv): each op's default CPU backend must be its native one, and that
backend must match the reference on fixed inputs; the native outputs' sha256
go to a JSON file, so that one wheel's results under two torch versions can be
compared bit for bit (the native modules must not depend on torch's ABI).
contrastive_distill's CPU default, chunked, is torch code (its compiled path
is the Triton one, on GPUs): it must match the reference, but its digest is
torch's arithmetic, which may change between torch versions, so --same-as
does not compare it.

    python smoke_ops.py --info INFO.json --out OPS.json [--same-as OTHER.json] [--cuda-module]

Inputs come from Python's own Mersenne Twister (its ``random()`` stream is
fixed across Python versions), not from torch's generators, so that a digest
can only change with the code that computes the outputs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys

import torch

import mgcl
from mgcl import _native
from mgcl.ops.contrastive_distill import contrastive_distill
from mgcl.ops.fisher_guard import fisher_guard
from mgcl.ops.similarity_topk import similarity_topk
from mgcl.testing import assert_matches_reference

# The CPU backend each op must default to when mgcl._C is present.
NATIVE = {"fisher_guard": "cpp", "contrastive_distill": "chunked", "similarity_topk": "cpp"}
# Those that run in mgcl._C (the others are torch code): --same-as compares these.
COMPILED = ("fisher_guard", "similarity_topk")


def uniform(shape, seed: int, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    rng = random.Random(seed)
    n = 1
    for s in shape:
        n *= s
    return torch.tensor([lo + (hi - lo) * rng.random() for _ in range(n)], dtype=torch.float32).reshape(shape)


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_fisher_guard(backend: str) -> list[torch.Tensor]:
    shapes = [(37,), (13, 29), (3, 5, 17), (1,), (257, 3)]
    outs = []
    for mode, kw in (("dfg", {"normalize": "mean"}), ("ewc", {}), ("l2", {}), ("dfg", {"ema": 0.9})):
        for dtype in (torch.float32, torch.bfloat16):
            base = [[uniform(s, 100 * i + j).to(dtype) for j in range(3)] for i, s in enumerate(shapes)]
            fisher = [uniform(s, 7000 + i, 0.0, 2.0) for i, s in enumerate(shapes)] if mode == "ewc" or kw.get("ema") else None
            res = {}
            for name in (backend, "torch"):
                g = [b[0].clone() for b in base]
                f = [x.clone() for x in fisher] if fisher is not None else None
                pen = fisher_guard(g, [b[1] for b in base], [b[2] for b in base], lam=0.37, mode=mode, fisher=f,
                                   backend=name, **kw)
                res[name] = (g, pen, f)
            (g, pen, f), (g_ref, pen_ref, f_ref) = res[backend], res["torch"]
            tag = f"fisher_guard[{mode}{'+' + ','.join(kw) if kw else ''}, {dtype}]"
            for i, (a, b) in enumerate(zip(g, g_ref)):
                assert_matches_reference(a, b, dtype=dtype, name=f"{tag} grad {i}")
            assert_matches_reference(pen, pen_ref, dtype=dtype, name=f"{tag} penalty")
            outs += g + [pen] + (f or [])
    return outs


def check_contrastive_distill(backend: str) -> list[torch.Tensor]:
    B, d = 77, 40
    norm = torch.nn.functional.normalize
    feats = [norm(uniform((B, d), 200 + i), dim=1) for i in range(4)]
    w = uniform((B,), 300, 0.5, 1.5)
    res = {}
    for name in (backend, "torch"):
        img = feats[0].clone().requires_grad_(True)
        txt = feats[1].clone().requires_grad_(True)
        scale = torch.tensor(14.3, requires_grad=True)
        loss = contrastive_distill(img, txt, feats[2], feats[3], scale, 20.0, kd=1.0, cmc=0.25, i2t=1.0, t2i=0.5,
                                   row_weight=w, col_weight=w.flip(0), backend=name)
        loss.backward()
        res[name] = [loss.detach(), img.grad, txt.grad, scale.grad]
    for what, a, b in zip(("loss", "d img", "d txt", "d scale"), res[backend], res["torch"]):
        assert_matches_reference(a, b, dtype=torch.float32, name=f"contrastive_distill {what}")
    return res[backend]


def check_similarity_topk(backend: str) -> list[torch.Tensor]:
    # Small integers make every score exact, and repeated key rows make ties.
    q = torch.round(uniform((37, 24), 400, -4, 4))
    keys = torch.round(uniform((300, 24), 401, -4, 4))
    keys[150:180] = keys[:30]
    shards = [keys[:211], keys[211:]]
    outs = []
    for ties, k in ((True, 10), (False, 10), (True, 1000)):
        got = similarity_topk(q, shards, k, ties=ties, backend=backend)
        ref = similarity_topk(q, shards, k, ties=ties, backend="torch")
        for what in ("values", "indices", "offsets", "truncated"):
            a, b = getattr(got, what), getattr(ref, what)
            if not torch.equal(a, b):
                raise AssertionError(f"similarity_topk(ties={ties}, k={k}) {what} differ from the reference")
        outs += list(got)
    return outs


CHECKS = {"fisher_guard": check_fisher_guard, "contrastive_distill": check_contrastive_distill,
          "similarity_topk": check_similarity_topk}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--info", required=True, help="the output of `mgcl info --json`")
    p.add_argument("--out", required=True, help="write the native outputs' digests here")
    p.add_argument("--same-as", help="digests from another run of this wheel: must be equal")
    p.add_argument("--cuda-module", action="store_true", help="the wheel ships mgcl._C_cuda: it must import")
    args = p.parse_args(argv)
    with open(args.info) as fh:
        info = json.load(fh)
    errors = []
    if not _native.HAS_C:
        errors.append(f"mgcl._C did not import: {_native.C_ERROR}")
    if args.cuda_module and not _native.HAS_C_CUDA:
        errors.append(f"mgcl._C_cuda did not import: {_native.C_CUDA_ERROR}")
    result = {"mgcl": mgcl.__version__, "torch": torch.__version__, "python": sys.version.split()[0], "ops": {}}
    for op, backend in NATIVE.items():
        default = info["backends"][op]["cpu"]
        if default != backend:
            errors.append(f"{op}: the default CPU backend is {default!r}, not the native {backend!r}")
        try:
            result["ops"][op] = digest(CHECKS[op](backend))
            print(f"smoke: {op:<20} {backend:<8} matches the reference   sha256 {result['ops'][op][:16]}")
        except AssertionError as exc:
            errors.append(f"{op} ({backend}): {exc}")
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    if args.same_as:
        with open(args.same_as) as fh:
            other = json.load(fh)
        for op in COMPILED:
            if other["ops"].get(op) != result["ops"].get(op):
                errors.append(f"{op}: native results under torch {torch.__version__} differ from those under "
                              f"torch {other['torch']} ({args.same_as})")
        if not errors:
            print(f"smoke: {' and '.join(COMPILED)} (mgcl._C) bit-identical under torch {torch.__version__} and "
                  f"{other['torch']}")
    for e in errors:
        print(f"smoke: FAIL {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
