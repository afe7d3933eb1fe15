"""Batch invariance (FlashInfer 0.7's fixed_split_size / disable_split_kv): a request's
output and lse are bitwise the same whatever else is in the batch.

One cache serves every batch: request R owns the same pages in it each time, the other
requests draw theirs from a pool of other pages. R is planned alone, then inside batches
of other random requests (different sizes, R at different positions, so different
capacities, bins and neighbours), and its rows must come back with the same bits.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import jax_pagedattn as jpa
from jax_pagedattn import planning

from _helpers import (DTYPES, PageTable, assert_attention_close, check_native, oracle, put,
                      round_to)

PAGE = 16
HEADS = (8, 2)
HEAD_DIM = 128
# R's keys; its pages come first in the cache, the pool of the others' after them.
R_KV_LEN = 3001
POOL_OFFSET = -(-R_KV_LEN // PAGE)
POOL_PAGES = 1200
# (batch size, R's position): R alone first, then among others, front, middle and last.
LAYOUTS = ((1, 0), (6, 0), (21, 10), (40, 39))
# Work item fields (docs/CONTRACT.md).
REQ, KV_B, KV_E, SPLIT = 0, 3, 4, 5


@dataclasses.dataclass
class Request:
  kv_len: int
  qo_len: int
  pages: np.ndarray  # int32 page ids in the shared cache
  q: np.ndarray  # float32 [qo_len, Hqo, D], values exact in the dtype


@dataclasses.dataclass
class Batch:
  indptr: np.ndarray
  indices: np.ndarray
  last_page_len: np.ndarray
  qo_indptr: np.ndarray
  q: np.ndarray
  kv_lens: np.ndarray


def _pages(kv_len):
  return -(-kv_len // PAGE)


def _request(rng, kv_len, qo_len, pages, dtype):
  q = round_to(rng.standard_normal((qo_len, HEADS[0], HEAD_DIM), dtype=np.float32), DTYPES[dtype])
  return Request(int(kv_len), int(qo_len), np.asarray(pages, np.int32), q)


def _others(rng, count, decode, dtype):
  """Random neighbours: mostly short, some empty, some long enough to fill bins."""
  out = []
  for _ in range(count):
    kv_len = int(rng.choice([0, rng.integers(1, 200), rng.integers(200, 4000)], p=[0.1, 0.5, 0.4]))
    qo_len = 1 if decode else int(rng.integers(0, 20))
    pages = POOL_OFFSET + rng.integers(0, POOL_PAGES, _pages(kv_len))
    out.append(_request(rng, kv_len, qo_len, pages, dtype))
  return out


def _batch(requests) -> Batch:
  kv_lens = np.array([r.kv_len for r in requests], np.int64)
  npages = np.array([len(r.pages) for r in requests], np.int64)
  last = np.where(npages > 0, kv_lens - (npages - 1) * PAGE, 0).astype(np.int32)
  qo_lens = [r.qo_len for r in requests]
  return Batch(indptr=np.concatenate([[0], np.cumsum(npages)]).astype(np.int32),
               indices=np.concatenate([r.pages for r in requests]).astype(np.int32),
               last_page_len=last,
               qo_indptr=np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32),
               q=np.concatenate([r.q for r in requests]), kv_lens=kv_lens)


def _cache(rng, dtype):
  shape = (POOL_OFFSET + POOL_PAGES, 2, PAGE, HEADS[1], HEAD_DIM)
  return round_to(rng.standard_normal(shape, dtype=np.float32), DTYPES[dtype])


def _run(device, kind, batch: Batch, cache, dtype, causal, split):
  """Plans and runs `batch` with a fresh wrapper (capacities of its own); returns
  (out, lse) as numpy and the plan's sections."""
  dt = np.dtype(DTYPES[dtype])
  with jax.default_device(device):
    if kind == "prefill":
      w = jpa.BatchPrefillWithPagedKVCacheWrapper(kv_layout="NHD")
      plan = w.plan(batch.qo_indptr, batch.indptr, batch.indices, batch.last_page_len,
                    HEADS[0], HEADS[1], HEAD_DIM, PAGE, causal=causal, q_data_type=dt, **split)
    else:
      w = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout="NHD",
                                                 use_tensor_cores=kind == "tc_decode")
      plan = w.plan(batch.indptr, batch.indices, batch.last_page_len, HEADS[0], HEADS[1],
                    HEAD_DIM, PAGE, q_data_type=dt, **split)
    out, lse = w.run(put(batch.q.astype(dt), device), put(cache.astype(dt), device),
                     return_lse=True)
  return np.asarray(out), np.asarray(lse), planning.unpack_plan(plan.buffer, plan.config.caps)


def _table(batch: Batch):
  return PageTable(batch.indptr, batch.indices, batch.last_page_len, batch.kv_lens,
                   POOL_OFFSET + POOL_PAGES)


def _bits(a):
  """The bytes of an array, so that equality is bitwise (+0 vs -0, NaN payloads)."""
  return np.ascontiguousarray(a).view(np.uint8)


def _r_items(sections, position):
  work = sections["work"]
  return work[work[:, REQ] == position]


SPLITS = {"fixed": dict(fixed_split_size=4), "disabled": dict(disable_split_kv=True)}


def _check_invariance(platform, device, rng, kind, dtype, causal, mode):
  check_native(platform)
  if dtype == "f32" and platform != "cpu":
    pytest.skip("f32 is CPU-only")
  decode = kind != "prefill"
  cache = _cache(rng, dtype)
  r = _request(rng, R_KV_LEN, 1 if decode else 37, np.arange(POOL_OFFSET), dtype)
  results = []
  for size, position in LAYOUTS:
    others = _others(rng, size - 1, decode, dtype)
    requests = others[:position] + [r] + others[position:]
    batch = _batch(requests)
    out, lse, sections = _run(device, kind, batch, cache, dtype, causal, SPLITS[mode])
    rows = slice(batch.qo_indptr[position], batch.qo_indptr[position + 1])
    items = _r_items(sections, position)
    if mode == "fixed":  # R's 3001 keys in 64-key pieces: the merge is exercised
      assert (items[:, SPLIT] >= 0).all() and items[:, SPLIT].max() >= 40, "R must be split"
      assert (items[:, KV_B] % (4 * PAGE) == 0).all()
    else:
      assert (items[:, SPLIT] == -1).all(), "disable_split_kv cuts nothing"
    results.append((out[rows], lse[rows]))
    if size == 1:  # the invariant result is also the right one
      k, v = cache[:, 0], cache[:, 1]
      table = _table(batch)
      ref_out, ref_lse = oracle(batch.q, k, v, batch.qo_indptr, table, causal=causal)
      assert_attention_close(out, lse, ref_out, ref_lse, dtype)
  alone_out, alone_lse = results[0]
  for (size, position), (out, lse) in zip(LAYOUTS[1:], results[1:]):
    where = f"R at {position} of {size}"
    assert np.array_equal(_bits(out), _bits(alone_out)), f"{where}: out differs from R alone"
    assert np.array_equal(_bits(lse), _bits(alone_lse)), f"{where}: lse differs from R alone"


@pytest.mark.parametrize("mode", ["fixed", "disabled"])
@pytest.mark.parametrize("kind", ["decode", "tc_decode"])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_decode_is_batch_invariant(platform, device, rng, kind, dtype, mode):
  _check_invariance(platform, device, rng, kind, dtype, False, mode)


@pytest.mark.parametrize("mode", ["fixed", "disabled"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_prefill_is_batch_invariant(platform, device, rng, causal, dtype, mode):
  _check_invariance(platform, device, rng, "prefill", dtype, causal, mode)


# ------------------------------------------------------------------ the options' checks


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "4", 2**31])
def test_fixed_split_size_is_validated(bad):
  """A bad fixed_split_size is a ValueError naming it, raised by plan() (on the host,
  before any kernel)."""
  w = jpa.BatchDecodeWithPagedKVCacheWrapper()
  with pytest.raises(ValueError, match="fixed_split_size"):
    w.plan(np.array([0, 1], np.int32), np.array([0], np.int32), np.array([3], np.int32),
           8, 2, 128, 16, fixed_split_size=bad)
  assert w.last_plan is None


@pytest.mark.parametrize("value", [None, -1])
def test_fixed_split_size_none_is_the_default_plan(value):
  """None and -1 mean no fixed split: the plan is the one plan() makes without it."""
  args = (np.array([0, 300], np.int32), np.arange(300, dtype=np.int32),
          np.array([7], np.int32), 8, 2, 128, 16)
  default = jpa.BatchDecodeWithPagedKVCacheWrapper().plan(*args)
  plan = jpa.BatchDecodeWithPagedKVCacheWrapper().plan(*args, fixed_split_size=value)
  assert plan.config == default.config
  np.testing.assert_array_equal(plan.buffer, default.buffer)


def test_fixed_split_beyond_the_workspace_names_the_option():
  """Fixed pieces cannot trade cuts for room: when a batch's pieces need more partial
  rows than the workspace holds, plan() says so and what to change."""
  w = jpa.BatchPrefillWithPagedKVCacheWrapper(workspace_size=64 * 1024)
  qo = np.array([0, 64], np.int32)
  with pytest.raises(ValueError, match=r"fixed_split_size = 1 pages.*workspace"):
    w.plan(qo, np.array([0, 256], np.int32), np.arange(256, dtype=np.int32),
           np.array([16], np.int32), 8, 2, 128, 16, fixed_split_size=1)


def test_wrapper_capacities_hold_the_fixed_pieces():
  """Capacities fixed at the first plan hold the fixed pieces of any later batch within
  them: the longest possible request, all pages in one, cut into one-page pieces."""
  w = jpa.BatchDecodeWithPagedKVCacheWrapper(max_batch_size=8, max_num_pages=512)
  short = (np.array([0, 1], np.int32), np.array([0], np.int32), np.array([1], np.int32))
  first = w.plan(*short, 8, 2, 128, 16, fixed_split_size=1)
  long_ = (np.array([0, 505, 512], np.int32), np.arange(512, dtype=np.int32),
           np.array([16, 16], np.int32))
  plan = w.plan(*long_, 8, 2, 128, 16, fixed_split_size=1)
  assert plan.config == first.config, "same capacities: no recompilation"
  sections = planning.unpack_plan(plan.buffer, plan.config.caps)
  assert sections["meta"][2] == 512  # one item per page


def test_options_are_part_of_the_static_setup():
  """A wrapper re-derives its static setup (capacities, spec) per option setting."""
  w = jpa.BatchDecodeWithPagedKVCacheWrapper()
  args = (np.array([0, 300], np.int32), np.arange(300, dtype=np.int32), np.array([7], np.int32),
          8, 2, 128, 16)
  plain = planning.unpack_plan(w.plan(*args).buffer, w.last_plan.config.caps)
  fixed = w.plan(*args, fixed_split_size=2)
  sections = planning.unpack_plan(fixed.buffer, fixed.config.caps)
  live = sections["work"][:sections["meta"][2]]
  assert (live[:, KV_B] % 32 == 0).all() and len(live) == -(-(299 * 16 + 7) // 32)
  again = planning.unpack_plan(w.plan(*args).buffer, w.last_plan.config.caps)
  np.testing.assert_array_equal(again["work"], plain["work"])
