// mgcl._C_cuda: the CUDA native module. Same contract as _C plus the stream:
// device addresses and sizes in, the caller's stream handle, the GIL released.
// Importing this module never touches the GPU (cudart is static and lazy).
#include <pybind11/pybind11.h>

#include <cstdint>

#define MGCL_WITH_CUDA_DECLS
#include "mgcl/fisher_guard.h"

namespace py = pybind11;

namespace {

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// The pointer arrays and the chunk map live in one device int64 buffer laid
// out by mgcl/ops/fisher_guard/native.py; the offsets are passed in elements.
void fisher_guard(uintptr_t meta, int64_t n_tensors, int64_t n_chunks, int64_t chunk_size,
                  bool has_fisher, int dtype, int fisher_dtype, int mode, float lam, float ema,
                  bool normalize, uintptr_t workspace, uintptr_t penalty, uintptr_t stream) {
  auto* m = reinterpret_cast<int64_t*>(meta);
  const int64_t n = n_tensors;
  mgcl::FisherGuardParams p;
  p.n_tensors = n;
  p.grad = reinterpret_cast<void* const*>(m);
  p.param = reinterpret_cast<const void* const*>(m + n);
  p.anchor = reinterpret_cast<const void* const*>(m + 2 * n);
  p.fisher = has_fisher ? reinterpret_cast<void* const*>(m + 3 * n) : nullptr;
  p.numel = m + 4 * n;
  p.tensor_first_chunk = m + 5 * n;
  p.chunk_tensor = m + 6 * n + 1;
  p.chunk_start = m + 6 * n + 1 + n_chunks;
  p.n_chunks = n_chunks;
  p.chunk_size = chunk_size;
  p.dtype = dtype;
  p.fisher_dtype = fisher_dtype;
  p.mode = mode;
  p.lam = lam;
  p.ema = ema;
  p.normalize = normalize ? 1 : 0;
  auto* ws = reinterpret_cast<float*>(workspace);
  p.partial = ws;
  p.partial_w = ws + n_chunks;
  p.mean_w = ws + 2 * n_chunks;
  p.penalty = reinterpret_cast<float*>(penalty);
  py::gil_scoped_release release;
  mgcl::fisher_guard_cuda(p, as_stream(stream));
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "mgcl CUDA kernels; called from mgcl.ops.*.native";
  m.def("fisher_guard", &fisher_guard, py::arg("meta"), py::arg("n_tensors"), py::arg("n_chunks"),
        py::arg("chunk_size"), py::arg("has_fisher"), py::arg("dtype"), py::arg("fisher_dtype"),
        py::arg("mode"), py::arg("lam"), py::arg("ema"), py::arg("normalize"), py::arg("workspace"),
        py::arg("penalty"), py::arg("stream"));
  m.attr("archs") = MGCL_CUDA_ARCHS;
  m.attr("cuda_version") = CUDART_VERSION;
}
