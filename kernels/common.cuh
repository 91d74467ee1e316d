// Shared device helpers: dtype conversions, vector loads, block reductions,
// and the error check every launcher ends with.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "mgcl/common.h"

#define MGCL_CUDA_CHECK(expr)                                                       \
  do {                                                                              \
    cudaError_t err__ = (expr);                                                     \
    if (err__ != cudaSuccess)                                                       \
      throw ::mgcl::Error(std::string(#expr) + " failed: " + cudaGetErrorString(err__)); \
  } while (0)

// Every launcher calls this after its launches: launch-configuration errors
// surface here as exceptions; asynchronous faults surface at the next sync.
#define MGCL_CHECK_LAUNCH(what)                                                     \
  do {                                                                              \
    cudaError_t err__ = cudaGetLastError();                                         \
    if (err__ != cudaSuccess)                                                       \
      throw ::mgcl::Error(std::string(what) + ": kernel launch failed: " + cudaGetErrorString(err__)); \
  } while (0)

namespace mgcl {
namespace dev {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N contiguous elements moved as one (or two) 128-bit transactions.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ bool aligned_for(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) % sizeof(Vec<T, N>)) == 0;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; the result is valid in thread 0. blockDim.x must be a
// multiple of 32 and at most 1024. Fixed order: deterministic.
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v) {
  __shared__ Acc warp_part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  const int n_warps = blockDim.x >> 5;
  v = (threadIdx.x < n_warps) ? warp_part[threadIdx.x] : Acc(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

}  // namespace dev
}  // namespace mgcl
