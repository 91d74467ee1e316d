// similarity_topk on CUDA: the select over one tile of float32 values, and the
// exact pair scores. Python (streaming.screened_topk) feeds the select upper
// bounds on the exact scores and scores its survivors with the pair kernel.
//
// ---- pair_scores: the definition (mgcl/similarity_topk.h) -------------------------------------
// One thread per pair: acc = +0.0; for j ascending acc = fma(x_j, k_j, acc) in
// binary64. x_j and k_j are fp32/fp16/bf16 values widened exactly, so x_j k_j
// is exact in binary64 and fma(x_j, k_j, acc) = round(acc + x_j k_j): the very
// sum the CPU forms, in the same order, then rounded once to fp32
// (__double2float_rn). Rows are read by one thread each (uncoalesced); it runs
// only on the few screened candidates.
//
// ---- select --------------------------------------------------------------------------------------
// Math. Order the entries (value v, key index n) of a query by
//   a before b  <=>  a.v > b.v, or a.v == b.v and a.n < b.n      (NaN excluded)
// Each query keeps a list L of its best cap entries under this order, sorted.
// Folding in a tile: an entry can enter L only if L is not full, or it comes
// before L's last entry. Tiles arrive in ascending key order, so every new
// index exceeds every index in L and "before the last" is simply v > last.v.
// Hence the filter: full ? v > thr : v == v (not NaN), thr = L[cap-1].v.
// Distinct mode keeps each value once (the entry with the lowest index): the
// same filter (a value equal to thr is already in L), then duplicates dropped.
// After the last tile, L is exactly the top cap entries (or distinct values)
// of the query; Python derives tau and which queries need a collection pass.
//
// Work. One block (256 threads) per query row. The row is swept 1024 scores
// at a time (4 coalesced loads per thread); entries passing the filter are
// appended to shared memory behind L (a warp-aggregated atomic per warp and
// load). When the next sweep might not fit, L and the appended entries are
// bitonic-sorted together in shared memory and cut back to cap ("flush"),
// which raises thr. Shared memory holds P = next_pow2(cap + 1024) entries,
// so a sweep never overflows. On the first tile most scores pass (one flush
// per sweep); afterwards thr is high and a tile costs one streaming read of
// the row plus, rarely, one flush. The list is written back only if it changed.
#include <cfloat>
#include <climits>

#define MGCL_WITH_CUDA_DECLS
#include "common.cuh"
#include "mgcl/similarity_topk.h"

namespace mgcl {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;
constexpr int kSweep = kThreads * kPerThread;  // scores read per sweep = most entries a sweep appends
constexpr int64_t kNoIndex = LLONG_MAX;         // padding entry: after every real one (value -inf)

__device__ __forceinline__ bool before(float va, int64_t ia, float vb, int64_t ib) {
  return va > vb || (va == vb && ia < ib);
}

// Sorts v/ix[0, n) by `before`; n a power of two; every thread of the block calls it.
__device__ void bitonic_sort(float* v, int64_t* ix, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < n / 2; t += blockDim.x) {
        const int lo = 2 * t - (t & (stride - 1));
        const int hi = lo + stride;
        const bool up = (lo & size) == 0;
        const bool swap = up ? before(v[hi], ix[hi], v[lo], ix[lo]) : before(v[lo], ix[lo], v[hi], ix[hi]);
        if (swap) {
          const float tv = v[lo];
          v[lo] = v[hi];
          v[hi] = tv;
          const int64_t ti = ix[lo];
          ix[lo] = ix[hi];
          ix[hi] = ti;
        }
      }
      __syncthreads();
    }
  }
}

__device__ __forceinline__ int next_pow2(int x) {
  int p = 2;
  while (p < x) p <<= 1;
  return p;
}

// Sort the cnt entries in shared memory, drop repeated values (Distinct), keep
// the best cap; returns the new count (also left in s_cnt). Block-wide, with a
// barrier on entry and after every thread has read the result.
template <bool Distinct>
__device__ int flush(float* v, int64_t* ix, int cnt, int cap, int* s_cnt, int* s_valid) {
  __syncthreads();
  const int n = next_pow2(cnt);
  for (int i = cnt + threadIdx.x; i < n; i += blockDim.x) {
    v[i] = -INFINITY;
    ix[i] = kNoIndex;
  }
  if (threadIdx.x == 0) *s_valid = 0;
  __syncthreads();
  bitonic_sort(v, ix, n);
  int valid = cnt;
  if (Distinct) {
    // Mark the later copies of each value as padding (reads v only), then
    // give them the padding value and sort again: distinct values first.
    int mine = 0;
    for (int i = threadIdx.x; i < cnt; i += blockDim.x) {
      if (i > 0 && v[i] == v[i - 1]) ix[i] = kNoIndex;
      else ++mine;
    }
    atomicAdd(s_valid, mine);
    __syncthreads();
    for (int i = threadIdx.x; i < cnt; i += blockDim.x)
      if (ix[i] == kNoIndex) v[i] = -INFINITY;
    __syncthreads();
    bitonic_sort(v, ix, n);
    valid = *s_valid;
  }
  __syncthreads();
  if (threadIdx.x == 0) *s_cnt = valid < cap ? valid : cap;
  __syncthreads();
  const int kept = *s_cnt;
  __syncthreads();  // read by all before the next sweep appends to s_cnt
  return kept;
}

template <bool Distinct>
__global__ void __launch_bounds__(kThreads) select_kernel(SimilarityTopkSelectParams p, int P) {
  extern __shared__ int64_t smem_ix[];
  int64_t* ix = smem_ix;
  float* v = reinterpret_cast<float*>(smem_ix + P);
  __shared__ int s_cnt, s_valid;

  const int cap = int(p.best_cap);
  const int64_t row = blockIdx.x;
  float* lv = p.best_v + row * p.best_cap;
  int64_t* li = p.best_i + row * p.best_cap;
  const float* srow = p.scores + row * p.ld;

  const int n0 = int(p.best_n[row]);
  for (int i = threadIdx.x; i < n0; i += kThreads) {
    v[i] = lv[i];
    ix[i] = li[i];
  }
  if (threadIdx.x == 0) s_cnt = n0;
  __syncthreads();

  int n = n0;  // entries of the (sorted) list at the front of shared memory
  bool full = n == cap;
  float thr = full ? v[cap - 1] : -INFINITY;
  bool changed = false;
  const int lane = threadIdx.x & 31;

  for (int64_t base = 0; base < p.cols; base += kSweep) {
    float x[kPerThread];
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int64_t c = base + u * kThreads + threadIdx.x;
      x[u] = c < p.cols ? srow[c] : NAN;
    }
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const bool take = full ? (x[u] > thr) : (x[u] == x[u]);
      const unsigned mask = __ballot_sync(0xffffffffu, take);
      if (mask == 0u) continue;
      const int leader = __ffs(mask) - 1;
      int pos = 0;
      if (lane == leader) pos = atomicAdd(&s_cnt, __popc(mask));
      pos = __shfl_sync(0xffffffffu, pos, leader);
      if (take) {
        pos += __popc(mask & ((1u << lane) - 1u));
        v[pos] = x[u];
        ix[pos] = p.col0 + base + u * kThreads + threadIdx.x;
      }
    }
    __syncthreads();
    const int cnt = s_cnt;
    __syncthreads();  // everyone has read s_cnt before anyone appends again
    if (cnt > P - kSweep) {
      n = flush<Distinct>(v, ix, cnt, cap, &s_cnt, &s_valid);
      full = n == cap;
      thr = full ? v[cap - 1] : -INFINITY;
      changed = true;
    }
  }

  __syncthreads();
  const int cnt = s_cnt;
  if (cnt > n) {
    n = flush<Distinct>(v, ix, cnt, cap, &s_cnt, &s_valid);
    changed = true;
  }
  if (!changed) return;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    lv[i] = v[i];
    li[i] = ix[i];
  }
  if (threadIdx.x == 0) p.best_n[row] = n;
}

int shared_entries(int64_t cap) {
  int P = 2;
  while (P < cap + kSweep) P <<= 1;
  return P;
}

// Without an opt-in a block may use 48 KiB of shared memory, static and
// dynamic together; above that the kernel must allow the dynamic part.
constexpr int64_t kDefaultSmem = 48 * 1024;

template <bool Distinct>
void launch(const SimilarityTopkSelectParams& p, cudaStream_t stream) {
  const int P = shared_entries(p.best_cap);
  const int64_t smem = similarity_topk_select_dynamic_smem(p.best_cap);
  cudaFuncAttributes attr;
  MGCL_CUDA_CHECK(cudaFuncGetAttributes(&attr, select_kernel<Distinct>));
  if (similarity_topk_smem_needs_opt_in(int64_t(attr.sharedSizeBytes), smem))
    MGCL_CUDA_CHECK(cudaFuncSetAttribute(select_kernel<Distinct>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(smem)));
  select_kernel<Distinct><<<unsigned(p.rows), kThreads, size_t(smem), stream>>>(p, P);
}

template <typename TX, typename TK>
__global__ void pair_kernel(const TX* __restrict__ x, int64_t x_ld, const TK* __restrict__ k, int64_t k_ld,
                            int64_t n, int64_t d, float* __restrict__ out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const TX* xr = x + i * x_ld;
  const TK* kr = k + i * k_ld;
  double acc = 0.0;
  for (int64_t j = 0; j < d; ++j) acc = __fma_rn(double(dev::to_f(xr[j])), double(dev::to_f(kr[j])), acc);
  out[i] = __double2float_rn(acc);
}

template <typename TX>
void pair_launch_k(const SimilarityTopkPairParams& p, cudaStream_t stream) {
  const unsigned blocks = unsigned((p.n_pairs + 255) / 256);
  const TX* x = static_cast<const TX*>(p.x);
  switch (p.k_dtype) {
    case kFloat32:
      pair_kernel<<<blocks, 256, 0, stream>>>(x, p.x_ld, static_cast<const float*>(p.k), p.k_ld, p.n_pairs, p.d, p.out);
      break;
    case kFloat16:
      pair_kernel<<<blocks, 256, 0, stream>>>(x, p.x_ld, static_cast<const __half*>(p.k), p.k_ld, p.n_pairs, p.d,
                                              p.out);
      break;
    case kBFloat16:
      pair_kernel<<<blocks, 256, 0, stream>>>(x, p.x_ld, static_cast<const __nv_bfloat16*>(p.k), p.k_ld, p.n_pairs,
                                              p.d, p.out);
      break;
    default: throw Error(std::string("similarity_topk pair_scores: unsupported key dtype ") + dtype_name(p.k_dtype));
  }
}

}  // namespace

int64_t similarity_topk_select_dynamic_smem(int64_t best_cap) {
  return int64_t(shared_entries(best_cap)) * int64_t(sizeof(int64_t) + sizeof(float));
}

bool similarity_topk_smem_needs_opt_in(int64_t static_bytes, int64_t dynamic_bytes) {
  return static_bytes + dynamic_bytes > kDefaultSmem;
}

void similarity_topk_pair_scores_cuda(const SimilarityTopkPairParams& p, cudaStream_t stream) {
  if (p.n_pairs == 0) return;
  if (!p.x || !p.k || !p.out) throw Error("similarity_topk pair_scores: a pointer is null");
  if (p.d < 0 || p.x_ld < p.d || p.k_ld < p.d) throw Error("similarity_topk pair_scores: bad sizes");
  if ((p.n_pairs + 255) / 256 > INT_MAX) throw Error("similarity_topk pair_scores: too many pairs for one launch");
  switch (p.x_dtype) {
    case kFloat32: pair_launch_k<float>(p, stream); break;
    case kFloat16: pair_launch_k<__half>(p, stream); break;
    case kBFloat16: pair_launch_k<__nv_bfloat16>(p, stream); break;
    default: throw Error(std::string("similarity_topk pair_scores: unsupported dtype ") + dtype_name(p.x_dtype));
  }
  MGCL_CHECK_LAUNCH("similarity_topk pair_scores");
}

void similarity_topk_select_cuda(const SimilarityTopkSelectParams& p, cudaStream_t stream) {
  if (p.best_cap < 1 || p.best_cap > kMaxBestCap)
    throw Error("similarity_topk select: best_cap must be in [1, " + std::to_string(kMaxBestCap) + "]");
  if (p.rows > INT_MAX) throw Error("similarity_topk select: too many rows for one launch");
  if (p.rows == 0 || p.cols == 0) return;
  if (!p.scores || !p.best_v || !p.best_i || !p.best_n) throw Error("similarity_topk select: a pointer is null");
  if (p.ld < p.cols) throw Error("similarity_topk select: ld < cols");
  if (p.distinct) launch<true>(p, stream);
  else launch<false>(p, stream);
  MGCL_CHECK_LAUNCH("similarity_topk select");
}

}  // namespace mgcl
