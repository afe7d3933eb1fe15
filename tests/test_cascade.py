"""merge_state / merge_state_in_place / merge_states against a float64 reference, decode
results merged over split keys, and MultiLevelCascadeAttentionWrapper against the plain
prefill and decode wrappers over the concatenated keys and the float32 oracle."""

from __future__ import annotations

import dataclasses
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_pagedattn as jpa

from _helpers import (DTYPES, OUT_TOL, PageTable, assert_attention_close, cache_in_form,
                      check_native, oracle, page_table, pairwise, put, random_cache, round_to,
                      seeded_rng)

# ----------------------------------------------------------------- merge reference


def reference_merge(v, s):
  """float64 merge of states `v [T, N, H, D]`, `s [T, N, H]` (base 2), written from the
  definition (attention over the union of the segments) with numpy's logaddexp2, not
  from the library's formula. Empty states (`-inf`) are skipped; rows of only empty
  states give 0 and -inf."""
  v = np.asarray(v, np.float64)
  s = np.asarray(s, np.float64)
  if s.shape[1] == 0:
    return np.zeros(v.shape[:1] + v.shape[2:]), np.full(s.shape[:1] + s.shape[2:], -np.inf)
  lse = np.logaddexp2.reduce(s, axis=1)
  live = ~np.isneginf(s)
  with np.errstate(invalid="ignore"):
    w = np.where(live, np.exp2(s - lse[:, None]), 0.0)
  out = np.einsum("tnh,tnhd->thd", w, np.where(live[..., None], v, 0.0))
  return out, lse


def random_states(rng, shape, dtype, *, empty_fraction=0.25, lse_scale=8.0):
  """v `shape` rounded to `dtype` (float32 numpy), s = shape[:-1] float32 with
  `empty_fraction` of the entries -inf; where s is -inf v holds NaN, which a merge must
  never read."""
  v = round_to(rng.standard_normal(shape, dtype=np.float32), DTYPES[dtype])
  s = (lse_scale * rng.standard_normal(shape[:-1])).astype(np.float32)
  empty = rng.random(shape[:-1]) < empty_fraction
  s[empty] = -np.inf
  v[empty] = np.nan
  return v, s


def _tol(dtype):
  # The merge is float32 arithmetic then one rounding to v's dtype.
  return max(float(jnp.finfo(DTYPES[dtype]).eps), 2e-6)


def assert_merged(v, s, want_v, want_s, dtype):
  """Every element: dtype, no NaN, empty rows exactly 0 / -inf, the others close."""
  assert v.dtype == DTYPES[dtype] and s.dtype == jnp.float32, (v.dtype, s.dtype)
  v = np.asarray(jnp.asarray(v).astype(jnp.float32))
  s = np.asarray(s)
  assert not np.isnan(v).any() and not np.isnan(s).any()
  empty = np.isneginf(want_s)
  np.testing.assert_array_equal(np.isneginf(s), empty)
  assert (v[empty] == 0).all()
  np.testing.assert_allclose(s[~empty], want_s[~empty], rtol=1e-6, atol=1e-5)
  tol = _tol(dtype)
  np.testing.assert_allclose(v, want_v, rtol=tol, atol=tol)


def _on(device, *arrays):
  return put(arrays, device)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("s_dtype", ["float32", "bfloat16"])
def test_merge_state_matches_reference(platform, device, rng, dtype, s_dtype):
  """Random states with -inf entries (rows empty on one side and on both), NaN under
  every -inf; s given as float32 or as another float dtype (taken as float32)."""
  t, h, d = 37, 6, 64
  v_a, s_a = random_states(rng, (t, h, d), dtype)
  v_b, s_b = random_states(rng, (t, h, d), dtype)
  s_a[:3], s_b[:3] = -np.inf, -np.inf  # both empty
  s_a[3:6], s_b[6:9] = -np.inf, -np.inf  # one side empty
  s_a, s_b = (np.asarray(jnp.asarray(x).astype(s_dtype).astype(jnp.float32)) for x in (s_a, s_b))
  dt = np.dtype(DTYPES[dtype])
  args = _on(device, v_a.astype(dt), s_a.astype(np.dtype(s_dtype)), v_b.astype(dt),
             s_b.astype(np.dtype(s_dtype)))
  v, s = jpa.merge_state(*args)
  want_v, want_s = reference_merge(np.stack([v_a, v_b], 1), np.stack([s_a, s_b], 1))
  assert v.shape == (t, h, d) and s.shape == (t, h) and v.devices() == {device}
  assert_merged(v, s, want_v, want_s, dtype)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("num_states", [0, 1, 3, 7])
def test_merge_states_matches_reference(platform, device, rng, dtype, num_states):
  t, h, d = 19, 4, 128
  v, s = random_states(rng, (t, num_states, h, d), dtype, empty_fraction=0.4)
  if num_states:
    s[:2] = -np.inf  # rows with every state empty
  got = jpa.merge_states(*_on(device, v.astype(np.dtype(DTYPES[dtype])), s))
  assert got[0].shape == (t, h, d) and got[1].shape == (t, h)
  assert_merged(*got, *reference_merge(v, s), dtype)


def test_merge_is_stable_for_large_lse(platform, device, rng):
  """LSEs far outside exp2's float32 range (+-1e4) merge as well as small ones: the
  maximum is subtracted before exponentiating."""
  t, n, h, d = 8, 3, 2, 64
  v, s = random_states(rng, (t, n, h, d), "f32", empty_fraction=0.0, lse_scale=2.0)
  for shift in (1e4, -1e4):
    shifted = s + np.float32(shift)  # the reference gets the same float32 inputs
    got = jpa.merge_states(*_on(device, v, shifted))
    assert_merged(*got, *reference_merge(v, shifted), "f32")


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_merging_with_an_empty_state_is_exact(platform, device, rng, dtype):
  """An empty state (s = -inf, whatever its v holds) leaves the other state bit for bit;
  two empty states give exactly 0 and -inf."""
  dt = np.dtype(DTYPES[dtype])
  t, h, d = 5, 3, 64
  v, s = random_states(rng, (t, h, d), dtype, empty_fraction=0.0)
  garbage = np.full((t, h, d), np.nan, np.float32)
  garbage[0] = np.inf
  empty = np.full((t, h), -np.inf, np.float32)
  v, garbage = v.astype(dt), garbage.astype(dt)
  for args in ((v, s, garbage, empty), (garbage, empty, v, s)):
    got_v, got_s = jpa.merge_state(*_on(device, *args))
    np.testing.assert_array_equal(np.asarray(got_v), v)
    np.testing.assert_array_equal(np.asarray(got_s), s)
  got_v, got_s = jpa.merge_state(*_on(device, garbage, empty, garbage, empty))
  assert (np.asarray(got_v) == 0).all() and np.isneginf(np.asarray(got_s)).all()
  # One live state among several empty ones, at every position.
  for i in range(4):
    vs = np.stack([garbage] * 4, 1)
    ss = np.stack([empty] * 4, 1)
    vs[:, i], ss[:, i] = v, s
    got_v, got_s = jpa.merge_states(*_on(device, vs, ss))
    np.testing.assert_array_equal(np.asarray(got_v), v)
    np.testing.assert_array_equal(np.asarray(got_s), s)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_merge_state_in_place(platform, device, rng, dtype):
  """The in-place variant returns the merged pair (the arguments stay as they were);
  rows masked out keep v and s bit for bit, the others equal merge_state's."""
  dt = np.dtype(DTYPES[dtype])
  t, h, d = 11, 4, 64
  v, s = random_states(rng, (t, h, d), dtype)
  v_o, s_o = random_states(rng, (t, h, d), dtype)
  v = np.nan_to_num(v).astype(dt)  # the updated state may be read where masked out
  args = _on(device, v, s, v_o.astype(dt), s_o)
  want_v, want_s = (np.asarray(x) for x in jpa.merge_state(*args))
  got_v, got_s = jpa.merge_state_in_place(*args)
  np.testing.assert_array_equal(np.asarray(got_v), want_v)
  np.testing.assert_array_equal(np.asarray(got_s), want_s)
  mask = rng.random(t) < 0.5
  mask[:2] = [True, False]
  got_v, got_s = jpa.merge_state_in_place(*args, mask=put(mask, device))
  np.testing.assert_array_equal(np.asarray(got_v)[mask], want_v[mask])
  np.testing.assert_array_equal(np.asarray(got_s)[mask], want_s[mask])
  np.testing.assert_array_equal(np.asarray(got_v)[~mask], v[~mask])
  np.testing.assert_array_equal(np.asarray(got_s)[~mask], s[~mask])
  np.testing.assert_array_equal(np.asarray(args[0]), v)  # inputs untouched


@pytest.mark.parametrize("masked", [False, True])
def test_merge_state_in_place_donated_is_in_place(platform, device, rng, masked):
  """jit(merge_state_in_place, donating v and s): the compiled HLO aliases both results
  to the donated inputs, jax uses the donation, and the result is the merge."""
  t, h, d = 16, 8, 128
  v, s = random_states(rng, (t, h, d), "bf16", empty_fraction=0.1)
  v_o, s_o = random_states(rng, (t, h, d), "bf16", empty_fraction=0.1)
  v = np.nan_to_num(v).astype(jnp.bfloat16)
  args = _on(device, v, s, v_o.astype(jnp.bfloat16), s_o,
             np.arange(t) % 3 != 0 if masked else None)
  want = [np.asarray(x) for x in jpa.merge_state_in_place(*args)]
  step = jax.jit(jpa.merge_state_in_place, donate_argnums=(0, 1))
  text = step.lower(*args).compile().as_text()
  header = text.splitlines()[0]
  # Result 0 (v) aliases parameter 0, result 1 (s) parameter 1.
  assert "{0}: (0, {}" in header and "{1}: (1, {}" in header, header
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message=".*donated buffers.*")
    got = step(*args)
    jax.block_until_ready(got)
  assert args[0].is_deleted() and args[1].is_deleted()
  np.testing.assert_array_equal(np.asarray(got[0]), want[0])
  np.testing.assert_array_equal(np.asarray(got[1]), want[1])


def test_merge_rejects_bad_input():
  v = jnp.zeros((4, 2, 64), jnp.float16)
  s = jnp.zeros((4, 2), jnp.float32)
  bad = [
      (lambda: jpa.merge_state(v, s, v.astype(jnp.bfloat16), s), TypeError, "one dtype"),
      (lambda: jpa.merge_state(v, s, v[:3], s[:3]), ValueError, "one shape"),
      (lambda: jpa.merge_state(v, s[:, :1], v, s), ValueError, "s_a must have"),
      (lambda: jpa.merge_state(v[None], s[None], v[None], s[None]), ValueError, "v_a must be"),
      (lambda: jpa.merge_state(v.astype(jnp.int32), s, v.astype(jnp.int32), s), TypeError,
       "float16, bfloat16 or float32"),
      (lambda: jpa.merge_state(v, s.astype(jnp.int32), v, s), TypeError, "s_a must be a float"),
      (lambda: jpa.merge_states(v, s), ValueError, "num_states"),
      (lambda: jpa.merge_states(v[:, None], s), ValueError, "s must have"),
      (lambda: jpa.merge_state_in_place(v, s, v, s, mask=jnp.ones(3, bool)), ValueError, "mask"),
      (lambda: jpa.merge_state_in_place(v, s, v, s, mask=jnp.ones(4, jnp.int32)), ValueError,
       "mask"),
      (lambda: jpa.merge_state([1.0], s, v, s), TypeError, "v_a must be an array"),
  ]
  for call, error, words in bad:
    with pytest.raises(error, match=words):
      call()


# --------------------------------------------- decode results merge over split keys


def split_table(table: PageTable, prefix_lens, page_size):
  """(prefix, suffix) page tables: request b's first prefix_lens[b] keys (whole pages)
  and the rest, on the same pages of the cache as `table`."""
  prefix_lens = np.asarray(prefix_lens)
  assert (prefix_lens % page_size == 0).all() and (prefix_lens <= table.kv_lens).all()
  parts = []
  for lens, pick in ((prefix_lens, lambda own, n: own[:n]),
                     (table.kv_lens - prefix_lens, lambda own, n: own[n:])):
    indices = [pick(table.indices[table.indptr[b]:table.indptr[b + 1]],
                    int(prefix_lens[b]) // page_size) for b in range(len(lens))]
    npages = np.array([len(x) for x in indices])
    last = np.where(npages > 0, lens - (npages - 1) * page_size, 0)
    parts.append(PageTable(np.concatenate([[0], np.cumsum(npages)]).astype(np.int32),
                           np.concatenate(indices).astype(np.int32), last.astype(np.int32),
                           lens.astype(np.int64), table.num_pages))
  return parts


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("tensor_cores", [False, True])
def test_decode_results_merge_with_prefix_results(platform, device, rng, dtype, tensor_cores):
  """decode over [prefix pages + suffix pages] in one call equals merge_state of decode
  over the prefix and decode over the suffix (return_lse=True), output and LSE, both
  against the float32 oracle; requests with an empty prefix or an empty suffix too."""
  check_native(platform)
  if dtype == "f32" and platform != "cpu":
    pytest.skip("f32 is CPU-only")
  hq, hk, d, ps = 16, 4, 128, 16
  prefix_lens = np.array([0, 16, 64, 320, 48, 32, 0])
  suffix_lens = np.array([9, 0, 1, 700, 33, 16, 0])
  table = page_table(rng, prefix_lens + suffix_lens, ps)
  prefix, suffix = split_table(table, prefix_lens, ps)
  k, v = random_cache(rng, table.num_pages, ps, hk, d, dtype)
  cache = put(cache_in_form(k, v, dtype, "HND", "5d"), device)
  dt = DTYPES[dtype]
  batch = len(prefix_lens)
  q = round_to(rng.standard_normal((batch, hq, d), dtype=np.float32), dt)
  qd = put(q.astype(np.dtype(dt)), device)
  results = {}
  with jax.default_device(device):
    w = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout="HND", use_tensor_cores=tensor_cores)
    for name, t in (("full", table), ("prefix", prefix), ("suffix", suffix)):
      w.plan(t.indptr, t.indices, t.last_page_len, hq, hk, d, ps, q_data_type=dt)
      results[name] = w.run(qd, cache, return_lse=True)
    merged = jpa.merge_state(*results["prefix"], *results["suffix"])
  ref_out, ref_lse = oracle(q, k, v, np.arange(batch + 1), table)
  assert np.isneginf(ref_lse[-1]).all()  # the request with no keys at all
  assert_attention_close(*results["full"], ref_out, ref_lse, dtype, what="one call")
  assert_attention_close(*merged, ref_out, ref_lse, dtype, what="merged")
  # Where one part is empty the merge hands the other part's result through unchanged.
  for b, part in ((0, "suffix"), (1, "prefix")):
    np.testing.assert_array_equal(np.asarray(merged[0][b]), np.asarray(results[part][0][b]))


# ------------------------------------------------------------ cascade: test batches


@dataclasses.dataclass
class CascadeBatch:
  """A shared-prefix batch: per-level arrays for the cascade, and the same keys as one
  page table per request (each request's pages of every level, concatenated)."""

  qo_indptr: np.ndarray  # [B+1] query tokens of each request
  levels: list  # per level: (qo_indptr, kv_indptr, kv_indices, kv_last_page_len)
  full: PageTable  # the concatenated keys
  num_pages: int


def cascade_batch(rng, page_size, shared_levels, unique_lens, qo_lens, spare_pages=3):
  """shared_levels: for each level before the last, its groups as (requests, prefix
  keys), covering the batch in order; prefix keys are whole pages (a request's later
  keys start on a page of their own). The last level holds each request's own
  `unique_lens` keys. Every page sits at a random place in the cache."""
  unique_lens = np.asarray(unique_lens, np.int64)
  qo_lens = np.asarray(qo_lens, np.int64)
  batch = len(unique_lens)
  qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
  pages = lambda n: -(-int(n) // page_size)
  total = (sum(pages(n) for level in shared_levels for _, n in level)
           + sum(pages(n) for n in unique_lens))
  pool = iter(rng.permutation(total + spare_pages).astype(np.int32).tolist())
  own = [[] for _ in range(batch)]  # pages of each request, level by level
  kv_lens = np.zeros(batch, np.int64)
  levels = []

  def level_arrays(groups):  # [(end request, keys, page ids)] in request order
    qo = [0] + [int(qo_indptr[end]) for end, _, _ in groups]
    indptr = np.concatenate([[0], np.cumsum([len(ids) for *_, ids in groups])])
    indices = [i for *_, ids in groups for i in ids]
    last = [keys - (len(ids) - 1) * page_size if ids else 0 for _, keys, ids in groups]
    return tuple(np.asarray(x, np.int32) for x in (qo, indptr, indices, last))

  def add_group(first, end, keys):
    ids = [next(pool) for _ in range(pages(keys))]
    for b in range(first, end):
      own[b] += ids
      kv_lens[b] += keys
    return end, keys, ids

  for level in shared_levels:
    groups, first = [], 0
    for requests, keys in level:
      assert keys % page_size == 0, "shared prefixes fill whole pages"
      groups.append(add_group(first, first + requests, keys))
      first += requests
    assert first == batch
    levels.append(level_arrays(groups))
  unique = level_arrays([add_group(b, b + 1, int(n)) for b, n in enumerate(unique_lens)])
  levels.append((qo_indptr, *unique[1:]))
  npages = np.array([len(o) for o in own])
  full = PageTable(np.concatenate([[0], np.cumsum(npages)]).astype(np.int32),
                   np.asarray([i for o in own for i in o], np.int32),
                   np.where(npages > 0, kv_lens - (npages - 1) * page_size, 0).astype(np.int32),
                   kv_lens, total + spare_pages)
  return CascadeBatch(qo_indptr, levels, full, total + spare_pages)


def plan_cascade(wrapper, batch: CascadeBatch, heads, head_dim, page_size, dtype, **kw):
  return wrapper.plan(*(list(a) for a in zip(*batch.levels)), heads[0], heads[1], head_dim,
                      page_size, q_data_type=DTYPES[dtype], **kw)


# Shared prefix keys of each level's groups, whole pages of either page size.
PREFIX_KEYS = {1: (37, 20, 9), 16: (48, 32, 16)}


def shared_levels_for(num_levels, page_size, batch):
  """Level 0: one prefix for the whole batch; a middle level (3 levels): three groups,
  the middle one of a single request with no shared keys at that level."""
  a, b, c = PREFIX_KEYS[page_size]
  levels = [[(batch, a)]]
  if num_levels == 3:
    first = batch // 2
    levels.append([(first, b), (1, 0), (batch - first - 1, c)])
  return levels


# --------------------------------------------------- cascade: against plain prefill


@dataclasses.dataclass(frozen=True)
class CascadeCase:
  levels: int
  kv_layout: str
  form: str
  page_size: int
  head_dim: int
  heads: tuple
  causal: bool
  dtype: str

  @property
  def id(self):
    return (f"L{self.levels}-{self.dtype}-{self.kv_layout}-{self.form}-p{self.page_size}"
            f"-d{self.head_dim}-h{self.heads[0]}x{self.heads[1]}"
            + ("-causal" if self.causal else ""))


CASCADE_CASES = [CascadeCase(**row) for row in pairwise(
    {"levels": (2, 3), "kv_layout": ("NHD", "HND"), "form": ("5d", "tuple"),
     "page_size": (1, 16), "head_dim": (64, 128), "heads": ((8, 2), (16, 2), (4, 4)),
     "causal": (False, True), "dtype": ("f32", "f16", "bf16")},
    seed=zlib.crc32(b"cascade"))]


@pytest.mark.parametrize("case", CASCADE_CASES, ids=[c.id for c in CASCADE_CASES])
def test_cascade_matches_prefill_over_concatenated_keys(platform, device, case):
  """Shared prefix (+ a middle level of groups) + unique suffixes: the cascade's output
  and LSE equal the plain prefill wrapper's over each request's keys of every level
  concatenated, and the float32 oracle's; requests with no unique keys included."""
  check_native(platform)
  if case.dtype == "f32" and platform != "cpu":
    pytest.skip("f32 is CPU-only")
  rng = seeded_rng(case.id)
  qo_lens = np.array([3, 1, 4, 1, 2, 5])
  # Causal rows must see their own tokens' keys at the last level (kv_len >= qo_len - 1).
  unique_lens = qo_lens + rng.integers(0, 40, size=len(qo_lens))
  unique_lens[[1, 3]] = 0
  batch = cascade_batch(rng, case.page_size,
                        shared_levels_for(case.levels, case.page_size, len(qo_lens)),
                        unique_lens, qo_lens)
  hq, hk = case.heads
  dt = DTYPES[case.dtype]
  k, v = random_cache(rng, batch.num_pages, case.page_size, hk, case.head_dim, case.dtype)
  cache = put(cache_in_form(k, v, case.dtype, case.kv_layout, case.form), device)
  q = round_to(rng.standard_normal((int(batch.qo_indptr[-1]), hq, case.head_dim),
                                   dtype=np.float32), dt)
  qd = put(q.astype(np.dtype(dt)), device)
  with jax.default_device(device):
    cascade = jpa.MultiLevelCascadeAttentionWrapper(case.levels, kv_layout=case.kv_layout)
    plans = plan_cascade(cascade, batch, case.heads, case.head_dim, case.page_size, case.dtype,
                         causal=case.causal)
    out, lse = cascade.run(qd, cache, return_lse=True)
    only_out = cascade.run(qd, cache)
    plain = jpa.BatchPrefillWithPagedKVCacheWrapper(kv_layout=case.kv_layout)
    plain.plan(batch.qo_indptr, batch.full.indptr, batch.full.indices,
               batch.full.last_page_len, hq, hk, case.head_dim, case.page_size,
               causal=case.causal, q_data_type=dt)
    plain_out, plain_lse = plain.run(qd, cache, return_lse=True)
  assert [p.config.causal for p in plans] == [False] * (case.levels - 1) + [case.causal]
  assert out.dtype == dt and out.shape == q.shape
  np.testing.assert_array_equal(np.asarray(only_out), np.asarray(out))
  ref_out, ref_lse = oracle(q, k, v, batch.qo_indptr, batch.full, causal=case.causal)
  assert_attention_close(plain_out, plain_lse, ref_out, ref_lse, case.dtype, what="prefill")
  assert_attention_close(out, lse, ref_out, ref_lse, case.dtype, what="cascade")
  tol = 2 * OUT_TOL[case.dtype]
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)),
                             np.asarray(plain_out.astype(jnp.float32)), rtol=tol, atol=tol)


@pytest.mark.parametrize("num_levels", [2, 3])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
def test_cascade_decode_style(platform, device, rng, num_levels, page_size, kv_layout):
  """One query token per request (level 0: all of them against the shared prefix, in
  one group): equals the decode wrapper over the concatenated pages; requests without
  keys of their own included."""
  check_native(platform)
  dtype = "bf16"
  hq, hk, d = 32, 8, 128
  unique_lens = np.array([0, 5, 17, 0, 1, 40, 16, 3])
  qo_lens = np.ones_like(unique_lens)
  batch = cascade_batch(rng, page_size, shared_levels_for(num_levels, page_size, 8),
                        unique_lens, qo_lens)
  k, v = random_cache(rng, batch.num_pages, page_size, hk, d, dtype)
  cache = put(cache_in_form(k, v, dtype, kv_layout, "5d"), device)
  q = round_to(rng.standard_normal((8, hq, d), dtype=np.float32), jnp.bfloat16)
  qd = put(q.astype(jnp.bfloat16), device)
  with jax.default_device(device):
    cascade = jpa.MultiLevelCascadeAttentionWrapper(num_levels, kv_layout=kv_layout)
    plan_cascade(cascade, batch, (hq, hk), d, page_size, dtype, causal=True)
    out, lse = cascade.run(qd, cache, return_lse=True)
    decode = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout=kv_layout, use_tensor_cores=True)
    decode.plan(batch.full.indptr, batch.full.indices, batch.full.last_page_len, hq, hk, d,
                page_size, q_data_type=jnp.bfloat16)
    dec_out, dec_lse = decode.run(qd, cache, return_lse=True)
  ref_out, ref_lse = oracle(q, k, v, np.arange(9), batch.full)
  assert_attention_close(dec_out, dec_lse, ref_out, ref_lse, dtype, what="decode")
  assert_attention_close(out, lse, ref_out, ref_lse, dtype, what="cascade")


def test_cascade_under_jit_compiles_once(platform, device, rng):
  """Two batches of different composition (requests, groups at level 0, lengths) within
  the same capacities: one compilation, plans passed as the pytree plan() returns; q has
  padding rows past the tokens (0 and -inf)."""
  check_native(platform)
  dtype, hq, hk, d, ps = "f16", 8, 2, 64, 16
  num_pages, rows = 64, 32
  k, v = random_cache(rng, num_pages, ps, hk, d, dtype)
  cache = put(cache_in_form(k, v, dtype, "NHD", "tuple"), device)
  traces = []
  with jax.default_device(device):
    cascade = jpa.MultiLevelCascadeAttentionWrapper(
        2, kv_layout="NHD", max_batch_size=(4, 16), max_num_pages=num_pages,
        max_num_tokens=rows)

    @jax.jit
    def step(q, cache, plans):
      traces.append(None)  # once per trace, i.e. per compilation
      return cascade.run(q, cache, return_lse=True, plans=plans)

    batches = (
        ([[(5, 64)]], [7, 0, 30, 1, 12], [2, 1, 3, 1, 4]),
        ([[(3, 32), (4, 96)]], [1, 2, 3, 50, 0, 9, 20], [1, 1, 2, 5, 1, 3, 6]),
    )
    for shared, unique_lens, qo_lens in batches:
      batch = cascade_batch(rng, ps, shared, unique_lens, qo_lens, spare_pages=0)
      used = batch.num_pages
      # Place the batch's pages anywhere in the fixed cache.
      remap = rng.choice(num_pages, used, replace=False).astype(np.int32)
      batch.levels = [(qo, ind, remap[idx], last) for qo, ind, idx, last in batch.levels]
      batch.full.indices = remap[batch.full.indices]
      batch.full.num_pages = num_pages
      plans = plan_cascade(cascade, batch, (hq, hk), d, ps, dtype, causal=True)
      q = round_to(rng.standard_normal((rows, hq, d), dtype=np.float32), jnp.float16)
      out, lse = step(put(q.astype(np.float16), device), cache, plans)
      ref_out, ref_lse = oracle(q, k, v, batch.qo_indptr, batch.full, causal=True)
      assert np.isneginf(ref_lse[int(batch.qo_indptr[-1]):]).all()
      assert_attention_close(out, lse, ref_out, ref_lse, dtype, what=str(qo_lens))
  assert len(traces) == 1, f"step traced {len(traces)} times for plans of equal capacity"


def test_cascade_single_level_is_the_prefill_wrapper(platform, device, rng):
  """One level is plain prefill: the same numbers, bit for bit."""
  check_native(platform)
  batch = cascade_batch(rng, 8, [], [9, 30, 4], [2, 5, 4])
  k, v = random_cache(rng, batch.num_pages, 8, 2, 64, "bf16")
  cache = put(cache_in_form(k, v, "bf16", "NHD", "5d"), device)
  q = put(np.ones((11, 4, 64), jnp.bfloat16), device)
  with jax.default_device(device):
    cascade = jpa.MultiLevelCascadeAttentionWrapper(1)
    plan_cascade(cascade, batch, (4, 2), 64, 8, "bf16", causal=True)
    plain = jpa.BatchPrefillWithPagedKVCacheWrapper()
    plain.plan(*batch.levels[0], 4, 2, 64, 8, causal=True, q_data_type=jnp.bfloat16)
    for got, want in zip(cascade.run(q, cache, return_lse=True),
                         plain.run(q, cache, return_lse=True)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_cascade_rejects_bad_input(rng):
  batch = cascade_batch(rng, 4, [[(2, 8)]], [3, 5], [1, 2])
  arrays = [list(a) for a in zip(*batch.levels)]
  q = jnp.ones((3, 4, 64), jnp.float16)
  cache = jnp.zeros((batch.num_pages, 2, 4, 2, 64), jnp.float16)
  w = jpa.MultiLevelCascadeAttentionWrapper(2)
  with pytest.raises(RuntimeError, match="before plan"):
    w.run(q, cache)
  with pytest.raises(ValueError, match="one array per level"):
    w.plan(*(a[:1] for a in arrays), 4, 2, 64, 4)
  with pytest.raises(TypeError, match="list of 2 arrays"):
    w.plan(batch.levels[0][0], *arrays[1:], 4, 2, 64, 4)
  bad_qo = [np.array([0, 2], np.int32), arrays[0][1]]
  with pytest.raises(ValueError, match="same query tokens"):
    w.plan(bad_qo, *arrays[1:], 4, 2, 64, 4)
  plans = w.plan(*arrays, 4, 2, 64, 4)
  with pytest.raises(ValueError, match="one Plan per level"):
    w.run(q, cache, plans=plans[:1])
  with pytest.raises(TypeError, match="tuple of 2 Plans"):
    w.run(q, cache, plans=plans[0])
  with pytest.raises(ValueError, match="q has 2 rows"):
    w.run(q[:2], cache)
  for kw in (dict(max_batch_size=(1, 2, 3)), dict(num_levels=0)):
    with pytest.raises(ValueError):
      jpa.MultiLevelCascadeAttentionWrapper(**{"num_levels": 2, **kw})
