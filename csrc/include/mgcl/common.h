// Shared native types: dtype codes and scalar conversions for the CPU code.
// Python passes dtypes as these integer codes (mgcl/_native.py DTYPE_CODE).
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace mgcl {

enum DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat64 = 3,
};

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    case kFloat64: return "float64";
    default: return "unknown";
  }
}

// Storage types for the 16-bit formats on the host: raw bits.
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// bfloat16 is the top half of a float32; rounding to nearest-even on the
// dropped 16 bits, NaN kept quiet.
inline float to_float(bf16_t v) { return bits_to_float(uint32_t(v.bits) << 16); }
inline bf16_t from_float_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{uint16_t(u >> 16)};
}

// IEEE binary16 <-> binary32, round to nearest-even, subnormals and inf/NaN kept.
inline float to_float(half_t v) {
  uint32_t h = v.bits;
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // subnormal: value = man * 2^-24
    float f = float(man) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}
inline half_t from_float_half(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return half_t{uint16_t(sign | 0x7e00u)};   // NaN
  if (a >= 0x477ff000u) return half_t{uint16_t(sign | 0x7c00u)};  // rounds to inf
  if (a < 0x38800000u) {                                          // subnormal or zero
    // add 0.5 (as a float) so the FPU rounds the mantissa to nearest-even
    float g = bits_to_float(a) + 0.5f;
    return half_t{uint16_t(sign | (float_to_bits(g) - 0x3f000000u))};
  }
  uint32_t mant_odd = (a >> 13) & 1u;
  a += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
  return half_t{uint16_t(sign | (a >> 13))};
}

template <typename T> inline float load(const T* p, int64_t i);
template <> inline float load<float>(const float* p, int64_t i) { return p[i]; }
template <> inline float load<half_t>(const half_t* p, int64_t i) { return to_float(p[i]); }
template <> inline float load<bf16_t>(const bf16_t* p, int64_t i) { return to_float(p[i]); }

template <typename T> inline void store(T* p, int64_t i, float v);
template <> inline void store<float>(float* p, int64_t i, float v) { p[i] = v; }
template <> inline void store<half_t>(half_t* p, int64_t i, float v) { p[i] = from_float_half(v); }
template <> inline void store<bf16_t>(bf16_t* p, int64_t i, float v) { p[i] = from_float_bf16(v); }

struct Error : std::runtime_error {
  explicit Error(const std::string& what) : std::runtime_error("mgcl native: " + what) {}
};

}  // namespace mgcl
