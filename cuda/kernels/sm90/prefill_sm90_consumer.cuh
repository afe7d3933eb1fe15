// The Hopper prefill kernel's consumer warpgroups (ConsumeItems): S = Q K^T and
// O += P V on wgmma, the online softmax between them, the epilogue and split merges.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "../cp_async.cuh"
#include "../logit_transforms.cuh"
#include "../rope.cuh"
#include "../softmax_state.cuh"
#include "../split_merge.cuh"
#include "../vec_dtypes.cuh"
#include "../work_item.cuh"
#include "jax_pagedattn/params.h"
#include "prefill_sm90_config.cuh"
#include "sm90_sync.cuh"
#include "task_schedule.cuh"

namespace jax_pagedattn {
namespace sm90 {

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

// Each warpgroup's softmax of S(i) runs while its own P(i-1) V(i-1) GEMM does. The
// source asks for that by waiting for the GEMM after the softmax, but without more ptxas
// hoists the wait (WARPGROUP.DEPBAR.LE gsb0, 0x0) to the start of the softmax's basic
// block, where it interleaves the P converts with the exp2s, so the softmax and its
// warpgroup's P V ran one after the other (SASS, every head_dim). A branch on the
// softmax's result that never trips ends that block, and the wait then stays after the
// last exp2.
//
// Variant: the kernel's variants under measurement (prefill_sm90_config.cuh, kVariant*).
template <typename T, int D, int Stages, int Variant>
__device__ __forceinline__ void ConsumeItems(const AttentionParams& p, uint8_t* smem,
                                             const TaskSchedule& tasks, bool pingpong) {
  using namespace cute;
  using Cfg = PrefillSm90Cfg<T, D, Stages, Variant>;
  using TE = typename Cfg::TE;
  constexpr int SK = Cfg::kStagesK, SV = Cfg::kStagesV;
  constexpr int kTileKv = Cfg::kTileKv;
  constexpr float kNegInf = -__builtin_huge_valf();
  const int wg = int(threadIdx.x) >> 7;  // 0 or 1
  const int tw = threadIdx.x & 127;
  const int warp_wg = tw >> 5;
  const int lane = tw & 31;
  const int quad = lane & 3;
  const int G = p.group_size;
  const FastDivmod group(G);  // r / G and r % G of packed rows r (>= 0)
  const int Hqo = p.num_qo_heads;
  const bool causal = p.causal;
  const bool rope = p.pos_encoding == PosEncoding::kRopeLlama;
  const bool alibi = p.pos_encoding == PosEncoding::kAlibi;
  const float scale_log2 = LogitScaleLog2(p);
  const SoftCap soft_cap{p};
  const bool window = p.window_left >= 0;
  // The unmasked path takes the row max of raw scores, which needs a positive scale.
  const bool always_mask = !(scale_log2 > 0.f);
  // Tiles whose masks are only absent keys and the causal limit (no window, bias or cap
  // on the scores) take the short masking path.
  const bool plain_mask = !always_mask && !window && !alibi && !soft_cap.on();
  const uint32_t bars = SmemU32(smem + Cfg::kBarOff);
  const uint4* s_mask = reinterpret_cast<const uint4*>(smem + Cfg::kMaskOff);
  const float* s_freq = reinterpret_cast<const float*>(smem + Cfg::kFreqOff);
  int* s_scratch = reinterpret_cast<int*>(smem + Cfg::kScratchOff);
  // This warpgroup's part of Q buffer b (also its O staging).
  auto q_buf = [&](int b) { return smem + Cfg::kQOff + (2 * b + wg) * Cfg::kQWgBytes; };

  auto full_k = [&](uint32_t s) { return Cfg::FullK(bars, s); };
  auto full_v = [&](uint32_t s) { return Cfg::FullV(bars, s); };
  auto empty_k = [&](uint32_t s) { return Cfg::EmptyK(bars, s); };
  auto empty_v = [&](uint32_t s) { return Cfg::EmptyV(bars, s); };

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
        src = qg + ((w.q_base + group.Div(r)) * Hqo + kv_head * G + group.Mod(r)) * D + c * 8;
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
      RopePairs<T>(lo, hi, float(w.pos_base + group.Div(w.row_begin + r_item)), s_freq + c * 8);
      *plo = lo;
      *phi = hi;
    });
  };
  auto item_of = [&](const Task& t) { return tasks.Item<Cfg>(p, t); };
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
    const TileRange tr = ItemTiles<kTileKv>(p, it, group);
    const int n = tr.n;
    const int nrows = it.num_rows;

    // This thread's two rows (h = 0, 1) of the item tile.
    int rr[2], qpos[2], first_key[2];
    float slope[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      rr[h] = wg * Cfg::kWgRows + warp_wg * 16 + (lane >> 2) + 8 * h;
      const int r = it.row_begin + rr[h];
      qpos[h] = it.pos_base + group.Div(r);
      first_key[h] = WindowStart(p, qpos[h]);
      slope[h] = alibi ? AlibiSlope(kv_head * G + group.Mod(r), Hqo) * kLog2e : 0.f;
    }
    // Rows grow with the token: the warpgroup's first row has the smallest causal limit,
    // its last live row the largest window start.
    const int wg_min_limit = it.pos_base + group.Div(it.row_begin + wg * Cfg::kWgRows);
    const int wg_last = min(wg * Cfg::kWgRows + Cfg::kWgRows, nrows) - 1;
    const int wg_max_start = WindowStart(p, it.pos_base + group.Div(it.row_begin + max(wg_last, 0)));

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
      if (need_mask && plain_mask) {
        // Absent keys and the causal limit only: column 8 nb + 2 quad + e is visible to
        // row h where its bit is clear and 8 nb + e <= limit[h] (both sides constants
        // but one), so a logit costs a bit test, a compare and a select. Scores stay
        // raw, as on unmasked tiles (sc > 0 keeps -inf below every finite score).
        int limit[2];  // in [-1, kTileKv]: no overflow, whatever a plan's positions
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t l = causal ? int64_t(qpos[h]) - kf - 2 * quad : int64_t(kTileKv);
          limit[h] = int(l < -1 ? -1 : (l > kTileKv ? kTileKv : l));
        }
#pragma unroll
        for (int i2 = 0; i2 < kTileKv / 2; ++i2) {
          const int nb = i2 >> 2, h = (i2 >> 1) & 1, e = i2 & 1;
          const bool absent = (absent_bits >> (8 * (nb & 3) + 2 * (nb >> 2) + e)) & 1u;
          tSrS(i2) = !absent && 8 * nb + e <= limit[h] ? tSrS(i2) : kNegInf;
        }
      } else if (need_mask) {
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
      MbarWait(full_k(s), (kc / SK) & 1);
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
        const uint32_t s = kc % SK;
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
        const uint32_t s = kc % SK;
        const StageMask mask = wait_k(s);
        turn_wait();
        WgGemm<true>(mma_qk, tSrQ, tSrK(_, _, _, s), tSrS);
        rescale_o();  // by the correction of step i - 1, before P_{i-1} V_{i-1} adds in
        const uint32_t sv = vc % SV;
        MbarWait(full_v(sv), (vc / SV) & 1);
        FenceProxyAsync();
        warpgroup_fence_operand(tOrP);
        WgGemm<false>(mma_pv, tOrP, tOrV(_, _, _, sv), tOrO);
        turn_pass();
        warpgroup_wait<1>();  // S_i is ready; the P V GEMM may still run
        warpgroup_fence_operand(tSrS);
        release_k(empty_k(s));
        ++kc;
        const float terms = softmax(i, mask.any_bad, mask.absent_bits);
        if (terms < 0.f) __trap();  // never (a sum of exp2s): see ConsumeItems
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
        const uint32_t sv = vc % SV;
        MbarWait(full_v(sv), (vc / SV) & 1);
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
      st.Merge(SinkState(p, kv_head * G + group.Mod(it.row_begin + rr[h]), it.split), &keep, &unused);
      inv[h] = st.InvSum() * keep * VScale(p);
      lse[h] = st.Lse();
    }
    int64_t hrow[2];  // (token, head) index of each row
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = it.row_begin + rr[h];
      hrow[h] = (it.q_base + group.Div(r)) * Hqo + kv_head * G + group.Mod(r);
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
          const int64_t hr = (it.q_base + group.Div(r)) * Hqo + kv_head * G + group.Mod(r);
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
        const int64_t tok = it.q_base + group.Div(r);
        const int64_t prow = int64_t(__ldg(p.merge_indptr + tok)) + it.split;
        if (prow < 0 || prow >= p.caps.partial_rows) continue;
        const int64_t ph = prow * Hqo + kv_head * G + group.Mod(r);
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

}  // namespace sm90
}  // namespace jax_pagedattn
