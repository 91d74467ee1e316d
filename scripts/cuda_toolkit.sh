#!/usr/bin/env bash
# Install what building mgcl._C_cuda needs of the CUDA toolkit (nvcc, NVVM,
# the runtime's headers and static library, CCCL) from NVIDIA's PyPI wheels
# into the venv PREFIX, with PREFIX/cuda/bin/nvcc as the way in. The release
# workflow runs it in the manylinux image (cibuildwheel's before-all), so the
# image needs no other package source; the release pinned here (13.0: nvcc
# 13.0.88) is the one the local wheels are built with.
#
#   bash scripts/cuda_toolkit.sh PREFIX     (PYTHON: the interpreter for the venv)
set -euo pipefail
prefix=${1:?usage: cuda_toolkit.sh PREFIX}
"${PYTHON:-python3}" -m venv "$prefix"
"$prefix/bin/python" -m pip install -q "cuda-toolkit[nvcc,cudart,cccl]==13.0.3.0" 2>&1 \
  | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
root=$("$prefix/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
# nvcc.profile links from lib64, the wheels install lib; CMake's
# FindCUDAToolkit wants the shared runtime's link name even for a static link.
[ -e "$root/lib64" ] || ln -s lib "$root/lib64"
[ -e "$root/lib/libcudart.so" ] || ln -s libcudart.so.13 "$root/lib/libcudart.so"
ln -sfn "$root" "$prefix/cuda"
"$prefix/cuda/bin/nvcc" --version
