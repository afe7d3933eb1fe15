// The plan buffer: one int32 array that the host planner fills and every backend reads.
//
// Everything that changes from step to step (index arrays, work items, merge offsets,
// counts) travels in this single buffer, so a step costs one host-to-device copy and
// the kernels' launch grids depend only on the static capacities below.
//
// Sections, in order (offsets in int32 elements; every section starts 8-aligned so
// the work items can be read as two 16-byte vectors):
//   work          [work_cap][kWorkFields]   work items, padding has request = -1
//   meta          [kMetaFields]             live counts, see MetaField
//   bin_indptr    [bin_cap + 1]             bin i runs items [bin_indptr[i], bin_indptr[i+1])
//   qo_indptr     [batch_cap + 1]           padded by repeating the last value
//   kv_indptr     [batch_cap + 1]           padded by repeating the last value
//   kv_last_page_len [batch_cap]            padding 0
//   merge_indptr  [token_cap + 1]           per query token: its split partials
//   kv_indices    [page_cap]                padding 0 (never read)
#pragma once

#include <cstdint>

namespace jax_pagedattn {

// One work item: a tile of packed query rows of one request against a range of its
// keys. Packed row r of request b is query token qo_indptr[b] + r / group_size,
// query head kv_head * group_size + r % group_size (kv_head is the CTA's head).
enum WorkField : int32_t {
  kWorkRequest = 0,   // request index b; -1 marks padding (kernel exits)
  kWorkRowBegin = 1,  // first packed row, relative to the request
  kWorkRowEnd = 2,    // one past the last packed row
  kWorkKvBegin = 3,   // first key position (token index within the request)
  kWorkKvEnd = 4,     // one past the last key position; == kv_begin means no keys
  kWorkSplit = 5,     // -1: write out/lse directly; j >= 0: write partial row
                      //     merge_indptr[token] + j of the workspace
  kWorkQoLen = 6,     // the request's query length (redundant, saves two loads)
  kWorkKvLen = 7,     // the request's key length (redundant, saves three loads)
  kWorkFields = 8,
};

// A token whose keys were split writes one partial (o normalised, lse base 2) per
// chunk; merge_indptr[t + 1] - merge_indptr[t] is that count (0: not split).
enum MetaField : int32_t {
  kMetaNumRequests = 0,
  kMetaNumTokens = 1,      // qo_indptr[num_requests]; rows past it are zero-filled
  kMetaNumWork = 2,        // live work items (they come first)
  kMetaNumPartialRows = 3, // partial rows in use
  kMetaNumBins = 4,        // bins with at least one item (they come first)
  kMetaFields = 5,
};

// Static sizes of a plan: they fix the plan buffer's sections (PlanLayout), the
// workspace and the launch grid. Python's planning.Capacities has the same fields.
struct Capacities {
  int32_t batch;         // requests
  int32_t tokens;        // query tokens
  int32_t pages;         // entries of kv_indices
  int32_t work;          // work items
  int32_t partial_rows;  // split-KV partial rows in the workspace
  int32_t bins;          // bins per kv head (CTAs per head of the GPU grid)
};

// A *bin* is what one CTA (per kv head) runs: a contiguous range of work items, in
// order. The GPU grid is [bin_cap, num_kv_heads] and every bin of a launch is resident
// at once (bin_cap * num_kv_heads <= CTAs the device holds), so the planner balances
// the launch by giving bins equal cost; the hardware scheduler has no say.
struct PlanLayout {
  int32_t batch_cap, token_cap, page_cap, work_cap, bin_cap;

  static constexpr PlanLayout Of(const Capacities& c) {
    return PlanLayout{c.batch, c.tokens, c.pages, c.work, c.bins};
  }

  static constexpr int64_t Align(int64_t n) { return (n + 7) / 8 * 8; }
  constexpr int64_t work() const { return 0; }
  constexpr int64_t meta() const { return work() + Align(int64_t(work_cap) * kWorkFields); }
  constexpr int64_t bin_indptr() const { return meta() + Align(kMetaFields); }
  constexpr int64_t qo_indptr() const { return bin_indptr() + Align(int64_t(bin_cap) + 1); }
  constexpr int64_t kv_indptr() const { return qo_indptr() + Align(batch_cap + 1); }
  constexpr int64_t kv_last_page_len() const { return kv_indptr() + Align(batch_cap + 1); }
  constexpr int64_t merge_indptr() const { return kv_last_page_len() + Align(batch_cap); }
  constexpr int64_t kv_indices() const { return merge_indptr() + Align(token_cap + 1); }
  constexpr int64_t size() const { return kv_indices() + Align(page_cap); }
};

}  // namespace jax_pagedattn
