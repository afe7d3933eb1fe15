// Hopper (sm_90a) paged prefill: wgmma (CuTe GMMA atoms), warp specialisation, one CTA
// per SM drawing (work item, kv head) tasks costliest first (TaskSchedule), with the
// semantics of the sm80 kernel (prefill_kernel.cuh): packed GQA rows, bottom-right causal,
// ALiBi, in-kernel RoPE, masked bad page ids, split items merged by the last CTA.
//
// Roles (384 threads, one CTA per SM):
//   warpgroups 0, 1  consumers; each owns 64 of the item's 128 packed query rows. Per
//                    KV tile: S = Q K^T (wgmma, both operands in shared memory), online
//                    softmax in registers (base 2), O += P V (wgmma, P from registers).
//   warpgroup 2      producer: gathers K/V tiles page by page with cp.async (16-byte
//                    copies, 64-bit element offsets) into a ring of `Stages` (2 or 3)
//                    tiles each; rotates K in place when RoPE is on (unless a pass before
//                    the kernel rotated the keys once: kFlagRopeKeys). Each copying warp
//                    owns 32 keys of a tile (kTileKv / 32 warps copy; the rest leave).
// setmaxnreg moves registers from the producer to the consumers (PrefillSm90Cfg).
//
// Ring: K and V have their own stages and mbarriers (full: data landed; empty: both
// consumer warpgroups are done with it). The producer fills K(i+1) before V(i), the order
// in which the consumers need them. A full barrier completes on the cp.async arrivals of
// the copying producer threads (cp.async.mbarrier.arrive.noinc), plus, for K, one ordinary
// arrival per producer warp that publishes the tile's key-validity mask (32 keys a
// word: past the item's keys or a page id outside [0, num_pages)). The consumers fence
// the async proxy after each wait, before wgmma reads what cp.async wrote.
//
// Consumer schedule (tiles in reverse key order, so the tiles that need masks, the
// causal diagonal and the ragged end, come first): iteration i issues S_i = Q K_i^T,
// then O += P_{i-1} V_{i-1}, waits for S_i alone (wgmma.wait_group 1) and computes its
// softmax while that GEMM runs, then waits for it (a guard keeps ptxas from moving
// that wait above the softmax: prefill_sm90_consumer.cuh); the other warpgroup's GEMMs
// fill the tensor cores too. With `pingpong` the two consumer warpgroups also take turns to
// issue their GEMMs (named barriers).
//
// Shared memory (base rounded up to 1024 bytes, the 128-byte swizzle's period):
//   Q     [kQBufs][2 warpgroups][64 rows][D]  GMMA K-major SW128 (also each warpgroup's O
//         staging); with 2 buffers the next item's Q is copied while this one runs
//   K, V  [Stages][kTileKv keys][D]      GMMA K-major SW128; V is read as MN-major V^T
//         (kTileKv: 128 keys, 64 at D = 256)
//   mbarriers, key masks [Stages][4] u32, RoPE frequencies [D/2], split-merge scratch.
// An SW128 tile of R rows keeps d in [0, 64) of every row first (one 128-byte panel),
// then d in [64, 128), and so on (D / 64 panels): row r's 16-byte chunk c (c < 8) of
// panel h sits at h * R * 128 + r * 128 + ((c ^ r % 8) * 16).
// Files: prefill_sm90_config.cuh (PrefillSm90Cfg, the shared helpers), task_schedule.cuh
// (TaskSchedule), prefill_sm90_producer.cuh (ProduceItems), prefill_sm90_consumer.cuh
// (ConsumeItems); this one holds the kernel's flags and its entry.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../dependent_launch.cuh"
#include "../rope.cuh"
#include "jax_pagedattn/params.h"
#include "prefill_sm90_config.cuh"
#include "prefill_sm90_consumer.cuh"
#include "prefill_sm90_producer.cuh"
#include "sm90_sync.cuh"
#include "task_schedule.cuh"

namespace jax_pagedattn {
namespace sm90 {

// Grid: [CTAs the device holds at once] (drawn tasks), or [bin_cap, num_kv_heads] with
// kFlagStaticBins; Cfg::kThreads threads, Cfg::kSmemBytes dynamic shared memory.
// `flags`: kFlagPingpong; kFlagNoKvCopy (a measurement, never a result: the producer runs
// its protocol without copying K/V, so the time left is the consumers'); kFlagStaticBins
// (the plan's bins instead of drawn tasks, TaskSchedule); kFlagRopeKeys (RoPE keys come
// rotated from p.rope_keys, written by the grid before this one: rope_keys.cuh).
constexpr int kFlagPingpong = 1;
constexpr int kFlagNoKvCopy = 2;
constexpr int kFlagStaticBins = 4;
constexpr int kFlagRopeKeys = 8;
// Variant: the kernel's variants under measurement (prefill_sm90_config.cuh, kVariant*;
// 0 in the library).
template <typename T, int D, int Stages, int Variant = 0>
__global__ void __launch_bounds__(PrefillSm90Cfg<T, D, Stages, Variant>::kThreads, 1)
    PrefillSm90Kernel(const __grid_constant__ AttentionParams p, const int flags) {
#if defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  using Cfg = PrefillSm90Cfg<T, D, Stages, Variant>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (SmemU32(smem_raw) & 1023u)) & 1023u);
  const int tid = threadIdx.x;
  if (tid == 0) {
    const uint32_t bars = SmemU32(smem + Cfg::kBarOff);
    for (int s = 0; s < Cfg::kStagesK; ++s) {
      MbarInit(Cfg::FullK(bars, s), Cfg::kFullKCount);
      MbarInit(Cfg::EmptyK(bars, s), Cfg::kEmptyKCount);
    }
    for (int s = 0; s < Cfg::kStagesV; ++s) {
      MbarInit(Cfg::FullV(bars, s), Cfg::kFullVCount);
      MbarInit(Cfg::EmptyV(bars, s), Cfg::kEmptyVCount);
    }
    const uint32_t task_bars = SmemU32(smem + Cfg::kTaskBarOff);
    for (int s = 0; s < Cfg::kTaskSlots; ++s) {
      MbarInit(task_bars + 8 * s, 1);
      MbarInit(task_bars + 8 * (Cfg::kTaskSlots + s), Cfg::kTaskReaders);
    }
    MbarInitFence();
  }
  if (p.pos_encoding == PosEncoding::kRopeLlama) {  // for Q (and K without kFlagRopeKeys)
    // The double-precision formula of the CPU backend and the sm80 kernel.
    float* s_freq = reinterpret_cast<float*>(smem + Cfg::kFreqOff);
    RopeFrequencyTable(s_freq, D, p.rope_scale, p.rope_theta, tid, Cfg::kThreads);
  }
  __syncthreads();
  const TaskSchedule tasks = TaskSchedule::Make<Cfg>(p, smem, (flags & kFlagStaticBins) == 0);
  if (tid >= 256) {
    RegDealloc<Cfg::kProducerRegs>();
    if (flags & kFlagRopeKeys) {
      ProduceItems<T, D, Stages, Variant, true>(p, smem, tasks, (flags & kFlagNoKvCopy) == 0);
    } else {
      ProduceItems<T, D, Stages, Variant, false>(p, smem, tasks, (flags & kFlagNoKvCopy) == 0);
    }
  } else {
    RegAlloc<Cfg::kConsumerRegs>();
    ConsumeItems<T, D, Stages, Variant>(p, smem, tasks, (flags & kFlagPingpong) != 0);
  }
  WaitForPrimaryGrid();  // never finish before the setup pass (dependent_launch.cuh)
#else
  // Built for a target without wgmma/setmaxnreg (anything but sm_90a): the launcher only
  // launches on compute capability 9.0, where such code could only come from a JIT of
  // older PTX; fail loudly rather than return nothing.
  (void)p;
  (void)flags;
  __trap();
#endif
}

}  // namespace sm90
}  // namespace jax_pagedattn
