// mgcl._C: the CPU native module. Integers in (addresses, sizes, codes), the
// GIL released around the work, nothing else: validation and allocation live
// in Python (mgcl/ops/<op>/native.py).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "mgcl/fisher_guard.h"
#include "mgcl/similarity_topk.h"

namespace py = pybind11;

namespace {

// fisher_guard: the pointer arrays and chunk map in one host int64 array
// (layout: mgcl/fisher_guard.h).
void fisher_guard(uintptr_t meta, int64_t n_tensors, int64_t n_chunks, int64_t chunk_size, bool has_fisher,
                  int dtype, int fisher_dtype, int mode, float lam, double ema, bool normalize, uintptr_t penalty) {
  auto p = mgcl::fisher_guard_params(reinterpret_cast<const int64_t*>(meta), n_tensors, n_chunks, chunk_size,
                                     has_fisher, dtype, fisher_dtype, mode, lam, ema, normalize,
                                     reinterpret_cast<float*>(penalty));
  py::gil_scoped_release release;
  mgcl::fisher_guard_cpu(p);
}

mgcl::SimilarityTopkParams topk_state(int64_t best_cap, bool distinct, uintptr_t best_v, uintptr_t best_n,
                                      uintptr_t cand_v, uintptr_t cand_i, uintptr_t cand_n, int64_t cand_cap,
                                      uintptr_t overflow) {
  mgcl::SimilarityTopkParams p;
  p.best_cap = best_cap;
  p.distinct = distinct ? 1 : 0;
  p.best_v = reinterpret_cast<float*>(best_v);
  p.best_n = reinterpret_cast<int64_t*>(best_n);
  p.cand_v = reinterpret_cast<float*>(cand_v);
  p.cand_i = reinterpret_cast<int64_t*>(cand_i);
  p.cand_n = reinterpret_cast<int64_t*>(cand_n);
  p.cand_cap = cand_cap;
  p.overflow = reinterpret_cast<uint8_t*>(overflow);
  return p;
}

void similarity_topk_update(uintptr_t scores, int64_t ld, int64_t rows, int64_t cols, int64_t row0, int64_t col0,
                            int64_t best_cap, bool distinct, uintptr_t best_v, uintptr_t best_n, uintptr_t cand_v,
                            uintptr_t cand_i, uintptr_t cand_n, int64_t cand_cap, uintptr_t overflow) {
  auto p = topk_state(best_cap, distinct, best_v, best_n, cand_v, cand_i, cand_n, cand_cap, overflow);
  p.scores = reinterpret_cast<const float*>(scores);
  p.ld = ld;
  p.rows = rows;
  p.cols = cols;
  p.row0 = row0;
  p.col0 = col0;
  py::gil_scoped_release release;
  mgcl::similarity_topk_update_cpu(p);
}

void similarity_topk_finish(int64_t n_queries, int64_t k, int64_t best_cap, bool distinct, uintptr_t best_v,
                            uintptr_t best_n, uintptr_t cand_v, uintptr_t cand_i, uintptr_t cand_n, int64_t cand_cap,
                            uintptr_t overflow, uintptr_t tau, uintptr_t count) {
  auto p = topk_state(best_cap, distinct, best_v, best_n, cand_v, cand_i, cand_n, cand_cap, overflow);
  p.n_queries = n_queries;
  p.k = k;
  p.tau = reinterpret_cast<float*>(tau);
  p.count = reinterpret_cast<int64_t*>(count);
  py::gil_scoped_release release;
  mgcl::similarity_topk_finish_cpu(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mgcl CPU kernels (C++/OpenMP); called from mgcl.ops.*.native";
  m.def("fisher_guard", &fisher_guard, py::arg("meta"), py::arg("n_tensors"), py::arg("n_chunks"),
        py::arg("chunk_size"), py::arg("has_fisher"), py::arg("dtype"), py::arg("fisher_dtype"), py::arg("mode"),
        py::arg("lam"), py::arg("ema"), py::arg("normalize"), py::arg("penalty"));
  m.def("similarity_topk_update", &similarity_topk_update, py::arg("scores"), py::arg("ld"), py::arg("rows"),
        py::arg("cols"), py::arg("row0"), py::arg("col0"), py::arg("best_cap"), py::arg("distinct"),
        py::arg("best_v"), py::arg("best_n"), py::arg("cand_v"), py::arg("cand_i"), py::arg("cand_n"),
        py::arg("cand_cap"), py::arg("overflow"));
  m.def("similarity_topk_finish", &similarity_topk_finish, py::arg("n_queries"), py::arg("k"), py::arg("best_cap"),
        py::arg("distinct"), py::arg("best_v"), py::arg("best_n"), py::arg("cand_v"), py::arg("cand_i"),
        py::arg("cand_n"), py::arg("cand_cap"), py::arg("overflow"), py::arg("tau"), py::arg("count"));
  m.attr("openmp") = py::bool_(
#ifdef MGCL_OPENMP
      true
#else
      false
#endif
  );
}
