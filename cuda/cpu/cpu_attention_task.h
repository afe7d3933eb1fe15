// One task of the CPU attention pass: a work item for a run of consecutive kv heads
// [h0, h1), i.e. that many of the CUDA grid's (item, kv head) CTAs done together. With
// the NHD layout the heads of a slot are adjacent in memory, so walking a key block for
// all heads at once reads whole contiguous slots instead of a 2 KiB-strided subset of
// each page (which measured about 1.7x slower for bf16 decode).
//
// For each kv head, the item's packed query rows (docs/CONTRACT.md) are widened to
// float32, rotated (RoPE) and pre-scaled by sm_scale * log2(e), so every score is
// already a base-2 logit. Keys then stream through in blocks of kKeyBlock: the block's
// K/V rows are either read in place from their pages in the storage type (no RoPE: the
// kernels widen them in registers) or widened and rotated into a float scratch block
// (RoPE, or a head dim that is not a multiple of 8). Each row keeps an online softmax
// (running max m, sum l, unnormalised output) in float32, updated with exp2.
//
// Whatever the plan holds, a task only touches memory the params describe: keys whose
// page slot lies outside kv_indices or whose page id lies outside the cache are masked,
// rows past q or past the request are dropped, partial rows outside the workspace are
// not written.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_block_kernels.h"
#include "cpu_numeric.h"
#include "cpu_rope.h"
#include "cpu_simd.h"
#include "jax_pagedattn/params.h"

namespace jax_pagedattn {
namespace cpu {

constexpr float kLog2e = 1.44269504088896340736f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Keys per block: the scores of a block stay in L1, and a block is long enough to
// amortise the per-row softmax bookkeeping.
constexpr int kKeyBlock = 32;
// Query rows per pass over the keys; bounds scratch memory whatever tile_rows is.
constexpr int kRowChunk = 128;

// Head dim rounded up to 8: float rows are zero-padded so the kernels need no tail.
inline int PaddedDim(int d) { return (d + 7) / 8 * 8; }

// What every task of one call shares, prepared once on the calling thread.
struct CallPlan {
  const AttentionParams* p = nullptr;
  int dp = 0;           // padded head dim
  int half = 0;         // head_dim / 2 (RoPE pairs)
  bool direct = false;  // kernels read K/V in place (no RoPE, head_dim % 8 == 0)
  std::vector<float> inv_freq;
  // RoPE cos/sin for key positions [0, rope_positions), [position][half] each.
  int64_t rope_positions = 0;
  std::vector<float> rope_cos, rope_sin;
  std::vector<int32_t> live;  // live work items, most expensive first
  double flops = 0;           // estimate over all kv heads
};

// One query row of a task.
struct Row {
  int64_t token;     // global query token
  int32_t head;      // global query head
  int64_t qpos;      // position of the query token: kv_len - qo_len + i
  int64_t last_key;  // last visible key position (causal limit within the range)
  int64_t first_key; // first visible key position (the sliding window's start)
  float alibi;       // slope * log2(e); 0 without ALiBi
};

// Per-thread buffers, allocated once per worker for up to `heads` kv heads per task.
// K is the element type the kernels read: the storage type on the direct path, float
// on the widened one.
template <typename K>
struct Scratch {
  Scratch(int dp, int heads, bool widened)
      : q(size_t(kRowChunk) * dp),
        acc(size_t(kRowChunk) * dp),
        m(kRowChunk),
        l(kRowChunk),
        s(size_t(kRowChunk) * kKeyBlock),
        active(kRowChunk),
        head_rows(size_t(heads) + 1),
        k(widened ? size_t(heads) * kKeyBlock * dp : 0, 0.0f),
        v(widened ? size_t(heads) * kKeyBlock * dp : 0, 0.0f),
        zero(dp, K{}),
        krow(size_t(heads) * kKeyBlock),
        vrow(size_t(heads) * kKeyBlock),
        key_off(kKeyBlock),
        cs(dp) {
    rows.reserve(kRowChunk);
  }
  std::vector<Row> rows;            // grouped by kv head, heads in order
  std::vector<float> q, acc, m, l;  // per row: query, output, running max and sum
  std::vector<float> s;             // [row][kKeyBlock] scores, then weights
  std::vector<uint8_t> active;      // row saw a key in the current block
  std::vector<int> head_rows;       // rows of head h0 + i: [head_rows[i], head_rows[i + 1])
  std::vector<float> k, v;          // widened block [head][key][dp] (widened path only)
  std::vector<K> zero;              // stands in for masked keys
  std::vector<const K*> krow, vrow;  // [head][key]
  std::vector<int64_t> key_off;      // page offset of each key at head 0; -1: masked
  std::vector<float> cs;  // cos then sin for a query position outside the table
};

// The key range an item may touch: [kv_begin, kv_end) cut to the request's kv_len and
// to the keys whose page slot lies inside kv_indices (page_cap entries).
struct KeyRange {
  int64_t begin, end;
};

inline KeyRange ItemKeys(const AttentionParams& p, const int32_t* it) {
  const int32_t b = it[kWorkRequest];
  const int64_t page_base = p.kv_indptr[b];
  const int64_t ps = p.kv.page_size;
  int64_t end = std::min<int64_t>(it[kWorkKvEnd], it[kWorkKvLen]);
  end = std::min<int64_t>(end, (int64_t(p.layout.page_cap) - page_base) * ps);
  const int64_t begin = std::max<int64_t>(it[kWorkKvBegin], 0);
  // Keys before page_base's first slot would need a negative slot index.
  const int64_t first_valid = page_base < 0 ? -page_base * ps : 0;
  return KeyRange{std::max(begin, first_valid), end};
}

inline bool LiveItem(const AttentionParams& p, const int32_t* it) {
  const int32_t b = it[kWorkRequest];
  return b >= 0 && b < p.layout.batch_cap && it[kWorkRowEnd] > it[kWorkRowBegin];
}

// Loads packed rows [r_begin, r_end) of the item for each kv head of [h0, h1) into
// scratch, grouped by head; returns the largest last_key among them (-1 if none sees a
// key).
template <typename T, typename K>
int64_t LoadRows(const CallPlan& c, Scratch<K>& sc, const int32_t* it, int32_t h0, int32_t h1,
                 int64_t r_begin, int64_t r_end, const KeyRange& keys) {
  const AttentionParams& p = *c.p;
  const int G = p.group_size;
  const int D = p.head_dim;
  const int64_t q_base = p.qo_indptr[it[kWorkRequest]];
  const int64_t qo_len = it[kWorkQoLen];
  const int64_t kv_len = it[kWorkKvLen];
  const float q_scale = p.sm_scale * kLog2e * (p.kv_scales != nullptr ? p.kv_scales[0] : 1.0f);
  const T* q = static_cast<const T*>(p.q);
  int64_t max_last = -1;
  sc.rows.clear();
  for (int32_t hk = h0; hk < h1; ++hk) {
    sc.head_rows[hk - h0] = int(sc.rows.size());
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t i = r / G;
      const int64_t token = q_base + i;
      if (i >= qo_len || token >= p.q_rows) break;  // rows only grow from here
      if (token < 0) continue;
      Row row;
      row.token = token;
      row.head = int32_t(hk * G + r % G);
      row.qpos = kv_len - qo_len + i;
      row.last_key = p.causal ? std::min(row.qpos, keys.end - 1) : keys.end - 1;
      row.first_key = p.window_left >= 0 ? row.qpos - p.window_left : keys.begin;
      row.alibi = p.pos_encoding == PosEncoding::kAlibi
                      ? AlibiSlope(row.head, p.num_qo_heads) * kLog2e
                      : 0.0f;
      max_last = std::max(max_last, row.last_key);

      const size_t n = sc.rows.size();
      float* qr = sc.q.data() + n * c.dp;
      WidenRow(q + (row.token * p.num_qo_heads + row.head) * D, qr, D);
      std::fill(qr + D, qr + c.dp, 0.0f);
      if (p.pos_encoding == PosEncoding::kRopeLlama) {
        const float* cs;
        const float* sn;
        if (row.qpos >= 0 && row.qpos < c.rope_positions) {
          cs = c.rope_cos.data() + row.qpos * c.half;
          sn = c.rope_sin.data() + row.qpos * c.half;
        } else {
          RopeCosSin(row.qpos, c.inv_freq.data(), c.half, sc.cs.data(), sc.cs.data() + c.half);
          cs = sc.cs.data();
          sn = sc.cs.data() + c.half;
        }
        RopeRotate(qr, cs, sn, c.half);
      }
      Scale(qr, q_scale, D);
      if (Loader<K>::kPermuted) PermuteRow(qr, c.dp);
      sc.m[n] = kNegInf;
      sc.l[n] = 0.0f;
      std::fill(sc.acc.data() + n * c.dp, sc.acc.data() + (n + 1) * c.dp, 0.0f);
      sc.rows.push_back(row);
    }
  }
  sc.head_rows[h1 - h0] = int(sc.rows.size());
  return max_last;
}

// Asks for `bytes` bytes at `p` to be brought into cache ahead of use. Pages are
// scattered, so the hardware prefetchers (which stop at 4 KiB boundaries) cannot run
// ahead across a block's pages by themselves.
inline void PrefetchBytes(const void* p, int64_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
  const char* c = static_cast<const char*>(p);
  for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch(c + at);
#else
  (void)p, (void)bytes;
#endif
}

// The page offset of key j at kv head 0, or -1 when its page slot or page id is out of
// range.
inline int64_t KeyOffset(const AttentionParams& p, int64_t page_base, int64_t j) {
  const int64_t ps = p.kv.page_size;
  const int64_t slot_index = page_base + j / ps;
  if (slot_index < 0 || slot_index >= p.layout.page_cap) return -1;
  const int64_t page = p.kv_indices[slot_index];
  if (page < 0 || page >= p.kv.num_pages) return -1;
  return p.kv.offset(page, j % ps, 0);
}

// Points krow/vrow at keys [j0, j0 + nk) of kv heads [h0, h1): in place on the direct
// path, else widened (K also rotated) into the scratch block. Keys whose page slot or
// page id is out of range point at zeros with key_off = -1; returns whether any was.
// Also prefetches keys [j0 + kKeyBlock, prefetch_end), the next block.
template <typename C, typename K>
bool LoadKeys(const CallPlan& c, Scratch<K>& sc, int32_t b, int32_t h0, int32_t h1, int64_t j0,
              int nk, int64_t prefetch_end) {
  const AttentionParams& p = *c.p;
  const int D = p.head_dim;
  const int64_t hs = p.kv.head_stride;
  const int64_t page_base = p.kv_indptr[b];
  const C* kbase = static_cast<const C*>(p.kv.k);
  const C* vbase = static_cast<const C*>(p.kv.v);
  // The heads' rows of one key: one span for NHD (adjacent heads), else one per head.
  const bool heads_adjacent = hs == D;
  for (int64_t j = j0 + kKeyBlock; j < prefetch_end; ++j) {
    const int64_t off = KeyOffset(p, page_base, j);
    if (off < 0) continue;
    if (heads_adjacent) {
      const int64_t bytes = int64_t(h1 - h0) * D * int64_t(sizeof(C));
      PrefetchBytes(kbase + off + h0 * hs, bytes);
      PrefetchBytes(vbase + off + h0 * hs, bytes);
    } else {
      for (int32_t hk = h0; hk < h1; ++hk) {
        PrefetchBytes(kbase + off + hk * hs, D * int64_t(sizeof(C)));
        PrefetchBytes(vbase + off + hk * hs, D * int64_t(sizeof(C)));
      }
    }
  }
  bool any_bad = false;
  for (int jj = 0; jj < nk; ++jj) {
    const int64_t off = KeyOffset(p, page_base, j0 + jj);
    sc.key_off[jj] = off;
    any_bad = any_bad || off < 0;
  }
  for (int32_t hk = h0; hk < h1; ++hk) {
    const size_t slot0 = size_t(hk - h0) * kKeyBlock;
    for (int jj = 0; jj < nk; ++jj) {
      const int64_t off = sc.key_off[jj];
      if (off < 0) {
        sc.krow[slot0 + jj] = sc.vrow[slot0 + jj] = sc.zero.data();
        continue;
      }
      const int64_t at = off + hk * hs;
      if constexpr (std::is_same_v<K, C>) {
        if (c.direct) {
          sc.krow[slot0 + jj] = kbase + at;
          sc.vrow[slot0 + jj] = vbase + at;
          continue;
        }
      }
      if constexpr (std::is_same_v<K, float>) {
        float* kr = sc.k.data() + (slot0 + jj) * c.dp;
        float* vr = sc.v.data() + (slot0 + jj) * c.dp;
        WidenRow(kbase + at, kr, D);  // the padding past D stays zero
        WidenRow(vbase + at, vr, D);
        if (p.pos_encoding == PosEncoding::kRopeLlama) {
          const int64_t j = j0 + jj;
          RopeRotate(kr, c.rope_cos.data() + j * c.half, c.rope_sin.data() + j * c.half, c.half);
        }
        sc.krow[slot0 + jj] = kr;
        sc.vrow[slot0 + jj] = vr;
      }
    }
  }
  return any_bad;
}

// Folds one key block into the running softmax state of every loaded row: scores for
// all rows, then the per-row online softmax (turning scores into weights, 0 where
// masked), then the weighted sum of V.
template <typename K>
void AttendBlock(const CallPlan& c, Scratch<K>& sc, int num_heads, int64_t j0, int nk,
                 bool any_bad) {
  const int dp = c.dp;
  const int nrows = int(sc.rows.size());
  float* scores = sc.s.data();
  // Row groups never straddle two kv heads: the rows of a group share K and V.
  for (int hh = 0; hh < num_heads; ++hh) {
    const K* const* krow = sc.krow.data() + size_t(hh) * kKeyBlock;
    for (int n = sc.head_rows[hh]; n < sc.head_rows[hh + 1]; n += kRowGroup)
      BlockScoresN<K>(std::min(kRowGroup, sc.head_rows[hh + 1] - n), sc.q.data() + size_t(n) * dp,
                      krow, nk, dp, scores + size_t(n) * kKeyBlock, kKeyBlock);
  }

  const AttentionParams& p = *c.p;
  // Soft-capping in base-2 units: the scores are x log2(e) for the scaled logits x.
  const float cap2 = p.logits_soft_cap * kLog2e;
  for (int n = 0; n < nrows; ++n) {
    const Row& row = sc.rows[n];
    float* s = scores + size_t(n) * kKeyBlock;
    const int nvis = row.last_key < j0 ? 0 : int(std::min<int64_t>(nk, row.last_key - j0 + 1));
    if (cap2 > 0.0f)
      for (int jj = 0; jj < nvis; ++jj) s[jj] = cap2 * std::tanh(s[jj] / cap2);
    if (row.alibi != 0.0f) {
      const float base = float(j0 - row.qpos);
      for (int jj = 0; jj < nvis; ++jj) s[jj] += row.alibi * (base + float(jj));
    }
    if (any_bad)
      for (int jj = 0; jj < nvis; ++jj)
        if (sc.key_off[jj] < 0) s[jj] = kNegInf;
    if (row.first_key > j0) {  // keys before the window
      const int cut = int(std::min<int64_t>(nvis, row.first_key - j0));
      std::fill(s, s + cut, kNegInf);
    }
    float block_max = kNegInf;
    for (int jj = 0; jj < nvis; ++jj) block_max = std::max(block_max, s[jj]);
    sc.active[n] = block_max != kNegInf;
    if (!sc.active[n]) {
      std::fill(s, s + nk, 0.0f);  // it may still ride along in its row group
      continue;
    }
    float& m = sc.m[n];
    float& l = sc.l[n];
    if (block_max > m) {
      const float rescale = std::exp2(m - block_max);  // 0 while m is still -inf
      Scale(sc.acc.data() + size_t(n) * dp, rescale, dp);
      l *= rescale;
      m = block_max;
    }
    float sum = 0.0f;
    for (int jj = 0; jj < nvis; ++jj) {
      s[jj] = std::exp2(s[jj] - m);  // exp2(-inf) = 0 for masked keys
      sum += s[jj];
    }
    std::fill(s + nvis, s + nk, 0.0f);
    l += sum;
  }

  for (int hh = 0; hh < num_heads; ++hh) {
    const K* const* vrow = sc.vrow.data() + size_t(hh) * kKeyBlock;
    for (int n = sc.head_rows[hh]; n < sc.head_rows[hh + 1]; n += kRowGroup) {
      const int rows = std::min(kRowGroup, sc.head_rows[hh + 1] - n);
      bool any = false;
      for (int r = 0; r < rows; ++r) any = any || sc.active[n + r] != 0;
      if (any)
        BlockAccumulateN<K>(rows, scores + size_t(n) * kKeyBlock, kKeyBlock, vrow, nk, dp,
                            sc.acc.data() + size_t(n) * dp);
    }
  }
}

// Folds a sink logit (base 2) into a row's softmax state: one more term of the
// denominator that weighs no value.
inline void AddSink(float sink, float* m, float* l, float* acc, int D) {
  const float m_new = std::max(*m, sink);
  const float rescale = std::exp2(*m - m_new);  // 0 while *m is -inf
  Scale(acc, rescale, D);
  *l = *l * rescale + std::exp2(sink - m_new);
  *m = m_new;
}

// Writes the loaded rows: final out/lse, or the normalised partial and its lse.
template <typename T, typename K>
void StoreRows(const CallPlan& c, Scratch<K>& sc, int32_t split) {
  const AttentionParams& p = *c.p;
  const float v_scale = p.kv_scales != nullptr ? p.kv_scales[1] : 1.0f;
  const int D = p.head_dim;
  const int H = p.num_qo_heads;
  for (size_t n = 0; n < sc.rows.size(); ++n) {
    const Row& row = sc.rows[n];
    float* acc = sc.acc.data() + n * c.dp;
    if (Loader<K>::kPermuted) UnpermuteRow(acc, c.dp);
    // The sink joins the denominator once per row: in the item that writes the row
    // whole, or in the first piece of a split one.
    if (p.sinks != nullptr && split <= 0) AddSink(p.sinks[row.head] * kLog2e, &sc.m[n], &sc.l[n], acc, D);
    const float l = sc.l[n];
    const float lse = l > 0.0f ? sc.m[n] + std::log2(l) : kNegInf;
    Scale(acc, l > 0.0f ? v_scale / l : 0.0f, D);
    if (split < 0) {
      NarrowRow(acc, static_cast<T*>(p.out) + (row.token * H + row.head) * D, D);
      p.lse[row.token * H + row.head] = lse;
    } else {
      const int64_t prow = int64_t(p.merge_indptr[row.token]) + split;
      if (prow < 0 || prow >= p.caps.partial_rows) continue;
      std::copy(acc, acc + D, p.partial_o + (prow * H + row.head) * D);
      p.partial_lse[prow * H + row.head] = lse;
    }
  }
}

// Work item w for kv heads [h0, h1); T is q's and out's type, C the cache's.
template <typename T, typename C, typename K>
void RunTask(const CallPlan& c, Scratch<K>& sc, int32_t w, int32_t h0, int32_t h1) {
  const AttentionParams& p = *c.p;
  const int32_t* it = p.work + int64_t(w) * kWorkFields;
  const KeyRange keys = ItemKeys(p, it);
  const int G = p.group_size;
  const int num_heads = h1 - h0;
  // Skip rows of negative tokens up front rather than one by one.
  const int64_t q_base = p.qo_indptr[it[kWorkRequest]];
  int64_t r = std::max<int64_t>(it[kWorkRowBegin], 0);
  if (q_base < 0) r = std::max<int64_t>(r, -q_base * G);
  const int64_t r_end = it[kWorkRowEnd];
  // Rows per head per pass, so that all heads' rows fit the scratch.
  const int64_t chunk = std::max(1, kRowChunk / num_heads);
  for (; r < r_end; r += chunk) {
    const int64_t chunk_end = std::min<int64_t>(r_end, r + chunk);
    const int64_t max_last = LoadRows<T>(c, sc, it, h0, h1, r, chunk_end, keys);
    if (sc.rows.empty()) break;  // past the request's tokens or q's rows
    for (int64_t j0 = keys.begin; j0 <= max_last; j0 += kKeyBlock) {
      const int nk = int(std::min<int64_t>(kKeyBlock, max_last + 1 - j0));
      const int64_t prefetch_end = std::min<int64_t>(j0 + 2 * kKeyBlock, max_last + 1);
      const bool any_bad =
          LoadKeys<C>(c, sc, it[kWorkRequest], h0, h1, j0, nk, prefetch_end);
      AttendBlock(c, sc, num_heads, j0, nk, any_bad);
    }
    StoreRows<T>(c, sc, it[kWorkSplit]);
  }
}

}  // namespace cpu
}  // namespace jax_pagedattn
