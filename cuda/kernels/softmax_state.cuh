// Online softmax in base 2, shared by the attention kernels and the merge pass.
//
// Logits are kept pre-multiplied by log2(e) (the kernels fold it into the q scale), so
// every exponential is one ex2 and the log-sum-exp comes out in base 2, as the contract
// wants. Self-contained: include it from any kernel.
#pragma once

#include <cmath>

namespace jax_pagedattn {

constexpr float kLog2e = 1.4426950408889634f;

// 2^x on the MUFU unit (ex2.approx: relative error about 2^-22). ftz only flushes results
// below 2^-126, which no softmax weight can notice. FastExp2(-inf) = +0.
__device__ __forceinline__ float FastExp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// The value a state subtracts from its logits: -inf (nothing seen yet) becomes 0, so
// that -inf - max stays -inf (weight 0) instead of -inf - -inf = NaN.
__device__ __forceinline__ float SafeMax(float m) { return m == -INFINITY ? 0.f : m; }

// (m, d) of a set of base-2 logits s_i: m = max s_i, d = sum 2^(s_i - m). An accumulator
// o = sum 2^(s_i - m) v_i travels beside it; the normalised output is o / d and the
// base-2 lse is m + log2(d). A normalised partial (o_i, lse_i) is the state {lse_i, 1}
// with accumulator o_i, so the merge pass uses the same operator.
struct SoftmaxState {
  float m;
  float d;

  __device__ __forceinline__ static SoftmaxState Empty() { return {-INFINITY, 0.f}; }
  __device__ __forceinline__ bool IsEmpty() const { return m == -INFINITY; }

  // this <- this (+) other. The accumulators combine as
  // o = o_this * *scale_this + o_other * *scale_other.
  __device__ __forceinline__ void Merge(const SoftmaxState& other, float* scale_this,
                                        float* scale_other) {
    const float m_new = fmaxf(m, other.m);
    const float base = SafeMax(m_new);
    *scale_this = FastExp2(m - base);
    *scale_other = FastExp2(other.m - base);
    d = d * *scale_this + other.d * *scale_other;
    m = m_new;
  }

  // 1/d, or 0 for an empty state (its accumulator is 0 and its output must be 0).
  __device__ __forceinline__ float InvSum() const { return IsEmpty() ? 0.f : 1.f / d; }

  // Base-2 log-sum-exp; -inf for an empty state.
  __device__ __forceinline__ float Lse() const { return IsEmpty() ? -INFINITY : m + log2f(d); }
};

}  // namespace jax_pagedattn
