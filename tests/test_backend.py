"""The dispatch tables and the one selection rule (mgcl/_backend.py)."""
import pytest
import torch

from mgcl import _backend, _native
from mgcl._backend import Entry
from mgcl.ops.contrastive_distill import BACKENDS as CD
from mgcl.ops.fisher_guard import BACKENDS as FG
from mgcl.ops.similarity_topk import BACKENDS as TK

F32, F64 = torch.float32, torch.float64


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("MGCL_BACKEND", raising=False)


def table():
    """A made-up table: a fast path with a k cap and a crossover, then the reference."""
    def cap(call):
        """k <= 8"""
        return None if call.get("k", 0) <= 8 else f"k={call['k']} is above 8"

    def big(call):
        """B >= 100"""
        return call.get("B", 100) >= 100

    return {
        "cpp": Entry(lambda: "cpp", devices=("cpu",), dtypes=(F32,), limit=cap, prefer=big),
        "torch": Entry(lambda: "torch", devices=("cpu", "cuda"), dtypes=(F32, F64)),
    }


def test_every_op_table_is_entries_ending_with_a_reference_that_runs_everything():
    for tab in (FG, CD, TK):
        assert all(isinstance(e, Entry) and n in _backend.KNOWN for n, e in tab.items())
        last = list(tab)[-1]
        assert last == "torch" and set(tab["torch"].devices) == {"cpu", "cuda"}
        assert all(set(e.dtypes) <= set(tab["torch"].dtypes) for e in tab.values())


def test_default_skips_entries_that_cannot_run_the_call():
    t = table()
    if not _native.HAS_C:
        pytest.skip("mgcl._C missing: cpp never runs")
    assert _backend.select("op", t, "cpu", dtypes=(F32,), k=3, B=500) == "cpp"
    assert _backend.select("op", t, "cpu", dtypes=(F64,), k=3, B=500) == "torch"    # dtype
    assert _backend.select("op", t, "cpu", dtypes=(F32,), k=9, B=500) == "torch"    # limit
    assert _backend.select("op", t, "cpu", dtypes=(F32,), k=3, B=10) == "torch"     # crossover
    assert _backend.select("op", t, "cuda", dtypes=(F32,), k=3, B=500) == "torch"   # device
    # an explicit choice ignores the crossover but not the limits
    assert _backend.select("op", t, "cpu", "cpp", dtypes=(F32,), k=3, B=10) == "cpp"
    with pytest.raises(ValueError, match=r"op: backend 'cpp' \(from backend=\) cannot run this call: k=9 is above 8"):
        _backend.select("op", t, "cpu", "cpp", dtypes=(F32,), k=9)
    with pytest.raises(ValueError, match="it takes float32 tensors, not float64"):
        _backend.select("op", t, "cpu", "cpp", dtypes=(F32, F64))
    with pytest.raises(ValueError, match="it runs on cpu tensors, not cuda"):
        _backend.select("op", t, "cuda", "cpp")


def test_no_entry_can_run_names_every_reason():
    t = {"cpp": table()["cpp"]}
    with pytest.raises(ValueError, match="no backend can run this call.*cpp: it runs on cpu tensors, not cuda"):
        _backend.select("op", t, "cuda")


def test_explicit_names_unknown_or_not_offered():
    with pytest.raises(ValueError, match="unknown backend 'bogus'.*known backends: torch, cpp, cuda, triton, chunked"):
        _backend.select("fisher_guard", FG, "cpu", "bogus")
    with pytest.raises(ValueError, match="'triton' .* is known but not offered by this op; it offers cuda, cpp, torch"):
        _backend.select("fisher_guard", FG, "cpu", "triton")
    with pytest.raises(ValueError, match="'cuda' .* cannot run this call: it runs on cuda tensors, not cpu"):
        _backend.select("fisher_guard", FG, torch.device("cpu"), "cuda")


def test_env_override(monkeypatch):
    env = lambda v: monkeypatch.setenv("MGCL_BACKEND", v)  # noqa: E731
    env("torch")
    assert _backend.select("fisher_guard", FG, "cpu") == "torch"
    env("chunked")  # a global name this op does not offer: ignored for it, used by the op that offers it
    assert _backend.select("fisher_guard", FG, "cpu") == ("cpp" if _native.HAS_C else "torch")
    assert _backend.select("contrastive_distill", CD, "cpu") == "chunked"
    env("similarity_topk=torch, fisher_guard=torch")
    assert _backend.select("fisher_guard", FG, "cpu") == "torch"
    env("cpp,fisher_guard=torch")  # the per-op entry beats the global name
    assert _backend.select("fisher_guard", FG, "cpu") == "torch"
    # issue 15: a known backend the op does not offer is named as such, not as unknown
    env("fisher_guard=chunked")
    with pytest.raises(ValueError, match="'chunked' \\(from MGCL_BACKEND='fisher_guard=chunked'\\) is known but not "
                                         "offered by this op; it offers cuda, cpp, torch"):
        _backend.select("fisher_guard", FG, "cpu")
    env("fisher_guard=bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus' \\(from MGCL_BACKEND="):
        _backend.select("fisher_guard", FG, "cpu")
    env("bogus")  # a global name no op knows is an error everywhere
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        _backend.select("similarity_topk", TK, "cpu")
    env("fisher_gaurd=torch")
    with pytest.raises(ValueError, match="unknown op 'fisher_gaurd'"):
        _backend.select("fisher_guard", FG, "cpu")
    env("cuda")  # offered, cannot run CPU tensors: says why
    with pytest.raises(ValueError, match="cannot run this call: it runs on cuda tensors, not cpu"):
        _backend.select("fisher_guard", FG, "cpu")


def test_triton_on_cpu_only_by_name(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.select("contrastive_distill", CD, "cpu", dtypes=(F32,)) == "chunked"
    if _backend.triton_available():
        assert _backend.select("contrastive_distill", CD, "cpu", "triton", dtypes=(F32,)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="triton.*(TRITON_INTERPRET=1|not installed)"):
        _backend.select("contrastive_distill", CD, "cpu", "triton", dtypes=(F32,))


def test_distill_float64_is_the_tables_business():
    # triton declares its dtypes: float64 CUDA features go to the reference, and
    # an explicit triton says why (no re-dispatch outside the table)
    assert _backend.select("contrastive_distill", CD, "cuda", dtypes=(F64, F64)) == "torch"
    with pytest.raises(ValueError, match="'triton'.*it takes float32, float16, bfloat16 tensors, not float64"):
        _backend.select("contrastive_distill", CD, "cuda", "triton", dtypes=(F32, F64))


@pytest.mark.skipif(not _native.HAS_C_CUDA, reason="mgcl._C_cuda not built")
def test_topk_cuda_declares_its_k_cap():
    cap = int(_native._C_cuda.max_best_cap)
    assert _backend.select("similarity_topk", TK, "cuda", dtypes=(F32,), k=cap) == "cuda"
    after = "triton" if _backend.triton_available() else "chunked"  # the next GPU entry without a k cap
    assert _backend.select("similarity_topk", TK, "cuda", dtypes=(F32,), k=cap + 1) == after
    with pytest.raises(ValueError, match=f"k={cap + 1} is above the CUDA select's cap of {cap}"):
        _backend.select("similarity_topk", TK, "cuda", "cuda", dtypes=(F32,), k=cap + 1)


def test_describe_matches_the_table():
    rows = _backend.describe(TK)
    assert [r["backend"] for r in rows] == list(TK)
    cuda = rows[0]
    assert cuda["devices"] == ["cuda"] and "max_best_cap" in cuda["limit"]
    cpp = rows[1]
    assert cpp["runs_here"] == {"cpu": _native.HAS_C}


# ---- the load-time CUDA compatibility check (mgcl._native), on injected values ---------------

ARCHS = "80-real,90-real,90-virtual"  # the wheel's default (cmake/cuda.cmake)


@pytest.mark.parametrize("capability,ok", [
    ((8, 0), True), ((8, 6), True), ((8, 7), True), ((8, 9), True),   # sm_80 SASS
    ((9, 0), True),                                                    # sm_90 SASS
    ((10, 0), True), ((12, 0), True),                                  # compute_90 PTX, JIT
    ((7, 5), False), ((7, 0), False), ((6, 1), False),                 # below sm_80
])
def test_compatibility_by_architecture(capability, ok):
    why = _native.compatibility(capability, ARCHS, driver=13000, runtime=13000)
    assert (why is None) == ok, why
    if not ok:
        assert f"sm_{10 * capability[0] + capability[1]}, below sm_80" in why


def test_compatibility_without_ptx_and_with_old_drivers():
    why = _native.compatibility((10, 0), "80-real;90-real", driver=13000, runtime=13000)
    assert why == "no code for sm_100 in mgcl._C_cuda (built for sm_80 SASS, sm_90 SASS)"
    assert _native.compatibility((8, 9), "80-real;90-real", driver=13000, runtime=13000) is None
    assert _native.compatibility((9, 0), ARCHS, driver=13020, runtime=13000) is None   # newer driver
    assert _native.compatibility((9, 0), ARCHS, driver=13000, runtime=13010) is None   # minor version compatibility
    why = _native.compatibility((9, 0), ARCHS, driver=12080, runtime=13000)
    assert why == "the driver supports CUDA 12.8; mgcl._C_cuda's CUDA 13.0 runtime needs CUDA 13.0 or newer"
    assert "no CUDA driver" in _native.compatibility((9, 0), ARCHS, driver=0, runtime=13000)
    assert _native.parse_archs("80-real;86;90-virtual") == ({80, 86}, {86, 90})


class _FakeCudaModule:
    archs, cuda_version = ARCHS, 13000

    @staticmethod
    def driver_version():
        return 13000


@pytest.fixture
def fake_gpu(monkeypatch):
    """mgcl._C_cuda 'loaded' and CUDA 'initialised' with a GPU of the capability set."""
    gpu = {"capability": (7, 5), "name": "Tesla T4"}
    monkeypatch.setattr(_native, "_C_cuda", _FakeCudaModule)
    monkeypatch.setattr(_native, "_checked", {})
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_native, "_gpu", lambda index: (gpu["name"], gpu["capability"]))
    return gpu


def test_an_unsupported_gpu_turns_the_cuda_backends_off_with_one_warning(fake_gpu):
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            assert _backend.select("fisher_guard", FG, "cuda", dtypes=(F32,)) == "torch"
            after = "triton" if _backend.triton_available() else "chunked"  # the next GPU entry
            assert _backend.select("similarity_topk", TK, "cuda:0", dtypes=(F32,), k=5) == after
    msgs = [str(w.message) for w in seen if "mgcl" in str(w.message)]
    assert msgs == ["mgcl: the CUDA kernels are off: GPU 0 (Tesla T4): the GPU is sm_75, below sm_80 (mgcl._C_cuda "
                    "is built for sm_80 SASS, sm_90 SASS, compute_90 PTX); Triton or the PyTorch reference run "
                    "instead"], msgs
    with pytest.raises(ValueError, match="'cuda' .* cannot run this call: GPU 0 \\(Tesla T4\\): the GPU is sm_75"):
        _backend.select("fisher_guard", FG, "cuda", "cuda", dtypes=(F32,))


def test_a_supported_gpu_keeps_the_cuda_backends(fake_gpu):
    fake_gpu.update(capability=(8, 6), name="RTX A6000")
    assert _backend.select("fisher_guard", FG, "cuda", dtypes=(F32,)) == "cuda"


def test_the_check_never_initialises_cuda(monkeypatch):
    monkeypatch.setattr(_native, "_C_cuda", _FakeCudaModule)
    monkeypatch.setattr(_native, "_checked", {})
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)

    def boom(*a):
        raise AssertionError("queried the GPU before CUDA was initialised")

    monkeypatch.setattr(_native, "_gpu", boom)
    monkeypatch.setattr(torch.cuda, "current_device", boom)
    assert _native.cuda_problem() is None
    assert _backend.select("fisher_guard", FG, "cuda") == "cuda"


def test_topk_cuda_k_cap_on_a_fake_gpu(fake_gpu, monkeypatch):
    """The CUDA select's k cap is a declared limit of the table (no GPU needed): the
    default skips the entry above the cap, an explicit choice says why."""
    fake_gpu.update(capability=(8, 6), name="RTX A6000")
    monkeypatch.setattr(_FakeCudaModule, "max_best_cap", 64, raising=False)
    assert _backend.select("similarity_topk", TK, "cuda", dtypes=(F32,), k=64) == "cuda"
    after = "triton" if _backend.triton_available() else "chunked"
    assert _backend.select("similarity_topk", TK, "cuda", dtypes=(F32,), k=65) == after
    with pytest.raises(ValueError, match="'cuda' \\(from backend=\\) cannot run this call: k=65 is above the CUDA "
                                         "select's cap of 64"):
        _backend.select("similarity_topk", TK, "cuda", "cuda", dtypes=(F32,), k=65)


@pytest.mark.parametrize("op", ["fisher_guard", "contrastive_distill", "similarity_topk"])
def test_each_reference_is_the_dense_definition_alone(op):
    """reference.py: a docstring, imports of torch only and functions; no module
    state, nothing of the fast paths (blocking lives in their own modules)."""
    import ast
    import importlib
    from pathlib import Path

    path = Path(importlib.import_module(f"mgcl.ops.{op}.reference").__file__)
    tree = ast.parse(path.read_text())
    body = tree.body[1:] if isinstance(tree.body[0], ast.Expr) else tree.body
    for node in body:
        if isinstance(node, ast.ImportFrom):
            assert node.module == "__future__", f"{path.name}: imports {node.module}"
        elif isinstance(node, ast.Import):
            assert [a.name for a in node.names] == ["torch"], f"{path.name}: imports {[a.name for a in node.names]}"
        else:
            assert isinstance(node, ast.FunctionDef), f"{path.name}:{node.lineno}: module-level {type(node).__name__}"
    if op == "similarity_topk":  # the "about 60 lines", docstring aside
        code = len(path.read_text().splitlines()) - tree.body[0].end_lineno
        assert code <= 60, code
