// The FFI signatures shared by the CPU and CUDA handlers, and the conversion of their
// buffers and attributes into the plain structs of params.h. The CUDA handlers bind the
// same operands behind a stream context, so both backends read one contract.
//
// Attention (targets jax_pagedattn_decode, jax_pagedattn_prefill):
//   args:  q [T, Hqo, D], k_cache, v_cache (the same 5-D array twice when combined),
//          plan int32 [PlanLayout::size()]
//   rets:  out [T, Hqo, D] (q's dtype), lse [T, Hqo] float32, workspace uint8
//   attrs: see BindAttention
// Append (targets jax_pagedattn_append with one 5-D cache, jax_pagedattn_append_kv with
// a (k, v) pair): args new_k, new_v, batch_indices, positions, kv_indices, kv_indptr,
// then the cache operand(s); rets the cache(s), aliased to those operands.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "jax_pagedattn/params.h"
#include "xla/ffi/api/ffi.h"

namespace jax_pagedattn {

namespace ffi = xla::ffi;

inline bool ToDType(ffi::DataType t, DType* out) {
  switch (t) {
    case ffi::DataType::F32: *out = DType::kF32; return true;
    case ffi::DataType::F16: *out = DType::kF16; return true;
    case ffi::DataType::BF16: *out = DType::kBF16; return true;
    default: return false;
  }
}

inline int ElemBytes(DType t) { return t == DType::kF32 ? 4 : 2; }

// A cache buffer's shape for the attributes: combined [P, 2, S, H, D] (NHD) or
// [P, 2, H, S, D] (HND); one array of a pair is the same without the axis of 2. Both
// backends check this before any pointer arithmetic trusts the attributes.
inline ffi::Error CheckCacheShape(ffi::AnyBuffer cache, bool combined, int32_t kv_layout,
                                  int32_t page_size, int32_t num_kv_heads, int32_t head_dim) {
  if (kv_layout != int32_t(KvLayout::kNHD) && kv_layout != int32_t(KvLayout::kHND))
    return ffi::Error::InvalidArgument("jax_pagedattn: kv_layout must be 0 (NHD) or 1 (HND)");
  if (page_size < 1 || num_kv_heads < 1 || head_dim < 1)
    return ffi::Error::InvalidArgument("jax_pagedattn: page_size, num_kv_heads and head_dim must be positive");
  auto d = cache.dimensions();
  const size_t rank = combined ? 5 : 4;
  if (d.size() != rank || (combined && d[1] != 2))
    return ffi::Error::InvalidArgument(combined ? "jax_pagedattn: a combined cache must be [pages, 2, ...] (5-D)"
                                                : "jax_pagedattn: (k, v) caches must be 4-D");
  const bool nhd = kv_layout == int32_t(KvLayout::kNHD);
  const int64_t slots = d[rank - 3 + (nhd ? 0 : 1)], heads = d[rank - 3 + (nhd ? 1 : 0)];
  if (slots != page_size || heads != num_kv_heads || d[rank - 1] != head_dim)
    return ffi::Error::InvalidArgument(
        "jax_pagedattn: cache shape does not match kv_layout, page_size, num_kv_heads and head_dim");
  return ffi::Error::Success();
}

// Operands and results of an attention call, after the optional stream context.
// XLA's Binding chains only as an rvalue, hence std::move on the parameter.
template <typename Binding>
auto BindAttention(Binding b) {
  return std::move(b).template Arg<ffi::AnyBuffer>()  // q
      .template Arg<ffi::AnyBuffer>()               // k_cache
      .template Arg<ffi::AnyBuffer>()               // v_cache
      .template Arg<ffi::Buffer<ffi::S32>>()        // plan
      .template Ret<ffi::AnyBuffer>()               // out
      .template Ret<ffi::Buffer<ffi::F32>>()        // lse
      .template Ret<ffi::Buffer<ffi::U8>>()         // workspace
      .template Attr<int32_t>("num_qo_heads")
      .template Attr<int32_t>("num_kv_heads")
      .template Attr<int32_t>("head_dim")
      .template Attr<int32_t>("page_size")
      .template Attr<int32_t>("kv_layout")
      .template Attr<int32_t>("combined")
      .template Attr<int32_t>("causal")
      .template Attr<int32_t>("pos_encoding")
      .template Attr<float>("sm_scale")
      .template Attr<float>("rope_scale")
      .template Attr<float>("rope_theta")
      .template Attr<int32_t>("tile_rows")
      .template Attr<int32_t>("batch_cap")
      .template Attr<int32_t>("token_cap")
      .template Attr<int32_t>("page_cap")
      .template Attr<int32_t>("work_cap")
      .template Attr<int32_t>("partial_rows_cap")
      .template Attr<int32_t>("bin_cap");
}

// The handler arguments of BindAttention, in order, as one parameter pack macro so the
// CPU and CUDA handlers cannot drift from the binding.
#define JPA_ATTENTION_HANDLER_ARGS                                                     \
  ::xla::ffi::AnyBuffer q, ::xla::ffi::AnyBuffer k_cache, ::xla::ffi::AnyBuffer v_cache, \
      ::xla::ffi::Buffer<::xla::ffi::S32> plan, ::xla::ffi::Result<::xla::ffi::AnyBuffer> out, \
      ::xla::ffi::ResultBuffer<::xla::ffi::F32> lse,                                    \
      ::xla::ffi::ResultBuffer<::xla::ffi::U8> workspace, int32_t num_qo_heads,         \
      int32_t num_kv_heads, int32_t head_dim, int32_t page_size, int32_t kv_layout,     \
      int32_t combined, int32_t causal, int32_t pos_encoding, float sm_scale,           \
      float rope_scale, float rope_theta, int32_t tile_rows, int32_t batch_cap,         \
      int32_t token_cap, int32_t page_cap, int32_t work_cap, int32_t partial_rows_cap,   \
      int32_t bin_cap

#define JPA_ATTENTION_FORWARD_ARGS                                                    \
  q, k_cache, v_cache, plan, out, lse, workspace, num_qo_heads, num_kv_heads, head_dim, \
      page_size, kv_layout, combined, causal, pos_encoding, sm_scale, rope_scale,       \
      rope_theta, tile_rows, batch_cap, token_cap, page_cap, work_cap, partial_rows_cap, \
      bin_cap

// Fills `p` from the handler arguments; checks what the primitive's abstract evaluation
// already checked, so a hand-written custom call cannot read out of bounds either.
inline ffi::Error MakeAttentionParams(JPA_ATTENTION_HANDLER_ARGS, AttentionParams* p) {
  *p = AttentionParams{};
  if (!ToDType(q.element_type(), &p->dtype) || k_cache.element_type() != q.element_type() ||
      v_cache.element_type() != q.element_type() || out->element_type() != q.element_type())
    return ffi::Error::InvalidArgument("jax_pagedattn: q, caches and out must share one of f32/f16/bf16");
  auto qd = q.dimensions();
  if (qd.size() != 3 || qd[1] != num_qo_heads || qd[2] != head_dim)
    return ffi::Error::InvalidArgument("jax_pagedattn: q must be [tokens, num_qo_heads, head_dim]");
  if (num_kv_heads <= 0 || num_qo_heads % num_kv_heads != 0)
    return ffi::Error::InvalidArgument("jax_pagedattn: num_qo_heads must be a multiple of num_kv_heads");
  ffi::Error cache_ok = CheckCacheShape(k_cache, combined != 0, kv_layout, page_size, num_kv_heads, head_dim);
  if (cache_ok.failure()) return cache_ok;
  auto kd = k_cache.dimensions();
  if (!(v_cache.dimensions() == kd))
    return ffi::Error::InvalidArgument("jax_pagedattn: k and v caches must have one shape");
  if (!(out->dimensions() == qd))
    return ffi::Error::InvalidArgument("jax_pagedattn: out must have q's shape");
  auto ld = lse->dimensions();
  if (ld.size() != 2 || ld[0] != qd[0] || ld[1] != num_qo_heads)
    return ffi::Error::InvalidArgument("jax_pagedattn: lse must be [tokens, num_qo_heads]");
  if (bin_cap < 1 || work_cap < 0)
    return ffi::Error::InvalidArgument("jax_pagedattn: bin_cap must be >= 1 and work_cap >= 0");
  const PlanLayout layout{batch_cap, token_cap, page_cap, work_cap, bin_cap};
  if (int64_t(plan.element_count()) != layout.size())
    return ffi::Error::InvalidArgument("jax_pagedattn: plan buffer size does not match the capacities");
  if (qd[0] > token_cap)
    return ffi::Error::InvalidArgument("jax_pagedattn: q has more rows than token_cap");
  const int64_t ws_bytes =
      WorkspaceBytes(partial_rows_cap, num_qo_heads, head_dim, token_cap, num_kv_heads);
  if (int64_t(workspace->element_count()) < ws_bytes)
    return ffi::Error::InvalidArgument("jax_pagedattn: workspace too small");

  p->q = q.untyped_data();
  p->out = out->untyped_data();
  p->lse = lse->typed_data();
  p->q_rows = int32_t(qd[0]);
  p->num_qo_heads = num_qo_heads;
  p->num_kv_heads = num_kv_heads;
  p->head_dim = head_dim;
  p->group_size = num_qo_heads / num_kv_heads;
  p->kv = MakePagedKv(k_cache.untyped_data(), v_cache.untyped_data(), combined != 0,
                      KvLayout(kv_layout), int32_t(kd[0]), page_size, num_kv_heads, head_dim,
                      ElemBytes(p->dtype));

  p->layout = layout;
  PointPlanSections(p, plan.typed_data());

  float* ws = reinterpret_cast<float*>(workspace->typed_data());
  p->partial_o = ws;
  p->partial_lse = ws + int64_t(partial_rows_cap) * num_qo_heads * head_dim;
  p->merge_counters =
      reinterpret_cast<int32_t*>(p->partial_lse + int64_t(partial_rows_cap) * num_qo_heads);
  p->partial_rows_cap = partial_rows_cap;

  p->tile_rows = tile_rows;
  p->causal = causal != 0;
  p->pos_encoding = PosEncoding(pos_encoding);
  p->sm_scale = sm_scale;
  p->rope_scale = rope_scale;
  p->rope_theta = rope_theta;
  return ffi::Error::Success();
}

// Operands of an append call before the cache operand(s).
template <typename Binding>
auto BindAppendInputs(Binding b) {
  return std::move(b).template Arg<ffi::AnyBuffer>()  // new_k [N, Hkv, D]
      .template Arg<ffi::AnyBuffer>()          // new_v
      .template Arg<ffi::Buffer<ffi::S32>>()   // batch_indices [N]
      .template Arg<ffi::Buffer<ffi::S32>>()   // positions [N]
      .template Arg<ffi::Buffer<ffi::S32>>()   // kv_indices
      .template Arg<ffi::Buffer<ffi::S32>>();  // kv_indptr [B + 1]
}

template <typename Binding>
auto BindAppendAttrs(Binding b) {
  return std::move(b).template Attr<int32_t>("page_size")
      .template Attr<int32_t>("kv_layout")
      .template Attr<int32_t>("num_kv_heads")
      .template Attr<int32_t>("head_dim");
}

// Fills `p` for an append. `k_in`/`v_in` are the cache operands and `k_out`/`v_out` the
// aliased results (each the same buffer twice for the combined cache); the backend copies
// an operand into its result only if XLA did not alias them.
inline ffi::Error MakeAppendParams(ffi::AnyBuffer new_k, ffi::AnyBuffer new_v,
                                   ffi::Buffer<ffi::S32> batch_indices,
                                   ffi::Buffer<ffi::S32> positions,
                                   ffi::Buffer<ffi::S32> kv_indices,
                                   ffi::Buffer<ffi::S32> kv_indptr, ffi::AnyBuffer k_in,
                                   ffi::AnyBuffer v_in, ffi::AnyBuffer k_out,
                                   ffi::AnyBuffer v_out, bool combined, int32_t page_size,
                                   int32_t kv_layout, int32_t num_kv_heads, int32_t head_dim,
                                   AppendParams* p) {
  *p = AppendParams{};
  for (ffi::AnyBuffer c : {k_out, v_out}) {
    ffi::Error err = CheckCacheShape(c, combined, kv_layout, page_size, num_kv_heads, head_dim);
    if (err.failure()) return err;
  }
  // One page id addresses both halves, so they must hold the same pages.
  if (!(k_out.dimensions() == v_out.dimensions()))
    return ffi::Error::InvalidArgument("jax_pagedattn: k and v caches must have one shape");
  if (!(k_in.dimensions() == k_out.dimensions()) || !(v_in.dimensions() == v_out.dimensions()) ||
      k_in.element_type() != k_out.element_type() || v_in.element_type() != v_out.element_type())
    return ffi::Error::InvalidArgument("jax_pagedattn: the cache results must match the cache operands");
  if (!(new_v.dimensions() == new_k.dimensions()))
    return ffi::Error::InvalidArgument("jax_pagedattn: append_value must have append_key's shape");
  if (!ToDType(new_k.element_type(), &p->dtype) || new_v.element_type() != new_k.element_type() ||
      k_out.element_type() != new_k.element_type() || v_out.element_type() != new_k.element_type())
    return ffi::Error::InvalidArgument("jax_pagedattn: append keys, values and cache must share a dtype");
  auto nd = new_k.dimensions();
  if (nd.size() != 3 || nd[1] != num_kv_heads || nd[2] != head_dim)
    return ffi::Error::InvalidArgument("jax_pagedattn: append_key must be [rows, num_kv_heads, head_dim]");
  if (int64_t(batch_indices.element_count()) != nd[0] || int64_t(positions.element_count()) != nd[0])
    return ffi::Error::InvalidArgument("jax_pagedattn: batch_indices/positions must have one entry per row");
  if (kv_indptr.element_count() < 1)
    return ffi::Error::InvalidArgument("jax_pagedattn: kv_indptr must not be empty");
  p->new_k = new_k.untyped_data();
  p->new_v = new_v.untyped_data();
  p->batch_indices = batch_indices.typed_data();
  p->positions = positions.typed_data();
  p->kv_indices = kv_indices.typed_data();
  p->kv_indptr = kv_indptr.typed_data();
  p->num_rows = int32_t(nd[0]);
  p->num_indices = int32_t(kv_indices.element_count());
  p->batch = int32_t(kv_indptr.element_count()) - 1;
  p->kv = MakePagedKv(k_out.untyped_data(), v_out.untyped_data(), combined, KvLayout(kv_layout),
                      int32_t(k_out.dimensions()[0]), page_size, num_kv_heads, head_dim,
                      ElemBytes(p->dtype));
  p->k = const_cast<void*>(p->kv.k);
  p->v = const_cast<void*>(p->kv.v);
  return ffi::Error::Success();
}

}  // namespace jax_pagedattn
