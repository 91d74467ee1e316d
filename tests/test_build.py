"""The native build: no libtorch or shared libcudart in either module, and
MGCL_CUDA=AUTO|ON|OFF behaves as documented (configure-only runs of CMake)."""
import os
import shutil
import subprocess
import sys

import pytest

from mgcl import _native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def modules():
    mods = [m for m in (_native._C, _native._C_cuda) if m is not None]
    if not mods:
        pytest.skip("no compiled module in this install")
    return mods


@pytest.mark.skipif(shutil.which("ldd") is None, reason="ldd not available")
def test_modules_link_neither_libtorch_nor_shared_cudart():
    for mod in modules():
        out = subprocess.run(["ldd", mod.__file__], capture_output=True, text=True).stdout
        for bad in ("libtorch", "libc10", "libcudart"):
            assert bad not in out, f"{os.path.basename(mod.__file__)} links {bad}:\n{out}"


def _configure(tmp_path, mode: str, path_env: str):
    pybind11 = pytest.importorskip("pybind11")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_HOME", "CUDA_PATH", "CMAKE_CUDA_COMPILER")}
    env["PATH"] = path_env
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not on PATH")
    return subprocess.run(
        [cmake, "-S", ROOT, "-B", str(tmp_path / mode), f"-DMGCL_CUDA={mode}",
         f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}"],
        capture_output=True, text=True, env=env, timeout=300,
    )


def _path_without_nvcc():
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not os.path.exists(os.path.join(d, "nvcc"))]
    return os.pathsep.join(dirs)


@pytest.mark.slow
def test_cuda_on_without_nvcc_fails_clearly(tmp_path):
    r = _configure(tmp_path, "ON", _path_without_nvcc())
    if r.returncode == 0:
        pytest.skip("CMake still found a CUDA compiler outside PATH")
    assert "MGCL_CUDA=ON, but no CUDA compiler was found" in r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["AUTO", "OFF"])
def test_cpu_only_build_without_nvcc_or_off(tmp_path, mode):
    path = _path_without_nvcc() if mode == "AUTO" else os.environ["PATH"]
    r = _configure(tmp_path, mode, path)
    assert r.returncode == 0, r.stdout + r.stderr
    ninja_or_make = (tmp_path / mode / "build.ninja")
    files = [ninja_or_make] if ninja_or_make.exists() else list((tmp_path / mode).rglob("Makefile"))
    text = "".join(f.read_text() for f in files)
    assert "_C_cuda" not in text and "bind_cpu" in text


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_auto_with_nvcc_builds_cuda_module_for_sm80_sm90(tmp_path):
    r = _configure(tmp_path, "AUTO", os.environ["PATH"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "building mgcl._C_cuda" in r.stdout and "80-real;90-real;90-virtual" in r.stdout
