// The host planner: validates a batch's index arrays and writes the plan buffer
// (plan_layout.h) that every backend reads. Plain C++, no XLA or CUDA types.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "jax_pagedattn/plan_layout.h"

namespace jax_pagedattn {

// A rejected batch; the message names the offending argument.
struct PlanError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Which way the planner deals units into bins (planner.cc's file comment): both priced
// and the cheaper kept, or one forced (a tuning knob for benchmarks: switches.py reads
// JAX_PAGEDATTN_DEAL and the spec carries it).
enum class Deal : int32_t { kAuto = 0, kBins = 1, kEqual = 2 };

// Everything about a plan but the batch's index arrays: one per wrapper configuration,
// built once (Python: _C.PlanSpec, made by planning.plan_spec) and passed to every plan.
struct PlanSpec {
  int32_t page_size;
  int32_t group_size;   // num_qo_heads / num_kv_heads
  int32_t tile_rows;    // packed query rows per work item at most (tile_rows.h)
  bool causal;
  int32_t num_pages;    // pages in the cache, or -1 when not known yet
  Capacities caps;      // caps.bins is how many bins the planner may fill
  Deal deal;
  // Name the arrays in messages as FlashInfer's decode wrapper does (indptr, indices,
  // last_page_len) rather than as its prefill wrapper does (paged_kv_indptr, ...).
  bool decode_names;
  // Batch invariance (FlashInfer's plan() options of the same names). With
  // fixed_split_size = n > 0 pages every unit's keys are cut at the key positions that
  // are multiples of n * page_size, and only there, so a request's pieces, and hence its
  // output bits, do not depend on the rest of the batch. disable_split_kv cuts no unit
  // (and wins over fixed_split_size). -1 / false: the bins decide the cuts.
  int32_t fixed_split_size = -1;
  bool disable_split_kv = false;
  // Sliding window: the query at position p sees keys j >= p - window_left (and, when
  // causal, j <= p), so a unit's items start at its first token's window. -1: none.
  int32_t window_left = -1;
  // Work items costliest first (then in their dealt order), the bins re-cut as runs of
  // about equal count: for a kernel that draws items from one queue in plan order (the
  // Hopper prefill kernel), which then runs a greedy longest-first schedule. Any kernel
  // runs such a plan correctly.
  bool longest_first = false;
};

// A batch's host index arrays. qo_indptr == nullptr means decode: request b has exactly
// one query token.
struct BatchArrays {
  const int32_t* qo_indptr;
  const int32_t* kv_indptr;
  const int32_t* kv_indices;
  const int32_t* kv_last_page_len;
  int64_t qo_indptr_len;
  int64_t kv_indptr_len;
  int64_t kv_indices_len;
  int64_t kv_last_page_len_len;
};

// Writes the plan into `out`, which holds PlanLayout::Of(spec.caps).size() int32
// elements. Throws PlanError for invalid input or a batch beyond the capacities.
void PlanBatch(const BatchArrays& batch, const PlanSpec& spec, int32_t* out);

// Bins, work items and partial rows that hold any batch within the given request /
// token / page capacities (see planner.cc for the bounds). `num_ctas` is how many CTAs
// of the kernel the device runs at once (SMs x CTAs per SM), or the CPU's parallelism;
// the bins of all kv heads together fill it. With fixed_split_size > 0 (pages) the work
// items and partial rows also hold that spec's fixed pieces of any such batch whose
// requests have at most max_qo_len query tokens each (1 for decode); partial rows never
// exceed partial_rows_limit (when >= 0), which may leave a batch without room.
Capacities DeriveCapacities(int32_t batch_cap, int32_t token_cap, int32_t page_cap,
                            int32_t group_size, int32_t tile_rows, int32_t num_kv_heads,
                            int32_t num_ctas, int32_t partial_rows_limit,
                            int32_t fixed_split_size = -1, int32_t max_qo_len = -1);

}  // namespace jax_pagedattn
