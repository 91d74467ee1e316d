"""contrastive_distill over a process group: 2 gloo processes on the CPU give the
single-process loss and gradients of the concatenated batch."""
import os

import pytest
import torch
import torch.distributed as dist

from conftest import available_backends, free_port, run_ranks
from mgcl.ops.contrastive_distill import BACKENDS, contrastive_distill
from mgcl.testing import distill_batch

# Triton warns about block pointers in every interpreted launch (see triton.py)
pytestmark = pytest.mark.filterwarnings("ignore:tl.make_block_ptr is deprecated")

BACKENDS_HERE = available_backends(BACKENDS, "cpu")  # torch, chunked (+ triton when interpreting)

# name -> (sizes per rank, d, dt, kd, cmc, i2t, t2i, weighted, how the group is given)
CASES = {
    "uneven-weighted": ((5, 8), 11, None, 1.0, 0.25, 0.7, 1.3, True, "gather"),
    "even-cmc-only": ((6, 6), 9, 14, 0.0, 1.0, 1.0, 1.0, False, "gather"),
    "kd-group": ((9, 4), 7, None, 1.0, 0.0, 1.0, 1.0, True, "group"),
}


def global_inputs(case):
    sizes, d, dt, *_ = CASES[case]
    B = sum(sizes)
    feats = distill_batch(B, d, dt, seed=B + d)
    g = torch.Generator().manual_seed(7)
    w, v = 2 * torch.rand(B, generator=g), 2 * torch.rand(B, generator=g)
    w[::4] = 0.0
    return feats, w, v


def local_call(case, backend, rank, group):
    sizes, d, dt, kd, cmc, i2t, t2i, weighted, how = CASES[case]
    feats, w, v = global_inputs(case)
    lo = sum(sizes[:rank])
    sl = slice(lo, lo + sizes[rank])
    x = feats[0][sl].clone().requires_grad_()
    y = feats[1][sl].clone().requires_grad_()
    s = torch.tensor(13.0, requires_grad=True)
    kw = dict(kd=kd, cmc=cmc, i2t=i2t, t2i=t2i, backend=backend)
    if weighted:
        kw.update(row_weight=w[sl], col_weight=v[sl])
    if how == "group":
        kw["process_group"] = group
    else:
        kw["gather"] = True
    loss = contrastive_distill(x, y, feats[2][sl], feats[3][sl], s, 21.0, **kw)
    loss.backward()
    return {"loss": loss.detach(), "d_img": x.grad, "d_txt": y.grad, "d_scale": s.grad}


def single_call(case, backend):
    sizes, d, dt, kd, cmc, i2t, t2i, weighted, how = CASES[case]
    feats, w, v = global_inputs(case)
    x, y = feats[0].clone().requires_grad_(), feats[1].clone().requires_grad_()
    s = torch.tensor(13.0, requires_grad=True)
    kw = dict(kd=kd, cmc=cmc, i2t=i2t, t2i=t2i, backend=backend)
    if weighted:
        kw.update(row_weight=w, col_weight=v)
    loss = contrastive_distill(x, y, feats[2], feats[3], s, 21.0, **kw)
    loss.backward()
    return {"loss": loss.detach(), "d_img": x.grad, "d_txt": y.grad, "d_scale": s.grad}


def create_graph_call(backend, rank):
    """A gradient with create_graph=True under gather=True: its outcome as text."""
    feats, _, _ = global_inputs("even-cmc-only")
    sl = slice(6 * rank, 6 * rank + 6)
    x = feats[0][sl].clone().requires_grad_()
    loss = contrastive_distill(x, feats[1][sl], feats[2][sl], feats[3][sl], 13.0, 21.0, kd=1.0, cmc=0.25,
                               gather=True, backend=backend)
    try:
        (g,) = torch.autograd.grad(loss, [x], create_graph=True)
    except RuntimeError as exc:
        return f"error: {exc}"
    return f"ok, graph: {g.requires_grad}"


def _worker(rank, world, port, out_dir, backends):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = dist.new_group([0, 1])
        results = {}
        for case in CASES:
            for backend in backends:
                results[(case, backend)] = local_call(case, backend, rank, group)
        for backend in backends:
            results[("create_graph", backend)] = create_graph_call(backend, rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    return run_ranks(_worker, tmp_path_factory.mktemp("dist"), BACKENDS_HERE)


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_single_process(rank_results, case, backend):
    want = single_call(case, "torch")
    got = [rank_results[r][(case, backend)] for r in range(2)]
    for r in range(2):  # every rank returns the global loss
        assert rel_err(got[r]["loss"], want["loss"]) <= 1e-5, (r, got[r]["loss"], want["loss"])
    d_img = torch.cat([g["d_img"] for g in got])
    d_txt = torch.cat([g["d_txt"] for g in got])
    d_scale = got[0]["d_scale"] + got[1]["d_scale"]  # each rank holds its share
    assert rel_err(d_img, want["d_img"]) <= 1e-5
    assert rel_err(d_txt, want["d_txt"]) <= 1e-5
    assert rel_err(d_scale, want["d_scale"]) <= 1e-5


@pytest.mark.parametrize("backend", [b for b in BACKENDS_HERE if b != "torch"])
def test_fused_double_backward_over_ranks_is_a_clear_error(rank_results, backend):
    """Issue 15: no silent gradient without a graph; here (fused, gather=True) a clear error."""
    for r in range(2):
        assert rank_results[r][("create_graph", backend)].startswith(
            "error: contrastive_distill: double backward (create_graph=True) with gather=True")


def test_single_process_world_falls_back_to_local(tmp_path):
    """gather=True with a world of one is the plain call."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        feats = distill_batch(10, 6, seed=1)
        a = contrastive_distill(*feats, 10.0, 12.0, cmc=0.3, gather=True)
        b = contrastive_distill(*feats, 10.0, 12.0, cmc=0.3)
        assert float(a) == float(b)
    finally:
        dist.destroy_process_group()
