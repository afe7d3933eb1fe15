// Host entry points of the Hopper (sm_90a) paged prefill kernel (prefill_sm90.cu): the
// same AttentionParams, plan and outputs as LaunchPrefill (launchers.h), for the settings
// it covers; the caller falls back to LaunchPrefill on cudaErrorNotSupported.
//
// Covered (PrefillSm90Covers): bf16 and fp16 queries with a cache of the same type,
// head_dim 64, 128 and 256, tile_rows 128 at every head_dim, causal or not, no position
// encoding, ALiBi and RoPE (LLaMA), NHD and HND through PagedKv strides, any page size,
// split items, on a device of compute capability 9.0. Anything else, and strides or
// pointers that break its 16-byte copies, returns cudaErrorNotSupported without
// launching. Like LaunchPrefill it runs after LaunchMergeSetup on the same stream, as
// that pass's dependent grid.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "jax_pagedattn/params.h"

namespace jax_pagedattn {

// Knobs for measurement; the defaults are what LaunchPrefillSm90(p, stream) uses.
struct PrefillSm90Tuning {
  // The two consumer warpgroups take turns to issue their GEMMs (named barriers); the
  // library's calls take Sm90PingpongByDefault(head_dim) unless sm90_pingpong forces it.
  bool pingpong = false;
  // K and V tiles in flight each: 3 (224 of the 227 KB of shared memory) or 2. Only
  // head_dim 128 has 3-stage kernels; the other head_dims run 2 whatever this says.
  int stages = 3;
  // false: a measurement of the consumers alone (K/V tiles are not copied; wrong results).
  bool copy_kv = true;
  // One CTA per SM drawing (work item, kv head) tasks from a counter, in plan order
  // (task_schedule.cuh, TaskSchedule); false: one CTA per (bin, kv head).
  bool drawn_tasks = true;
  // With RoPE and a workspace that holds them (AttentionParams::rope_keys): the keys
  // rotated once by a pass before the kernel (rope_keys.cuh); false: the producer
  // rotates each K tile it loads.
  bool rope_keys = true;
  // The kernel's variant: 0; other values are layouts under measurement
  // (prefill_sm90_config.cuh, kVariant*), built only into the kernel harness.
  int variant = 0;
};

// The pingpong where a call does not force it: at head_dim 64 only, where it led in the
// harness and in the library; at 128 it tied or trailed, at 256 it tied
// (docs/PERF_NOTES.md).
inline bool Sm90PingpongByDefault(int head_dim) { return head_dim == 64; }

// The pingpong a call runs: `forced` 1 / 0 (the sm90_pingpong attribute) turns it on /
// off, -1 leaves it to Sm90PingpongByDefault.
inline bool Sm90Pingpong(int32_t forced, int head_dim) {
  return forced < 0 ? Sm90PingpongByDefault(head_dim) : forced != 0;
}

// Whether the kernel runs calls of these types and head_dim on the current device; the
// planner then cuts 128-row items (TileRows with hopper_prefill) at every head_dim.
bool PrefillSm90Covers(DType dtype, DType kv_dtype, int head_dim);

// With the default tuning, but the K/V stages p.sm90_stages asks for (2 or 3), drawn
// tasks only where p.sm90_drawn_tasks asks (its plans are then ordered for them,
// PlanSpec::longest_first), RoPE keys rotated once only where p.sm90_rope_keys asks (the
// workspace then holds them, RopeKeysBytes), and the pingpong as p.sm90_pingpong says
// (-1: Sm90PingpongByDefault).
cudaError_t LaunchPrefillSm90(const AttentionParams& p, cudaStream_t stream);
cudaError_t LaunchPrefillSm90(const AttentionParams& p, cudaStream_t stream,
                              const PrefillSm90Tuning& tuning);

// CTAs per SM of the kernel LaunchPrefillSm90 would launch (the planner's bins fill
// them); cudaErrorNotSupported where it would not launch.
cudaError_t PrefillSm90CtasPerSm(DType dtype, int head_dim, int tile_rows, int32_t* ctas);

}  // namespace jax_pagedattn
