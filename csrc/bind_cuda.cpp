// mgcl._C_cuda: the CUDA native module. Same contract as _C plus the stream:
// device addresses and sizes in, the caller's stream handle, the GIL released.
// Importing this module never touches the GPU (cudart is static and lazy).
#include <pybind11/pybind11.h>

#include <cstdint>

#define MGCL_WITH_CUDA_DECLS
#include "mgcl/fisher_guard.h"
#include "mgcl/similarity_topk.h"

namespace py = pybind11;

namespace {

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// fisher_guard: the pointer arrays and chunk map in one device int64 array
// (layout: mgcl/fisher_guard.h); the workspace holds 2 * n_chunks + n_tensors floats.
void fisher_guard(uintptr_t meta, int64_t n_tensors, int64_t n_chunks, int64_t chunk_size,
                  bool has_fisher, int dtype, int fisher_dtype, int mode, float lam, double ema,
                  bool normalize, uintptr_t workspace, uintptr_t penalty, uintptr_t stream) {
  auto p = mgcl::fisher_guard_params(reinterpret_cast<const int64_t*>(meta), n_tensors, n_chunks, chunk_size,
                                     has_fisher, dtype, fisher_dtype, mode, lam, ema, normalize,
                                     reinterpret_cast<float*>(penalty));
  auto* ws = reinterpret_cast<float*>(workspace);
  p.partial = ws;
  p.partial_w = ws + n_chunks;
  p.mean_w = ws + 2 * n_chunks;
  py::gil_scoped_release release;
  mgcl::fisher_guard_cuda(p, as_stream(stream));
}

// One tile of values (rows x cols float32, row stride ld) folded into the
// per-row best lists; all addresses are device memory.
void similarity_topk_select(uintptr_t scores, int64_t ld, int64_t rows, int64_t cols, int64_t col0,
                            int64_t best_cap, bool distinct, uintptr_t best_v, uintptr_t best_i, uintptr_t best_n,
                            uintptr_t stream) {
  mgcl::SimilarityTopkSelectParams p;
  p.scores = reinterpret_cast<const float*>(scores);
  p.ld = ld;
  p.rows = rows;
  p.cols = cols;
  p.col0 = col0;
  p.best_cap = best_cap;
  p.distinct = distinct ? 1 : 0;
  p.best_v = reinterpret_cast<float*>(best_v);
  p.best_i = reinterpret_cast<int64_t*>(best_i);
  p.best_n = reinterpret_cast<int64_t*>(best_n);
  py::gil_scoped_release release;
  mgcl::similarity_topk_select_cuda(p, as_stream(stream));
}

// The definition for row-wise pairs (x row i with k row i); device memory.
void similarity_topk_pair_scores(uintptr_t x, int x_dtype, int64_t x_ld, uintptr_t k, int k_dtype, int64_t k_ld,
                                 int64_t n_pairs, int64_t d, uintptr_t out, uintptr_t stream) {
  auto p = mgcl::similarity_topk_pair_params(reinterpret_cast<const void*>(x), x_dtype, x_ld,
                                             reinterpret_cast<const void*>(k), k_dtype, k_ld, n_pairs, d,
                                             reinterpret_cast<float*>(out));
  py::gil_scoped_release release;
  mgcl::similarity_topk_pair_scores_cuda(p, as_stream(stream));
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "mgcl CUDA kernels; called from mgcl.ops.*.native";
  m.def("fisher_guard", &fisher_guard, py::arg("meta"), py::arg("n_tensors"), py::arg("n_chunks"),
        py::arg("chunk_size"), py::arg("has_fisher"), py::arg("dtype"), py::arg("fisher_dtype"),
        py::arg("mode"), py::arg("lam"), py::arg("ema"), py::arg("normalize"), py::arg("workspace"),
        py::arg("penalty"), py::arg("stream"));
  m.def("similarity_topk_select", &similarity_topk_select, py::arg("scores"), py::arg("ld"), py::arg("rows"),
        py::arg("cols"), py::arg("col0"), py::arg("best_cap"), py::arg("distinct"), py::arg("best_v"),
        py::arg("best_i"), py::arg("best_n"), py::arg("stream"));
  m.def("similarity_topk_pair_scores", &similarity_topk_pair_scores, py::arg("x"), py::arg("x_dtype"),
        py::arg("x_ld"), py::arg("k"), py::arg("k_dtype"), py::arg("k_ld"), py::arg("n_pairs"), py::arg("d"),
        py::arg("out"), py::arg("stream"));
  m.def("similarity_topk_select_dynamic_smem", &mgcl::similarity_topk_select_dynamic_smem, py::arg("best_cap"));
  m.def("similarity_topk_smem_needs_opt_in", &mgcl::similarity_topk_smem_needs_opt_in, py::arg("static_bytes"),
        py::arg("dynamic_bytes"));
  // The CUDA version the installed driver supports (e.g. 13000), 0 without a
  // driver; cudaDriverGetVersion creates no context (mgcl._native's load check).
  m.def("driver_version", [] {
    int v = 0;
    if (cudaDriverGetVersion(&v) != cudaSuccess) v = 0;
    return v;
  });
  m.attr("max_best_cap") = mgcl::kMaxBestCap;
  m.attr("archs") = MGCL_CUDA_ARCHS;
  m.attr("cuda_version") = CUDART_VERSION;
}
