// CUDA-core paged decode: one CTA per (bin, kv head), running the bin's work items one
// after the other (AttendItem is one item; the planner balanced the bins).
//
// The item's packed rows (the G query heads of one token in the usual decode plan) all
// read the same K/V rows, so every key is fetched and widened once and used for every
// row. Decode is bound by the bytes of K and V, so the design starts from them:
//
// * Warp tiles of 8 KB. Each of the 4 warps streams its own tiles of keys (tile n of the
//   item goes to warp n % 4) through its own 2-stage cp.async ring in shared memory: no
//   CTA-wide barrier in the main loop, and 4 warps x 8 KB (3 CTAs per SM: 96 KB per SM)
//   stay in flight, several times the ~20 KB that 3 TB/s x ~1 us of latency needs per SM.
//   Resident CTAs per SM (H100): 3 for R <= 4, 2 for R = 8; a planner should size the
//   item count so items x kv heads fill whole waves of 132 x that.
//   A tile holds kKeys = 2048 / D keys, i.e. 256 16-byte chunks of K and 256 of V for
//   every head_dim, so each lane issues 8 + 8 LDGSTS.128 per tile and each instruction of
//   a warp covers whole contiguous rows (coalesced 32-byte sectors).
// * Page ids are looked up once per tile and key (one lane per key), one tile ahead of
//   use so the lookup latency hides behind the current tile; lanes get the 64-bit row
//   offsets of the keys they copy by shuffle. Keys past the range or with a page id
//   outside [0, num_pages) are zero-filled and masked, never dereferenced.
// * q.k: D/64 lanes per key, 64 dims each (8 chunks), q read from shared memory as fp32
//   (pre-scaled by sm_scale * log2 e and rotated for RoPE); one butterfly step per extra
//   lane. Shared rows are XOR-swizzled by 16-byte chunk (chunk ^ key % 8) so the copies,
//   the per-key reads of q.k and the per-chunk reads of p.v are all conflict-free.
// * Online softmax per warp in base 2 (tile max over the warp, exp2 on MUFU), the
//   probabilities go through 1 KB of shared memory, and p.v runs with each lane owning 8
//   output dims of every row, so V is widened once per key. At the end the 4 warp states
//   merge in shared memory and the CTA writes out/lse, or the partial row for split items.
//
// Registers: o[R][8] and m, l per row stay live; arrays are indexed only by compile-time
// constants. sm_90a (nvcc 13): 157-168 registers for R <= 4 (cap 168), 199-215 for R = 8
// (cap 255); no spills but 20 bytes in f16 D 64/128 R 2, stored and reloaded per item and
// row pass, never in the key loop. Instantiations: {f16, bf16} x D {64, 128, 256} x
// R {1, 2, 4, 8}, with a cache of q's type, e4m3 or e5m2.
//
// fp8 caches at D = 128 and 256 stream wide tiles (kWideTiles): with a 16-bit tile's keys
// in 8-byte chunks, an fp8 tile holds only 4 KB (2 KB of K), half of what a 16-bit tile
// keeps in flight. A wide tile packs 16 fp8 values per 16-byte slot, so it holds 4096 / D
// keys (32 at D = 128, 16 at D = 256), 8 KB of K and V copied with the same 8 + 8
// LDGSTS.128 per lane; q.k widens whole slots (128 dims per lane), p.v reads 8-byte halves
// (8 output dims per lane, 16 keys). D = 64 keeps the 8-byte chunks (a wide tile would
// hold 64 keys, more than the one-lane-per-key page lookup covers).
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>

#include "cp_async.cuh"
#include "dependent_launch.cuh"
#include "kernel_setup.cuh"
#include "jax_pagedattn/params.h"
#include "launchers.h"
#include "logit_transforms.cuh"
#include "rope.cuh"
#include "softmax_state.cuh"
#include "split_merge.cuh"
#include "vec_dtypes.cuh"
#include "work_item.cuh"

namespace jax_pagedattn {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarps = 4;  // 128 threads: small enough for 3 CTAs per SM (see smem below)
constexpr int kThreads = kWarps * 32;
// Query tokens of one work item at most: decode items hold one token (a GQA group or a
// slice of it); the bound only sizes the split-merge bookkeeping in shared memory.
constexpr int kMaxItemTokens = 8;
// Each warp keeps one tile loading while it computes another. With 12 warps per SM that
// is already ~5x the bytes in flight that the memory system needs; a third stage costs
// the third CTA per SM (measured on H100: same GB/s where the grid is many waves deep,
// so only the wave quantisation changes). Overridable at build time for tuning runs.
#ifndef JPA_DECODE_STAGES
#define JPA_DECODE_STAGES 2
#endif
constexpr int kStages = JPA_DECODE_STAGES;
static_assert(kStages >= 2, "the pipeline needs at least two stages");
// K/V are streamed exactly once per step; marking them evict-first in L2 keeps the page
// table, q and the split partials resident (measured on H100: +1-3% GB/s, never worse).
#ifndef JPA_DECODE_L2_EVICT_FIRST
#define JPA_DECODE_L2_EVICT_FIRST 1
#endif

// kWide: the fp8 tiles (kWideTiles) whose 16-byte shared slots hold 16 fp8 elements, so
// a tile of the same 8 KB holds twice the keys: 4096 / D (32 at D = 128, 16 at D = 256),
// each lane copying 16 bytes (16 keys' worth of dims) per LDGSTS.128 and widening a whole
// slot in q.k. p.v keeps 8 output dims per lane (half a slot, read as 8 bytes), so o stays
// [R][8]; each lane then takes 16 keys of a tile instead of 8.
template <int D, bool kWide = false>
struct Shape {
  static_assert(D == 64 || D == 128 || D == 256, "head_dim must be 64, 128 or 256");
  static_assert(!kWide || D >= 128, "the wide fp8 tile needs at most 32 keys");
  static constexpr int kSlotElems = kWide ? 16 : 8;       // elements per 16-byte slot
  static constexpr int kChunks = D / kSlotElems;          // 16-byte slots per K/V row
  static constexpr int kKeys = 2048 / D * (kWide ? 2 : 1);  // keys per warp tile (4 KB of K)
  static constexpr int kTileChunks = kKeys * kChunks;     // 256 for every D
  static constexpr int kLoadsPerLane = kTileChunks / 32;  // 8 copies of K (and of V) per lane
  static constexpr int kLanesPerKey = 32 / kKeys;         // q.k: lanes sharing a key
  static constexpr int kQkChunks = kChunks / kLanesPerKey;  // 8 slots (64 or 128 dims) per lane
  static constexpr int kQChunks = D / 8;                  // q's 16-byte chunks (8 elements)
  static constexpr int kPvLanes = D / 8;                  // p.v: lanes per row (8 dims each)
  static constexpr int kPvGroups = 32 / kPvLanes;         // p.v: key groups
  static constexpr int kPvKeys = kKeys / kPvGroups;       // 8 (wide: 16) keys per lane per tile
  static constexpr int kStageU4 = 2 * kTileChunks;        // K then V of one tile, in uint4
  static_assert(kQkChunks == 8 && kPvKeys == 8 * (kWide ? 2 : 1) && kLoadsPerLane == 8,
                "tile shape");
};

// Dynamic shared memory, in bytes, carved as:
//   kv    [kWarps][kStages][K|V][kTileChunks] uint4   64 KB; after the main loop each
//                                                     warp's part holds its o[R][D] fp32
//   q     [R][D] fp32, scaled (and rotated)
//   p     [kWarps][kKeys][R] fp32                     one tile's probabilities per warp
//   freq  [D/2] fp32                                  RoPE frequencies
//   ml    [kWarps][R][2] fp32                         each warp's final (m, l)
//   rows  [R] int4                                    per row: causal limit, position,
//                                                     ALiBi slope (bits); kept here, not
//                                                     in 3 R registers of the hot loop
template <int D, int R, bool kWide = false>
struct Smem {
  using S = Shape<D, kWide>;
  static constexpr int kKvU4 = kWarps * kStages * S::kStageU4;
  static constexpr int kQFloats = R * D;
  static constexpr int kPFloats = kWarps * S::kKeys * R;
  static constexpr int kFreqFloats = D / 2;
  static constexpr int kMlFloats = kWarps * R * 2;
  static constexpr size_t kBytes =
      size_t(kKvU4) * 16 + size_t(kQFloats + kPFloats + kFreqFloats + kMlFloats) * 4 + R * 16;
  static_assert((kQFloats + kPFloats + kFreqFloats + kMlFloats) % 4 == 0, "rows alignment");
  static_assert(R * D * 4 <= kStages * S::kStageU4 * 16, "o of a warp must fit its kv part");
};

// Where one key lives: page id (-1: no key / not addressable) and slot.
struct KeySlot {
  int page;
  int slot;
};

// Looks up key position j of request b (page_base = kv_indptr[b]); keys at or past
// kv_end give page -1. LoadWorkItem bounded [kv_begin, kv_end) so that every slot
// page_base + j / page_size of it lies inside the plan's page table.
__device__ __forceinline__ KeySlot LookupKey(const AttentionParams& p, int64_t page_base, int j,
                                             int kv_end) {
  KeySlot ks{-1, 0};
  if (j < kv_end) {
    const int pi = j / p.kv.page_size;
    ks.page = __ldg(p.kv_indices + page_base + pi);
    ks.slot = j - pi * p.kv.page_size;
  }
  return ks;
}

// One chunk of a K or V row into its 16-byte shared slot: 8 elements of a 16-bit cache,
// the low 8 bytes for an fp8 one (Unpack8 reads those), or 16 fp8 elements (kWide).
template <typename T, bool kWide = false>
__device__ __forceinline__ void CopyChunk(uint4* dst, const T* src, bool pred, uint64_t policy) {
#if JPA_DECODE_L2_EVICT_FIRST
  if constexpr (sizeof(T) == 1 && !kWide) {
    cp_async::Copy8(dst, src, pred, policy);
  } else {
    cp_async::Copy16(dst, src, pred, policy);
  }
#else
  (void)policy;
  if constexpr (sizeof(T) == 1 && !kWide) {
    cp_async::Copy8(dst, src, pred);
  } else {
    cp_async::Copy16(dst, src, pred);
  }
#endif
}

// Starts the copies of one warp tile into `stage`. Lane `key` of the warp resolved key
// `key` of the tile (`ks`); returns the bitmask of keys that were really loaded.
template <typename T, int D, bool kWide = false>
__device__ __forceinline__ uint32_t IssueTile(uint4* stage, const T* k_base, const T* v_base,
                                              const PagedKv& kv, int kv_head, KeySlot ks,
                                              int lane, uint64_t policy) {
  using S = Shape<D, kWide>;
  const bool ok = ks.page >= 0 && ks.page < kv.num_pages;
  const long long off = ok ? kv.offset(ks.page, ks.slot, kv_head) : 0;
  uint32_t mask = __ballot_sync(kFullMask, ok);
  if (S::kKeys < 32) mask &= (1u << (S::kKeys & 31)) - 1u;
#pragma unroll
  for (int i = 0; i < S::kLoadsPerLane; ++i) {
    // Instruction i of the warp copies 32 consecutive chunks: whole rows of K (and V).
    const int idx = i * 32 + lane;
    const int key = idx / S::kChunks;
    const int chunk = idx % S::kChunks;
    const long long row = __shfl_sync(kFullMask, off, key);
    const bool pred = (mask >> key) & 1u;
    const int dst = key * S::kChunks + (chunk ^ (key & 7));
    CopyChunk<T, kWide>(stage + dst, k_base + row + chunk * S::kSlotElems, pred, policy);
    CopyChunk<T, kWide>(stage + S::kTileChunks + dst, v_base + row + chunk * S::kSlotElems, pred,
                        policy);
  }
  return mask;
}

// One 16-byte shared slot widened to floats as kSub groups of 8: the slot's 8 elements of
// a 16-bit cache or the low 8 bytes of an fp8 one (kSub 1), or 16 fp8 elements (kWide,
// kSub 2: the high 8 bytes are the second group).
template <typename T, int kSub>
__device__ __forceinline__ void UnpackSlot(const uint4& v, float (&f)[kSub][8]) {
  Unpack8<T>(v, f[0]);
  if constexpr (kSub == 2) Unpack8<T>(make_uint4(v.z, v.w, 0u, 0u), f[1]);
}

// q.k of this lane's key `kk` over its kQkChunks slots for every row. Lane part `pp` takes
// 4 slot pairs (c, c + kChunks/2): dims d and d + D/2, the two halves of a RoPE rotation,
// so each pair's sin/cos is computed once and both rotated halves are used here.
template <typename T, int D, int R, bool kRope, bool kWide = false>
__device__ __forceinline__ void QkPartial(float (&s)[R], const uint4* ks, const float* q_smem,
                                          const float* freq_smem, int kk, int pp, int j) {
  using S = Shape<D, kWide>;
  constexpr int kHalf = S::kChunks / 2;
  constexpr int kSub = S::kSlotElems / 8;  // groups of 8 dims per slot
#pragma unroll
  for (int r = 0; r < R; ++r) s[r] = 0.f;
  const uint4* row = ks + kk * S::kChunks;
  const int swz = kk & 7;
#pragma unroll
  for (int c = 0; c < S::kQkChunks / 2; ++c) {
    const int lo = pp * (S::kQkChunks / 2) + c;
    float klo2[kSub][8], khi2[kSub][8];
    UnpackSlot<T, kSub>(row[lo ^ swz], klo2);
    UnpackSlot<T, kSub>(row[(lo + kHalf) ^ swz], khi2);
#pragma unroll
    for (int h = 0; h < kSub; ++h) {
      float(&klo)[8] = klo2[h];
      float(&khi)[8] = khi2[h];
      const int d0 = lo * S::kSlotElems + h * 8;  // klo's first dim (< D/2); khi's is + D/2
      if constexpr (kRope) {
        const float4* f4 = reinterpret_cast<const float4*>(freq_smem + d0);
        const float4 fa = f4[0], fb = f4[1];
        const float freq[8] = {fa.x, fa.y, fa.z, fa.w, fb.x, fb.y, fb.z, fb.w};
        RopeRotatePair8(klo, khi, freq, float(j));
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float4* qlo = reinterpret_cast<const float4*>(q_smem + r * D + d0);
        const float4* qhi = reinterpret_cast<const float4*>(q_smem + r * D + d0 + D / 2);
        const float4 a = qlo[0], b = qlo[1], c4 = qhi[0], d4 = qhi[1];
        float acc = s[r];
        acc = fmaf(a.x, klo[0], acc);
        acc = fmaf(a.y, klo[1], acc);
        acc = fmaf(a.z, klo[2], acc);
        acc = fmaf(a.w, klo[3], acc);
        acc = fmaf(b.x, klo[4], acc);
        acc = fmaf(b.y, klo[5], acc);
        acc = fmaf(b.z, klo[6], acc);
        acc = fmaf(b.w, klo[7], acc);
        acc = fmaf(c4.x, khi[0], acc);
        acc = fmaf(c4.y, khi[1], acc);
        acc = fmaf(c4.z, khi[2], acc);
        acc = fmaf(c4.w, khi[3], acc);
        acc = fmaf(d4.x, khi[4], acc);
        acc = fmaf(d4.y, khi[5], acc);
        acc = fmaf(d4.z, khi[6], acc);
        acc = fmaf(d4.w, khi[7], acc);
        s[r] = acc;
      }
    }
  }
}

// p.v's 8 values of `key` at output dims pv_lane * 8 ..: a whole 16-byte slot of a 16-bit
// cache (the low 8 bytes of an fp8 one), or one half of a wide fp8 slot, read as 8 bytes.
template <typename T, int D, bool kWide>
__device__ __forceinline__ void LoadPvValues(const uint4* vs, int key, int pv_lane,
                                             float (&vf)[8]) {
  using S = Shape<D, kWide>;
  if constexpr (kWide) {
    const uint2 h = reinterpret_cast<const uint2*>(
        vs + key * S::kChunks + ((pv_lane >> 1) ^ (key & 7)))[pv_lane & 1];
    Unpack8<T>(make_uint4(h.x, h.y, 0u, 0u), vf);
  } else {
    Unpack8<T>(vs[key * S::kChunks + (pv_lane ^ (key & 7))], vf);
  }
}

template <int R>
__device__ __forceinline__ void StoreRowValues(float* dst, const float (&v)[R]) {
  if constexpr (R % 4 == 0) {
#pragma unroll
    for (int r = 0; r < R; r += 4)
      *reinterpret_cast<float4*>(dst + r) = make_float4(v[r], v[r + 1], v[r + 2], v[r + 3]);
  } else if constexpr (R == 2) {
    *reinterpret_cast<float2*>(dst) = make_float2(v[0], v[1]);
  } else {
    dst[0] = v[0];
  }
}

template <int R>
__device__ __forceinline__ void LoadRowValues(const float* src, float (&v)[R]) {
  if constexpr (R % 4 == 0) {
#pragma unroll
    for (int r = 0; r < R; r += 4) {
      const float4 x = *reinterpret_cast<const float4*>(src + r);
      v[r] = x.x; v[r + 1] = x.y; v[r + 2] = x.z; v[r + 3] = x.w;
    }
  } else if constexpr (R == 2) {
    const float2 x = *reinterpret_cast<const float2*>(src);
    v[0] = x.x; v[1] = x.y;
  } else {
    v[0] = src[0];
  }
}

// CTAs per SM the register allocation must allow. Shared memory (~66-75 KB a CTA) admits
// 3; R <= 4 fits the resulting 168-register cap without spills. With 8 rows, o alone is
// 64 registers and the hoisted q reads of q.k need another ~100: it gets 2 CTAs (255
// registers) rather than spill in its hot loop; its doubled arithmetic per byte keeps 8
// warps per SM busy enough.
template <int R>
constexpr int kMinBlocks = R >= 8 ? 2 : 3;

// Whether a cache of TKV at head_dim D streams wide tiles: fp8 at D = 128 and 256, where
// 8-byte chunks would keep half the bytes of a 16-bit tile in flight. At D = 64 a wide
// tile would hold 64 keys, more than the warp's one-lane-per-key page lookup covers.
template <typename TKV, int D>
constexpr bool kWideTiles = sizeof(TKV) == 1 && D >= 128;

// One work item (`item_index` into p.work) for the CTA's kv head, clamped by LoadWorkItem
// to its request and to q's rows. Every early return is uniform over the CTA.
template <typename T, typename TKV, int D, int R>
__device__ __forceinline__ void AttendItem(const AttentionParams& p, int item_index,
                                           uint4* smem_u4) {
  constexpr bool kWide = kWideTiles<TKV, D>;
  using S = Shape<D, kWide>;
  using M = Smem<D, R, kWide>;
  uint4* kv_smem = smem_u4;
  float* q_smem = reinterpret_cast<float*>(smem_u4 + M::kKvU4);
  float* p_smem = q_smem + M::kQFloats;
  float* freq_smem = p_smem + M::kPFloats;
  float* ml_smem = freq_smem + M::kFreqFloats;
  int4* row_smem = reinterpret_cast<int4*>(ml_smem + M::kMlFloats);

  // At most tile_rows rows (the planner's bound), in passes of R.
  const WorkItem it = LoadWorkItem(p, item_index, p.tile_rows > 1 ? p.tile_rows : 1);
  if (it.request < 0) return;  // padding, or nothing left inside the bounds
  // Rows are counted from the item's first token (q row q_base, key position pos_base).
  const int row_begin = it.row_begin, row_end = it.row_begin + it.num_rows;
  const int kv_begin = it.kv_begin, kv_end = it.kv_end, split = it.split;
  const int pos_base = it.pos_base;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kv_head = blockIdx.y;
  const int G = p.group_size, H = p.num_qo_heads;
  const int64_t q_base = it.q_base;
  const int64_t page_base = it.page_base;
  const bool rope = p.pos_encoding == PosEncoding::kRopeLlama;
  const bool alibi = p.pos_encoding == PosEncoding::kAlibi;
  const SoftCap soft_cap{p};
  const T* q_ptr = static_cast<const T*>(p.q);
  const TKV* k_base = static_cast<const TKV*>(p.kv.k);
  const TKV* v_base = static_cast<const TKV*>(p.kv.v);
#if JPA_DECODE_L2_EVICT_FIRST
  const uint64_t l2_policy = cp_async::EvictFirstPolicy();
#else
  const uint64_t l2_policy = 0;
#endif

  if (rope) {
    RopeFrequencyTable(freq_smem, D, p.rope_scale, p.rope_theta, threadIdx.x, kThreads);
    __syncthreads();
  }

  // This warp's tiles of the item's keys: n-th is tile warp + n * kWarps of the range.
  const int ntiles = kv_end > kv_begin ? (kv_end - kv_begin + S::kKeys - 1) / S::kKeys : 0;
  const int count = warp < ntiles ? (ntiles - 1 - warp) / kWarps + 1 : 0;
  uint4* my_kv = kv_smem + warp * kStages * S::kStageU4;
  float* my_p = p_smem + warp * S::kKeys * R;
  const int kk = lane % S::kKeys;  // this lane's key in a tile (q.k, page lookup)
  const int pp = lane / S::kKeys;  // and which 64 dims of it (q.k)
  const int pv_chunk = lane % S::kPvLanes;  // p.v: this lane's 8 output dims
  const int pv_group = lane / S::kPvLanes;  // and its keys: pv_group + u * kPvGroups

  // Rows beyond what fits one pass of R rows (only if a plan gives an item more than R
  // rows) run as further passes over the same keys.
  for (int row0 = row_begin; row0 < row_end; row0 += R) {
    if (row0 != row_begin) __syncthreads();  // the previous pass's merge has read smem

    // Per-row constants: last visible key (causal), query position, base-2 ALiBi slope,
    // first visible key (sliding window). Rows past row_end see no key and are never
    // written.
    if (threadIdx.x < R) {
      const int rr = row0 + threadIdx.x;
      int4 info = make_int4(INT_MIN, 0, 0, 0);
      if (rr < row_end) {
        const int tok = rr / G;
        const int qpos = pos_base + tok;
        const float slope = alibi ? AlibiSlope(kv_head * G + (rr - tok * G), H) * kLog2e : 0.f;
        info = make_int4(p.causal ? qpos : INT_MAX, qpos, __float_as_int(slope),
                         WindowStart(p, qpos));
      }
      row_smem[threadIdx.x] = info;
    }

    // Start the key stream first so its latency overlaps the q staging below.
    KeySlot pending{-1, 0};
    if (count > 0) pending = LookupKey(p, page_base, kv_begin + warp * S::kKeys + kk, kv_end);
    uint32_t masks[kStages];  // masks[s]: loaded keys of the tile s places ahead
#pragma unroll
    for (int s = 0; s < kStages; ++s) masks[s] = 0u;
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < count) {
        masks[s] = IssueTile<TKV, D, kWide>(my_kv + s * S::kStageU4, k_base, v_base, p.kv,
                                            kv_head, pending, lane, l2_policy);
        pending = KeySlot{-1, 0};
        if (s + 1 < count)
          pending = LookupKey(p, page_base, kv_begin + (warp + (s + 1) * kWarps) * S::kKeys + kk,
                              kv_end);
      }
      cp_async::Commit();
    }

    // q rows -> fp32 in shared memory, scaled by sm_scale * log2(e) so that q.k is the
    // base-2 logit, and rotated for RoPE at the row's query position.
    const float q_scale = LogitScaleLog2(p);
    for (int idx = threadIdx.x; idx < R * S::kQChunks; idx += kThreads) {
      const int r = idx / S::kQChunks, c = idx % S::kQChunks;
      const int rr = row0 + r;
      float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (rr < row_end) {
        const int tok = rr / G;
        const int64_t token = q_base + tok;  // in [0, q_rows): LoadWorkItem
        {
          const T* qrow = q_ptr + (token * H + kv_head * G + (rr - tok * G)) * D;
          Unpack8<T>(LoadGlobal16(qrow + c * 8), f);
          if (rope) {
            float y[8];
            Unpack8<T>(LoadGlobal16(qrow + (c ^ (S::kQChunks / 2)) * 8), y);
            float freq[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) freq[e] = freq_smem[(c & (S::kQChunks / 2 - 1)) * 8 + e];
            RopeRotate8(f, y, freq, float(pos_base + tok), c < S::kQChunks / 2);
          }
#pragma unroll
          for (int e = 0; e < 8; ++e) f[e] *= q_scale;
        }
      }
      float4* dst = reinterpret_cast<float4*>(q_smem + r * D + c * 8);
      dst[0] = make_float4(f[0], f[1], f[2], f[3]);
      dst[1] = make_float4(f[4], f[5], f[6], f[7]);
    }
    __syncthreads();

    // Per-warp online softmax state: m (same in all lanes), l (this lane's keys), o (this
    // lane's keys of group pv_group, dims pv_chunk * 8 ..).
    float m[R], l[R], o[R][8];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      m[r] = -INFINITY;
      l[r] = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) o[r][e] = 0.f;
    }

    for (int n = 0; n < count; ++n) {
      // Refill the stage freed last iteration with the tile kStages - 1 ahead.
      const int ahead = n + kStages - 1;
      masks[kStages - 1] = 0u;
      if (ahead < count) {
        masks[kStages - 1] = IssueTile<TKV, D, kWide>(my_kv + (ahead % kStages) * S::kStageU4,
                                                      k_base, v_base, p.kv, kv_head, pending,
                                                      lane, l2_policy);
        pending = KeySlot{-1, 0};
        if (ahead + 1 < count)
          pending = LookupKey(p, page_base,
                              kv_begin + (warp + (ahead + 1) * kWarps) * S::kKeys + kk, kv_end);
      }
      cp_async::Commit();
      cp_async::WaitGroup<kStages - 1>();
      __syncwarp();

      const uint4* ks = my_kv + (n % kStages) * S::kStageU4;
      const uint4* vs = ks + S::kTileChunks;
      const int j = kv_begin + (warp + n * kWarps) * S::kKeys + kk;

      float s[R];
      if (rope) {
        QkPartial<TKV, D, R, true, kWide>(s, ks, q_smem, freq_smem, kk, pp, j);
      } else {
        QkPartial<TKV, D, R, false, kWide>(s, ks, q_smem, freq_smem, kk, pp, j);
      }
#pragma unroll
      for (int off = S::kKeys; off < 32; off <<= 1) {
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] += __shfl_xor_sync(kFullMask, s[r], off);
      }

      const bool key_ok = (masks[0] >> kk) & 1u;
      float pk[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int4 info = row_smem[r];
        float x = s[r];
        if (soft_cap.on()) x = soft_cap(x);
        if (alibi) x = fmaf(__int_as_float(info.z), float(j - info.y), x);
        x = (key_ok && j <= info.x && j >= info.w) ? x : -INFINITY;
        float mx = x;
#pragma unroll
        for (int off = 1; off < S::kKeys; off <<= 1)
          mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, off));
        const float m_new = fmaxf(m[r], mx);
        const float base = SafeMax(m_new);
        const float alpha = FastExp2(m[r] - base);
        pk[r] = FastExp2(x - base);
        l[r] = fmaf(l[r], alpha, pk[r]);
        m[r] = m_new;
#pragma unroll
        for (int e = 0; e < 8; ++e) o[r][e] *= alpha;
      }
      if (pp == 0) StoreRowValues<R>(my_p + kk * R, pk);
      __syncwarp();

#pragma unroll
      for (int u = 0; u < S::kPvKeys; ++u) {
        const int key = pv_group + u * S::kPvGroups;
        float vf[8];
        LoadPvValues<TKV, D, kWide>(vs, key, pv_chunk, vf);
        float pr[R];
        LoadRowValues<R>(my_p + key * R, pr);
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
          for (int e = 0; e < 8; ++e) o[r][e] = fmaf(pr[r], vf[e], o[r][e]);
        }
      }
      __syncwarp();  // the stage and my_p are rewritten next iteration
#pragma unroll
      for (int s2 = 0; s2 < kStages - 1; ++s2) masks[s2] = masks[s2 + 1];
    }
    cp_async::WaitGroup<0>();  // (only empty groups remain; keeps the reuse below obvious)

    // Warp totals: l over the key lanes, o over the p.v key groups.
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int off = 1; off < S::kKeys; off <<= 1) l[r] += __shfl_xor_sync(kFullMask, l[r], off);
    }
#pragma unroll
    for (int off = S::kPvLanes; off < 32; off <<= 1) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int e = 0; e < 8; ++e) o[r][e] += __shfl_xor_sync(kFullMask, o[r][e], off);
      }
    }
    __syncwarp();  // every lane is done with this warp's stages: reuse them for o
    float* my_o = reinterpret_cast<float*>(my_kv);
    if (lane < S::kPvLanes) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float4* dst = reinterpret_cast<float4*>(my_o + r * D + lane * 8);
        dst[0] = make_float4(o[r][0], o[r][1], o[r][2], o[r][3]);
        dst[1] = make_float4(o[r][4], o[r][5], o[r][6], o[r][7]);
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        ml_smem[(warp * R + r) * 2] = m[r];
        ml_smem[(warp * R + r) * 2 + 1] = l[r];
      }
    }
    __syncthreads();

    // Merge the warps' states; each thread finishes 4 dims of a row.
    for (int idx = threadIdx.x; idx < R * (D / 4); idx += kThreads) {
      const int r = idx / (D / 4), d = (idx % (D / 4)) * 4;
      const int rr = row0 + r;
      if (rr >= row_end) continue;
      SoftmaxState st = SoftmaxState::Empty();
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const SoftmaxState sw{ml_smem[(w * R + r) * 2], ml_smem[(w * R + r) * 2 + 1]};
        float a, c;
        st.Merge(sw, &a, &c);
        const float4 ow = *reinterpret_cast<const float4*>(
            reinterpret_cast<const float*>(kv_smem + w * kStages * S::kStageU4) + r * D + d);
        acc.x = acc.x * a + ow.x * c;
        acc.y = acc.y * a + ow.y * c;
        acc.z = acc.z * a + ow.z * c;
        acc.w = acc.w * a + ow.w * c;
      }
      const int tok = rr / G;
      const int64_t token = q_base + tok;  // in [0, q_rows): LoadWorkItem
      const int head = kv_head * G + (rr - tok * G);
      {  // the sink weighs no value: it only rescales the accumulator
        float a, c;
        st.Merge(SinkState(p, head, split), &a, &c);
        acc = make_float4(acc.x * a, acc.y * a, acc.z * a, acc.w * a);
      }
      const float inv = st.InvSum() * VScale(p);
      const float4 res = make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
      const float lse = st.Lse();
      if (split < 0) {
        T* dst = static_cast<T*>(p.out) + (token * H + head) * D + d;
        *reinterpret_cast<uint2*>(dst) = Pack4<T>(res);
        if (d == 0) p.lse[token * H + head] = lse;
      } else {
        const int64_t prow = int64_t(__ldg(p.merge_indptr + token)) + split;
        if (prow < 0 || prow >= p.caps.partial_rows) continue;
        *reinterpret_cast<float4*>(p.partial_o + (int64_t(prow) * H + head) * D + d) = res;
        if (d == 0) p.partial_lse[int64_t(prow) * H + head] = lse;
      }
    }
  }
  // Scratch: the probabilities, which only the main loop reads.
  static_assert(M::kPFloats >= kMaxItemTokens + 1, "split-merge scratch fits p_smem");
  if (split >= 0)
    FinishSplitItem<T, kThreads, kMaxItemTokens>(p, q_base, row_begin, row_end, kv_head,
                                                 reinterpret_cast<int*>(p_smem));
}

// The grid is [bin_cap, num_kv_heads]: CTA (bin, head) runs the bin's items in order.
template <typename T, typename TKV, int D, int R>
__global__ void __launch_bounds__(kThreads, kMinBlocks<R>)
    DecodeKernel(const __grid_constant__ AttentionParams p) {
  extern __shared__ uint4 smem_u4[];
  const int bin = blockIdx.x;
  const int begin = max(p.bin_indptr[bin], 0);
  const int end = min(p.bin_indptr[bin + 1], p.layout.work_cap);
  for (int item = begin; item < end; ++item) {
    AttendItem<T, TKV, D, R>(p, item, smem_u4);
    __syncthreads();  // the next item's copies overwrite what this merge read
  }
  WaitForPrimaryGrid();  // never finish before the setup pass (dependent_launch.cuh)
}

// One instantiation: its shared-memory opt-in, launch and occupancy.
template <typename T, typename TKV, int D, int R>
struct RowsKernel {
  static constexpr int kSmem = int(Smem<D, R, kWideTiles<TKV, D>>::kBytes);

  static cudaError_t Ready() {
    static std::atomic<uint64_t> smem_set{0};
    return AllowSmem(DecodeKernel<T, TKV, D, R>, kSmem, &smem_set);
  }

  static cudaError_t Launch(const AttentionParams& p, cudaStream_t stream) {
    const cudaError_t err = Ready();
    if (err != cudaSuccess) return err;
    const dim3 grid(unsigned(p.layout.bin_cap), unsigned(p.num_kv_heads));
    return LaunchDependent(p.dependent_launch, DecodeKernel<T, TKV, D, R>, grid, dim3(kThreads), kSmem,
                           stream, p);
  }

  static cudaError_t Occupancy(int32_t* ctas) {
    const cudaError_t err = Ready();
    if (err != cudaSuccess) return err;
    return CtasPerSm(DecodeKernel<T, TKV, D, R>, kThreads, kSmem, ctas);
  }
};

// Calls op(RowsKernel<T, TKV, D, R>{}) for the instantiation serving (dtype, kv_dtype,
// head_dim, tile_rows). One pass holds up to 8 rows (o costs 8 registers per row); the
// planner keeps decode items at <= tile_rows rows, so R follows tile_rows and bigger
// items loop.
template <typename T, typename TKV, int D, typename Op>
cudaError_t WithRows(int tile_rows, Op&& op) {
  if (tile_rows <= 1) return op(RowsKernel<T, TKV, D, 1>{});
  if (tile_rows <= 2) return op(RowsKernel<T, TKV, D, 2>{});
  if (tile_rows <= 4) return op(RowsKernel<T, TKV, D, 4>{});
  return op(RowsKernel<T, TKV, D, 8>{});
}

template <typename T, typename TKV, typename Op>
cudaError_t WithHeadDim(int head_dim, int tile_rows, Op&& op) {
  switch (head_dim) {
    case 64: return WithRows<T, TKV, 64>(tile_rows, op);
    case 128: return WithRows<T, TKV, 128>(tile_rows, op);
    case 256: return WithRows<T, TKV, 256>(tile_rows, op);
    default: return cudaErrorInvalidValue;
  }
}

// The cache is q's type or an fp8 type beside it (MakeAttentionParams checked which).
template <typename Op>
cudaError_t WithKernel(DType dtype, DType kv_dtype, int head_dim, int tile_rows, Op&& op) {
  return WithElementType(dtype, [&](auto t) {
    using T = decltype(t);
    switch (kv_dtype) {
      case DType::kF8E4M3: return WithHeadDim<T, __nv_fp8_e4m3>(head_dim, tile_rows, op);
      case DType::kF8E5M2: return WithHeadDim<T, __nv_fp8_e5m2>(head_dim, tile_rows, op);
      default:
        return kv_dtype == dtype ? WithHeadDim<T, T>(head_dim, tile_rows, op)
                                 : cudaErrorInvalidValue;
    }
  });
}

}  // namespace

cudaError_t LaunchDecode(const AttentionParams& p, cudaStream_t stream) {
  if (p.num_qo_heads <= 0 || p.num_kv_heads <= 0 || p.group_size <= 0 ||
      p.group_size * p.num_kv_heads != p.num_qo_heads || p.kv.page_size <= 0 ||
      p.num_kv_heads > 65535 || p.layout.bin_cap < 1)
    return cudaErrorInvalidValue;
  if (p.layout.work_cap <= 0) return cudaSuccess;  // nothing to launch
  return WithKernel(p.dtype, p.kv_dtype, p.head_dim, p.tile_rows,
                    [&](auto kernel) { return decltype(kernel)::Launch(p, stream); });
}

cudaError_t DecodeCtasPerSm(DType dtype, int head_dim, int tile_rows, int32_t* ctas) {
  // An fp8 cache gets the CTAs per SM of q's type: the same launch bounds, and its wide
  // tiles (head_dim 128/256) add only kKeys * R * 4 bytes of probabilities a warp.
  return WithKernel(dtype, dtype, head_dim, tile_rows,
                    [&](auto kernel) { return decltype(kernel)::Occupancy(ctas); });
}

}  // namespace jax_pagedattn
