"""similarity_topk gives the same bits on every machine (issue 12, item 2).

A seeded, tie-heavy problem (random unit vectors, integer-grid rows that tie,
rows duplicated across shards, a key that equals a query, a zero query, a NaN
row) is solved by every backend and screening path, under several
environments (run in subprocesses: MKL's code paths, thread counts), with
other shard splits and query batches; the SHA-256 of the result arrays must
equal the golden value committed here. The golden value is the definition's
own: the dense reference reproduces it, and so does the definition written in
plain Python.

    python tests/test_similarity_topk_golden.py     # prints the hashes
"""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from mgcl import _backend
from mgcl.ops.similarity_topk import BACKENDS, native, similarity_topk

GOLDEN = {
    "ties_k5": "5741ff057a5625ba395a96ed3ba291b2830482778b1196756d1a6ab6eeef178d",
    "plain_k5": "9cced39d3c819339798e7c53b3482367464a02a5c1bcb9ee24b23b07f5b4ef12",
    "ties_k7_cap9": "de931571b703f036a9792c49eebf000384f016487e086fb81af22ff689ac1ab4",
    "ties_k1": "cfa5a509cad410eea64cf075aa574d30ad4062b370795aecd5b1132b0c3bc50e",
}
CONFIGS = {"ties_k5": (5, True, None), "plain_k5": (5, False, None), "ties_k7_cap9": (7, True, 9),
           "ties_k1": (1, True, None)}
CUTS = [0, 317, 317, 700, 1001]


def problem():
    """(queries float32 [32, 48], keys float16 [1200, 48])."""
    g = torch.Generator().manual_seed(20240521)
    d = 48
    unit = torch.nn.functional.normalize(torch.randn(260, d, generator=g), dim=1)
    grid = torch.randint(-3, 4, (140, d), generator=g).float() * 0.125
    base = torch.cat([unit, grid]).half()
    keys = base[torch.randint(0, base.shape[0], (1200,), generator=g)]  # ~3 copies of each row, anywhere
    keys[:400] = base  # every row at least once
    keys[1100] = float("nan")
    q_unit = torch.nn.functional.normalize(torch.randn(20, d, generator=g), dim=1)
    q_grid = torch.randint(-3, 4, (9, d), generator=g).float() * 0.125
    queries = torch.cat([q_unit, q_grid, keys[5:6].float(), keys[300:301].float(), torch.zeros(1, d)])
    return queries, keys


def shards_of(keys, cuts):
    bounds = [0] + list(cuts) + [keys.shape[0]]
    return [keys[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def digest(res) -> str:
    v, i, o, t = (x.cpu() for x in res)
    h = hashlib.sha256()
    h.update(v.numpy().astype("<f4").tobytes())
    h.update(i.numpy().astype("<i8").tobytes())
    h.update(o.numpy().astype("<i8").tobytes())
    h.update(t.numpy().astype("u1").tobytes())
    return h.hexdigest()


def concat(results):
    """Results of consecutive query batches as one."""
    vals, idx, offs, trunc = zip(*results)
    counts = torch.cat([o.diff() for o in offs])
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    return torch.cat(vals), torch.cat(idx), offsets, torch.cat(trunc)


def solve(run, queries, keys, cuts=CUTS, batches=None):
    out = {}
    for name, (k, ties, mpq) in CONFIGS.items():
        shards = shards_of(keys, cuts)
        if batches is None:
            res = run(queries, shards, k, ties, mpq)
        else:
            bounds = [0] + batches + [queries.shape[0]]
            res = concat([run(queries[a:b], shards, k, ties, mpq) for a, b in zip(bounds[:-1], bounds[1:])])
        out[name] = digest(res)
    return out


def by_backend(name):
    return lambda q, s, k, ties, mpq: similarity_topk(q, s, k, ties=ties, max_per_query=mpq, backend=name)


def by_path(path):
    return lambda q, s, k, ties, mpq: native.similarity_topk_cpu(q, s, k, ties, mpq, path=path)


def hashes() -> dict:
    """The default backend's hashes (what the subprocesses print)."""
    q, keys = problem()
    return solve(lambda q, s, k, ties, mpq: similarity_topk(q, s, k, ties=ties, max_per_query=mpq), q, keys)


# ---- tests -------------------------------------------------------------------------------------

def test_golden_is_the_definition():
    from test_similarity_topk import brute  # the definition in plain Python

    q, keys = problem()
    flat = torch.cat(shards_of(keys, CUTS))
    for name, (k, ties, mpq) in CONFIGS.items():
        v, i, o, t = brute(q, flat, k, ties, mpq)
        res = (torch.tensor(v, dtype=torch.float32), torch.tensor(i, dtype=torch.int64),
               torch.tensor(o, dtype=torch.int64), torch.tensor(t, dtype=torch.bool))
        assert digest(res) == GOLDEN[name], name
        if ties and mpq is None:
            assert (res[2].diff() > k).any(), "the problem should have tie-extended results"


def test_every_backend_and_path_gives_the_golden_hashes():
    q, keys = problem()
    runs = {b: by_backend(b) for b in BACKENDS if b in ("cpp", "chunked", "torch")}
    if "cpp" in runs:
        runs.update({f"cpp/{p}": by_path(p) for p in native.cpu_paths() + ["scalar", "blas"]})
    for name, run in runs.items():
        assert solve(run, q, keys) == GOLDEN, name


def test_other_shard_splits_and_query_batches_give_the_golden_hashes():
    q, keys = problem()
    run = by_backend(None)
    assert solve(run, q, keys, cuts=[600]) == GOLDEN
    assert solve(run, q, keys, cuts=[1, 2, 3, 1199]) == GOLDEN
    assert solve(run, q, keys, batches=[1, 8, 20]) == GOLDEN
    assert solve(run, q, keys, cuts=[50, 51, 1000], batches=[16]) == GOLDEN


@pytest.mark.gpu
def test_gpu_gives_the_golden_hashes():
    q, keys = problem()
    for b in ("cuda", "chunked", "torch"):
        if b == "cuda" and not _backend.runs(BACKENDS, "cuda", "cuda"):
            continue
        run = by_backend(b)
        assert solve(lambda q, s, k, t, m: run(q.cuda(), [x.cuda() for x in s], k, t, m), q, keys) == GOLDEN, b
        assert solve(lambda q, s, k, t, m: run(q.cuda(), s, k, t, m), q, keys) == GOLDEN, f"{b} host keys"


ENVIRONMENTS = {
    "default": {},
    "MKL_CBWR=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"},
    "MKL_CBWR=AVX2": {"MKL_CBWR": "AVX2"},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
    "OMP_NUM_THREADS=2": {"OMP_NUM_THREADS": "2"},
}


def test_environments_give_the_golden_hashes():
    # one subprocess per environment: MKL reads MKL_CBWR and OpenMP its thread
    # count when they load
    procs = {}
    for name, extra in ENVIRONMENTS.items():
        env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "OMP_NUM_THREADS")}
        procs[name] = subprocess.Popen([sys.executable, __file__], env={**env, **extra}, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    for name, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{name}: {err[-2000:]}"
        assert json.loads(out.strip().splitlines()[-1]) == GOLDEN, name


if __name__ == "__main__":
    print(json.dumps(hashes()))
