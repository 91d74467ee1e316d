// fisher_guard on the CPU.
//
// Work is split into the chunks of the packed metadata (at most chunk_size
// elements of one tensor; see fisher_guard.h), so a model's ~300 tensors of
// very different sizes spread evenly over the threads. Per element (d = param - anchor):
//   W     = grad^2 | fisher | 1    (DFG with ema: fisher <- ema*fisher + ema_rest*grad^2, W = fisher;
//                                   ema_rest = 1 - ema rounded once from double)
//   W    /= mean(W over the tensor)          (normalize; W = 0 where the mean is 0)
//   grad += (2*lam) * W * d
//   pen  += W * d * d                        (times lam once at the end)
// The inner loop is a single streaming pass (read grad, param, anchor, write
// grad: 16 bytes per fp32 element), written so the compiler vectorises it:
// float math, a simd reduction, no branches on the mode inside the loop.
// normalize needs the mean first: one extra read-only pass computing the
// per-chunk sums of W, reduced per tensor in a fixed order (deterministic).
// Penalty partials are per chunk and summed in chunk order, so the result does
// not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "mgcl/fisher_guard.h"

namespace mgcl {
namespace {

// Sums run in float over sub-blocks of kSub elements (vectorised), then in
// double across sub-blocks and chunks: float-speed loops, near-double accuracy.
constexpr int64_t kSub = 512;

struct Chunk {
  int64_t tensor;
  int64_t start;
  int64_t len;
};

inline Chunk chunk_at(const FisherGuardParams& p, int64_t c) {
  const int64_t t = p.chunk_tensor[c], start = p.chunk_start[c];
  return {t, start, std::min(p.chunk_size, p.numel[t] - start)};
}

// W for one element, before normalisation. For DFG with ema the fisher value
// is updated and W is the value as stored (rounded to the fisher dtype).
template <int Mode, bool Ema, typename T, typename F>
inline float importance(const T* g, F* f, int64_t i, float ema, float ema_rest) {
  if constexpr (Mode == kModeDfg) {
    float gi = load(g, i);
    float w = gi * gi;
    if constexpr (Ema) {
      float nf = ema * load(f, i) + ema_rest * w;
      store(f, i, nf);
      return load(f, i);
    }
    return w;
  } else if constexpr (Mode == kModeEwc) {
    return load(f, i);
  } else {
    return 1.f;
  }
}

// Same as importance() but never writes: used by the normalize pre-pass.
template <int Mode, bool Ema, typename T, typename F>
inline float importance_peek(const T* g, const F* f, int64_t i, float ema, float ema_rest) {
  if constexpr (Mode == kModeDfg) {
    float gi = load(g, i);
    float w = gi * gi;
    if constexpr (Ema) {
      F tmp[1];
      store(tmp, 0, ema * load(f, i) + ema_rest * w);
      return load(tmp, 0);
    }
    return w;
  } else if constexpr (Mode == kModeEwc) {
    return load(f, i);
  } else {
    return 1.f;
  }
}

template <int Mode, bool Ema, typename T, typename F>
double chunk_w_sum(const FisherGuardParams& p, const Chunk& c) {
  const T* g = static_cast<const T*>(p.grad[c.tensor]) + c.start;
  const F* f = p.fisher ? static_cast<const F*>(p.fisher[c.tensor]) + c.start : nullptr;
  double s = 0.0;
  for (int64_t b = 0; b < c.len; b += kSub) {
    const int64_t e = std::min(c.len, b + kSub);
    float sb = 0.f;
#pragma omp simd reduction(+ : sb)
    for (int64_t i = b; i < e; ++i) sb += importance_peek<Mode, Ema, T, F>(g, f, i, p.ema, p.ema_rest);
    s += sb;
  }
  return s;
}

template <int Mode, bool Ema, bool Normalize, typename T, typename F>
double chunk_update(const FisherGuardParams& p, const Chunk& c, float mean) {
  T* g = static_cast<T*>(p.grad[c.tensor]) + c.start;
  const T* x = static_cast<const T*>(p.param[c.tensor]) + c.start;
  const T* a = static_cast<const T*>(p.anchor[c.tensor]) + c.start;
  F* f = p.fisher ? static_cast<F*>(p.fisher[c.tensor]) + c.start : nullptr;
  const float two_lam = 2.f * p.lam;
  const bool zero_mean = Normalize && mean == 0.f;
  double s = 0.0;
  for (int64_t b = 0; b < c.len; b += kSub) {
    const int64_t e = std::min(c.len, b + kSub);
    float sb = 0.f;
#pragma omp simd reduction(+ : sb)
    for (int64_t i = b; i < e; ++i) {
      float w = importance<Mode, Ema, T, F>(g, f, i, p.ema, p.ema_rest);
      if constexpr (Normalize) w = zero_mean ? 0.f : w / mean;
      float d = load(x, i) - load(a, i);
      float wd = w * d;
      store(g, i, load(g, i) + two_lam * wd);
      sb += wd * d;
    }
    s += sb;
  }
  return s;
}

template <int Mode, bool Ema, typename T, typename F>
void run_typed(const FisherGuardParams& p) {
  const int64_t n = p.n_chunks;
  const int64_t* first = p.tensor_first_chunk;

  std::vector<float> mean(p.normalize ? p.n_tensors : 0, 0.f);
  if (p.normalize) {
    std::vector<double> wsum(n);
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t c = 0; c < n; ++c) wsum[c] = chunk_w_sum<Mode, Ema, T, F>(p, chunk_at(p, c));
    for (int64_t t = 0; t < p.n_tensors; ++t) {
      double s = 0.0;
      for (int64_t c = first[t]; c < first[t + 1]; ++c) s += wsum[c];
      mean[t] = p.numel[t] > 0 ? float(s / double(p.numel[t])) : NAN;
    }
  }

  std::vector<double> part(n);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t c = 0; c < n; ++c) {
    const Chunk ch = chunk_at(p, c);
    part[c] = p.normalize ? chunk_update<Mode, Ema, true, T, F>(p, ch, mean[ch.tensor])
                          : chunk_update<Mode, Ema, false, T, F>(p, ch, 0.f);
  }
  double total = 0.0;
  for (int64_t c = 0; c < n; ++c) total += part[c];
  *p.penalty = float(double(p.lam) * total);
}

template <typename T, typename F>
void run_mode(const FisherGuardParams& p) {
  switch (p.mode) {
    case kModeDfg:
      if (p.ema > 0.f) return run_typed<kModeDfg, true, T, F>(p);
      return run_typed<kModeDfg, false, T, F>(p);
    case kModeEwc: return run_typed<kModeEwc, false, T, F>(p);
    case kModeL2: return run_typed<kModeL2, false, T, F>(p);
    default: throw Error("fisher_guard: unknown mode " + std::to_string(p.mode));
  }
}

template <typename T>
void run_fisher_dtype(const FisherGuardParams& p) {
  if (p.fisher_dtype == kFloat32) return run_mode<T, float>(p);
  if (p.fisher_dtype != p.dtype)
    throw Error(std::string("fisher_guard: fisher dtype must be float32 or ") + dtype_name(p.dtype));
  return run_mode<T, T>(p);
}

}  // namespace

// The re-check of new grads (fisher_guard.h): sort the sized spans by start;
// among themselves they are disjoint iff each sorted span ends at or before
// the next one starts. Against the fixed spans (sorted, disjoint): the last
// fixed span starting at or before a grad's start must end at or before it,
// and the first one starting after it must start at or after the grad's end.
int64_t fisher_guard_first_overlap(const int64_t* start, const int64_t* nbytes, int64_t n,
                                   const int64_t* fixed_start, const int64_t* fixed_end, int64_t m) {
  std::vector<int64_t> order;
  order.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    if (nbytes[i] > 0) order.push_back(i);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return start[a] < start[b] || (start[a] == start[b] && a < b);
  });
  for (size_t j = 0; j < order.size(); ++j) {
    const int64_t i = order[j], s = start[i], e = s + nbytes[i];
    if (j + 1 < order.size() && e > start[order[j + 1]]) return i;
    const int64_t k = std::upper_bound(fixed_start, fixed_start + m, s) - fixed_start;  // first fixed start > s
    if (k > 0 && fixed_end[k - 1] > s) return i;
    if (k < m && fixed_start[k] < e) return i;
  }
  return -1;
}

void fisher_guard_cpu(const FisherGuardParams& p) {
  if (p.penalty == nullptr) throw Error("fisher_guard: penalty output is null");
  if (p.chunk_size <= 0) throw Error("fisher_guard: chunk_size must be positive");
  switch (p.dtype) {
    case kFloat32: return run_fisher_dtype<float>(p);
    case kFloat16: return run_fisher_dtype<half_t>(p);
    case kBFloat16: return run_fisher_dtype<bf16_t>(p);
    default: throw Error(std::string("fisher_guard: unsupported dtype ") + dtype_name(p.dtype));
  }
}

}  // namespace mgcl
