"""similarity_topk's CUDA launch configurations fit the hardware (issue 14, bug 1).

No GPU needed: the kernels are compiled here with ``ptxas -v`` for each real
architecture the build targets, their static shared memory is read from its
report, and every launch configuration of the select (one dynamic size per
best_cap class) is checked: static + dynamic within the architecture's
opt-in limit, and the launcher's rule opts in whenever static + dynamic
exceed the default 48 KiB (the old rule looked at the dynamic part alone, so
best_cap 1025-3072, with exactly 48 KiB dynamic plus 16 B static, failed).
"""
import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mgcl import _native

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SMEM = 48 * 1024
OPT_IN_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes per block


def nvcc():
    for c in (os.environ.get("CUDACXX"), shutil.which("nvcc"), *sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))):
        if c and os.path.exists(c):
            return c
    return None


pytestmark = [pytest.mark.skipif(nvcc() is None, reason="no nvcc"),
              pytest.mark.skipif(not _native.HAS_C_CUDA, reason="mgcl._C_cuda not built")]


def real_archs() -> list[int]:
    archs = []
    for a in _native.cuda_archs().split(","):
        m = re.fullmatch(r"(\d+)(-real)?", a.strip())
        if m:
            archs.append(int(m.group(1)))
    return archs


@pytest.fixture(scope="module")
def static_smem(tmp_path_factory):
    """{(kernel name, sm): static shared bytes} from ptxas -v."""
    archs = real_archs()
    out = tmp_path_factory.mktemp("ptxas") / "similarity_topk.o"
    cmd = [nvcc(), "-std=c++17", "-O3", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc/include'}",
           f"-I{ROOT / 'kernels'}", "-Xptxas", "-v", "-c", str(ROOT / "kernels/similarity_topk.cu"), "-o", str(out)]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    found, current = {}, None
    for line in (p.stdout + p.stderr).splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for 'sm_(\d+)'", line)
        if m:
            current = (m.group(1), int(m.group(2)))
            found[current] = 0
            continue
        m = re.search(r"Used \d+ registers.*?(\d+) bytes smem", line)
        if m and current is not None:
            found[current] = int(m.group(1))
    assert found, "ptxas -v reported no entry functions"
    return found


def test_every_select_launch_fits_or_opts_in(static_smem):
    cuda = _native._C_cuda
    dynamic = sorted({int(cuda.similarity_topk_select_dynamic_smem(c)) for c in range(1, int(cuda.max_best_cap) + 1)})
    assert dynamic[-1] > DEFAULT_SMEM  # the large-k launches need the opt-in
    selects = {key: v for key, v in static_smem.items() if "select_kernel" in key[0]}
    assert {sm for _, sm in selects} == set(real_archs()) and len(selects) == 2 * len(real_archs())
    for (name, sm), static in selects.items():
        for dyn in dynamic:
            total = static + dyn
            assert total <= OPT_IN_LIMIT[sm], f"{name} sm_{sm}: {static} + {dyn} B exceeds the block limit"
            opts_in = bool(cuda.similarity_topk_smem_needs_opt_in(static, dyn))
            assert opts_in == (total > DEFAULT_SMEM), f"{name} sm_{sm}: {static} B static + {dyn} B dynamic"


def test_the_kernels_without_dynamic_memory_fit_the_default(static_smem):
    for (name, sm), static in static_smem.items():
        assert static <= DEFAULT_SMEM, f"{name} sm_{sm}: {static} B static shared memory"
    assert any("pair_kernel" in name for name, _ in static_smem)
