// The Hopper prefill kernel's producer warpgroup (ProduceItems): page-gathered K/V
// tiles into the shared-memory ring, RoPE rotation where keys come unrotated.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../cp_async.cuh"
#include "../dependent_launch.cuh"
#include "../rope.cuh"
#include "../vec_dtypes.cuh"
#include "../work_item.cuh"
#include "jax_pagedattn/params.h"
#include "prefill_sm90_config.cuh"
#include "sm90_sync.cuh"
#include "task_schedule.cuh"

namespace jax_pagedattn {
namespace sm90 {

// ---- producer warpgroup ------------------------------------------------------------------------
// kRopeKeys: K comes rotated from p.rope_keys (rope_keys.cuh, the grid before this one)
// instead of from the cache, and is not rotated here. (A template parameter: the
// producer's 56 registers leave no room for the other path's pointers.)
template <typename T, int D, int Stages, int Variant, bool kRopeKeys>
__device__ __forceinline__ void ProduceItems(const AttentionParams& p, uint8_t* smem,
                                             const TaskSchedule& tasks, bool copy_kv) {
  using Cfg = PrefillSm90Cfg<T, D, Stages, Variant>;
  constexpr int SK = Cfg::kStagesK, SV = Cfg::kStagesV;
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
  const FastDivmod group(p.group_size);
  const int chunk = lane % Cfg::kRowLanes;  // this lane's 16-byte chunk of a key row
  const int sub = lane / Cfg::kRowLanes;     // and its row among the kStepRows of a copy

  auto full_k = [&](uint32_t s) { return Cfg::FullK(bars, s); };
  auto full_v = [&](uint32_t s) { return Cfg::FullV(bars, s); };
  auto empty_k = [&](uint32_t s) { return Cfg::EmptyK(bars, s); };
  auto empty_v = [&](uint32_t s) { return Cfg::EmptyV(bars, s); };

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
    const WorkItem it = tasks.Item<Cfg>(p, task);
    const TileRange tr = ItemTiles<kTileKv>(p, it, group);
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
      const uint32_t s = kc % SK;
      MbarWait(empty_k(s), ((kc / SK) & 1) ^ 1);
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
      const uint32_t s = vc % SV;
      MbarWait(empty_v(s), ((vc / SV) & 1) ^ 1);
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
      const uint32_t s = c % SK;
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

}  // namespace sm90
}  // namespace jax_pagedattn
