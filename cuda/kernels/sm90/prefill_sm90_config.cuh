// The Hopper prefill kernel's static configuration (PrefillSm90Cfg: tiles, shared-memory
// layout, barrier counts, register split, CuTe layouts and MMAs) and the helpers its
// producer and consumers share (Sw128Chunk, ItemTiles). The kernel's design:
// prefill_sm90_kernel.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "../fast_divmod.cuh"
#include "../logit_transforms.cuh"
#include "../work_item.cuh"
#include "jax_pagedattn/params.h"

namespace jax_pagedattn {
namespace sm90 {

template <typename T>
struct CuteElem;
template <>
struct CuteElem<__nv_bfloat16> {
  using type = cute::bfloat16_t;
};
template <>
struct CuteElem<__half> {
  using type = cute::half_t;
};

// The kernel's variants (bits of `Variant`): 0 in the library; the others are layouts
// under measurement, built only into the kernel harness (JPA_SM90_VARIANTS,
// prefill_sm90_variants.cu):
//   kVariantTwoVStages   the V ring holds 2 tiles whatever `Stages` says (the K ring keeps
//                        `Stages`), which at head_dim 128 with 3 stages frees the shared
//                        memory of a second Q buffer: the next item's Q is then copied
//                        during the current item instead of being waited for at its start.
constexpr int kVariantTwoVStages = 1;

template <typename T, int D, int Stages, int Variant = 0>
struct PrefillSm90Cfg {
  static_assert(D == 64 || D == 128 || D == 256, "the sm90 prefill kernel covers head_dim 64, 128, 256");
  using TE = typename CuteElem<T>::type;
  static constexpr int kTileQ = 128;   // packed rows per item (2 consumer warpgroups x 64)
  static constexpr int kWgRows = 64;
  // Keys per tile: 64 at D = 256 keeps two K and two V stages, the Q tile and the O
  // accumulators (128 floats a thread) within shared memory and 240 registers.
  static constexpr int kTileKv = D == 256 ? 64 : 128;
  static constexpr int kStagesK = Stages;  // K tiles in flight
  static constexpr int kStagesV = (Variant & kVariantTwoVStages) != 0 && Stages > 2 ? 2 : Stages;
  static constexpr int kPanels = D / 64;       // 128-byte swizzle panels of a row
  static constexpr int kPairChunks = D / 16;   // RoPE pairs 16-byte chunk c with c + D / 16
  static constexpr int kRowLanes = D / 8;      // producer lanes per key row (16 bytes each)
  static constexpr int kStepRows = 32 / kRowLanes;  // key rows per warp-wide copy
  static constexpr int kCopyWarps = kTileKv / 32;   // producer warps with keys (32 each)
  static constexpr int kMaskWords = kTileKv / 32;
  static constexpr int kThreads = 384;
  // setmaxnreg moves registers between warpgroups within what the CTA was launched with
  // (kThreads x kLaunchRegs): a consumer's increase waits until the producer's decrease
  // has freed enough, forever if the split asks for more. Head_dim 256 keeps 240 for the
  // consumers (their 64 x 256 accumulators spill in the main loop at 232).
  static constexpr int kLaunchRegs = (65536 / kThreads) & ~7;  // __launch_bounds__(kThreads, 1)
  static constexpr int kProducerRegs = D == 256 ? 24 : 56;
  static constexpr int kConsumerRegs = D == 256 ? 240 : 224;
  static_assert(256 * kConsumerRegs + 128 * kProducerRegs <= kThreads * kLaunchRegs,
                "setmaxnreg split beyond the CTA's registers: the consumers' increase would hang");
  static constexpr int kHalfBytes = 128;     // one 64-element panel of a row
  static constexpr int kQWgBytes = kWgRows * D * 2;
  static constexpr int kKvBytes = kTileKv * D * 2;

  // Tasks drawn ahead and not yet read by every reader thread (TaskSchedule), each slot
  // a Task as an int2 (item, head).
  static constexpr int kTaskSlots = 4;
  static constexpr int kTaskSlotBytes = 8;
  static constexpr int kScratchInts = kTileQ + 1;
  // What follows the K/V ring, as offsets from its end: the ring's barriers, the task
  // barriers and slots, the K stages' mask words, the RoPE frequencies and the
  // split-merge scratch.
  static constexpr int kTaskBarTail = 2 * (kStagesK + kStagesV) * 8;
  static constexpr int kTaskTail = kTaskBarTail + 2 * kTaskSlots * 8;
  static constexpr int kMaskTail = kTaskTail + kTaskSlots * kTaskSlotBytes;
  static constexpr int kFreqTail = kMaskTail + kStagesK * 16;
  static constexpr int kScratchTail = kFreqTail + D / 2 * 4;
  static constexpr int kTailBytes = kScratchTail + kScratchInts * 4;
  static constexpr int kSlackBytes = 1024;  // to round the dynamic base up to 1024
  // Two Q buffers where shared memory allows: the consumers copy the next item's Q into
  // one while the current item's GEMMs read the other.
  static constexpr int kBytesWithTwoQ =
      2 * 2 * kQWgBytes + (kStagesK + kStagesV) * kKvBytes + kTailBytes + kSlackBytes;
  static constexpr int kQBufs = kBytesWithTwoQ <= 227 * 1024 ? 2 : 1;
  static constexpr int kQOff = 0;
  static constexpr int kKOff = kQOff + kQBufs * 2 * kQWgBytes;
  static constexpr int kVOff = kKOff + kStagesK * kKvBytes;
  static constexpr int kBarOff = kVOff + kStagesV * kKvBytes;
  static constexpr int kTaskBarOff = kBarOff + kTaskBarTail;
  static constexpr int kTaskOff = kBarOff + kTaskTail;
  static constexpr int kMaskOff = kBarOff + kMaskTail;
  static constexpr int kFreqOff = kBarOff + kFreqTail;
  static constexpr int kScratchOff = kBarOff + kScratchTail;
  static constexpr int kEnd = kBarOff + kTailBytes;
  static constexpr int kSmemBytes = kEnd + kSlackBytes;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of one CTA");

  // Barrier counts: 128 producer threads' copies (+ one mask word per producer warp for K);
  // the consumers release a K stage thread by thread and a V stage warp by warp.
  static constexpr uint32_t kFullKCount = 32 * kCopyWarps + kCopyWarps;
  static constexpr uint32_t kFullVCount = 32 * kCopyWarps;
  static constexpr uint32_t kEmptyKCount = 256;  // every consumer thread (mask readers)
  static constexpr uint32_t kEmptyVCount = 8;    // one arrival per consumer warp
  // A task slot is read by every thread of the copying producer warps and of the
  // consumers, each releasing it itself (its own arrival orders its read before the
  // slot's next write, as for the K stages' mask words).
  static constexpr uint32_t kTaskReaders = 32 * kCopyWarps + 256;

  // The ring's mbarriers from the base `bars` (kBarOff): K stage s full / empty, V stage
  // s full / empty.
  __device__ static uint32_t FullK(uint32_t bars, uint32_t s) { return bars + 8 * s; }
  __device__ static uint32_t FullV(uint32_t bars, uint32_t s) { return bars + 8 * (kStagesK + s); }
  __device__ static uint32_t EmptyK(uint32_t bars, uint32_t s) {
    return bars + 8 * (kStagesK + kStagesV + s);
  }
  __device__ static uint32_t EmptyV(uint32_t bars, uint32_t s) {
    return bars + 8 * (2 * kStagesK + kStagesV + s);
  }

  // Named barriers.
  static constexpr uint32_t kBarWg0 = 1;        // + wg: one consumer warpgroup (128)
  static constexpr uint32_t kBarConsumers = 3;  // both consumer warpgroups (256)
  static constexpr uint32_t kBarTurn0 = 4;      // + wg: that warpgroup's turn to issue (pingpong)

  using LayoutQ = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<TE>{},
                                               cute::Shape<cute::Int<kWgRows>, cute::Int<D>>{}));
  using LayoutK = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<TE>{},
      cute::Shape<cute::Int<kTileKv>, cute::Int<D>, cute::Int<kStagesK>>{}));
  // V stored [key][d] like K, read as V^T (d, key): d contiguous, i.e. MN-major for the
  // B operand; 8-key groups 1 KB apart, d panels kTileKv * 128 bytes apart.
  using LayoutVt = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_MN_SW128_Atom<TE>{},
      cute::Shape<cute::Int<D>, cute::Int<kTileKv>, cute::Int<kStagesV>>{},
      cute::Step<cute::_2, cute::_1, cute::_3>{}));
  using MmaQK = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<TE, TE, float,
                                 cute::Shape<cute::Int<kWgRows>, cute::Int<kTileKv>, cute::Int<D>>>()));
  using MmaPV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<TE, TE, float,
                                 cute::Shape<cute::Int<kWgRows>, cute::Int<D>, cute::Int<kTileKv>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>()));
};

// Byte offset of 16-byte chunk `c` (of D / 8) of row `r` in an SW128 K-major tile of
// kRows rows (the layout in the header comment).
template <int kRows>
__device__ __forceinline__ uint32_t Sw128Chunk(int r, int c) {
  return uint32_t((c >> 3) * (kRows * 128)) + uint32_t(r * 128) + uint32_t(((c & 7) ^ (r & 7)) << 4);
}

// The keys an item's CTA visits: [kv_lo, kv_hi), kv_lo raised to the sliding window's
// start for the item's first row, kv_hi cut at the causal limit of its last row; n tiles
// of kTileKv. Producer and consumers derive it alike.
struct TileRange {
  int kv_lo, kv_hi, n;
};
// `group`: division by p.group_size.
template <int kTileKv>
__device__ __forceinline__ TileRange ItemTiles(const AttentionParams& p, const WorkItem& it,
                                               const FastDivmod& group) {
  TileRange r;
  const int first = WindowStart(p, it.pos_base + group.Div(it.row_begin));
  r.kv_lo = it.kv_begin > first ? it.kv_begin : first;
  int hi = it.kv_end;
  if (p.causal) {
    const int lim = it.pos_base + group.Div(it.row_begin + it.num_rows - 1) + 1;
    hi = hi < lim ? hi : lim;
  }
  r.kv_hi = hi;
  r.n = hi > r.kv_lo ? (hi - r.kv_lo + kTileKv - 1) / kTileKv : 0;
  return r;
}

}  // namespace sm90
}  // namespace jax_pagedattn
