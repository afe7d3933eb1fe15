"""JAX primitives for the paged-attention ops: abstract evaluation and lowerings.

Every `jax.extend` / `jax.interpreters` import of the package lives here, so version
differences stay in one file. Each op lowers to the native FFI target of the platform
when this build has one (`jax_pagedattn_<op>` on cpu and cuda), and otherwise to the
jax.numpy reference, so the API works everywhere; tests say which path ran.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jax_pagedattn import layout as layout_lib
from jax_pagedattn import planning, reference
from jax_pagedattn._ext import NATIVE_TARGETS

ShapedArray = jax.core.ShapedArray

decode_p = Primitive("jax_pagedattn_decode")
prefill_p = Primitive("jax_pagedattn_prefill")
append_p = Primitive("jax_pagedattn_append")
for _p in (decode_p, prefill_p, append_p):
  _p.multiple_results = True


# ---------------------------------------------------------------------------------------
# attention (decode and prefill share operands; they differ in the kernel behind them)

def _attention_abstract_eval(q, k_cache, v_cache, plan, sinks, scales, *,
                             config: planning.PlanConfig, combined: bool):
  if q.ndim != 3 or q.shape[1] != config.num_qo_heads or q.shape[2] != config.head_dim:
    raise ValueError(f"q must have shape [tokens, num_qo_heads={config.num_qo_heads}, "
                     f"head_dim={config.head_dim}] as planned, got {tuple(q.shape)}")
  if q.shape[0] > config.caps.tokens:
    raise ValueError(f"q has {q.shape[0]} rows, more than the plan's token capacity "
                     f"{config.caps.tokens} (max_batch_size / max_num_tokens)")
  if jnp.dtype(q.dtype).name != config.q_dtype:
    raise TypeError(f"q has dtype {jnp.dtype(q.dtype).name} but the plan was made for "
                    f"q_data_type={config.q_dtype}")
  cache = k_cache if combined else (k_cache, v_cache)
  info = layout_lib.inspect_cache(cache, config.kv_layout)
  if info.dtype.name != config.kv_dtype:
    raise TypeError(f"paged_kv_cache has dtype {info.dtype.name} but the plan was made for "
                    f"kv_data_type={config.kv_dtype}")
  if (info.page_size, info.num_kv_heads, info.head_dim) != (config.page_size, config.num_kv_heads, config.head_dim):
    raise ValueError(
        f"paged_kv_cache shape {tuple(k_cache.shape)} does not match the plan for kv_layout="
        f"{config.kv_layout!r}: expected page_size={config.page_size}, num_kv_heads="
        f"{config.num_kv_heads}, head_dim={config.head_dim}")
  want = planning.plan_sections(config.caps)["size"]
  if plan.shape != (want,) or plan.dtype != jnp.int32:
    raise ValueError(f"plan buffer must be int32[{want}] for these capacities, got {plan.dtype}{list(plan.shape)}")
  if sinks.dtype != jnp.float32 or sinks.shape not in ((0,), (config.num_qo_heads,)):
    raise ValueError(f"sinks must be float32[num_qo_heads={config.num_qo_heads}] (or [0] for "
                     f"none), got {sinks.dtype}{list(sinks.shape)}")
  if scales.dtype != jnp.float32 or scales.shape not in ((0,), (2,)):
    raise ValueError(f"scales must be float32[2] (k_scale, v_scale) or [0] for none, got "
                     f"{scales.dtype}{list(scales.shape)}")
  return (ShapedArray(q.shape, q.dtype), ShapedArray(q.shape[:2], jnp.float32),
          ShapedArray((config.workspace_bytes,), jnp.uint8))


def _native_attention_lowering(ctx, q, k_cache, v_cache, plan, sinks, scales, *, config,
                               combined):
  rule = jax.ffi.ffi_lowering(config.target)
  return rule(ctx, q, k_cache, v_cache, plan, sinks, scales, **planning.ffi_attrs(config),
              combined=np.bool_(combined))


def _cuda_attention_lowering(ctx, *args, config, combined):
  # fp8 caches on the tensor-core kernel (prefill, use_tensor_cores decode) unless the
  # fp8_tensor_cores switch, fixed in the plan, turned them off. Said here, before any kernel.
  if (config.kv_dtype in planning.FP8_KV_DTYPES and config.target != "jax_pagedattn_decode"
      and not config.fp8_tensor_cores):
    raise NotImplementedError(
        f"kv_data_type={config.kv_dtype} on the GPU's tensor-core kernel (prefill, "
        f"use_tensor_cores=True decode) was turned off by JAX_PAGEDATTN_FP8_TENSOR_CORES=0 "
        f"(switches.fp8_tensor_cores) when the plan was made; unset it, or use "
        f"BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=False) or a float16 / bfloat16 "
        f"cache")
  return _native_attention_lowering(ctx, *args, config=config, combined=combined)


def _reference_attention(q, k_cache, v_cache, plan, sinks, scales, *, config, combined):
  """The jax.numpy lowering for platforms without native handlers: same operands."""
  sections = planning.plan_sections(config.caps)
  take = lambda name: plan[sections[name][0]:sections[name][0] + sections[name][1]]
  k_pages, v_pages = layout_lib.to_nhd_pages(k_cache, v_cache, combined, config.kv_layout)
  meta = take("meta")
  out, lse = reference.batch_attention_masked(
      q, k_pages, v_pages, take("qo_indptr"), take("kv_indptr"), take("kv_indices"),
      take("kv_last_page_len"), meta[1], page_size=config.page_size, causal=config.causal,
      pos_encoding_mode=config.pos_encoding_mode, sm_scale=config.sm_scale,
      rope_scale=config.rope_scale, rope_theta=config.rope_theta,
      logits_soft_cap=config.logits_soft_cap, window_left=config.window_left,
      sinks=sinks if sinks.shape[0] else None,
      k_scale=scales[0] if scales.shape[0] else None,
      v_scale=scales[1] if scales.shape[0] else None)
  return out.astype(q.dtype), lse, jnp.zeros((config.workspace_bytes,), jnp.uint8)


# ---------------------------------------------------------------------------------------
# append

def _append_abstract_eval(new_k, new_v, batch_indices, positions, kv_indices, kv_indptr, *caches,
                          kv_layout, combined):
  cache = caches[0] if combined else tuple(caches)
  info = layout_lib.inspect_cache(cache, kv_layout)
  want = (info.num_kv_heads, info.head_dim)
  for name, x in (("append_key", new_k), ("append_value", new_v)):
    if x.ndim != 3 or tuple(x.shape[1:]) != want:
      raise ValueError(f"{name} must be [rows, num_kv_heads={want[0]}, head_dim={want[1]}] "
                       f"to match paged_kv_cache, got {tuple(x.shape)}")
    if x.dtype != info.dtype:
      raise TypeError(f"{name} has dtype {x.dtype}, but paged_kv_cache has {info.dtype}")
  if new_v.shape != new_k.shape:
    raise ValueError(f"append_value shape {tuple(new_v.shape)} != append_key shape {tuple(new_k.shape)}")
  for name, x, n in (("batch_indices", batch_indices, new_k.shape[0]), ("positions", positions, new_k.shape[0]),
                     ("kv_indices", kv_indices, None), ("kv_indptr", kv_indptr, None)):
    if x.ndim != 1 or x.dtype != jnp.int32 or (n is not None and x.shape[0] != n):
      extra = f" with {n} entries (one per appended row)" if n is not None else ""
      raise ValueError(f"{name} must be a 1-D int32 array{extra}, got {x.dtype}{list(x.shape)}")
  if kv_indptr.shape[0] < 1:
    raise ValueError("kv_indptr must have batch_size + 1 >= 1 entries")
  return tuple(ShapedArray(c.shape, c.dtype) for c in caches)


def _native_append_lowering(ctx, *args, kv_layout, combined):
  num_caches = 1 if combined else 2
  first = len(args) - num_caches
  caches = args[first:]
  info_aval = ctx.avals_in[first]
  cache_aval = info_aval if combined else (ctx.avals_in[first], ctx.avals_in[first + 1])
  info = layout_lib.inspect_cache(cache_aval, kv_layout)
  target = "jax_pagedattn_append" if combined else "jax_pagedattn_append_kv"
  rule = jax.ffi.ffi_lowering(target, operand_output_aliases={first + i: i for i in range(len(caches))})
  return rule(ctx, *args, page_size=np.int32(info.page_size),
              kv_layout=np.int32(layout_lib.KV_LAYOUT_CODE[kv_layout]),
              num_kv_heads=np.int32(info.num_kv_heads), head_dim=np.int32(info.head_dim))


def _reference_append(new_k, new_v, batch_indices, positions, kv_indices, kv_indptr, *caches,
                      kv_layout, combined):
  """The jax.numpy oracle's scatter, which skips rows outside the pages they own as the
  native kernels do."""
  cache = caches[0] if combined else tuple(caches)
  out = reference.append_paged_kv_cache(new_k, new_v, batch_indices, positions, cache,
                                        kv_indices, kv_indptr, kv_layout=kv_layout)
  return (out,) if combined else tuple(out)


# ---------------------------------------------------------------------------------------
# registration

def _eager_impl(prim):
  """Eager calls run the primitive through one cached jit per parameter set."""

  @functools.partial(jax.jit, static_argnums=(0,))
  def run(params, *args):
    return prim.bind(*args, **dict(params))

  return lambda *args, **params: run(tuple(sorted(params.items())), *args)


def _no_vmap(name):
  def rule(*args, **kwargs):
    raise NotImplementedError(
        f"{name} does not support vmap: a paged batch is already batched; put the requests "
        f"of all vmapped instances into one plan (one request axis) instead")
  return rule


def _no_grad(name):
  def rule(*args, **kwargs):
    raise NotImplementedError(f"{name} is not differentiable: paged attention here is an "
                              f"inference op (no backward kernels)")
  return rule


# The FFI targets each primitive may lower to (tensor-core decode uses the prefill one).
_TARGETS = {
    decode_p: ("jax_pagedattn_decode", "jax_pagedattn_prefill"),
    prefill_p: ("jax_pagedattn_prefill",),
    append_p: ("jax_pagedattn_append", "jax_pagedattn_append_kv"),
}


def _has_native(prim, platform: str) -> bool:
  return all((platform, t) in NATIVE_TARGETS for t in _TARGETS[prim])


# (primitive, abstract eval, {platform: native lowering}, jax.numpy lowering)
_ATTENTION_NATIVE = {"cpu": _native_attention_lowering, "cuda": _cuda_attention_lowering}
_APPEND_NATIVE = {"cpu": _native_append_lowering, "cuda": _native_append_lowering}
for _prim, _abstract, _natives, _ref in (
    (decode_p, _attention_abstract_eval, _ATTENTION_NATIVE, _reference_attention),
    (prefill_p, _attention_abstract_eval, _ATTENTION_NATIVE, _reference_attention),
    (append_p, _append_abstract_eval, _APPEND_NATIVE, _reference_append),
):
  _prim.def_abstract_eval(_abstract)
  _prim.def_impl(_eager_impl(_prim))
  mlir.register_lowering(_prim, mlir.lower_fun(_ref, multiple_results=True))
  for _platform in ("cpu", "cuda"):
    if _has_native(_prim, _platform):
      mlir.register_lowering(_prim, _natives[_platform], platform=_platform)
  batching.primitive_batchers[_prim] = _no_vmap(_prim.name)
  ad.primitive_jvps[_prim] = _no_grad(_prim.name)


def native_platforms() -> tuple[str, ...]:
  """Platforms whose lowering of every op is a native handler (others use jax.numpy)."""
  return tuple(p for p in ("cpu", "cuda") if all(_has_native(prim, p) for prim in _TARGETS))
