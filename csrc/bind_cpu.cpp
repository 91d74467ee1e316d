// mgcl._C: the CPU native module. Integers in (addresses, sizes, codes), the
// GIL released around the work, nothing else: validation and allocation live
// in Python (mgcl/ops/<op>/native.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "mgcl/fisher_guard.h"

namespace py = pybind11;

namespace {

template <typename T>
std::vector<T> as_ptrs(const std::vector<uintptr_t>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = reinterpret_cast<T>(v[i]);
  return out;
}

void fisher_guard(const std::vector<uintptr_t>& grad, const std::vector<uintptr_t>& param,
                  const std::vector<uintptr_t>& anchor, const std::vector<uintptr_t>& fisher,
                  const std::vector<int64_t>& numel, int dtype, int fisher_dtype, int mode,
                  float lam, float ema, bool normalize, uintptr_t penalty) {
  auto g = as_ptrs<void*>(grad);
  auto x = as_ptrs<const void*>(param);
  auto a = as_ptrs<const void*>(anchor);
  auto f = as_ptrs<void*>(fisher);
  mgcl::FisherGuardParams p;
  p.n_tensors = int64_t(numel.size());
  p.grad = g.data();
  p.param = x.data();
  p.anchor = a.data();
  p.fisher = f.empty() ? nullptr : f.data();
  p.numel = numel.data();
  p.dtype = dtype;
  p.fisher_dtype = fisher_dtype;
  p.mode = mode;
  p.lam = lam;
  p.ema = ema;
  p.normalize = normalize ? 1 : 0;
  p.penalty = reinterpret_cast<float*>(penalty);
  py::gil_scoped_release release;
  mgcl::fisher_guard_cpu(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mgcl CPU kernels (C++/OpenMP); called from mgcl.ops.*.native";
  m.def("fisher_guard", &fisher_guard, py::arg("grad"), py::arg("param"), py::arg("anchor"),
        py::arg("fisher"), py::arg("numel"), py::arg("dtype"), py::arg("fisher_dtype"),
        py::arg("mode"), py::arg("lam"), py::arg("ema"), py::arg("normalize"), py::arg("penalty"));
  m.attr("openmp") = py::bool_(
#ifdef MGCL_OPENMP
      true
#else
      false
#endif
  );
}
