// similarity_topk's int8 dot-product tiles (private to csrc/cpu).
#pragma once
#include <cstdint>

namespace mgcl {

/// Queries per packed group (one zmm, two ymm of 4-byte lanes).
constexpr int kGroup = 16;

/// D[n * ldd + 16 g + lane] = sum_j u(16 g + lane, j) * codes[n * d + j]
/// for n < nk, g < ng, lane < 16, with u the packed query codes of group g at
/// qpack + g * d4 * 64 (similarity_topk_pack_queries_cpu; d4 = ceil(d / 4)).
/// Exact int32 arithmetic: |u| <= 127, |c| <= 127, d <= kInt8MaxDim.
using Int8Tile = void (*)(const uint8_t* qpack, int ng, const int8_t* codes, int64_t d, int64_t nk, int32_t* D,
                          int64_t ldd);

/// The tile of a SimilarityTopkPath (kPathScalar .. kPathAvx512Vnni), or null
/// when this build has no such path.
Int8Tile int8_tile(int path);

}  // namespace mgcl
