// cp.async (sm_80+): asynchronous 16-byte global -> shared copies.
//
// The data never passes through registers, so a warp can keep several tiles of a stream
// in flight while it computes on an earlier one; completion is tracked per thread in
// commit groups. Self-contained: include it from any kernel.
#pragma once

#include <cstdint>

namespace jax_pagedattn {
namespace cp_async {

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 bytes from global `src` to shared `dst`, or writes 16 zero bytes when `pred`
// is false (src-size 0: nothing is read, so `src` may then point anywhere). Zero-filling
// instead of skipping keeps every shared slot finite, so a masked key (probability 0)
// can never bring a stale NaN/Inf into a p * v product.
// .cg caches in L2 only: streamed K/V are read once per CTA, L1 would only evict lines
// that are reused (page table, q).
// `dst` as a shared-memory address (what SharedAddress returns), for kernels that compute
// swizzled tile offsets in that space.
__device__ __forceinline__ void Copy16(uint32_t dst, const void* src, bool pred) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_size)
               : "memory");
}
__device__ __forceinline__ void Copy16(void* dst, const void* src, bool pred) {
  Copy16(SharedAddress(dst), src, pred);
}

// An L2 policy that marks lines as first to evict: for data streamed once (the K/V of a
// decode step), so it does not push out what is reused (page table, q, partials).
__device__ __forceinline__ uint64_t EvictFirstPolicy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

// Copy16 with an L2 cache policy from EvictFirstPolicy().
__device__ __forceinline__ void Copy16(void* dst, const void* src, bool pred, uint64_t policy) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(
                   SharedAddress(dst)),
               "l"(src), "r"(src_size), "l"(policy)
               : "memory");
}

// 8 bytes (an fp8 cache's 8-element chunk) with an L2 cache policy; zero-fills the 8
// bytes when `pred` is false. .ca: the only cp.async flavour with 8-byte copies.
__device__ __forceinline__ void Copy8(void* dst, const void* src, bool pred, uint64_t policy) {
  const int src_size = pred ? 8 : 0;
  asm volatile("cp.async.ca.shared.global.L2::cache_hint [%0], [%1], 8, %2, %3;\n" ::"r"(
                   SharedAddress(dst)),
               "l"(src), "r"(src_size), "l"(policy)
               : "memory");
}
__device__ __forceinline__ void Copy8(void* dst, const void* src, bool pred) {
  const int src_size = pred ? 8 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(SharedAddress(dst)),
               "l"(src), "r"(src_size)
               : "memory");
}

// Closes the current group of this thread's copies.
__device__ __forceinline__ void Commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's groups are still pending. Other threads' copies
// become visible only after a barrier (__syncwarp / __syncthreads) that follows.
template <int N>
__device__ __forceinline__ void WaitGroup() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace cp_async
}  // namespace jax_pagedattn
