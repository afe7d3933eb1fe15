"""Kernels trust nothing (shared/DESIGN.md §3): under jit the plan and the append
indices are operands nobody checked. Any contents give outputs of the right shape and,
at worst, wrong numbers inside them: no write outside them, no fault, no hang (on the
GPU scripts/sanitizer_cases.py runs the same cases under compute-sanitizer), and the
next valid call is still right."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import jax_pagedattn as jpa
from jax_pagedattn import layout as layout_lib
from jax_pagedattn import planning, primitives

import garbage_plans
from _helpers import (DTYPES, assert_attention_close, cache_in_form, cpu, oracle, page_table,
                      put, random_cache, round_to)

HQ, HK, D = 8, 2, 64


def _batch(rng, ps, kv_lens=(37, 1, 0, 64, 9)):
  table = page_table(rng, list(kv_lens), ps, spare_pages=5)
  k, v = random_cache(rng, table.num_pages, ps, HK, D, "f16")
  return table, k, v


# (wrapper kind, use_tensor_cores): the three attention kernels.
KERNELS = [("decode", False), ("decode", True), ("prefill", False)]


def _wrapper_and_plan(kind, tensor_cores, table, ps, qo_indptr):
  if kind == "decode":
    w = jpa.BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=tensor_cores)
    plan = w.plan(table.indptr, table.indices, table.last_page_len, HQ, HK, D, ps,
                  q_data_type="float16")
  else:
    w = jpa.BatchPrefillWithPagedKVCacheWrapper()
    plan = w.plan(qo_indptr, table.indptr, table.indices, table.last_page_len, HQ, HK, D, ps,
                  causal=True, q_data_type="float16")
  return w, plan


@pytest.mark.parametrize("kind,tensor_cores", KERNELS, ids=["decode-cc", "decode-tc", "prefill"])
@pytest.mark.parametrize("garbage", garbage_plans.KINDS)
def test_garbage_plans_stay_inside_the_outputs(platform, device, rng, kind, tensor_cores,
                                               garbage):
  ps = 16
  table, k, v = _batch(rng, ps)
  qo_lens = np.ones(5, np.int64) if kind == "decode" else np.minimum(table.kv_lens, [5, 1, 0, 40, 9])
  qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
  rows = int(qo_indptr[-1])
  q = round_to(rng.standard_normal((rows, HQ, D), dtype=np.float32), DTYPES["f16"])
  cache = put(cache_in_form(k, v, "f16", "NHD", "5d"), device)
  with jax.default_device(device):
    w, plan = _wrapper_and_plan(kind, tensor_cores, table, ps, qo_indptr)
    step = jax.jit(lambda q, cache, p: w.run(q, cache, return_lse=True, plan=p))
    qd = put(q.astype(np.float16), device)
    for i in range(3):
      bad = garbage_plans.garbage_plan(plan, rng, garbage)
      out, lse = jax.block_until_ready(step(qd, cache, bad))
      assert out.shape == q.shape and lse.shape == q.shape[:2], (i, out.shape)
    # q with fewer rows than the plan's tokens: the kernels stop at q's last row.
    short = jax.block_until_ready(step(qd[: rows // 2], cache, plan))
    assert short[0].shape == (rows // 2, HQ, D)
    out, lse = step(qd, cache, plan)  # and the device is still fine
  ref_out, ref_lse = oracle(q, k, v, qo_indptr, table, causal=kind == "prefill")
  assert_attention_close(out, lse, ref_out, ref_lse, "f16", what=f"{kind} after garbage")


def _append(device, args, kv_layout="NHD"):
  with jax.default_device(device):
    return jax.jit(functools.partial(jpa.append_paged_kv_cache, kv_layout=kv_layout))(
        *put(args, device))


def _reference_append_lowering(args):
  """The jax.numpy lowering that platforms without native handlers use, under jit."""
  new_k, new_v, bi, pos, cache, indices, indptr, _ = args
  rule = functools.partial(primitives._reference_append, kv_layout="NHD",  # noqa: SLF001
                           combined=True)
  with jax.default_device(cpu()):
    return jax.jit(rule)(new_k, new_v, bi, pos, indices, indptr, cache)[0]


@pytest.mark.parametrize("ps", [1, 16])
@pytest.mark.parametrize("backend", ["native", "jnp"])
def test_append_at_any_int32_position_writes_only_owned_pages(platform, device, rng, ps,
                                                              backend):
  """Positions up to 2^31 - 1, negative ones and bad request indices under jit: the
  rows inside their request's pages land, every other row is dropped, nothing else of
  the cache changes (an int32 kv_indptr[b] + pos / page_size would wrap into other
  requests' pages or outside kv_indices)."""
  if backend == "jnp" and platform != "cpu":
    pytest.skip("the jax.numpy lowering is checked once, on the CPU")
  pages = [2, 1, 3]
  table = page_table(rng, [n * ps for n in pages], ps, spare_pages=4)
  k, v = random_cache(rng, table.num_pages, ps, HK, D, "f16")
  cache = cache_in_form(k, v, "f16", "NHD", "5d")
  bi, pos, valid = garbage_plans.extreme_append_rows(pages, ps)
  new_k = round_to(rng.standard_normal((len(bi), HK, D), dtype=np.float32), DTYPES["f16"])
  new_v = round_to(rng.standard_normal((len(bi), HK, D), dtype=np.float32), DTYPES["f16"])
  args = (new_k.astype(np.float16), new_v.astype(np.float16), bi, pos, cache, table.indices,
          table.indptr, table.last_page_len)
  got = _append(device, args) if backend == "native" else _reference_append_lowering(args)
  want_k, want_v = k.copy(), v.copy()
  for i in np.flatnonzero(valid):
    page = table.indices[table.indptr[bi[i]] + pos[i] // ps]
    want_k[page, pos[i] % ps] = new_k[i]
    want_v[page, pos[i] % ps] = new_v[i]
  got = np.asarray(jax.device_get(got)).astype(np.float32)
  np.testing.assert_array_equal(got[:, 0], want_k)
  np.testing.assert_array_equal(got[:, 1], want_v)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("backend", ["native", "jnp"])
def test_append_with_garbage_indices_writes_no_page_it_must_not(platform, device, seed,
                                                                backend):
  """Random int32 kv_indptr and kv_indices as well: a row lands only where the rule
  allows (slot = kv_indptr[b] + pos // page_size, counted without wrapping, inside
  [kv_indptr[b], kv_indptr[b+1]) and inside kv_indices, page inside the cache); every
  row it allows lands exactly there."""
  if backend == "jnp" and platform != "cpu":
    pytest.skip("the jax.numpy lowering is checked once, on the CPU")
  rng = np.random.default_rng(seed)
  ps, num_pages, batch, n = 4, 12, 5, 40
  k, v = random_cache(rng, num_pages, ps, HK, D, "f16")
  cache = cache_in_form(k, v, "f16", "NHD", "5d")
  indptr = rng.choice([0, 1, 3, 7, -2, 2**31 - 1, -(2**31)], size=batch + 1).astype(np.int32)
  indices = rng.integers(-3, num_pages + 3, size=9).astype(np.int32)
  bi = rng.integers(-1, batch + 1, size=n).astype(np.int32)
  pos = rng.choice([0, 1, 5, 9, 2**31 - 1, 2**30, -1], size=n).astype(np.int32)
  new_k = round_to(rng.standard_normal((n, HK, D), dtype=np.float32), DTYPES["f16"])
  new_v = round_to(rng.standard_normal((n, HK, D), dtype=np.float32), DTYPES["f16"])
  args = (new_k.astype(np.float16), new_v.astype(np.float16), bi, pos, cache, indices, indptr,
          np.ones(batch, np.int32))
  got = _append(device, args) if backend == "native" else _reference_append_lowering(args)
  got = np.asarray(jax.device_get(got)).astype(np.float32)
  targets = {}
  for i in range(n):
    if not 0 <= bi[i] < batch or pos[i] < 0:
      continue
    slot = int(indptr[bi[i]]) + int(pos[i]) // ps
    if slot < 0 or slot >= indptr[bi[i] + 1] or slot >= len(indices):
      continue
    page = int(indices[slot])
    if 0 <= page < num_pages:
      targets.setdefault((page, int(pos[i]) % ps), []).append(i)
  want_k, want_v = k.copy(), v.copy()
  for (page, s), rows in targets.items():
    if len(rows) == 1:  # a slot written twice may keep either row
      want_k[page, s], want_v[page, s] = new_k[rows[0]], new_v[rows[0]]
  for (page, s), rows in targets.items():
    if len(rows) > 1:
      assert any(np.array_equal(got[page, 0, s], new_k[r]) for r in rows)
      want_k[page, s], want_v[page, s] = got[page, 0, s], got[page, 1, s]
  np.testing.assert_array_equal(got[:, 0], want_k)
  np.testing.assert_array_equal(got[:, 1], want_v)


def test_jnp_fallback_masks_out_of_range_page_ids(rng):
  """The jax.numpy lowering, given a plan whose page table names pages outside the
  cache (as only a plan edited under jit can), drops those keys as the native kernels
  do, instead of reading some other page; the CPU handler agrees."""
  ps = 4
  table, k, v = _batch(rng, ps, kv_lens=(13, 20, 7))
  q = round_to(rng.standard_normal((3, HQ, D), dtype=np.float32), DTYPES["f16"])
  cache = cache_in_form(k, v, "f16", "NHD", "5d")
  with jax.default_device(cpu()):
    w = jpa.BatchDecodeWithPagedKVCacheWrapper()
    plan = w.plan(table.indptr, table.indices, table.last_page_len, HQ, HK, D, ps,
                  q_data_type="float16")
  sections = planning.plan_sections(plan.config.caps)
  off = sections["kv_indices"][0]
  buf = np.array(plan.buffer)
  # Request 1's second page (a full one): beyond the cache; request 2's first: negative.
  bad_slots = [int(table.indptr[1]) + 1, int(table.indptr[2])]
  buf[off + bad_slots[0]] = table.num_pages + 5
  buf[off + bad_slots[1]] = -3
  bad = jpa.Plan(buf, plan.config)
  info = layout_lib.inspect_cache(cache, "NHD")
  rule = functools.partial(primitives._reference_attention, config=bad.config,  # noqa: SLF001
                           combined=info.combined)
  with jax.default_device(cpu()):
    none = np.zeros((0,), np.float32)  # no sinks, no scales
    out, lse, _ = jax.jit(rule)(q.astype(np.float16), cache, cache, bad.buffer, none, none)
    native_out, native_lse = jax.jit(lambda q, c, p: w.run(q, c, return_lse=True, plan=p))(
        q.astype(np.float16), cache, bad)
  # The expected batch: the same keys without the two masked pages (no position
  # encoding, no causal mask: which keys remain is all that matters).
  keep = np.ones(len(table.indices), bool)
  keep[bad_slots] = False
  pages = np.diff(table.indptr) - np.array([0, 1, 1])
  masked = page_table(rng, [0, 0, 0], ps)
  masked.indices = table.indices[keep]
  masked.indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
  masked.last_page_len = table.last_page_len
  masked.num_pages = table.num_pages
  ref_out, ref_lse = oracle(q, k, v, np.arange(4, dtype=np.int32), masked)
  assert_attention_close(out, lse, ref_out, ref_lse, "f16", what="jnp fallback")
  assert_attention_close(native_out, native_lse, ref_out, ref_lse, "f16", what="cpu native")
