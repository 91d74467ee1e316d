// The VNNI int8 tiles of csrc/cpu/similarity_topk_int8.cpp on a CPU without
// VNNI: vpdpbusd is emulated (its documented semantics: per 32-bit lane, the
// four u8 bytes of a times the four s8 bytes of b, summed into the lane
// exactly), everything else runs as written, and every tile is compared with
// the scalar tile and the signed dot product over many shapes (d, queries and
// keys around every tail). tests/test_similarity_topk_int8.py compiles this
// against a copy of the source whose target attributes ask for AVX2 only.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

struct E512 {
  int32_t v[16];
};
static inline E512 e_load512(const void* p) {
  E512 r;
  std::memcpy(r.v, p, 64);
  return r;
}
static inline void e_store512(void* p, E512 a) { std::memcpy(p, a.v, 64); }
static inline E512 e_zero512() { return E512{}; }
static inline E512 e_set1_512(int32_t w) {
  E512 r;
  for (int i = 0; i < 16; ++i) r.v[i] = w;
  return r;
}
static inline int32_t dp4(int32_t acc, int32_t a, int32_t b) {
  uint8_t ua[4];
  int8_t sb[4];
  std::memcpy(ua, &a, 4);
  std::memcpy(sb, &b, 4);
  for (int t = 0; t < 4; ++t) acc += int32_t(ua[t]) * int32_t(sb[t]);
  return acc;
}
static inline E512 e_dpbusd512(E512 s, E512 a, E512 b) {
  for (int i = 0; i < 16; ++i) s.v[i] = dp4(s.v[i], a.v[i], b.v[i]);
  return s;
}
static inline __m256i e_dpbusd256(__m256i s, __m256i a, __m256i b) {
  int32_t S[8], A[8], B[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(S), s);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(A), a);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(B), b);
  for (int i = 0; i < 8; ++i) S[i] = dp4(S[i], A[i], B[i]);
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(S));
}
#define __m512i E512
#define _mm512_loadu_si512 e_load512
#define _mm512_storeu_si512 e_store512
#define _mm512_setzero_si512 e_zero512
#define _mm512_set1_epi32 e_set1_512
#define _mm512_dpbusd_epi32 e_dpbusd512
#define _mm256_dpbusd_avx_epi32 e_dpbusd256
#include MGCL_INT8_SOURCE

namespace mgcl {
// the packing, as in csrc/cpu/similarity_topk.cpp (declared in the header)
void similarity_topk_pack_queries_cpu(const int8_t* codes, int64_t rows, int64_t d, uint8_t* packed) {
  const int64_t d4 = (d + 3) / 4;
  const int64_t ng = (rows + kGroup - 1) / kGroup;
  std::memset(packed, 0, size_t(ng * d4 * 64));
  for (int64_t q = 0; q < rows; ++q)
    for (int64_t j = 0; j < d; ++j)
      packed[(((q / kGroup) * d4 + j / 4) * kGroup + q % kGroup) * 4 + j % 4] =
          uint8_t(int(codes[q * d + j]) + kQueryOffset);
}
}  // namespace mgcl

int main() {
  using namespace mgcl;
  uint64_t s = 1;
  auto rnd = [&](int lo, int hi) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return lo + int((s >> 33) % uint64_t(hi - lo + 1));
  };
  int bad = 0, cases = 0;
  for (int path : {kPathAvx2, kPathAvxVnni, kPathAvx512Vnni}) {
    const Int8Tile f = int8_tile(path);
    for (int64_t d : {1, 2, 3, 4, 5, 7, 8, 63, 64, 65, 100, 385})
      for (int64_t nq : {1, 15, 16, 17, 33})
        for (int64_t nk : {1, 3, 4, 5, 9, 37}) {
          std::vector<int8_t> qc(size_t(nq * d)), kc(size_t(nk * d));
          for (auto& c : qc) c = int8_t(rnd(-kQueryLevels, kQueryLevels));
          for (auto& c : kc) c = int8_t(rnd(-kKeyLevels, kKeyLevels));
          const int ng = int((nq + kGroup - 1) / kGroup);
          std::vector<uint8_t> packed(size_t(ng * ((d + 3) / 4) * 64));
          similarity_topk_pack_queries_cpu(qc.data(), nq, d, packed.data());
          std::vector<int32_t> a(size_t(nk * ng * kGroup), 7), b(a);
          int8_tile(kPathScalar)(packed.data(), ng, kc.data(), d, nk, a.data(), ng * kGroup);
          f(packed.data(), ng, kc.data(), d, nk, b.data(), ng * kGroup);
          ++cases;
          if (a != b && ++bad <= 5) std::printf("path %d d=%ld nq=%ld nk=%ld differs from scalar\n", path, long(d), long(nq), long(nk));
          for (int64_t n = 0; n < nk; ++n)
            for (int64_t q = 0; q < nq; ++q) {
              int32_t dot = 0, sum = 0;
              for (int64_t j = 0; j < d; ++j) {
                dot += qc[size_t(q * d + j)] * kc[size_t(n * d + j)];
                sum += kc[size_t(n * d + j)];
              }
              if (a[size_t(n * ng * kGroup + q)] - kQueryOffset * sum != dot && ++bad <= 5) std::printf("scalar tile wrong\n");
            }
        }
  }
  std::printf("%d cases, %d mismatches\n", cases, bad);
  return bad ? 1 : 0;
}
