// fisher_guard: the Dynamic Fisher Guard update over many tensors at once
// (SPEC.md section 6). For every tensor i and element e:
//   d = param - anchor
//   W = grad^2                                   mode DFG
//       (with ema > 0: fisher = ema*fisher + (1-ema)*grad^2, stored; W = fisher)
//     = fisher                                   mode EWC
//     = 1                                        mode L2
//   if normalize: W = W / mean_i(W)  (0 where the tensor's mean is 0)
//   grad    += 2*lam*W*d          (W from the incoming grad)
//   penalty += lam*W*d^2          (one float32 scalar over all tensors)
// The Python side validates every input and allocates every output.
// Memory traffic: fp32 DFG reads grad, param, anchor and writes grad (16 B per
// element), so the op is bandwidth-bound; the penalty comes from the same pass.
#pragma once
#include <cstdint>

#include "mgcl/common.h"

namespace mgcl {

enum FisherGuardMode : int { kModeDfg = 0, kModeEwc = 1, kModeL2 = 2 };

// The packed metadata: one int64 array, written by mgcl/ops/fisher_guard/native.py
// (host memory for the CPU, device memory for CUDA), read through
// fisher_guard_params below. With n tensors and C chunks (a chunk is at most
// chunk_size elements of one tensor; tensor i's chunks are consecutive):
//
//   [0, n)               grad addresses
//   [n, 2n)              param addresses
//   [2n, 3n)             anchor addresses
//   [3n, 4n)             fisher addresses (ignored unless has_fisher)
//   [4n, 5n)             numel of each tensor
//   [5n, 6n + 1)         tensor_first_chunk: tensor i owns chunks [first[i], first[i+1])
//   [6n + 1, 6n + 1 + C) chunk_tensor: the tensor of chunk c
//   [6n + 1 + C, 6n + 1 + 2C)  chunk_start: chunk c's first element within its tensor
//
// Each tensor is walked as numel consecutive elements from its address, so
// grad, param, anchor and fisher of one index must be dense with the same
// strides (Python checks this, and that no two tensors overlap).
constexpr int64_t fisher_guard_meta_size(int64_t n, int64_t n_chunks) { return 6 * n + 1 + 2 * n_chunks; }

struct FisherGuardParams {
  /// Number of tensors in each of the pointer arrays below.
  int64_t n_tensors = 0;
  /// grad[i]: base address of tensor i's gradient, updated in place.
  void* const* grad = nullptr;
  /// param[i]: current parameter values (read only), same layout as grad[i].
  const void* const* param = nullptr;
  /// anchor[i]: the consolidated weights theta* (read only).
  const void* const* anchor = nullptr;
  /// fisher[i]: stored importance; read for EWC, read and written for DFG with
  /// ema > 0; null otherwise.
  void* const* fisher = nullptr;
  /// numel[i]: element count of tensor i (0 allowed).
  const int64_t* numel = nullptr;
  /// Number of chunks; a chunk is at most chunk_size elements of one tensor.
  int64_t n_chunks = 0;
  /// Elements per chunk (a multiple of 8).
  int64_t chunk_size = 0;
  /// chunk_tensor[c]: the tensor chunk c belongs to.
  const int64_t* chunk_tensor = nullptr;
  /// chunk_start[c]: first element of chunk c within its tensor.
  const int64_t* chunk_start = nullptr;
  /// tensor_first_chunk[i] .. tensor_first_chunk[i+1]: the chunks of tensor i
  /// (n_tensors + 1 entries).
  const int64_t* tensor_first_chunk = nullptr;
  /// dtype of grad/param/anchor (DType code): float32, float16 or bfloat16.
  int dtype = kFloat32;
  /// dtype of the fisher tensors: float32 or the same as dtype.
  int fisher_dtype = kFloat32;
  /// FisherGuardMode.
  int mode = kModeDfg;
  /// Guard strength lambda (>= 0).
  float lam = 0.f;
  /// EMA factor in [0, 1); only used by DFG.
  float ema = 0.f;
  /// 1 - ema, rounded once from double (1.f - ema would differ by up to 1e-4
  /// relative for ema near 1, e.g. 0.9999).
  float ema_rest = 1.f;
  /// Nonzero: divide W by its per-tensor mean.
  int normalize = 0;
  /// Output: float32 scalar receiving lam * sum(W*d^2).
  float* penalty = nullptr;

  // ---- CUDA only: workspaces allocated in Python (the CPU path uses host vectors).
  /// Workspace of n_chunks floats: per-chunk penalty partial sums.
  float* partial = nullptr;
  /// Workspace of n_chunks floats (normalize only): per-chunk sums of W.
  float* partial_w = nullptr;
  /// Workspace of n_tensors floats (normalize only): per-tensor mean of W.
  float* mean_w = nullptr;
};

/// The params for one call: the array fields point into the packed metadata
/// (layout above; the memory stays the caller's), the rest as given. The CUDA
/// workspaces are left for the CUDA binding to set.
inline FisherGuardParams fisher_guard_params(const int64_t* meta, int64_t n, int64_t n_chunks, int64_t chunk_size,
                                             bool has_fisher, int dtype, int fisher_dtype, int mode, float lam,
                                             double ema, bool normalize, float* penalty) {
  FisherGuardParams p;
  p.n_tensors = n;
  p.grad = reinterpret_cast<void* const*>(meta);
  p.param = reinterpret_cast<const void* const*>(meta + n);
  p.anchor = reinterpret_cast<const void* const*>(meta + 2 * n);
  p.fisher = has_fisher ? reinterpret_cast<void* const*>(meta + 3 * n) : nullptr;
  p.numel = meta + 4 * n;
  p.tensor_first_chunk = meta + 5 * n;
  p.chunk_tensor = meta + 6 * n + 1;
  p.chunk_start = meta + 6 * n + 1 + n_chunks;
  p.n_chunks = n_chunks;
  p.chunk_size = chunk_size;
  p.dtype = dtype;
  p.fisher_dtype = fisher_dtype;
  p.mode = mode;
  p.lam = lam;
  p.ema = float(ema);
  p.ema_rest = float(1.0 - ema);
  p.normalize = normalize ? 1 : 0;
  p.penalty = penalty;
  return p;
}

/// CPU implementation (OpenMP over the chunks of all tensors).
void fisher_guard_cpu(const FisherGuardParams& p);

/// The overlap re-check of a step's new grads (the kernel updates every grad
/// in place, so no two may share memory, nor may a grad share memory with the
/// fixed params, anchors or fisher). Span i is the bytes
/// [start[i], start[i] + nbytes[i]); spans with nbytes 0 take no memory.
/// fixed_start / fixed_end: m spans sorted by start and disjoint (the fixed
/// tensors', packed once). Returns -1 when every span is disjoint from every
/// other and from every fixed span (touching ends are disjoint), else the index
/// of a span that overlaps. Host memory; O(n log n + n log m).
int64_t fisher_guard_first_overlap(const int64_t* start, const int64_t* nbytes, int64_t n,
                                   const int64_t* fixed_start, const int64_t* fixed_end, int64_t m);

}  // namespace mgcl

#ifdef MGCL_WITH_CUDA_DECLS
#include <cuda_runtime_api.h>
namespace mgcl {
/// CUDA implementation: optional reduction pass (normalize), one multi-tensor
/// launch over all chunks, one launch reducing the penalty partials.
void fisher_guard_cuda(const FisherGuardParams& p, cudaStream_t stream);
}  // namespace mgcl
#endif
