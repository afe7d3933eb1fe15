// Tensor-core paged prefill kernel (sm80+ mma.sync), one CTA per (bin, kv head), running
// the bin's work items one after the other (AttendItem below is one item).
//
// Warps. A CTA holds kWarpsM x kWarpsN warps. Warp (wm, wn) owns kMT m16 tiles of
// query rows, [16 kMT wm, 16 kMT (wm + 1)) of the item's tile, and keys
// [wn kKeysW, (wn + 1) kKeysW) of every KV tile. 64-row tiles: 4 warps x 16 rows;
// 128-row tiles: 4 warps x 32 rows at D <= 128 (each K/V fragment feeds two m tiles;
// see PrefillCfg::kMT). kWarpsN = 1 there: every warp sees the whole KV tile. The
// 16-row tile (a decode GQA group padded to 16 rows) stacks its warps along the keys
// instead, each warp keeping its own softmax state, merged through shared memory at
// the end, so that decode keeps 4 warps (2 at D = 256) busy instead of one.
//
// Shared memory (dynamic, base rounded up to 128 bytes), S = STAGES, R = S + 1:
//   s_off  int64 [R][kTileKv]   element offset of each key of a tile (-1: not loadable)
//   s_bad  int32 [R][4]         per 32 keys: some key in range has a bad page id
//   s_freq float [D/2]          RoPE inverse frequencies
//   union: Q [tile_rows][D], K [S][kTileKv][D], V [S][kTileKv][D] during the loop;
//          O staging float [tile_rows][D + 8] per key warp and (m, l) per row in the
//          epilogue.
// Rows of Q/K/V are D 16-bit elements, i.e. D/8 chunks of 16 bytes; chunk c of row r
// sits at position c ^ (r % 8). The 8 rows an ldmatrix phase reads, and the rows a
// cp.async warp writes, then fall in 8 distinct bank groups.
//
// fp8 caches (TKV one byte): the copies land in a ring of S fp8 tiles (rows of D bytes,
// unswizzled: each thread copies and later reads back its own 16-byte chunks), and one
// 16-bit K and V buffer replaces the S stages of the union. At iteration t each thread
// widens its own chunks of fp8 tile t into that buffer (exactly: every e4m3 / e5m2
// value is an f16 and a bf16 value), one more barrier publishes it, and the MMAs run
// as for a 16-bit cache. At S = 2 the union keeps its 16-bit size (two 16-bit tiles
// become one plus two of half the bytes), so occupancy is that of q's type.
// k_scale sits in LogitScaleLog2 and v_scale in the epilogue's normaliser, as for
// every cache.
//
// Pipeline (one barrier per KV tile): at the top of iteration t every thread waits for
// its own copies of tile t (tiles up to t + S - 2 may still be in flight), then
// __syncthreads makes tile t visible and guarantees that every warp finished tile
// t - 1; the CTA then issues tile t + S - 1 into the stage that held t - 1 and computes
// tile t while the later tiles land. The launcher uses S = 2 (64 KB of K/V at D = 128,
// three CTAs per SM); S = 3 (two tiles in flight per CTA, two CTAs per SM) streamed no
// faster on an H200 (docs/PERF_NOTES.md). Key offsets
// run one tile further ahead: the page id of tile t + S + 1 is loaded into a register
// at iteration t, so its global latency hides behind a whole tile of MMAs, turned into
// an offset in s_off at iteration t + 1, used by the copies at t + 2 and the masks
// at t + S + 1.
//
// RoPE: q is rotated while the Q tile is loaded; K is rotated in shared memory after
// each tile lands (one extra barrier per tile, only when RoPE is on). Both rotate in
// fp32 and round back to the input type, as the reference does.
#pragma once

#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "jax_pagedattn/params.h"
#include "logit_transforms.cuh"
#include "prefill_ptx.cuh"
#include "rope.cuh"
#include "softmax_state.cuh"
#include "split_merge.cuh"
#include "vec_dtypes.cuh"
#include "work_item.cuh"

namespace jax_pagedattn {
namespace prefill_detail {

// KV_BYTES: bytes per cache element, 2 (q's type) or 1 (fp8).
template <int D, int TILE_ROWS, int STAGES = 2, int KV_BYTES = 2>
struct PrefillCfg {
  // K/V tiles in flight: tile t + STAGES - 1 is issued while tile t is computed.
  static constexpr int kStages = STAGES;
  // Key offsets are published one tile further ahead than the copies need them.
  static constexpr int kRing = STAGES + 1;
  static_assert(STAGES >= 2, "the pipeline needs two stages at least");
  // m16 row tiles per warp. Two tiles let every K/V fragment read from shared memory
  // feed twice the MMAs (16-row warps are bound by ldmatrix bandwidth); used where the
  // accumulators fit in registers: 128-row tiles at D <= 128, 4 warps of 32 rows.
  // (Measured on an H100, bf16 D 128 causal, against 8 warps x 16 rows: 4 x 2048
  // 238 vs 215 TFLOP/s, 1 x 8192 291 vs 266, 16 x 512 144 vs 124.)
  static constexpr int kMT = (TILE_ROWS == 128 && D <= 128) ? 2 : 1;
  static constexpr int kWarpsM = TILE_ROWS / (16 * kMT);
  // Decode tiles split the keys over warps: 4 warps of 16 keys; at D = 256 two warps,
  // which keeps a stage at 32 KB so that three CTAs still fit on an SM.
  static constexpr int kWarpsN = TILE_ROWS == 16 ? (D == 256 ? 2 : 4) : 1;
  static constexpr int kWarps = kWarpsM * kWarpsN;
  static constexpr int kThreads = kWarps * 32;
  // Keys per tile: 64, except where the S accumulators would push the warp past 255
  // registers (D = 256; two m tiles at D = 128), which take 32.
  static constexpr int kTileKv =
      TILE_ROWS == 16 ? 16 * kWarpsN : (D == 256 || (kMT == 2 && D == 128) ? 32 : 64);
  static constexpr int kKeysW = kTileKv / kWarpsN;  // keys per warp per tile
  static constexpr int kChunks = D / 8;             // 16-byte chunks per row
  static constexpr int kHalf = D / 16;              // chunks in half a row (RoPE pairs)
  static constexpr int kRowBytes = D * 2;
  static constexpr int kOStride = D + 8;  // floats; +8 spreads 8 rows over the banks

  // fp8 caches: one 16-bit K/V buffer, and a ring of kStages fp8 tiles whose rows are
  // kChunks8 chunks of 16 bytes (16 elements, two 16-bit chunks once widened).
  static constexpr bool kFp8 = KV_BYTES == 1;
  static_assert(KV_BYTES == 1 || KV_BYTES == 2, "16-bit or fp8 caches");
  static constexpr int kBufs = kFp8 ? 1 : kStages;  // 16-bit K (and V) tile buffers
  static constexpr int kChunks8 = D / 16;
  static constexpr int kLdChunks = kFp8 ? kChunks8 : kChunks;  // copies per row
  static constexpr int kLdRowsPerPass = kThreads / kLdChunks;
  static constexpr int kLdPasses = kTileKv / kLdRowsPerPass;

  static constexpr int kQBytes = TILE_ROWS * kRowBytes;
  static constexpr int kStageBytes = kTileKv * kRowBytes;
  static constexpr int kStage8Bytes = kFp8 ? kTileKv * D : 0;
  static constexpr int kGroups = kWarps * kMT;  // 16-row (m, l, O) states per CTA
  static constexpr int kOBytes = kGroups * 16 * kOStride * 4;
  static constexpr int kMlBytes = kGroups * 16 * 8;

  static constexpr int kOffOff = 0;
  static constexpr int kBadOff = kOffOff + kRing * kTileKv * 8;
  static constexpr int kFreqOff = kBadOff + kRing * 4 * 4;
  static constexpr int kUnionOff = (kFreqOff + D / 2 * 4 + 127) / 128 * 128;
  static constexpr int kQOff = kUnionOff;
  static constexpr int kKOff = kQOff + kQBytes;
  static constexpr int kVOff = kKOff + kBufs * kStageBytes;
  static constexpr int kK8Off = kVOff + kBufs * kStageBytes;
  static constexpr int kV8Off = kK8Off + kStages * kStage8Bytes;
  static constexpr int kMainEnd = kV8Off + kStages * kStage8Bytes;
  static constexpr int kEpiEnd = kUnionOff + kOBytes + kMlBytes;
  static constexpr int kSmemBytes = (kMainEnd > kEpiEnd ? kMainEnd : kEpiEnd) + 128;
  // The occupancy query (PrefillCtasPerSm) asks for q's type.
  static_assert(!kFp8 || kSmemBytes <= PrefillCfg<D, TILE_ROWS, STAGES, 2>::kSmemBytes,
                "an fp8 cache needs no more shared memory than a 16-bit one");

  static_assert(kThreads >= kTileKv && kTileKv % 32 == 0, "offset warps must be whole");
  static_assert(kTileKv / 32 <= 4, "s_bad holds 4 words per tile");
  static_assert(kLdRowsPerPass >= 1 && kTileKv % kLdRowsPerPass == 0, "loader mapping");
  static_assert(kKeysW % 16 == 0, "P V needs k16 key steps");
};

// Two fp8 elements (the low 16 bits of `w`) widened to a pair of T, through f16: an
// e5m2 byte is the high byte of its f16, an e4m3 pair takes one cvt (sm_89+; emulated
// before). Exact: every e4m3 and e5m2 value is an f16 and a bf16 value.
template <typename T>
__device__ __forceinline__ uint32_t WidenFp8Pair(uint32_t w, bool e5m2) {
  uint32_t h2;
  if (e5m2) {
    h2 = __byte_perm(w, 0u, 0x1404);  // bytes {0, w0, 0, w1}
  } else {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w & 0xffffu), __NV_E4M3);
    h2 = uint32_t(h.x) | (uint32_t(h.y) << 16);
  }
  if constexpr (std::is_same_v<T, __half>) {
    return h2;
  } else {
    const float2 f = UnpackPair<__half>(h2);
    return PackPair<T>(f.x, f.y);
  }
}

// 16 fp8 elements (one 16-byte chunk of an fp8 row) widened to T: two 16-byte chunks.
template <typename T>
__device__ __forceinline__ void WidenFp8(const uint4& x, bool e5m2, uint4& lo, uint4& hi) {
  const uint32_t in[4] = {x.x, x.y, x.z, x.w};
  uint32_t out[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = WidenFp8Pair<T>(in[i], e5m2);
    out[2 * i + 1] = WidenFp8Pair<T>(in[i] >> 16, e5m2);
  }
  lo = make_uint4(out[0], out[1], out[2], out[3]);
  hi = make_uint4(out[4], out[5], out[6], out[7]);
}

// Byte offset of chunk `c` of row `r` in a swizzled tile.
template <int kRowBytes>
__device__ __forceinline__ uint32_t Swz(int r, int c) {
  return uint32_t(r * kRowBytes + ((c ^ (r & 7)) << 4));
}

// One work item (`item`, an index into p.work) for the CTA's kv head; `smem` is the
// 128-byte aligned dynamic shared memory. Every early return is uniform over the CTA.
// TKV: the cache's element type, T, or uint8_t for an fp8 cache (e4m3 or e5m2, told
// apart at run time by p.kv_dtype: one kernel serves both).
template <typename T, typename TKV, int D, int TILE_ROWS, int STAGES>
__device__ __forceinline__ void AttendItem(const AttentionParams& p, int item, uint8_t* smem) {
  using Cfg = PrefillCfg<D, TILE_ROWS, STAGES, int(sizeof(TKV))>;
  constexpr int kStages = Cfg::kStages;
  constexpr int kRing = Cfg::kRing;
  using E = Elem<T>;
  constexpr int kWarpsN = Cfg::kWarpsN;
  constexpr int kMT = Cfg::kMT;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kTileKv = Cfg::kTileKv;
  constexpr int kKeysW = Cfg::kKeysW;
  constexpr int kChunks = Cfg::kChunks;
  constexpr int kHalf = Cfg::kHalf;
  constexpr int kRowBytes = Cfg::kRowBytes;
  constexpr float kNegInf = -__builtin_huge_valf();

  int64_t* s_off = reinterpret_cast<int64_t*>(smem + Cfg::kOffOff);
  int32_t* s_bad = reinterpret_cast<int32_t*>(smem + Cfg::kBadOff);
  float* s_freq = reinterpret_cast<float*>(smem + Cfg::kFreqOff);
  const uint32_t sq_addr = SmemAddr(smem + Cfg::kQOff);
  const uint32_t sk_addr = SmemAddr(smem + Cfg::kKOff);
  const uint32_t sv_addr = SmemAddr(smem + Cfg::kVOff);
  const uint32_t sk8_addr = SmemAddr(smem + Cfg::kK8Off);  // fp8 caches only
  const uint32_t sv8_addr = SmemAddr(smem + Cfg::kV8Off);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp / kWarpsN;
  const int wn = warp % kWarpsN;
  const int kv_head = blockIdx.y;

  // ---- the work item: clamped to its request and q's rows (work_item.cuh) -----------
  const WorkItem it = LoadWorkItem(p, item, TILE_ROWS);
  if (it.request < 0) return;  // padding, or nothing inside the bounds
  const int G = p.group_size;
  const int Hqo = p.num_qo_heads;
  // Rows count from the item's first token: q row q_base, query position pos_off.
  const int64_t q_base = it.q_base;
  const int pos_off = it.pos_base;
  const int row_begin = it.row_begin;
  const int nrows = it.num_rows;
  const int split = it.split;
  // Every page-table slot page_base + j / ps of [kv_begin, kv_end) is inside kv_indices.
  const int ps = p.kv.page_size;
  const int64_t page_base = it.page_base;
  const int kv_begin = it.kv_begin;
  const int kv_end = it.kv_end;
  const int num_tiles = (kv_end - kv_begin + kTileKv - 1) / kTileKv;

  const bool causal = p.causal;
  const bool rope = p.pos_encoding == PosEncoding::kRopeLlama;
  const bool alibi = p.pos_encoding == PosEncoding::kAlibi;
  const float scale_log2 = LogitScaleLog2(p);
  const SoftCap soft_cap{p};
  // Key j is in the window of the query at qpos when j - qpos >= -window_left (always
  // without a window): one compare per element, and no per-row registers.
  const bool window = p.window_left >= 0;
  const int neg_window = window ? -p.window_left : INT_MIN;
  const TKV* kbase = static_cast<const TKV*>(p.kv.k);
  const TKV* vbase = static_cast<const TKV*>(p.kv.v);
  const int64_t head_off = int64_t(kv_head) * p.kv.head_stride;

  // ---- key offsets (threads tid < kTileKv own key tid of each tile) ----------------
  // Page id and slot of key tid of `tile`; pid -1 past kv_end.
  auto lookup = [&](int tile, int& pid, int& slot) {
    const int j = kv_begin + tile * kTileKv + tid;
    pid = -1;
    slot = 0;
    if (tile < num_tiles && j < kv_end) {
      const int pg = j / ps;
      slot = j - pg * ps;
      pid = __ldg(p.kv_indices + page_base + pg);
    }
  };
  // Offsets of `tile` into ring slot tile % kRing, plus its bad-page flags. Called by whole
  // warps (kTileKv is a multiple of 32) for the ballot.
  auto publish = [&](int tile, int pid, int slot) {
    const int j = kv_begin + tile * kTileKv + tid;
    const bool in_range = j < kv_end;
    const bool ok = in_range && pid >= 0 && pid < p.kv.num_pages;
    const int ring = tile % kRing;
    s_off[ring * kTileKv + tid] =
        ok ? int64_t(pid) * p.kv.page_stride + int64_t(slot) * p.kv.slot_stride + head_off
           : int64_t(-1);
    const unsigned bad = __ballot_sync(0xffffffffu, in_range && !ok);
    if (lane == 0) s_bad[ring * 4 + warp] = bad != 0u;
  };

  // Copies of `tile` into stage tile % kStages (of the fp8 ring for an fp8 cache); keys
  // without an offset are zero-filled (+0 in fp8 too).
  const int ld_chunk = tid % Cfg::kLdChunks;
  const int ld_row = tid / Cfg::kLdChunks;
  auto issue = [&](int tile) {
    const int64_t* offs = s_off + (tile % kRing) * kTileKv;
    constexpr bool kFp8 = Cfg::kFp8;
    const uint32_t stage =
        uint32_t(tile % kStages) * uint32_t(kFp8 ? Cfg::kStage8Bytes : Cfg::kStageBytes);
    const uint32_t k_dst = kFp8 ? sk8_addr : sk_addr;
    const uint32_t v_dst = kFp8 ? sv8_addr : sv_addr;
#pragma unroll
    for (int pass = 0; pass < Cfg::kLdPasses; ++pass) {
      const int row = ld_row + pass * Cfg::kLdRowsPerPass;
      const int64_t off = offs[row];
      const bool ok = off >= 0;
      // 16 bytes: 8 elements of a 16-bit cache, 16 of an fp8 one (whose rows in the fp8
      // ring are plain D bytes).
      const int64_t src = (ok ? off : 0) + ld_chunk * (kFp8 ? 16 : 8);
      const uint32_t dst = stage + (kFp8 ? uint32_t(row * D + ld_chunk * 16)
                                         : Swz<kRowBytes>(row, ld_chunk));
      CpAsync16(k_dst + dst, kbase + src, ok);
      CpAsync16(v_dst + dst, vbase + src, ok);
    }
  };

  // ---- prologue ---------------------------------------------------------------------
  int pid_next = -1, slot_next = 0;
  if (tid < kTileKv) {
    // Tiles 0 .. kStages - 1 published, tile kStages looked up (all loads first).
    int pids[kStages], slots[kStages];
#pragma unroll
    for (int i = 0; i < kStages; ++i) lookup(i, pids[i], slots[i]);
    lookup(kStages, pid_next, slot_next);
#pragma unroll
    for (int i = 0; i < kStages; ++i) publish(i, pids[i], slots[i]);
  }
  if (rope) RopeFrequencyTable(s_freq, D, p.rope_scale, p.rope_theta, tid, kThreads);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < num_tiles) issue(i);
    CpAsyncCommit();  // one group per tile, empty or not, so the waits below count tiles
  }

  // Q tile: thread handles chunk pairs (c, c + D/16) so RoPE can rotate in registers.
  {
    const T* qg = static_cast<const T*>(p.q);
    for (int i = tid; i < TILE_ROWS * kHalf; i += kThreads) {
      const int rr = i / kHalf;
      const int c = i % kHalf;
      uint4 lo = make_uint4(0, 0, 0, 0);
      uint4 hi = lo;
      if (rr < nrows) {
        const int r = row_begin + rr;
        const int64_t tok = q_base + r / G;
        const int head = kv_head * G + r % G;
        const T* src = qg + (tok * Hqo + head) * D + c * 8;
        lo = *reinterpret_cast<const uint4*>(src);
        hi = *reinterpret_cast<const uint4*>(src + D / 2);
        if (rope) RopePairs<T>(lo, hi, float(pos_off + r / G), s_freq + c * 8);
      }
      *reinterpret_cast<uint4*>(smem + Cfg::kQOff + Swz<kRowBytes>(rr, c)) = lo;
      *reinterpret_cast<uint4*>(smem + Cfg::kQOff + Swz<kRowBytes>(rr, c + kHalf)) = hi;
    }
  }

  // ---- per-thread row data ------------------------------------------------------------
  // Warp rows: m tile mt covers rows 16 (wm kMT + mt) + [0, 16); this thread's
  // accumulator rows in it are lane / 4 (h = 0) and lane / 4 + 8 (h = 1).
  const int warp_row0 = wm * kMT * 16;
  int qpos[kMT][2];
  float slope[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row_begin + warp_row0 + mt * 16 + (lane >> 2) + 8 * h;
      qpos[mt][h] = pos_off + r / G;
      slope[mt][h] = alibi ? AlibiSlope(kv_head * G + r % G, Hqo) * kLog2e : 0.0f;
    }
  // Rows grow with the token index, so a warp's first and last live rows bound the
  // causal limits (and window starts) of all of them.
  const bool warp_live = warp_row0 < nrows;
  const int warp_last = warp_row0 + kMT * 16 - 1 < nrows - 1 ? warp_row0 + kMT * 16 - 1 : nrows - 1;
  const int warp_min_limit = pos_off + (row_begin + warp_row0) / G;
  const int warp_max_limit = pos_off + (row_begin + warp_last) / G;

  float o[kMT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.0f;
  float m_run[kMT][2], l_run[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    m_run[mt][0] = m_run[mt][1] = kNegInf;
    l_run[mt][0] = l_run[mt][1] = 0.0f;
  }

  // ldmatrix lane addresses. Every row a lane addresses is == lane (mod 8), so its
  // swizzle is sw = lane & 7; logical chunk 2 i + x (x: the lane's half, 0 or 1) sits at
  // byte 128 (i / 4) + (((x ^ sw) << 4) ^ ((i % 4) << 5)) of the row. Rows start on
  // 128 bytes, so the per-step part is one XOR of the lane address plus an immediate.
  const int sw = lane & 7;
  const uint32_t q_lane = sq_addr + uint32_t((warp_row0 + (lane & 15)) * kRowBytes) +
                          uint32_t(((lane >> 4) ^ sw) << 4);
  const uint32_t k_lane = sk_addr +
                          uint32_t((wn * kKeysW + (lane >> 4) * 8 + (lane & 7)) * kRowBytes) +
                          uint32_t((((lane >> 3) & 1) ^ sw) << 4);
  const uint32_t v_lane = sv_addr + uint32_t((wn * kKeysW + (lane & 15)) * kRowBytes) +
                          uint32_t(((lane >> 4) ^ sw) << 4);

  // ---- main loop over KV tiles --------------------------------------------------------
  for (int t = 0; t < num_tiles; ++t) {
    CpAsyncWait<kStages - 2>();  // tile t has landed (newer tiles may be in flight)
    __syncthreads();
    if (t + kStages - 1 < num_tiles) issue(t + kStages - 1);
    CpAsyncCommit();
    if (tid < kTileKv) {
      if (t + kStages < num_tiles) publish(t + kStages, pid_next, slot_next);
      lookup(t + kStages + 1, pid_next, slot_next);
    }

    const int kt = kv_begin + t * kTileKv;
    if constexpr (Cfg::kFp8) {
      // Widen tile t into the 16-bit buffer, which every warp finished reading at the
      // barrier above. Each thread reads back only chunks it copied itself, complete
      // since its wait; the barrier after publishes the 16-bit tile.
      const uint32_t stage8 = uint32_t(t % kStages) * Cfg::kStage8Bytes;
      const bool e5m2 = p.kv_dtype == DType::kF8E5M2;  // else e4m3 (LaunchPrefill checked)
      // Not unrolled: unrolled, bf16 at D = 64 took 117 registers instead of 93 on
      // sm_90a (five CTAs per SM down to four, below what the occupancy query of q's
      // type reports).
#pragma unroll 1
      for (int pass = 0; pass < Cfg::kLdPasses; ++pass) {
        const int row = ld_row + pass * Cfg::kLdRowsPerPass;
        const uint32_t src = stage8 + uint32_t(row * D + ld_chunk * 16);
#pragma unroll
        for (int kv = 0; kv < 2; ++kv) {
          uint8_t* buf = smem + (kv == 0 ? Cfg::kKOff : Cfg::kVOff);
          const uint4 x =
              *reinterpret_cast<const uint4*>(smem + (kv == 0 ? Cfg::kK8Off : Cfg::kV8Off) + src);
          uint4 lo, hi;
          WidenFp8<T>(x, e5m2, lo, hi);
          *reinterpret_cast<uint4*>(buf + Swz<kRowBytes>(row, 2 * ld_chunk)) = lo;
          *reinterpret_cast<uint4*>(buf + Swz<kRowBytes>(row, 2 * ld_chunk + 1)) = hi;
        }
      }
      __syncthreads();
    }
    const uint32_t stage = uint32_t(t % Cfg::kBufs) * Cfg::kStageBytes;
    if (rope) {
      uint8_t* ks = smem + Cfg::kKOff + stage;
      for (int i = tid; i < kTileKv * kHalf; i += kThreads) {
        const int row = i / kHalf;
        const int c = i % kHalf;
        if (kt + row < kv_end) {
          uint4* plo = reinterpret_cast<uint4*>(ks + Swz<kRowBytes>(row, c));
          uint4* phi = reinterpret_cast<uint4*>(ks + Swz<kRowBytes>(row, c + kHalf));
          uint4 lo = *plo, hi = *phi;
          RopePairs<T>(lo, hi, float(kt + row), s_freq + c * 8);
          *plo = lo;
          *phi = hi;
        }
      }
      __syncthreads();
    }

    const int kw0 = kt + wn * kKeysW;  // this warp's first key
    const uint32_t k_stage = k_lane + stage;  // stage is a multiple of 128
    const uint32_t v_stage = v_lane + stage;
    if (!warp_live || kw0 >= kv_end || (causal && kw0 > warp_max_limit) ||
        (window && kw0 + kKeysW - 1 - warp_min_limit < neg_window))  // before every window
      continue;

    // S = Q K^T for 16 kMT rows x kKeysW keys; each K fragment serves every m tile.
    float s[kMT][kKeysW / 8][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int i = 0; i < kKeysW / 8; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
        Ldsm4(a[mt], (q_lane ^ uint32_t((ks & 3) << 5)) + uint32_t((ks >> 2) * 128) +
                         uint32_t(mt * 16 * kRowBytes));
#pragma unroll
      for (int kp = 0; kp < kKeysW / 16; ++kp) {
        uint32_t bk[4];
        Ldsm4(bk, (k_stage ^ uint32_t((ks & 3) << 5)) + uint32_t((ks >> 2) * 128) +
                      uint32_t(kp * 16 * kRowBytes));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          E::Mma(s[mt][2 * kp], a[mt], bk[0], bk[1]);
          E::Mma(s[mt][2 * kp + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    // Scale into base-2 logits (soft-capped where asked); per-element masks/bias only
    // where some key of the warp's slice may be invisible to some row: past kv_end, a
    // bad page, across the causal diagonal or a window's start, or ALiBi (which biases
    // every element).
    const int ring = t % kRing;
    bool tile_bad = false;
#pragma unroll
    for (int w = 0; w < kTileKv / 32; ++w) tile_bad |= s_bad[ring * 4 + w] != 0;
    const bool need_mask = alibi || tile_bad || kw0 + kKeysW > kv_end ||
                           (causal && kw0 + kKeysW - 1 > warp_min_limit) ||
                           (window && kw0 - warp_max_limit < neg_window);
    if (soft_cap.on()) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nb = 0; nb < kKeysW / 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nb][e] = soft_cap(s[mt][nb][e] * scale_log2);
    }
    if (need_mask) {
      // Soft-capped scores are already in base-2 units.
      const float mul = soft_cap.on() ? 1.0f : scale_log2;
      const int64_t* offs = s_off + ring * kTileKv + wn * kKeysW;
#pragma unroll
      for (int nb = 0; nb < kKeysW / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = nb * 8 + (lane & 3) * 2 + e;
          const int j = kw0 + col;
          const bool ok = offs[col] >= 0;
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const bool vis =
                  ok && (!causal || j <= qpos[mt][h]) && j - qpos[mt][h] >= neg_window;
              const float v =
                  s[mt][nb][2 * h + e] * mul + slope[mt][h] * float(j - qpos[mt][h]);
              s[mt][nb][2 * h + e] = vis ? v : kNegInf;
            }
        }
      }
    } else if (!soft_cap.on()) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nb = 0; nb < kKeysW / 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nb][e] *= scale_log2;
    }

    // Online softmax. Row maxima are reduced over the quad that shares a row; the row
    // sums stay per thread until the end.
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      float mx[2] = {m_run[mt][0], m_run[mt][1]};
#pragma unroll
      for (int nb = 0; nb < kKeysW / 8; ++nb) {
        mx[0] = fmaxf(mx[0], fmaxf(s[mt][nb][0], s[mt][nb][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[mt][nb][2], s[mt][nb][3]));
      }
      float base[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        // A row with nothing visible yet keeps max -inf (SafeMax: subtract 0 instead).
        base[h] = SafeMax(mx[h]);
        const float corr = FastExp2(m_run[mt][h] - base[h]);
        m_run[mt][h] = mx[h];
        l_run[mt][h] *= corr;
#pragma unroll
        for (int db = 0; db < D / 8; ++db) {
          o[mt][db][2 * h] *= corr;
          o[mt][db][2 * h + 1] *= corr;
        }
      }
#pragma unroll
      for (int nb = 0; nb < kKeysW / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nb][e] = FastExp2(s[mt][nb][e] - base[e >> 1]);
        l_run[mt][0] += s[mt][nb][0] + s[mt][nb][1];
        l_run[mt][1] += s[mt][nb][2] + s[mt][nb][3];
      }
    }

    // O += P V, P rounded to the input type (the accumulator layout of S is the A
    // fragment layout of P, so no shuffles).
#pragma unroll
    for (int kk = 0; kk < kKeysW / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        a[mt][0] = PackPair<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = PackPair<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = PackPair<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = PackPair<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bv[4];
        Ldsm4T(bv, (v_stage ^ uint32_t((dp & 3) << 5)) + uint32_t((dp >> 2) * 128) +
                       uint32_t(kk * 16 * kRowBytes));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          E::Mma(o[mt][2 * dp], a[mt], bv[0], bv[1]);
          E::Mma(o[mt][2 * dp + 1], a[mt], bv[2], bv[3]);
        }
      }
    }
  }

  // ---- epilogue: stage (m, l, O) per warp, merge the key-split warps, normalise -------
  CpAsyncWaitAll();
  __syncthreads();  // every warp is done with Q/K/V; the union becomes the O staging
  // State slot of row group g (16 rows) and key warp wn: g * kWarpsN + wn, where
  // g = wm * kMT + mt. (kWarpsN > 1 only with kMT == 1, so the slot is the warp.)
  float* s_o = reinterpret_cast<float*>(smem + Cfg::kUnionOff);
  float2* s_ml = reinterpret_cast<float2*>(smem + Cfg::kUnionOff + Cfg::kOBytes);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l_run[mt][h] += __shfl_xor_sync(0xffffffffu, l_run[mt][h], 1);
      l_run[mt][h] += __shfl_xor_sync(0xffffffffu, l_run[mt][h], 2);
    }
    const int orow = ((wm * kMT + mt) * kWarpsN + wn) * 16 + (lane >> 2);
    if ((lane & 3) == 0) {
      s_ml[orow] = make_float2(m_run[mt][0], l_run[mt][0]);
      s_ml[orow + 8] = make_float2(m_run[mt][1], l_run[mt][1]);
    }
#pragma unroll
    for (int db = 0; db < D / 8; ++db) {
      const int col = db * 8 + (lane & 3) * 2;
      *reinterpret_cast<float2*>(s_o + orow * Cfg::kOStride + col) =
          make_float2(o[mt][db][0], o[mt][db][1]);
      *reinterpret_cast<float2*>(s_o + (orow + 8) * Cfg::kOStride + col) =
          make_float2(o[mt][db][2], o[mt][db][3]);
    }
  }
  __syncthreads();

  for (int i = tid; i < TILE_ROWS * kChunks; i += kThreads) {
    const int rr = i / kChunks;
    const int c = i % kChunks;
    if (rr >= nrows) break;  // rows only grow with i
    const int g = rr >> 4;
    const int r16 = rr & 15;
    float m_tot = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarpsN; ++w) m_tot = fmaxf(m_tot, s_ml[(g * kWarpsN + w) * 16 + r16].x);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    float l_tot = 0.0f;
    if (m_tot != kNegInf) {
#pragma unroll
      for (int w = 0; w < kWarpsN; ++w) {
        const int srow = (g * kWarpsN + w) * 16 + r16;
        const float2 ml = s_ml[srow];
        const float wgt = FastExp2(ml.x - m_tot);  // 0 for a warp that saw nothing
        l_tot += ml.y * wgt;
        const float4* src = reinterpret_cast<const float4*>(s_o + srow * Cfg::kOStride + c * 8);
        const float4 x0 = src[0];
        const float4 x1 = src[1];
        acc[0] += wgt * x0.x; acc[1] += wgt * x0.y; acc[2] += wgt * x0.z; acc[3] += wgt * x0.w;
        acc[4] += wgt * x1.x; acc[5] += wgt * x1.y; acc[6] += wgt * x1.z; acc[7] += wgt * x1.w;
      }
    }
    const int r = row_begin + rr;
    // The row's softmax state, with its sink (which weighs no value) folded in.
    SoftmaxState st{l_tot > 0.0f ? m_tot : kNegInf, l_tot};
    float keep, unused;
    st.Merge(SinkState(p, kv_head * G + r % G, split), &keep, &unused);
    const float inv = st.InvSum() * keep * VScale(p);
    const float lse_v = st.Lse();
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] *= inv;

    const int64_t tok = q_base + r / G;
    const int64_t hrow = tok * Hqo + kv_head * G + r % G;  // (token, head) index
    if (split < 0) {
      *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + hrow * D + c * 8) = Pack8<T>(acc);
      if (c == 0) p.lse[hrow] = lse_v;
    } else {
      const int64_t prow = int64_t(p.merge_indptr[tok]) + split;
      if (prow >= 0 && prow < p.caps.partial_rows) {
        const int64_t ph = prow * Hqo + kv_head * G + r % G;
        float4* dst = reinterpret_cast<float4*>(p.partial_o + ph * D + c * 8);
        dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
        dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
        if (c == 0) p.partial_lse[ph] = lse_v;
      }
    }
  }
  // Scratch: the key-offset ring, which only the main loop reads.
  static_assert(kRing * kTileKv * 2 >= TILE_ROWS + 1, "split-merge scratch fits s_off");
  if (split >= 0)
    FinishSplitItem<T, kThreads, TILE_ROWS>(p, q_base, row_begin, row_begin + nrows, kv_head,
                                            reinterpret_cast<int*>(s_off));
}

// The grid is [bin_cap, num_kv_heads]: CTA (bin, head) runs the bin's items in order
// (plan_layout.h), so a launch is one wave whose balance the planner decided.
template <typename T, typename TKV, int D, int TILE_ROWS, int STAGES>
__global__ void __launch_bounds__(PrefillCfg<D, TILE_ROWS, STAGES>::kThreads)
    PrefillKernel(const __grid_constant__ AttentionParams p) {
  // The fragment addressing XORs bits 4-6 of absolute shared addresses, which needs
  // every tile row to start on 128 bytes; the launch adds 128 bytes of slack so the
  // base can be rounded up whatever the runtime reserved in front of it.
  extern __shared__ __align__(128) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((128u - (SmemAddr(smem_raw) & 127u)) & 127u);
  const int bin = blockIdx.x;
  const int begin = max(p.bin_indptr[bin], 0);
  const int end = min(p.bin_indptr[bin + 1], p.layout.work_cap);
  for (int item = begin; item < end; ++item) {
    AttendItem<T, TKV, D, TILE_ROWS, STAGES>(p, item, smem);
    __syncthreads();  // the next item's prologue rewrites what this epilogue read
  }
  WaitForPrimaryGrid();  // never finish before the setup pass (dependent_launch.cuh)
}

}  // namespace prefill_detail
}  // namespace jax_pagedattn
