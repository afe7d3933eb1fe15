// The pass that rotates a RoPE call's keys once, before the Hopper prefill kernel
// (AttentionParams::rope_keys, sm90_rope_keys). Without it that kernel's producer rotates
// every K tile in every CTA that loads it, and a request's tile is loaded once per query
// tile that sees it; with it the producer copies rotated keys like any other.
//
// Block i takes plan page-table slots i, i + gridDim.x, ... of [0, page_cap). Slot q
// belongs to the request b with kv_indptr[b] <= q < kv_indptr[b + 1] (a binary search
// over the plan's requests); its key slot s is key (q - kv_indptr[b]) * page_size + s of
// b, and the rotated key of kv head h goes to rope_keys[h][q * page_size + s], rotated
// to that key's index, the position the kernels' RoPE gives keys. Every slot of a page
// is rotated, also those past the request's last key (the attention kernel never reads
// them); a page id outside [0, num_pages) writes zeros (the attention kernel masks
// those keys itself).
//
// For any plan: the request count clamps to [0, batch_cap], a slot that no request
// owns is skipped, and slots stay in [0, page_cap), so every write lies inside the
// section and every cache read inside a page of the cache.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../dependent_launch.cuh"
#include "../rope.cuh"
#include "../vec_dtypes.cuh"
#include "jax_pagedattn/params.h"

namespace jax_pagedattn {
namespace sm90 {

constexpr int kRopeKeysThreads = 256;

// The request owning page-table slot q, or -1: the last b in [0, batch) with
// kv_indptr[b] <= q, if q < kv_indptr[b + 1].
__device__ __forceinline__ int RequestOfSlot(const AttentionParams& p, int batch, int q) {
  int lo = 0, hi = batch;  // the answer lies in [lo, hi)
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (__ldg(p.kv_indptr + mid) <= q) lo = mid; else hi = mid;
  }
  if (batch <= 0) return -1;
  return (__ldg(p.kv_indptr + lo) <= q && q < __ldg(p.kv_indptr + lo + 1)) ? lo : -1;
}

template <typename T, int D>
__global__ void __launch_bounds__(kRopeKeysThreads) RopeKeysKernel(const __grid_constant__ AttentionParams p) {
  // The attention kernel after this one waits for it; let it start loading queries.
  LetDependentGridLaunch();
  constexpr int kPairs = D / 16;  // 16-byte chunk c pairs with chunk c + kPairs
  __shared__ float freq[D / 2];
  RopeFrequencyTable(freq, D, p.rope_scale, p.rope_theta, threadIdx.x, blockDim.x);
  __syncthreads();
  const int ps = p.kv.page_size;
  const int hkv = p.num_kv_heads;
  const int batch = min(max(__ldg(p.meta + kMetaNumRequests), 0), p.layout.batch_cap);
  const int64_t key_cap = int64_t(p.layout.page_cap) * ps;
  const T* kbase = static_cast<const T*>(p.kv.k);
  T* out = static_cast<T*>(p.rope_keys);
  const int per_slot = ps * hkv * kPairs;
  for (int q = blockIdx.x; q < p.layout.page_cap; q += gridDim.x) {
    const int b = RequestOfSlot(p, batch, q);
    if (b < 0) continue;
    const int pid = __ldg(p.kv_indices + q);
    const bool valid = pid >= 0 && pid < p.kv.num_pages;
    const int64_t first_key = int64_t(q - __ldg(p.kv_indptr + b)) * ps;
    for (int t = threadIdx.x; t < per_slot; t += blockDim.x) {
      const int c = t % kPairs;
      const int h = (t / kPairs) % hkv;
      const int s = t / (kPairs * hkv);
      uint4 lo = make_uint4(0u, 0u, 0u, 0u), hi = lo;
      if (valid) {
        const T* src = kbase + p.kv.offset(pid, s, h) + c * 8;
        lo = *reinterpret_cast<const uint4*>(src);
        hi = *reinterpret_cast<const uint4*>(src + D / 2);
        RopePairs<T>(lo, hi, float(first_key + s), freq + c * 8);
      }
      T* dst = out + (int64_t(h) * key_cap + int64_t(q) * ps + s) * D + c * 8;
      *reinterpret_cast<uint4*>(dst) = lo;
      *reinterpret_cast<uint4*>(dst + D / 2) = hi;
    }
  }
  // Never finish before the setup pass before this one (dependent_launch.cuh): the
  // attention kernel's wait for this grid then covers both.
  WaitForPrimaryGrid();
}

}  // namespace sm90
}  // namespace jax_pagedattn
