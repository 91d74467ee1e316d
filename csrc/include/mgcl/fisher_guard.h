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
#pragma once
#include <cstdint>

#include "mgcl/common.h"

namespace mgcl {

enum FisherGuardMode : int { kModeDfg = 0, kModeEwc = 1, kModeL2 = 2 };

struct FisherGuardParams {
  /// Number of tensors in each of the pointer arrays below.
  int64_t n_tensors = 0;
  /// grad[i]: base address of tensor i's gradient, contiguous, updated in place.
  /// On the CPU the arrays live in host memory; for CUDA they live on the device.
  void* const* grad = nullptr;
  /// param[i]: current parameter values (read only), same layout as grad[i].
  const void* const* param = nullptr;
  /// anchor[i]: the consolidated weights theta* (read only).
  const void* const* anchor = nullptr;
  /// fisher[i]: stored importance; read for EWC, read and written for DFG with
  /// ema > 0; may be null otherwise.
  void* const* fisher = nullptr;
  /// numel[i]: element count of tensor i (0 allowed).
  const int64_t* numel = nullptr;
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
  /// Nonzero: divide W by its per-tensor mean.
  int normalize = 0;
  /// Output: float32 scalar receiving lam * sum(W*d^2).
  float* penalty = nullptr;

  // ---- CUDA only: the chunk list and workspaces, built and allocated in Python.
  /// Number of chunks; a chunk is at most chunk_size elements of one tensor.
  int64_t n_chunks = 0;
  /// Elements per chunk (a multiple of 8).
  int64_t chunk_size = 0;
  /// chunk_tensor[c]: the tensor chunk c belongs to (device memory).
  const int64_t* chunk_tensor = nullptr;
  /// chunk_start[c]: first element of chunk c within its tensor (device memory).
  const int64_t* chunk_start = nullptr;
  /// tensor_first_chunk[i] .. tensor_first_chunk[i+1]: the chunks of tensor i
  /// (n_tensors + 1 entries, device memory).
  const int64_t* tensor_first_chunk = nullptr;
  /// Workspace of n_chunks floats: per-chunk penalty partial sums.
  float* partial = nullptr;
  /// Workspace of n_chunks floats (normalize only): per-chunk sums of W.
  float* partial_w = nullptr;
  /// Workspace of n_tensors floats (normalize only): per-tensor mean of W.
  float* mean_w = nullptr;
};

/// CPU implementation (OpenMP over chunks of all tensors).
void fisher_guard_cpu(const FisherGuardParams& p);

}  // namespace mgcl

#ifdef MGCL_WITH_CUDA_DECLS
#include <cuda_runtime_api.h>
namespace mgcl {
/// CUDA implementation: optional reduction pass (normalize), one multi-tensor
/// launch over all chunks, one launch reducing the penalty partials.
void fisher_guard_cuda(const FisherGuardParams& p, cudaStream_t stream);
}  // namespace mgcl
#endif
