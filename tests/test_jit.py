"""Under jax.jit: new plans do not recompile, and the donated cache is written in place."""

from __future__ import annotations

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_pagedattn as jpa

from _helpers import (DTYPES, assert_attention_close, cache_in_form, oracle, page_table, put,
                      random_cache, round_to)


def _jit_cache_size(fn):
  """Compiled entries of a jitted function, where this jax exposes the count."""
  size = getattr(fn, "_cache_size", None)
  return size() if callable(size) else None


@pytest.mark.parametrize("tensor_cores", [False, True])
def test_decode_step_compiles_once_for_new_plans(platform, device, rng, tensor_cores):
  """Batches of different size, lengths and page placement within the same
  capacities reuse one compiled step; each result is still right."""
  dtype = "f16"
  dt = DTYPES[dtype]
  hq, hk, d, ps = 8, 2, 64, 8
  max_batch, num_pages = 8, 96
  k, v = random_cache(rng, num_pages, ps, hk, d, dtype)
  cache = put(cache_in_form(k, v, dtype, "NHD", "5d"), device)
  traces = []

  with jax.default_device(device):
    w = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout="NHD", use_tensor_cores=tensor_cores,
                                               max_batch_size=max_batch,
                                               max_num_pages=num_pages)

    @jax.jit
    def step(q, cache, plan):
      traces.append(None)  # runs once per trace, i.e. per compilation
      return w.run(q, cache, return_lse=True, plan=plan)

    for kv_lens in ([5, 17, 1, 40, 8], [64, 64, 3, 9, 0, 12, 7, 33], [100], [2, 2]):
      table = page_table(rng, kv_lens, ps, spare_pages=0)
      # Spread the batch over the whole cache, not only its first pages.
      table.indices = rng.choice(num_pages, len(table.indices),
                                 replace=False).astype(np.int32)
      plan = w.plan(table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
                    q_data_type="float16")
      q = round_to(rng.standard_normal((max_batch, hq, d), dtype=np.float32), dt)
      out, lse = step(put(q.astype(np.float16), device), cache, plan)
      table.num_pages = num_pages
      ref_out, ref_lse = oracle(q, k, v, np.arange(len(kv_lens) + 1), table)
      assert_attention_close(out, lse, ref_out, ref_lse, dtype, what=str(kv_lens))
  assert len(traces) == 1, f"step traced {len(traces)} times for plans of equal capacity"
  size = _jit_cache_size(step)
  if size is not None:
    assert size == 1


def test_prefill_step_compiles_once_for_new_plans(platform, device, rng):
  dtype = "bf16"
  dt = DTYPES[dtype]
  hq, hk, d, ps = 4, 4, 128, 16
  max_tokens, num_pages = 64, 40
  k, v = random_cache(rng, num_pages, ps, hk, d, dtype)
  cache = put(cache_in_form(k, v, dtype, "HND", "tuple"), device)
  traces = []
  with jax.default_device(device):
    w = jpa.BatchPrefillWithPagedKVCacheWrapper(kv_layout="HND", max_batch_size=4,
                                                max_num_pages=num_pages,
                                                max_num_tokens=max_tokens)

    @jax.jit
    def step(q, cache, plan):
      traces.append(None)
      return w.run(q, cache, return_lse=True, plan=plan)

    batches = (([10, 3], [50, 3]), ([1, 1, 30, 2], [100, 1, 30, 160]), ([64], [64]))
    for qo_lens, kv_lens in batches:
      used = int(sum(-(-np.array(kv_lens) // ps)))
      table = page_table(rng, kv_lens, ps, spare_pages=num_pages - used)
      qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
      plan = w.plan(qo_indptr, table.indptr, table.indices, table.last_page_len, hq, hk, d,
                    ps, causal=True, q_data_type="bfloat16")
      q = round_to(rng.standard_normal((max_tokens, hq, d), dtype=np.float32), dt)
      out, lse = step(put(q.astype(jnp.bfloat16), device), cache, plan)
      ref_out, ref_lse = oracle(q, k, v, qo_indptr, table, causal=True)
      assert_attention_close(out, lse, ref_out, ref_lse, dtype, what=str(qo_lens))
  assert len(traces) == 1, f"step traced {len(traces)} times for plans of equal capacity"


def _hlo_shape(x):
  """HLO spelling of an array type, e.g. bf16[40,2,16,4,64]."""
  name = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[jnp.dtype(x.dtype).name]
  return f"{name}[{','.join(str(n) for n in x.shape)}]"


def _cache_copies(hlo_text, cache_leaves):
  """HLO instructions that copy an array of the cache's type (copy / copy-start)."""
  shapes = {_hlo_shape(x) for x in cache_leaves}
  bad = []
  for line in hlo_text.splitlines():
    if re.search(r"\bcopy(-start)?\(", line) and any(s in line for s in shapes):
      bad.append(line.strip())
  return bad


@pytest.mark.parametrize("form", ["5d", "tuple"])
@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
@pytest.mark.parametrize("with_decode", [False, True])
def test_donated_append_is_in_place(platform, device, rng, form, kv_layout, with_decode):
  """jit(append, donate cache): no copy of the cache in the compiled HLO, the output
  aliases the donated input, and every slot the append does not address is
  bit-identical afterwards."""
  dtype = "bf16"
  dt = DTYPES[dtype]
  hq, hk, d, ps = 8, 2, 64, 16
  old_lens = np.array([15, 0, 31, 4])
  table = page_table(rng, old_lens + 1, ps, spare_pages=5)
  k, v = random_cache(rng, table.num_pages, ps, hk, d, dtype)
  cache_np = cache_in_form(k, v, dtype, kv_layout, form)
  bi = np.arange(4, dtype=np.int32)
  pos = old_lens.astype(np.int32)
  new_k = round_to(rng.standard_normal((4, hk, d), dtype=np.float32), dt).astype(np.dtype(dt))
  new_v = round_to(rng.standard_normal((4, hk, d), dtype=np.float32), dt).astype(np.dtype(dt))
  q = put(np.ones((4, hq, d), np.dtype(dt)), device)

  with jax.default_device(device):
    w = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout=kv_layout)
    plan = w.plan(table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
                  q_data_type="bfloat16")

    @functools.partial(jax.jit, donate_argnames="cache")
    def step(nk, nv, bi, pos, cache, indices, indptr, last, q, plan):
      cache = jpa.append_paged_kv_cache(nk, nv, bi, pos, cache, indices, indptr, last,
                                        kv_layout=kv_layout)
      if with_decode:
        return cache, w.run(q, cache, plan=plan)
      return cache, None

    args = put((new_k, new_v, bi, pos, cache_np, table.indices, table.indptr,
                table.last_page_len, q), device)
    cache_in = args[4]
    compiled = step.lower(*args, plan).compile()
    text = compiled.as_text()
    leaves = jax.tree_util.tree_leaves(cache_in)
    assert not _cache_copies(text, leaves), "\n".join(_cache_copies(text, leaves))
    assert "input_output_alias" in text, "the compiled step aliases no output to an input"
    with warnings.catch_warnings():
      # jax warns "Some donated buffers were not usable" when donation fails.
      warnings.filterwarnings("error", message=".*donated buffers.*")
      new_cache, _ = step(*args, plan)
      jax.block_until_ready(new_cache)
  assert all(x.is_deleted() for x in leaves), "donated cache buffers were not consumed"

  got = jax.device_get(new_cache)
  # Expected: the original arrays with exactly the appended slots replaced.
  from test_append import _as_nhd_f32, _expected_after_append  # noqa: PLC0415
  want_k, want_v = _expected_after_append(k, v, table, bi, pos, new_k.astype(np.float32),
                                          new_v.astype(np.float32), ps)
  got_k, got_v = _as_nhd_f32(got, kv_layout)
  np.testing.assert_array_equal(got_k, want_k)
  np.testing.assert_array_equal(got_v, want_v)
