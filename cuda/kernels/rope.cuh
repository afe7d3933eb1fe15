// Llama rotate-half RoPE, applied in registers as q and k are loaded.
//
// Dim d pairs with d + D/2; pair i = d mod D/2 turns at frequency
// (1/rope_scale) * rope_theta^(-2i/D); query i of a request sits at position
// kv_len - qo_len + i, key j at position j (shared/DESIGN.md §3). Self-contained.
#pragma once

#include <cmath>

namespace jax_pagedattn {

// Frequency of pair i (0 <= i < D/2). Accurate powf: kernels compute a table of D/2 of
// them once per CTA, so q and k rotate by the same angles as the reference's.
__device__ __forceinline__ float RopeFrequency(int i, int head_dim, float rope_scale,
                                               float rope_theta) {
  return (1.0f / rope_scale) * powf(rope_theta, -2.0f * float(i) / float(head_dim));
}

// Rotates 8 consecutive elements x (dims d0..d0+7 of one head, all in one half) against
// their partners y (dims d0 +- D/2) at position `pos`:
//   first half:  x' = x cos - y sin        second half: x' = x cos + y sin.
// kAccurate = true (use for q, once per row): sincospif on angle/pi, accurate and free of
// the local-memory Payne-Hanek path that sincosf takes for large arguments.
// kAccurate = false (use for k, per key): __sincosf on the MUFU unit; its absolute error
// grows like |angle| * 2^-22, the order of the fp32 rounding of pos * freq itself.
template <bool kAccurate>
__device__ __forceinline__ void RopeRotate8(float (&x)[8], const float (&y)[8],
                                            const float (&freq)[8], float pos, bool first_half) {
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    float sn, cs;
    if (kAccurate) {
      sincospif(pos * (freq[e] * 0.318309886183790672f), &sn, &cs);
    } else {
      __sincosf(pos * freq[e], &sn, &cs);
    }
    const float partner = first_half ? -y[e] : y[e];
    x[e] = fmaf(x[e], cs, partner * sn);
  }
}

// Rotates both halves of 8 dim pairs at once: lo = dims d0..d0+7 (first half), hi = the
// dims D/2 further. One __sincosf per pair (MUFU; error as for kAccurate = false above).
__device__ __forceinline__ void RopeRotatePair8(float (&lo)[8], float (&hi)[8],
                                                const float (&freq)[8], float pos) {
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    float sn, cs;
    __sincosf(pos * freq[e], &sn, &cs);
    const float a = lo[e], b = hi[e];
    lo[e] = fmaf(a, cs, -b * sn);
    hi[e] = fmaf(b, cs, a * sn);
  }
}

}  // namespace jax_pagedattn
