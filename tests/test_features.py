"""Soft-capping, sliding windows and attention sinks (issue 15), on every backend, against
the float32 reference, alone and combined with each other and with RoPE / ALiBi."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_pagedattn as jpa

from _helpers import (DTYPES, assert_attention_close, cache_in_form, check_native, oracle,
                      page_table, put, random_cache, round_to)
from test_prefill import prefill_lengths


def _lengths(rng, case):
  if case.op.startswith("decode"):
    kv = np.array([1, case.page_size, 3 * case.page_size + 1, 0, 45, 130, 9, 64])
    rng.shuffle(kv)
    return np.ones_like(kv), kv
  return prefill_lengths(rng, case.page_size)


@pytest.mark.grid("features")
def test_features_match_reference(platform, case, device, rng):
  check_native(platform)
  hq, hk = case.heads
  dt = DTYPES[case.dtype]
  qo_lens, kv_lens = _lengths(rng, case)
  qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
  table = page_table(rng, kv_lens, case.page_size)
  k, v = random_cache(rng, table.num_pages, case.page_size, hk, case.head_dim, case.dtype)
  cache = cache_in_form(k, v, case.dtype, case.kv_layout, case.form)
  q = round_to(rng.standard_normal((int(qo_indptr[-1]), hq, case.head_dim), dtype=np.float32), dt)
  # Sinks around the logits' scale, some above every logit, some far below.
  sinks = (rng.standard_normal(hq) * 2.0).astype(np.float32) if case.sinks else None
  features = dict(logits_soft_cap=case.soft_cap or None, window_left=case.window_left)
  causal = case.op == "prefill-causal"
  with jax.default_device(device):
    if case.op.startswith("decode"):
      w = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout=case.kv_layout,
                                                 use_tensor_cores=case.op == "decode-tc")
      w.plan(table.indptr, table.indices, table.last_page_len, hq, hk, case.head_dim,
             case.page_size, pos_encoding_mode=case.pos, q_data_type=dt, **features)
    else:
      w = jpa.BatchPrefillWithPagedKVCacheWrapper(kv_layout=case.kv_layout)
      w.plan(qo_indptr, table.indptr, table.indices, table.last_page_len, hq, hk,
             case.head_dim, case.page_size, causal=causal, pos_encoding_mode=case.pos,
             q_data_type=dt, **features)
    out, lse = w.run(put(q.astype(np.dtype(dt)), device), put(cache, device), return_lse=True,
                     sinks=None if sinks is None else put(sinks, device))
  ref_out, ref_lse = oracle(q, k, v, qo_indptr, table, causal=causal, pos_encoding_mode=case.pos,
                            sinks=sinks, **features)
  tol = dict(out_tol=1e-4) if case.dtype == "f32" and case.pos == "ROPE_LLAMA" else {}
  assert_attention_close(out, lse, ref_out, ref_lse, case.dtype, what=case.id, **tol)


def test_features_change_the_result(rng):
  """The reference itself: each feature changes the outputs of a batch (so a kernel
  that ignored it could not pass the comparisons above)."""
  page_size, hq, hk, d = 16, 8, 2, 64
  kv_lens = np.array([100, 37, 64])
  table = page_table(rng, kv_lens, page_size)
  k, v = random_cache(rng, table.num_pages, page_size, hk, d, "f32")
  q = rng.standard_normal((3, hq, d), dtype=np.float32) * 3.0
  qo_indptr = np.arange(4, dtype=np.int32)
  base = oracle(q, k, v, qo_indptr, table)
  for kw in (dict(logits_soft_cap=1.0), dict(window_left=10),
             dict(sinks=np.full(hq, 1.5, np.float32))):
    got = oracle(q, k, v, qo_indptr, table, **kw)
    assert np.abs(got[0] - base[0]).max() > 1e-3, kw
    assert np.abs(got[1] - base[1]).max() > 1e-3, kw


def test_sink_rows_without_keys(rng):
  """A row with no visible key but a sink: output 0, lse the sink's logit in base 2."""
  table = page_table(rng, np.array([0, 5]), 4)
  k, v = random_cache(rng, table.num_pages, 4, 1, 64, "f32")
  q = rng.standard_normal((2, 2, 64), dtype=np.float32)
  sinks = np.array([0.5, -1.0], np.float32)
  w = jpa.BatchDecodeWithPagedKVCacheWrapper()
  w.plan(table.indptr, table.indices, table.last_page_len, 2, 1, 64, 4, q_data_type="float32")
  out, lse = w.run(q, cache_in_form(k, v, "f32", "NHD", "5d"), return_lse=True, sinks=sinks)
  assert np.all(np.asarray(out)[0] == 0.0)
  np.testing.assert_allclose(np.asarray(lse)[0], sinks / np.log(2.0), rtol=1e-6)


def test_sink_wrapper_and_jit(rng):
  """BatchAttentionWithAttentionSinkWrapper under jit with traced sinks: one compile,
  results equal to the plain wrapper given the same sinks."""
  page_size, hq, hk, d = 8, 4, 2, 64
  qo_lens, kv_lens = np.array([3, 1]), np.array([20, 9])
  qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
  table = page_table(rng, kv_lens, page_size)
  k, v = random_cache(rng, table.num_pages, page_size, hk, d, "f32")
  cache = jnp.asarray(cache_in_form(k, v, "f32", "NHD", "5d"))
  q = jnp.asarray(rng.standard_normal((4, hq, d), dtype=np.float32))
  w = jpa.BatchAttentionWithAttentionSinkWrapper(window_left=5)
  plan = w.plan(qo_indptr, table.indptr, table.indices, table.last_page_len, hq, hk, d,
                page_size, causal=True, q_data_type="float32")
  assert plan.config.window_left == 5
  traces = []

  @jax.jit
  def step(q, cache, plan, sinks):
    traces.append(1)
    return w.run(q, cache, sinks, plan=plan)

  for scale in (1.0, 2.0):
    sinks = jnp.full((hq,), scale, jnp.float32)
    got = step(q, cache, plan, sinks)
    ref, _ = oracle(np.asarray(q), k, v, qo_indptr, table, causal=True, window_left=5,
                    sinks=np.asarray(sinks))
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5, rtol=2e-5)
  assert len(traces) == 1
  with pytest.raises(TypeError, match="sinks"):
    w.run(q, cache, None)


@pytest.mark.parametrize("kw, match", [
    (dict(logits_soft_cap=-1.0), "logits_soft_cap"),
    (dict(logits_soft_cap=float("inf")), "logits_soft_cap"),
    (dict(window_left=-2), "window_left"),
    (dict(window_left=2.5), "window_left"),
])
def test_bad_feature_arguments(kw, match):
  w = jpa.BatchPrefillWithPagedKVCacheWrapper()
  with pytest.raises(ValueError, match=match):
    w.plan(np.array([0, 1], np.int32), np.array([0, 1], np.int32), np.array([0], np.int32),
           np.array([1], np.int32), 4, 2, 64, 16, **kw)


def test_bad_sinks():
  w = jpa.BatchDecodeWithPagedKVCacheWrapper()
  w.plan(np.array([0, 1], np.int32), np.array([0], np.int32), np.array([3], np.int32), 4, 2, 64,
         16, q_data_type="float32")
  q = jnp.zeros((1, 4, 64), jnp.float32)
  cache = jnp.ones((1, 2, 16, 2, 64), jnp.float32)
  with pytest.raises(ValueError, match="sinks"):
    w.run(q, cache, sinks=np.zeros(3, np.float32))
  with pytest.raises(TypeError, match="sinks"):
    w.run(q, cache, sinks=np.zeros(4, np.int32))
