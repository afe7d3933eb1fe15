"""append_paged_kv_cache and get_batch_indices_positions: exact writes, nothing else touched."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_pagedattn as jpa
from jax_pagedattn import reference

from _helpers import DTYPES, cache_in_form, cpu, page_table, put, random_cache, round_to


def _indices_positions_loop(append_indptr, seq_lens, nnz):
  """The definition, one row at a time (independent of both implementations)."""
  bi = np.full(nnz, -1, np.int32)
  pos = np.full(nnz, -1, np.int32)
  for b in range(len(append_indptr) - 1):
    n = append_indptr[b + 1] - append_indptr[b]
    for i in range(append_indptr[b], append_indptr[b + 1]):
      bi[i] = b
      pos[i] = seq_lens[b] - n + (i - append_indptr[b])
  return bi, pos


@pytest.mark.parametrize("extra_rows", [0, 5])
def test_get_batch_indices_positions(platform, device, rng, extra_rows):
  append_lens = np.array([3, 0, 1, 7, 0, 2])
  old_lens = np.array([0, 4, 9, 16, 0, 1])
  append_indptr = np.concatenate([[0], np.cumsum(append_lens)]).astype(np.int32)
  seq_lens = (old_lens + append_lens).astype(np.int32)
  nnz = int(append_indptr[-1]) + extra_rows
  want = _indices_positions_loop(append_indptr, seq_lens, nnz)
  with jax.default_device(device):
    got = jpa.get_batch_indices_positions(put(append_indptr, device), put(seq_lens, device),
                                          nnz)
    jitted = jax.jit(jpa.get_batch_indices_positions, static_argnums=2)(
        put(append_indptr, device), put(seq_lens, device), nnz)
  for g in (got, jitted):
    assert len(g) == 2
    np.testing.assert_array_equal(np.asarray(g[0]), want[0])
    np.testing.assert_array_equal(np.asarray(g[1]), want[1])
    assert g[0].dtype == jnp.int32 and g[1].dtype == jnp.int32
  with jax.default_device(cpu()):
    ref = reference.get_batch_indices_positions(append_indptr, seq_lens, nnz)
  np.testing.assert_array_equal(np.asarray(ref[0]), want[0])
  np.testing.assert_array_equal(np.asarray(ref[1]), want[1])


def _expected_after_append(k, v, table, bi, pos, new_k, new_v, page_size):
  """NHD float32 pages after writing row i to (request bi[i], position pos[i])."""
  k, v = k.copy(), v.copy()
  for i in range(len(bi)):
    if bi[i] < 0:
      continue
    page = table.indices[table.indptr[bi[i]] + pos[i] // page_size]
    k[page, pos[i] % page_size] = new_k[i]
    v[page, pos[i] % page_size] = new_v[i]
  return k, v


def _as_nhd_f32(cache, kv_layout):
  k, v = reference.split_paged_kv_cache(cache, kv_layout)
  return np.asarray(k.astype(jnp.float32)), np.asarray(v.astype(jnp.float32))


@pytest.mark.grid("append")
@pytest.mark.parametrize("jit", [False, True])
def test_append_matches_reference(platform, case, device, rng, jit):
  dtype, kv_layout, form, ps = case.dtype, case.kv_layout, case.form, case.page_size
  hk, d = 4, 64
  old_lens = np.array([0, 5, ps, 3 * ps - 1, 0, 2])
  append_lens = np.array([3, 1, ps, 2, 0, 2 * ps + 1])  # crosses page boundaries
  seq_lens = old_lens + append_lens
  table = page_table(rng, seq_lens, ps, spare_pages=3)
  k, v = random_cache(rng, table.num_pages, ps, hk, d, dtype)
  cache = cache_in_form(k, v, dtype, kv_layout, form)
  append_indptr = np.concatenate([[0], np.cumsum(append_lens)]).astype(np.int32)
  nnz = int(append_indptr[-1]) + 3  # 3 padding rows: batch index -1, skipped
  bi, pos = _indices_positions_loop(append_indptr, seq_lens.astype(np.int32), nnz)
  dt = DTYPES[dtype]
  new_k = round_to(rng.standard_normal((nnz, hk, d), dtype=np.float32), dt)
  new_v = round_to(rng.standard_normal((nnz, hk, d), dtype=np.float32), dt)

  def append(*a):
    return jpa.append_paged_kv_cache(*a, kv_layout=kv_layout)

  with jax.default_device(device):
    args = put((new_k.astype(np.dtype(dt)), new_v.astype(np.dtype(dt)), bi, pos, cache,
                table.indices, table.indptr, table.last_page_len), device)
    got = (jax.jit(append) if jit else append)(*args)
  # Same structure back: a (k, v) tuple for a tuple, one 5-D array for a 5-D cache.
  if form == "tuple":
    assert isinstance(got, tuple) and len(got) == 2
    assert got[0].shape == cache[0].shape and got[1].shape == cache[1].shape
  else:
    assert not isinstance(got, (tuple, list)) and got.shape == cache.shape
  leaves = jax.tree_util.tree_leaves(got)
  assert all(x.dtype == dt for x in leaves)
  assert all(x.devices() == {device} for x in leaves)

  want_k, want_v = _expected_after_append(k, v, table, bi, pos, new_k, new_v, ps)
  got_k, got_v = _as_nhd_f32(jax.device_get(got), kv_layout)
  # Writes are copies: bit-exact, and every slot not written keeps its old value.
  np.testing.assert_array_equal(got_k, want_k)
  np.testing.assert_array_equal(got_v, want_v)
  assert not np.array_equal(want_k, k)  # the append did write something

  with jax.default_device(cpu()):
    ref = reference.append_paged_kv_cache(
        new_k.astype(np.dtype(dt)), new_v.astype(np.dtype(dt)), bi, pos, cache,
        table.indices, table.indptr, table.last_page_len, kv_layout=kv_layout)
  ref_k, ref_v = _as_nhd_f32(ref, kv_layout)
  np.testing.assert_array_equal(ref_k, want_k)
  np.testing.assert_array_equal(ref_v, want_v)


def test_append_then_decode_sees_new_keys(platform, device, rng):
  """The decode step after an append reads the appended token (end-to-end order)."""
  dtype = "bf16" if platform == "gpu" else "f32"
  dt = DTYPES[dtype]
  hq, hk, d, ps = 8, 2, 64, 16
  old_lens = np.array([15, 16, 1])
  table = page_table(rng, old_lens + 1, ps)
  k, v = random_cache(rng, table.num_pages, ps, hk, d, dtype)
  cache = cache_in_form(k, v, dtype, "NHD", "5d")
  bi = np.arange(3, dtype=np.int32)
  pos = old_lens.astype(np.int32)
  new_k = round_to(rng.standard_normal((3, hk, d), dtype=np.float32), dt)
  new_v = round_to(10 + rng.standard_normal((3, hk, d), dtype=np.float32), dt)
  q = round_to(rng.standard_normal((3, hq, d), dtype=np.float32), dt)
  with jax.default_device(device):
    w = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout="NHD")
    plan = w.plan(table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
                  q_data_type=np.dtype(dt))

    @jax.jit
    def step(q, nk, nv, cache, plan):
      cache = jpa.append_paged_kv_cache(nk, nv, bi, pos, cache, table.indices,
                                        table.indptr, table.last_page_len, kv_layout="NHD")
      return w.run(q, cache, plan=plan), cache

    out, _ = step(*put((q.astype(np.dtype(dt)), new_k.astype(np.dtype(dt)),
                        new_v.astype(np.dtype(dt)), cache), device), plan)
  want_k, want_v = _expected_after_append(k, v, table, bi, pos, new_k, new_v, ps)
  with jax.default_device(cpu()):
    ref, _ = reference.batch_decode(q, (want_k, want_v), table.indptr, table.indices,
                                    table.last_page_len)
  tol = 2e-5 if dtype == "f32" else 2e-2
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), np.asarray(ref),
                             atol=tol, rtol=tol)
