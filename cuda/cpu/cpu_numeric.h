// Storage types of the CPU backend and their conversions to and from float32.
//
// f16 and bf16 are carried as raw 16-bit patterns (no compiler half type is assumed, so
// the code builds with any C++17 compiler). The widening conversions are branch-free so
// that the row loops below auto-vectorise with plain SSE2; the narrowing conversions
// round to nearest even and only run once per output element, so they stay scalar.
#pragma once

#include <cstdint>
#include <cstring>

namespace jax_pagedattn {
namespace cpu {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};
// fp8 KV-cache elements (read only: widened to float32 for the math).
struct Fp8E4M3 {
  uint8_t bits;
};
struct Fp8E5M2 {
  uint8_t bits;
};

inline float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t FloatToBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float ToFloat(float x) { return x; }

// bf16 is the upper half of a float32.
inline float ToFloat(BFloat16 x) { return BitsToFloat(uint32_t(x.bits) << 16); }

// IEEE half: exponent and mantissa move into float position and the exponent is rebiased
// by an integer add (+112); subnormal halves are their mantissa times 2^-24, converted
// exactly from the integer. No float denormal is formed on the way: XLA's CPU threads
// run with denormals-are-zero, which would flush them. Infinities and NaNs (exponent
// all ones) are patched in with a select.
inline float ToFloat(Half x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t magnitude = h & 0x7fffu;
  const uint32_t normal = (magnitude << 13) + (112u << 23);
  const uint32_t subnormal = FloatToBits(float(magnitude) * 0x1p-24f);
  const uint32_t special = 0x7f800000u | ((magnitude & 0x3ffu) << 13);
  const uint32_t bits = magnitude >= 0x7c00u ? special : magnitude < 0x400u ? subnormal : normal;
  return BitsToFloat(bits | sign);
}

// e5m2 is the upper byte of an IEEE half.
inline float ToFloat(Fp8E5M2 x) { return ToFloat(Half{uint16_t(uint16_t(x.bits) << 8)}); }

// e4m3fn (bias 7, no infinities, S.1111.111 is NaN): as for the half, with the exponent
// rebiased by +120 and subnormals their mantissa times 2^-9.
inline float ToFloat(Fp8E4M3 x) {
  const uint32_t magnitude = x.bits & 0x7fu;
  const uint32_t sign = uint32_t(x.bits & 0x80u) << 24;
  const uint32_t normal = (magnitude << 20) + (120u << 23);
  const uint32_t subnormal = FloatToBits(float(magnitude) * 0x1p-9f);
  const uint32_t bits = magnitude == 0x7fu ? 0x7fc00000u : magnitude < 0x8u ? subnormal : normal;
  return BitsToFloat(bits | sign);
}

template <typename T>
T FromFloat(float f);

template <>
inline float FromFloat<float>(float f) {
  return f;
}

template <>
inline BFloat16 FromFloat<BFloat16>(float f) {
  const uint32_t u = FloatToBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{uint16_t((u >> 16) | 0x0040u)};  // quiet NaN
  // Round to nearest even: add just under half an ulp, plus one when the kept part is odd.
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{uint16_t(rounded >> 16)};
}

template <>
inline Half FromFloat<Half>(float f) {
  const uint32_t u = FloatToBits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return Half{uint16_t(sign | 0x7e00u)};  // NaN stays NaN
  if (a >= 0x477ff000u) return Half{uint16_t(sign | 0x7c00u)};  // rounds past 65504: inf
  if (a >= 0x38800000u) {
    // Normal half: round the 23-bit mantissa to 10 bits (ties to even), then rebias the
    // exponent from 127 to 15. A carry out of the mantissa correctly bumps the exponent.
    const uint32_t rounded = a + 0x0fffu + ((a >> 13) & 1u);
    return Half{uint16_t(sign | ((rounded - 0x38000000u) >> 13))};
  }
  if (a <= 0x33000000u) return Half{sign};  // at most 2^-25: rounds (ties even) to zero
  // Subnormal half, units of 2^-24: shift the full mantissa right, rounding ties to even.
  const uint32_t mant = (a & 0x007fffffu) | 0x00800000u;
  const uint32_t shift = 126u - (a >> 23);  // 14 .. 24 here
  const uint32_t kept = mant >> shift;
  const uint32_t rest = mant & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  const uint32_t up = (rest > halfway || (rest == halfway && (kept & 1u))) ? 1u : 0u;
  return Half{uint16_t(sign | (kept + up))};
}

// Widens n elements; kept as a separate loop so each instantiation vectorises.
template <typename T>
inline void WidenRow(const T* __restrict src, float* __restrict dst, int n) {
  for (int d = 0; d < n; ++d) dst[d] = ToFloat(src[d]);
}

template <typename T>
inline void NarrowRow(const float* __restrict src, T* __restrict dst, int n) {
  for (int d = 0; d < n; ++d) dst[d] = FromFloat<T>(src[d]);
}

}  // namespace cpu
}  // namespace jax_pagedattn
