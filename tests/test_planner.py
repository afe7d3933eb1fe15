"""Property tests of the host planner (plan_host + unpack_plan) against CONTRACT.md, and
one end-to-end check that a windowed decode plan makes today's kernels read its window."""

from __future__ import annotations

import dataclasses
import hashlib
import time

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax_pagedattn as jpa
from jax_pagedattn import planning, switches
from jax_pagedattn.planning import Capacities

from _helpers import DTYPES, OUT_TOL, check_native, page_table, put, random_cache, round_to

# Work item fields (CONTRACT.md / plan_layout.h).
REQ, ROW_B, ROW_E, KV_B, KV_E, SPLIT, QO_LEN, KV_LEN = range(8)
# Metadata fields.
NUM_REQ, NUM_TOK, NUM_WORK, NUM_PARTIAL, NUM_BINS = range(5)

PREFILL_NAMES = dict(qo="qo_indptr", kv_indptr="paged_kv_indptr", kv_indices="paged_kv_indices",
                     last="paged_kv_last_page_len")

settings.register_profile("jpa", deadline=None, max_examples=150,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.load_profile("jpa")


@st.composite
def batches(draw, windows=False, fixed=False):
  """A valid batch, its planning parameters and capacities that hold it. `windows`
  draws a window_left (sometimes -1); `fixed` draws fixed_split_size (pages) or
  disable_split_kv, with capacities derived for them."""
  page_size = draw(st.sampled_from([1, 2, 3, 8, 16]))
  num_kv_heads = draw(st.sampled_from([1, 2, 4]))
  group = draw(st.sampled_from([1, 2, 3, 4, 8]))
  tile_rows = draw(st.sampled_from([1, 2, 4, 16, 64, 128]))
  causal = draw(st.booleans())
  num_ctas = draw(st.sampled_from([1, 2, 16, 132, 396]))
  batch = draw(st.integers(0, 8))
  # Mostly short keys; sometimes a long context, which the planner splits.
  kv_len = st.one_of(st.integers(0, 70), st.integers(0, 70), st.integers(200, 4000))
  kv_lens = np.array(draw(st.lists(kv_len, min_size=batch, max_size=batch)), dtype=np.int64)
  decode = draw(st.booleans())
  if decode:
    qo_lens = np.ones(batch, np.int64)
  else:
    qo_lens = np.array(draw(st.lists(st.integers(0, 12), min_size=batch, max_size=batch)),
                       dtype=np.int64)
  npages = -(-kv_lens // page_size)
  spare = draw(st.integers(0, 3))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  num_pages = int(npages.sum()) + spare
  kv_indices = rng.permutation(num_pages)[:int(npages.sum())].astype(np.int32)
  kv_indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
  # For a request without pages any value in [0, page_size] is accepted.
  empty_last = draw(st.integers(0, page_size))
  last = np.where(npages > 0, kv_lens - (npages - 1) * page_size, empty_last).astype(np.int32)
  qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
  tokens = int(qo_indptr[-1])
  extra = draw(st.integers(0, 4))
  window_left = draw(st.sampled_from([-1, 0, 1, 5, 63, 200, 1000])) if windows else -1
  split = dict(fixed_split_size=-1, disable_split_kv=False)
  if fixed:
    if draw(st.booleans()):
      # Pieces of at least 8 keys keep the capacities (and the test) small.
      pages = draw(st.sampled_from([1, 2, 5, 16, 64]))
      split["fixed_split_size"] = max(pages, -(-8 // page_size))
    else:
      split["disable_split_kv"] = True
  # partial_rows_limit < derived forces the planner to trade splits for room (fixed
  # pieces cannot: their capacities are derived for them, and the workspace unbounded).
  limit = -1 if fixed else draw(st.one_of(st.just(-1), st.integers(0, 64)))
  caps = planning.derive_capacities(
      max(batch + extra, 1), max(tokens + extra, 1), max(len(kv_indices) + extra, 1),
      group_size=group, tile_rows=tile_rows, num_kv_heads=num_kv_heads, num_ctas=num_ctas,
      partial_rows_limit=limit, fixed_split_size=split["fixed_split_size"],
      max_qo_len=int(qo_lens.max(initial=0)) + extra)
  return dict(qo_indptr=None if decode else qo_indptr, qo_for_check=qo_indptr,
              kv_indptr=kv_indptr, kv_indices=kv_indices, last=last, kv_lens=kv_lens,
              qo_lens=qo_lens, page_size=page_size, num_kv_heads=num_kv_heads, group=group,
              tile_rows=tile_rows, causal=causal, num_ctas=num_ctas, caps=caps,
              num_pages=num_pages, window_left=window_left, **split)


def run_plan(b, **override):
  args = dict(qo_indptr=b["qo_indptr"], kv_indptr=b["kv_indptr"], kv_indices=b["kv_indices"],
              kv_last_page_len=b["last"])
  kw = dict(page_size=b["page_size"], group_size=b["group"], tile_rows=b["tile_rows"],
            causal=b["causal"], caps=b["caps"], num_pages=b["num_pages"])
  for k in ("window_left", "fixed_split_size", "disable_split_kv"):
    if k in b:
      kw[k] = b[k]
  for k, v in override.items():
    (args if k in args else kw)[k] = v
  return planning.plan_host(args.pop("qo_indptr"), args.pop("kv_indptr"), args.pop("kv_indices"),
                            args.pop("kv_last_page_len"), planning.plan_spec(**kw))


def visible_extent(qo_len, kv_len, token, causal):
  """Keys query `token` of a request may see: [0, extent)."""
  if not causal:
    return kv_len
  return int(np.clip(kv_len - qo_len + token + 1, 0, kv_len))


def window_begin(qo_len, kv_len, token, causal, window_left):
  """First key query `token` sees (FlashInfer: position p sees j >= p - window_left),
  never past its visible extent."""
  if window_left < 0:
    return 0
  return int(np.clip(kv_len - qo_len + token - window_left, 0,
                     visible_extent(qo_len, kv_len, token, causal)))


def check_plan(b, buf):
  caps, G = b["caps"], b["group"]
  window = b.get("window_left", -1)
  assert buf.dtype == np.int32
  assert buf.shape == (planning.plan_sections(caps)["size"],)
  s = planning.unpack_plan(buf, caps)
  batch, qo_indptr = len(b["last"]), b["qo_for_check"]
  tokens = int(qo_indptr[-1])
  work, meta, merge = s["work"], s["meta"], s["merge_indptr"]
  assert work.shape == (caps.work, 8)

  # meta and the copied/padded index sections
  assert meta[NUM_REQ] == batch and meta[NUM_TOK] == tokens
  nw = int(meta[NUM_WORK])
  assert 0 <= nw <= caps.work
  assert (work[:nw, REQ] >= 0).all(), "live items come first"
  assert (work[nw:] == -1).all(), "padding items are all -1"
  # bins: contiguous item ranges that cover exactly the live items, used bins first
  bins = s["bin_indptr"]
  assert bins.shape == (caps.bins + 1,) and bins[0] == 0 and bins[-1] == nw
  nb = int(meta[NUM_BINS])
  assert 0 <= nb <= caps.bins and (nb > 0) == (nw > 0)
  assert (np.diff(bins)[:nb] > 0).all(), "used bins are not empty"
  assert (bins[nb:] == nw).all(), "unused bins come last and are empty"
  np.testing.assert_array_equal(s["qo_indptr"][:batch + 1], qo_indptr)
  assert (s["qo_indptr"][batch + 1:] == tokens).all()
  np.testing.assert_array_equal(s["kv_indptr"][:batch + 1], b["kv_indptr"])
  assert (s["kv_indptr"][batch + 1:] == b["kv_indptr"][-1]).all()
  np.testing.assert_array_equal(s["kv_last_page_len"][:batch], b["last"])
  assert (s["kv_last_page_len"][batch:] == 0).all()
  np.testing.assert_array_equal(s["kv_indices"][:len(b["kv_indices"])], b["kv_indices"])
  assert merge.shape == (caps.tokens + 1,) and merge[0] == 0
  assert (np.diff(merge) >= 0).all()
  assert (merge[tokens:] == merge[tokens]).all(), "no partials for padding tokens"
  assert meta[NUM_PARTIAL] == merge[tokens] <= caps.partial_rows

  # every live item on its own
  covered = {}  # (request, packed row) -> list of (kv_begin, kv_end, split)
  for it in work[:nw]:
    r, rb, re_, kb, ke, sp, ql, kl = (int(x) for x in it)
    assert 0 <= r < batch
    assert ql == b["qo_lens"][r] and kl == b["kv_lens"][r], "qo_len / kv_len fields"
    assert 0 <= rb < re_ <= ql * G
    assert re_ - rb <= b["tile_rows"]
    whole_tokens = rb % G == 0 and re_ % G == 0
    assert whole_tokens or (G > b["tile_rows"] and rb // G == (re_ - 1) // G), \
        "an item holds whole tokens or part of one token's heads"
    assert 0 <= kb <= ke <= kl
    assert sp >= -1
    # No wasted key range: the item ends at the furthest key any of its rows sees, and
    # starts no earlier than the first key (the window's start) any of them sees.
    first_token, last_token = rb // G, (re_ - 1) // G
    assert ke <= max(visible_extent(ql, kl, last_token, b["causal"]), 0)
    assert kb >= window_begin(ql, kl, first_token, b["causal"], window)
    for row in range(rb, re_):
      covered.setdefault((r, row), []).append((kb, ke, sp, last_token, first_token))

  # every (request, packed row) exactly once per split, key ranges tiling [0, extent)
  for r in range(batch):
    ql, kl = int(b["qo_lens"][r]), int(b["kv_lens"][r])
    for row in range(ql * G):
      items = covered.pop((r, row), None)
      assert items, f"request {r} packed row {row} is in no work item"
      token = row // G
      t = int(qo_indptr[r]) + token
      n = int(merge[t + 1] - merge[t])
      splits = sorted(i[2] for i in items)
      if splits == [-1]:
        assert n == 0, "an unsplit row has no partial rows"
      else:
        assert -1 not in splits, f"row {row} of request {r}: split and unsplit items"
        assert splits == list(range(n)), (splits, n)
      ranges = sorted((i[0], i[1]) for i in items)
      # The union starts where the item's first row's window does (0 without one), so
      # it covers this row's window, which starts no earlier.
      begin = window_begin(ql, kl, items[0][4], b["causal"], window)
      assert ranges[0][0] == begin <= window_begin(ql, kl, token, b["causal"], window)
      for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
        assert a1 == b0, f"key ranges must be disjoint and contiguous: {ranges}"
      end = ranges[-1][1]
      own = visible_extent(ql, kl, token, b["causal"])
      # The union reaches what this row sees and no further than the item's last row.
      assert own <= end == visible_extent(ql, kl, items[0][3], b["causal"])
      if len(items) > 1:
        assert all(a1 > a0 for a0, a1 in ranges), "no empty chunk in a split"
  assert not covered, f"items cover rows outside the requests: {sorted(covered)[:3]}"


@given(batches())
def test_plan_covers_every_row_once(b):
  check_plan(b, run_plan(b))


@given(batches())
def test_plan_is_deterministic(b):
  np.testing.assert_array_equal(run_plan(b), run_plan(b))


@given(batches(windows=True))
def test_plan_windows_cover_exactly_the_windows(b):
  """With a sliding window every item's keys lie within its tokens' windows and the
  items of a row cover them (check_plan, given window_left)."""
  check_plan(b, run_plan(b))


@given(batches(windows=True))
def test_plan_without_window_is_the_plain_plan(b):
  """window_left=-1 is the plan made without a window argument, bit for bit."""
  plain = planning.plan_host(
      b["qo_indptr"], b["kv_indptr"], b["kv_indices"], b["last"],
      planning.plan_spec(page_size=b["page_size"], group_size=b["group"],
                         tile_rows=b["tile_rows"], causal=b["causal"], caps=b["caps"],
                         num_pages=b["num_pages"]))
  np.testing.assert_array_equal(run_plan(b, window_left=-1), plain)


def item_keys(it, causal, window_left, G):
  """Keys an item's rows see (planner.cc, ItemCost, less its fixed overhead)."""
  r, rb, re_, kb, ke, sp, ql, kl = (int(x) for x in it)
  first_pos = kl - ql
  hi = min(ke, first_pos + (re_ - 1) // G + 1) if causal else ke
  lo = max(kb, first_pos + rb // G - window_left) if window_left >= 0 else kb
  return max(0, hi - lo)


@given(batches(windows=True, fixed=True))
def test_plan_longest_first_orders_the_same_items(b):
  """longest_first (the Hopper prefill kernel's plans) writes the plan's own items,
  costliest first in their dealt order otherwise, with bins that still partition them;
  everything else is the plain plan's."""
  plain, ordered = run_plan(b), run_plan(b, longest_first=True)
  check_plan(b, ordered)
  caps = b["caps"]
  p, o = planning.unpack_plan(plain, caps), planning.unpack_plan(ordered, caps)
  nw = int(p["meta"][NUM_WORK])
  keys = [item_keys(it, b["causal"], b.get("window_left", -1), b["group"])
          for it in o["work"][:nw]]
  assert keys == sorted(keys, reverse=True), "items costliest first"
  want = sorted(range(nw), key=lambda i: -item_keys(p["work"][i], b["causal"],
                                                     b.get("window_left", -1), b["group"]))
  np.testing.assert_array_equal(o["work"][:nw], p["work"][want], "a stable sort of the items")
  for name in ("merge_indptr", "qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len"):
    np.testing.assert_array_equal(o[name], p[name], name)
  np.testing.assert_array_equal(o["work"][nw:], p["work"][nw:])


# Plans made by the planner before windows and fixed splits existed (2026-12, commit
# 87ee2a8), as the first 16 hex digits of the buffer's sha256: window_left=-1 and no
# fixed split must keep every one bit for bit. (kv_lens, qo_lens or None for decode,
# page_size, group_size, tile_rows, causal, caps, digest.)
PLANS_BEFORE_WINDOWS = [
    ([(i * 797) % 4000 for i in range(64)], None, 16, 4, 4, False,
     Capacities(64, 64, 8952, 112, 96, 49), "a5df123e55b9ef42"),
    ([4096] * 8, None, 16, 16, 4, False, Capacities(8, 8, 2048, 556, 262, 132), "6b2f9e1f0438840d"),
    ([(i * 1231) % 3000 for i in range(10)], [(i * 7) % 13 for i in range(10)], 16, 8, 64, True,
     Capacities(10, 55, 840, 148, 2096, 132), "c1da9bc10ab071b6"),
    ([(i * 331) % 900 + 1 for i in range(24)], [(i * 5) % 9 + 1 for i in range(24)], 3, 1, 16,
     False, Capacities(24, 117, 3468, 64, 20, 33), "8e72f49f5073dbb2"),
]


@pytest.mark.parametrize("case", range(len(PLANS_BEFORE_WINDOWS)))
def test_plan_is_unchanged_without_window_or_fixed_split(case):
  kv_lens, qo_lens, ps, g, tr, causal, caps, digest = PLANS_BEFORE_WINDOWS[case]
  kv_lens = np.asarray(kv_lens)
  npages = -(-kv_lens // ps)
  kv_indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
  kv_indices = ((np.arange(int(npages.sum())) * 7919) % int(npages.sum())).astype(np.int32)
  last = np.where(npages > 0, kv_lens - (npages - 1) * ps, 0).astype(np.int32)
  qo = None if qo_lens is None else np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
  with switches.overridden(deal="auto"):
    spec = planning.plan_spec(page_size=ps, group_size=g, tile_rows=tr, causal=causal, caps=caps,
                              window_left=-1, fixed_split_size=-1, disable_split_kv=False)
  buf = planning.plan_host(qo, kv_indptr, kv_indices, last, spec)
  assert hashlib.sha256(buf.tobytes()).hexdigest()[:16] == digest


@pytest.mark.parametrize("fixed_split_size", [-1, 3])
def test_windowed_decode_plan_computes_the_window(platform, device, fixed_split_size):
  """End to end through today's kernels: a windowed decode plan's items start inside
  pages (kv_begin = kv_len - 1 - window_left), and the output is attention over exactly
  the last window_left + 1 keys (a decode row's window is its items' range), also when
  fixed pieces cut it."""
  check_native(platform)
  dtype = "f32" if platform == "cpu" else "bf16"
  dt = np.dtype(DTYPES[dtype])
  rng = np.random.default_rng(15)
  ps, hq, hk, d = 16, 8, 2, 128
  kv_lens = np.array([3001, 77, 0, 900, 40])
  table = page_table(rng, kv_lens, ps)
  k, v = random_cache(rng, table.num_pages, ps, hk, d, dtype)
  cache = np.stack([k, v], axis=1).astype(dt)
  q = round_to(rng.standard_normal((len(kv_lens), hq, d), dtype=np.float32), DTYPES[dtype])
  for window in (0, 5, 100, 1000):
    with jax.default_device(device):
      w = jpa.BatchDecodeWithPagedKVCacheWrapper()
      plain = w.plan(table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
                     q_data_type=dt, fixed_split_size=fixed_split_size)
      c = plain.config
      spec = planning.plan_spec(page_size=ps, group_size=hq // hk, tile_rows=c.tile_rows,
                                causal=False, caps=c.caps, decode_names=True, window_left=window,
                                fixed_split_size=fixed_split_size)
      buf = planning.plan_host(None, table.indptr, table.indices, table.last_page_len, spec)
      out, lse = w.run(put(q.astype(dt), device), put(cache, device), return_lse=True,
                       plan=planning.Plan(buf, c))
    out, lse = np.asarray(out.astype(np.float32)), np.asarray(lse)
    for b, kv_len in enumerate(kv_lens):
      pages = table.indices[table.indptr[b]:table.indptr[b + 1]]
      lo = max(0, kv_len - 1 - window)
      keys = k[pages].reshape(-1, hk, d)[lo:kv_len].astype(np.float64)
      vals = v[pages].reshape(-1, hk, d)[lo:kv_len].astype(np.float64)
      for h in range(hq):
        if kv_len == 0:
          assert (out[b, h] == 0).all() and np.isneginf(lse[b, h])
          continue
        s = keys[:, h // (hq // hk)] @ q[b, h] / np.sqrt(d)
        p = np.exp(s - s.max())
        want = p @ vals[:, h // (hq // hk)] / p.sum()
        np.testing.assert_allclose(out[b, h], want, atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])
        want_lse = (s.max() + np.log(p.sum())) / np.log(2)
        np.testing.assert_allclose(lse[b, h], want_lse, atol=1e-3 if dtype == "f32" else 2e-2)


def _request_items(b, buf, r):
  """Request r's live items as sorted (row_begin, row_end, kv_begin, kv_end, split)."""
  sec = planning.unpack_plan(buf, b["caps"])
  work = sec["work"][:int(sec["meta"][NUM_WORK])]
  mine = work[work[:, REQ] == r][:, [ROW_B, ROW_E, KV_B, KV_E, SPLIT]]
  return sorted(map(tuple, mine.tolist()))


def _alone(b, r):
  """Batch b reduced to its request r, with the same spec."""
  pages = b["kv_indices"][b["kv_indptr"][r]:b["kv_indptr"][r + 1]]
  qo = np.array([0, b["qo_lens"][r]], np.int32)
  return dict(b, qo_indptr=None if b["qo_indptr"] is None else qo, qo_for_check=qo,
              kv_indptr=np.array([0, len(pages)], np.int32), kv_indices=pages,
              last=b["last"][r:r + 1], kv_lens=b["kv_lens"][r:r + 1],
              qo_lens=b["qo_lens"][r:r + 1])


@given(batches(windows=True, fixed=True), st.data())
def test_plan_fixed_pieces_depend_on_the_request_alone(b, data):
  """fixed_split_size: every item lies inside one chunk of fixed_split_size * page_size
  keys (so cuts fall exactly on chunk multiples, and only there); disable_split_kv:
  no item is cut. Either way a request's items are those it gets planned alone."""
  buf = run_plan(b)
  check_plan(b, buf)
  sec = planning.unpack_plan(buf, b["caps"])
  live = sec["work"][:int(sec["meta"][NUM_WORK])]
  if b["disable_split_kv"]:
    assert (live[:, SPLIT] == -1).all() and sec["merge_indptr"][-1] == 0
  else:
    chunk = b["fixed_split_size"] * b["page_size"]
    cut = live[live[:, KV_E] > live[:, KV_B]]
    assert (cut[:, KV_B] // chunk == (cut[:, KV_E] - 1) // chunk).all(), "an item spans a cut"
  if len(b["last"]):
    r = data.draw(st.integers(0, len(b["last"]) - 1))
    alone = _alone(b, r)
    assert _request_items(alone, run_plan(alone), 0) == _request_items(b, buf, r)


def test_plan_fixed_pieces_beyond_the_capacities_name_the_option():
  """Capacities not derived for the fixed pieces (or a workspace too small for them):
  the planner says which option needs what, and the way out."""
  ps, kv_len = 16, 4096
  args = (np.array([0, 4], np.int32), np.array([0, kv_len // ps], np.int32),
          np.arange(kv_len // ps, dtype=np.int32), np.array([ps], np.int32))
  caps = planning.derive_capacities(1, 4, kv_len // ps, group_size=4, tile_rows=16,
                                    num_kv_heads=2, num_ctas=16)
  for room, c in (("partial rows.*workspace", caps),
                  ("work items.*derive_capacities", dataclasses.replace(caps, partial_rows=10**6))):
    spec = planning.plan_spec(page_size=ps, group_size=4, tile_rows=16, causal=True, caps=c,
                              fixed_split_size=2)
    with pytest.raises(ValueError, match=f"fixed_split_size = 2 pages.*{room}"):
      planning.plan_host(*args, spec)
  derived = planning.derive_capacities(1, 4, kv_len // ps, group_size=4, tile_rows=16,
                                       num_kv_heads=2, num_ctas=16, fixed_split_size=2)
  spec = planning.plan_spec(page_size=ps, group_size=4, tile_rows=16, causal=True, caps=derived,
                            fixed_split_size=2)
  assert planning.unpack_plan(planning.plan_host(*args, spec), derived)["meta"][NUM_WORK] == 128


@pytest.mark.parametrize("field,value", [("fixed_split_size", 0), ("fixed_split_size", -2),
                                         ("window_left", -2)])
def test_plan_rejects_bad_spec_values(field, value):
  spec = planning.plan_spec(page_size=16, group_size=1, tile_rows=16, causal=False,
                            caps=Capacities(1, 1, 1, 8, 8, 1), **{field: value})
  with pytest.raises(ValueError, match=field):
    planning.plan_host(None, np.array([0, 1], np.int32), np.array([0], np.int32),
                       np.array([1], np.int32), spec)


def test_plan_splits_long_requests():
  """Hypothesis covers splitting only if it happens; pin one batch where it must."""
  kv_lens = np.array([4000, 3])
  ps = 16
  npages = -(-kv_lens // ps)
  b = dict(qo_indptr=np.array([0, 2, 3], np.int32), qo_for_check=np.array([0, 2, 3], np.int32),
           kv_indptr=np.concatenate([[0], np.cumsum(npages)]).astype(np.int32),
           kv_indices=np.arange(npages.sum(), dtype=np.int32),
           last=(kv_lens - (npages - 1) * ps).astype(np.int32), kv_lens=kv_lens,
           qo_lens=np.array([2, 1]), page_size=ps, num_kv_heads=2, group=4, tile_rows=16,
           causal=True, num_ctas=396, num_pages=int(npages.sum()))
  b["caps"] = planning.derive_capacities(4, 8, 512, group_size=4, tile_rows=16, num_kv_heads=2,
                                         num_ctas=396)
  buf = run_plan(b)
  check_plan(b, buf)
  work = planning.unpack_plan(buf, b["caps"])["work"]
  assert (work[:, SPLIT] >= 1).any(), "a 4000-key request on 132 SMs must be split"


def _decode_plan(batch, spec, heads=(32, 8), tile_rows=16, num_ctas=396):
  """(workload, caps, plan sections) of a decode batch from bench_workloads' length spec."""
  from jax_pagedattn import bench_workloads as wl

  hq, hk = heads
  w = wl.make_workload("plan", "decode", batch, spec, heads=heads, page_size=16)
  s = wl.build_page_sets(w, 1, 0)[1][0]
  caps = planning.derive_capacities(batch, batch, len(s.kv_indices), group_size=hq // hk,
                                    tile_rows=tile_rows, num_kv_heads=hk, num_ctas=num_ctas)
  buf = planning.plan_host(None, s.kv_indptr, s.kv_indices, s.kv_last_page_len,
                           planning.plan_spec(page_size=16, group_size=hq // hk,
                                              tile_rows=tile_rows, causal=False, caps=caps))
  return w, caps, planning.unpack_plan(buf, caps)


@pytest.mark.parametrize("spec", ["4096", "2048", "1024", "32768", "lognormal:16:32768",
                                  "zipf:16:32768"])
@pytest.mark.parametrize("tile_rows", [4, 16])
def test_plan_balances_bins(spec, tile_rows):
  """The bins of a launch all run at once, so the launch lasts as long as the costliest:
  every bin must get about the same number of keys, however unequal the requests."""
  batch = 8 if spec == "32768" else 64
  w, caps, sec = _decode_plan(batch, spec, tile_rows=tile_rows)
  work, bins = sec["work"], sec["bin_indptr"]
  keys = np.array([int((work[bins[i]:bins[i + 1], KV_E] - work[bins[i]:bins[i + 1], KV_B]).sum())
                   for i in range(caps.bins)])
  assert caps.bins == 49 and keys.sum() == w.kv_lens.sum()
  # The planner's cost: keys plus 32 per item (its start-up); a bin may overrun its
  # share by 1/16 rather than cut a request, and cuts fall on 64-key tiles.
  cost = keys + 32 * np.diff(bins)
  ideal = cost.sum() / caps.bins
  assert cost.max() <= ideal * 17 / 16 + 64, (cost.max() / ideal, cost)
  # Light bins waste nothing but idle slots; the last one takes what the others left.
  assert (cost >= 0.85 * ideal).mean() >= 0.9, (cost / ideal)
  # Cuts are the price of balance: at most one per bin boundary.
  assert int(sec["meta"][NUM_WORK]) <= batch + caps.bins - 1


@pytest.mark.parametrize("batch,kv_len,heads,pieces", [(64, 4096, (8, 1), 6),
                                                      (16, 4096, (32, 8), 3),
                                                      (8, 32768, (32, 8), 6)])
def test_plan_cuts_uniform_requests_into_equal_pieces(batch, kv_len, heads, pieces):
  """No more requests than bins: each request is cut into equal pieces, one per bin,
  rather than dealt so that most bins hold the end of one request and the start of the
  next (two item start-ups and ends per bin)."""
  _, caps, sec = _decode_plan(batch, str(kv_len), heads)
  work, bins, meta = sec["work"], sec["bin_indptr"], sec["meta"]
  nb, nw = int(meta[NUM_BINS]), int(meta[NUM_WORK])
  assert nb == nw == batch * pieces <= caps.bins
  assert (np.diff(bins)[:nb] == 1).all(), "one item per used bin"
  lengths = work[:nw, KV_E] - work[:nw, KV_B]
  assert lengths.max() - lengths.min() <= 16 and lengths.sum() == batch * kv_len
  assert (np.bincount(work[:nw, REQ]) == pieces).all()
  assert (work[:nw, SPLIT].reshape(batch, pieces) == np.arange(pieces)).all()


def test_plan_deals_bins_when_pieces_would_be_unequal():
  """Equal pieces of a Zipf batch would leave most bins short of the longest request's
  pieces; the planner keeps the dealt bins, which balance keys across requests."""
  w, caps, sec = _decode_plan(8, "zipf:16:32768")
  work, bins = sec["work"], sec["bin_indptr"]
  assert (np.diff(bins) > 1).any(), "some dealt bin holds two requests' pieces"
  keys = [int((work[bins[i]:bins[i + 1], KV_E] - work[bins[i]:bins[i + 1], KV_B]).sum())
          for i in range(caps.bins)]
  assert max(keys) <= 1.1 * w.kv_lens.sum() / caps.bins + 64


# ------------------------------------------------------------------ invalid input


def _corrupt(b, kind, rng_draw):
  """Returns (overrides for run_plan, name the message must contain)."""
  kv_indptr, kv_indices, last = b["kv_indptr"].copy(), b["kv_indices"].copy(), b["last"].copy()
  qo = b["qo_for_check"].copy()
  batch = len(last)
  if kind == "kv_indptr_start":
    kv_indptr = kv_indptr + 1
    return dict(kv_indptr=kv_indptr), "paged_kv_indptr"
  if kind == "qo_indptr_start":
    return dict(qo_indptr=qo + 1), "qo_indptr"
  if kind == "kv_indptr_decreasing":
    i = rng_draw(st.integers(1, batch))
    kv_indptr[i] = kv_indptr[i - 1] - 1
    return dict(kv_indptr=kv_indptr), "paged_kv_indptr"
  if kind == "qo_indptr_decreasing":
    i = rng_draw(st.integers(1, batch))
    qo[i] = qo[i - 1] - 1
    return dict(qo_indptr=qo), "qo_indptr"
  if kind == "kv_indptr_length":
    longer = np.append(kv_indptr, kv_indptr[-1]).astype(np.int32)
    return dict(kv_indptr=longer), "paged_kv_indptr"
  if kind == "qo_indptr_length":
    return dict(qo_indptr=np.append(qo, qo[-1]).astype(np.int32)), "qo_indptr"
  if kind == "indptr_end":
    return dict(kv_indices=np.append(kv_indices, 0).astype(np.int32)), "paged_kv_indptr"
  if kind == "page_negative":
    i = rng_draw(st.integers(0, len(kv_indices) - 1))
    kv_indices[i] = -1 - rng_draw(st.integers(0, 5))
    return dict(kv_indices=kv_indices), "paged_kv_indices"
  if kind == "page_too_large":
    i = rng_draw(st.integers(0, len(kv_indices) - 1))
    kv_indices[i] = b["num_pages"] + rng_draw(st.integers(0, 5))
    return dict(kv_indices=kv_indices), "paged_kv_indices"
  if kind == "last_page_len_zero":
    r = rng_draw(st.sampled_from(list(np.nonzero(np.diff(kv_indptr))[0])))
    last[r] = 0
    return dict(kv_last_page_len=last), "paged_kv_last_page_len"
  if kind == "last_page_len_big":
    r = rng_draw(st.sampled_from(list(np.nonzero(np.diff(kv_indptr))[0])))
    last[r] = b["page_size"] + rng_draw(st.integers(1, 5))
    return dict(kv_last_page_len=last), "paged_kv_last_page_len"
  if kind == "cap_batch":
    c = b["caps"]
    caps = dataclasses.replace(c, batch=batch - 1)
    return dict(caps=caps), "max_batch_size"
  if kind == "cap_tokens":
    c = b["caps"]
    caps = dataclasses.replace(c, tokens=int(qo[-1]) - 1)
    return dict(caps=caps), "max_num_tokens"
  if kind == "cap_pages":
    c = b["caps"]
    caps = dataclasses.replace(c, pages=len(kv_indices) - 1)
    return dict(caps=caps), "max_num_pages"
  raise KeyError(kind)


INVALID = ["kv_indptr_start", "qo_indptr_start", "kv_indptr_decreasing", "qo_indptr_decreasing",
           "kv_indptr_length", "qo_indptr_length", "indptr_end", "page_negative",
           "page_too_large", "last_page_len_zero", "last_page_len_big", "cap_batch",
           "cap_tokens", "cap_pages"]


def _applicable(b, kind):
  batch, has_pages = len(b["last"]), len(b["kv_indices"]) > 0
  needs = {
      "kv_indptr_decreasing": batch >= 1, "qo_indptr_decreasing": batch >= 1,
      "page_negative": has_pages, "page_too_large": has_pages,
      "last_page_len_zero": has_pages, "last_page_len_big": has_pages,
      "cap_batch": batch >= 1, "cap_tokens": b["qo_for_check"][-1] >= 1, "cap_pages": has_pages,
  }
  return needs.get(kind, True)


@pytest.mark.parametrize("kind", INVALID)
@given(b=batches(), data=st.data())
@settings(max_examples=25)
def test_plan_rejects_invalid_input(kind, b, data):
  from hypothesis import assume
  assume(_applicable(b, kind))
  # Prefill naming throughout: qo_indptr must be present for the qo_* classes.
  if b["qo_indptr"] is None:
    b = dict(b, qo_indptr=b["qo_for_check"])
  override, name = _corrupt(b, kind, data.draw)
  if kind == "cap_tokens" or kind == "cap_batch" or kind == "cap_pages":
    # The corrupted capacities must still describe a buffer layout.
    assume(min(override["caps"].batch, override["caps"].tokens, override["caps"].pages) >= 1)
  with pytest.raises(ValueError) as e:
    run_plan(b, **override)
  assert name in str(e.value), f"{kind}: message does not name {name}: {e.value}"


def test_plan_rejects_capacity_of_work_items():
  """A batch whose query tiles alone exceed the work capacity."""
  qo = np.array([0, 40], np.int32)
  with pytest.raises(ValueError, match="work items"):
    planning.plan_host(qo, np.array([0, 1], np.int32), np.array([0], np.int32),
                       np.array([1], np.int32),
                       planning.plan_spec(page_size=16, group_size=4, tile_rows=4, causal=False,
                                          caps=Capacities(1, 64, 4, 3, 1, 1)))


def test_plan_names_decode_arguments():
  """With decode naming the messages use the decode wrapper's argument names."""
  decode_spec = planning.plan_spec(page_size=16, group_size=4, tile_rows=4, causal=False,
                                   caps=Capacities(1, 1, 4, 8, 8, 1), decode_names=True)
  with pytest.raises(ValueError, match=r"\bindices\b"):
    planning.plan_host(None, np.array([0, 1], np.int32), np.array([-3], np.int32),
                       np.array([1], np.int32), decode_spec)
  with pytest.raises(ValueError, match=r"\blast_page_len\b"):
    planning.plan_host(None, np.array([0, 1], np.int32), np.array([0], np.int32),
                       np.array([17], np.int32), decode_spec)


def test_plan_time_256_requests(capsys):
  """Host planning time for a 256-request decode batch (printed, not asserted)."""
  rng = np.random.default_rng(0)
  ps, hk, g = 16, 8, 4
  kv_lens = rng.integers(1, 4096, 256)
  npages = -(-kv_lens // ps)
  kv_indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
  kv_indices = rng.permutation(int(npages.sum())).astype(np.int32)
  last = (kv_lens - (npages - 1) * ps).astype(np.int32)
  caps = planning.derive_capacities(256, 256, int(npages.sum()), group_size=g, tile_rows=g,
                                    num_kv_heads=hk, num_ctas=396)
  spec = planning.plan_spec(page_size=ps, group_size=g, tile_rows=g, causal=False, caps=caps)
  planning.plan_host(None, kv_indptr, kv_indices, last, spec)  # warm-up
  n = 200
  t0 = time.perf_counter()
  for _ in range(n):
    planning.plan_host(None, kv_indptr, kv_indices, last, spec)
  us = (time.perf_counter() - t0) / n * 1e6
  with capsys.disabled():
    print(f"\nplan_host, 256 decode requests ({int(npages.sum())} pages): {us:.1f} us per call")


def test_the_deal_comes_in_the_spec():
  """The planner reads no environment: switches.deal reaches it through the PlanSpec,
  and a forced deal changes the plan of a batch where both deals are possible."""
  kv_lens = np.array([96, 192, 4000, 9008])
  npages = kv_lens // 16
  kv_indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
  kv_indices = np.arange(int(npages.sum()), dtype=np.int32)
  last = np.full(4, 16, np.int32)
  caps = planning.derive_capacities(4, 4, int(npages.sum()), group_size=4, tile_rows=4,
                                    num_kv_heads=8, num_ctas=8 * 64)
  bufs = {}
  for deal in ("bins", "equal"):
    with switches.overridden(deal=deal):
      spec = planning.plan_spec(page_size=16, group_size=4, tile_rows=4, causal=False, caps=caps)
    assert spec.deal == switches.DEALS[deal]
    bufs[deal] = planning.unpack_plan(
        planning.plan_host(None, kv_indptr, kv_indices, last, spec), caps)
  # Equal pieces: one item per bin; dealt bins hold two where a request ends mid-bin.
  items = {d: int(b["meta"][2]) for d, b in bufs.items()}
  bins = {d: int(b["meta"][4]) for d, b in bufs.items()}
  assert items["equal"] == bins["equal"]
  assert items["bins"] > bins["bins"]
  assert (bufs["bins"]["work"] != bufs["equal"]["work"]).any()
