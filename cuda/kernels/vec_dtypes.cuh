// 16-bit element types in 16-byte vectors: widening to float registers and narrowing back.
//
// A uint4 holds 8 consecutive elements (element 0 in the low half of .x): the unit the
// kernels load and store so that each thread moves 16 bytes per instruction. T is
// __half or __nv_bfloat16; Unpack8 also reads fp8 caches (__nv_fp8_e4m3 / _e5m2), whose
// 8 elements fill .x and .y only. Self-contained: include it from any kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace jax_pagedattn {

// Two packed elements -> two floats (exact for both types).
template <typename T>
__device__ __forceinline__ float2 UnpackPair(uint32_t w);

template <>
__device__ __forceinline__ float2 UnpackPair<__nv_bfloat16>(uint32_t w) {
  // bf16 is the upper half of an f32, so widening is one shift or one mask.
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}

template <>
__device__ __forceinline__ float2 UnpackPair<__half>(uint32_t w) {
  __half2 h;
  memcpy(&h, &w, sizeof(h));
  return __half22float2(h);
}

// Two floats -> two packed elements, round to nearest even (one F2FP on sm_80+).
template <typename T>
__device__ __forceinline__ uint32_t PackPair(float a, float b);

template <>
__device__ __forceinline__ uint32_t PackPair<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  uint32_t w;
  memcpy(&w, &h, sizeof(w));
  return w;
}

template <>
__device__ __forceinline__ uint32_t PackPair<__half>(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  uint32_t w;
  memcpy(&w, &h, sizeof(w));
  return w;
}

template <typename T>
__device__ __forceinline__ void Unpack8(const uint4& v, float (&f)[8]) {
  if constexpr (sizeof(T) == 1) {
    // fp8 (an fp8 cache's chunk is 8 bytes: .x and .y): pairs to half2 (one cvt on
    // sm_89+, emulated before), then to float; exact.
    constexpr __nv_fp8_interpretation_t kind =
        std::is_same_v<T, __nv_fp8_e4m3> ? __NV_E4M3 : __NV_E5M2;
    const uint32_t w[2] = {v.x, v.y};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_fp8x2_storage_t pair = __nv_fp8x2_storage_t(w[i / 2] >> (16 * (i % 2)));
      const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(pair, kind);
      __half2 hh;
      memcpy(&hh, &h, sizeof(hh));
      const float2 x = __half22float2(hh);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  } else {
    const float2 a = UnpackPair<T>(v.x), b = UnpackPair<T>(v.y);
    const float2 c = UnpackPair<T>(v.z), d = UnpackPair<T>(v.w);
    f[0] = a.x; f[1] = a.y; f[2] = b.x; f[3] = b.y;
    f[4] = c.x; f[5] = c.y; f[6] = d.x; f[7] = d.y;
  }
}

template <typename T>
__device__ __forceinline__ uint4 Pack8(const float (&f)[8]) {
  return make_uint4(PackPair<T>(f[0], f[1]), PackPair<T>(f[2], f[3]), PackPair<T>(f[4], f[5]),
                    PackPair<T>(f[6], f[7]));
}

// Four floats -> four packed elements (8 bytes).
template <typename T>
__device__ __forceinline__ uint2 Pack4(const float4& f) {
  return make_uint2(PackPair<T>(f.x, f.y), PackPair<T>(f.z, f.w));
}

// 16-byte read-only global load (ld.global.nc). `p` must be 16-byte aligned.
__device__ __forceinline__ uint4 LoadGlobal16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

}  // namespace jax_pagedattn
