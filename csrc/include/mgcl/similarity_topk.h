// similarity_topk: exact, tie-complete top-k over similarity scores (SPEC.md
// section 3, step 1), with a low-precision screening pass.
//
// The score (the definition; python/mgcl/ops/similarity_topk/reference.py):
//   s(x, k) = fp32( (((0 + p_0) + p_1) + ... + p_{d-1}) ),  p_j = x_j * k_j,
// every product and sum in binary64 (products of fp32/fp16/bf16 values are
// exact there), summed in ascending j from +0.0, rounded once to binary32
// (nearest even). It is independent of BLAS, threads, blocking and device;
// fma(x, k, acc) gives the same sum (the product is exact).
//
// The rule (per query q, NaN scores never count):
//   distinct (ties=True): tau = the min(k, #distinct)-th largest distinct s;
//                         result = every n with s[n] >= tau
//   plain   (ties=False): the min(k, #non-NaN) best, equal s broken by lower n
//
// CPU: screen (int8 codes, or fp32 scores from a BLAS) -> a per-pair upper
// bound on s -> exact scores of the pairs that can still reach the query's
// running threshold -> a per-query state (below) -> finish. The derivation
// of the bound is atop csrc/cpu/similarity_topk.cpp.
//
// CUDA: a select over a tile of float32 values (Python feeds it upper bounds),
// and exact pair scores; csrc/../kernels/similarity_topk.cu.
//
// Row-wise metadata shared by keys and queries ("codes"): a row x of d values
// is stored as int8 codes c (|c_j| <= levels) with one float32 scale a, so
// that x ~ a * c, plus float32 upper bounds err >= ||x - a c||_2 and
// norm >= ||a c||_2, and sum = sum_j c_j. A row holding a non-finite value or
// with max|x_j| outside [2^-50, 2^50] (and not all zero) is "special": codes
// 0, scale 0, norm 0, sum 0 and err = +inf, so every bound built on it is inf
// or NaN and its pairs are always scored exactly.
#pragma once
#include <cstdint>

#include "mgcl/common.h"

namespace mgcl {

// ---- quantisation -------------------------------------------------------------------------

/// Largest code magnitude for key rows (8-bit signed codes).
constexpr int kKeyLevels = 127;
/// Largest code magnitude for query rows: 7 bits, so that query codes + 64 fit
/// in [1, 127] and u8 x s8 pair sums (vpmaddubsw) never saturate int16.
constexpr int kQueryLevels = 63;
/// Query codes are stored offset by this (unsigned) in the packed layout.
constexpr int kQueryOffset = 64;
/// Largest d the int8 path accepts (int32 dot products cannot overflow).
constexpr int64_t kInt8MaxDim = 65536;

struct SimilarityTopkQuantizeParams {
  /// Rows to quantise: rows x d values of dtype `dtype`, row r at src + r * ld.
  const void* src = nullptr;
  /// mgcl::DType code of src (float32, float16 or bfloat16).
  int dtype = kFloat32;
  /// Number of rows.
  int64_t rows = 0;
  /// Values per row.
  int64_t d = 0;
  /// Row stride of src in elements (>= d).
  int64_t ld = 0;
  /// Largest code magnitude (kKeyLevels or kQueryLevels).
  int levels = kKeyLevels;
  /// Output: int8 [rows, d] row-major codes.
  int8_t* codes = nullptr;
  /// Output: float32 [rows] scale a (x ~ a * c).
  float* scale = nullptr;
  /// Output: float32 [rows], >= ||x - a c||_2 (+inf for a special row).
  float* err = nullptr;
  /// Output: float32 [rows], >= ||a c||_2.
  float* norm = nullptr;
  /// Output: int32 [rows], sum_j c_j.
  int32_t* sum = nullptr;
};

/// Deterministic (fixed-order, scalar sums): the same bits on every machine.
void similarity_topk_quantize_cpu(const SimilarityTopkQuantizeParams& p);

/// Packed query codes for the int8 GEMM: groups of 16 queries,
///   packed[((g * d4 + j4) * 16 + lane) * 4 + t] = codes[q, 4 * j4 + t] + kQueryOffset
/// for q = 16 g + lane < rows and 4 j4 + t < d, else 0; d4 = ceil(d / 4).
/// The buffer holds ceil(rows / 16) * d4 * 64 bytes.
void similarity_topk_pack_queries_cpu(const int8_t* codes, int64_t rows, int64_t d, uint8_t* packed);

// ---- screening ----------------------------------------------------------------------------

/// Screening paths. The int8 paths compute the same integers (checked against
/// kScalar on first use); kBlas takes fp32 scores computed by the caller.
enum SimilarityTopkPath : int {
  kPathBlas = -1,       // caller-supplied approx scores (torch.mm), BLAS error bound
  kPathScalar = 0,      // portable int8 loops (the self-check oracle)
  kPathAvx2 = 1,        // vpmaddubsw + vpmaddwd (x86-64 AVX2)
  kPathAvxVnni = 2,     // vpdpbusd ymm (AVX-VNNI: Alder Lake, Sapphire Rapids, Zen 5)
  kPathAvx512Vnni = 3,  // vpdpbusd zmm (AVX512-VNNI: Cascade Lake+, Ice Lake+, Zen 4)
};

/// The per-query state of the CPU path, allocated by Python and kept across
/// screen calls (one per shard) until finish.
struct SimilarityTopkState {
  /// Rows of the state (all queries of the call).
  int64_t n_queries = 0;
  /// k (>= 1): entries of best_v per query.
  int64_t k = 0;
  /// Nonzero: ties=True (best keeps each value once). Zero: plain top-k.
  int distinct = 0;
  /// best_v[q * k + j], j < best_n[q]: the k best exact scores so far,
  /// descending (strictly, when distinct). float32 [n_queries, k].
  float* best_v = nullptr;
  /// best_n[q]: filled entries of best_v. int64 [n_queries], start at 0.
  int64_t* best_n = nullptr;
  /// cand_v / cand_i [n_queries, cand_cap]: exact scores >= the running
  /// threshold and their global key indices, in arrival order; finish sorts
  /// each query's result (value desc, index asc) to the front.
  float* cand_v = nullptr;
  int64_t* cand_i = nullptr;
  /// cand_n[q]: filled candidates. int64 [n_queries], start at 0.
  int64_t* cand_n = nullptr;
  /// Candidate capacity per query (> k).
  int64_t cand_cap = 0;
  /// overflow[q]: nonzero once query q's candidates no longer fit. uint8 [n_queries], start at 0.
  uint8_t* overflow = nullptr;
};

struct SimilarityTopkScreenParams {
  // ---- queries: the rows of the state
  /// Query values (the definition uses these): state.n_queries rows of d, row r at queries + r * q_ld.
  const void* queries = nullptr;
  /// mgcl::DType code of queries.
  int q_dtype = kFloat32;
  /// Values per row (queries and keys).
  int64_t d = 0;
  /// Row stride of queries in elements.
  int64_t q_ld = 0;
  /// First state row to screen and the number of rows (a contiguous range).
  int64_t row0 = 0;
  int64_t rows = 0;
  /// int8 paths: similarity_topk_pack_queries_cpu of all n_queries rows.
  const uint8_t* q_packed = nullptr;
  /// Query row metadata, [n_queries] each (see "codes" above; kQueryLevels).
  const float* q_scale = nullptr;
  const float* q_err = nullptr;
  const float* q_norm = nullptr;

  // ---- keys: one shard (or one block of it)
  /// Key values: n_keys rows of d, row n at keys + n * k_ld.
  const void* keys = nullptr;
  /// mgcl::DType code of keys.
  int k_dtype = kFloat32;
  /// Number of key rows.
  int64_t n_keys = 0;
  /// Row stride of keys in elements.
  int64_t k_ld = 0;
  /// Global index of key row 0 (indices count across shards).
  int64_t col0 = 0;
  /// Key codes, int8 [n_keys, d] row-major (int8 paths only).
  const int8_t* k_codes = nullptr;
  /// Key row metadata, [n_keys] each (kKeyLevels); k_sum int8 paths only.
  const float* k_scale = nullptr;
  const float* k_err = nullptr;
  const float* k_norm = nullptr;
  const int32_t* k_sum = nullptr;

  // ---- the screen
  /// A SimilarityTopkPath.
  int path = kPathScalar;
  /// kPathBlas: fp32 approximate scores [rows, n_keys], row r (of the range) at approx + r * approx_ld.
  const float* approx = nullptr;
  int64_t approx_ld = 0;
  /// kPathBlas: |approx - x.k| <= approx_rel * ||x||_2 ||k||_2 for every pair.
  float approx_rel = 0.f;

  // ---- the state
  SimilarityTopkState state;
  /// floor[q]: scores below it are never kept (-inf normally; a rerun of an
  /// overflowed query passes its known tau). float32 [n_queries].
  const float* floor = nullptr;
  /// rescored[q] += pairs of query q scored exactly. int64 [n_queries].
  int64_t* rescored = nullptr;
};

/// Screen one key shard against state rows [row0, row0 + rows) and fold the
/// exact scores that can reach each query's threshold into its state
/// (OpenMP over blocks of query rows). Calls for one state may come in any
/// key order; each (query, key) pair must be screened at most once.
void similarity_topk_screen_cpu(const SimilarityTopkScreenParams& p);

struct SimilarityTopkFinishParams {
  /// The state of the screen calls.
  SimilarityTopkState state;
  /// Output: tau[q], the threshold (best_v's last entry; NaN when query q has
  /// no non-NaN score). float32 [n_queries].
  float* tau = nullptr;
  /// Output: count[q] = entries of query q, now sorted (value desc, index
  /// asc) at the front of its candidates (plain: at most k); -1 when it
  /// overflowed (screen it again with floor = tau and more room). int64 [n_queries].
  int64_t* count = nullptr;
};

/// Per query, tau and the sorted result (or -1: overflowed).
void similarity_topk_finish_cpu(const SimilarityTopkFinishParams& p);

// ---- exact pair scores --------------------------------------------------------------------

struct SimilarityTopkPairParams {
  /// n_pairs rows of d values each: pair i scores x row i against k row i.
  const void* x = nullptr;
  int x_dtype = kFloat32;
  int64_t x_ld = 0;
  const void* k = nullptr;
  int k_dtype = kFloat32;
  int64_t k_ld = 0;
  int64_t n_pairs = 0;
  int64_t d = 0;
  /// Output: float32 [n_pairs], the definition's score of each pair.
  float* out = nullptr;
};

/// The pair params from the bindings' arguments (both modules take the same ones).
inline SimilarityTopkPairParams similarity_topk_pair_params(const void* x, int x_dtype, int64_t x_ld, const void* k,
                                                            int k_dtype, int64_t k_ld, int64_t n_pairs, int64_t d,
                                                            float* out) {
  SimilarityTopkPairParams p;
  p.x = x;
  p.x_dtype = x_dtype;
  p.x_ld = x_ld;
  p.k = k;
  p.k_dtype = k_dtype;
  p.k_ld = k_ld;
  p.n_pairs = n_pairs;
  p.d = d;
  p.out = out;
  return p;
}

/// The definition, row-wise (OpenMP over pairs).
void similarity_topk_pair_scores_cpu(const SimilarityTopkPairParams& p);

// ---- int8 paths: detection and self-check -------------------------------------------------

/// Bit i set: SimilarityTopkPath i runs on this CPU (kPathScalar always).
int similarity_topk_cpu_paths();

/// Whether `path` computes the same int32 dot products as kPathScalar on a
/// fixed pseudo-random problem that covers every tail (d % 4, d % 64, a
/// partial group of queries, a partial group of keys) and the extreme codes.
bool similarity_topk_selfcheck(int path);

// ---- CUDA ---------------------------------------------------------------------------------

/// The CUDA select: per query row, the best best_cap entries under the order
/// (value desc, index asc), or the best_cap best distinct values (distinct).
struct SimilarityTopkSelectParams {
  /// Values of one tile: rows x cols float32, row r at scores + r * ld.
  const float* scores = nullptr;
  /// Row stride of `scores` in elements (>= cols).
  int64_t ld = 0;
  /// Number of query rows in the tile (the state's rows).
  int64_t rows = 0;
  /// Number of keys (columns) in the tile.
  int64_t cols = 0;
  /// Global key index of column 0. Tiles of one state arrive in ascending key order.
  int64_t col0 = 0;
  /// Nonzero: keep each value once (the entry with the lowest index).
  int distinct = 0;
  /// Entries per query in best_v / best_i (<= kMaxBestCap).
  int64_t best_cap = 0;
  /// best_v[q * best_cap + j], j < best_n[q]: the list, sorted. float32 [rows, best_cap].
  float* best_v = nullptr;
  /// The key index of each best_v entry. int64 [rows, best_cap].
  int64_t* best_i = nullptr;
  /// Filled entries of each list. int64 [rows], start at 0.
  int64_t* best_n = nullptr;
};

/// Largest best_cap the CUDA select supports (shared memory holds best_cap
/// plus one sweep of candidates, rounded up to a power of two).
constexpr int64_t kMaxBestCap = 7168;

}  // namespace mgcl

#ifdef MGCL_WITH_CUDA_DECLS
#include <cuda_runtime_api.h>
namespace mgcl {
/// CUDA: fold one tile (rows = the state's rows) into best_v / best_i / best_n,
/// one block per row. Pointers are device memory.
void similarity_topk_select_cuda(const SimilarityTopkSelectParams& p, cudaStream_t stream);
/// CUDA: the definition for row-wise pairs, one thread per pair (fp64 FMA
/// chain in ascending j). Pointers are device memory.
void similarity_topk_pair_scores_cuda(const SimilarityTopkPairParams& p, cudaStream_t stream);
/// Dynamic shared memory (bytes) of the select launch for best_cap.
int64_t similarity_topk_select_dynamic_smem(int64_t best_cap);
/// The launcher's rule: opt in to more dynamic shared memory when static plus
/// dynamic exceed the 48 KiB a block gets by default.
bool similarity_topk_smem_needs_opt_in(int64_t static_bytes, int64_t dynamic_bytes);
}  // namespace mgcl
#endif
