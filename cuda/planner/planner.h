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

struct Capacities {
  int32_t batch;         // requests
  int32_t tokens;        // query tokens
  int32_t pages;         // entries of kv_indices
  int32_t work;          // work items
  int32_t partial_rows;  // split-KV partial rows in the workspace
  int32_t bins;          // bins per kv head (CTAs per head of the GPU grid)
};

struct PlanRequest {
  // Host arrays. qo_indptr == nullptr means decode: request b has exactly one query.
  const int32_t* qo_indptr;
  const int32_t* kv_indptr;
  const int32_t* kv_indices;
  const int32_t* kv_last_page_len;
  int64_t qo_indptr_len;
  int64_t kv_indptr_len;
  int64_t kv_indices_len;
  int64_t kv_last_page_len_len;

  int32_t page_size;
  int32_t group_size;    // num_qo_heads / num_kv_heads
  int32_t num_kv_heads;
  int32_t tile_rows;     // packed query rows per work item at most
  bool causal;
  int32_t num_pages;     // pages in the cache, or -1 when not known yet
  Capacities caps;       // caps.bins is how many bins the planner may fill

  // Argument names used in messages: FlashInfer's decode and prefill wrappers name
  // the same arrays differently.
  const char* name_qo_indptr = "qo_indptr";
  const char* name_kv_indptr = "paged_kv_indptr";
  const char* name_kv_indices = "paged_kv_indices";
  const char* name_kv_last_page_len = "paged_kv_last_page_len";
};

// Writes the plan into `out`, which holds PlanLayout{caps...}.size() int32 elements.
// Throws PlanError for invalid input or a batch beyond the capacities.
void PlanBatch(const PlanRequest& req, int32_t* out);

// Bins, work items and partial rows that hold any batch within the given request /
// token / page capacities (see planner.cc for the bounds). `num_ctas` is how many CTAs
// of the kernel the device runs at once (SMs x CTAs per SM), or the CPU's parallelism;
// the bins of all kv heads together fill it.
Capacities DeriveCapacities(int32_t batch_cap, int32_t token_cap, int32_t page_cap,
                            int32_t group_size, int32_t tile_rows, int32_t num_kv_heads,
                            int32_t num_ctas, int32_t partial_rows_limit);

}  // namespace jax_pagedattn
