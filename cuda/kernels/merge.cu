// After the attention pass: merge split-KV partials into out/lse, and zero-fill the
// padding rows past meta[kMetaNumTokens] (out = 0, lse = -inf).
//
// Grid (q rows, slices of a row): blockIdx.x is the q row t (p.q_rows, a static
// capacity), blockIdx.y a slice of kMergeThreads (head, 4 dims) quads of that row. The
// live token count and the merge offsets are read on the device, so the launch never
// depends on plan contents. Rows with no partials (written directly by their work item)
// return at once. Every thread owns one quad, so a row with many partials is spread over
// H * D / 4 threads, and its n partials are read in unrolled batches whose loads are all
// independent: the merge costs a few memory latencies, not n of them per thread.
#include <cuda_runtime.h>

#include <cstdint>

#include "jax_pagedattn/params.h"
#include "launchers.h"
#include "softmax_state.cuh"
#include "vec_dtypes.cuh"

namespace jax_pagedattn {
namespace {

constexpr int kMergeThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kMergeThreads) MergeKernel(const AttentionParams p) {
  const int t = blockIdx.x;
  const int H = p.num_qo_heads, D = p.head_dim;
  const int quads = D / 4;  // D % 4 == 0 (checked at launch)
  const int idx = blockIdx.y * kMergeThreads + threadIdx.x;
  if (idx >= H * quads) return;
  const int h = idx / quads, d = (idx - h * quads) * 4;
  T* out = static_cast<T*>(p.out) + (int64_t(t) * H + h) * D + d;
  float* lse = p.lse + int64_t(t) * H + h;

  if (t >= __ldg(p.meta + kMetaNumTokens)) {  // padding row
    *reinterpret_cast<uint2*>(out) = make_uint2(0u, 0u);
    if (d == 0) *lse = -INFINITY;
    return;
  }
  const int begin = __ldg(p.merge_indptr + t);
  int n = __ldg(p.merge_indptr + t + 1) - begin;
  if (begin < 0) return;  // malformed offsets: never index before the workspace
  if (n > p.partial_rows_cap - begin) n = p.partial_rows_cap - begin;
  if (n <= 0) return;  // written by its work item

  // Partial i of this head: o_i (normalised) and lse_i (base 2).
  // out = sum 2^(lse_i - m) o_i / sum 2^(lse_i - m), lse = m + log2(sum), m = max lse_i.
  const float* plse = p.partial_lse + int64_t(begin) * H + h;
  const float* po = p.partial_o + (int64_t(begin) * H + h) * D + d;
  const int64_t o_stride = int64_t(H) * D;
  float m = -INFINITY;
#pragma unroll 8
  for (int i = 0; i < n; ++i) m = fmaxf(m, plse[int64_t(i) * H]);
  const float base = SafeMax(m);  // all -inf: every weight is 0, out 0, lse -inf
  float sum = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
  for (int i = 0; i < n; ++i) {
    const float w = FastExp2(plse[int64_t(i) * H] - base);
    const float4 o = *reinterpret_cast<const float4*>(po + i * o_stride);
    sum += w;
    acc.x = fmaf(w, o.x, acc.x);
    acc.y = fmaf(w, o.y, acc.y);
    acc.z = fmaf(w, o.z, acc.z);
    acc.w = fmaf(w, o.w, acc.w);
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  *reinterpret_cast<uint2*>(out) =
      Pack4<T>(make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv));
  if (d == 0) *lse = sum > 0.f ? m + log2f(sum) : -INFINITY;
}

}  // namespace

cudaError_t LaunchMerge(const AttentionParams& p, cudaStream_t stream) {
  if (p.q_rows <= 0) return cudaSuccess;  // no rows: launch nothing
  if (p.head_dim <= 0 || p.head_dim % 4 != 0 || p.num_qo_heads <= 0) return cudaErrorInvalidValue;
  const int64_t quads = int64_t(p.num_qo_heads) * (p.head_dim / 4);
  const int64_t slices = (quads + kMergeThreads - 1) / kMergeThreads;
  if (slices > 65535) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(p.q_rows), unsigned(slices));
  switch (p.dtype) {
    case DType::kF16:
      MergeKernel<__half><<<grid, kMergeThreads, 0, stream>>>(p);
      break;
    case DType::kBF16:
      MergeKernel<__nv_bfloat16><<<grid, kMergeThreads, 0, stream>>>(p);
      break;
    default:
      return cudaErrorInvalidValue;  // f32 has no GPU kernel
  }
  return cudaGetLastError();
}

}  // namespace jax_pagedattn
