"""The int8 tiles this CPU cannot run (AVX-VNNI, AVX512-VNNI): compiled with
their VNNI instruction emulated (tests/cpp/similarity_topk_int8_emulated.cpp)
and compared with the scalar tile and the exact dot product, so a logic error
in their loops shows here, not only as a failed self-check on a CI machine."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_every_int8_tile_matches_the_scalar_tile(tmp_path):
    src = (ROOT / "csrc/cpu/similarity_topk_int8.cpp").read_text()
    # the VNNI tiles' target attributes ask for AVX2 only: their vpdpbusd is emulated
    src, n = re.subn(r'target\("[^"]*vnni[^"]*"\)', 'target("avx2")', src)
    assert n == 2, "expected the two VNNI tiles' target attributes"
    (tmp_path / "int8.cpp").write_text(src)
    exe = tmp_path / "int8_emulated"
    harness = ROOT / "tests/cpp/similarity_topk_int8_emulated.cpp"
    build = subprocess.run([CXX, "-O1", "-std=gnu++17", "-mavx2", f"-I{ROOT / 'csrc/include'}",
                            f"-I{ROOT / 'csrc/cpu'}", f'-DMGCL_INT8_SOURCE="{tmp_path / "int8.cpp"}"',
                            str(harness), "-o", str(exe)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    if not _cpu_has_avx2():
        pytest.skip("the harness runs the AVX2 parts natively; this CPU has no AVX2")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 0 mismatches" in run.stdout


def _cpu_has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
