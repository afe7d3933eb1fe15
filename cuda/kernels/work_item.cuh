// One work item of the plan, as every attention kernel may use it: each field clamped
// to its request's bounds and to the plan's static capacities, because under jit the
// plan is an operand that nobody checked (shared/DESIGN.md §3, "Kernels trust nothing").
//
// After LoadWorkItem, for any plan contents:
//   * the item's rows are rebased to its first query token: packed row r (r in
//     [row_begin, row_begin + num_rows), row_begin < group size) is query head
//     kv_head * G + r % G of q row q_base + r / G, and every such row lies in
//     [0, q_rows); num_rows <= max_rows. So row arithmetic stays in small ints;
//   * that token's query sits at key position pos_base (kv_len - qo_len + its index,
//     the bottom-right causal alignment), so token r / G sits at pos_base + r / G;
//   * keys [kv_begin, kv_end) have 0 <= kv_begin <= kv_end <= kKeyLimit and every
//     page-table slot page_base + j / page_size lies in [0, page_cap): loops over keys
//     are bounded by the plan's capacity, every kv_indices read stays inside its
//     section, and positions formed a few tiles past kv_end cannot wrap.
// A valid plan's item describes the same rows and keys as before. Page ids read through
// the slots are still the plan's: kernels mask ids outside [0, num_pages) as they load.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "jax_pagedattn/params.h"

namespace jax_pagedattn {

// Keys of one request at most: INT32_MAX less the headroom that look-ahead needs.
constexpr int kKeyLimit = INT32_MAX - (1 << 16);

struct WorkItem {
  int request;        // b; -1: nothing to do (padding, or nothing left after clamping)
  int64_t q_base;     // q row of the item's first query token
  int pos_base;       // key position of that token's query
  int row_begin;      // first packed row, counted from that token (< group size)
  int num_rows;
  int kv_begin;       // key positions, relative to the request
  int kv_end;
  int64_t page_base;  // kv_indptr[b]: the request's first page-table slot
  int split;          // kWorkSplit: -1 writes out/lse, j >= 0 partial row j of the token
};

__device__ __forceinline__ int64_t ClampI64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// Item `index` of p.work (index in [0, work_cap)), with at most `max_rows` packed rows.
__device__ __forceinline__ WorkItem LoadWorkItem(const AttentionParams& p, int index,
                                                 int max_rows) {
  WorkItem it{};
  it.request = -1;
  const int4* wp = reinterpret_cast<const int4*>(p.work + int64_t(index) * kWorkFields);
  const int4 w0 = __ldg(wp);
  const int4 w1 = __ldg(wp + 1);
  const int b = w0.x;
  if (b < 0 || b >= p.layout.batch_cap) return it;  // padding
  const int64_t G = p.group_size;
  const int64_t q_base = __ldg(p.qo_indptr + b);
  const int64_t page_base = __ldg(p.kv_indptr + b);
  const int qo_len = w1.z > 0 ? w1.z : 0;
  const int kv_len = w1.w > 0 ? (w1.w < kKeyLimit ? w1.w : kKeyLimit) : 0;

  // Rows: of tokens t in [0, qo_len) with q_base + t in [0, q_rows).
  const int64_t tok_lo = q_base < 0 ? -q_base : 0;
  const int64_t tok_hi = ClampI64(int64_t(p.q_rows) - q_base, 0, qo_len);
  const int64_t row_lo = ClampI64(w0.y, tok_lo * G, tok_hi * G);
  int64_t row_hi = ClampI64(w0.z, row_lo, tok_hi * G);
  if (row_hi > row_lo + max_rows) row_hi = row_lo + max_rows;
  if (row_hi <= row_lo) return it;

  // Keys: inside kv_len and inside the page-table slots [0, page_cap) of the plan.
  const int64_t ps = p.kv.page_size;
  const int64_t slot_lo = page_base < 0 ? -page_base : 0;
  const int64_t slot_hi = int64_t(p.layout.page_cap) - page_base;  // may be <= slot_lo
  const int64_t key_lo = ClampI64(w0.w, slot_lo * ps, kKeyLimit);
  int64_t key_hi = ClampI64(w1.x, 0, kv_len);
  if (key_hi > slot_hi * ps) key_hi = slot_hi * ps;

  // A 32-bit division (a 64-bit one is a call): a non-empty item has
  // 0 <= tok_lo G <= row_lo < row_hi <= w0.z < 2^31.
  const int64_t first_token = int(row_lo) / int(G);
  it.request = b;
  it.q_base = q_base + first_token;
  it.pos_base = int(kv_len - qo_len + first_token);  // <= kv_len: no wrap
  it.row_begin = int(row_lo - first_token * G);
  it.num_rows = int(row_hi - row_lo);
  it.kv_begin = key_hi > key_lo ? int(key_lo) : 0;
  it.kv_end = key_hi > key_lo ? int(key_hi) : 0;
  it.page_base = page_base;
  it.split = w1.y;
  return it;
}

}  // namespace jax_pagedattn
