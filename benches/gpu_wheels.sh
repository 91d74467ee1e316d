#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before a GPU check: downloads into ./.whl the
# Python 3.12 wheels that the lent GPU machine's image lacks (it has torch,
# triton, pytest, hypothesis, pytest-benchmark, safetensors, pyarrow, pybind11,
# scikit-build-core, sentence-transformers, timm ...; nothing can be fetched
# there). benches/gpu_check.sh installs whatever lies in ./.whl first.
#   bash benches/gpu_wheels.sh      # then carry ".whl" with the device call
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for pkg in open_clip_torch ftfy wcwidth faiss-cpu inf-cl rank-bm25; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg"
done
du -sh .whl
