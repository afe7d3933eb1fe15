// The setup pass of an attention call, launched just before the attention kernel:
// zeroes the split-merge counters of rows [0, q_rows) (split_merge.cuh) and the task
// counter (the Hopper prefill kernel's tasks, sm90/task_schedule.cuh), and zero-fills
// the padding rows t >= meta[kMetaNumTokens] (out = 0, lse = -inf), which no work item
// writes.
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
#include "launchers.h"

namespace jax_pagedattn {
namespace {

constexpr int kSetupThreads = 256;
constexpr int kMaxSetupCtas = 64;

__global__ void __launch_bounds__(kSetupThreads) MergeSetupKernel(const AttentionParams p) {
  LetDependentGridLaunch();
  const int64_t stride = int64_t(gridDim.x) * kSetupThreads;
  const int64_t first = int64_t(blockIdx.x) * kSetupThreads + threadIdx.x;
  const int64_t counters = int64_t(p.q_rows) * p.num_kv_heads;
  for (int64_t i = first; i < counters; i += stride) p.merge_counters[i] = 0;
  if (first == 0 && p.task_counter != nullptr) *p.task_counter = 0;

  int64_t live = p.meta[kMetaNumTokens];
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
  if (p.q_rows <= 0) return cudaSuccess;  // no rows: nothing to zero
  if (p.head_dim <= 0 || p.head_dim % 4 != 0 || p.num_qo_heads <= 0 || p.num_kv_heads <= 0 ||
      p.dtype == DType::kF32)
    return cudaErrorInvalidValue;
  const int64_t row_words = int64_t(p.num_qo_heads) * p.head_dim / 4;
  int64_t most = int64_t(p.q_rows) * (row_words > p.num_kv_heads ? row_words : p.num_kv_heads);
  int64_t ctas = (most + kSetupThreads - 1) / kSetupThreads;
  if (ctas > kMaxSetupCtas) ctas = kMaxSetupCtas;
  if (ctas < 1) ctas = 1;
  MergeSetupKernel<<<unsigned(ctas), kSetupThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jax_pagedattn
