"""The jax.numpy lowerings that platforms without native handlers use.

On the CPU and the GPU the native handlers take over, so these rules are called here
directly under jit, with the same operands the FFI targets get (the plan buffer
included): they must agree with the oracle and skip what the kernels skip.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import jax_pagedattn as jpa
from jax_pagedattn import layout as layout_lib
from jax_pagedattn import primitives, reference

from _helpers import (DTYPES, assert_attention_close, cache_in_form, cpu, oracle, page_table,
                      random_cache, round_to, varied_lengths)


def _fallback_attention(q, cache, plan, sinks=None):
  info = layout_lib.inspect_cache(cache, plan.config.kv_layout)
  k_op, v_op = layout_lib.cache_operands(cache)
  rule = functools.partial(primitives._reference_attention, config=plan.config,  # noqa: SLF001
                           combined=info.combined)
  sinks = np.zeros((0,), np.float32) if sinks is None else sinks
  out, lse, _ = jax.jit(rule)(q, k_op, v_op, plan.buffer, sinks, np.zeros((0,), np.float32))
  return out, lse


@pytest.mark.parametrize("kv_layout,form,mode", [("HND", "5d", "ROPE_LLAMA"),
                                                 ("NHD", "tuple", "ALIBI")])
def test_fallback_decode_matches_oracle(rng, kv_layout, form, mode):
  hq, hk, d, ps = 8, 2, 64, 4
  kv_lens = varied_lengths(rng, ps, 7, max_len=60)
  table = page_table(rng, kv_lens, ps)
  k, v = random_cache(rng, table.num_pages, ps, hk, d, "f32")
  q = round_to(rng.standard_normal((7, hq, d), dtype=np.float32), DTYPES["f32"])
  with jax.default_device(cpu()):
    w = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout=kv_layout)
    plan = w.plan(table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
                  pos_encoding_mode=mode, q_data_type=np.float32)
    out, lse = _fallback_attention(q, cache_in_form(k, v, "f32", kv_layout, form), plan)
  ref_out, ref_lse = oracle(q, k, v, np.arange(8, dtype=np.int32), table, pos_encoding_mode=mode)
  assert_attention_close(out, lse, ref_out, ref_lse, "f32", what=f"fallback decode {mode}")


def test_fallback_prefill_with_padding_rows_matches_oracle(rng):
  hq, hk, d, ps = 4, 4, 64, 8
  kv_lens = np.array([17, 0, 40, 8])
  qo_lens = np.array([5, 3, 1, 8])
  qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
  table = page_table(rng, kv_lens, ps)
  k, v = random_cache(rng, table.num_pages, ps, hk, d, "f32")
  rows = int(qo_indptr[-1]) + 3  # padding rows, as a jitted step with a bucketed q has
  q = round_to(rng.standard_normal((rows, hq, d), dtype=np.float32), DTYPES["f32"])
  with jax.default_device(cpu()):
    w = jpa.BatchPrefillWithPagedKVCacheWrapper(max_num_tokens=32)
    plan = w.plan(qo_indptr, table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
                  causal=True, q_data_type=np.float32)
    out, lse = _fallback_attention(q, cache_in_form(k, v, "f32", "NHD", "5d"), plan)
  ref_out, ref_lse = oracle(q, k, v, qo_indptr, table, causal=True)
  assert np.isneginf(ref_lse[-3:]).all()  # the oracle marks the padding rows empty
  assert_attention_close(out, lse, ref_out, ref_lse, "f32", what="fallback prefill")


def test_fallback_prefill_with_soft_cap_window_and_sinks(rng):
  """The masked lowering applies the features as the oracle does, and keeps padding rows
  empty (no sink there)."""
  hq, hk, d, ps = 8, 2, 64, 8
  kv_lens = np.array([30, 0, 50])
  qo_lens = np.array([6, 2, 9])
  qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
  table = page_table(rng, kv_lens, ps)
  k, v = random_cache(rng, table.num_pages, ps, hk, d, "f32")
  rows = int(qo_indptr[-1]) + 2
  q = round_to(rng.standard_normal((rows, hq, d), dtype=np.float32) * 2.0, DTYPES["f32"])
  sinks = rng.standard_normal(hq).astype(np.float32)
  features = dict(logits_soft_cap=1.5, window_left=9)
  with jax.default_device(cpu()):
    w = jpa.BatchPrefillWithPagedKVCacheWrapper(max_num_tokens=32)
    plan = w.plan(qo_indptr, table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
                  causal=True, q_data_type=np.float32, **features)
    out, lse = _fallback_attention(q, cache_in_form(k, v, "f32", "NHD", "5d"), plan, sinks)
  ref_out, ref_lse = oracle(q, k, v, qo_indptr, table, causal=True, sinks=sinks, **features)
  assert np.isneginf(ref_lse[-2:]).all()
  assert_attention_close(out, lse, ref_out, ref_lse, "f32", what="fallback features")


@pytest.mark.parametrize("form,kv_layout", [("5d", "HND"), ("tuple", "NHD")])
def test_fallback_append_matches_reference_and_skips_bad_rows(rng, form, kv_layout):
  hk, d, ps = 2, 64, 4
  table = page_table(rng, np.array([6, 9]), ps)
  k, v = random_cache(rng, table.num_pages, ps, hk, d, "f32")
  cache = cache_in_form(k, v, "f32", kv_layout, form)
  # Rows: two valid ones, a padding row (-1) and one past its request's pages.
  bi = np.array([0, 1, -1, 0], np.int32)
  pos = np.array([5, 8, -1, 9], np.int32)
  new_k = rng.standard_normal((4, hk, d), dtype=np.float32)
  new_v = rng.standard_normal((4, hk, d), dtype=np.float32)
  info = layout_lib.inspect_cache(cache, kv_layout)
  caches = (cache,) if info.combined else tuple(cache)
  rule = functools.partial(primitives._reference_append, kv_layout=kv_layout,  # noqa: SLF001
                           combined=info.combined)
  with jax.default_device(cpu()):
    got = jax.jit(rule)(new_k, new_v, bi, pos, table.indices, table.indptr, *caches)
    want = reference.append_paged_kv_cache(new_k[:2], new_v[:2], bi[:2], pos[:2], cache,
                                           table.indices, table.indptr, table.last_page_len,
                                           kv_layout=kv_layout)
  want = (want,) if info.combined else tuple(want)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
