// similarity_topk: the selection half of the tie-exact top-k over similarity
// scores (SPEC.md section 3, step 1). Python computes the float32 scores one
// block at a time (a GEMM per block) and hands each block to these functions,
// which update a per-query state that Python allocated and keeps between
// blocks. Blocks of one query must arrive in ascending key order.
//
// The rule (per query q, s = its scores, NaN never counts):
//   distinct (ties=True): tau = the min(k, #distinct)-th largest distinct s;
//                         result = every n with s[n] >= tau
//   plain   (ties=False): the min(k, #non-NaN) best, equal s broken by lower n
//
// CPU: `best` holds the k best values so far (each once when distinct) in a
// sorted array; every score >= the running threshold (best's last value once
// full) also goes into a bounded candidate buffer. A query whose buffer fills
// up with scores all >= the threshold is flagged `overflow`: its candidates are
// dropped, its `best` stays exact, and Python collects its result in a second
// pass over the same score blocks.
//
// CUDA: `best` holds the best_cap entries (value, index) under the order
// (value desc, index asc), or the best_cap best distinct values (distinct).
// Python picks best_cap = k + slack and decides from the final lists which
// queries need a collection pass.
#pragma once
#include <cstdint>

#include "mgcl/common.h"

namespace mgcl {

struct SimilarityTopkParams {
  // ---- the score block (float32, row-major)
  /// Scores of one block: rows x cols float32, row r at scores + r * ld.
  const float* scores = nullptr;
  /// Row stride of `scores` in elements (>= cols).
  int64_t ld = 0;
  /// Number of query rows in the block.
  int64_t rows = 0;
  /// Number of keys (columns) in the block.
  int64_t cols = 0;
  /// State row of the block's first row (CPU; CUDA always starts at row 0).
  int64_t row0 = 0;
  /// Global key index of column 0 (indices count across shards).
  int64_t col0 = 0;

  // ---- per-query state, allocated by Python, kept across blocks
  /// Nonzero: `best` keeps each value once (ties=True on the CPU; the
  /// distinct pass on CUDA). Zero: values with multiplicity.
  int distinct = 0;
  /// Entries per query in best_v / best_i: k on the CPU, K' on CUDA (<= kMaxBestCap).
  int64_t best_cap = 0;
  /// best_v[q * best_cap + j], j < best_n[q]: the best values so far,
  /// descending (strictly, when distinct). float32 [Q, best_cap].
  float* best_v = nullptr;
  /// best_i: the key index of each best_v entry (CUDA only; null on the CPU).
  /// int64 [Q, best_cap]; ties in value ordered by ascending index.
  int64_t* best_i = nullptr;
  /// best_n[q]: filled entries of query q's best list. int64 [Q], start at 0.
  int64_t* best_n = nullptr;

  // ---- CPU only: candidate buffers and the finish outputs
  /// cand_v / cand_i [Q, cand_cap]: scores >= the running threshold and their
  /// key indices, in arrival order; sorted by finish.
  float* cand_v = nullptr;
  int64_t* cand_i = nullptr;
  /// cand_n[q]: filled candidates of query q. int64 [Q], start at 0.
  int64_t* cand_n = nullptr;
  /// Candidate capacity per query (> best_cap).
  int64_t cand_cap = 0;
  /// overflow[q]: nonzero once query q's buffer overflowed. uint8 [Q], start at 0.
  uint8_t* overflow = nullptr;
  /// Number of queries (rows of the state); finish only.
  int64_t n_queries = 0;
  /// k (finish only): plain mode keeps the first k candidates.
  int64_t k = 0;
  /// Output of finish: tau[q], the threshold (the last best value; NaN when
  /// query q has no non-NaN score). float32 [Q].
  float* tau = nullptr;
  /// Output of finish: count[q] = entries of query q, now sorted (value desc,
  /// index asc) at the front of its candidate buffer; -1 when it overflowed
  /// (collect every score >= tau[q]). int64 [Q].
  int64_t* count = nullptr;
};

/// Largest best_cap the CUDA select supports (shared memory holds best_cap
/// plus one sweep of candidates, rounded up to a power of two).
constexpr int64_t kMaxBestCap = 7168;

/// CPU: fold one score block into the state (OpenMP over the block's rows).
void similarity_topk_update_cpu(const SimilarityTopkParams& p);

/// CPU: per query, tau and the sorted result (or -1: overflowed).
void similarity_topk_finish_cpu(const SimilarityTopkParams& p);

}  // namespace mgcl

#ifdef MGCL_WITH_CUDA_DECLS
#include <cuda_runtime_api.h>
namespace mgcl {
/// CUDA: fold one score tile (rows = the state's rows) into best_v / best_i /
/// best_n, one block per row. Pointers are device memory.
void similarity_topk_select_cuda(const SimilarityTopkParams& p, cudaStream_t stream);
}  // namespace mgcl
#endif
