// The FFI signatures shared by the CPU and CUDA handlers, and the conversion of their
// buffers and attributes into the plain structs of params.h. The CUDA handlers bind the
// same operands behind a stream context, so both backends read one contract.
//
// Attention (targets jax_pagedattn_decode, jax_pagedattn_prefill):
//   args:  q [T, Hqo, D], k_cache, v_cache (the same 5-D array twice when combined),
//          plan int32 [PlanLayout::size()], sinks float32 [Hqo] or [0], scales float32
//          [2] (k_scale, v_scale) or [0]
//   rets:  out [T, Hqo, D] (q's dtype), lse [T, Hqo] float32, workspace uint8
//   attrs: AttentionAttrs (attention_attrs.h), decoded from one attribute dictionary
// Append (targets jax_pagedattn_append with one 5-D cache, jax_pagedattn_append_kv with
// a (k, v) pair): args new_k, new_v, batch_indices, positions, kv_indices, kv_indptr,
// then the cache operand(s); rets the cache(s), aliased to those operands.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

#include "jax_pagedattn/attention_attrs.h"
#include "jax_pagedattn/params.h"
#include "xla/ffi/api/ffi.h"

namespace jax_pagedattn {

namespace ffi = xla::ffi;

inline bool ToDType(ffi::DataType t, DType* out) {
  switch (t) {
    case ffi::DataType::F32: *out = DType::kF32; return true;
    case ffi::DataType::F16: *out = DType::kF16; return true;
    case ffi::DataType::BF16: *out = DType::kBF16; return true;
    case ffi::DataType::F8E4M3FN: *out = DType::kF8E4M3; return true;
    case ffi::DataType::F8E5M2: *out = DType::kF8E5M2; return true;
    default: return false;
  }
}


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

// Operands and results of an attention call, after the optional stream context; the
// attributes decode into one AttentionAttrs (registered at the end of this file).
// XLA's Binding chains only as an rvalue, hence std::move on the parameter.
template <typename Binding>
auto BindAttention(Binding b) {
  return std::move(b).template Arg<ffi::AnyBuffer>()  // q
      .template Arg<ffi::AnyBuffer>()               // k_cache
      .template Arg<ffi::AnyBuffer>()               // v_cache
      .template Arg<ffi::Buffer<ffi::S32>>()        // plan
      .template Arg<ffi::Buffer<ffi::F32>>()        // sinks [num_qo_heads], or [0]: none
      .template Arg<ffi::Buffer<ffi::F32>>()        // scales [2] (k_scale, v_scale), or [0]
      .template Ret<ffi::AnyBuffer>()               // out
      .template Ret<ffi::Buffer<ffi::F32>>()        // lse
      .template Ret<ffi::Buffer<ffi::U8>>()         // workspace
      .template Attrs<AttentionAttrs>();
}

// The buffers of an attention call, as BindAttention lists them (handles: cheap to copy).
struct AttentionBuffers {
  ffi::AnyBuffer q, k_cache, v_cache;
  ffi::Buffer<ffi::S32> plan;
  ffi::Buffer<ffi::F32> sinks;
  ffi::Buffer<ffi::F32> scales;
  ffi::Result<ffi::AnyBuffer> out;
  ffi::ResultBuffer<ffi::F32> lse;
  ffi::ResultBuffer<ffi::U8> workspace;
};

// Fills `p` from the call; checks what the primitive's abstract evaluation already
// checked, so a hand-written custom call cannot read out of bounds either.
inline ffi::Error MakeAttentionParams(AttentionBuffers b, const AttentionAttrs& a,
                                      AttentionParams* p) {
  *p = AttentionParams{};
  static_cast<AttentionAttrs&>(*p) = a;
  const ffi::AnyBuffer q = b.q, k_cache = b.k_cache, v_cache = b.v_cache;
  if (!ToDType(q.element_type(), &p->dtype) || IsFp8(p->dtype) ||
      b.out->element_type() != q.element_type())
    return ffi::Error::InvalidArgument("jax_pagedattn: q and out must share one of f32/f16/bf16");
  if (!ToDType(k_cache.element_type(), &p->kv_dtype) ||
      v_cache.element_type() != k_cache.element_type() ||
      !(p->kv_dtype == p->dtype || (IsFp8(p->kv_dtype) && p->dtype != DType::kF32)))
    return ffi::Error::InvalidArgument(
        "jax_pagedattn: the caches must have q's dtype, or an fp8 type beside an f16/bf16 q");
  auto qd = q.dimensions();
  if (qd.size() != 3 || qd[1] != a.num_qo_heads || qd[2] != a.head_dim)
    return ffi::Error::InvalidArgument("jax_pagedattn: q must be [tokens, num_qo_heads, head_dim]");
  if (a.num_kv_heads <= 0 || a.num_qo_heads % a.num_kv_heads != 0)
    return ffi::Error::InvalidArgument("jax_pagedattn: num_qo_heads must be a multiple of num_kv_heads");
  if (a.pos_encoding != PosEncoding::kNone && a.pos_encoding != PosEncoding::kRopeLlama &&
      a.pos_encoding != PosEncoding::kAlibi)
    return ffi::Error::InvalidArgument(
        "jax_pagedattn: pos_encoding must be 0 (NONE), 1 (ROPE_LLAMA) or 2 (ALIBI)");
  if (!(a.logits_soft_cap >= 0.0f) || !std::isfinite(a.logits_soft_cap))
    return ffi::Error::InvalidArgument("jax_pagedattn: logits_soft_cap must be 0 or positive and finite");
  if (a.window_left < -1)
    return ffi::Error::InvalidArgument("jax_pagedattn: window_left must be -1 or >= 0");
  if (a.sm90_stages != 2 && a.sm90_stages != 3)
    return ffi::Error::InvalidArgument("jax_pagedattn: sm90_stages must be 2 or 3");
  if (a.sm90_pingpong < -1 || a.sm90_pingpong > 1)
    return ffi::Error::InvalidArgument("jax_pagedattn: sm90_pingpong must be -1, 0 or 1");
  const int64_t num_sinks = int64_t(b.sinks.element_count());
  if (num_sinks != 0 && num_sinks != a.num_qo_heads)
    return ffi::Error::InvalidArgument("jax_pagedattn: sinks must be [num_qo_heads] or empty");
  const int64_t num_scales = int64_t(b.scales.element_count());
  if (num_scales != 0 && num_scales != 2)
    return ffi::Error::InvalidArgument("jax_pagedattn: scales must be [2] (k_scale, v_scale) or empty");
  ffi::Error cache_ok = CheckCacheShape(k_cache, a.combined, int32_t(a.kv_layout), a.page_size,
                                        a.num_kv_heads, a.head_dim);
  if (cache_ok.failure()) return cache_ok;
  auto kd = k_cache.dimensions();
  if (!(v_cache.dimensions() == kd))
    return ffi::Error::InvalidArgument("jax_pagedattn: k and v caches must have one shape");
  if (!(b.out->dimensions() == qd))
    return ffi::Error::InvalidArgument("jax_pagedattn: out must have q's shape");
  auto ld = b.lse->dimensions();
  if (ld.size() != 2 || ld[0] != qd[0] || ld[1] != a.num_qo_heads)
    return ffi::Error::InvalidArgument("jax_pagedattn: lse must be [tokens, num_qo_heads]");
  const Capacities& caps = a.caps;
  if (caps.bins < 1 || caps.work < 0 || caps.partial_rows < 0 || caps.batch < 0 ||
      caps.tokens < 0 || caps.pages < 0)
    return ffi::Error::InvalidArgument(
        "jax_pagedattn: capacities must not be negative and bins must be >= 1");
  const PlanLayout layout = PlanLayout::Of(caps);
  if (int64_t(b.plan.element_count()) != layout.size())
    return ffi::Error::InvalidArgument("jax_pagedattn: plan buffer size does not match the capacities");
  if (qd[0] > caps.tokens)
    return ffi::Error::InvalidArgument("jax_pagedattn: q has more rows than the token capacity");
  if (int64_t(b.workspace->element_count()) <
      WorkspaceBytes(caps, a.num_qo_heads, a.head_dim, a.num_kv_heads, RopeKeysBytes(a, p->dtype)))
    return ffi::Error::InvalidArgument("jax_pagedattn: workspace too small");

  p->q = q.untyped_data();
  p->out = b.out->untyped_data();
  p->lse = b.lse->typed_data();
  p->sinks = num_sinks != 0 ? b.sinks.typed_data() : nullptr;
  p->kv_scales = num_scales != 0 ? b.scales.typed_data() : nullptr;
  p->q_rows = int32_t(qd[0]);
  p->group_size = a.num_qo_heads / a.num_kv_heads;
  p->kv = MakePagedKv(k_cache.untyped_data(), v_cache.untyped_data(), a.combined, a.kv_layout,
                      int32_t(kd[0]), a.page_size, a.num_kv_heads, a.head_dim,
                      ElemBytes(p->kv_dtype));

  p->layout = layout;
  PointPlanSections(p, b.plan.typed_data());

  PointWorkspace(p, b.workspace->typed_data());
  p->SetDerived();
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

// How XLA decodes the attribute dictionaries into the structs of attention_attrs.h and
// plan_layout.h: every member, in declaration order, under its own name.
XLA_FFI_REGISTER_ENUM_ATTR_DECODING(::jax_pagedattn::KvLayout);
XLA_FFI_REGISTER_ENUM_ATTR_DECODING(::jax_pagedattn::PosEncoding);

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(::jax_pagedattn::Capacities,
                                      ::xla::ffi::StructMember<int32_t>("batch"),
                                      ::xla::ffi::StructMember<int32_t>("tokens"),
                                      ::xla::ffi::StructMember<int32_t>("pages"),
                                      ::xla::ffi::StructMember<int32_t>("work"),
                                      ::xla::ffi::StructMember<int32_t>("partial_rows"),
                                      ::xla::ffi::StructMember<int32_t>("bins"));

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    ::jax_pagedattn::AttentionAttrs, ::xla::ffi::StructMember<int32_t>("num_qo_heads"),
    ::xla::ffi::StructMember<int32_t>("num_kv_heads"), ::xla::ffi::StructMember<int32_t>("head_dim"),
    ::xla::ffi::StructMember<int32_t>("page_size"),
    ::xla::ffi::StructMember<::jax_pagedattn::KvLayout>("kv_layout"),
    ::xla::ffi::StructMember<bool>("combined"), ::xla::ffi::StructMember<bool>("causal"),
    ::xla::ffi::StructMember<::jax_pagedattn::PosEncoding>("pos_encoding"),
    ::xla::ffi::StructMember<float>("sm_scale"), ::xla::ffi::StructMember<float>("rope_scale"),
    ::xla::ffi::StructMember<float>("rope_theta"),
    ::xla::ffi::StructMember<float>("logits_soft_cap"),
    ::xla::ffi::StructMember<int32_t>("window_left"), ::xla::ffi::StructMember<int32_t>("tile_rows"),
    ::xla::ffi::StructMember<::jax_pagedattn::Capacities>("caps"),
    ::xla::ffi::StructMember<bool>("sm90_prefill"), ::xla::ffi::StructMember<int32_t>("sm90_stages"),
    ::xla::ffi::StructMember<bool>("sm90_drawn_tasks"),
    ::xla::ffi::StructMember<bool>("sm90_rope_keys"),
    ::xla::ffi::StructMember<int32_t>("sm90_pingpong"),
    ::xla::ffi::StructMember<bool>("dependent_launch"));
