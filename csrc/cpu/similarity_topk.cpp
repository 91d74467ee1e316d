// similarity_topk selection on the CPU.
//
// Per query, over its scores in key order (blocks arrive in ascending index):
//   best = the k best values so far, sorted descending (distinct mode: each
//          value once, so best's last entry is the running k-th largest
//          DISTINCT value); thr = best's last value once best is full, else -inf.
//   A score x takes the slow path only if x >= thr (plain mode, full: x > thr,
//   because an equal score arriving later loses to the k earlier ones on index).
//   Slow path: insert x into best (binary search + shift, k floats at most;
//   distinct mode skips a value already present), raise thr, and append
//   (x, n) to the candidate buffer. A full buffer is compacted to the entries
//   >= thr; if none can go, the query overflows (Python collects it again).
// Why the buffer holds the answer: thr only rises and never exceeds the final
// tau, so every score >= tau was >= thr when it arrived and was appended, and
// compaction only drops scores < thr <= tau. In plain mode a skipped x == thr
// has k earlier entries >= thr ahead of it, so it is outside the top k.
// Finish: tau = best's last value; keep candidates >= tau, sort them (value
// desc, index asc); plain mode keeps the first k.
//
// Performance: the fast path is one vectorised "any score >= thr" over 64
// scores, so the typical score costs a load and a compare; only chunks
// holding a score >= thr are scanned one by one.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "mgcl/similarity_topk.h"

namespace mgcl {
namespace {

// The prefilter loop is compiled for AVX-512, AVX2 and the baseline; the
// loader picks one for the CPU it runs on (GCC/Clang on x86-64 only).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MGCL_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MGCL_SIMD_CLONES
#endif

constexpr int64_t kSkip = 64;
constexpr int64_t kParallelScores = int64_t(1) << 20;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Row {
  float* bv;
  int64_t bn;
  float* cv;
  int64_t* ci;
  int64_t cn;
  bool ovf;
  float thr;
  bool strict;
};

inline void refresh(Row& r, int64_t k, bool distinct) {
  const bool full = r.bn == k;
  r.thr = full ? r.bv[k - 1] : kNegInf;
  r.strict = full && !distinct;
}

// Insert x into the sorted best array (distinct mode: a value already there
// is left alone; the caller still records x as a candidate).
inline void insert_best(Row& r, float x, int64_t k, bool distinct) {
  float* first = r.bv;
  float* last = r.bv + r.bn;
  float* pos;
  if (distinct) {
    pos = std::lower_bound(first, last, x, std::greater<float>());  // first <= x
    if (pos != last && *pos == x) return;
  } else {
    pos = std::upper_bound(first, last, x, std::greater<float>());  // first < x
  }
  const int64_t p = pos - first;
  const int64_t keep = r.bn < k ? r.bn : k - 1;  // entries that survive the shift
  if (keep > p) std::memmove(first + p + 1, first + p, size_t(keep - p) * sizeof(float));
  first[p] = x;
  if (r.bn < k) ++r.bn;
  refresh(r, k, distinct);
}

inline void append(Row& r, float x, int64_t n, int64_t cap) {
  if (r.ovf) return;
  if (r.cn == cap) {
    int64_t w = 0;
    for (int64_t i = 0; i < r.cn; ++i)
      if (r.cv[i] >= r.thr) {
        r.cv[w] = r.cv[i];
        r.ci[w] = r.ci[i];
        ++w;
      }
    r.cn = w;
    if (r.cn == cap) {
      r.ovf = true;
      r.cn = 0;
      return;
    }
  }
  r.cv[r.cn] = x;
  r.ci[r.cn] = n;
  ++r.cn;
}

MGCL_SIMD_CLONES
void update_row(const SimilarityTopkParams& p, int64_t q, const float* s) {
  const int64_t k = p.best_cap;
  const bool distinct = p.distinct != 0;
  Row r;
  r.bv = p.best_v + q * k;
  r.bn = p.best_n[q];
  r.cv = p.cand_v + q * p.cand_cap;
  r.ci = p.cand_i + q * p.cand_cap;
  r.cn = p.cand_n[q];
  r.ovf = p.overflow[q] != 0;
  refresh(r, k, distinct);
  for (int64_t j0 = 0; j0 < p.cols; j0 += kSkip) {
    const int64_t j1 = std::min(p.cols, j0 + kSkip);
    // Prefilter: does any score here reach thr? (strict: x > thr, i.e.
    // x >= the next float up; a superset is fine, the scan re-checks.)
    const float lo = r.strict ? std::nextafter(r.thr, std::numeric_limits<float>::infinity()) : r.thr;
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t j = j0; j < j1; ++j) hit |= s[j] >= lo;  // NaN never hits
    if (!hit) continue;
    for (int64_t j = j0; j < j1; ++j) {
      const float x = s[j];
      if (!(x >= r.thr) || (r.strict && !(x > r.thr))) continue;  // NaN fails both
      insert_best(r, x, k, distinct);
      append(r, x, p.col0 + j, p.cand_cap);
    }
  }
  p.best_n[q] = r.bn;
  p.cand_n[q] = r.cn;
  p.overflow[q] = r.ovf ? 1 : 0;
}

void finish_row(const SimilarityTopkParams& p, int64_t q, std::vector<std::pair<float, int64_t>>& tmp) {
  const int64_t k = p.best_cap;
  const int64_t bn = p.best_n[q];
  if (bn == 0) {  // no non-NaN score at all
    p.tau[q] = std::numeric_limits<float>::quiet_NaN();
    p.count[q] = 0;
    p.cand_n[q] = 0;
    return;
  }
  const float tau = p.best_v[q * k + bn - 1];
  p.tau[q] = tau;
  if (p.overflow[q]) {
    p.count[q] = -1;
    return;
  }
  float* cv = p.cand_v + q * p.cand_cap;
  int64_t* ci = p.cand_i + q * p.cand_cap;
  tmp.clear();
  for (int64_t i = 0; i < p.cand_n[q]; ++i)
    if (cv[i] >= tau) tmp.emplace_back(cv[i], ci[i]);
  std::sort(tmp.begin(), tmp.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  int64_t n = int64_t(tmp.size());
  if (!p.distinct) n = std::min(n, p.k);
  for (int64_t i = 0; i < n; ++i) {
    cv[i] = tmp[i].first;
    ci[i] = tmp[i].second;
  }
  p.cand_n[q] = n;
  p.count[q] = n;
}

void check_state(const SimilarityTopkParams& p, const char* what) {
  if (!p.best_v || !p.best_n || !p.cand_v || !p.cand_i || !p.cand_n || !p.overflow)
    throw Error(std::string("similarity_topk ") + what + ": a state pointer is null");
  if (p.best_cap < 1) throw Error(std::string("similarity_topk ") + what + ": best_cap must be >= 1");
  if (p.cand_cap <= p.best_cap)
    throw Error(std::string("similarity_topk ") + what + ": cand_cap must exceed best_cap");
}

}  // namespace

void similarity_topk_update_cpu(const SimilarityTopkParams& p) {
  check_state(p, "update");
  if (p.rows > 0 && p.cols > 0 && p.scores == nullptr) throw Error("similarity_topk update: scores is null");
  if (p.ld < p.cols) throw Error("similarity_topk update: ld < cols");
  // Small blocks run on the calling thread: waking the team costs more.
#pragma omp parallel for schedule(dynamic, 8) if (p.rows * p.cols >= kParallelScores)
  for (int64_t r = 0; r < p.rows; ++r) update_row(p, p.row0 + r, p.scores + r * p.ld);
}

void similarity_topk_finish_cpu(const SimilarityTopkParams& p) {
  check_state(p, "finish");
  if (!p.tau || !p.count) throw Error("similarity_topk finish: tau or count is null");
  if (p.k < 1 || p.k > p.best_cap) throw Error("similarity_topk finish: k must be in [1, best_cap]");
#pragma omp parallel if (p.n_queries >= 64)
  {
    std::vector<std::pair<float, int64_t>> tmp;
#pragma omp for schedule(dynamic, 16)
    for (int64_t q = 0; q < p.n_queries; ++q) finish_row(p, q, tmp);
  }
}

}  // namespace mgcl
