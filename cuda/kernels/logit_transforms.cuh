// What the attention kernels do to a base-2 logit between q.k and the softmax, beyond
// the scale: soft-capping (logits_soft_cap), and the sink that joins a row's softmax
// (sinks). The masks (causal, sliding window) stay with each kernel's tiling.
#pragma once

#include <climits>

#include "jax_pagedattn/params.h"
#include "softmax_state.cuh"

namespace jax_pagedattn {

// tanh on the MUFU unit (tanh.approx.f32, sm_75+: relative error about 2^-11, the
// precision FlashInfer's soft-cap uses).
__device__ __forceinline__ float FastTanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Soft-capping in base-2 units. The kernels hold s = x log2(e) for a scaled logit x, and
// c tanh(x / c) in those units is cap2 tanh(s / cap2) with cap2 = c log2(e), which the
// params carry (AttentionParams::SetDerived): a kernel's __grid_constant__ params are
// read from the constant bank, so the cap costs no registers.
struct SoftCap {
  const AttentionParams& p;

  __device__ __forceinline__ bool on() const { return p.soft_cap_log2 > 0.f; }
  __device__ __forceinline__ float operator()(float s) const {
    return p.soft_cap_log2 * FastTanh(s * p.inv_soft_cap_log2);
  }
};

// The first key position a query at `qpos` sees: the sliding window's start, or
// INT_MIN without a window (computed wide: a garbage plan's qpos must not overflow).
__device__ __forceinline__ int WindowStart(const AttentionParams& p, int qpos) {
  if (p.window_left < 0) return INT_MIN;
  const long long start = (long long)qpos - p.window_left;
  return start < INT_MIN ? INT_MIN : int(start);
}

// The sink of query head `head` as a base-2 softmax state {logit, 1}, or the empty
// state when the call has no sinks or `split` is not the row's first piece (a row's
// sink counts once: in the item that writes it whole, or in piece 0 of a split).
__device__ __forceinline__ SoftmaxState SinkState(const AttentionParams& p, int head, int split) {
  if (p.sinks == nullptr || split > 0) return SoftmaxState::Empty();
  return SoftmaxState{__ldg(p.sinks + head) * kLog2e, 1.f};
}

// FlashInfer's dequantisation scales of a quantised (fp8) cache: k_scale multiplies the
// logits (with sm_scale), v_scale the output; 1 without the scales operand.
__device__ __forceinline__ float KScale(const AttentionParams& p) {
  return p.kv_scales != nullptr ? __ldg(p.kv_scales) : 1.f;
}

// What q.k is multiplied by to give the base-2 logit: sm_scale * k_scale * log2(e).
__device__ __forceinline__ float LogitScaleLog2(const AttentionParams& p) {
  return p.sm_scale * kLog2e * KScale(p);
}
__device__ __forceinline__ float VScale(const AttentionParams& p) {
  return p.kv_scales != nullptr ? __ldg(p.kv_scales + 1) : 1.f;
}

}  // namespace jax_pagedattn
