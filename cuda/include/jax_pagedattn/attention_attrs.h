// The static attributes of an attention call (FFI targets jax_pagedattn_decode and
// jax_pagedattn_prefill): the schema both sides of the custom call agree on.
//
// Python builds the attribute dictionary from the PlanConfig (planning.ffi_attrs: every
// PlanConfig field marked as an FFI attribute, under the same name), XLA decodes it
// into this struct (ffi_common.h registers the decoding), and AttentionParams inherits
// it, so the kernels read an attribute as p.<name>. Adding one is a PlanConfig field, a
// member here plus its line in ffi_common.h's registration, and the code that uses it.
// Plain C++: the kernels include it.
#pragma once

#include <cstdint>

#include "jax_pagedattn/plan_layout.h"

namespace jax_pagedattn {

enum class KvLayout : int32_t { kNHD = 0, kHND = 1 };
enum class PosEncoding : int32_t { kNone = 0, kRopeLlama = 1, kAlibi = 2 };

// XLA decodes the dictionary into these members in this order (aggregate
// initialisation): the registration in ffi_common.h lists them in the same order.
// Members whose zero would switch a feature on default to its "off" value, so code that
// builds the struct by hand (the harnesses, the CPU backend test) gets plain attention.
struct AttentionAttrs {
  int32_t num_qo_heads;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t page_size;
  KvLayout kv_layout;
  bool combined;  // one 5-D cache [P, 2, ...] passed twice, or a (k, v) pair
  bool causal;
  PosEncoding pos_encoding;
  float sm_scale;
  float rope_scale;
  float rope_theta;
  float logits_soft_cap = 0.f;  // c > 0: each scaled logit x becomes c tanh(x / c); 0: none
  int32_t window_left = -1;     // w >= 0: query position p sees keys j >= p - w; -1: none
  int32_t tile_rows;  // packed query rows per work item at most (the kernel's query tile)
  Capacities caps;
  // Runtime switches (jax_pagedattn/switches.py reads them once, from the environment).
  bool sm90_prefill;      // the Hopper prefill kernel may run where it covers the call
  int32_t sm90_stages;    // its K/V ring at head_dim 128: 3 (the default) or 2
  bool sm90_drawn_tasks;  // its CTAs draw tasks (task_schedule.cuh, TaskSchedule)
  // With RoPE: its keys are rotated once per call into the workspace (RopeKeysBytes)
  // instead of in every CTA that reads them (rope_keys.cuh).
  bool sm90_rope_keys = false;
  // Its two consumer warpgroups take turns to issue their GEMMs (PrefillSm90Tuning): 1 / 0
  // force it on / off, -1 leaves it to the head_dim (Sm90PingpongByDefault).
  int32_t sm90_pingpong = -1;
  bool dependent_launch;  // launches may overlap the previous kernel's tail (sm90+)
};

}  // namespace jax_pagedattn
