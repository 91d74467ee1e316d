// similarity_topk: the int8 dot-product tiles of the screening pass.
//
// Math. Query codes u = c_q + 64 lie in [1, 127] (0 in padding), key codes c
// in [-127, 127]; D = sum_j u_j c_j is an exact int32 (|D| <= 127^2 d < 2^31
// for d <= 65536), and the caller recovers sum_j c_q,j c_j = D - 64 sum_j c_j.
// Every path below computes the same integers, so the self-check against the
// scalar loop is an exact comparison.
//
// Layout. Queries come packed in groups of 16 (similarity_topk_pack_queries_cpu):
// for each 4 consecutive j, 16 lanes of 4 bytes, i.e. one zmm or two ymm. A key
// row's 4 bytes at the same j are broadcast to every lane, so one instruction
// multiplies 16 queries by one key over 4 values and the accumulator lanes are
// the 16 queries' dot products with that key: no horizontal sums, and the key
// codes stay in their plain row-major [N, d] form.
//
// AVX2: vpmaddubsw (u8 x s8 -> pairs summed into s16) then vpmaddwd with ones
// (-> s32) and vpaddd. The s16 pair sum is at most 2 * 127 * 127 = 32258 <
// 32767 (the reason query codes have 7 bits), so nothing saturates. Register
// tile: 16 queries x 4 keys = 8 ymm accumulators. AVX-VNNI / AVX512-VNNI:
// vpdpbusd sums 4 u8 x s8 products into s32 without intermediate rounding or
// saturation, one instruction per 4 values (the same 16 x 4 tile).
// These paths are compiled with target attributes and picked at run time
// (__builtin_cpu_supports); the ones this CPU lacks never run here, which is
// why every path must pass similarity_topk_selfcheck before it is used.
#include "similarity_topk_int8.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "mgcl/similarity_topk.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MGCL_X86 1
#include <immintrin.h>
#endif

namespace mgcl {
namespace {

inline int32_t word(const int8_t* p) {
  int32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

// The 4 code bytes of `row` at 4 * j4 (zero past d), as one little-endian word.
inline int32_t key_word(const int8_t* row, int64_t j4, int64_t d) {
  int32_t w = 0;
  const int64_t j = 4 * j4;
  if (j + 4 <= d) {
    std::memcpy(&w, row + j, 4);
  } else {
    uint8_t b[4] = {0, 0, 0, 0};
    for (int64_t t = 0; j + t < d; ++t) b[t] = uint8_t(row[j + t]);
    std::memcpy(&w, b, 4);
  }
  return w;
}

void tile_scalar(const uint8_t* qpack, int ng, const int8_t* codes, int64_t d, int64_t nk, int32_t* D,
                 int64_t ldd) {
  const int64_t d4 = (d + 3) / 4;
  for (int g = 0; g < ng; ++g) {
    const uint8_t* qg = qpack + int64_t(g) * d4 * 64;
    for (int64_t n = 0; n < nk; ++n) {
      const int8_t* row = codes + n * d;
      for (int lane = 0; lane < kGroup; ++lane) {
        int32_t acc = 0;
        for (int64_t j = 0; j < d; ++j) acc += int32_t(qg[((j / 4) * kGroup + lane) * 4 + j % 4]) * int32_t(row[j]);
        D[n * ldd + g * kGroup + lane] = acc;
      }
    }
  }
}

#ifdef MGCL_X86

// Every tile below runs the same loops: per group of 16 queries, per 4 keys
// (rows past nk repeat the last one; their sums are not stored), BODY over
// the whole 4-byte words of the rows, then once over the zero-padded tail
// word when d % 4 != 0.
#define MGCL_TILE_LOOPS(INIT, BODY, STORE)                                                   \
  const int64_t d4 = (d + 3) / 4, full = d / 4;                                               \
  for (int g = 0; g < ng; ++g) {                                                              \
    const uint8_t* qg = qpack + int64_t(g) * d4 * 64;                                          \
    for (int64_t n0 = 0; n0 < nk; n0 += 4) {                                                  \
      const int m = int(std::min<int64_t>(4, nk - n0));                                       \
      const int8_t* r0 = codes + n0 * d;                                                      \
      const int8_t* r1 = codes + (n0 + std::min(1, m - 1)) * d;                               \
      const int8_t* r2 = codes + (n0 + std::min(2, m - 1)) * d;                               \
      const int8_t* r3 = codes + (n0 + std::min(3, m - 1)) * d;                               \
      INIT                                                                                    \
      for (int64_t j4 = 0; j4 < full; ++j4) {                                                 \
        const uint8_t* qj = qg + j4 * 64;                                                     \
        BODY(word(r0 + 4 * j4), word(r1 + 4 * j4), word(r2 + 4 * j4), word(r3 + 4 * j4))     \
      }                                                                                       \
      if (full < d4) {                                                                        \
        const uint8_t* qj = qg + full * 64;                                                   \
        BODY(key_word(r0, full, d), key_word(r1, full, d), key_word(r2, full, d), key_word(r3, full, d)) \
      }                                                                                       \
      STORE                                                                                   \
    }                                                                                         \
  }

// The ymm tiles' step: 16 queries (two ymm of packed codes) by the four key
// words, with MGCL_STEP (defined by each tile) folding one word into (l, h).
#define MGCL_YMM_BODY(w0, w1, w2, w3)                                                  \
  const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qj));         \
  const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qj + 32));    \
  MGCL_STEP(w0, l0, h0) MGCL_STEP(w1, l1, h1) MGCL_STEP(w2, l2, h2) MGCL_STEP(w3, l3, h3)
#define MGCL_YMM_INIT __m256i l0 = _mm256_setzero_si256(), h0 = l0, l1 = l0, h1 = l0, l2 = l0, h2 = l0, l3 = l0, h3 = l0;
#define MGCL_YMM_STORE                                                      \
  const __m256i lo[4] = {l0, l1, l2, l3}, hi[4] = {h0, h1, h2, h3};         \
  for (int i = 0; i < m; ++i) {                                             \
    int32_t* out = D + (n0 + i) * ldd + g * kGroup;                         \
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), lo[i]);            \
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8), hi[i]);        \
  }

__attribute__((target("avx2"))) void tile_avx2(const uint8_t* qpack, int ng, const int8_t* codes, int64_t d,
                                               int64_t nk, int32_t* D, int64_t ldd) {
  const __m256i ones = _mm256_set1_epi16(1);
#define MGCL_STEP(w, l, h)                                                         \
  {                                                                                \
    const __m256i b = _mm256_set1_epi32(w);                                        \
    l = _mm256_add_epi32(l, _mm256_madd_epi16(_mm256_maddubs_epi16(q0, b), ones)); \
    h = _mm256_add_epi32(h, _mm256_madd_epi16(_mm256_maddubs_epi16(q1, b), ones)); \
  }
  MGCL_TILE_LOOPS(MGCL_YMM_INIT, MGCL_YMM_BODY, MGCL_YMM_STORE)
#undef MGCL_STEP
}

__attribute__((target("avx2,avxvnni"))) void tile_avxvnni(const uint8_t* qpack, int ng, const int8_t* codes,
                                                          int64_t d, int64_t nk, int32_t* D, int64_t ldd) {
#define MGCL_STEP(w, l, h)                          \
  {                                                 \
    const __m256i b = _mm256_set1_epi32(w);         \
    l = _mm256_dpbusd_avx_epi32(l, q0, b);          \
    h = _mm256_dpbusd_avx_epi32(h, q1, b);          \
  }
  MGCL_TILE_LOOPS(MGCL_YMM_INIT, MGCL_YMM_BODY, MGCL_YMM_STORE)
#undef MGCL_STEP
}

__attribute__((target("avx512f,avx512vnni"))) void tile_avx512vnni(const uint8_t* qpack, int ng,
                                                                   const int8_t* codes, int64_t d, int64_t nk,
                                                                   int32_t* D, int64_t ldd) {
#define MGCL_INIT __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
#define MGCL_BODY(w0, w1, w2, w3)                            \
  const __m512i q = _mm512_loadu_si512(qj);                  \
  a0 = _mm512_dpbusd_epi32(a0, q, _mm512_set1_epi32(w0));    \
  a1 = _mm512_dpbusd_epi32(a1, q, _mm512_set1_epi32(w1));    \
  a2 = _mm512_dpbusd_epi32(a2, q, _mm512_set1_epi32(w2));    \
  a3 = _mm512_dpbusd_epi32(a3, q, _mm512_set1_epi32(w3));
#define MGCL_STORE                                                                       \
  const __m512i acc[4] = {a0, a1, a2, a3};                                               \
  for (int i = 0; i < m; ++i) _mm512_storeu_si512(D + (n0 + i) * ldd + g * kGroup, acc[i]);
  MGCL_TILE_LOOPS(MGCL_INIT, MGCL_BODY, MGCL_STORE)
#undef MGCL_STORE
#undef MGCL_BODY
#undef MGCL_INIT
}

#undef MGCL_YMM_STORE
#undef MGCL_YMM_INIT
#undef MGCL_YMM_BODY
#undef MGCL_TILE_LOOPS
#endif  // MGCL_X86

// A small deterministic generator for the self-check (no global state).
struct Lcg {
  uint64_t s;
  uint32_t next() {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return uint32_t(s >> 33);
  }
  int range(int lo, int hi) { return lo + int(next() % uint32_t(hi - lo + 1)); }
};

}  // namespace

Int8Tile int8_tile(int path) {
  switch (path) {
    case kPathScalar: return tile_scalar;
#ifdef MGCL_X86
    case kPathAvx2: return tile_avx2;
    case kPathAvxVnni: return tile_avxvnni;
    case kPathAvx512Vnni: return tile_avx512vnni;
#endif
    default: return nullptr;
  }
}

int similarity_topk_cpu_paths() {
  int bits = 1 << kPathScalar;
#ifdef MGCL_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) bits |= 1 << kPathAvx2;
  if (avx2 && __builtin_cpu_supports("avxvnni")) bits |= 1 << kPathAvxVnni;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vnni")) bits |= 1 << kPathAvx512Vnni;
#endif
  return bits;
}

bool similarity_topk_selfcheck(int path) {
  const Int8Tile tile = int8_tile(path);
  if (tile == nullptr || !((similarity_topk_cpu_paths() >> path) & 1)) return false;
  Lcg rng{0x5eed5eedull + uint64_t(path)};
  const int64_t nq = 2 * kGroup + 5, nk = 13;
  const int ng = int((nq + kGroup - 1) / kGroup);
  for (int64_t d : {1, 3, 4, 5, 63, 64, 65, 131, 260}) {
    std::vector<int8_t> qc(size_t(nq * d)), kc(size_t(nk * d));
    for (auto& c : qc) c = int8_t(rng.range(-kQueryLevels, kQueryLevels));
    for (auto& c : kc) c = int8_t(rng.range(-kKeyLevels, kKeyLevels));
    // the extremes, where a saturating sum would show
    for (int64_t j = 0; j < d; ++j) {
      qc[size_t(j)] = kQueryLevels;
      qc[size_t(d + j)] = -kQueryLevels;
      kc[size_t(j)] = kKeyLevels;
      kc[size_t(d + j)] = -kKeyLevels;
    }
    const int64_t d4 = (d + 3) / 4;
    std::vector<uint8_t> packed(size_t(ng * d4 * 64));
    similarity_topk_pack_queries_cpu(qc.data(), nq, d, packed.data());
    const int64_t ldd = ng * kGroup;
    std::vector<int32_t> want(size_t(nk * ldd), -1), got(size_t(nk * ldd), -2);
    tile_scalar(packed.data(), ng, kc.data(), d, nk, want.data(), ldd);
    tile(packed.data(), ng, kc.data(), d, nk, got.data(), ldd);
    if (want != got) return false;
  }
  return true;
}

}  // namespace mgcl
