"""fp8 KV caches (float8_e4m3fn, float8_e5m2) beside an f16 / bf16 query, with
FlashInfer's k_scale / v_scale: every op against the float32 reference, which reads the
same fp8 values widened to float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_pagedattn as jpa
from jax_pagedattn import planning, primitives, reference, switches

from _helpers import (DTYPES, assert_attention_close, cache_in_form, check_native, oracle,
                      page_table, put, round_to)
from test_prefill import prefill_lengths

FP8 = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}


def fp8_cache(rng, num_pages, page_size, num_kv_heads, head_dim, fp8, scale):
  """K and V pages [P, S, H, D] as fp8 arrays holding x / scale for normal x, and the
  float32 values they hold (what the reference reads)."""
  shape = (num_pages, page_size, num_kv_heads, head_dim)
  out = []
  for _ in range(2):
    x = rng.standard_normal(shape, dtype=np.float32) / scale
    q = np.asarray(jnp.asarray(x).astype(FP8[fp8]))
    out += [q, np.asarray(jnp.asarray(q).astype(jnp.float32))]
  return out  # k8, k32, v8, v32


def _in_form(k8, v8, kv_layout, form):
  k, v = k8, v8
  if kv_layout == "HND":
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
  return (k, v) if form == "tuple" else np.ascontiguousarray(np.stack([k, v], axis=1))


CASES = [  # (op, fp8, q dtype, kv_layout, form, page_size, head_dim, heads)
    ("decode", "e4m3", "bf16", "NHD", "5d", 16, 128, (8, 2)),
    ("decode", "e5m2", "f16", "HND", "tuple", 1, 64, (4, 4)),
    ("decode", "e4m3", "f16", "HND", "5d", 8, 256, (12, 4)),
    ("decode-tc", "e4m3", "bf16", "NHD", "tuple", 16, 128, (8, 2)),
    ("prefill", "e4m3", "bf16", "NHD", "5d", 16, 128, (8, 2)),
    ("prefill-causal", "e5m2", "f16", "HND", "tuple", 8, 64, (12, 4)),
]


def _check_fp8_case(device, rng, op, fp8, qd, kv_layout, form, ps, d, heads, *,
                    pos="NONE", return_lse=True, long=False):
  """Runs `op` ("decode", "decode-tc", "prefill", "prefill-causal") on an fp8 cache with
  k_scale / v_scale and compares it with the float32 reference on the same fp8 values.
  `long`: contexts of thousands of keys, which the planner splits (checked)."""
  hq, hk = heads
  if op.startswith("decode"):
    kv_lens = np.array([3000, 1, 900, 0, 70]) if long else np.array([1, ps, 3 * ps + 1, 0, 70, 9])
    qo_lens = np.ones_like(kv_lens)
  elif long:
    qo_lens, kv_lens = np.array([5, 1, 3, 0]), np.array([3000, 900, 40, 20])
  else:
    qo_lens, kv_lens = prefill_lengths(rng, ps)
  qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
  table = page_table(rng, kv_lens, ps)
  k_scale, v_scale = 0.05, 0.02
  k8, k32, v8, v32 = fp8_cache(rng, table.num_pages, ps, hk, d, fp8, 1.0)
  cache = _in_form(k8, v8, kv_layout, form)
  q = round_to(rng.standard_normal((int(qo_indptr[-1]), hq, d), dtype=np.float32), DTYPES[qd])
  causal = op == "prefill-causal"
  with jax.default_device(device):
    if op.startswith("decode"):
      w = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout=kv_layout,
                                                 use_tensor_cores=op == "decode-tc")
      plan = w.plan(table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
                    pos_encoding_mode=pos, q_data_type=DTYPES[qd], kv_data_type=FP8[fp8])
    else:
      w = jpa.BatchPrefillWithPagedKVCacheWrapper(kv_layout=kv_layout)
      plan = w.plan(qo_indptr, table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
                    causal=causal, pos_encoding_mode=pos, q_data_type=DTYPES[qd],
                    kv_data_type=FP8[fp8])
    res = w.run(put(q.astype(np.dtype(DTYPES[qd])), device), put(cache, device),
                return_lse=return_lse, k_scale=k_scale, v_scale=v_scale)
  out, lse = res if return_lse else (res, None)
  if long:
    sections = planning.unpack_plan(plan.buffer, plan.config.caps)
    live = sections["work"][sections["work"][:, 0] >= 0]
    assert (live[:, 5] >= 0).any(), "precondition: the planner should have split a request"
  ref_out, ref_lse = oracle(q, k32, v32, qo_indptr, table, causal=causal, k_scale=k_scale,
                            v_scale=v_scale, pos_encoding_mode=pos)
  assert out.dtype == DTYPES[qd]
  # Compared at the scale of V's stored values (the output is v_scale times their mean).
  out = np.asarray(jnp.asarray(out, jnp.float32)) / v_scale
  what = str((op, fp8, qd, kv_layout, form, ps, d, heads, pos, return_lse, long))
  assert_attention_close(out, lse, ref_out / v_scale, ref_lse, qd, what=what)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_fp8_cache_matches_reference(platform, device, rng, case):
  """Every op on both backends; on the GPU the tensor-core ones (prefill, decode-tc) run
  with the fp8_tensor_cores switch on (off, they raise: see below)."""
  check_native(platform)
  with switches.overridden(fp8_tensor_cores=True):
    _check_fp8_case(device, rng, *case)


# The GPU's tensor-core kernel (prefill_kernel.cuh) on fp8 caches, behind the switch:
# (op, fp8, q dtype, kv_layout, form, page_size, head_dim, heads, pos, return_lse, long).
# Every head_dim at each tile (16 rows for decode-tc, 128 / 64 for prefill), page sizes
# 1 and 16, both layouts and forms, RoPE / ALiBi, with and without lse, and split-KV.
TC_CASES = [
    ("prefill", "e4m3", "bf16", "NHD", "5d", 16, 128, (8, 2), "NONE", True, False),
    ("prefill-causal", "e5m2", "f16", "HND", "tuple", 1, 64, (12, 4), "NONE", True, False),
    ("prefill-causal", "e4m3", "f16", "NHD", "tuple", 16, 256, (8, 2), "ROPE_LLAMA", False, False),
    ("prefill", "e5m2", "bf16", "HND", "5d", 16, 64, (32, 4), "ALIBI", True, False),
    ("prefill-causal", "e4m3", "bf16", "HND", "5d", 1, 128, (4, 4), "ALIBI", False, False),
    ("prefill", "e4m3", "f16", "NHD", "5d", 1, 256, (16, 2), "ROPE_LLAMA", True, False),
    ("prefill-causal", "e4m3", "bf16", "NHD", "tuple", 16, 64, (8, 2), "ROPE_LLAMA", True, False),
    ("prefill-causal", "e5m2", "bf16", "NHD", "5d", 16, 128, (8, 2), "NONE", True, True),
    ("prefill", "e4m3", "f16", "HND", "tuple", 16, 256, (8, 2), "NONE", True, True),
    ("prefill", "e5m2", "f16", "NHD", "tuple", 1, 64, (4, 4), "ALIBI", True, True),
    ("decode-tc", "e4m3", "bf16", "NHD", "tuple", 16, 128, (8, 2), "NONE", True, False),
    ("decode-tc", "e5m2", "f16", "HND", "5d", 1, 64, (12, 4), "ROPE_LLAMA", True, False),
    ("decode-tc", "e4m3", "f16", "NHD", "5d", 16, 256, (16, 2), "ALIBI", False, False),
    ("decode-tc", "e5m2", "bf16", "HND", "tuple", 16, 128, (4, 4), "NONE", True, True),
    ("decode-tc", "e4m3", "bf16", "NHD", "5d", 1, 256, (8, 2), "ROPE_LLAMA", True, True),
]


@pytest.mark.parametrize("case", TC_CASES, ids=lambda c: "-".join(map(str, c)))
def test_fp8_on_the_tensor_core_kernel(platform, device, rng, case):
  """fp8 K/V on the GPU's tensor-core kernel (switch on) against the float32 reference."""
  if platform != "gpu":
    pytest.skip("a GPU kernel's grid (the CPU backend: test_fp8_cache_matches_reference)")
  check_native(platform)
  op, fp8, qd, kv_layout, form, ps, d, heads, pos, return_lse, long = case
  with switches.overridden(fp8_tensor_cores=True):
    _check_fp8_case(device, rng, op, fp8, qd, kv_layout, form, ps, d, heads, pos=pos,
                    return_lse=return_lse, long=long)


# The CUDA-core decode kernel on fp8 caches: wide tiles (16 fp8 values a 16-byte copy,
# 4096 / D keys a tile) at head_dim 128 and 256, 8-byte-chunk tiles at 64. With the
# decode cases of CASES (test_fp8_cache_matches_reference runs them on the GPU too), a
# grid of both formats x f16/bf16 x every head_dim x every tile of rows (groups 1-8: R
# 1, 2, 4, 8), both layouts and forms, page 1/16, RoPE / ALiBi, with and without lse,
# and split-KV.
# (fp8, q dtype, kv_layout, form, page_size, head_dim, heads, pos, return_lse, long)
DECODE_CASES = [
    ("e4m3", "bf16", "NHD", "5d", 16, 128, (64, 8), "NONE", True, False),
    ("e5m2", "bf16", "HND", "tuple", 16, 128, (4, 4), "NONE", False, False),
    ("e4m3", "f16", "NHD", "tuple", 1, 128, (8, 4), "ROPE_LLAMA", True, True),
    ("e5m2", "f16", "HND", "5d", 16, 256, (32, 4), "ALIBI", True, True),
    ("e4m3", "bf16", "HND", "tuple", 1, 256, (2, 2), "ROPE_LLAMA", True, False),
    ("e5m2", "bf16", "NHD", "5d", 16, 256, (16, 4), "NONE", False, True),
    ("e4m3", "f16", "NHD", "5d", 16, 128, (16, 2), "ALIBI", True, False),
    ("e5m2", "f16", "NHD", "tuple", 16, 64, (8, 1), "NONE", True, True),
    ("e4m3", "bf16", "HND", "5d", 1, 64, (8, 4), "ROPE_LLAMA", True, False),
    ("e5m2", "f16", "NHD", "tuple", 16, 64, (16, 4), "ALIBI", False, True),
    ("e4m3", "f16", "HND", "tuple", 16, 256, (4, 2), "NONE", True, False),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_fp8_decode_on_the_cuda_core_kernel(platform, device, rng, case):
  """fp8 decode on the CUDA-core kernel's tiles against the float32 reference."""
  if platform != "gpu":
    pytest.skip("a GPU kernel's grid (the CPU backend: test_fp8_cache_matches_reference)")
  check_native(platform)
  fp8, qd, kv_layout, form, ps, d, heads, pos, return_lse, long = case
  _check_fp8_case(device, rng, "decode", fp8, qd, kv_layout, form, ps, d, heads, pos=pos,
                  return_lse=return_lse, long=long)


@pytest.mark.parametrize("op", ["prefill", "decode-tc"])
def test_fp8_tensor_core_paths_say_so_on_the_gpu(device, platform, rng, op):
  """On the GPU, fp8 caches on the tensor-core kernel wait for the fp8_tensor_cores switch:
  without it, prefill and use_tensor_cores decode raise a NotImplementedError naming
  kv_data_type and the switch when lowered, before any kernel runs."""
  if platform != "gpu":
    pytest.skip("the CPU backend runs every op on fp8 caches")
  table = page_table(rng, np.array([5]), 4)
  k8, _, v8, _ = fp8_cache(rng, table.num_pages, 4, 2, 64, "e4m3", 1.0)
  with jax.default_device(device), switches.overridden(fp8_tensor_cores=False):
    if op == "prefill":
      w = jpa.BatchPrefillWithPagedKVCacheWrapper()
      w.plan(np.array([0, 1], np.int32), table.indptr, table.indices, table.last_page_len, 4,
             2, 64, 4, q_data_type=jnp.bfloat16, kv_data_type=jnp.float8_e4m3fn)
    else:
      w = jpa.BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=True)
      w.plan(table.indptr, table.indices, table.last_page_len, 4, 2, 64, 4,
             q_data_type=jnp.bfloat16, kv_data_type=jnp.float8_e4m3fn)
    with pytest.raises(NotImplementedError, match="kv_data_type.*JAX_PAGEDATTN_FP8_TENSOR_CORES"):
      w.run(jnp.zeros((1, 4, 64), jnp.bfloat16), _in_form(k8, v8, "NHD", "5d"))


def test_the_cuda_lowering_gates_fp8_tensor_cores_on_the_plan():
  """The CUDA lowering's gate reads the plan's fp8_tensor_cores (fixed by the switch when
  the plan was made), so the check runs here on the CPU too: off, a tensor-core fp8 plan
  raises before any lowering; a CUDA-core decode plan never does."""
  w = jpa.BatchPrefillWithPagedKVCacheWrapper()
  args = (np.array([0, 1], np.int32), np.array([0, 1], np.int32), np.array([0], np.int32),
          np.array([1], np.int32), 4, 2, 64, 16)
  with switches.overridden(fp8_tensor_cores=False):
    off = w.plan(*args, q_data_type=jnp.bfloat16, kv_data_type=jnp.float8_e5m2).config
  with switches.overridden(fp8_tensor_cores=True):
    on = w.plan(*args, q_data_type=jnp.bfloat16, kv_data_type=jnp.float8_e5m2).config
  assert (off.fp8_tensor_cores, on.fp8_tensor_cores) == (False, True)
  with pytest.raises(NotImplementedError, match="JAX_PAGEDATTN_FP8_TENSOR_CORES"):
    primitives._cuda_attention_lowering(None, config=off, combined=True)


def test_k_and_v_scales_on_a_16_bit_cache(rng):
  """The scales are FlashInfer's run() arguments for any cache: logits use
  sm_scale * k_scale, the output is multiplied by v_scale; traced under jit."""
  ps, hq, hk, d = 8, 4, 2, 64
  table = page_table(rng, np.array([20, 7]), ps)
  shape = (table.num_pages, ps, hk, d)
  k = rng.standard_normal(shape, dtype=np.float32)
  v = rng.standard_normal(shape, dtype=np.float32)
  q = rng.standard_normal((2, hq, d), dtype=np.float32)
  w = jpa.BatchDecodeWithPagedKVCacheWrapper()
  plan = w.plan(table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
                q_data_type=jnp.float32)
  step = jax.jit(lambda q, c, p, ks, vs: w.run(q, c, plan=p, k_scale=ks, v_scale=vs))
  for ks, vs in ((0.5, 3.0), (2.0, 1.0)):
    got = step(q, cache_in_form(k, v, "f32", "NHD", "5d"), plan, jnp.float32(ks), jnp.float32(vs))
    ref, _ = oracle(q, k, v, np.arange(3, dtype=np.int32), table, k_scale=ks, v_scale=vs)
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5 * vs, rtol=2e-5)


@pytest.mark.parametrize("fp8", ["e4m3", "e5m2"])
def test_append_into_an_fp8_cache(platform, device, rng, fp8):
  """append_paged_kv_cache writes rows given in the cache's fp8 type as they are, and
  rows given wider rounded (saturating) to it, as the reference's scatter of the same."""
  check_native(platform)
  ps, hk, d = 4, 2, 64
  table = page_table(rng, np.array([6, 9]), ps)
  k8, _, v8, _ = fp8_cache(rng, table.num_pages, ps, hk, d, fp8, 1.0)
  cache = _in_form(k8, v8, "NHD", "5d")
  bi = np.array([0, 1, 1, -1], np.int32)
  pos = np.array([5, 7, 8, -1], np.int32)
  # Wide rows, some beyond the fp8 range: they saturate.
  new_k = (rng.standard_normal((4, hk, d), dtype=np.float32) * 100.0).astype(jnp.bfloat16)
  new_v = rng.standard_normal((4, hk, d), dtype=np.float32).astype(np.dtype(FP8[fp8]))
  with jax.default_device(device):
    got = jpa.append_paged_kv_cache(put(new_k, device), put(new_v, device), bi, pos,
                                    put(cache, device), table.indices, table.indptr,
                                    table.last_page_len)
  top = float(jnp.finfo(FP8[fp8]).max)
  want_k = jnp.clip(jnp.asarray(new_k, jnp.float32), -top, top).astype(FP8[fp8])
  want = reference.append_paged_kv_cache(want_k, new_v, bi, pos, cache, table.indices,
                                         table.indptr, table.last_page_len)
  assert got.dtype == FP8[fp8]
  np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))
  assert np.isfinite(np.asarray(got).astype(np.float32)).all()


def test_fp8_bad_input():
  w = jpa.BatchDecodeWithPagedKVCacheWrapper()
  args = (np.array([0, 1], np.int32), np.array([0], np.int32), np.array([3], np.int32), 4, 2,
          64, 16)
  with pytest.raises(TypeError, match="kv_data_type"):
    w.plan(*args, q_data_type=jnp.float32, kv_data_type=jnp.float8_e4m3fn)
  with pytest.raises(TypeError, match="kv_data_type"):
    w.plan(*args, q_data_type=jnp.bfloat16, kv_data_type=jnp.float16)
  w.plan(*args, q_data_type=jnp.bfloat16, kv_data_type="float8_e5m2")
  q = jnp.zeros((1, 4, 64), jnp.bfloat16)
  cache = jnp.zeros((1, 2, 16, 2, 64), jnp.float8_e5m2)
  with pytest.raises(ValueError, match="k_scale"):
    w.run(q, cache, k_scale=jnp.ones(3))
  with pytest.raises(TypeError, match="v_scale"):
    w.run(q, cache, v_scale=jnp.ones((), jnp.int32))
  with pytest.raises(TypeError, match="kv_data_type"):  # a bf16 cache for an fp8 plan
    w.run(q, cache.astype(jnp.bfloat16))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float8_e5m2, jnp.float8_e4m3fn])
def test_subnormal_cache_values_are_read_exactly(rng, dtype):
  """Cache values below the type's normal range (fp8 subnormals are common) are widened
  exactly on the CPU, whose XLA threads run with denormals-are-zero: a single-key request
  returns its V row times v_scale."""
  tiny = float(jnp.finfo(dtype).smallest_normal)
  ps, hk, d = 4, 1, 64
  table = page_table(rng, np.array([1]), ps)
  steps = rng.integers(1, 4, size=(table.num_pages, ps, hk, d))  # a few subnormal steps
  sign = rng.choice([-1.0, 1.0], size=steps.shape)
  v = np.asarray(jnp.asarray(sign * steps * tiny / 4, jnp.float32).astype(dtype))
  assert (np.abs(v.astype(np.float32)) < tiny).all() and (v.astype(np.float32) != 0).all()
  k = np.zeros_like(v)
  q_dtype = jnp.float16 if dtype == jnp.float16 else jnp.bfloat16
  w = jpa.BatchDecodeWithPagedKVCacheWrapper()
  w.plan(table.indptr, table.indices, table.last_page_len, 1, hk, d, ps, q_data_type=q_dtype,
         kv_data_type=dtype)
  out = w.run(jnp.ones((1, 1, d), q_dtype), _in_form(k, v, "NHD", "5d"), v_scale=2.0 / tiny)
  want = v[table.indices[0], 0, 0].astype(np.float32) * 2.0 / tiny
  np.testing.assert_allclose(np.asarray(out, np.float32)[0, 0], want, rtol=1e-2)
