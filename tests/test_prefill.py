"""BatchPrefillWithPagedKVCacheWrapper and the jax.numpy fallback against the oracle."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_pagedattn as jpa
from jax_pagedattn import planning, reference, switches

from _helpers import (DTYPES, split_run_result, assert_attention_close, cache_in_form, check_native, cpu, oracle,
                      page_table, put, random_cache, round_to)


def prefill_lengths(rng, page_size):
  """(qo_len, kv_len) pairs covering the edge cases next to random ones.

  Empty request both ways (no queries; queries but no keys), single query and key,
  exact page boundaries, more queries than keys (causal rows that see nothing),
  and chunked prefill (qo_len < kv_len).
  """
  pairs = [(0, 0), (0, 2 * page_size), (3, 0), (1, 1), (page_size, page_size),
           (6, 4), (5, 3 * page_size + 1)]
  for _ in range(2):
    kv = int(rng.integers(1, 120))
    pairs.append((int(rng.integers(1, min(kv, 40) + 1)), kv))
  order = rng.permutation(len(pairs))
  qo = np.array([pairs[i][0] for i in order])
  kv = np.array([pairs[i][1] for i in order])
  return qo, kv


def _prefill(device, kv_layout, page_size, num_kv_heads, qo_indptr, table, cache, q, *,
             return_lse, **plan_kw):
  with jax.default_device(device):
    w = jpa.BatchPrefillWithPagedKVCacheWrapper(kv_layout=kv_layout)
    w.plan(qo_indptr, table.indptr, table.indices, table.last_page_len, q.shape[1],
           num_kv_heads, q.shape[2], page_size, q_data_type=q.dtype, **plan_kw)
    res = w.run(put(q, device), put(cache, device), return_lse=return_lse)
  return split_run_result(res, return_lse)


@pytest.mark.grid("prefill")
def test_prefill_matches_reference(platform, case, device, rng):
  check_native(platform)
  hq, hk = case.heads
  dt = DTYPES[case.dtype]
  qo_lens, kv_lens = prefill_lengths(rng, case.page_size)
  qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
  table = page_table(rng, kv_lens, case.page_size)
  k, v = random_cache(rng, table.num_pages, case.page_size, hk, case.head_dim, case.dtype)
  cache = cache_in_form(k, v, case.dtype, case.kv_layout, case.form)
  q = round_to(rng.standard_normal((int(qo_indptr[-1]), hq, case.head_dim), dtype=np.float32), dt)
  out, lse = _prefill(device, case.kv_layout, case.page_size, hk, qo_indptr, table, cache,
                      q.astype(np.dtype(dt)), return_lse=case.return_lse, causal=case.causal,
                      pos_encoding_mode=case.pos)
  assert out.dtype == dt and out.shape == q.shape
  ref_out, ref_lse = oracle(q, k, v, qo_indptr, table, causal=case.causal,
                            pos_encoding_mode=case.pos)
  assert np.isneginf(ref_lse).any()  # the (3, 0) request (and causal (6, 4) rows)
  assert_attention_close(out, lse, ref_out, ref_lse, case.dtype, out_tol=case.out_tol,
                         what=case.id)


@pytest.mark.parametrize("causal", [False, True])
def test_prefill_split_kv(platform, device, rng, causal):
  """Long contexts with a few queries: the planner splits keys; merge must be exact."""
  check_native(platform)
  dtype = "bf16" if platform == "gpu" else "f32"
  hq, hk, d, ps = 8, 2, 128, 16
  qo_lens = np.array([5, 1, 3, 0])
  kv_lens = np.array([3000, 900, 40, 20])
  qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
  table = page_table(rng, kv_lens, ps)
  k, v = random_cache(rng, table.num_pages, ps, hk, d, dtype)
  cache = cache_in_form(k, v, dtype, "HND", "5d")
  dt = DTYPES[dtype]
  q = round_to(rng.standard_normal((int(qo_indptr[-1]), hq, d), dtype=np.float32), dt)
  with jax.default_device(device):
    w = jpa.BatchPrefillWithPagedKVCacheWrapper(kv_layout="HND")
    plan = w.plan(qo_indptr, table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
                  causal=causal, q_data_type=np.dtype(dt))
    out, lse = w.run(put(q.astype(np.dtype(dt)), device), put(cache, device), return_lse=True)
  sections = planning.unpack_plan(plan.buffer, plan.config.caps)
  live = sections["work"][sections["work"][:, 0] >= 0]
  assert (live[:, 5] >= 0).any(), "precondition: the planner should have split request 0"
  ref_out, ref_lse = oracle(q, k, v, qo_indptr, table, causal=causal)
  assert_attention_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("tuning", [dict(sm90_stages=2), dict(sm90_pingpong=1),
                                    dict(sm90_pingpong=1, sm90_stages=2)],
                         ids=["2stages", "pingpong", "pingpong-2stages"])
def test_prefill_hopper_tunings(platform, device, rng, tuning):
  """The Hopper kernel's non-default schedules (switches.py) against the oracle: several
  K/V tiles per item, both warpgroups, causal diagonals, a chunked request and a split."""
  if platform != "gpu":
    pytest.skip("the tunings are the Hopper prefill kernel's")
  check_native(platform)
  dtype, hq, hk, d, ps = "bf16", 16, 4, 128, 16
  qo_lens, kv_lens = np.array([300, 1, 77, 0, 40]), np.array([300, 1500, 400, 9, 40])
  qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
  table = page_table(rng, kv_lens, ps)
  k, v = random_cache(rng, table.num_pages, ps, hk, d, dtype)
  cache = cache_in_form(k, v, dtype, "NHD", "5d")
  q = round_to(rng.standard_normal((int(qo_indptr[-1]), hq, d), dtype=np.float32), jnp.bfloat16)
  with switches.overridden(**tuning):
    out, lse = _prefill(device, "NHD", ps, hk, qo_indptr, table, cache, q.astype(jnp.bfloat16),
                        return_lse=True, causal=True)
  ref_out, ref_lse = oracle(q, k, v, qo_indptr, table, causal=True)
  assert_attention_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_prefill_padding_rows_under_jit(platform, device, rng, causal):
  """q with more rows than qo_indptr[-1] (up to max_num_tokens) inside jit: the extra
  rows are exactly 0 with lse -inf, the others unaffected."""
  check_native(platform)
  dtype, hq, hk, d, ps = "bf16", 12, 4, 64, 8
  qo_lens, kv_lens = np.array([4, 0, 7]), np.array([30, 5, 7])
  qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
  table = page_table(rng, kv_lens, ps)
  k, v = random_cache(rng, table.num_pages, ps, hk, d, dtype)
  cache = cache_in_form(k, v, dtype, "NHD", "tuple")
  rows = 32
  q = round_to(rng.standard_normal((rows, hq, d), dtype=np.float32), jnp.bfloat16)
  with jax.default_device(device):
    w = jpa.BatchPrefillWithPagedKVCacheWrapper(kv_layout="NHD", max_num_tokens=rows)
    plan = w.plan(qo_indptr, table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
                  causal=causal, q_data_type="bfloat16")
    step = jax.jit(lambda q, c, p: w.run(q, c, return_lse=True, plan=p))
    out, lse = step(put(q.astype(jnp.bfloat16), device), put(cache, device), plan)
  ref_out, ref_lse = oracle(q, k, v, qo_indptr, table, causal=causal)
  assert np.isneginf(ref_lse[int(qo_indptr[-1]):]).all()
  assert_attention_close(out, lse, ref_out, ref_lse, dtype)


def test_prefill_lowers_to_native_handler(platform, device, rng):
  check_native(platform)
  table = page_table(rng, [5, 9], 8)
  k, v = random_cache(rng, table.num_pages, 8, 2, 64, "f16")
  cache = put(cache_in_form(k, v, "f16", "HND", "tuple"), device)
  q = put(np.ones((6, 4, 64), np.float16), device)
  with jax.default_device(device):
    w = jpa.BatchPrefillWithPagedKVCacheWrapper(kv_layout="HND")
    plan = w.plan(np.array([0, 2, 6], np.int32), table.indptr, table.indices,
                  table.last_page_len, 4, 2, 64, 8, q_data_type="float16")
    text = jax.jit(lambda q, c, p: w.run(q, c, plan=p)).lower(q, cache, plan).as_text()
  assert "jax_pagedattn_prefill" in text


# ---------------------------------------------------------------- the oracle itself


def _bruteforce(q, k, v, qo_lens, kv_lens, causal, mode, sm_scale):
  """float64 numpy, one query and head at a time, on contiguous (unpaged) keys."""
  hq, hk, d = q.shape[1], k[0].shape[1], q.shape[2]
  n = 1 << (hq.bit_length() - 1)
  out = np.zeros(q.shape)
  lse = np.full(q.shape[:2], -np.inf)
  row = 0
  for b, (ql, kl) in enumerate(zip(qo_lens, kv_lens)):
    for i in range(ql):
      qpos = kl - ql + i
      for h in range(hq):
        qi, kk = q[row, h].astype(np.float64), k[b][:, h // (hq // hk)].astype(np.float64)
        vv = v[b][:, h // (hq // hk)].astype(np.float64)
        j = np.arange(kl)
        if mode == "ROPE_LLAMA":
          f = 1e4 ** (-2.0 * np.arange(d // 2) / d)
          def rot(x, p):
            a = p[:, None] * f
            x1, x2 = x[..., :d // 2], x[..., d // 2:]
            return np.concatenate([x1 * np.cos(a) - x2 * np.sin(a),
                                   x2 * np.cos(a) + x1 * np.sin(a)], -1)
          qi = rot(qi[None], np.array([qpos], float))[0]
          kk = rot(kk, j.astype(float))
        s = kk @ qi * sm_scale
        if mode == "ALIBI":
          if h < n:
            slope = 2.0 ** (-8 * (h + 1) / n)
          else:
            slope = 2.0 ** (-4 * (2 * (h + 1 - n) - 1) / n)
          s = s + slope * (j - qpos)
        keep = j <= qpos if causal else np.ones(kl, bool)
        if keep.any():
          m = s[keep].max()
          e = np.exp(s[keep] - m)
          out[row, h] = e @ vv[keep] / e.sum()
          lse[row, h] = (m + np.log(e.sum())) / math.log(2)
      row += 1
  return out, lse


@pytest.mark.parametrize("mode", ["NONE", "ROPE_LLAMA", "ALIBI"])
@pytest.mark.parametrize("causal", [False, True])
def test_oracle_against_float64_bruteforce(rng, mode, causal):
  """The oracle itself, against a scalar float64 loop on unpaged keys (12 heads:
  ALiBi's second slope series; padding rows; empty requests)."""
  hq, hk, d, ps = 12, 4, 16, 4
  qo_lens, kv_lens = [2, 0, 3, 4, 1], [9, 4, 0, 3, 8]
  table = page_table(rng, kv_lens, ps)
  k, v = random_cache(rng, table.num_pages, ps, hk, d, "f32")
  t = sum(qo_lens)
  q = rng.standard_normal((t + 2, hq, d), dtype=np.float32)  # 2 padding rows
  qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)])
  out, lse = oracle(q, k, v, qo_indptr, table, causal=causal, pos_encoding_mode=mode)
  dense_k = [k[table.indices[table.indptr[b]:table.indptr[b + 1]]].reshape(-1, hk, d)[:kl]
             for b, kl in enumerate(kv_lens)]
  dense_v = [v[table.indices[table.indptr[b]:table.indptr[b + 1]]].reshape(-1, hk, d)[:kl]
             for b, kl in enumerate(kv_lens)]
  want_out, want_lse = _bruteforce(q, dense_k, dense_v, qo_lens, kv_lens, causal, mode,
                                   1 / math.sqrt(d))
  np.testing.assert_allclose(out, want_out, atol=2e-6, rtol=2e-5)
  assert np.array_equal(np.isneginf(lse), np.isneginf(want_lse))
  fin = np.isfinite(want_lse)
  np.testing.assert_allclose(lse[fin], want_lse[fin], atol=2e-6, rtol=2e-6)
  assert (out[~fin] == 0).all()


@pytest.mark.parametrize("mode", ["NONE", "ROPE_LLAMA", "ALIBI"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("page_size", [1, 16])
def test_masked_fallback_matches_oracle(rng, mode, causal, page_size):
  """reference.batch_attention_masked (the lowering without native handlers) under jit
  with padded index arrays, garbage past kv_indptr[-1] and a traced num_tokens."""
  hq, hk, d = 8, 2, 64
  qo_lens, kv_lens = prefill_lengths(rng, page_size)
  qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
  table = page_table(rng, kv_lens, page_size)
  k, v = random_cache(rng, table.num_pages, page_size, hk, d, "f32")
  num_tokens = int(qo_indptr[-1])
  q = rng.standard_normal((num_tokens + 3, hq, d), dtype=np.float32)
  bcap, pcap = len(qo_lens) + 4, len(table.indices) + 7
  pad = lambda a, n, fill: np.concatenate([a, np.full(n - len(a), fill, a.dtype)])
  args = (pad(qo_indptr, bcap + 1, qo_indptr[-1]), pad(table.indptr, bcap + 1, table.indptr[-1]),
          # Out-of-range garbage in the unused tail must be ignored (and clipped safely).
          pad(table.indices, pcap, 10_000), pad(table.last_page_len, bcap, 0))
  fn = jax.jit(lambda q, k, v, a, b, c, e, n: reference.batch_attention_masked(
      q, k, v, a, b, c, e, n, page_size=page_size, causal=causal, pos_encoding_mode=mode,
      sm_scale=None, rope_scale=1.0, rope_theta=1e4))
  with jax.default_device(cpu()):
    out, lse = fn(q, k, v, *args, jnp.int32(num_tokens))
    ref_out, ref_lse = oracle(q, k, v, qo_indptr, table, causal=causal, pos_encoding_mode=mode)
  assert_attention_close(out, lse, ref_out, ref_lse, "f32", out_tol=2e-5, lse_tol=1e-5)
  # A smaller traced num_tokens turns the rows past it into padding.
  with jax.default_device(cpu()):
    out2, lse2 = fn(q, k, v, *args, jnp.int32(num_tokens - 2))
  assert (np.asarray(out2)[num_tokens - 2:] == 0).all()
  assert np.isneginf(np.asarray(lse2)[num_tokens - 2:]).all()
  keep = num_tokens - 2
  np.testing.assert_array_equal(np.asarray(out2)[:keep], np.asarray(out)[:keep])


@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
@pytest.mark.parametrize("form", ["5d", "tuple"])
def test_oracle_accepts_every_cache_form(rng, kv_layout, form):
  """The oracle reads 5-D and tuple caches in both layouts as the same keys."""
  table = page_table(rng, [7, 0, 20], 4)
  k, v = random_cache(rng, table.num_pages, 4, 2, 8, "f32")
  q = rng.standard_normal((5, 4, 8), dtype=np.float32)
  qo_indptr = np.array([0, 2, 3, 5])
  want = oracle(q, k, v, qo_indptr, table, causal=True)
  with jax.default_device(cpu()):
    got = reference.batch_attention(q, cache_in_form(k, v, "f32", kv_layout, form), qo_indptr,
                                    table.indptr, table.indices, table.last_page_len,
                                    kv_layout=kv_layout, causal=True)
  np.testing.assert_array_equal(np.asarray(got[0]), want[0])
  np.testing.assert_array_equal(np.asarray(got[1]), want[1])
