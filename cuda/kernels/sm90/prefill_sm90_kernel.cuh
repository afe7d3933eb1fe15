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
// then O += P_{i-1} V_{i-1}, and computes the softmax of S_i while the second GEMM runs
// (wgmma.wait_group 1). With `pingpong` the two consumer warpgroups also take turns to
// issue their GEMMs (named barriers), so one warpgroup's softmax overlaps the other's
// GEMMs.
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
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "../cp_async.cuh"
#include "../logit_transforms.cuh"
#include "../dependent_launch.cuh"
#include "../rope.cuh"
#include "../softmax_state.cuh"
#include "../split_merge.cuh"
#include "../vec_dtypes.cuh"
#include "../work_item.cuh"
#include "jax_pagedattn/params.h"
#include "sm90_sync.cuh"

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

template <typename T, int D, int Stages>
struct PrefillSm90Cfg {
  static_assert(D == 64 || D == 128 || D == 256, "the sm90 prefill kernel covers head_dim 64, 128, 256");
  using TE = typename CuteElem<T>::type;
  static constexpr int kTileQ = 128;   // packed rows per item (2 consumer warpgroups x 64)
  static constexpr int kWgRows = 64;
  // Keys per tile: 64 at D = 256 keeps two K and two V stages, the Q tile and the O
  // accumulators (128 floats a thread) within shared memory and 240 registers.
  static constexpr int kTileKv = D == 256 ? 64 : 128;
  static constexpr int kStages = Stages;  // K and V tiles each in flight
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

  // Two Q buffers where shared memory allows: the consumers copy the next item's Q into
  // one while the current item's GEMMs read the other.
  static constexpr int kQBufs =
      2 * 2 * kQWgBytes + 2 * kStages * kKvBytes + 4096 <= 227 * 1024 ? 2 : 1;
  static constexpr int kQOff = 0;
  static constexpr int kKOff = kQOff + kQBufs * 2 * kQWgBytes;
  static constexpr int kVOff = kKOff + kStages * kKvBytes;
  // Tasks drawn ahead and not yet read by every reader thread (TaskSchedule).
  static constexpr int kTaskSlots = 4;
  static constexpr int kBarOff = kVOff + kStages * kKvBytes;
  static constexpr int kTaskBarOff = kBarOff + 4 * kStages * 8;
  static constexpr int kTaskOff = kTaskBarOff + 2 * kTaskSlots * 8;
  static constexpr int kMaskOff = kTaskOff + kTaskSlots * 8;
  static constexpr int kFreqOff = kMaskOff + kStages * 16;
  static constexpr int kScratchOff = kFreqOff + D / 2 * 4;
  static constexpr int kScratchInts = kTileQ + 1;
  static constexpr int kEnd = kScratchOff + kScratchInts * 4;
  static constexpr int kSmemBytes = kEnd + 1024;  // slack to round the base up to 1024
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

  // Named barriers.
  static constexpr uint32_t kBarWg0 = 1;        // + wg: one consumer warpgroup (128)
  static constexpr uint32_t kBarConsumers = 3;  // both consumer warpgroups (256)
  static constexpr uint32_t kBarTurn0 = 4;      // + wg: that warpgroup's turn to issue (pingpong)

  using LayoutQ = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<TE>{},
                                               cute::Shape<cute::Int<kWgRows>, cute::Int<D>>{}));
  using LayoutK = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<TE>{},
      cute::Shape<cute::Int<kTileKv>, cute::Int<D>, cute::Int<kStages>>{}));
  // V stored [key][d] like K, read as V^T (d, key): d contiguous, i.e. MN-major for the
  // B operand; 8-key groups 1 KB apart, d panels kTileKv * 128 bytes apart.
  using LayoutVt = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_MN_SW128_Atom<TE>{},
      cute::Shape<cute::Int<D>, cute::Int<kTileKv>, cute::Int<kStages>>{},
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
template <int kTileKv>
__device__ __forceinline__ TileRange ItemTiles(const AttentionParams& p, const WorkItem& it) {
  TileRange r;
  const int first = WindowStart(p, it.pos_base + it.row_begin / p.group_size);
  r.kv_lo = it.kv_begin > first ? it.kv_begin : first;
  int hi = it.kv_end;
  if (p.causal) {
    const int lim = it.pos_base + (it.row_begin + it.num_rows - 1) / p.group_size + 1;
    hi = hi < lim ? hi : lim;
  }
  r.kv_hi = hi;
  r.n = hi > r.kv_lo ? (hi - r.kv_lo + kTileKv - 1) / kTileKv : 0;
  return r;
}

// ---- tasks: which (work item, kv head) pairs a CTA runs, in order -----------------------------
// Two schedules (the kernel's flags):
//   drawn (default): the plan's n items times num_kv_heads make the tasks, task t being
//     item t / Hkv for kv head t % Hkv, in plan order (the planner puts this kernel's
//     items costliest first, PlanSpec::longest_first). CTA c runs task c first, then the
//     next task of a counter shared by the grid (zeroed by the setup pass), so a CTA that
//     finishes early takes more: a greedy longest-first schedule over every SM, whatever
//     the bins and the kv heads. One producer thread draws each task and hands it to the
//     producer's copying warps and to the consumers through a ring of kTaskSlots
//     shared-memory slots (mbarriers: full, written; empty, read by every reader thread).
//   static bins (kFlagStaticBins): CTA (b, h) runs bin b's items for kv head h.
// Whatever the plan or counter hold, a task names an item in [0, work_cap) and a head in
// [0, num_kv_heads), and every CTA's sequence ends.
struct Task {
  int item;  // < 0: no more tasks
  int head;
};

struct TaskSchedule {
  bool drawn;
  int item_begin, item_end;  // static bins: this CTA's items
  int64_t num_tasks;         // drawn: items x num_kv_heads
  uint32_t bars;             // drawn: full[kTaskSlots], then empty[kTaskSlots]
  int2* slots;

  template <class Cfg>
  __device__ static TaskSchedule Make(const AttentionParams& p, uint8_t* smem, bool drawn) {
    TaskSchedule ts;
    ts.drawn = drawn;
    ts.bars = SmemU32(smem + Cfg::kTaskBarOff);
    ts.slots = reinterpret_cast<int2*>(smem + Cfg::kTaskOff);
    const int bins = p.layout.bin_cap;
    if (drawn) {
      const int items = min(max(__ldg(p.bin_indptr + bins), 0), p.layout.work_cap);
      ts.num_tasks = int64_t(items) * p.num_kv_heads;
      ts.item_begin = ts.item_end = 0;
    } else {
      const int bin = blockIdx.x < unsigned(bins) ? int(blockIdx.x) : bins;
      ts.item_begin = bin < bins ? max(__ldg(p.bin_indptr + bin), 0) : 0;
      ts.item_end = bin < bins ? min(__ldg(p.bin_indptr + bin + 1), p.layout.work_cap) : 0;
      ts.num_tasks = 0;
    }
    return ts;
  }

  template <class Cfg>
  __device__ uint32_t Full(int k) const { return bars + 8 * (k % Cfg::kTaskSlots); }
  template <class Cfg>
  __device__ uint32_t Empty(int k) const { return bars + 8 * (Cfg::kTaskSlots + k % Cfg::kTaskSlots); }

  // Drawn schedules: the k-th task of this CTA, drawn by one thread and written to its
  // slot once every reader has read the slot's previous task.
  template <class Cfg>
  __device__ void Draw(const AttentionParams& p, int k) const {
    int64_t t = -1;
    if (k == 0) {
      t = blockIdx.x;
    } else if (p.task_counter != nullptr) {
      WaitForPrimaryGrid();  // the setup pass zeroed the counter
      t = int64_t(gridDim.x) + int64_t(atomicAdd(p.task_counter, 1ull) & 0x3fffffffffffffffull);
    }
    Task task{-1, 0};
    if (t >= 0 && t < num_tasks) task = Task{int(t / p.num_kv_heads), int(t % p.num_kv_heads)};
    MbarWait(Empty<Cfg>(k), ((k / Cfg::kTaskSlots) & 1) ^ 1);
    slots[k % Cfg::kTaskSlots] = make_int2(task.item, task.head);
    MbarArrive(Full<Cfg>(k));  // release: the slot is visible with the phase
  }

  // The k-th task of this CTA, called by every thread of the reader warps for k = 0, 1,
  // ... until it returns the end.
  template <class Cfg>
  __device__ Task Read(int k) const {
    if (!drawn) {
      const int item = item_begin + k;
      return item < item_end ? Task{item, int(blockIdx.y)} : Task{-1, 0};
    }
    MbarWait(Full<Cfg>(k), (k / Cfg::kTaskSlots) & 1);
    const volatile int* slot = reinterpret_cast<volatile int*>(slots + k % Cfg::kTaskSlots);
    const Task task{slot[0], slot[1]};
    MbarArrive(Empty<Cfg>(k));
    return task;
  }
};

// ---- producer warpgroup ------------------------------------------------------------------------
// kRopeKeys: K comes rotated from p.rope_keys (rope_keys.cuh, the grid before this one)
// instead of from the cache, and is not rotated here. (A template parameter: the
// producer's 56 registers leave no room for the other path's pointers.)
template <typename T, int D, int Stages, bool kRopeKeys>
__device__ __forceinline__ void ProduceItems(const AttentionParams& p, uint8_t* smem,
                                             const TaskSchedule& tasks, bool copy_kv) {
  using Cfg = PrefillSm90Cfg<T, D, Stages>;
  constexpr int S = Cfg::kStages;
  constexpr int kTileKv = Cfg::kTileKv;
  const int pw = (int(threadIdx.x) >> 5) - 8;  // producer warp 0..3: keys [32 pw, 32 pw + 32)
  // With 64-key tiles (D = 256) warps 2 and 3 have no keys; the barriers count only the
  // copying warps (Cfg::kFullKCount), so they leave at once.
  if (pw >= Cfg::kCopyWarps) return;
  const int lane = threadIdx.x & 31;
  const bool rope = !kRopeKeys && p.pos_encoding == PosEncoding::kRopeLlama;
  const T* kbase = static_cast<const T*>(kRopeKeys ? p.rope_keys : p.kv.k);
  if (kRopeKeys) WaitForPrimaryGrid();  // the keys are rotated
  const T* vbase = static_cast<const T*>(p.kv.v);
  const uint32_t k_smem = SmemU32(smem + Cfg::kKOff);
  const uint32_t v_smem = SmemU32(smem + Cfg::kVOff);
  const uint32_t bars = SmemU32(smem + Cfg::kBarOff);
  uint32_t* s_mask = reinterpret_cast<uint32_t*>(smem + Cfg::kMaskOff);
  const float* s_freq = reinterpret_cast<const float*>(smem + Cfg::kFreqOff);
  const int ps = p.kv.page_size;
  const int chunk = lane % Cfg::kRowLanes;  // this lane's 16-byte chunk of a key row
  const int sub = lane / Cfg::kRowLanes;     // and its row among the kStepRows of a copy

  auto full_k = [&](uint32_t s) { return bars + 8 * s; };
  auto full_v = [&](uint32_t s) { return bars + 8 * (S + s); };
  auto empty_k = [&](uint32_t s) { return bars + 8 * (2 * S + s); };
  auto empty_v = [&](uint32_t s) { return bars + 8 * (3 * S + s); };

  // Copies this warp's 32 key rows of one tile: step k moves rows R k .. R k + R - 1
  // (R = kStepRows; lanes [sub * kRowLanes, ...) take row R k + sub), one 16-byte chunk
  // a lane. Each lane holds its own key's row address; step k takes row src's from lane
  // src (two shuffles), so a copy costs a few instructions: the destination
  // (Sw128Chunk<kTileKv>(pw * 32 + src, chunk)) splits into a part and a swizzle term
  // fixed per lane and a step term, since R is a power of
  // two above sub: (chunk ^ (R k + sub)) % 8 = ((chunk % 8) ^ sub) ^ (R k % 8).
  // `bad`: the warp's ballot of keys with no row (zero-filled, src-size 0).
  constexpr int R = Cfg::kStepRows;
  const uint32_t dst_lane = uint32_t((chunk >> 3) * (kTileKv * Cfg::kHalfBytes)) +
                            uint32_t((pw * 32 + sub) * Cfg::kHalfBytes);
  const uint32_t swz_lane = uint32_t((chunk & 7) ^ sub);
  const uint32_t chunk_bytes = uint32_t(chunk * 16);
  auto issue = [&](const T* base, uint32_t stage_addr, int64_t off, unsigned bad) {
    const uint64_t row = reinterpret_cast<uint64_t>(base + (off >= 0 ? off : 0));
    const uint32_t lo = uint32_t(row), hi = uint32_t(row >> 32);
    const uint32_t dst0 = stage_addr + dst_lane;
#pragma unroll
    for (int k = 0; k < 32 / R; ++k) {
      const int src = R * k + sub;
      const uint32_t slo = __shfl_sync(0xffffffffu, lo, src);
      const uint32_t shi = __shfl_sync(0xffffffffu, hi, src);
      const uint64_t a = ((uint64_t(shi) << 32) | slo) + chunk_bytes;
      const uint32_t dst = dst0 + uint32_t(k * R * Cfg::kHalfBytes) + ((swz_lane ^ uint32_t((R * k) & 7)) << 4);
      if (copy_kv) cp_async::Copy16(dst, reinterpret_cast<const void*>(a), ((bad >> src) & 1u) == 0u);
    }
  };

  // Drawn schedules: lane 0 of warp 0 draws task k + 1 once task k's first K tile is on
  // its way (so the counter's round trip hides behind it), or at once for a task with no
  // tiles: before the consumers, who read task k + 1 as they start task k, can wait for it.
  const bool drawer = tasks.drawn && pw == 0;
  auto draw = [&](int k) {
    if (drawer) {
      if (lane == 0) tasks.Draw<Cfg>(p, k);
      __syncwarp();
    }
  };
  draw(0);
  uint32_t kc = 0, vc = 0;  // K / V tiles produced so far (ring position), across items
  for (int k = 0;; ++k) {
    const Task task = tasks.Read<Cfg>(k);
    if (task.item < 0) break;
    const WorkItem it = LoadWorkItem(p, task.item, Cfg::kTileQ);
    const TileRange tr = ItemTiles<kTileKv>(p, it);
    const int n = it.request < 0 ? 0 : tr.n;
    if (n == 0) {
      draw(k + 1);
      continue;
    }
    const int64_t head_off = int64_t(task.head) * p.kv.head_stride;

    // Where this lane's key of step i (tile n - 1 - i) lies: its offset in the cache
    // (-1 past the keys or for a page id outside the cache), and with rope_keys its index
    // among the plan's key slots (page-table slot * page_size + slot; -1 where the
    // offset is). Both K and V are read at the offset, or K at the key slot.
    struct KeyAt {
      int64_t off;
      int key_slot;
    };
    auto lookup = [&](int i) {
      KeyAt at{-1, -1};
      if (i < n) {
        const int j = tr.kv_lo + (n - 1 - i) * kTileKv + pw * 32 + lane;
        if (j < tr.kv_hi) {
          const int pg = j / ps;
          const int slot = j - pg * ps;
          const int pid = __ldg(p.kv_indices + it.page_base + pg);
          if (pid >= 0 && pid < p.kv.num_pages) {
            at.off = int64_t(pid) * p.kv.page_stride + int64_t(slot) * p.kv.slot_stride + head_off;
            // < page_cap * page_size (LoadWorkItem), which the launcher keeps in int.
            if (kRopeKeys) at.key_slot = int((it.page_base + pg) * ps + slot);
          }
        }
      }
      return at;
    };
    // The head's rotated keys: [key slot][D] from its first (p.rope_keys: [head][key slot][D]).
    const T* kbase_head = kRopeKeys ? kbase + int64_t(task.head) * p.layout.page_cap * ps * D : kbase;
    auto k_offset = [&](const KeyAt& at) -> int64_t {
      if (!kRopeKeys) return at.off;
      return at.key_slot >= 0 ? int64_t(at.key_slot) * D : int64_t(-1);
    };
    auto produce_k = [&](int64_t off) {
      const uint32_t s = kc % S;
      MbarWait(empty_k(s), ((kc / S) & 1) ^ 1);
      const unsigned bad = __ballot_sync(0xffffffffu, off < 0);
      issue(kbase_head, k_smem + s * Cfg::kKvBytes, off, bad);
      cp_async::Commit();
      if (!rope) MbarArriveOnCpAsync(full_k(s));
      if (lane == 0) {
        s_mask[s * 4 + pw] = bad;
        MbarArrive(full_k(s));  // release: the mask word is visible with the phase
      }
      ++kc;
    };
    auto produce_v = [&](int64_t off) {
      const uint32_t s = vc % S;
      MbarWait(empty_v(s), ((vc / S) & 1) ^ 1);
      issue(vbase, v_smem + s * Cfg::kKvBytes, off, __ballot_sync(0xffffffffu, off < 0));
      cp_async::Commit();
      MbarArriveOnCpAsync(full_v(s));
      ++vc;
    };
    // RoPE: once K of step i (ring position c) has landed, this warp rotates its rows in
    // place. With P = kPairChunks (D / 16), lane (chunk c) takes 4 of the 8 dim pairs of
    // chunk pair (c % P, c % P + P): the elements [4 (c / P), 4 (c / P) + 4) of both, so
    // no pair is done twice.
    auto rotate_k = [&](uint32_t c, int i, bool newer_pending) {
      if (newer_pending) {
        cp_async::WaitGroup<1>();  // all but the newest group (K(1) or V(i - 1))
      } else {
        cp_async::WaitGroup<0>();
      }
      __syncwarp();  // the warp's other lanes' copies are visible
      const uint32_t s = c % S;
      uint8_t* st = smem + Cfg::kKOff + s * Cfg::kKvBytes;
      const int pc = chunk % Cfg::kPairChunks, sel = chunk / Cfg::kPairChunks;
      const int pc_hi = pc + Cfg::kPairChunks;  // the partner chunk, D / 2 further
      // The lane's rows are R keys apart: one sin/cos of its first row's angles and of
      // the step's, then each row's by angle addition (a few FMAs instead of two MUFU
      // ops per element, which made RoPE the producer's bottleneck).
      const int first = tr.kv_lo + (n - 1 - i) * kTileKv + pw * 32 + sub;
      float cs[4], sn[4], c_step[4], s_step[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float f = s_freq[pc * 8 + sel * 4 + e];
        RopeSinCos(float(first) * f, &sn[e], &cs[e]);
        RopeSinCos(float(R) * f, &s_step[e], &c_step[e]);
      }
#pragma unroll 4
      for (int k = 0; k < 32 / R; ++k) {
        const int src = R * k + sub;
        const int row = pw * 32 + src;
        // (row & 7 == src & 7: pw * 32 is a multiple of 8.) sel * 8: this lane's 4 elements.
        uint2* plo = reinterpret_cast<uint2*>(st + Sw128Chunk<kTileKv>(row, pc) + sel * 8);
        uint2* phi = reinterpret_cast<uint2*>(st + Sw128Chunk<kTileKv>(row, pc_hi) + sel * 8);
        const uint2 lo = *plo, hi = *phi;
        const float2 a0 = UnpackPair<T>(lo.x), a1 = UnpackPair<T>(lo.y);
        const float2 b0 = UnpackPair<T>(hi.x), b1 = UnpackPair<T>(hi.y);
        const float xa[4] = {a0.x, a0.y, a1.x, a1.y};
        const float xb[4] = {b0.x, b0.y, b1.x, b1.y};
        float ra[4], rb[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          ra[e] = xa[e];
          rb[e] = xb[e];
          RopeRotateCosSin(ra[e], rb[e], cs[e], sn[e]);
          const float c_next = cs[e] * c_step[e] - sn[e] * s_step[e];
          sn[e] = sn[e] * c_step[e] + cs[e] * s_step[e];
          cs[e] = c_next;
        }
        *plo = make_uint2(PackPair<T>(ra[0], ra[1]), PackPair<T>(ra[2], ra[3]));
        *phi = make_uint2(PackPair<T>(rb[0], rb[1]), PackPair<T>(rb[2], rb[3]));
      }
      FenceProxyAsync();  // ordinary stores, read next by wgmma
      MbarArrive(full_k(s));
    };

    const KeyAt at0 = lookup(0);
    int64_t off_cur = at0.off;  // V(i)'s
    KeyAt ahead = lookup(1);    // one step ahead: its latency hides behind a step's copies
    uint32_t kc_cur = kc;
    produce_k(k_offset(at0));
    draw(k + 1);
    // Copies in the order K0 K1 V0 K2 V1 K3 ... With RoPE, K(i) (i > 0) is rotated before
    // K(i + 1) is issued: that copy waits for the stage the consumers free with S(i - 1),
    // and a rotation queued behind it would start only then, on the consumers' path.
    for (int i = 0; i < n; ++i) {
      const bool has_next = i + 1 < n;
      int64_t off_next = -1;
      const uint32_t kc_next = kc;
      if (rope && i > 0) rotate_k(kc_cur, i, true);  // V(i - 1) was committed after K(i)
      if (has_next) {
        off_next = ahead.off;
        const int64_t koff = k_offset(ahead);
        ahead = lookup(i + 2);
        produce_k(koff);
      }
      if (rope && i == 0) rotate_k(kc_cur, 0, has_next);  // K(1) was committed after K(0)
      produce_v(off_cur);
      off_cur = off_next;
      kc_cur = kc_next;
    }
  }
  cp_async::WaitGroup<0>();
}

// ---- consumer warpgroups -----------------------------------------------------------------------
// D += A B over the k blocks of one warpgroup tile; kZero: D = A B.
template <bool kZero, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void WgGemm(Mma& mma, const TA& a, const TB& b, TC& c) {
  using namespace cute;
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZero) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(c);
}

// The key-validity bits of a tile that this thread's S columns need: column
// 8 nb + 2 quad + e (nb < 16, e < 2) of the 128-bit tile mask `w` lands on bit
// 8 (nb % 4) + 2 (nb / 4) + e of the result.
__device__ __forceinline__ uint32_t ThreadMask(const uint4& w, int quad) {
  const uint32_t sel = 0x03030303u;
  return ((w.x >> (2 * quad)) & sel) | (((w.y >> (2 * quad)) & sel) << 2) |
         (((w.z >> (2 * quad)) & sel) << 4) | (((w.w >> (2 * quad)) & sel) << 6);
}

// kSoftmaxOverlap: each warpgroup's softmax of S(i) runs while its own P(i-1) V(i-1)
// GEMM does. The source always asks for that (the GEMM's wait follows the softmax), but
// ptxas hoists the wait (WARPGROUP.DEPBAR.LE gsb0, 0x0) to the start of the softmax's
// basic block, where it interleaves the P converts with the exp2s, so the softmax and
// its warpgroup's P V ran one after the other (SASS, every head_dim). A branch on the
// softmax's result that never trips (SoftmaxOverlapGuard) ends that block, and the wait
// then stays after the last exp2. A template flag so the harness times both schedules.
template <typename T, int D, int Stages, bool kSoftmaxOverlap>
__device__ __forceinline__ void ConsumeItems(const AttentionParams& p, uint8_t* smem,
                                             const TaskSchedule& tasks, bool pingpong) {
  using namespace cute;
  using Cfg = PrefillSm90Cfg<T, D, Stages>;
  using TE = typename Cfg::TE;
  constexpr int S = Cfg::kStages;
  constexpr int kTileKv = Cfg::kTileKv;
  constexpr float kNegInf = -__builtin_huge_valf();
  const int wg = int(threadIdx.x) >> 7;  // 0 or 1
  const int tw = threadIdx.x & 127;
  const int warp_wg = tw >> 5;
  const int lane = tw & 31;
  const int quad = lane & 3;
  const int G = p.group_size;
  const int Hqo = p.num_qo_heads;
  const bool causal = p.causal;
  const bool rope = p.pos_encoding == PosEncoding::kRopeLlama;
  const bool alibi = p.pos_encoding == PosEncoding::kAlibi;
  const float scale_log2 = LogitScaleLog2(p);
  const SoftCap soft_cap{p};
  const bool window = p.window_left >= 0;
  // The unmasked path takes the row max of raw scores, which needs a positive scale.
  const bool always_mask = !(scale_log2 > 0.f);
  const uint32_t bars = SmemU32(smem + Cfg::kBarOff);
  const uint4* s_mask = reinterpret_cast<const uint4*>(smem + Cfg::kMaskOff);
  const float* s_freq = reinterpret_cast<const float*>(smem + Cfg::kFreqOff);
  int* s_scratch = reinterpret_cast<int*>(smem + Cfg::kScratchOff);
  // This warpgroup's part of Q buffer b (also its O staging).
  auto q_buf = [&](int b) { return smem + Cfg::kQOff + (2 * b + wg) * Cfg::kQWgBytes; };

  auto full_k = [&](uint32_t s) { return bars + 8 * s; };
  auto full_v = [&](uint32_t s) { return bars + 8 * (S + s); };
  auto empty_k = [&](uint32_t s) { return bars + 8 * (2 * S + s); };
  auto empty_v = [&](uint32_t s) { return bars + 8 * (3 * S + s); };

  Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<TE*>(smem + Cfg::kKOff)), typename Cfg::LayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(reinterpret_cast<TE*>(smem + Cfg::kVOff)), typename Cfg::LayoutVt{});
  typename Cfg::MmaQK mma_qk;
  typename Cfg::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_slice(tw);
  auto thr_pv = mma_pv.get_slice(tw);
  Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, 1, D / 16, S)
  Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, 1, KV / 16, S)
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<Cfg::kWgRows>, Int<kTileKv>>{});
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<Cfg::kWgRows>, Int<D>>{});
  Tensor tOrP = thr_pv.partition_fragment_A(
      make_tensor(make_smem_ptr(static_cast<TE*>(nullptr)),
                  make_layout(Shape<Int<Cfg::kWgRows>, Int<kTileKv>>{})));
  // S element i (i = 4 nb + 2 h + e) is row warp_wg * 16 + lane / 4 + 8 h, key column
  // 8 nb + 2 quad + e; the A operand of the RS GEMM has the same order (two 16-bit values
  // a register), so P is S converted element by element.
  static_assert(decltype(size(tSrS))::value == kTileKv / 2, "S: kTileKv / 2 floats per thread");
  static_assert(decltype(size(tOrP))::value == kTileKv / 2, "P: as S");
  static_assert(decltype(size(tOrO))::value == D / 2, "O: D / 2 floats per thread");

  const bool wg1 = wg != 0;
  auto wg_sync = [&] { NamedSyncOneOf<Cfg::kBarWg0>(wg1, 128); };
  // Pingpong: wait for this warpgroup's turn; pass the turn to the other one.
  auto turn_wait = [&] {
    if (pingpong) NamedSyncOneOf<Cfg::kBarTurn0>(wg1, 256);
  };
  auto turn_pass = [&] {
    if (pingpong) NamedArriveOneOf<Cfg::kBarTurn0>(!wg1, 256);
  };
  if (pingpong && wg == 1) NamedArrive(Cfg::kBarTurn0, 256);  // warpgroup 0 issues first

  // Q of an item, this warpgroup's 64 rows, into `buf` by cp.async (rows past the item
  // zero-filled), one commit group; RoPE is applied once the group has landed (rope_q).
  const T* qg = static_cast<const T*>(p.q);
  // Step k of this thread's walk over the warpgroup's Q chunk pairs (row, c / c + D / 16),
  // 64 rows x kPairChunks pairs: the pair and its two offsets in the SW128 Q tile.
  constexpr int kQSteps = Cfg::kWgRows * Cfg::kPairChunks / 128;
  auto q_chunk_pair = [&](int k, int& row, int& c, uint32_t& off_lo, uint32_t& off_hi) {
    const int idx = tw + 128 * k;
    row = idx / Cfg::kPairChunks;
    c = idx % Cfg::kPairChunks;
    off_lo = Sw128Chunk<Cfg::kWgRows>(row, c);
    off_hi = Sw128Chunk<Cfg::kWgRows>(row, c + Cfg::kPairChunks);
  };
  // f(r_item, c, off_lo, off_hi) for each of this thread's chunk pairs: the item row
  // (of 128) and the pair's chunk and offsets.
  auto for_q_chunks = [&](auto&& f) {
#pragma unroll
    for (int k = 0; k < kQSteps; ++k) {
      int row, c;
      uint32_t off_lo, off_hi;
      q_chunk_pair(k, row, c, off_lo, off_hi);
      f(wg * Cfg::kWgRows + row, c, off_lo, off_hi);
    }
  };
  auto issue_q = [&](const WorkItem& w, int kv_head, uint8_t* buf) {
    const uint32_t b = SmemU32(buf);
    for_q_chunks([&](int r_item, int c, uint32_t off_lo, uint32_t off_hi) {
      const bool live = r_item < w.num_rows;
      const T* src = qg;
      if (live) {
        const int r = w.row_begin + r_item;
        src = qg + ((w.q_base + r / G) * Hqo + kv_head * G + r % G) * D + c * 8;
      }
      cp_async::Copy16(b + off_lo, src, live);
      cp_async::Copy16(b + off_hi, src + D / 2, live);
    });
    cp_async::Commit();
  };
  // Rotates, in place, the Q chunks this thread copied (the same walk).
  auto rope_q = [&](const WorkItem& w, uint8_t* buf) {
    for_q_chunks([&](int r_item, int c, uint32_t off_lo, uint32_t off_hi) {
      if (r_item >= w.num_rows) return;
      uint4* plo = reinterpret_cast<uint4*>(buf + off_lo);
      uint4* phi = reinterpret_cast<uint4*>(buf + off_hi);
      uint4 lo = *plo, hi = *phi;
      RopePairs<T>(lo, hi, float(w.pos_base + (w.row_begin + r_item) / G), s_freq + c * 8);
      *plo = lo;
      *phi = hi;
    });
  };
  auto item_of = [&](const Task& t) {
    WorkItem w{};
    w.request = -1;
    return t.item >= 0 ? LoadWorkItem(p, t.item, Cfg::kTileQ) : w;
  };
  // (Items are loaded again where needed rather than kept: a WorkItem held across the
  // main loop costs the consumers registers they do not have.)
  int qb = 0;               // the Q buffer of the current item
  bool q_issued = false;    // its Q copy was issued during the previous item
  Task cur = tasks.Read<Cfg>(0);
  if constexpr (Cfg::kQBufs == 2) {
    const WorkItem first = item_of(cur);
    if (first.request >= 0) {
      issue_q(first, cur.head, q_buf(0));
      q_issued = true;
    }
  }

  uint32_t kc = 0, vc = 0;  // K / V tiles consumed so far (ring position), across items
  for (int k = 0; cur.item >= 0; ++k) {
    const WorkItem it = item_of(cur);
    const int kv_head = cur.head;
    if (it.request < 0) {
      cur = tasks.Read<Cfg>(k + 1);
      q_issued = false;
      continue;
    }
    uint8_t* sq_bytes = q_buf(qb);
    const TileRange tr = ItemTiles<kTileKv>(p, it);
    const int n = tr.n;
    const int nrows = it.num_rows;

    // This thread's two rows (h = 0, 1) of the item tile.
    int rr[2], qpos[2], first_key[2];
    float slope[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      rr[h] = wg * Cfg::kWgRows + warp_wg * 16 + (lane >> 2) + 8 * h;
      const int r = it.row_begin + rr[h];
      qpos[h] = it.pos_base + r / G;
      first_key[h] = WindowStart(p, qpos[h]);
      slope[h] = alibi ? AlibiSlope(kv_head * G + r % G, Hqo) * kLog2e : 0.f;
    }
    // Rows grow with the token: the warpgroup's first row has the smallest causal limit,
    // its last live row the largest window start.
    const int wg_min_limit = it.pos_base + (it.row_begin + wg * Cfg::kWgRows) / G;
    const int wg_last = min(wg * Cfg::kWgRows + Cfg::kWgRows, nrows) - 1;
    const int wg_max_start = WindowStart(p, it.pos_base + (it.row_begin + max(wg_last, 0)) / G);

    clear(tOrO);
    float m_run[2] = {kNegInf, kNegInf}, l_run[2] = {0.f, 0.f}, corr[2] = {0.f, 0.f};

    // Softmax of tile step i (keys from kf): S -> 2^(logit - running max), in place.
    // Returns the sum of its new terms (this thread's two rows), >= 0 or NaN.
    auto softmax = [&](int i, bool any_bad, uint32_t absent_bits) -> float {
      const int kf = tr.kv_lo + (n - 1 - i) * kTileKv;
      const bool need_mask = always_mask || any_bad || (causal && kf + kTileKv - 1 > wg_min_limit) ||
                             (window && kf < wg_max_start);
      float sc = scale_log2;
      if (soft_cap.on()) {  // into base-2 units, capped
#pragma unroll
        for (int i2 = 0; i2 < kTileKv / 2; ++i2) tSrS(i2) = soft_cap(tSrS(i2) * scale_log2);
        sc = 1.f;
      }
      if (need_mask) {
#pragma unroll
        for (int i2 = 0; i2 < kTileKv / 2; ++i2) {
          const int nb = i2 >> 2, h = (i2 >> 1) & 1, e = i2 & 1;
          const int col = 8 * nb + 2 * quad + e;
          const int j = kf + col;
          const bool absent = (absent_bits >> (8 * (nb & 3) + 2 * (nb >> 2) + e)) & 1u;
          const bool vis = !absent && (!causal || j <= qpos[h]) && j >= first_key[h];
          const float v = tSrS(i2) * sc + slope[h] * float(j - qpos[h]);
          tSrS(i2) = vis ? v : kNegInf;
        }
        sc = 1.f;
      } else if (alibi) {  // a tile wholly visible: the same bias, no visibility tests
#pragma unroll
        for (int i2 = 0; i2 < kTileKv / 2; ++i2) {
          const int nb = i2 >> 2, h = (i2 >> 1) & 1, e = i2 & 1;
          const int j = kf + 8 * nb + 2 * quad + e;
          tSrS(i2) = tSrS(i2) * sc + slope[h] * float(j - qpos[h]);
        }
        sc = 1.f;
      }
      float mx[2] = {kNegInf, kNegInf};
#pragma unroll
      for (int i2 = 0; i2 < kTileKv / 2; ++i2) {
        const int h = (i2 >> 1) & 1;
        mx[h] = fmaxf(mx[h], tSrS(i2));
      }
      float base[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        const float m_new = fmaxf(m_run[h], mx[h] * sc);
        base[h] = SafeMax(m_new);  // rows with nothing visible yet: exp2(-inf - 0) = 0
        corr[h] = FastExp2(m_run[h] - base[h]);
        m_run[h] = m_new;
      }
      float sum[2] = {0.f, 0.f};
#pragma unroll
      for (int i2 = 0; i2 < kTileKv / 2; ++i2) {
        const int h = (i2 >> 1) & 1;
        const float e2 = FastExp2(fmaf(tSrS(i2), sc, -base[h]));
        tSrS(i2) = e2;
        sum[h] += e2;
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) l_run[h] = l_run[h] * corr[h] + sum[h];
      return sum[0] + sum[1];
    };
    Tensor tOrP32 = recast<uint32_t>(tOrP);
    auto convert_p = [&] {  // one packed convert per pair, element 2k in the low half
#pragma unroll
      for (int k = 0; k < kTileKv / 4; ++k) tOrP32(k) = PackPair<T>(tSrS(2 * k), tSrS(2 * k + 1));
    };
    auto rescale_o = [&] {
#pragma unroll
      for (int i2 = 0; i2 < D / 2; ++i2) tOrO(i2) *= corr[(i2 >> 1) & 1];
    };
    // A V stage: one arrival per warp (wgmma alone read it, and the warp's wait on the
    // GEMM covers all its lanes). A K stage: one arrival per thread, because every
    // thread read the stage's mask words with ordinary loads, and each thread's own
    // release is what orders its reads before the producer's next write of them.
    auto release_v = [&](uint32_t bar) {
      __syncwarp();
      if (lane == 0) MbarArrive(bar);
    };
    auto release_k = [&](uint32_t bar) { MbarArrive(bar); };
    // Waits for K stage s (the kc-th K tile) and reads its mask words: whether any key of
    // the tile is absent, and this thread's bits of the absent keys.
    struct StageMask {
      bool any_bad;
      uint32_t absent_bits;
    };
    auto wait_k = [&](uint32_t s) {
      MbarWait(full_k(s), (kc / S) & 1);
      FenceProxyAsync();
      uint4 words = s_mask[s];
      if constexpr (Cfg::kMaskWords == 2) words.z = words.w = 0u;  // 64-key tiles
      return StageMask{(words.x | words.y | words.z | words.w) != 0u, ThreadMask(words, quad)};
    };

    // ---- Q tile of this warpgroup (rows past the item are zeros) ------------------------------
    // Every warp of the warpgroup is done with the previous item's GEMMs and O staging
    // (the other buffer) before its Q lands or the next item's copy is issued.
    wg_sync();
    if (!q_issued && n > 0) issue_q(it, kv_head, sq_bytes);
    cp_async::WaitGroup<0>();  // this item's Q: issued now, or during the previous item
    if (rope && n > 0) rope_q(it, sq_bytes);
    FenceProxyAsync();  // cp.async / RoPE stores, read next by wgmma
    wg_sync();
    const Task next = tasks.Read<Cfg>(k + 1);
    q_issued = false;
    if constexpr (Cfg::kQBufs == 2) {
      const WorkItem next_it = item_of(next);
      if (next_it.request >= 0) {
        issue_q(next_it, next.head, q_buf(qb ^ 1));
        q_issued = true;
      }
      qb ^= 1;
    }
    Tensor tSrQ = thr_qk.partition_fragment_A(
        make_tensor(make_smem_ptr(reinterpret_cast<TE*>(sq_bytes)), typename Cfg::LayoutQ{}));

    if (n > 0) {
      // ---- step 0: S_0 ----------------------------------------------------------------------
      {
        const uint32_t s = kc % S;
        const StageMask mask = wait_k(s);
        turn_wait();
        WgGemm<true>(mma_qk, tSrQ, tSrK(_, _, _, s), tSrS);
        turn_pass();
        warpgroup_wait<0>();
        warpgroup_fence_operand(tSrS);
        release_k(empty_k(s));
        ++kc;
        softmax(0, mask.any_bad, mask.absent_bits);
        convert_p();
      }
      // ---- steps 1 .. n-1: S_i = Q K_i^T and O += P_{i-1} V_{i-1}, softmax of S_i between ----
      for (int i = 1; i < n; ++i) {
        const uint32_t s = kc % S;
        const StageMask mask = wait_k(s);
        turn_wait();
        WgGemm<true>(mma_qk, tSrQ, tSrK(_, _, _, s), tSrS);
        rescale_o();  // by the correction of step i - 1, before P_{i-1} V_{i-1} adds in
        const uint32_t sv = vc % S;
        MbarWait(full_v(sv), (vc / S) & 1);
        FenceProxyAsync();
        warpgroup_fence_operand(tOrP);
        WgGemm<false>(mma_pv, tOrP, tOrV(_, _, _, sv), tOrO);
        turn_pass();
        warpgroup_wait<1>();  // S_i is ready; the P V GEMM may still run
        warpgroup_fence_operand(tSrS);
        release_k(empty_k(s));
        ++kc;
        const float terms = softmax(i, mask.any_bad, mask.absent_bits);
        if (kSoftmaxOverlap && terms < 0.f) __trap();  // never: see ConsumeItems
        warpgroup_wait<0>();
        warpgroup_fence_operand(tOrO);
        warpgroup_fence_operand(tOrP);
        release_v(empty_v(sv));
        ++vc;
        convert_p();
      }
      // ---- last: O += P_{n-1} V_{n-1} ----------------------------------------------------------
      {
        rescale_o();
        const uint32_t sv = vc % S;
        MbarWait(full_v(sv), (vc / S) & 1);
        FenceProxyAsync();
        turn_wait();
        warpgroup_fence_operand(tOrP);
        WgGemm<false>(mma_pv, tOrP, tOrV(_, _, _, sv), tOrO);
        turn_pass();
        warpgroup_wait<0>();
        warpgroup_fence_operand(tOrO);
        warpgroup_fence_operand(tOrP);
        release_v(empty_v(sv));
        ++vc;
      }
    }

    // ---- epilogue: normalise, write out/lse (or a partial row), merge splits ---------------------
    float inv[2], lse[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
      l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
      // The row's state with its sink (which weighs no value) folded in.
      SoftmaxState st{l_run[h] > 0.f ? m_run[h] : kNegInf, l_run[h]};
      float keep, unused;
      st.Merge(SinkState(p, kv_head * G + (it.row_begin + rr[h]) % G, it.split), &keep, &unused);
      inv[h] = st.InvSum() * keep * VScale(p);
      lse[h] = st.Lse();
    }
    int64_t hrow[2];  // (token, head) index of each row
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = it.row_begin + rr[h];
      hrow[h] = (it.q_base + r / G) * Hqo + kv_head * G + r % G;
    }
    if (it.split < 0) {
      // Stage O (input type) in this warpgroup's Q tile, then store whole 16-byte chunks.
      wg_sync();  // every warp's GEMMs have stopped reading Q
      const int row0 = warp_wg * 16 + (lane >> 2);
#pragma unroll
      for (int i2 = 0; i2 < D / 2; i2 += 2) {
        const int nb = i2 >> 2, h = (i2 >> 1) & 1;
        const int row = row0 + 8 * h;
        const int col = 8 * nb + 2 * quad;
        const uint32_t off = uint32_t(row * (D * 2)) + uint32_t(((col >> 3) ^ (row & 7)) << 4) +
                             uint32_t((col & 7) * 2);
        *reinterpret_cast<uint32_t*>(sq_bytes + off) =
            PackPair<T>(tOrO(i2) * inv[h], tOrO(i2 + 1) * inv[h]);
      }
      wg_sync();
      T* out = static_cast<T*>(p.out);
#pragma unroll
      for (int k = 0; k < Cfg::kWgRows * (D / 8) / 128; ++k) {
        const int idx = tw + 128 * k;
        const int row = idx / (D / 8), c = idx % (D / 8);
        const int r_item = wg * Cfg::kWgRows + row;
        if (r_item < nrows) {
          const uint4 v = *reinterpret_cast<const uint4*>(sq_bytes + row * (D * 2) +
                                                          ((c ^ (row & 7)) << 4));
          const int r = it.row_begin + r_item;
          const int64_t hr = (it.q_base + r / G) * Hqo + kv_head * G + r % G;
          *reinterpret_cast<uint4*>(out + hr * D + c * 8) = v;
        }
      }
      if (quad == 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h)
          if (rr[h] < nrows) p.lse[hrow[h]] = lse[h];
      }
      // The next item's Q stores and O staging each come after a wg_sync.
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (rr[h] >= nrows) continue;
        const int r = it.row_begin + rr[h];
        const int64_t tok = it.q_base + r / G;
        const int64_t prow = int64_t(__ldg(p.merge_indptr + tok)) + it.split;
        if (prow < 0 || prow >= p.caps.partial_rows) continue;
        const int64_t ph = prow * Hqo + kv_head * G + r % G;
        float* dst = p.partial_o + ph * D;
#pragma unroll
        for (int i2 = 2 * h; i2 < D / 2; i2 += 4) {
          const int col = 8 * (i2 >> 2) + 2 * quad;
          *reinterpret_cast<float2*>(dst + col) =
              make_float2(tOrO(i2) * inv[h], tOrO(i2 + 1) * inv[h]);
        }
        if (quad == 0) p.partial_lse[ph] = lse[h];
      }
      // Only the consumer warpgroups take part (the producer goes on copying the next
      // item's keys), so they synchronise on their own named barrier, and guard the reset
      // of the count: their next item's call may follow with no barrier between.
      FinishSplitItemIn<T, 256, Cfg::kTileQ, true>(
          p, int(threadIdx.x), [] { NamedSyncImm<Cfg::kBarConsumers>(256); }, it.q_base,
          it.row_begin, it.row_begin + nrows, kv_head, s_scratch);
    }
    cur = next;
  }
  if (pingpong && wg == 0) NamedSync(Cfg::kBarTurn0, 256);  // warpgroup 1's last pass
}

// Grid: [CTAs the device holds at once] (drawn tasks), or [bin_cap, num_kv_heads] with
// kFlagStaticBins; Cfg::kThreads threads, Cfg::kSmemBytes dynamic shared memory.
// `flags`: kFlagPingpong; kFlagNoKvCopy (a measurement, never a result: the producer runs
// its protocol without copying K/V, so the time left is the consumers'); kFlagStaticBins
// (the plan's bins instead of drawn tasks, TaskSchedule); kFlagRopeKeys (RoPE keys come
// rotated from p.rope_keys, written by the grid before this one: rope_keys.cuh);
// kFlagSoftmaxOverlap (ConsumeItems' kSoftmaxOverlap).
constexpr int kFlagPingpong = 1;
constexpr int kFlagNoKvCopy = 2;
constexpr int kFlagStaticBins = 4;
constexpr int kFlagRopeKeys = 8;
constexpr int kFlagSoftmaxOverlap = 16;
template <typename T, int D, int Stages>
__global__ void __launch_bounds__(PrefillSm90Cfg<T, D, Stages>::kThreads, 1)
    PrefillSm90Kernel(const __grid_constant__ AttentionParams p, const int flags) {
#if defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  using Cfg = PrefillSm90Cfg<T, D, Stages>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (SmemU32(smem_raw) & 1023u)) & 1023u);
  const int tid = threadIdx.x;
  if (tid == 0) {
    const uint32_t bars = SmemU32(smem + Cfg::kBarOff);
    for (int s = 0; s < Cfg::kStages; ++s) {
      MbarInit(bars + 8 * s, Cfg::kFullKCount);
      MbarInit(bars + 8 * (Cfg::kStages + s), Cfg::kFullVCount);
      MbarInit(bars + 8 * (2 * Cfg::kStages + s), Cfg::kEmptyKCount);
      MbarInit(bars + 8 * (3 * Cfg::kStages + s), Cfg::kEmptyVCount);
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
      ProduceItems<T, D, Stages, true>(p, smem, tasks, (flags & kFlagNoKvCopy) == 0);
    } else {
      ProduceItems<T, D, Stages, false>(p, smem, tasks, (flags & kFlagNoKvCopy) == 0);
    }
  } else {
    RegAlloc<Cfg::kConsumerRegs>();
    if (flags & kFlagSoftmaxOverlap) {
      ConsumeItems<T, D, Stages, true>(p, smem, tasks, (flags & kFlagPingpong) != 0);
    } else {
      ConsumeItems<T, D, Stages, false>(p, smem, tasks, (flags & kFlagPingpong) != 0);
    }
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
