// The split-merge step of split_merge.cuh (FinishSplitItem: count the partial rows of
// each token's GQA group; the CTA that completes a count merges the group), for a kernel
// where only some warps take part: the consumer warpgroups of the warp-specialised sm90
// prefill kernel, while its producer warpgroup goes on copying the next item's keys.
// FinishSplitItem itself synchronises with __syncthreads and strides by threadIdx.x, so
// it cannot be called there; the protocol and the merge (MergeQuad) are the same.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../dependent_launch.cuh"
#include "../split_merge.cuh"
#include "jax_pagedattn/params.h"
#include "sm90_sync.cuh"

namespace jax_pagedattn {
namespace sm90 {

// Called uniformly by the kThreads threads (thread index `tid` in [0, kThreads)) that
// synchronise on named barrier `bar_id`, right after they wrote the partial rows of a
// split item: packed rows [row_begin, row_end) of the request whose first query token is
// q_base, kv head `kv_head`. `scratch`: kMaxTokens + 1 ints of shared memory that only this
// function uses.
template <typename T, int kThreads, int kMaxTokens>
__device__ __forceinline__ void FinishSplitItemPartial(const AttentionParams& p, int tid, uint32_t bar_id,
                                                    int64_t q_base, int64_t row_begin,
                                                    int64_t row_end, int kv_head, int* scratch) {
  int& s_count = scratch[0];
  int* s_last = scratch + 1;
  const int64_t G = p.group_size;
  if (row_begin < 0) row_begin = 0;
  const int64_t first = row_begin / G;
  int64_t ntok = row_end > row_begin ? (row_end - 1) / G - first + 1 : 0;
  if (ntok > kMaxTokens) ntok = kMaxTokens;

  __threadfence();  // this thread's partial stores, before any count below
  if (tid == 0) s_count = 0;
  NamedSync(bar_id, kThreads);
  WaitForPrimaryGrid();  // the setup kernel's zeroed counters
  for (int i = tid; i < ntok; i += kThreads) {
    const int64_t tr = first + i;
    const int64_t t = q_base + tr;
    if (t < 0 || t >= p.q_rows) continue;
    const int rows = int((row_end < (tr + 1) * G ? row_end : (tr + 1) * G) -
                         (row_begin > tr * G ? row_begin : tr * G));
    const int splits = __ldg(p.merge_indptr + t + 1) - __ldg(p.merge_indptr + t);
    const int before = atomicAdd(p.merge_counters + t * p.num_kv_heads + kv_head, rows);
    if (before + rows == splits * int(G)) s_last[atomicAdd(&s_count, 1)] = int(t);
  }
  NamedSync(bar_id, kThreads);
  const int nmerge = s_count;
  // Everyone has read s_count before a later call's thread 0 resets it.
  NamedSync(bar_id, kThreads);
  if (nmerge == 0) return;
  __threadfence();  // the other CTAs' partials, counted above, are visible from here on

  const int quads = p.head_dim / 4;
  const int per_token = int(G) * quads;
  for (int i = tid; i < nmerge * per_token; i += kThreads) {
    const int k = i / per_token;
    const int rest = i - k * per_token;
    const int hg = rest / quads;
    const int d = (rest - hg * quads) * 4;
    const int64_t t = s_last[k];
    const int begin = __ldg(p.merge_indptr + t);
    int n = __ldg(p.merge_indptr + t + 1) - begin;
    if (begin < 0) continue;  // malformed offsets: never index before the workspace
    if (n > p.partial_rows_cap - begin) n = p.partial_rows_cap - begin;
    MergeQuad<T>(p, t, kv_head * int(G) + hg, d, begin, n);
  }
  // s_last is rewritten only after the first barrier of the next call, which every
  // thread reaches after its loop above.
}

}  // namespace sm90
}  // namespace jax_pagedattn
