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

// fisher_guard_first_overlap: the addresses of int64 host arrays (numpy's).
int64_t fisher_guard_first_overlap(uintptr_t start, uintptr_t nbytes, int64_t n, uintptr_t fixed_start,
                                   uintptr_t fixed_end, int64_t m) {
  py::gil_scoped_release release;
  return mgcl::fisher_guard_first_overlap(
      reinterpret_cast<const int64_t*>(start), reinterpret_cast<const int64_t*>(nbytes), n,
      reinterpret_cast<const int64_t*>(fixed_start), reinterpret_cast<const int64_t*>(fixed_end), m);
}

// similarity_topk: the params structs come in as dicts of integers (addresses
// as uintptr_t), one key per struct field; a missing key is an error.
template <typename T>
T field(const py::dict& a, const char* name) {
  if (!a.contains(name)) throw mgcl::Error(std::string("similarity_topk binding: missing field ") + name);
  return a[name].cast<T>();
}
template <typename P>
P addr(const py::dict& a, const char* name) {
  return reinterpret_cast<P>(field<uintptr_t>(a, name));
}

mgcl::SimilarityTopkState topk_state(const py::dict& a) {
  mgcl::SimilarityTopkState s;
  s.n_queries = field<int64_t>(a, "n_queries");
  s.k = field<int64_t>(a, "k");
  s.distinct = field<bool>(a, "distinct") ? 1 : 0;
  s.best_v = addr<float*>(a, "best_v");
  s.best_n = addr<int64_t*>(a, "best_n");
  s.cand_v = addr<float*>(a, "cand_v");
  s.cand_i = addr<int64_t*>(a, "cand_i");
  s.cand_n = addr<int64_t*>(a, "cand_n");
  s.cand_cap = field<int64_t>(a, "cand_cap");
  s.overflow = addr<uint8_t*>(a, "overflow");
  return s;
}

void similarity_topk_quantize(const py::dict& a) {
  mgcl::SimilarityTopkQuantizeParams p;
  p.src = addr<const void*>(a, "src");
  p.dtype = field<int>(a, "dtype");
  p.rows = field<int64_t>(a, "rows");
  p.d = field<int64_t>(a, "d");
  p.ld = field<int64_t>(a, "ld");
  p.levels = field<int>(a, "levels");
  p.codes = addr<int8_t*>(a, "codes");
  p.scale = addr<float*>(a, "scale");
  p.err = addr<float*>(a, "err");
  p.norm = addr<float*>(a, "norm");
  p.sum = addr<int32_t*>(a, "sum");
  py::gil_scoped_release release;
  mgcl::similarity_topk_quantize_cpu(p);
}

void similarity_topk_pack_queries(uintptr_t codes, int64_t rows, int64_t d, uintptr_t packed) {
  py::gil_scoped_release release;
  mgcl::similarity_topk_pack_queries_cpu(reinterpret_cast<const int8_t*>(codes), rows, d,
                                         reinterpret_cast<uint8_t*>(packed));
}

void similarity_topk_screen(const py::dict& a) {
  mgcl::SimilarityTopkScreenParams p;
  p.queries = addr<const void*>(a, "queries");
  p.q_dtype = field<int>(a, "q_dtype");
  p.d = field<int64_t>(a, "d");
  p.q_ld = field<int64_t>(a, "q_ld");
  p.row0 = field<int64_t>(a, "row0");
  p.rows = field<int64_t>(a, "rows");
  p.q_packed = addr<const uint8_t*>(a, "q_packed");
  p.q_scale = addr<const float*>(a, "q_scale");
  p.q_err = addr<const float*>(a, "q_err");
  p.q_norm = addr<const float*>(a, "q_norm");
  p.keys = addr<const void*>(a, "keys");
  p.k_dtype = field<int>(a, "k_dtype");
  p.n_keys = field<int64_t>(a, "n_keys");
  p.k_ld = field<int64_t>(a, "k_ld");
  p.col0 = field<int64_t>(a, "col0");
  p.k_codes = addr<const int8_t*>(a, "k_codes");
  p.k_scale = addr<const float*>(a, "k_scale");
  p.k_err = addr<const float*>(a, "k_err");
  p.k_norm = addr<const float*>(a, "k_norm");
  p.k_sum = addr<const int32_t*>(a, "k_sum");
  p.path = field<int>(a, "path");
  p.approx = addr<const float*>(a, "approx");
  p.approx_ld = field<int64_t>(a, "approx_ld");
  p.approx_rel = field<float>(a, "approx_rel");
  p.state = topk_state(a);
  p.floor = addr<const float*>(a, "floor");
  p.rescored = addr<int64_t*>(a, "rescored");
  py::gil_scoped_release release;
  mgcl::similarity_topk_screen_cpu(p);
}

void similarity_topk_finish(const py::dict& a) {
  mgcl::SimilarityTopkFinishParams p;
  p.state = topk_state(a);
  p.tau = addr<float*>(a, "tau");
  p.count = addr<int64_t*>(a, "count");
  py::gil_scoped_release release;
  mgcl::similarity_topk_finish_cpu(p);
}

void similarity_topk_pair_scores(uintptr_t x, int x_dtype, int64_t x_ld, uintptr_t k, int k_dtype, int64_t k_ld,
                                 int64_t n_pairs, int64_t d, uintptr_t out) {
  auto p = mgcl::similarity_topk_pair_params(reinterpret_cast<const void*>(x), x_dtype, x_ld,
                                             reinterpret_cast<const void*>(k), k_dtype, k_ld, n_pairs, d,
                                             reinterpret_cast<float*>(out));
  py::gil_scoped_release release;
  mgcl::similarity_topk_pair_scores_cpu(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mgcl CPU kernels (C++/OpenMP); called from mgcl.ops.*.native";
  m.def("fisher_guard", &fisher_guard, py::arg("meta"), py::arg("n_tensors"), py::arg("n_chunks"),
        py::arg("chunk_size"), py::arg("has_fisher"), py::arg("dtype"), py::arg("fisher_dtype"), py::arg("mode"),
        py::arg("lam"), py::arg("ema"), py::arg("normalize"), py::arg("penalty"));
  m.def("fisher_guard_first_overlap", &fisher_guard_first_overlap, py::arg("start"), py::arg("nbytes"),
        py::arg("n"), py::arg("fixed_start"), py::arg("fixed_end"), py::arg("m"));
  m.def("similarity_topk_quantize", &similarity_topk_quantize, py::arg("params"));
  m.def("similarity_topk_pack_queries", &similarity_topk_pack_queries, py::arg("codes"), py::arg("rows"),
        py::arg("d"), py::arg("packed"));
  m.def("similarity_topk_screen", &similarity_topk_screen, py::arg("params"));
  m.def("similarity_topk_finish", &similarity_topk_finish, py::arg("params"));
  m.def("similarity_topk_pair_scores", &similarity_topk_pair_scores, py::arg("x"), py::arg("x_dtype"),
        py::arg("x_ld"), py::arg("k"), py::arg("k_dtype"), py::arg("k_ld"), py::arg("n_pairs"), py::arg("d"),
        py::arg("out"));
  m.def("similarity_topk_paths", &mgcl::similarity_topk_cpu_paths);
  m.def("similarity_topk_selfcheck", [](int path) {
    py::gil_scoped_release release;
    return mgcl::similarity_topk_selfcheck(path);
  }, py::arg("path"));
  m.attr("similarity_topk_key_levels") = mgcl::kKeyLevels;
  m.attr("similarity_topk_query_levels") = mgcl::kQueryLevels;
  m.attr("similarity_topk_int8_max_dim") = mgcl::kInt8MaxDim;
  m.attr("openmp") = py::bool_(
#ifdef MGCL_OPENMP
      true
#else
      false
#endif
  );
}
