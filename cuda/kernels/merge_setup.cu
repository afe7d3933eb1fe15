// The setup pass of an attention call, launched just before the attention kernel:
// zeroes the split-merge counters of rows [0, q_rows) (split_merge.cuh), zero-fills
// the padding rows t >= meta[kMetaNumTokens] (out = 0, lse = -inf), which no work item
// writes, acknowledges a staged plan's ticket (plan_acks.h) and, for a plan in mapped
// host memory, copies it into the workspace where the attention kernel reads it.
//
// The attention kernel is launched as its dependent grid (dependent_launch.cuh): every
// CTA here lets it launch first thing, so the attention grid fills the GPU while these
// few CTAs run, and it waits for this grid only where it first touches a counter.
// The grid is small and fixed (a grid-stride loop), so the dependent launch never waits
// behind thousands of setup CTAs; the padding count is read on the device, so the launch
// does not depend on plan contents.
#include <cuda_runtime.h>

#include <cstdint>

#include "dependent_launch.cuh"
#include "jax_pagedattn/params.h"
#include "jax_pagedattn/plan_acks.h"
#include "launchers.h"

namespace jax_pagedattn {
namespace {

constexpr int kSetupThreads = 256;
constexpr int kMaxSetupCtas = 64;
constexpr int kMaxCopyCtas = 512;

// Copies a mapped plan (n 16-byte words) into device memory. Each word crosses the bus
// with a round trip of a microsecond or more, so every thread issues its loads in
// batches before storing any: the copy costs a few round trips, not one per word.
__device__ __forceinline__ void CopyPlan(const int4* __restrict__ src, int4* __restrict__ dst,
                                         int64_t n, int64_t first, int64_t stride) {
  constexpr int kBatch = 4;
  for (int64_t i = first; i < n; i += kBatch * stride) {
    int4 v[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k)
      if (i + k * stride < n) v[k] = src[i + k * stride];
#pragma unroll
    for (int k = 0; k < kBatch; ++k)
      if (i + k * stride < n) dst[i + k * stride] = v[k];
  }
}

__global__ void __launch_bounds__(kSetupThreads) MergeSetupKernel(const AttentionParams p) {
  LetDependentGridLaunch();
  const int64_t stride = int64_t(gridDim.x) * kSetupThreads;
  const int64_t first = int64_t(blockIdx.x) * kSetupThreads + threadIdx.x;
  // The plan's counts as this pass reads them: in place, or (a mapped plan, which other
  // CTAs are still copying) fetched over the bus once per CTA rather than per thread.
  const int32_t* meta = p.meta;
  __shared__ int32_t mapped_meta[kMetaFields];
  if (p.plan_source != nullptr) {
    if (threadIdx.x < kMetaFields)
      mapped_meta[threadIdx.x] = p.plan_source[p.layout.meta() + threadIdx.x];
    CopyPlan(reinterpret_cast<const int4*>(p.plan_source), reinterpret_cast<int4*>(p.plan_copy),
             p.layout.size() / 4, first, stride);
    __syncthreads();
    meta = mapped_meta;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0 && p.plan_acks != nullptr) {
    // A staged plan: tell its ring that the device has reached this call (plan_acks.h).
    // An ordinary launch starts after the stream's earlier work, dependent grids included.
    const int32_t entry = meta[kMetaAckEntry];
    if (entry >= 1 && entry <= kPlanAckEntries) {
      const uint64_t ticket = uint64_t(uint32_t(meta[kMetaTicketLow])) |
                              uint64_t(uint32_t(meta[kMetaTicketHigh])) << 32;
      reinterpret_cast<volatile uint64_t*>(p.plan_acks)[entry - 1] = ticket;
    }
  }
  const int64_t counters = int64_t(p.q_rows) * p.num_kv_heads;
  for (int64_t i = first; i < counters; i += stride) p.merge_counters[i] = 0;

  int64_t live = meta[kMetaNumTokens];
  live = live < 0 ? 0 : (live > p.q_rows ? p.q_rows : live);
  const int64_t row_elems = int64_t(p.num_qo_heads) * p.head_dim;  // 16-bit elements
  // Padding rows as 8-byte words (4 elements; head_dim % 4 == 0), then their lse.
  uint2* out = reinterpret_cast<uint2*>(static_cast<uint16_t*>(p.out) + live * row_elems);
  const int64_t words = (p.q_rows - live) * row_elems / 4;
  for (int64_t i = first; i < words; i += stride) out[i] = make_uint2(0u, 0u);
  float* lse = p.lse + live * p.num_qo_heads;
  const int64_t lse_n = (p.q_rows - live) * p.num_qo_heads;
  for (int64_t i = first; i < lse_n; i += stride) lse[i] = -INFINITY;
}

}  // namespace

cudaError_t LaunchMergeSetup(const AttentionParams& p, cudaStream_t stream) {
  // No rows: nothing to zero, unless a mapped plan must still reach the attention pass.
  if (p.q_rows <= 0 && p.plan_source == nullptr) return cudaSuccess;
  if (p.head_dim <= 0 || p.head_dim % 4 != 0 || p.num_qo_heads <= 0 || p.num_kv_heads <= 0 ||
      p.dtype == DType::kF32)
    return cudaErrorInvalidValue;
  const int64_t row_words = int64_t(p.num_qo_heads) * p.head_dim / 4;
  int64_t most = int64_t(p.q_rows) * (row_words > p.num_kv_heads ? row_words : p.num_kv_heads);
  int64_t ctas = (most + kSetupThreads - 1) / kSetupThreads;
  if (ctas > kMaxSetupCtas) ctas = kMaxSetupCtas;
  if (p.plan_source != nullptr) {
    // Enough threads that each loads one batch of the plan (CopyPlan); the count
    // depends on the capacities alone, like the rest of the launch.
    int64_t copy_ctas = (p.layout.size() / 4 + 4 * kSetupThreads - 1) / (4 * kSetupThreads);
    if (copy_ctas > kMaxCopyCtas) copy_ctas = kMaxCopyCtas;
    if (copy_ctas > ctas) ctas = copy_ctas;
  }
  if (ctas < 1) ctas = 1;
  MergeSetupKernel<<<unsigned(ctas), kSetupThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jax_pagedattn
