// fisher_guard on CUDA: a chunked multi-tensor apply.
//
// Math (per element; d = param - anchor, all arithmetic in fp32):
//   W     = grad^2 | fisher | 1     (DFG with ema: f' = ema*f + ema_rest*grad^2, stored, W = f';
//                                   ema_rest = 1 - ema rounded once from double)
//   W    /= mean(W over its tensor) (normalize; 0 where that mean is 0)
//   grad += 2*lam*W*d,   penalty += lam*W*d^2.
//
// Layout of work: Python splits every tensor into chunks of chunk_size
// elements and uploads the pointer arrays and the chunk -> (tensor, start) map
// (the packed metadata of fisher_guard.h) when the tensors' addresses change.
// One block owns one chunk, so a single launch covers ~300 tensors of any
// sizes without a launch per tensor.
//
// Performance: the update is a pure stream (fp32 DFG: read grad, param,
// anchor; write grad = 16 B/element) with ~6 flops per element, so the only
// goal is bandwidth: 128-bit vector loads when the chunk's pointers are
// aligned (always, for torch allocations), several independent vectors in
// flight per thread, no atomics. Reductions are per-chunk partials summed in a
// fixed order, so results are bitwise reproducible run to run.
//   pass 0 (normalize only): per-chunk sums of W  -> partial_w
//   pass 0b (normalize only): per-tensor mean     -> mean_w
//   pass 1: the update + per-chunk penalty        -> partial
//   pass 2: penalty = lam * sum(partial)          (one block)
#include "common.cuh"
#include "mgcl/fisher_guard.h"

namespace mgcl {
namespace {

constexpr int kThreads = 256;

template <typename T> struct VecWidth { static constexpr int value = 16 / sizeof(T); };

// W for one element before normalisation; writes the EMA'd fisher when Write.
template <int Mode, bool Ema, bool Write, typename F>
__device__ __forceinline__ float importance(float g, F* f_elem, float ema, float ema_rest) {
  if constexpr (Mode == kModeDfg) {
    float w = g * g;
    if constexpr (Ema) {
      F nf = dev::from_f<F>(ema * dev::to_f(*f_elem) + ema_rest * w);
      if constexpr (Write) *f_elem = nf;
      return dev::to_f(nf);
    }
    return w;
  } else if constexpr (Mode == kModeEwc) {
    return dev::to_f(*f_elem);
  } else {
    return 1.f;
  }
}

struct ChunkRef {
  int64_t tensor, start, len;
};

__device__ __forceinline__ ChunkRef chunk_ref(const FisherGuardParams& p, int64_t c) {
  ChunkRef r;
  r.tensor = p.chunk_tensor[c];
  r.start = p.chunk_start[c];
  int64_t n = p.numel[r.tensor] - r.start;
  r.len = n < p.chunk_size ? n : p.chunk_size;
  return r;
}

// pass 0: sum of W over the chunk (read only: never writes fisher).
template <int Mode, bool Ema, typename T, typename F>
__global__ void __launch_bounds__(kThreads) wsum_kernel(FisherGuardParams p) {
  const ChunkRef c = chunk_ref(p, blockIdx.x);
  const T* g = static_cast<const T*>(p.grad[c.tensor]) + c.start;
  F* f = p.fisher ? static_cast<F*>(p.fisher[c.tensor]) + c.start : nullptr;
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < c.len; i += kThreads) {
    F fv = f ? f[i] : F();
    s += importance<Mode, Ema, false, F>(dev::to_f(g[i]), &fv, p.ema, p.ema_rest);
  }
  s = dev::block_sum(s);
  if (threadIdx.x == 0) p.partial_w[blockIdx.x] = s;
}

// pass 0b: per-tensor mean of W, partials summed in chunk order.
__global__ void mean_kernel(FisherGuardParams p) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= p.n_tensors) return;
  double s = 0.0;
  for (int64_t c = p.tensor_first_chunk[t]; c < p.tensor_first_chunk[t + 1]; ++c) s += p.partial_w[c];
  p.mean_w[t] = p.numel[t] > 0 ? float(s / double(p.numel[t])) : __int_as_float(0x7fc00000);
}

template <int Mode, bool Ema, bool Normalize, typename F>
__device__ __forceinline__ float update_one(float& g, float x, float a, F* f_elem, float two_lam,
                                            float mean, float ema, float ema_rest) {
  float w = importance<Mode, Ema, true, F>(g, f_elem, ema, ema_rest);
  if constexpr (Normalize) w = (mean == 0.f) ? 0.f : w / mean;
  const float d = x - a;
  const float wd = w * d;
  g = g + two_lam * wd;
  return wd * d;
}

// pass 1: the update. Vector path when every pointer of the chunk is aligned
// to its vector width; scalar path (and the tail) otherwise.
template <int Mode, bool Ema, bool Normalize, typename T, typename F>
__global__ void __launch_bounds__(kThreads) update_kernel(FisherGuardParams p) {
  constexpr int V = VecWidth<T>::value;
  const ChunkRef c = chunk_ref(p, blockIdx.x);
  T* g = static_cast<T*>(p.grad[c.tensor]) + c.start;
  const T* x = static_cast<const T*>(p.param[c.tensor]) + c.start;
  const T* a = static_cast<const T*>(p.anchor[c.tensor]) + c.start;
  F* f = p.fisher ? static_cast<F*>(p.fisher[c.tensor]) + c.start : nullptr;
  const float two_lam = 2.f * p.lam;
  const float mean = Normalize ? p.mean_w[c.tensor] : 0.f;
  float s = 0.f;

  const bool vec_ok = dev::aligned_for<T, V>(g) && dev::aligned_for<T, V>(x) &&
                      dev::aligned_for<T, V>(a) && (f == nullptr || dev::aligned_for<F, V>(f));
  int64_t done = 0;
  if (vec_ok) {
    const int64_t n_vec = c.len / V;
    using VT = dev::Vec<T, V>;
    using VF = dev::Vec<F, V>;
    for (int64_t v = threadIdx.x; v < n_vec; v += kThreads) {
      VT gv = reinterpret_cast<const VT*>(g)[v];
      const VT xv = reinterpret_cast<const VT*>(x)[v];
      const VT av = reinterpret_cast<const VT*>(a)[v];
      VF fv;
      if (f != nullptr && (Mode == kModeEwc || Ema)) fv = reinterpret_cast<const VF*>(f)[v];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float gj = dev::to_f(gv.v[j]);
        s += update_one<Mode, Ema, Normalize, F>(gj, dev::to_f(xv.v[j]), dev::to_f(av.v[j]), &fv.v[j],
                                                 two_lam, mean, p.ema, p.ema_rest);
        gv.v[j] = dev::from_f<T>(gj);
      }
      reinterpret_cast<VT*>(g)[v] = gv;
      if (Ema) reinterpret_cast<VF*>(f)[v] = fv;
    }
    done = n_vec * V;
  }
  for (int64_t i = done + threadIdx.x; i < c.len; i += kThreads) {
    float gi = dev::to_f(g[i]);
    F fv = f ? f[i] : F();
    s += update_one<Mode, Ema, Normalize, F>(gi, dev::to_f(x[i]), dev::to_f(a[i]), &fv, two_lam, mean,
                                             p.ema, p.ema_rest);
    g[i] = dev::from_f<T>(gi);
    if (Ema) f[i] = fv;
  }
  s = dev::block_sum(s);
  if (threadIdx.x == 0) p.partial[blockIdx.x] = s;
}

// pass 2: penalty = lam * sum(partial), in a fixed order.
__global__ void __launch_bounds__(1024) penalty_kernel(FisherGuardParams p) {
  double s = 0.0;
  for (int64_t c = threadIdx.x; c < p.n_chunks; c += blockDim.x) s += p.partial[c];
  s = dev::block_sum(s);
  if (threadIdx.x == 0) *p.penalty = float(double(p.lam) * s);
}

template <int Mode, bool Ema, typename T, typename F>
void launch(const FisherGuardParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned(p.n_chunks));
  if (p.normalize) {
    wsum_kernel<Mode, Ema, T, F><<<grid, kThreads, 0, stream>>>(p);
    mean_kernel<<<unsigned((p.n_tensors + 127) / 128), 128, 0, stream>>>(p);
    update_kernel<Mode, Ema, true, T, F><<<grid, kThreads, 0, stream>>>(p);
  } else {
    update_kernel<Mode, Ema, false, T, F><<<grid, kThreads, 0, stream>>>(p);
  }
  penalty_kernel<<<1, 1024, 0, stream>>>(p);
}

template <typename T, typename F>
void launch_mode(const FisherGuardParams& p, cudaStream_t stream) {
  switch (p.mode) {
    case kModeDfg:
      if (p.ema > 0.f) return launch<kModeDfg, true, T, F>(p, stream);
      return launch<kModeDfg, false, T, F>(p, stream);
    case kModeEwc: return launch<kModeEwc, false, T, F>(p, stream);
    case kModeL2: return launch<kModeL2, false, T, F>(p, stream);
    default: throw Error("fisher_guard: unknown mode " + std::to_string(p.mode));
  }
}

template <typename T>
void launch_fisher_dtype(const FisherGuardParams& p, cudaStream_t stream) {
  if (p.fisher_dtype == kFloat32) return launch_mode<T, float>(p, stream);
  if (p.fisher_dtype != p.dtype)
    throw Error(std::string("fisher_guard: fisher dtype must be float32 or ") + dtype_name(p.dtype));
  return launch_mode<T, T>(p, stream);
}

}  // namespace

void fisher_guard_cuda(const FisherGuardParams& p, cudaStream_t stream) {
  if (p.penalty == nullptr) throw Error("fisher_guard: penalty output is null");
  if (p.chunk_size <= 0 || p.chunk_size % 8 != 0) throw Error("fisher_guard: chunk_size must be a positive multiple of 8");
  if (p.n_chunks == 0) {
    MGCL_CUDA_CHECK(cudaMemsetAsync(p.penalty, 0, sizeof(float), stream));
    return;
  }
  switch (p.dtype) {
    case kFloat32: launch_fisher_dtype<float>(p, stream); break;
    case kFloat16: launch_fisher_dtype<__half>(p, stream); break;
    case kBFloat16: launch_fisher_dtype<__nv_bfloat16>(p, stream); break;
    default: throw Error(std::string("fisher_guard: unsupported dtype ") + dtype_name(p.dtype));
  }
  MGCL_CHECK_LAUNCH("fisher_guard");
}

}  // namespace mgcl
