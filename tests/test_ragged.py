"""BatchPrefillWithRaggedKVCacheWrapper (contiguous K/V, qo_indptr / kv_indptr) against the
float32 oracle on every backend; SGLang's ragged-new-tokens + paged-prefix merge; one
compile for plans of equal capacities under jit; bad input raises before any kernel."""

from __future__ import annotations

import zlib

import jax
import numpy as np
import pytest

import jax_pagedattn as jpa
from jax_pagedattn import planning, sharding

from _helpers import (DTYPES, PageTable, assert_attention_close, cache_in_form, check_native,
                      oracle, page_table, pairwise, platform_dtypes, put, random_cache,
                      round_to)
from test_prefill import prefill_lengths


def indptr_of(lens) -> np.ndarray:
  return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def identity_table(kv_lens) -> PageTable:
  """The page table ragged K/V amounts to: pages of one key, in order (page_size 1)."""
  kv_lens = np.asarray(kv_lens, np.int64)
  nnz = int(kv_lens.sum())
  return PageTable(indptr_of(kv_lens), np.arange(nnz, dtype=np.int32),
                   np.minimum(kv_lens, 1).astype(np.int32), kv_lens, nnz)


def random_kv(rng, nnz, num_kv_heads, head_dim, dtype_name):
  """Random ragged K and V [nnz, Hkv, D] as float32 holding `dtype`-exact values."""
  k, v = random_cache(rng, nnz, 1, num_kv_heads, head_dim, dtype_name)
  return k[:, 0], v[:, 0]


def in_layout(x, kv_layout, dtype_name):
  """Ragged NHD float32 [nnz, H, D] as the user passes it: NHD, or HND [H, nnz, D]."""
  if kv_layout == "HND":
    x = x.transpose(1, 0, 2)
  return np.ascontiguousarray(x).astype(np.dtype(DTYPES[dtype_name]))


def ragged_oracle(q, k, v, qo_indptr, kv_lens, **kw):
  """The paged oracle over the identity page table of ragged K/V."""
  return oracle(q, k[:, None], v[:, None], qo_indptr, identity_table(kv_lens), **kw)


def _run_ragged(device, kv_layout, qo_indptr, kv_lens, q, k, v, *, num_kv_heads,
                return_lse=True, sinks=None, **plan_kw):
  with jax.default_device(device):
    w = jpa.BatchPrefillWithRaggedKVCacheWrapper(kv_layout=kv_layout)
    w.plan(qo_indptr, indptr_of(kv_lens), q.shape[1], num_kv_heads, q.shape[2],
           q_data_type=q.dtype, **plan_kw)
    return w.run(put(q, device), put(k, device), put(v, device), return_lse=return_lse,
                 sinks=None if sinks is None else put(sinks, device))


# ------------------------------------------------------------------ against the oracle

_AXES = {
    "dtype": ("f32", "f16", "bf16"),
    "kv_layout": ("NHD", "HND"),
    "head_dim": (64, 128, 256),
    "heads": ((4, 4), (8, 2), (12, 4), (32, 4)),
    "pos": ("NONE", "ROPE_LLAMA", "ALIBI"),
    "causal": (False, True),
    "return_lse": (False, True),
}
CASES = pairwise(_AXES, zlib.crc32(b"ragged"))


def _case_id(c):
  return (f"{c['dtype']}-{c['kv_layout']}-d{c['head_dim']}-h{c['heads'][0]}x{c['heads'][1]}"
          f"-{c['pos']}{'-causal' if c['causal'] else ''}{'-lse' if c['return_lse'] else ''}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_ragged_matches_reference(platform, device, rng, case):
  """Variable lengths with the edge cases: requests without queries (with and without
  keys), queries without keys, a single query and key, more queries than keys (causal
  rows that see nothing), chunked prefill (qo_len < kv_len)."""
  check_native(platform)
  if case["dtype"] not in platform_dtypes(platform):
    pytest.skip(f"{case['dtype']} kernels are CPU-only")
  hq, hk = case["heads"]
  d, dtype, pos = case["head_dim"], case["dtype"], case["pos"]
  dt = DTYPES[dtype]
  qo_lens, kv_lens = prefill_lengths(rng, 16)
  qo_indptr = indptr_of(qo_lens)
  k, v = random_kv(rng, int(kv_lens.sum()), hk, d, dtype)
  q = round_to(rng.standard_normal((int(qo_indptr[-1]), hq, d), dtype=np.float32), dt)
  res = _run_ragged(device, case["kv_layout"], qo_indptr, kv_lens, q.astype(np.dtype(dt)),
                    in_layout(k, case["kv_layout"], dtype), in_layout(v, case["kv_layout"], dtype),
                    return_lse=case["return_lse"], num_kv_heads=hk, causal=case["causal"],
                    pos_encoding_mode=pos)
  out, lse = res if case["return_lse"] else (res, None)
  assert out.dtype == dt and out.shape == q.shape
  ref_out, ref_lse = ragged_oracle(q, k, v, qo_indptr, kv_lens, causal=case["causal"],
                                   pos_encoding_mode=pos)
  assert np.isneginf(ref_lse).any()  # the request with queries but no keys
  tol = dict(out_tol=1e-4) if dtype == "f32" and pos == "ROPE_LLAMA" else {}
  assert_attention_close(out, lse, ref_out, ref_lse, dtype, what=_case_id(case), **tol)


@pytest.mark.parametrize("feature", [dict(logits_soft_cap=2.0), dict(window_left=7),
                                     dict(sinks=True)], ids=["softcap", "window", "sinks"])
def test_ragged_features(platform, device, rng, feature):
  """Soft-capping, a sliding window and sinks, each once, on a causal GQA batch."""
  check_native(platform)
  dtype = platform_dtypes(platform)[-1]
  hq, hk, d = 8, 2, 128
  qo_lens, kv_lens = prefill_lengths(rng, 16)
  qo_indptr = indptr_of(qo_lens)
  k, v = random_kv(rng, int(kv_lens.sum()), hk, d, dtype)
  q = round_to(rng.standard_normal((int(qo_indptr[-1]), hq, d), dtype=np.float32), DTYPES[dtype])
  plan_kw = {key: val for key, val in feature.items() if key != "sinks"}
  sinks = (rng.standard_normal(hq) * 2.0).astype(np.float32) if feature.get("sinks") else None
  out, lse = _run_ragged(device, "NHD", qo_indptr, kv_lens, q.astype(np.dtype(DTYPES[dtype])),
                         in_layout(k, "NHD", dtype), in_layout(v, "NHD", dtype), sinks=sinks,
                         num_kv_heads=hk, causal=True, **plan_kw)
  ref_out, ref_lse = ragged_oracle(q, k, v, qo_indptr, kv_lens, causal=True, sinks=sinks,
                                   **plan_kw)
  assert_attention_close(out, lse, ref_out, ref_lse, dtype, what=str(feature))


@pytest.mark.parametrize("causal", [False, True])
def test_ragged_split_kv(platform, device, rng, causal):
  """Long contexts with few queries: the planner splits keys (of one-key pages) and the
  kernels merge the pieces."""
  check_native(platform)
  dtype = platform_dtypes(platform)[-1]
  hq, hk, d = 8, 2, 128
  qo_lens, kv_lens = np.array([5, 1, 3, 0]), np.array([3000, 900, 40, 20])
  qo_indptr = indptr_of(qo_lens)
  k, v = random_kv(rng, int(kv_lens.sum()), hk, d, dtype)
  dt = DTYPES[dtype]
  q = round_to(rng.standard_normal((int(qo_indptr[-1]), hq, d), dtype=np.float32), dt)
  with jax.default_device(device):
    w = jpa.BatchPrefillWithRaggedKVCacheWrapper()
    plan = w.plan(qo_indptr, indptr_of(kv_lens), hq, hk, d, causal=causal, q_data_type=dt)
    out, lse = w.run(put(q.astype(np.dtype(dt)), device), put(k.astype(np.dtype(dt)), device),
                     put(v.astype(np.dtype(dt)), device), return_lse=True)
  sections = planning.unpack_plan(plan.buffer, plan.config.caps)
  live = sections["work"][sections["work"][:, 0] >= 0]
  assert (live[:, 5] >= 0).any(), "precondition: the planner should have split request 0"
  ref_out, ref_lse = ragged_oracle(q, k, v, qo_indptr, kv_lens, causal=causal)
  assert_attention_close(out, lse, ref_out, ref_lse, dtype)


def test_ragged_fixed_split_size_counts_keys(platform, device, rng):
  """fixed_split_size is in pages, and a ragged page holds one key: pieces start at
  multiples of n keys, and a request's out and lse are bitwise the same alone and in a
  batch (batch invariance, as for the paged wrappers)."""
  check_native(platform)
  dtype = platform_dtypes(platform)[-1]
  dt = np.dtype(DTYPES[dtype])
  hq, hk, d, n = 8, 2, 64, 96
  qo_lens, kv_lens = np.array([3, 7, 1]), np.array([700, 20, 333])
  k, v = random_kv(rng, int(kv_lens.sum()), hk, d, dtype)
  q = round_to(rng.standard_normal((int(qo_lens.sum()), hq, d), dtype=np.float32), dt)
  with jax.default_device(device):
    w = jpa.BatchPrefillWithRaggedKVCacheWrapper()
    plan = w.plan(indptr_of(qo_lens), indptr_of(kv_lens), hq, hk, d, causal=True,
                  q_data_type=dt, fixed_split_size=n)
    work = planning.unpack_plan(plan.buffer, plan.config.caps)["work"]
    live = work[work[:, 0] >= 0]
    assert (live[:, 5] >= 0).any() and (live[live[:, 5] > 0, 3] % n == 0).all()
    out, lse = w.run(put(q.astype(dt), device), put(k.astype(dt), device),
                     put(v.astype(dt), device), return_lse=True)
    alone = jpa.BatchPrefillWithRaggedKVCacheWrapper()
    alone.plan(indptr_of(qo_lens[:1]), indptr_of(kv_lens[:1]), hq, hk, d, causal=True,
               q_data_type=dt, fixed_split_size=n)
    out0, lse0 = alone.run(put(q[:3].astype(dt), device), put(k[:700].astype(dt), device),
                           put(v[:700].astype(dt), device), return_lse=True)
  np.testing.assert_array_equal(np.asarray(out)[:3], np.asarray(out0))
  np.testing.assert_array_equal(np.asarray(lse)[:3], np.asarray(lse0))


# --------------------------------------------------- SGLang: ragged new tokens + paged prefix


@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
def test_ragged_new_tokens_merged_with_paged_prefix(platform, device, rng, kv_layout):
  """SGLang's extend step: a causal ragged prefill over each request's new tokens and a
  non-causal paged prefill over its cached prefix, merged with merge_state, equal one
  causal paged prefill over prefix + new (and the oracle). Prefixes end anywhere in a
  page, one request has none, one has no new tokens."""
  check_native(platform)
  dtype = platform_dtypes(platform)[-1]
  dt = np.dtype(DTYPES[dtype])
  hq, hk, d, ps = 8, 2, 128, 16
  prefix = np.array([37, 0, 64, 5, 100])
  new = np.array([9, 12, 1, 0, 30])
  full = prefix + new
  table = page_table(rng, full, ps)
  kc, vc = random_cache(rng, table.num_pages, ps, hk, d, dtype)
  dense = [(kc[table.indices[table.indptr[b]:table.indptr[b + 1]]].reshape(-1, hk, d)[:n],
            vc[table.indices[table.indptr[b]:table.indptr[b + 1]]].reshape(-1, hk, d)[:n])
           for b, n in enumerate(full)]
  k_new = np.concatenate([kk[p:] for (kk, _), p in zip(dense, prefix)])
  v_new = np.concatenate([vv[p:] for (_, vv), p in zip(dense, prefix)])
  # The prefix as a page table: the first pages of each request, the last one partly.
  pre_pages = -(-prefix // ps)
  pre_indices = np.concatenate([table.indices[table.indptr[b]:table.indptr[b] + n]
                                for b, n in enumerate(pre_pages)]).astype(np.int32)
  pre_last = np.where(pre_pages > 0, prefix - (pre_pages - 1) * ps, 0).astype(np.int32)
  qo_indptr = indptr_of(new)
  q = round_to(rng.standard_normal((int(new.sum()), hq, d), dtype=np.float32), dt)
  cache = put(cache_in_form(kc, vc, dtype, "NHD", "5d"), device)
  qd = put(q.astype(dt), device)
  with jax.default_device(device):
    ragged = jpa.BatchPrefillWithRaggedKVCacheWrapper(kv_layout=kv_layout)
    ragged.plan(qo_indptr, indptr_of(new), hq, hk, d, causal=True, q_data_type=dt)
    o_new, s_new = ragged.run(qd, put(in_layout(k_new, kv_layout, dtype), device),
                              put(in_layout(v_new, kv_layout, dtype), device), return_lse=True)
    paged = jpa.BatchPrefillWithPagedKVCacheWrapper()
    paged.plan(qo_indptr, indptr_of(pre_pages), pre_indices, pre_last, hq, hk, d, ps,
               causal=False, q_data_type=dt)
    o_pre, s_pre = paged.run(qd, cache, return_lse=True)
    out, lse = jpa.merge_state(o_new, s_new, o_pre, s_pre)
    whole = jpa.BatchPrefillWithPagedKVCacheWrapper()
    whole.plan(qo_indptr, table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
               causal=True, q_data_type=dt)
    o_whole, s_whole = whole.run(qd, cache, return_lse=True)
  ref_out, ref_lse = oracle(q, kc, vc, qo_indptr, table, causal=True)
  assert_attention_close(out, lse, ref_out, ref_lse, dtype, what="merged")
  assert_attention_close(o_whole, s_whole, ref_out, ref_lse, dtype, what="one paged prefill")
  # The two of ours differ only by the rounding of the merged halves.
  tol = 2 * {"f32": 2e-5, "f16": 5e-3, "bf16": 2e-2}[dtype]
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(o_whole, np.float32),
                             atol=tol, rtol=tol)


# ------------------------------------------------------------------------------- jit


@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
def test_ragged_jit_compiles_once_for_new_plans(platform, device, rng, kv_layout):
  """One jitted step, two batches of different shapes within the capacities: k and v
  padded to the key capacity, q to the token capacity; one trace; padding rows 0 / -inf."""
  check_native(platform)
  dtype = platform_dtypes(platform)[-1]
  dt = np.dtype(DTYPES[dtype])
  hq, hk, d, key_cap, tok_cap = 8, 2, 64, 256, 64
  w = jpa.BatchPrefillWithRaggedKVCacheWrapper(kv_layout=kv_layout, max_batch_size=8,
                                               max_num_kv_tokens=key_cap, max_num_tokens=tok_cap)
  traces = []

  @jax.jit
  def step(q, k, v, plan):
    traces.append(1)
    return w.run(q, k, v, return_lse=True, plan=plan)

  for qo_lens, kv_lens in (([4, 0, 7], [30, 5, 7]), ([1, 9, 2, 16, 3], [100, 9, 0, 16, 70])):
    qo_lens, kv_lens = np.array(qo_lens), np.array(kv_lens)
    qo_indptr = indptr_of(qo_lens)
    with jax.default_device(device):
      plan = w.plan(qo_indptr, indptr_of(kv_lens), hq, hk, d, causal=True, q_data_type=dt)
    nnz = int(kv_lens.sum())
    k, v = random_kv(rng, key_cap, hk, d, dtype)  # rows past nnz: padding, never read
    q = round_to(rng.standard_normal((tok_cap, hq, d), dtype=np.float32), dt)
    out, lse = step(put(q.astype(dt), device), put(in_layout(k, kv_layout, dtype), device),
                    put(in_layout(v, kv_layout, dtype), device), plan)
    ref_out, ref_lse = ragged_oracle(q, k[:nnz], v[:nnz], qo_indptr, kv_lens, causal=True)
    assert np.isneginf(ref_lse[int(qo_indptr[-1]):]).all()
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)
  assert len(traces) == 1


def test_ragged_lowers_to_the_prefill_handler(platform, device):
  check_native(platform)
  with jax.default_device(device):
    w = jpa.BatchPrefillWithRaggedKVCacheWrapper()
    plan = w.plan(np.array([0, 2, 6], np.int32), np.array([0, 5, 14], np.int32), 4, 2, 64,
                  q_data_type="float16")
    q, k = put(np.ones((6, 4, 64), np.float16), device), put(np.ones((14, 2, 64), np.float16),
                                                              device)
    text = jax.jit(lambda q, k, v, p: w.run(q, k, v, plan=p)).lower(q, k, k, plan).as_text()
  assert "jax_pagedattn_prefill" in text


# ---------------------------------------------------------------------------- bad input

HQ, HK, D = 8, 2, 64
QO, KV = np.array([0, 3, 5], np.int32), np.array([0, 10, 14], np.int32)


@pytest.fixture
def no_kernel(monkeypatch):
  """Fails the test if an attention op is bound: the error must come before any kernel."""
  def reached(*args, **kwargs):
    raise AssertionError("an attention op was bound: the bad input reached the kernels")
  monkeypatch.setattr(sharding, "bind_attention", reached)


def _planned(**kw):
  w = jpa.BatchPrefillWithRaggedKVCacheWrapper(**kw)
  w.plan(QO, KV, HQ, HK, D, q_data_type="float16")
  return w


def _qkv(q_rows=5, kv_rows=14, heads=HK, dim=D, dtype=np.float16):
  return (np.zeros((q_rows, HQ, D), np.float16), np.zeros((kv_rows, heads, dim), dtype),
          np.zeros((kv_rows, heads, dim), dtype))


@pytest.mark.parametrize("kv_rows", [13, 15])
def test_k_rows_differ_from_kv_indptr(no_kernel, kv_rows):
  w = _planned()
  with pytest.raises(ValueError, match=r"kv_indptr\[-1\] = 14"):
    w.run(*_qkv(kv_rows=kv_rows))
  # The same rule for a plan passed in whose buffer is on the host.
  plan = w.last_plan
  w.plan(QO, np.array([0, 1, 2], np.int32), HQ, HK, D, q_data_type="float16")
  with pytest.raises(ValueError, match=r"kv_indptr\[-1\] = 14"):
    w.run(*_qkv(kv_rows=kv_rows), plan=plan)


def test_k_rows_fewer_than_keys_under_jit(no_kernel):
  w = _planned()
  q, k, v = _qkv(kv_rows=12)
  with pytest.raises(ValueError, match="fewer than"):
    jax.jit(lambda q, k, v: w.run(q, k, v))(q, k, v)


@pytest.mark.parametrize("bad, error, match", [
    (lambda q, k, v: (q, k, v[:, :1]), ValueError, "one shape"),
    (lambda q, k, v: (q, k[:, 0], v[:, 0]), ValueError, "3-D"),
    (lambda q, k, v: (q, k, v.astype(np.float32)), TypeError, "one dtype"),
    (lambda q, k, v: (q, k.astype(np.float32), v.astype(np.float32)), TypeError,
     "kv_data_type"),
    (lambda q, k, v: (q, np.zeros((14, 4, D), np.float16), np.zeros((14, 4, D), np.float16)),
     ValueError, "num_kv_heads"),
    (lambda q, k, v: (q, np.zeros((14, HK, 128), np.float16),
                      np.zeros((14, HK, 128), np.float16)), ValueError, "head_dim"),
    (lambda q, k, v: (q, list(k), v), TypeError, "k must be an array"),
], ids=["shape-mismatch", "rank", "kv-dtype-mismatch", "dtype-vs-plan", "kv-heads",
        "head-dim", "not-an-array"])
def test_bad_k_v(no_kernel, bad, error, match):
  w = _planned()
  with pytest.raises(error, match=match):
    w.run(*bad(*_qkv()))


def test_hnd_k_v_take_heads_first(no_kernel):
  """HND is FlashInfer's [num_kv_heads, nnz_kv, head_dim]: an NHD array is rejected."""
  w = _planned(kv_layout="HND")
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="kv heads"):
    w.run(q, k, v)


def test_q_differs_from_plan():
  w = _planned()
  q, k, v = _qkv()
  with pytest.raises(TypeError, match="q_data_type"):
    w.run(q.astype(np.float32), k, v)
  with pytest.raises(ValueError, match="qo_indptr"):
    w.run(q[:4], k, v)


@pytest.mark.parametrize("kv_indptr, match", [
    ([1, 10, 14], r"kv_indptr\[0\] must be 0"),
    ([0, 10, 9], "kv_indptr must be non-decreasing"),
    ([0, 14], "qo_indptr must have batch_size"),
    ([], "kv_indptr must have"),
])
def test_bad_kv_indptr_is_named(kv_indptr, match):
  w = jpa.BatchPrefillWithRaggedKVCacheWrapper()
  with pytest.raises(ValueError, match=match) as e:
    w.plan(QO, np.array(kv_indptr, np.int32), HQ, HK, D, q_data_type="float16")
  assert "paged" not in str(e.value)
  with pytest.raises(TypeError, match="kv_indptr"):
    w.plan(QO, np.array([0.0, 10.0, 14.0]), HQ, HK, D)


def test_key_capacity():
  w = jpa.BatchPrefillWithRaggedKVCacheWrapper(max_num_kv_tokens=13)
  with pytest.raises(ValueError, match="max_num_kv_tokens = 13"):
    w.plan(QO, KV, HQ, HK, D, q_data_type="float16")
  w = _planned()  # the first plan fixes 16 keys (14 rounded up to a power of two)
  assert w.last_plan.config.caps.pages == 16
  w.plan(QO, np.array([0, 10, 16], np.int32), HQ, HK, D, q_data_type="float16")
  with pytest.raises(ValueError, match="max_num_kv_tokens = 16"):
    w.plan(QO, np.array([0, 10, 17], np.int32), HQ, HK, D, q_data_type="float16")
  with pytest.raises(ValueError, match="max_num_kv_tokens"):
    jpa.BatchPrefillWithRaggedKVCacheWrapper(max_num_kv_tokens=0)


def test_other_plan_arguments():
  w = jpa.BatchPrefillWithRaggedKVCacheWrapper()
  with pytest.raises(ValueError, match="head_dim_vo"):
    w.plan(QO, KV, HQ, HK, D, 128)
  with pytest.raises(ValueError, match="num_qo_heads"):
    w.plan(QO, KV, HQ, 3, D)
  with pytest.raises(TypeError):
    w.plan(QO, KV, HQ, HK, D, None, None)  # FlashInfer's custom_mask position: keyword-only
  with pytest.raises(ValueError, match="kv_layout"):
    jpa.BatchPrefillWithRaggedKVCacheWrapper(kv_layout="NDH")
  with pytest.raises(RuntimeError, match="plan"):
    w.run(*_qkv())


def test_plan_of_a_paged_wrapper_is_rejected(no_kernel, rng):
  table = page_table(rng, [10, 4], 16)
  paged = jpa.BatchPrefillWithPagedKVCacheWrapper()
  plan = paged.plan(QO, table.indptr, table.indices, table.last_page_len, HQ, HK, D, 16,
                    q_data_type="float16")
  with pytest.raises(ValueError, match="ragged"):
    _planned().run(*_qkv(), plan=plan)
  with pytest.raises(TypeError, match="Plan"):
    _planned().run(*_qkv(), plan=plan.buffer)
