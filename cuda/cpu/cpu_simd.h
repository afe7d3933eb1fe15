// A 4-lane float vector for the CPU attention kernels, and loads of 8 cache elements
// (f32, f16 or bf16) widened to two such vectors.
//
// GCC and Clang get their generic vector extension, which compiles to SSE2 on x86-64
// without any -m flag (and to NEON on arm64); other compilers get a plain struct with
// the same operators. Auto-vectorisation of the register-blocked kernels turned out
// unreliable (GCC 12 spilled the accumulators), hence explicit vectors.
//
// The 16-bit loads widen pairs of elements held in one 32-bit word with a shift and a
// mask, which costs two integer instructions per 8 elements but returns them in the
// order 0 2 4 6 | 1 3 5 7. Callers keep their float rows in the same order
// (PermuteRow/UnpermuteRow) whenever Loader<T>::kPermuted is set: a dot product or an
// axpy does not care about the order as long as both operands share it.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_numeric.h"

namespace jax_pagedattn {
namespace cpu {

#if defined(__GNUC__) || defined(__clang__)
#define JPA_CPU_VECTOR_EXT 1
typedef float F4 __attribute__((vector_size(16)));
typedef uint32_t U4 __attribute__((vector_size(16)));
typedef int32_t I4 __attribute__((vector_size(16)));

inline F4 Splat(float x) { return F4{x, x, x, x}; }
inline float Lane(F4 v, int i) { return v[i]; }
#else
#define JPA_CPU_VECTOR_EXT 0
struct F4 {
  float v[4];
  F4& operator+=(const F4& o) {
    for (int i = 0; i < 4; ++i) v[i] += o.v[i];
    return *this;
  }
  friend F4 operator+(F4 a, const F4& b) { return a += b; }
  friend F4 operator*(F4 a, const F4& b) {
    for (int i = 0; i < 4; ++i) a.v[i] *= b.v[i];
    return a;
  }
};
inline F4 Splat(float x) { return F4{{x, x, x, x}}; }
inline float Lane(F4 v, int i) { return v.v[i]; }
#endif

inline F4 LoadF4(const float* p) {
  F4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void StoreF4(float* p, F4 v) { std::memcpy(p, &v, sizeof v); }

inline float HorizontalSum(F4 v) { return (Lane(v, 0) + Lane(v, 2)) + (Lane(v, 1) + Lane(v, 3)); }

// Loader<T>::Load8(p, lo, hi): elements p[0..8) as floats, in the order the
// kPermuted flag announces.
template <typename T>
struct Loader;

template <>
struct Loader<float> {
  static constexpr bool kPermuted = false;
  static void Load8(const float* p, F4& lo, F4& hi) {
    lo = LoadF4(p);
    hi = LoadF4(p + 4);
  }
};

#if JPA_CPU_VECTOR_EXT

inline U4 LoadWords(const void* p) {
  U4 w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

inline F4 AsF4(U4 u) {
  F4 f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline U4 AsU4(F4 f) {
  U4 u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

template <>
struct Loader<BFloat16> {
  static constexpr bool kPermuted = true;
  // A bf16 is the top half of a float: even elements shift up, odd ones are masked.
  static void Load8(const BFloat16* p, F4& lo, F4& hi) {
    const U4 w = LoadWords(p);
    lo = AsF4(w << 16);
    hi = AsF4(w & 0xffff0000u);
  }
};

template <>
struct Loader<Half> {
  static constexpr bool kPermuted = true;
  // The vector form of ToFloat(Half) (cpu_numeric.h), on halves in the low 16 bits: no
  // float denormal is formed (XLA's CPU threads run with denormals-are-zero).
  static F4 Widen(U4 h) {
    const U4 sign = (h & 0x8000u) << 16;
    const U4 mag = h & 0x7fffu;
    const U4 normal = (mag << 13) + (112u << 23);
    const U4 subnormal = AsU4(__builtin_convertvector((I4)mag, F4) * Splat(0x1p-24f));
    const U4 special = (mag << 13) | 0x7f800000u;
    // mag < 2^15, so signed compares are exact; true lanes are all ones.
    const U4 is_special = (U4)((I4)mag >= 0x7c00);
    const U4 is_subnormal = (U4)((I4)mag < 0x400);
    const U4 finite = (subnormal & is_subnormal) | (normal & ~is_subnormal);
    return AsF4(((special & is_special) | (finite & ~is_special)) | sign);
  }
  static void Load8(const Half* p, F4& lo, F4& hi) {
    const U4 w = LoadWords(p);
    lo = Widen(w & 0xffffu);
    hi = Widen(w >> 16);
  }
};

#else

template <typename T>
struct ScalarLoader {
  static constexpr bool kPermuted = false;
  static void Load8(const T* p, F4& lo, F4& hi) {
    for (int i = 0; i < 4; ++i) {
      lo.v[i] = ToFloat(p[i]);
      hi.v[i] = ToFloat(p[i + 4]);
    }
  }
};
template <>
struct Loader<BFloat16> : ScalarLoader<BFloat16> {};
template <>
struct Loader<Half> : ScalarLoader<Half> {};

#endif

// Reorders a float row (n a multiple of 8) into, and back out of, the order of
// Loader<T>::Load8 for 16-bit T: within each 8, elements 0 2 4 6 1 3 5 7.
inline void PermuteRow(float* x, int n) {
  for (int d = 0; d < n; d += 8) {
    float t[8];
    for (int i = 0; i < 4; ++i) {
      t[i] = x[d + 2 * i];
      t[i + 4] = x[d + 2 * i + 1];
    }
    std::memcpy(x + d, t, sizeof t);
  }
}

inline void UnpermuteRow(float* x, int n) {
  for (int d = 0; d < n; d += 8) {
    float t[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = x[d + i];
      t[2 * i + 1] = x[d + i + 4];
    }
    std::memcpy(x + d, t, sizeof t);
  }
}

}  // namespace cpu
}  // namespace jax_pagedattn
