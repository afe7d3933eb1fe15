"""BatchDecodeWithPagedKVCacheWrapper against the float32 jax.numpy oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_pagedattn as jpa
from jax_pagedattn import planning, switches

from _helpers import (DTYPES, split_run_result, assert_attention_close, cache_in_form, check_native, oracle,
                      page_table, put, random_cache, round_to, varied_lengths)


def _decode(device, kv_layout, page_size, num_kv_heads, table, cache, q, *, return_lse,
            tensor_cores=False, **plan_kw):
  """Plans and runs one decode batch on `device`; returns (out, lse or None)."""
  with jax.default_device(device):
    w = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout=kv_layout,
                                               use_tensor_cores=tensor_cores)
    w.plan(table.indptr, table.indices, table.last_page_len, q.shape[1], num_kv_heads,
           q.shape[2], page_size, q_data_type=q.dtype, **plan_kw)
    res = w.run(put(q, device), put(cache, device), return_lse=return_lse)
  return split_run_result(res, return_lse)


@pytest.mark.grid("decode")
def test_decode_matches_reference(platform, case, device, rng):
  check_native(platform)
  hq, hk = case.heads
  dt = DTYPES[case.dtype]
  batch = 9
  kv_lens = varied_lengths(rng, case.page_size, batch, max_len=160)
  table = page_table(rng, kv_lens, case.page_size)
  k, v = random_cache(rng, table.num_pages, case.page_size, hk, case.head_dim, case.dtype)
  cache = cache_in_form(k, v, case.dtype, case.kv_layout, case.form)
  q = round_to(rng.standard_normal((batch, hq, case.head_dim), dtype=np.float32), dt)
  out, lse = _decode(device, case.kv_layout, case.page_size, hk, table, cache,
                     q.astype(np.dtype(dt)), return_lse=case.return_lse,
                     tensor_cores=case.tensor_cores, pos_encoding_mode=case.pos)
  assert out.dtype == dt and out.shape == q.shape
  assert out.devices() == {device}
  ref_out, ref_lse = oracle(q, k, v, np.arange(batch + 1), table, pos_encoding_mode=case.pos)
  assert np.isneginf(ref_lse).any() and np.isfinite(ref_lse).any()  # both kinds of rows present
  assert_attention_close(out, lse, ref_out, ref_lse, case.dtype, out_tol=case.out_tol,
                         what=case.id)


def _run_random_batch(device, rng, kv_lens, dtype, *, heads, head_dim, page_size, kv_layout,
                      form, tensor_cores):
  """Random cache and queries for requests of `kv_lens` keys, planned and run on
  `device`. Returns (plan sections, (out, lse), oracle's (out, lse))."""
  hq, hk = heads
  table = page_table(rng, kv_lens, page_size)
  k, v = random_cache(rng, table.num_pages, page_size, hk, head_dim, dtype)
  cache = cache_in_form(k, v, dtype, kv_layout, form)
  dt = np.dtype(DTYPES[dtype])
  q = round_to(rng.standard_normal((len(kv_lens), hq, head_dim), dtype=np.float32), DTYPES[dtype])
  with jax.default_device(device):
    w = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout=kv_layout, use_tensor_cores=tensor_cores)
    plan = w.plan(table.indptr, table.indices, table.last_page_len, hq, hk, head_dim, page_size,
                  q_data_type=dt)
    got = w.run(put(q.astype(dt), device), put(cache, device), return_lse=True)
  want = oracle(q, k, v, np.arange(len(kv_lens) + 1), table)
  return planning.unpack_plan(plan.buffer, plan.config.caps), got, want


def _cut_requests(sections):
  """Whether some live item is a piece of a split request."""
  live = sections["work"][sections["work"][:, 0] >= 0]
  return bool((live[:, 5] >= 0).any())


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("tensor_cores", [False, True])
def test_decode_split_kv(platform, device, rng, dtype, tensor_cores):
  """A long request next to short ones: the planner splits its keys and the merge
  pass combines the partials (checked through the plan, so this cannot pass
  vacuously)."""
  check_native(platform)
  if dtype == "f32" and platform != "cpu":
    pytest.skip("f32 is CPU-only")
  sections, (out, lse), (ref_out, ref_lse) = _run_random_batch(
      device, rng, np.array([3000, 5, 0, 17, 700]), dtype, heads=(8, 1), head_dim=128,
      page_size=16, kv_layout="NHD", form="5d", tensor_cores=tensor_cores)
  assert _cut_requests(sections), "precondition: the planner should have split request 0"
  assert_attention_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("tensor_cores", [False, True])
def test_decode_bins_of_many_items(platform, device, rng, tensor_cores):
  """Few bins for many requests: every CTA runs a long run of items back to back, whole
  requests and pieces of cut ones mixed, so the shared memory handed from one item to
  the next must be clean (checked through the plan, so this cannot pass vacuously)."""
  check_native(platform)
  dtype = "bf16" if platform == "gpu" else "f32"
  # One CTA per SM on the GPU: 132 / 4 heads = 33 bins for 300 requests.
  kv_lens = rng.integers(0, 300, size=300)
  kv_lens[[3, 150]] = [4000, 2500]  # two long requests that must be cut
  with switches.overridden(ctas_per_sm=1):
    sections, (out, lse), (ref_out, ref_lse) = _run_random_batch(
        device, rng, kv_lens, dtype, heads=(16, 4), head_dim=64, page_size=8, kv_layout="HND",
        form="tuple", tensor_cores=tensor_cores)
  assert np.diff(sections["bin_indptr"]).max() >= 4, "precondition: bins should hold several items"
  if platform == "gpu":  # the CPU has too few bins for a 4000-key request to overrun one
    assert _cut_requests(sections), "precondition: the long requests should be cut"
  assert_attention_close(out, lse, ref_out, ref_lse, dtype)


def test_decode_custom_scales(platform, device, rng):
  """sm_scale, rope_scale and rope_theta reach the kernel (defaults would differ)."""
  check_native(platform)
  dtype = "f16"
  hq, hk, d, ps = 8, 2, 64, 8
  kv_lens = np.array([37, 8, 1, 90])
  table = page_table(rng, kv_lens, ps)
  k, v = random_cache(rng, table.num_pages, ps, hk, d, dtype)
  cache = cache_in_form(k, v, dtype, "HND", "tuple")
  q = round_to(rng.standard_normal((4, hq, d), dtype=np.float32), jnp.float16)
  for mode in ("NONE", "ROPE_LLAMA", "ALIBI"):
    kw = dict(pos_encoding_mode=mode, sm_scale=0.3, rope_scale=2.5, rope_theta=5e5)
    out, lse = _decode(device, "HND", ps, hk, table, cache,
                       q.astype(np.float16), return_lse=True, **kw)
    ref_out, ref_lse = oracle(q, k, v, np.arange(5), table, **kw)
    assert_attention_close(out, lse, ref_out, ref_lse, dtype, what=mode)
    # Guard against a test that would pass with the defaults as well.
    dflt_out, _ = oracle(q, k, v, np.arange(5), table, pos_encoding_mode=mode)
    assert np.abs(dflt_out - ref_out).max() > 1e-2


def test_decode_ignores_cache_outside_its_pages(platform, device, rng):
  """NaN in every page no request owns and in every slot past a request's last key
  must not reach the output: kernels may load whole pages but must not let
  unowned slots contribute (0 * NaN is NaN)."""
  check_native(platform)
  dtype, hq, hk, d, ps = "bf16", 8, 2, 128, 16
  kv_lens = np.array([1, 17, 40, 0, 100])
  table = page_table(rng, kv_lens, ps, spare_pages=4)
  k, v = random_cache(rng, table.num_pages, ps, hk, d, dtype)
  owned = np.zeros((table.num_pages, ps), bool)
  for b in range(len(kv_lens)):
    pages = table.indices[table.indptr[b]:table.indptr[b + 1]]
    for j in range(int(kv_lens[b])):
      owned[pages[j // ps], j % ps] = True
  k[~owned] = np.nan
  v[~owned] = np.nan
  cache = cache_in_form(k, v, dtype, "NHD", "5d")
  q = round_to(rng.standard_normal((len(kv_lens), hq, d), dtype=np.float32), jnp.bfloat16)
  out, lse = _decode(device, "NHD", ps, hk, table, cache,
                     q.astype(jnp.bfloat16), return_lse=True)
  ref_out, ref_lse = oracle(q, np.nan_to_num(k), np.nan_to_num(v), np.arange(len(kv_lens) + 1),
                            table)
  assert_attention_close(out, lse, ref_out, ref_lse, dtype)


def test_decode_lowers_to_native_handler(platform, device, rng):
  """The jitted decode's HLO calls the native FFI target of the platform."""
  check_native(platform)
  hq, hk, d, ps = 4, 4, 64, 8
  table = page_table(rng, [5, 9], ps)
  k, v = random_cache(rng, table.num_pages, ps, hk, d, "bf16")
  cache = put(cache_in_form(k, v, "bf16", "NHD", "5d"), device)
  q = put(np.ones((2, hq, d), jnp.bfloat16), device)
  with jax.default_device(device):
    for tc, target in ((False, "jax_pagedattn_decode"), (True, "jax_pagedattn_prefill")):
      w = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout="NHD", use_tensor_cores=tc)
      plan = w.plan(table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
                    q_data_type="bfloat16")
      text = jax.jit(lambda q, c, p: w.run(q, c, plan=p)).lower(q, cache, plan).as_text()
      assert target in text, f"use_tensor_cores={tc}: {target} not in the lowered HLO"


def test_decode_batch_padding_under_jit(platform, device, rng):
  """Under jit q may have more rows than the batch (up to max_batch_size): those rows
  come back exactly 0 with lse -inf."""
  check_native(platform)
  dtype, hq, hk, d, ps = "f16", 16, 2, 64, 8
  kv_lens = np.array([12, 1, 33])
  table = page_table(rng, kv_lens, ps)
  k, v = random_cache(rng, table.num_pages, ps, hk, d, dtype)
  cache = cache_in_form(k, v, dtype, "NHD", "tuple")
  rows = 8
  q = round_to(rng.standard_normal((rows, hq, d), dtype=np.float32), jnp.float16)
  with jax.default_device(device):
    w = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout="NHD", max_batch_size=rows)
    plan = w.plan(table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
                  q_data_type="float16")
    step = jax.jit(lambda q, c, p: w.run(q, c, return_lse=True, plan=p))
    out, lse = step(put(q.astype(np.float16), device), put(cache, device), plan)
  ref_out, ref_lse = oracle(q, k, v, np.arange(4), table)  # rows 3.. are padding
  assert np.isneginf(ref_lse[3:]).all()
  assert_attention_close(out, lse, ref_out, ref_lse, dtype)
