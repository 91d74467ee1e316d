// similarity_topk on the CPU: screen, score exactly, select.
//
// ---- The bound (why no entry of the exact answer is ever dropped) ----------------------------
// Per pair (x, k), x a query row and k a key row of d values, the score is the
// definition s = fp32(fp64 sum of x_j k_j in ascending j) (mgcl/similarity_topk.h).
// Each row r carries codes c_r and a scale a_r with r ~ a_r c_r = r^, and
// float32 upper bounds E_r >= ||r - r^|| and N_r >= ||r^|| (2-norms; quantise
// below rounds both up). Write A_x = N_x + E_x >= ||x|| and T_k = N_k + E_k >= ||k||.
//  1. x.k - x^.k^ = x.(k - k^) + (x - x^).k^, so by Cauchy-Schwarz
//         |x.k - x^.k^| <= A_x E_k + E_x N_k.
//  2. x^.k^ = a_x a_k D exactly, D = sum_j c_x,j c_k,j an exact int32 (the int8
//     tiles), computed here as fl(fl(D) * fl(a_k a_x)).
//  3. The definition's own error: the fp64 sum of the exact products is off by
//     at most (d - 1) 2^-53 sum_j |x_j k_j| <= d 2^-53 ||x|| ||k||, and the final
//     rounding to fp32 adds 2^-24 of the result (or 2^-150 absolute when it is
//     subnormal), so |s - x.k| <= 2^-23 A_x T_k + 2^-150 for d <= 2^28.
//  4. The float32 evaluation of ub = fl(s^) + fl(B), with B = A_x E_k + E_x N_k +
//     eta A_x T_k + 2^-126, makes at most ten roundings, each at most 2^-24 of a
//     quantity bounded by A_x T_k (|x^.k^| <= A_x T_k as well), or 2^-150
//     absolute when subnormal: together under 2^-19 A_x T_k + 10 * 2^-150.
//  With eta = 2^-16 > 2^-23 + 2^-19, 1-4 give s <= ub for every pair: if s can
//  reach a threshold t (s >= t), then ub >= t. Special rows (non-finite values,
//  max|r_j| outside [2^-50, 2^50]) have E = inf, so ub is inf or NaN, and the
//  test is written !(ub < t), which NaN passes: they are always scored. The
//  limits on max|r_j| keep every product above out of fp32 overflow and away
//  from the subnormal range except through the absolute terms.
//  The BLAS path replaces 1-2 by the caller's fp32 scores and their bound
//  |approx - x.k| <= approx_rel ||x|| ||k|| (see native.py), so
//  ub = approx + (approx_rel + eta) A_x T_k + 2^-126.
//
// ---- The threshold (why the running one is safe) ----------------------------------------------
// Per query the state holds best = the k largest exact scores seen (each value
// once when distinct), thr = best's last once full (else -inf), raised to the
// query's floor. best is a subset of all scores, so its k-th largest (distinct)
// value never exceeds the final tau, and thr only rises. Every pair with
// s >= tau therefore has ub >= s >= tau >= thr when screened, is scored exactly
// and appended to the candidates; compaction drops only entries < thr <= tau.
// The candidates can arrive in any key order: finish sorts them (value desc,
// index asc) and the plain mode keeps its first k, which is why the plain mode
// appends x >= thr (an equal score with a lower index may still come).
//
// ---- The order of exact scoring -----------------------------------------------------------------
// Pairs passing the screen wait in a per-query list. It is drained when long
// (or at the end of the call), best-first: sorted by ub descending and scored
// eight at a time (eight independent fp64 FMA chains hide the latency) while
// ub >= thr, so the first keys do not all get scored before thr has risen.
//
// Performance: the int8 tiles do the O(Q N d) work; the screen is a few
// float ops per pair (vectorised over 64 queries), exact scores cost O(d) per
// candidate. OpenMP runs over blocks of 64 query rows.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "mgcl/similarity_topk.h"
#include "similarity_topk_int8.h"

namespace mgcl {
namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MGCL_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define MGCL_X86 1
#include <immintrin.h>
#else
#define MGCL_SIMD_CLONES
#endif

constexpr int64_t kQB = 64;   // query rows per work unit (4 packed groups)
constexpr int64_t kKB = 256;  // key rows per int8 tile call
constexpr int kBatch = 8;        // pair scores computed together (scalar chains)
constexpr int kQueryBatch = 16;  // exact scores of one query computed together
constexpr float kEta = 1.52587890625e-05f;  // 2^-16
constexpr float kAbs = FLT_MIN;              // 2^-126
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float round_up(double v) { return std::nextafter(float(v), std::numeric_limits<float>::infinity()); }

// Round to the nearest integer, ties to even, for |t| < 2^22 (larger t, NaN
// never reach it): adding 1.5 * 2^23 leaves an ulp of 1, so the hardware's
// round-to-nearest-even does it, and the subtraction is exact.
inline float round_even(float t) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  return (t + magic) - magic;
}

// ---- rows as float32 ----------------------------------------------------------------------------

#ifdef MGCL_X86
__attribute__((target("avx,f16c"))) void half_row_f16c(const uint16_t* src, int64_t d, float* out) {
  int64_t j = 0;
  for (; j + 8 <= d; j += 8)
    _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  for (; j < d; ++j) out[j] = to_float(half_t{src[j]});
}
bool has_f16c() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("f16c"));
  return yes;
}
#endif

// Row r of a [*, d] matrix (row stride ld) as float32: the row itself for
// float32, else converted into `scratch` (exact: fp16 and bf16 are subsets).
const float* row_f32(const void* base, int dtype, int64_t ld, int64_t r, int64_t d, float* scratch) {
  switch (dtype) {
    case kFloat32: return static_cast<const float*>(base) + r * ld;
    case kFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + r * ld;
#ifdef MGCL_X86
      if (has_f16c()) {
        half_row_f16c(src, d, scratch);
        return scratch;
      }
#endif
      for (int64_t j = 0; j < d; ++j) scratch[j] = to_float(half_t{src[j]});
      return scratch;
    }
    case kBFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + r * ld;
      for (int64_t j = 0; j < d; ++j) scratch[j] = bits_to_float(uint32_t(src[j]) << 16);
      return scratch;
    }
    default: throw Error(std::string("similarity_topk: unsupported dtype ") + dtype_name(dtype));
  }
}

// The definition for m <= kBatch pairs (xs[i], ks[i]): fp64 products (exact),
// summed in ascending j from +0.0, rounded once to fp32. Unused slots repeat
// slot 0 and are not written. kBatch independent chains hide the FMA latency.
void exact_scores(const float* const* xs, const float* const* ks, int m, int64_t d, float* out) {
  const float* x[kBatch];
  const float* k[kBatch];
  for (int i = 0; i < kBatch; ++i) {
    x[i] = xs[i < m ? i : 0];
    k[i] = ks[i < m ? i : 0];
  }
  double acc[kBatch];
  for (int i = 0; i < kBatch; ++i) acc[i] = 0.0;
  for (int64_t j = 0; j < d; ++j)
    for (int i = 0; i < kBatch; ++i) acc[i] += double(x[i][j]) * double(k[i][j]);
  for (int i = 0; i < m; ++i) out[i] = float(acc[i]);
}

#ifdef MGCL_X86
// The same sums for one query row (xd: its values as doubles) against m <=
// 16 key rows, four keys per ymm accumulator. Each 8 x 8 block of key values
// is transposed so that lane i of column j holds k_i[j]; the accumulators
// then advance j by j exactly as the scalar loop does (vfmadd231pd rounds
// acc + x_j k_i[j] once, and the product is exact), so the bits agree.
__attribute__((target("avx2,fma"))) void exact_scores_avx2(const double* xd, const float* const* ks, int m,
                                                          int64_t d, float* out) {
  const float* k[16];
  for (int i = 0; i < 16; ++i) k[i] = ks[i < m ? i : 0];
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    for (int h = 0; h < 2; ++h) {
      const float* const* r = k + 8 * h;
      __m256 a0 = _mm256_loadu_ps(r[0] + j), a1 = _mm256_loadu_ps(r[1] + j), a2 = _mm256_loadu_ps(r[2] + j),
             a3 = _mm256_loadu_ps(r[3] + j), a4 = _mm256_loadu_ps(r[4] + j), a5 = _mm256_loadu_ps(r[5] + j),
             a6 = _mm256_loadu_ps(r[6] + j), a7 = _mm256_loadu_ps(r[7] + j);
      const __m256 b0 = _mm256_unpacklo_ps(a0, a1), b1 = _mm256_unpackhi_ps(a0, a1);
      const __m256 b2 = _mm256_unpacklo_ps(a2, a3), b3 = _mm256_unpackhi_ps(a2, a3);
      const __m256 b4 = _mm256_unpacklo_ps(a4, a5), b5 = _mm256_unpackhi_ps(a4, a5);
      const __m256 b6 = _mm256_unpacklo_ps(a6, a7), b7 = _mm256_unpackhi_ps(a6, a7);
      const __m256 c0 = _mm256_shuffle_ps(b0, b2, 0x44), c1 = _mm256_shuffle_ps(b0, b2, 0xEE);
      const __m256 c2 = _mm256_shuffle_ps(b1, b3, 0x44), c3 = _mm256_shuffle_ps(b1, b3, 0xEE);
      const __m256 c4 = _mm256_shuffle_ps(b4, b6, 0x44), c5 = _mm256_shuffle_ps(b4, b6, 0xEE);
      const __m256 c6 = _mm256_shuffle_ps(b5, b7, 0x44), c7 = _mm256_shuffle_ps(b5, b7, 0xEE);
      // column t (j + t) of rows 0..7: lanes 0-3 from c_t's low half, 4-7 from c_{t+4}'s
      const __m256 col[8] = {_mm256_permute2f128_ps(c0, c4, 0x20), _mm256_permute2f128_ps(c1, c5, 0x20),
                             _mm256_permute2f128_ps(c2, c6, 0x20), _mm256_permute2f128_ps(c3, c7, 0x20),
                             _mm256_permute2f128_ps(c0, c4, 0x31), _mm256_permute2f128_ps(c1, c5, 0x31),
                             _mm256_permute2f128_ps(c2, c6, 0x31), _mm256_permute2f128_ps(c3, c7, 0x31)};
      __m256d lo = acc[2 * h], hi = acc[2 * h + 1];
      for (int t = 0; t < 8; ++t) {
        const __m256d xj = _mm256_broadcast_sd(xd + j + t);
        lo = _mm256_fmadd_pd(xj, _mm256_cvtps_pd(_mm256_castps256_ps128(col[t])), lo);
        hi = _mm256_fmadd_pd(xj, _mm256_cvtps_pd(_mm256_extractf128_ps(col[t], 1)), hi);
      }
      acc[2 * h] = lo;
      acc[2 * h + 1] = hi;
    }
  }
  alignas(32) double a[16];
  for (int v = 0; v < 4; ++v) _mm256_store_pd(a + 4 * v, acc[v]);
  for (; j < d; ++j)
    for (int i = 0; i < 16; ++i) a[i] = std::fma(xd[j], double(k[i][j]), a[i]);
  for (int i = 0; i < m; ++i) out[i] = float(a[i]);
}

bool has_avx2_fma() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
  return yes;
}
#endif

// m <= kQueryBatch exact scores of one query row x (xd: as doubles) against ks.
void exact_one_query(const float* x, const double* xd, const float* const* ks, int m, int64_t d, float* out) {
#ifdef MGCL_X86
  if (has_avx2_fma()) {
    exact_scores_avx2(xd, ks, m, d, out);
    return;
  }
#endif
  (void)xd;
  const float* xs[kBatch];
  for (int i = 0; i < kBatch; ++i) xs[i] = x;
  for (int a = 0; a < m; a += kBatch) exact_scores(xs, ks + a, std::min(kBatch, m - a), d, out + a);
}

// ---- the per-query state ------------------------------------------------------------------------

struct Row {
  float* bv;
  int64_t bn;
  float* cv;
  int64_t* ci;
  int64_t cn;
  bool ovf;
  float floor;
  float thr;
  int64_t rescored;
};

struct State {
  int64_t k, cap;
  bool distinct;
  const SimilarityTopkScreenParams* p;

  Row load(int64_t q) const {
    const SimilarityTopkState& s = p->state;
    Row r;
    r.bv = s.best_v + q * k;
    r.bn = s.best_n[q];
    r.cv = s.cand_v + q * cap;
    r.ci = s.cand_i + q * cap;
    r.cn = s.cand_n[q];
    r.ovf = s.overflow[q] != 0;
    r.floor = p->floor[q];
    r.rescored = 0;
    refresh(r);
    return r;
  }
  void store(int64_t q, const Row& r) const {
    const SimilarityTopkState& s = p->state;
    s.best_n[q] = r.bn;
    s.cand_n[q] = r.cn;
    s.overflow[q] = r.ovf ? 1 : 0;
    p->rescored[q] += r.rescored;
  }
  void refresh(Row& r) const {
    const float t = r.bn == k ? r.bv[k - 1] : kNegInf;
    r.thr = std::max(t, r.floor);  // floor is never NaN (checked by Python)
  }
  // Fold the exact score x of key n into the row (see the threshold note atop).
  void offer(Row& r, float x, int64_t n) const {
    if (!(x >= r.thr)) return;  // NaN never counts
    insert_best(r, x);
    append(r, x, n);
  }
  void insert_best(Row& r, float x) const {
    float* first = r.bv;
    float* last = r.bv + r.bn;
    float* pos;
    if (distinct) {
      pos = std::lower_bound(first, last, x, std::greater<float>());  // first entry <= x
      if (pos != last && *pos == x) return;
    } else {
      pos = std::upper_bound(first, last, x, std::greater<float>());  // first entry < x
    }
    const int64_t at = pos - first;
    if (at >= k) return;  // equal to the k-th of a full list: best unchanged
    const int64_t keep = r.bn < k ? r.bn : k - 1;  // entries that survive the shift
    if (keep > at) std::memmove(first + at + 1, first + at, size_t(keep - at) * sizeof(float));
    first[at] = x;
    if (r.bn < k) ++r.bn;
    refresh(r);
  }
  void append(Row& r, float x, int64_t n) const {
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
};

struct Pending {
  float ub;
  int64_t n;  // key row within the call's keys
};

// Per-thread scratch for one work unit.
struct Worker {
  std::vector<int32_t> D;            // [kKB][kQB] int8 tile output
  std::vector<Pending> pend[kQB];    // screened pairs waiting for exact scores
  std::vector<float> xbuf, kbuf;     // one query row, kQueryBatch key rows (float32)
  std::vector<double> xd;            // the query row as doubles
  float thr[kQB], bq[kQB], eq[kQB], aq[kQB], etaq[kQB], ub[kQB];
  uint8_t hit[kQB];
};

// Score the pending pairs of one query exactly, best-first, while they can
// still reach its threshold (see the note atop): a max-heap on ub, popped in
// batches while its top is >= thr (NaN ub first: it compares as never below).
void drain(const SimilarityTopkScreenParams& p, const State& st, Worker& w, int64_t q, Row& r,
           std::vector<Pending>& pend) {
  if (pend.empty()) return;
  const float* x = row_f32(p.queries, p.q_dtype, p.q_ld, q, p.d, w.xbuf.data());
  for (int64_t j = 0; j < p.d; ++j) w.xd[size_t(j)] = double(x[j]);
  const auto lower = [](const Pending& a, const Pending& b) {
    return a.ub < b.ub || (a.ub == b.ub && a.n > b.n) || (std::isnan(b.ub) && !std::isnan(a.ub));
  };
  std::make_heap(pend.begin(), pend.end(), lower);
  auto end = pend.end();
  const float* ks[kQueryBatch];
  int64_t ns[kQueryBatch];
  float s[kQueryBatch];
  while (end != pend.begin()) {
    int m = 0;
    while (end != pend.begin() && m < kQueryBatch && !(pend.front().ub < r.thr)) {
      std::pop_heap(pend.begin(), end, lower);
      --end;
      ns[m] = end->n;
      ks[m] = row_f32(p.keys, p.k_dtype, p.k_ld, ns[m], p.d, w.kbuf.data() + m * p.d);
      ++m;
    }
    if (m == 0) break;
    exact_one_query(x, w.xd.data(), ks, m, p.d, s);
    r.rescored += m;
    for (int t = 0; t < m; ++t) st.offer(r, s[t], p.col0 + ns[t]);
  }
  pend.clear();
}

// int8 screen of one key block against rows [r0, r0 + nr) (D holds the tile).
MGCL_SIMD_CLONES
void screen_int8_block(const SimilarityTopkScreenParams& p, Worker& w, int64_t nr, int64_t n0, int64_t nk) {
  for (int64_t n = 0; n < nk; ++n) {
    const int64_t kn = n0 + n;
    const int32_t off = kQueryOffset * p.k_sum[kn];
    const float ak = p.k_scale[kn], ek = p.k_err[kn], nk_ = p.k_norm[kn], tk = nk_ + ek;
    const int32_t* Dn = w.D.data() + n * kQB;
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t q = 0; q < nr; ++q) {
      const float s = float(Dn[q] - off) * (ak * w.bq[q]);
      const float ub = s + ((w.aq[q] * ek + w.eq[q] * nk_) + (w.etaq[q] * tk + kAbs));
      w.ub[q] = ub;
      const int h = !(ub < w.thr[q]);
      w.hit[q] = uint8_t(h);
      any |= h;
    }
    if (any)
      for (int64_t q = 0; q < nr; ++q)
        if (w.hit[q]) w.pend[q].push_back({w.ub[q], kn});
  }
}

// BLAS screen of row q against all keys of the call: ub from the caller's scores.
MGCL_SIMD_CLONES
void screen_blas_row(const SimilarityTopkScreenParams& p, const float* approx, float aq, float thr,
                     std::vector<Pending>& pend) {
  const float c = (p.approx_rel + kEta) * aq;
  constexpr int64_t kChunk = 64;
  float ub[kChunk];
  for (int64_t n0 = 0; n0 < p.n_keys; n0 += kChunk) {
    const int64_t m = std::min(kChunk, p.n_keys - n0);
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t t = 0; t < m; ++t) {
      const int64_t n = n0 + t;
      const float u = approx[n] + (c * (p.k_norm[n] + p.k_err[n]) + kAbs);
      ub[t] = u;
      any |= !(u < thr);
    }
    if (any)
      for (int64_t t = 0; t < m; ++t)
        if (!(ub[t] < thr)) pend.push_back({ub[t], n0 + t});
  }
}

void check_state(const SimilarityTopkState& s, const char* what) {
  if (!s.best_v || !s.best_n || !s.cand_v || !s.cand_i || !s.cand_n || !s.overflow)
    throw Error(std::string("similarity_topk ") + what + ": a state pointer is null");
  if (s.k < 1 || s.cand_cap <= s.k) throw Error(std::string("similarity_topk ") + what + ": need k >= 1 and cand_cap > k");
}

void check_screen(const SimilarityTopkScreenParams& p) {
  check_state(p.state, "screen");
  if (!p.floor || !p.rescored) throw Error("similarity_topk screen: floor or rescored is null");
  if (p.row0 < 0 || p.rows < 0 || p.row0 + p.rows > p.state.n_queries)
    throw Error("similarity_topk screen: bad row range");
  if (p.d < 1) throw Error("similarity_topk screen: d must be >= 1");
  if (p.rows == 0 || p.n_keys == 0) return;
  if (!p.queries || !p.keys || !p.q_scale || !p.q_err || !p.q_norm || !p.k_err || !p.k_norm)
    throw Error("similarity_topk screen: an input pointer is null");
  if (p.path == kPathBlas) {
    if (!p.approx || p.approx_ld < p.n_keys) throw Error("similarity_topk screen: BLAS path needs approx scores");
    if (!(p.approx_rel >= 0.f)) throw Error("similarity_topk screen: approx_rel must be >= 0");
    return;
  }
  if (int8_tile(p.path) == nullptr || !((similarity_topk_cpu_paths() >> p.path) & 1))
    throw Error("similarity_topk screen: path " + std::to_string(p.path) + " does not run on this CPU");
  if (!p.q_packed || !p.k_codes || !p.k_scale || !p.k_sum) throw Error("similarity_topk screen: codes are null");
  if (p.d > kInt8MaxDim) throw Error("similarity_topk screen: d too large for the int8 path");
  if (p.row0 % kGroup) throw Error("similarity_topk screen: row0 must be a multiple of 16 on the int8 path");
}

}  // namespace

// ---- quantisation -------------------------------------------------------------------------------

void similarity_topk_quantize_cpu(const SimilarityTopkQuantizeParams& p) {
  if (p.rows == 0) return;
  if (!p.src || !p.codes || !p.scale || !p.err || !p.norm || !p.sum) throw Error("similarity_topk quantize: null");
  if (p.d < 1 || p.ld < p.d || p.levels < 1 || p.levels > 127) throw Error("similarity_topk quantize: bad sizes");
  const float hi = 1125899906842624.0f;       // 2^50
  const float lo = 8.8817841970012523e-16f;   // 2^-50
#pragma omp parallel if (p.rows * p.d >= (int64_t(1) << 18))
  {
    std::vector<float> buf(size_t(p.d));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < p.rows; ++r) {
      const float* x = row_f32(p.src, p.dtype, p.ld, r, p.d, buf.data());
      int8_t* c = p.codes + r * p.d;
      float m = 0.f;
      bool finite = true;
      for (int64_t j = 0; j < p.d; ++j) {
        finite = finite && std::isfinite(x[j]);
        m = std::max(m, std::fabs(x[j]));
      }
      if (!finite || m > hi || (m > 0.f && m < lo)) {
        std::memset(c, 0, size_t(p.d));
        p.scale[r] = 0.f;
        p.norm[r] = 0.f;
        p.sum[r] = 0;
        p.err[r] = std::numeric_limits<float>::infinity();
        continue;
      }
      if (m == 0.f) {
        std::memset(c, 0, size_t(p.d));
        p.scale[r] = p.err[r] = p.norm[r] = 0.f;
        p.sum[r] = 0;
        continue;
      }
      const float a = m / float(p.levels);
      const float L = float(p.levels);
      int32_t sum = 0;
      double e2 = 0.0, n2 = 0.0;  // fixed order: the same bits everywhere
      for (int64_t j = 0; j < p.d; ++j) {
        const float cj = std::min(L, std::max(-L, round_even(x[j] / a)));
        c[j] = int8_t(cj);
        sum += int32_t(cj);
        const double ac = double(a) * double(cj);  // exact
        const double e = double(x[j]) - ac;
        e2 += e * e;
        n2 += ac * ac;
      }
      p.scale[r] = a;
      p.sum[r] = sum;
      p.err[r] = round_up(std::sqrt(e2));
      p.norm[r] = round_up(std::sqrt(n2));
    }
  }
}

void similarity_topk_pack_queries_cpu(const int8_t* codes, int64_t rows, int64_t d, uint8_t* packed) {
  const int64_t d4 = (d + 3) / 4;
  const int64_t ng = (rows + kGroup - 1) / kGroup;
  std::memset(packed, 0, size_t(ng * d4 * 64));
  for (int64_t q = 0; q < rows; ++q) {
    const int64_t g = q / kGroup, lane = q % kGroup;
    for (int64_t j = 0; j < d; ++j)
      packed[((g * d4 + j / 4) * kGroup + lane) * 4 + j % 4] = uint8_t(int(codes[q * d + j]) + kQueryOffset);
  }
}

// ---- screening ----------------------------------------------------------------------------------

void similarity_topk_screen_cpu(const SimilarityTopkScreenParams& p) {
  check_screen(p);
  if (p.rows == 0 || p.n_keys == 0) return;
  const State st{p.state.k, p.state.cand_cap, p.state.distinct != 0, &p};
  const bool blas = p.path == kPathBlas;
  const Int8Tile tile = blas ? nullptr : int8_tile(p.path);
  const int64_t d4 = (p.d + 3) / 4;
  const int64_t units = (p.rows + kQB - 1) / kQB;
  const size_t flush = size_t(512 + 2 * p.state.k);
#pragma omp parallel if (units > 1)
  {
    Worker w;
    w.xbuf.resize(size_t(p.d));
    w.kbuf.resize(size_t(kQueryBatch * p.d));
    w.xd.resize(size_t(p.d));
    if (!blas) w.D.resize(size_t(kKB * kQB));
    std::vector<Row> rows(kQB);
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t r0 = p.row0 + u * kQB;
      const int64_t nr = std::min(kQB, p.row0 + p.rows - r0);
      for (int64_t q = 0; q < nr; ++q) {
        rows[q] = st.load(r0 + q);
        w.thr[q] = rows[q].thr;
        const float e = p.q_err[r0 + q];
        w.bq[q] = p.q_scale[r0 + q];
        w.eq[q] = e;
        w.aq[q] = round_up(double(p.q_norm[r0 + q]) + double(e));
        w.etaq[q] = kEta * w.aq[q];
      }
      if (blas) {
        for (int64_t q = 0; q < nr; ++q) {
          screen_blas_row(p, p.approx + (r0 - p.row0 + q) * p.approx_ld, w.aq[q], w.thr[q], w.pend[q]);
          drain(p, st, w, r0 + q, rows[q], w.pend[q]);
        }
      } else {
        const int ng = int((nr + kGroup - 1) / kGroup);
        const uint8_t* qp = p.q_packed + (r0 / kGroup) * d4 * 64;
        for (int64_t n0 = 0; n0 < p.n_keys; n0 += kKB) {
          const int64_t nk = std::min(kKB, p.n_keys - n0);
          tile(qp, ng, p.k_codes + n0 * p.d, p.d, nk, w.D.data(), kQB);
          screen_int8_block(p, w, nr, n0, nk);
          for (int64_t q = 0; q < nr; ++q)
            if (w.pend[q].size() >= flush) {
              drain(p, st, w, r0 + q, rows[q], w.pend[q]);
              w.thr[q] = rows[q].thr;
            }
        }
        for (int64_t q = 0; q < nr; ++q) drain(p, st, w, r0 + q, rows[q], w.pend[q]);
      }
      for (int64_t q = 0; q < nr; ++q) st.store(r0 + q, rows[q]);
    }
  }
}

// ---- finish ------------------------------------------------------------------------------------

void similarity_topk_finish_cpu(const SimilarityTopkFinishParams& p) {
  const SimilarityTopkState& s = p.state;
  check_state(s, "finish");
  if (!p.tau || !p.count) throw Error("similarity_topk finish: tau or count is null");
#pragma omp parallel if (s.n_queries >= 64)
  {
    std::vector<std::pair<float, int64_t>> tmp;
#pragma omp for schedule(dynamic, 16)
    for (int64_t q = 0; q < s.n_queries; ++q) {
      const int64_t bn = s.best_n[q];
      if (bn == 0) {  // no non-NaN score at all
        p.tau[q] = std::numeric_limits<float>::quiet_NaN();
        p.count[q] = 0;
        s.cand_n[q] = 0;
        continue;
      }
      const float tau = s.best_v[q * s.k + bn - 1];
      p.tau[q] = tau;
      if (s.overflow[q]) {
        p.count[q] = -1;
        continue;
      }
      float* cv = s.cand_v + q * s.cand_cap;
      int64_t* ci = s.cand_i + q * s.cand_cap;
      tmp.clear();
      for (int64_t i = 0; i < s.cand_n[q]; ++i)
        if (cv[i] >= tau) tmp.emplace_back(cv[i], ci[i]);
      std::sort(tmp.begin(), tmp.end(), [](const auto& a, const auto& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      });
      int64_t n = int64_t(tmp.size());
      if (!s.distinct) n = std::min(n, s.k);
      for (int64_t i = 0; i < n; ++i) {
        cv[i] = tmp[size_t(i)].first;
        ci[i] = tmp[size_t(i)].second;
      }
      s.cand_n[q] = n;
      p.count[q] = n;
    }
  }
}

// ---- exact pair scores --------------------------------------------------------------------------

void similarity_topk_pair_scores_cpu(const SimilarityTopkPairParams& p) {
  if (p.n_pairs == 0) return;
  if (!p.x || !p.k || !p.out) throw Error("similarity_topk pair_scores: a pointer is null");
  if (p.d < 0 || p.x_ld < p.d || p.k_ld < p.d) throw Error("similarity_topk pair_scores: bad sizes");
  const int64_t batches = (p.n_pairs + kBatch - 1) / kBatch;
#pragma omp parallel if (p.n_pairs * p.d >= (int64_t(1) << 16))
  {
    std::vector<float> buf(size_t(2 * kBatch * std::max<int64_t>(p.d, 1)));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batches; ++b) {
      const int64_t i0 = b * kBatch;
      const int m = int(std::min<int64_t>(kBatch, p.n_pairs - i0));
      const float* xs[kBatch];
      const float* ks[kBatch];
      for (int t = 0; t < m; ++t) {
        xs[t] = row_f32(p.x, p.x_dtype, p.x_ld, i0 + t, p.d, buf.data() + (2 * t) * p.d);
        ks[t] = row_f32(p.k, p.k_dtype, p.k_ld, i0 + t, p.d, buf.data() + (2 * t + 1) * p.d);
      }
      exact_scores(xs, ks, m, p.d, p.out + i0);
    }
  }
}

}  // namespace mgcl
