// Split-KV merging inside the attention kernels: the CTA that writes the last partial
// of a token's GQA group merges that group's partials into out/lse.
//
// Why not a merge pass after the kernel: that pass starts only once the attention grid
// has drained, and on an H200 it added 3-5 us to every op (launch, ramp-up, dependent
// loads), 1.5-7% of a decode kernel. Here the op ends with the attention grid: a token
// whose last piece finishes early is merged while other CTAs still stream keys, and
// only the merges of the last pieces remain on the kernel's tail (which is why short
// kernels, 16x4096 on an H200, gained nothing: docs/PERF_NOTES.md).
//
// Protocol, per (token t, kv head h): merge_counters[t][h] counts the partial rows
// written for t's heads of group h. The setup kernel (merge_setup.cu) zeroes the counters
// before the attention grid touches them (the attention kernel is its dependent grid,
// dependent_launch.cuh). A CTA that finishes a split item: every thread fences its
// partial stores, the CTA syncs, then one thread per token adds the item's rows of that
// token (its heads) to the counter; the CTA whose add completes splits x G rows is the
// last one, fences, and merges (reading the other CTAs' partials from L2).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dependent_launch.cuh"
#include "jax_pagedattn/params.h"
#include "softmax_state.cuh"
#include "vec_dtypes.cuh"

namespace jax_pagedattn {

// out/lse of (token t, head h), dims [d, d + 4), from the n partial rows of t:
// m = max lse_i, out = sum 2^(lse_i - m) o_i / sum 2^(lse_i - m), lse = m + log2(sum).
// All -inf gives out 0 and lse -inf. The merge sits on the kernel's tail, so partials
// are read kBatch at a time with all loads of a batch independent (one L2 round trip
// for the usual 2-4 splits), folded in with a running maximum. Partials come from
// other CTAs: the loads skip L1.
template <typename T>
__device__ __forceinline__ void MergeQuad(const AttentionParams& p, int64_t t, int h, int d,
                                          int begin, int n) {
  constexpr int kBatch = 4;
  const int H = p.num_qo_heads, D = p.head_dim;
  const float* plse = p.partial_lse + int64_t(begin) * H + h;
  const float* po = p.partial_o + (int64_t(begin) * H + h) * D + d;
  const int64_t o_stride = int64_t(H) * D;
  float m = -INFINITY, sum = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int i0 = 0; i0 < n; i0 += kBatch) {
    float l[kBatch];
    float4 o[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const bool in = i0 + k < n;
      l[k] = in ? __ldcg(plse + int64_t(i0 + k) * H) : -INFINITY;
      o[k] = in ? __ldcg(reinterpret_cast<const float4*>(po + (i0 + k) * o_stride))
                : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    float m_new = m;
#pragma unroll
    for (int k = 0; k < kBatch; ++k) m_new = fmaxf(m_new, l[k]);
    const float base = SafeMax(m_new);
    const float keep = FastExp2(m - base);  // 0 while nothing was folded in (m = -inf)
    sum *= keep;
    acc = make_float4(acc.x * keep, acc.y * keep, acc.z * keep, acc.w * keep);
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const float w = FastExp2(l[k] - base);
      sum += w;
      acc.x = fmaf(w, o[k].x, acc.x);
      acc.y = fmaf(w, o[k].y, acc.y);
      acc.z = fmaf(w, o[k].z, acc.z);
      acc.w = fmaf(w, o[k].w, acc.w);
    }
    m = m_new;
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  T* out = static_cast<T*>(p.out) + (t * H + h) * D + d;
  *reinterpret_cast<uint2*>(out) =
      Pack4<T>(make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv));
  if (d == 0) p.lse[t * H + h] = sum > 0.f ? m + log2f(sum) : -INFINITY;
}

// Called uniformly by a group of kThreads threads (`tid` in [0, kThreads); `sync()` a
// barrier over exactly them), right after they wrote the partial rows of a split item:
// packed rows [row_begin, row_end) of the request whose first query token is q_base, for
// kv head `kv_head`. kMaxTokens bounds the tokens of one item (a malformed plan with more
// only loses merges, never writes out of bounds). `scratch` (kMaxTokens + 1 ints of the
// kernel's dynamic shared memory) must be a region that the item's epilogue does not
// read. It is not static shared memory: that would sit in front of the dynamic buffer
// and shift it off the 128-byte alignment whose bank pattern the CUDA-core kernel's
// swizzle relies on (seen: that kernel 25% slower).
// kGuardReset: one more barrier once everyone has read the count, for a group whose next
// call can come with no other barrier between (thread 0 resets the count first thing).
template <typename T, int kThreads, int kMaxTokens, bool kGuardReset, typename Sync>
__device__ __forceinline__ void FinishSplitItemIn(const AttentionParams& p, int tid, Sync&& sync,
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
  sync();
  WaitForPrimaryGrid();  // the setup kernel's zeroed counters
  for (int i = tid; i < ntok; i += kThreads) {
    const int64_t tr = first + i;  // token index within the request
    const int64_t t = q_base + tr;
    if (t < 0 || t >= p.q_rows) continue;
    const int rows = int((row_end < (tr + 1) * G ? row_end : (tr + 1) * G) -
                         (row_begin > tr * G ? row_begin : tr * G));
    const int splits = __ldg(p.merge_indptr + t + 1) - __ldg(p.merge_indptr + t);
    const int before = atomicAdd(p.merge_counters + t * p.num_kv_heads + kv_head, rows);
    if (before + rows == splits * int(G)) s_last[atomicAdd(&s_count, 1)] = int(t);
  }
  sync();
  const int nmerge = s_count;
  if constexpr (kGuardReset) sync();
  if (nmerge == 0) return;
  __threadfence();  // the other CTAs' partials, counted above, are visible from here on

  const int quads = p.head_dim / 4;
  const int per_token = G * quads;
  for (int i = tid; i < nmerge * per_token; i += kThreads) {
    const int k = i / per_token;
    const int rest = i - k * per_token;
    const int hg = rest / quads;
    const int d = (rest - hg * quads) * 4;
    const int64_t t = s_last[k];
    const int begin = __ldg(p.merge_indptr + t);
    int n = __ldg(p.merge_indptr + t + 1) - begin;
    if (begin < 0) continue;  // malformed offsets: never index before the workspace
    if (n > p.caps.partial_rows - begin) n = p.caps.partial_rows - begin;
    MergeQuad<T>(p, t, kv_head * G + hg, d, begin, n);
  }
  // s_last is rewritten only after the first barrier of the next call, which every
  // thread reaches after its loop above.
}

// FinishSplitItemIn for the whole CTA, synchronised by __syncthreads.
// Not inlined: inlined, it pushed the 64-row prefill tile past its register cap.
template <typename T, int kThreads, int kMaxTokens>
__device__ __noinline__ void FinishSplitItem(const AttentionParams& p, int64_t q_base,
                                             int64_t row_begin, int64_t row_end,
                                             int kv_head, int* scratch) {
  FinishSplitItemIn<T, kThreads, kMaxTokens, false>(
      p, int(threadIdx.x), [] { __syncthreads(); }, q_base, row_begin, row_end, kv_head,
      scratch);
}

}  // namespace jax_pagedattn
