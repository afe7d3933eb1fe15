"""Bad input gets a Python exception naming the argument (DESIGN.md §3 Validation),
raised on the host or at trace time, before any kernel runs."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_pagedattn as jpa

from _helpers import cache_in_form, page_table, put, random_cache

HQ, HK, D, PS = 8, 2, 64, 16


def _named(excinfo, *names):
  msg = str(excinfo.value)
  assert any(re.search(rf"\b{re.escape(n)}\b", msg) for n in names), \
      f"message does not name {names}: {msg!r}"


@pytest.fixture
def batch(rng):
  """A valid 3-request decode/prefill batch with its cache (NHD, 5-D, f16)."""
  table = page_table(rng, [20, 16, 1], PS, spare_pages=2)
  k, v = random_cache(rng, table.num_pages, PS, HK, D, "f16")
  return table, cache_in_form(k, v, "f16", "NHD", "5d")


def _decode_plan(w, table, **kw):
  args = dict(indptr=table.indptr, indices=table.indices, last_page_len=table.last_page_len,
              num_qo_heads=HQ, num_kv_heads=HK, head_dim=D, page_size=PS, q_data_type="float16")
  args.update(kw)
  return w.plan(**args)


def _prefill_plan(w, table, qo_indptr, **kw):
  args = dict(qo_indptr=qo_indptr, paged_kv_indptr=table.indptr,
              paged_kv_indices=table.indices, paged_kv_last_page_len=table.last_page_len,
              num_qo_heads=HQ, num_kv_heads=HK, head_dim=D, page_size=PS, q_data_type="float16")
  args.update(kw)
  return w.plan(**args)


def _q(rows, dtype=np.float16, heads=HQ, dim=D):
  return np.ones((rows, heads, dim), dtype)


# ------------------------------------------------------------- index arrays at plan()


def test_indptr_not_starting_at_zero(batch):
  table, _ = batch
  with pytest.raises(ValueError) as e:
    _decode_plan(jpa.BatchDecodeWithPagedKVCacheWrapper(), table, indptr=table.indptr + 1)
  _named(e, "indptr")
  qo = np.array([1, 2, 3, 4], np.int32)
  with pytest.raises(ValueError) as e:
    _prefill_plan(jpa.BatchPrefillWithPagedKVCacheWrapper(), table, qo)
  _named(e, "qo_indptr")


def test_indptr_not_monotonic(batch):
  table, _ = batch
  bad = table.indptr.copy()
  bad[1], bad[2] = bad[2], bad[1]
  with pytest.raises(ValueError) as e:
    _decode_plan(jpa.BatchDecodeWithPagedKVCacheWrapper(), table, indptr=bad)
  _named(e, "indptr")
  with pytest.raises(ValueError) as e:
    _prefill_plan(jpa.BatchPrefillWithPagedKVCacheWrapper(), table,
                  np.array([0, 3, 2, 4], np.int32))
  _named(e, "qo_indptr")


def test_indptr_wrong_length(batch):
  table, _ = batch
  with pytest.raises(ValueError) as e:
    _decode_plan(jpa.BatchDecodeWithPagedKVCacheWrapper(), table,
                 last_page_len=table.last_page_len[:2])
  _named(e, "last_page_len")  # the batch size is len(indptr) - 1, as in FlashInfer
  assert "indptr must" not in str(e.value)
  with pytest.raises(ValueError) as e:
    _prefill_plan(jpa.BatchPrefillWithPagedKVCacheWrapper(), table,
                  np.array([0, 1, 2, 3], np.int32), paged_kv_last_page_len=table.last_page_len[:1])
  _named(e, "paged_kv_last_page_len")
  with pytest.raises(ValueError) as e:
    _prefill_plan(jpa.BatchPrefillWithPagedKVCacheWrapper(), table,
                  np.array([0, 1, 2], np.int32))
  _named(e, "qo_indptr")


def test_indptr_end_differs_from_len_indices(batch):
  table, _ = batch
  with pytest.raises(ValueError) as e:
    _decode_plan(jpa.BatchDecodeWithPagedKVCacheWrapper(), table, indices=table.indices[:-1])
  _named(e, "indptr", "indices")


def test_negative_page_index(batch):
  table, _ = batch
  bad = table.indices.copy()
  bad[0] = -1
  with pytest.raises(ValueError) as e:
    _decode_plan(jpa.BatchDecodeWithPagedKVCacheWrapper(), table, indices=bad)
  _named(e, "indices")


def test_page_index_beyond_cache(platform, device, batch):
  """Eager run: the plan's pages are checked against the cache given to run()."""
  table, cache = batch
  bad = table.indices.copy()
  bad[-1] = table.num_pages  # one past the last page
  with jax.default_device(device):
    w = jpa.BatchDecodeWithPagedKVCacheWrapper()
    _decode_plan(w, table, indices=bad)
    with pytest.raises(ValueError) as e:
      w.run(put(_q(3), device), put(cache, device))
  _named(e, "indices")
  with jax.default_device(device):
    w = jpa.BatchPrefillWithPagedKVCacheWrapper()
    _prefill_plan(w, table, np.array([0, 1, 2, 3], np.int32), paged_kv_indices=bad)
    with pytest.raises(ValueError) as e:
      w.run(put(_q(3), device), put(cache, device))
  _named(e, "paged_kv_indices")


@pytest.mark.parametrize("value", [0, PS + 1, -1])
def test_last_page_len_out_of_range(batch, value):
  table, _ = batch
  bad = table.last_page_len.copy()
  bad[1] = value
  with pytest.raises(ValueError) as e:
    _decode_plan(jpa.BatchDecodeWithPagedKVCacheWrapper(), table, last_page_len=bad)
  _named(e, "last_page_len")


def test_last_page_len_of_empty_request_is_free(rng):
  """A request without pages may carry any last_page_len in [0, page_size]."""
  table = page_table(rng, [5, 0], PS, last_len_of_empty=PS)
  _decode_plan(jpa.BatchDecodeWithPagedKVCacheWrapper(), table)


def test_index_arrays_must_be_integers(batch):
  table, _ = batch
  with pytest.raises(TypeError) as e:
    _decode_plan(jpa.BatchDecodeWithPagedKVCacheWrapper(), table,
                 indptr=table.indptr.astype(np.float32))
  _named(e, "indptr")


# ------------------------------------------------------------------ capacities


def test_capacity_batch_exceeded(batch):
  table, _ = batch
  w = jpa.BatchDecodeWithPagedKVCacheWrapper(max_batch_size=2)
  with pytest.raises(ValueError) as e:
    _decode_plan(w, table)
  _named(e, "max_batch_size")


def test_capacity_pages_exceeded(batch):
  table, _ = batch
  w = jpa.BatchDecodeWithPagedKVCacheWrapper(max_num_pages=2)
  with pytest.raises(ValueError) as e:
    _decode_plan(w, table)
  _named(e, "max_num_pages")


def test_capacity_tokens_exceeded(batch):
  table, _ = batch
  w = jpa.BatchPrefillWithPagedKVCacheWrapper(max_num_tokens=4)
  with pytest.raises(ValueError) as e:
    _prefill_plan(w, table, np.array([0, 2, 4, 5], np.int32))
  _named(e, "max_num_tokens")


def test_capacity_fixed_by_first_plan(batch, rng):
  """Without explicit capacities the first plan fixes them; a later, larger batch
  is rejected with a message naming the capacity to raise."""
  table, _ = batch
  w = jpa.BatchDecodeWithPagedKVCacheWrapper()
  _decode_plan(w, table)  # 3 requests -> capacity 4
  big = page_table(rng, [3] * 9, PS)
  with pytest.raises(ValueError) as e:
    _decode_plan(w, big)
  _named(e, "max_batch_size")


def test_q_rows_beyond_token_capacity_under_jit(batch):
  table, cache = batch
  w = jpa.BatchDecodeWithPagedKVCacheWrapper(max_batch_size=4)
  plan = _decode_plan(w, table)
  step = jax.jit(lambda q, c, p: w.run(q, c, plan=p))
  with pytest.raises(ValueError) as e:
    step(_q(5), cache, plan)
  _named(e, "q")


# ------------------------------------------------------------------- run() checks


def test_query_rows_differ_from_plan_eager(platform, device, batch):
  table, cache = batch
  with jax.default_device(device):
    w = jpa.BatchPrefillWithPagedKVCacheWrapper()
    _prefill_plan(w, table, np.array([0, 2, 4, 5], np.int32))
    with pytest.raises(ValueError) as e:
      w.run(put(_q(4), device), put(cache, device))
    _named(e, "q")
    assert "qo_indptr" in str(e.value)
    wd = jpa.BatchDecodeWithPagedKVCacheWrapper()
    _decode_plan(wd, table)
    with pytest.raises(ValueError) as e:
      wd.run(put(_q(2), device), put(cache, device))
    _named(e, "q")


def test_q_dtype_differs_from_plan(batch):
  table, cache = batch
  w = jpa.BatchDecodeWithPagedKVCacheWrapper()
  _decode_plan(w, table)
  with pytest.raises(TypeError) as e:
    w.run(_q(3, jnp.bfloat16), cache)
  _named(e, "q", "q_data_type")


def test_cache_dtype_differs_from_plan(batch):
  table, cache = batch
  w = jpa.BatchDecodeWithPagedKVCacheWrapper()
  _decode_plan(w, table)
  with pytest.raises(TypeError) as e:
    w.run(_q(3), cache.astype(jnp.bfloat16))
  _named(e, "paged_kv_cache", "kv_data_type")


def test_mixed_q_and_kv_dtypes_rejected_at_plan(batch):
  table, _ = batch
  with pytest.raises(TypeError) as e:
    _decode_plan(jpa.BatchDecodeWithPagedKVCacheWrapper(), table, kv_data_type="bfloat16")
  _named(e, "kv_data_type", "q_data_type")


def test_unsupported_dtype(batch):
  table, _ = batch
  with pytest.raises(TypeError) as e:
    _decode_plan(jpa.BatchDecodeWithPagedKVCacheWrapper(), table, q_data_type="int8")
  _named(e, "q_data_type")


@pytest.mark.parametrize("name", ["torch.float16", "torch.half", "torch.bfloat16"])
def test_torch_dtype_names_are_understood(batch, name):
  """FlashInfer code passes torch dtypes (or their names): they mean the same dtype."""
  table, _ = batch
  plan = _decode_plan(jpa.BatchDecodeWithPagedKVCacheWrapper(), table, q_data_type=name)
  assert plan.config.q_dtype == {"torch.bfloat16": "bfloat16"}.get(name, "float16")
  with pytest.raises(TypeError) as e:
    _decode_plan(jpa.BatchDecodeWithPagedKVCacheWrapper(), table, q_data_type="torch.int8")
  _named(e, "q_data_type")
  assert "torch.float16" in str(e.value)  # says what to pass


def test_workspace_buffer_is_taken_by_its_size(batch):
  """FlashInfer's first argument is a float workspace buffer: any array works, and its
  byte size bounds the split-KV partials as workspace_size does."""
  table, _ = batch
  for buffer in (np.zeros(1 << 20, np.uint8), jnp.zeros((1 << 18,), jnp.float32)):
    by_buffer = _decode_plan(jpa.BatchDecodeWithPagedKVCacheWrapper(buffer), table)
    by_size = _decode_plan(jpa.BatchDecodeWithPagedKVCacheWrapper(1 << 20), table)
    assert by_buffer.config.caps == by_size.config.caps
  small = _decode_plan(jpa.BatchDecodeWithPagedKVCacheWrapper(np.zeros(4096, np.uint8)), table)
  assert small.config.caps.partial_rows < by_size.config.caps.partial_rows
  for bad in ("128MB", 0, -5):
    with pytest.raises((TypeError, ValueError)) as e:
      jpa.BatchPrefillWithPagedKVCacheWrapper(bad)
    _named(e, "float_workspace_buffer")


def test_plan_of_the_other_wrapper_kind_is_rejected(batch):
  """A prefill plan given to a decode run() (or the reverse) names `plan`; a tensor-core
  decode plan, which runs the prefill kernel, is still a decode plan."""
  table, cache = batch
  prefill = jpa.BatchPrefillWithPagedKVCacheWrapper()
  prefill_plan = _prefill_plan(prefill, table, np.arange(4, dtype=np.int32))
  decode = jpa.BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=True)
  decode_plan = _decode_plan(decode, table)
  with pytest.raises(ValueError) as e:
    decode.run(_q(3), cache, plan=prefill_plan)
  _named(e, "plan")
  with pytest.raises(ValueError) as e:
    prefill.run(_q(3), cache, plan=decode_plan)
  _named(e, "plan")
  assert decode.run(_q(3), cache, plan=decode_plan).shape == (3, HQ, D)


def test_layout_differs_between_plan_and_run(batch):
  table, cache = batch
  w_hnd = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout="HND")
  plan = _decode_plan(w_hnd, table)
  w_nhd = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout="NHD")
  _decode_plan(w_nhd, table)
  with pytest.raises(ValueError) as e:
    w_nhd.run(_q(3), cache, plan=plan)
  _named(e, "kv_layout")


def test_cache_in_the_other_layout(batch, rng):
  """An HND cache handed to an NHD plan: its dims do not match the plan."""
  table, _ = batch
  k, v = random_cache(rng, table.num_pages, PS, HK, D, "f16")
  hnd = cache_in_form(k, v, "f16", "HND", "5d")
  w = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout="NHD")
  _decode_plan(w, table)
  with pytest.raises(ValueError) as e:
    w.run(_q(3), hnd)
  _named(e, "paged_kv_cache")


@pytest.mark.parametrize(
    "bad", ["rank4", "rank6", "axis1", "tuple3", "tuple_mismatch", "tuple_rank5"])
def test_wrong_cache_rank_or_shape(batch, bad):
  table, cache = batch
  k, v = cache[:, 0], cache[:, 1]
  bad_cache = {
      "rank4": k,
      "rank6": cache[None],
      "axis1": np.concatenate([cache, cache[:, :1]], axis=1),
      "tuple3": (k, v, v),
      "tuple_mismatch": (k, v[:-1]),
      "tuple_rank5": (cache, cache),
  }[bad]
  w = jpa.BatchDecodeWithPagedKVCacheWrapper()
  _decode_plan(w, table)
  with pytest.raises(ValueError) as e:
    w.run(_q(3), bad_cache)
  _named(e, "paged_kv_cache")


def test_q_shape_differs_from_plan(batch):
  table, cache = batch
  w = jpa.BatchDecodeWithPagedKVCacheWrapper()
  _decode_plan(w, table)
  with pytest.raises(ValueError) as e:
    w.run(_q(3, heads=HQ // 2), cache)
  _named(e, "q")


def test_run_before_plan(batch):
  _, cache = batch
  with pytest.raises(RuntimeError, match="plan"):
    jpa.BatchDecodeWithPagedKVCacheWrapper().run(_q(3), cache)


# ------------------------------------------------------------- static configuration


def test_head_counts_not_divisible(batch):
  table, _ = batch
  with pytest.raises(ValueError) as e:
    _decode_plan(jpa.BatchDecodeWithPagedKVCacheWrapper(), table, num_qo_heads=6,
                 num_kv_heads=4)
  _named(e, "num_qo_heads", "num_kv_heads")


@pytest.mark.parametrize("head_dim", [32, 96, 512])
def test_unsupported_head_dim(batch, head_dim):
  table, _ = batch
  with pytest.raises(ValueError) as e:
    _decode_plan(jpa.BatchDecodeWithPagedKVCacheWrapper(), table, head_dim=head_dim)
  _named(e, "head_dim")


def test_unknown_pos_encoding_mode(batch):
  table, _ = batch
  with pytest.raises(ValueError) as e:
    _decode_plan(jpa.BatchDecodeWithPagedKVCacheWrapper(), table, pos_encoding_mode="ROPE")
  _named(e, "pos_encoding_mode")


def test_unknown_kv_layout():
  with pytest.raises(ValueError) as e:
    jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout="NDH")
  _named(e, "kv_layout")


# ------------------------------------------------------------------------- append


def _append_args(rng, n=3):
  table = page_table(rng, [5, 9], PS, spare_pages=1)
  k, v = random_cache(rng, table.num_pages, PS, HK, D, "f16")
  cache = cache_in_form(k, v, "f16", "NHD", "5d")
  new = np.ones((n, HK, D), np.float16)
  bi = np.array([0, 1, 1][:n], np.int32)
  pos = np.array([4, 7, 8][:n], np.int32)
  return dict(append_key=new, append_value=new, batch_indices=bi, positions=pos,
              paged_kv_cache=cache, kv_indices=table.indices, kv_indptr=table.indptr,
              kv_last_page_len=table.last_page_len)


def test_append_valid_baseline(rng):
  """The unmodified arguments of the append checks below are accepted."""
  jpa.append_paged_kv_cache(**_append_args(rng))


@pytest.mark.parametrize("bad", ["key_dtype", "key_heads", "value_shape", "batch_indices_len",
                                 "positions_outside", "batch_index_too_big", "page_beyond_cache",
                                 "kv_indptr_start", "kv_indptr_end"])
def test_append_rejects(rng, bad):
  a = _append_args(rng)
  name, exc = {
      "key_dtype": ("append_key", TypeError),
      "key_heads": ("append_key", ValueError),
      "value_shape": ("append_value", ValueError),
      "batch_indices_len": ("batch_indices", ValueError),
      "positions_outside": ("positions", ValueError),
      "batch_index_too_big": ("batch_indices", ValueError),
      "page_beyond_cache": ("kv_indices", ValueError),
      "kv_indptr_start": ("kv_indptr", ValueError),
      "kv_indptr_end": ("kv_indptr", ValueError),
  }[bad]
  if bad == "key_dtype":
    a["append_key"] = a["append_key"].astype(jnp.bfloat16)
  elif bad == "key_heads":
    a["append_key"] = np.ones((3, HK + 1, D), np.float16)
  elif bad == "value_shape":
    a["append_value"] = np.ones((2, HK, D), np.float16)
  elif bad == "batch_indices_len":
    a["batch_indices"] = a["batch_indices"][:2]
  elif bad == "positions_outside":
    a["positions"] = np.array([4, 7, 9], np.int32)  # request 1 holds 9 keys: 0..8
  elif bad == "batch_index_too_big":
    a["batch_indices"] = np.array([0, 1, 2], np.int32)
  elif bad == "page_beyond_cache":
    a["kv_indices"] = a["kv_indices"].copy()
    a["kv_indices"][0] = a["paged_kv_cache"].shape[0]
  elif bad == "kv_indptr_start":
    a["kv_indptr"] = a["kv_indptr"] + 1
  elif bad == "kv_indptr_end":
    a["kv_indptr"] = a["kv_indptr"].copy()
    a["kv_indptr"][-1] += 1
  with pytest.raises(exc) as e:
    jpa.append_paged_kv_cache(**a)
  _named(e, name)


# -------------------------------------------------------------- transformations


def test_vmap_is_rejected_or_correct(batch):
  """vmap over a stack of queries either raises an error that says vmap is not
  supported, or gives the per-instance results."""
  table, cache = batch
  w = jpa.BatchDecodeWithPagedKVCacheWrapper()
  plan = _decode_plan(w, table)
  qs = np.random.default_rng(0).standard_normal((2, 3, HQ, D)).astype(np.float16)
  try:
    got = jax.vmap(lambda q: w.run(q, cache, plan=plan))(qs)
  except Exception as e:  # noqa: BLE001 - the message is what is checked
    assert "vmap" in str(e), f"vmap failed without saying why: {type(e).__name__}: {e}"
    return
  for i in range(2):
    want = w.run(qs[i], cache, plan=plan)
    np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(want))


def test_grad_is_rejected(batch):
  table, cache = batch
  w = jpa.BatchDecodeWithPagedKVCacheWrapper()
  plan = _decode_plan(w, table)
  f = lambda q: w.run(q, cache, plan=plan).astype(jnp.float32).sum()
  with pytest.raises(Exception) as e:  # noqa: PT011 - checked by message below
    jax.grad(f)(_q(3))
  assert re.search(r"differentiab|grad|jvp", str(e.value)), str(e.value)
