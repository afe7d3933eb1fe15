// Plain structs describing one call, filled by the FFI bindings (ffi_common.h) and
// consumed alike by the CPU handlers and the CUDA kernels. No XLA types in here.
#pragma once

#include <cmath>
#include <cstdint>

#include "jax_pagedattn/attention_attrs.h"
#include "jax_pagedattn/plan_layout.h"

#if defined(__CUDACC__)
#define JPA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define JPA_HOST_DEVICE inline
#endif

namespace jax_pagedattn {

// Element types: q, out and caches in f32 (CPU only), f16 or bf16; caches also in fp8
// (e4m3fn, e5m2) beside an f16 / bf16 query.
enum class DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF8E4M3 = 3, kF8E5M2 = 4 };

JPA_HOST_DEVICE bool IsFp8(DType t) { return t == DType::kF8E4M3 || t == DType::kF8E5M2; }
JPA_HOST_DEVICE int ElemBytes(DType t) { return t == DType::kF32 ? 4 : IsFp8(t) ? 1 : 2; }

// A paged K/V cache as two base pointers and element strides. The same struct covers
// the 5-D combined cache ([P, 2, S, H, D] NHD / [P, 2, H, S, D] HND; v = k + one half
// page) and the (k, v) pair of 4-D arrays. Element (page p, slot s, head h, dim d)
// sits at p * page_stride + s * slot_stride + h * head_stride + d.
struct PagedKv {
  const void* k;
  const void* v;
  int64_t page_stride;
  int64_t slot_stride;
  int64_t head_stride;
  int32_t num_pages;
  int32_t page_size;
  int32_t num_kv_heads;
  int32_t head_dim;

  JPA_HOST_DEVICE int64_t offset(int64_t page, int64_t slot, int64_t head) const {
    return page * page_stride + slot * slot_stride + head * head_stride;
  }
};

// Strides for a cache of the given shape; `combined` selects the 5-D form.
inline PagedKv MakePagedKv(const void* k, const void* v, bool combined, KvLayout layout,
                           int32_t num_pages, int32_t page_size, int32_t num_kv_heads,
                           int32_t head_dim, int elem_bytes) {
  PagedKv kv{};
  const int64_t half = int64_t(page_size) * num_kv_heads * head_dim;
  kv.k = k;
  kv.v = combined ? static_cast<const char*>(k) + half * elem_bytes : v;
  kv.page_stride = combined ? 2 * half : half;
  if (layout == KvLayout::kNHD) {
    kv.slot_stride = int64_t(num_kv_heads) * head_dim;
    kv.head_stride = head_dim;
  } else {
    kv.slot_stride = head_dim;
    kv.head_stride = int64_t(page_size) * head_dim;
  }
  kv.num_pages = num_pages;
  kv.page_size = page_size;
  kv.num_kv_heads = num_kv_heads;
  kv.head_dim = head_dim;
  return kv;
}

// Everything a decode or prefill launch reads: the call's static attributes
// (attention_attrs.h, inherited, so p.causal is the attribute) and its buffers.
// q, out: [q_rows, num_qo_heads, head_dim] contiguous; lse: [q_rows, num_qo_heads]
// float32, base 2. The plan pointers index into the single plan buffer (plan_layout.h),
// whose sections `layout` gives (PlanLayout::Of(caps)). Workspace: partial_o
// [caps.partial_rows, num_qo_heads, head_dim] float32, partial_lse [caps.partial_rows,
// num_qo_heads] float32, then merge_counters [caps.tokens, num_kv_heads] int32 (the
// GPU's split bookkeeping: how many partial rows of a token's GQA group are written;
// the CPU backend leaves them), then task_counter, one uint64 (the tasks that the
// Hopper prefill kernel's CTAs have drawn), then, where sm90_rope_keys asks for them
// with RoPE, rope_keys (RopeKeysBytes); PointWorkspace sets the pointers.
struct AttentionParams : AttentionAttrs {
  DType dtype;     // q and out
  DType kv_dtype;  // the cache: dtype, or an fp8 type beside an f16 / bf16 q
  const void* q;
  void* out;
  float* lse;
  const float* sinks;  // [num_qo_heads] sink logits (natural log, unscaled); nullptr: none
  // [2]: k_scale (multiplies the logits, with sm_scale) and v_scale (multiplies the
  // output), FlashInfer's dequantisation scales; nullptr: both 1.
  const float* kv_scales;
  int32_t q_rows;
  int32_t group_size;  // num_qo_heads / num_kv_heads
  PagedKv kv;

  PlanLayout layout;
  const int32_t* work;
  const int32_t* meta;
  const int32_t* bin_indptr;  // [bin_cap + 1]: the items of each CTA (per kv head)
  const int32_t* qo_indptr;
  const int32_t* kv_indptr;
  const int32_t* kv_last_page_len;
  const int32_t* merge_indptr;
  const int32_t* kv_indices;

  float* partial_o;
  float* partial_lse;
  int32_t* merge_counters;  // [token_cap][num_kv_heads], zeroed before the attention pass
  unsigned long long* task_counter;  // zeroed before the attention pass
  // The keys rotated to their positions, [num_kv_heads][layout.page_cap * page_size]
  // [head_dim] of dtype: key slot s of plan page-table slot i at i * page_size + s
  // (rope_keys.cuh writes them); nullptr: the kernel rotates keys as it loads them.
  void* rope_keys;

  // logits_soft_cap in the base-2 units the GPU kernels hold logits in (c log2 e), and
  // its inverse; 0 without a cap. Derived here (SetDerived) so the kernels read them
  // from the parameter bank instead of holding them in registers.
  float soft_cap_log2;
  float inv_soft_cap_log2;

  void SetDerived() {
    soft_cap_log2 = logits_soft_cap > 0.f ? logits_soft_cap * 1.4426950408889634f : 0.f;
    inv_soft_cap_log2 = soft_cap_log2 > 0.f ? 1.f / soft_cap_log2 : 0.f;
  }
};

// Points the plan section pointers of `p` into a plan buffer at `base`.
inline void PointPlanSections(AttentionParams* p, const int32_t* base) {
  const PlanLayout& L = p->layout;
  p->work = base + L.work();
  p->meta = base + L.meta();
  p->bin_indptr = base + L.bin_indptr();
  p->qo_indptr = base + L.qo_indptr();
  p->kv_indptr = base + L.kv_indptr();
  p->kv_last_page_len = base + L.kv_last_page_len();
  p->merge_indptr = base + L.merge_indptr();
  p->kv_indices = base + L.kv_indices();
}

// Workspace bytes of one split-KV partial row: float32 outputs and LSE of every head.
inline int64_t PartialRowBytes(int32_t num_qo_heads, int32_t head_dim) {
  return int64_t(num_qo_heads) * (head_dim + 1) * 4;
}

// Bytes of the rotated keys (AttentionParams::rope_keys) of a call with these
// attributes: every key slot of the plan's page-table capacity, for every kv head,
// where sm90_rope_keys asks for them with RoPE; 0 otherwise.
inline int64_t RopeKeysBytes(const AttentionAttrs& a, DType dtype) {
  if (!a.sm90_rope_keys || a.pos_encoding != PosEncoding::kRopeLlama) return 0;
  return int64_t(a.caps.pages) * a.page_size * a.num_kv_heads * a.head_dim * ElemBytes(dtype);
}

// Byte offsets of the workspace's sections (the AttentionParams comment): partial_o,
// partial_lse, merge_counters, task_counter (8-byte aligned), rope_keys (128-byte
// aligned, `rope_keys_bytes` long: RopeKeysBytes), end.
struct WorkspaceLayout {
  int64_t partial_lse, merge_counters, task_counter, rope_keys, size;
  static WorkspaceLayout Of(const Capacities& caps, int32_t num_qo_heads, int32_t head_dim,
                            int32_t num_kv_heads, int64_t rope_keys_bytes) {
    WorkspaceLayout w;
    w.partial_lse = int64_t(caps.partial_rows) * num_qo_heads * head_dim * 4;
    w.merge_counters = int64_t(caps.partial_rows) * PartialRowBytes(num_qo_heads, head_dim);
    w.task_counter = (w.merge_counters + int64_t(caps.tokens) * num_kv_heads * 4 + 7) / 8 * 8;
    w.rope_keys = rope_keys_bytes > 0 ? (w.task_counter + 8 + 127) / 128 * 128 : w.task_counter + 8;
    w.size = w.rope_keys + rope_keys_bytes;
    return w;
  }
};

// Workspace bytes of one call. Python asks _C.workspace_bytes.
inline int64_t WorkspaceBytes(const Capacities& caps, int32_t num_qo_heads, int32_t head_dim,
                              int32_t num_kv_heads, int64_t rope_keys_bytes = 0) {
  return WorkspaceLayout::Of(caps, num_qo_heads, head_dim, num_kv_heads, rope_keys_bytes).size;
}

// Points the workspace pointers of `p` (its attributes, dtype and head counts set) into
// `base`, a buffer of WorkspaceBytes(..., RopeKeysBytes(p, p.dtype)), 8-byte aligned.
inline void PointWorkspace(AttentionParams* p, void* base) {
  const int64_t rope_bytes = RopeKeysBytes(*p, p->dtype);
  const WorkspaceLayout w =
      WorkspaceLayout::Of(p->caps, p->num_qo_heads, p->head_dim, p->num_kv_heads, rope_bytes);
  uint8_t* b = static_cast<uint8_t*>(base);
  p->partial_o = reinterpret_cast<float*>(b);
  p->partial_lse = reinterpret_cast<float*>(b + w.partial_lse);
  p->merge_counters = reinterpret_cast<int32_t*>(b + w.merge_counters);
  p->task_counter = reinterpret_cast<unsigned long long*>(b + w.task_counter);
  p->rope_keys = rope_bytes > 0 ? static_cast<void*>(b + w.rope_keys) : nullptr;
}

// ALiBi slope of query head h among n heads (the standard geometric sequence, with the
// interleaved extension when n is not a power of two).
JPA_HOST_DEVICE float AlibiSlope(int32_t h, int32_t n) {
  int32_t p = 1;
  while (p * 2 <= n) p *= 2;
  // exp2 is available on host and device; slopes are exact powers of two.
  if (h < p) return exp2f(-8.0f * float(h + 1) / float(p));
  return exp2f(-4.0f * float(2 * (h + 1 - p) - 1) / float(p));
}

// Everything an append launch reads. New rows: [num_rows, num_kv_heads, head_dim].
struct AppendParams {
  DType dtype;
  const void* new_k;
  const void* new_v;
  const int32_t* batch_indices;  // [num_rows]
  const int32_t* positions;      // [num_rows]
  const int32_t* kv_indices;     // [num_indices]
  const int32_t* kv_indptr;      // [batch + 1]
  int32_t num_rows;
  int32_t num_indices;
  int32_t batch;
  void* k;  // writable cache halves (aliased with the inputs)
  void* v;
  PagedKv kv;  // strides (its k/v pointers equal the two above)
};

}  // namespace jax_pagedattn
