// ROPE_LLAMA for the CPU backend (shared/DESIGN.md §3): rotate-half pairing of element
// d with d + D/2, frequency (1/rope_scale) * rope_theta^(-2 (d mod D/2) / D), rotation
// in float32. Queries and keys get their angles from the same function, so a query and
// a key at equal positions rotate identically.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace jax_pagedattn {
namespace cpu {

// Per-pair inverse frequencies, D/2 of them.
inline std::vector<float> RopeInvFreq(int head_dim, float rope_scale, float rope_theta) {
  const int half = head_dim / 2;
  std::vector<float> inv(half);
  for (int d = 0; d < half; ++d) {
    const double e = -2.0 * double(d) / double(head_dim);
    inv[d] = float(std::pow(double(rope_theta), e) / double(rope_scale));
  }
  return inv;
}

// cos/sin of position `pos` for every pair. The angle is a float32 product, as a
// float32 implementation computes it; the trigonometry itself is accurate.
inline void RopeCosSin(int64_t pos, const float* inv_freq, int half, float* cos_out,
                       float* sin_out) {
  const float p = float(pos);
  for (int d = 0; d < half; ++d) {
    const float angle = p * inv_freq[d];
    cos_out[d] = std::cos(angle);
    sin_out[d] = std::sin(angle);
  }
}

// Rotates one row in place with precomputed cos/sin.
inline void RopeRotate(float* __restrict x, const float* __restrict c, const float* __restrict s,
                       int half) {
  float* __restrict lo = x;
  float* __restrict hi = x + half;
  for (int d = 0; d < half; ++d) {
    const float a = lo[d];
    const float b = hi[d];
    lo[d] = a * c[d] - b * s[d];
    hi[d] = b * c[d] + a * s[d];
  }
}

}  // namespace cpu
}  // namespace jax_pagedattn
