// Llama rotate-half RoPE, applied in registers as q and k are loaded: the one GPU
// formula of every kernel (decode, sm80 and sm90 prefill).
//
// Dim d pairs with d + D/2; pair i = d mod D/2 turns at frequency
// (1/rope_scale) * rope_theta^(-2i/D); query i of a request sits at position
// kv_len - qo_len + i, key j at position j (shared/DESIGN.md §3). The angle is the fp32
// product pos * freq; x (dim d < D/2) and its partner y (dim d + D/2) rotate in fp32 as
//   x' = x cos - y sin = fma(x, cos, -(y sin))      y' = y cos + x sin = fma(x, sin, y cos)
// (the fma roundings of the sm80 prefill kernel, RopeRotateCosSin; the sm90 kernel's K
// rotation takes its cos/sin by angle addition along a lane's rows, the rest RopeSinCos).
#pragma once

#include <cmath>
#include <cstdint>

#include "vec_dtypes.cuh"

namespace jax_pagedattn {

// Frequency of pair i (0 <= i < D/2): the double-precision formula of the CPU backend
// (cpu_rope.h, RopeInvFreq), so that both round every frequency identically.
__device__ __forceinline__ float RopeFrequency(int i, int head_dim, float rope_scale,
                                               float rope_theta) {
  return float(pow(double(rope_theta), -2.0 * double(i) / double(head_dim)) /
               double(rope_scale));
}

// Fills freq[0, D/2) of a table shared by a CTA: thread `tid` of `nthreads` writes
// entries tid, tid + nthreads, ... The caller synchronises before anyone reads it.
__device__ __forceinline__ void RopeFrequencyTable(float* freq, int head_dim, float rope_scale,
                                                   float rope_theta, int tid, int nthreads) {
  for (int i = tid; i < head_dim / 2; i += nthreads)
    freq[i] = RopeFrequency(i, head_dim, rope_scale, rope_theta);
}

// sin/cos of a RoPE angle. Positions times frequencies reach 1e5 rad and beyond, where
// __sincosf is useless and sincosf takes a slow path through local memory; a two-step
// Cody-Waite reduction by 2 pi (fma keeps x - k * C1 exact) leaves |r| <= pi, where
// __sincosf is accurate to about 2^-21, far below the 16-bit rounding that follows.
__device__ __forceinline__ void RopeSinCos(float x, float* s, float* c) {
  const float k = rintf(x * 0.159154943091895336f);
  float r = fmaf(-k, 6.28318548202514648f, x);  // float(2 pi)
  r = fmaf(-k, -1.74845553146951720e-7f, r);   // 2 pi - float(2 pi)
  __sincosf(r, s, c);
}

// Rotates the pair (x, y) = (dim d, dim d + D/2) by the angle of cosine cs, sine sn.
__device__ __forceinline__ void RopeRotateCosSin(float& x, float& y, float cs, float sn) {
  const float a = x, b = y;
  x = fmaf(a, cs, -(b * sn));
  y = fmaf(a, sn, b * cs);
}

// Rotates the pair (x, y) = (dim d, dim d + D/2) by `angle`.
__device__ __forceinline__ void RopeRotatePair(float& x, float& y, float angle) {
  float sn, cs;
  RopeSinCos(angle, &sn, &cs);
  RopeRotateCosSin(x, y, cs, sn);
}

// Rotates 8 consecutive elements x (dims d0..d0+7 of one head, all in one half) against
// their partners y (dims d0 +- D/2) at position `pos`; `freq` holds the 8 frequencies.
// `first_half`: x is the first half, else the second; only x is rotated.
__device__ __forceinline__ void RopeRotate8(float (&x)[8], const float (&y)[8],
                                            const float (&freq)[8], float pos, bool first_half) {
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    float lo = first_half ? x[e] : y[e];
    float hi = first_half ? y[e] : x[e];
    RopeRotatePair(lo, hi, pos * freq[e]);
    x[e] = first_half ? lo : hi;
  }
}

// Rotates both halves of 8 dim pairs at once: lo = dims d0..d0+7 (first half), hi = the
// dims D/2 further.
__device__ __forceinline__ void RopeRotatePair8(float (&lo)[8], float (&hi)[8],
                                                const float (&freq)[8], float pos) {
#pragma unroll
  for (int e = 0; e < 8; ++e) RopeRotatePair(lo[e], hi[e], pos * freq[e]);
}

// The same on 16-bit elements in 16-byte vectors (vec_dtypes.cuh), rounded back to T:
// elements d = 8c + e (in `lo`) with d + D/2 (in `hi`), e = 0..7, at position `pos`;
// `freq` points at the 8 frequencies of chunk c.
template <typename T>
__device__ __forceinline__ void RopePairs(uint4& lo, uint4& hi, float pos, const float* freq) {
  uint32_t* a = reinterpret_cast<uint32_t*>(&lo);
  uint32_t* b = reinterpret_cast<uint32_t*>(&hi);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    float2 x = UnpackPair<T>(a[k]);
    float2 y = UnpackPair<T>(b[k]);
    RopeRotatePair(x.x, y.x, pos * freq[2 * k]);
    RopeRotatePair(x.y, y.y, pos * freq[2 * k + 1]);
    a[k] = PackPair<T>(x.x, x.y);
    b[k] = PackPair<T>(y.x, y.y);
  }
}

}  // namespace jax_pagedattn
