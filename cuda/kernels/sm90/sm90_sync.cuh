// Hopper (sm_90a) synchronisation primitives for the warp-specialised prefill kernel:
// shared-memory mbarriers (the producer/consumer ring), named barriers (one warpgroup, or
// the two consumer warpgroups), register hand-over between warpgroups (setmaxnreg), and
// the proxy fence that orders ordinary shared-memory writes before wgmma reads them.
// Thin PTX wrappers, so every ordering decision stays visible in the kernel.
#pragma once

#include <cstdint>
#include <cstdio>

namespace jax_pagedattn {
namespace sm90 {

__device__ __forceinline__ uint32_t SmemU32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarriers (64-bit objects in shared memory) -----------------------------------------
__device__ __forceinline__ void MbarInit(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Makes the inits visible to the other threads' mbarrier operations (and to the async
// proxy); a CTA barrier must still follow.
__device__ __forceinline__ void MbarInitFence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival, release semantics at CTA scope: this thread's earlier shared-memory writes
// are visible to a thread whose wait observes the phase completing.
__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile(
      "{\n\t.reg .b64 st;\n\t"
      "mbarrier.arrive.shared::cta.b64 st, [%0];\n\t}\n" ::"r"(bar)
      : "memory");
}

// One arrival that fires when every cp.async this thread issued so far has landed. The
// pending count is not raised first (.noinc): the barrier's init count includes it.
__device__ __forceinline__ void MbarArriveOnCpAsync(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// Waits (acquire, CTA scope) until the phase of parity `parity` has completed. A fresh
// barrier is in phase 0, so a wait on parity 1 returns at once ("the previous phase").
// With JPA_SM90_WATCHDOG (test builds) a wait longer than 4 s prints the barrier and traps,
// so a broken protocol shows as an error that names the barrier instead of a hang.
__device__ __forceinline__ bool MbarTryWait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n\t.reg .pred p;\n\t"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
      "selp.u32 %0, 1, 0, p;\n\t}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}
#ifdef JPA_SM90_WATCHDOG
__device__ __forceinline__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void MbarWaitSlow(uint32_t bar, uint32_t parity) {
  const uint64_t t0 = GlobalTimerNs();
  while (!MbarTryWait(bar, parity)) {
    if (GlobalTimerNs() - t0 > 4000000000ull) {
      printf("sm90 watchdog: block (%d, %d) thread %d waited > 4 s on the mbarrier at smem 0x%x "
             "(parity %u)\n",
             int(blockIdx.x), int(blockIdx.y), int(threadIdx.x), bar, parity);
      __trap();
    }
  }
}
#endif
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
#ifdef JPA_SM90_WATCHDOG
  if (!MbarTryWait(bar, parity)) MbarWaitSlow(bar, parity);
#else
  asm volatile(
      "{\n\t.reg .pred done;\n"
      "WAIT_%=:\n\t"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n\t"
      "@!done bra WAIT_%=;\n\t}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#endif
}

// ---- named barriers (ids 1..15; 0 is __syncthreads) ---------------------------------------
__device__ __forceinline__ void NamedSync(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void NamedArrive(uint32_t id, uint32_t threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

template <uint32_t kId>
__device__ __forceinline__ void NamedSyncImm(uint32_t threads) {
  asm volatile("bar.sync %0, %1;\n" ::"n"(kId), "r"(threads) : "memory");
}
template <uint32_t kId>
__device__ __forceinline__ void NamedArriveImm(uint32_t threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"n"(kId), "r"(threads) : "memory");
}

// The barrier kBase or kBase + 1, by a run-time choice, with the id an immediate in both
// branches (no register holds it): a warpgroup's own barrier of a pair.
template <uint32_t kBase>
__device__ __forceinline__ void NamedSyncOneOf(bool second, uint32_t threads) {
  if (second) {
    NamedSyncImm<kBase + 1>(threads);
  } else {
    NamedSyncImm<kBase>(threads);
  }
}
template <uint32_t kBase>
__device__ __forceinline__ void NamedArriveOneOf(bool second, uint32_t threads) {
  if (second) {
    NamedArriveImm<kBase + 1>(threads);
  } else {
    NamedArriveImm<kBase>(threads);
  }
}

// ---- proxies, registers ------------------------------------------------------------
// Orders this thread's generic-proxy shared-memory accesses (ordinary stores; data that
// reached this thread through a barrier) before its later async-proxy ones (wgmma reads).
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

template <int kRegs>
__device__ __forceinline__ void RegAlloc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void RegDealloc() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

}  // namespace sm90
}  // namespace jax_pagedattn
