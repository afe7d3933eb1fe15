"""ragged_paged_attention (the RPA-v3 entry point) and its in-graph planner.

The call must write exactly the new K/V the host path writes and attend as plan/run and
the float32 oracle do; the device planner's plans must satisfy every invariant of the
host planner's (test_planner.check_plan) and compute the same attention; a decode loop
inside lax.while_loop compiles once and matches host-planned steps; bad concrete inputs
raise errors that name the argument."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_pagedattn as jpa
from jax_pagedattn import device_planner, planning, reference

from _helpers import (DTYPES, OUT_TOL, PageTable, assert_attention_close, cache_in_form,
                      check_native, oracle, platform_dtypes, put, random_cache, round_to)
from test_planner import check_plan


# ------------------------------------------------------------------ batches


@dataclasses.dataclass
class RaggedBatch:
  """An RPA-v3 batch (fixed-stride page table) and the same batch in CSR form."""

  q_lens: np.ndarray       # [num_seqs]
  kv_lens: np.ndarray      # int32 [max_num_seqs] (entries past num_seqs are garbage)
  cu_q_lens: np.ndarray    # int32 [max_num_seqs + 1] (likewise)
  page_indices: np.ndarray  # int32 [max_num_seqs * pages_per_seq]
  distribution: np.ndarray  # int32 [3]
  pages_per_seq: int
  page_size: int
  num_pages: int

  @property
  def num_seqs(self) -> int:
    return int(self.distribution[2])

  @property
  def num_tokens(self) -> int:
    return int(self.cu_q_lens[self.num_seqs])

  def table(self) -> PageTable:
    """The live requests' page table in CSR form (what plan() and the oracle take)."""
    n, ps, pps = self.num_seqs, self.page_size, self.pages_per_seq
    lens = self.kv_lens[:n].astype(np.int64)
    npages = -(-lens // ps)
    indices = [self.page_indices[b * pps:b * pps + npages[b]] for b in range(n)]
    return PageTable(np.concatenate([[0], np.cumsum(npages)]).astype(np.int32),
                     np.concatenate(indices + [np.zeros(0, np.int32)]).astype(np.int32),
                     np.where(npages > 0, lens - (npages - 1) * ps, 0).astype(np.int32), lens,
                     self.num_pages)

  def args(self):
    return self.kv_lens, self.page_indices, self.cu_q_lens, self.distribution


def ragged_batch(rng, q_lens, kv_lens, page_size, *, max_num_seqs=None, decode_end=0,
                 spare_pages=3, pages_per_seq=None) -> RaggedBatch:
  """Pages of every live request at random places of the cache; every entry RPA v3 says
  is not read (past num_seqs, past a request's pages) holds garbage, negative or beyond
  the cache, so reading one shows. pages_per_seq defaults to one more than needed."""
  q_lens, kv_lens = np.asarray(q_lens, np.int64), np.asarray(kv_lens, np.int64)
  n = len(q_lens)
  max_num_seqs = max_num_seqs or n
  npages = -(-kv_lens // page_size)
  pps = pages_per_seq or int(npages.max(initial=0)) + 1
  num_pages = int(npages.sum()) + spare_pages
  perm = rng.permutation(num_pages).astype(np.int32)
  table = rng.choice([-7, num_pages + 3, 2**30], size=(max_num_seqs, pps)).astype(np.int32)
  used = 0
  for b in range(n):
    table[b, :npages[b]] = perm[used:used + npages[b]]
    used += npages[b]
  cu = np.concatenate([[0], np.cumsum(q_lens)])
  garbage = rng.integers(-5, 10**6, size=max_num_seqs - n)
  return RaggedBatch(q_lens, np.concatenate([kv_lens, garbage]).astype(np.int32),
                     np.concatenate([cu, cu[-1] + np.abs(garbage)]).astype(np.int32),
                     table.reshape(-1), np.array([decode_end, decode_end, n], np.int32), pps,
                     page_size, num_pages)


def appended(k, v, batch: RaggedBatch, new_k, new_v):
  """The NHD float32 cache after writing each live token's key and value."""
  k, v = k.copy(), v.copy()
  ps, pps = batch.page_size, batch.pages_per_seq
  for b in range(batch.num_seqs):
    for i in range(int(batch.q_lens[b])):
      pos = int(batch.kv_lens[b]) - int(batch.q_lens[b]) + i
      page = batch.page_indices[b * pps + pos // ps]
      row = int(batch.cu_q_lens[b]) + i
      k[page, pos % ps], v[page, pos % ps] = new_k[row], new_v[row]
  return k, v


def as_nhd_f32(cache, kv_layout):
  k, v = reference.split_paged_kv_cache(cache, kv_layout)
  return np.asarray(k.astype(jnp.float32)), np.asarray(v.astype(jnp.float32))


def random_rows(rng, rows, heads, d, dtype):
  return round_to(rng.standard_normal((rows, heads, d), dtype=np.float32), DTYPES[dtype])


# Lengths with the edge cases: decode requests first (one new token; kv 1, a full page,
# one past it), then chunks and mixed requests (crossing pages, a whole prompt, no new
# token, no key at all).
def mixed_lengths(ps):
  q = [1, 1, 1, 9, 2 * ps + 3, 0, 0, 5]
  kv = [1, ps, ps + 1, 9 + ps - 1, 2 * ps + 3, 3 * ps, 0, 40]
  return q, kv


@dataclasses.dataclass(frozen=True)
class Case:
  dtype: str
  kv_layout: str = "NHD"
  form: str = "5d"
  page_size: int = 8
  heads: tuple = (8, 2)
  head_dim: int = 64
  causal: bool = True
  sliding_window: int | None = None
  soft_cap: float | None = None

  @property
  def id(self):
    return (f"{self.dtype}-{self.kv_layout}-{self.form}-p{self.page_size}-h{self.heads[0]}x"
            f"{self.heads[1]}-d{self.head_dim}{'' if self.causal else '-noncausal'}"
            f"-w{self.sliding_window}-cap{self.soft_cap}")


# "low": the platform's narrowest dtype (bf16; f32 exists on the CPU only).
CASES = [Case("f32"), Case("f16"), Case("bf16"),
         Case("low", kv_layout="HND", form="tuple", page_size=1),
         Case("low", page_size=16, heads=(32, 4), head_dim=128, causal=False),
         Case("low", form="tuple", heads=(4, 4), sliding_window=7, soft_cap=2.0),
         Case("low", kv_layout="HND", page_size=16, heads=(64, 2), head_dim=128,
              sliding_window=1)]


def _rpa_kwargs(case, sm_scale):
  return dict(sm_scale=sm_scale, sliding_window=case.sliding_window, soft_cap=case.soft_cap,
              causal=case.causal, kv_layout=case.kv_layout)


# ------------------------------------------------------------------ results


# Eager calls check their arrays first; under jit they are traced and only planned.
CASE_RUNS = [(c, False) for c in CASES] + [(CASES[2], True), (CASES[5], True)]


@pytest.mark.parametrize("case,jit", CASE_RUNS,
                         ids=[f"{c.id}{'-jit' if j else ''}" for c, j in CASE_RUNS])
def test_matches_plan_run_and_reference(platform, case, device, rng, jit):
  """Mixed decode / chunk / empty requests with garbage past num_seqs: the cache holds
  exactly the host append's writes and nothing else changed; out matches the plan/run
  path (append + prefill wrapper) and the float32 oracle; padding rows are 0."""
  check_native(platform)
  if case.dtype == "low":
    case = dataclasses.replace(case, dtype=platform_dtypes(platform)[-1])
  if case.dtype not in platform_dtypes(platform):
    pytest.skip(f"no {case.dtype} kernels on {platform}")
  hq, hk = case.heads
  d, ps, dt = case.head_dim, case.page_size, DTYPES[case.dtype]
  q_lens, kv_lens = mixed_lengths(ps)
  batch = ragged_batch(rng, q_lens, kv_lens, ps, max_num_seqs=len(q_lens) + 2, decode_end=3)
  rows = batch.num_tokens + 3
  k, v = random_cache(rng, batch.num_pages, ps, hk, d, case.dtype)
  q, new_k, new_v = (random_rows(rng, rows, h, d, case.dtype) for h in (hq, hk, hk))
  cache = cache_in_form(k, v, case.dtype, case.kv_layout, case.form)
  sm_scale = 0.7 / np.sqrt(d)
  kw = _rpa_kwargs(case, sm_scale)
  call = functools.partial(jpa.ragged_paged_attention, **kw)
  if jit:
    call = jax.jit(call)
  with jax.default_device(device):
    out, new_cache = call(*put(tuple(x.astype(dt) for x in (q, new_k, new_v)), device),
                          put(cache, device), *batch.args())
    out = np.asarray(out.astype(jnp.float32))
    got_k, got_v = as_nhd_f32(jax.device_get(new_cache), case.kv_layout)

    want_k, want_v = appended(k, v, batch, new_k, new_v)
    np.testing.assert_array_equal(got_k, want_k)
    np.testing.assert_array_equal(got_v, want_v)

    # plan/run: the FlashInfer path over the same cache after a host append.
    table, n = batch.table(), batch.num_tokens
    w = jpa.BatchPrefillWithPagedKVCacheWrapper(kv_layout=case.kv_layout)
    qo_indptr = batch.cu_q_lens[:batch.num_seqs + 1]
    w.plan(qo_indptr, table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
           causal=case.causal, sm_scale=sm_scale, q_data_type=dt,
           window_left=-1 if case.sliding_window is None else case.sliding_window - 1,
           logits_soft_cap=case.soft_cap)
    bi, pos = jpa.get_batch_indices_positions(qo_indptr, table.kv_lens, n)
    host_cache = jpa.append_paged_kv_cache(
        *put((new_k[:n].astype(dt), new_v[:n].astype(dt)), device), bi, pos,
        put(cache, device), table.indices, table.indptr, table.last_page_len,
        kv_layout=case.kv_layout)
    run_out = np.asarray(w.run(put(q[:n].astype(dt), device), host_cache).astype(jnp.float32))

  ref_out, ref_lse = oracle(q, want_k, want_v, qo_indptr, table, causal=case.causal,
                            sm_scale=sm_scale, logits_soft_cap=case.soft_cap,
                            window_left=-1 if case.sliding_window is None
                            else case.sliding_window - 1)
  pad = np.full((rows - n, hq), -np.inf, np.float32)
  ref_lse = np.concatenate([ref_lse[:n], pad])
  assert_attention_close(out, None, ref_out, ref_lse, case.dtype, what="vs oracle")
  assert_attention_close(out[:n], None, run_out, ref_lse[:n], case.dtype, what="vs plan/run")


def _plan_inputs(batch: RaggedBatch):
  return tuple(jnp.asarray(x) for x in (batch.cu_q_lens, batch.kv_lens, batch.page_indices))


@pytest.mark.parametrize("deal", ["auto", "bins", "equal"])
def test_device_plan_runs_like_the_host_plan(platform, device, deal):
  """The same batch planned on the device and on the host (same capacities, so one
  compiled call): both plans compute the oracle's attention, and both cut long requests
  (the device plan is a real split plan, not one item per request)."""
  check_native(platform)
  rng = np.random.default_rng(16)
  dtype = platform_dtypes(platform)[-1]
  hq, hk, d, ps = 8, 2, 64, 16
  batch = ragged_batch(rng, [1, 1, 1, 6, 30], [3000, 17, 900, 2100, 64], ps)
  k, v = random_cache(rng, batch.num_pages, ps, hk, d, dtype)
  cache = put(cache_in_form(k, v, dtype, "NHD", "5d"), device)
  q = random_rows(rng, batch.num_tokens, hq, d, dtype)
  table = batch.table()
  qo_indptr = batch.cu_q_lens[:batch.num_seqs + 1]
  with jax.default_device(device):
    dtype_name = planning.canonical_dtype(DTYPES[dtype], "dtype")
    tile_rows = planning.tile_rows(
        "prefill", hq // hk, d, planning.hopper_prefill("prefill", dtype_name, dtype_name, d))
    caps = device_planner.capacities(batch.num_seqs, batch.num_tokens, batch.pages_per_seq,
                                     group_size=hq // hk, tile_rows=tile_rows, num_kv_heads=hk,
                                     num_ctas=64 * hk)
    w = jpa.BatchPrefillWithPagedKVCacheWrapper()
    host = w.plan(qo_indptr, table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
                  causal=True, q_data_type=DTYPES[dtype])
    config = dataclasses.replace(host.config, caps=caps)
    spec = device_planner.DeviceSpec(ps, batch.pages_per_seq, hq // hk, tile_rows, True, -1,
                                     caps, deal=deal)
    dev = device_planner.plan(*_plan_inputs(batch), batch.num_seqs, spec=spec)
    host_buf = planning.plan_host(qo_indptr, table.indptr, table.indices, table.last_page_len,
                                  planning.plan_spec(page_size=ps, group_size=hq // hk,
                                                     tile_rows=tile_rows, causal=True,
                                                     caps=caps))
    step = jax.jit(lambda q, c, p: w.run(q, c, return_lse=True, plan=p))
    results = {name: step(put(q.astype(DTYPES[dtype]), device), cache, planning.Plan(buf, config))
               for name, buf in (("device", dev.buffer), ("host", host_buf))}
  ref_out, ref_lse = oracle(q, k, v, qo_indptr, table, causal=True)
  for name, (out, lse) in results.items():
    assert_attention_close(out, lse, ref_out, ref_lse, dtype, what=f"{name} plan")
  work = planning.unpack_plan(np.asarray(dev.buffer), caps)["work"]
  assert (work[:, 5] >= 1).any(), "the device plan split no request"


# ------------------------------------------------------------------ plan invariants


# Static settings of the property test (each one compiles the planner once), chosen to
# cover: decode and prefill tiles, head slices (G > tile_rows), one bin, windows, causal
# or not, page sizes 1..16, and each deal forced. (page_size, group, tile_rows,
# num_kv_heads, num_ctas, causal, window_left, deal)
SPECS = [(16, 4, 16, 2, 132, False, -1, "auto"), (8, 4, 128, 2, 396, True, -1, "auto"),
         (3, 8, 4, 1, 16, True, 5, "auto"), (1, 1, 64, 4, 16, False, 63, "bins"),
         (16, 2, 16, 1, 396, True, -1, "equal"), (8, 4, 16, 2, 2, True, 1000, "auto"),
         (16, 8, 1, 2, 132, False, 0, "auto"), (2, 3, 16, 2, 64, True, -1, "bins")]
MAX_SEQS, MAX_TOKENS, MAX_KV = 8, 64, 4000


@functools.lru_cache(maxsize=None)
def _spec(index):
  ps, group, tile_rows, hk, ctas, causal, window, deal = SPECS[index]
  pps = -(-MAX_KV // ps) + 1
  caps = device_planner.capacities(MAX_SEQS, MAX_TOKENS, pps, group_size=group,
                                   tile_rows=tile_rows, num_kv_heads=hk, num_ctas=ctas)
  return device_planner.DeviceSpec(ps, pps, group, tile_rows, causal, window, caps, deal=deal)


@st.composite
def device_batches(draw):
  """A valid RPA batch (with room for garbage past num_seqs) and one of SPECS."""
  spec = _spec(draw(st.integers(0, len(SPECS) - 1)))
  n = draw(st.integers(0, MAX_SEQS - 1))
  kv_len = st.one_of(st.integers(0, 70), st.integers(0, 70), st.integers(200, MAX_KV))
  kv_lens = np.array(draw(st.lists(kv_len, min_size=n, max_size=n)), np.int64)
  decode = draw(st.booleans())
  q_lens = np.array([1 if decode else draw(st.integers(0, 8)) for _ in range(n)], np.int64)
  q_lens = np.minimum(q_lens, kv_lens)  # RPA: the new tokens are among the keys
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  batch = ragged_batch(rng, q_lens, kv_lens, spec.page_size, max_num_seqs=MAX_SEQS,
                       pages_per_seq=spec.pages_per_seq)
  return batch, spec


def _check_device_plan(batch: RaggedBatch, spec, plan):
  table, n = batch.table(), batch.num_seqs
  b = dict(caps=spec.caps, group=spec.group_size, tile_rows=spec.tile_rows,
           causal=spec.causal, window_left=spec.window_left, last=table.last_page_len,
           qo_for_check=batch.cu_q_lens[:n + 1], kv_indptr=table.indptr,
           kv_indices=table.indices, qo_lens=batch.q_lens, kv_lens=table.kv_lens)
  check_plan(b, np.asarray(plan.buffer))
  # The append rows: every live token's request and key position, -1 after.
  bi, pos = (np.asarray(x) for x in (plan.batch_indices, plan.positions))
  want_b = np.repeat(np.arange(n), batch.q_lens)
  want_pos = np.concatenate([np.arange(kv - q, kv) for q, kv in
                             zip(batch.q_lens, table.kv_lens)] + [np.zeros(0, np.int64)])
  tokens = batch.num_tokens
  np.testing.assert_array_equal(bi[:tokens], want_b)
  np.testing.assert_array_equal(pos[:tokens], want_pos)
  assert (bi[tokens:] == -1).all() and (pos[tokens:] == -1).all()


@given(device_batches())
@settings(max_examples=120, deadline=None)
def test_device_plans_satisfy_the_host_planners_invariants(drawn):
  """check_plan (test_planner.py) on every in-graph plan: sections, padding, bins,
  every packed row covered once per split with contiguous key ranges, windows."""
  batch, spec = drawn
  with jax.default_device(jax.devices("cpu")[0]):
    plan = device_planner.plan(*_plan_inputs(batch), batch.num_seqs, spec=spec)
  _check_device_plan(batch, spec, plan)


def test_device_plan_balances_uniform_and_unequal_decode():
  """On the headline decode shapes the in-graph deal is close to the host planner's:
  its costliest bin (keys + 32 per item) is within 10% of the host plan's."""
  rng = np.random.default_rng(3)
  ps, group, tile_rows, hk = 16, 4, 16, 8
  for kv_lens in ([4096] * 16, [4096] * 64, [1024] * 256,
                  np.minimum(32768, 16 * (1 + rng.zipf(1.5, 64)))):
    batch = ragged_batch(rng, np.ones(len(kv_lens)), kv_lens, ps)
    table = batch.table()
    caps = device_planner.capacities(batch.num_seqs, batch.num_seqs, batch.pages_per_seq,
                                     group_size=group, tile_rows=tile_rows, num_kv_heads=hk,
                                     num_ctas=396)
    spec = device_planner.DeviceSpec(ps, batch.pages_per_seq, group, tile_rows, False, -1, caps)
    dev = np.asarray(device_planner.plan(*_plan_inputs(batch), batch.num_seqs, spec=spec).buffer)
    host = planning.plan_host(None, table.indptr, table.indices, table.last_page_len,
                              planning.plan_spec(page_size=ps, group_size=group,
                                                 tile_rows=tile_rows, causal=False, caps=caps))

    def worst(buf):
      s = planning.unpack_plan(buf, caps)
      bins, work = s["bin_indptr"], s["work"]
      return max(int((work[bins[i]:bins[i + 1], 4] - work[bins[i]:bins[i + 1], 3] + 32).sum())
                 for i in range(caps.bins))

    assert worst(dev) <= 1.1 * worst(host), (len(kv_lens), worst(dev), worst(host))


# ------------------------------------------------------------------ decode loop


def test_decode_loop_in_while_loop_compiles_once_and_matches_host_steps(platform, device):
  """N decode steps inside lax.while_loop (cache carried and donated, kv_lens
  incremented in the loop, no host planner) compile once for any start and step count,
  and match N steps planned on the host (append + plan/run), bit for bit in the cache."""
  check_native(platform)
  rng = np.random.default_rng(7)
  dtype = platform_dtypes(platform)[-1]
  dt = DTYPES[dtype]
  hq, hk, d, ps, steps = 8, 2, 64, 4, 6
  kv0 = np.array([5, 1, 12, 0, 7])
  seqs = len(kv0)
  batch = ragged_batch(rng, np.ones(seqs), kv0 + steps, ps)
  k, v = random_cache(rng, batch.num_pages, ps, hk, d, dtype)
  qs, ks, vs = (round_to(rng.standard_normal((steps, seqs, h, d), dtype=np.float32), dt)
                for h in (hq, hk, hk))
  traces = []
  kw = dict(sm_scale=0.125)

  @functools.partial(jax.jit, donate_argnames="cache")
  def loop(cache, kv_lens, num_steps, qs, ks, vs, page_indices):
    traces.append(None)
    cu_q_lens = jnp.arange(seqs + 1, dtype=jnp.int32)
    distribution = jnp.full((3,), seqs, jnp.int32)

    def body(carry):
      s, cache, kv_lens, outs = carry
      kv_lens = kv_lens + 1
      out, cache = jpa.ragged_paged_attention(qs[s], ks[s], vs[s], cache, kv_lens, page_indices,
                                              cu_q_lens, distribution, **kw)
      return s + 1, cache, kv_lens, outs.at[s].set(out)

    outs = jnp.zeros(qs.shape, qs.dtype)
    _, cache, kv_lens, outs = jax.lax.while_loop(lambda c: c[0] < num_steps, body,
                                                 (jnp.int32(0), cache, kv_lens, outs))
    return outs, cache, kv_lens

  for start, n in ((kv0, steps), (kv0 + 2, steps - 2)):
    cache = cache_in_form(k, v, dtype, "NHD", "5d")
    with jax.default_device(device):
      args = put((qs.astype(dt), ks.astype(dt), vs.astype(dt), batch.page_indices), device)
      outs, got, lens = loop(put(cache, device), put(start.astype(np.int32), device), n, *args)
      np.testing.assert_array_equal(np.asarray(lens), start + n)
      host_outs, host_cache = _host_decode_steps(device, cache, start, n, batch, qs, ks, vs, hq,
                                                 hk, d, **kw)
    np.testing.assert_array_equal(*(as_nhd_f32(jax.device_get(c), "NHD")[0]
                                    for c in (got, host_cache)))
    np.testing.assert_array_equal(*(as_nhd_f32(jax.device_get(c), "NHD")[1]
                                    for c in (got, host_cache)))
    got_outs = np.asarray(outs.astype(jnp.float32))[:n]
    np.testing.assert_allclose(got_outs, host_outs, atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])
  assert len(traces) == 1, f"the loop was traced {len(traces)} times"


def _host_decode_steps(device, cache, start, n, batch, qs, ks, vs, hq, hk, d, sm_scale):
  """The plan/run loop: each step plans on the host, appends, and runs."""
  dt = DTYPES["f32"] if cache.dtype == np.float32 else jnp.dtype(cache.dtype)
  w = jpa.BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=True)
  cache = put(cache, device)
  ps, pps, seqs = batch.page_size, batch.pages_per_seq, len(start)
  outs = []
  for s in range(n):
    lens = start + s + 1
    npages = -(-lens // ps)
    indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
    indices = np.concatenate([batch.page_indices[b * pps:b * pps + npages[b]]
                              for b in range(seqs)]).astype(np.int32)
    last = (lens - (npages - 1) * ps).astype(np.int32)
    w.plan(indptr, indices, last, hq, hk, d, ps, sm_scale=sm_scale, q_data_type=dt)
    cache = jpa.append_paged_kv_cache(*put((ks[s].astype(dt), vs[s].astype(dt)), device),
                                      np.arange(seqs, dtype=np.int32), (lens - 1).astype(np.int32),
                                      cache, indices, indptr, last)
    outs.append(np.asarray(w.run(put(qs[s].astype(dt), device), cache).astype(jnp.float32)))
  return np.stack(outs), cache


def test_jitted_call_writes_the_donated_cache_in_place(platform, device):
  """jit(ragged_paged_attention, donate the cache): no copy of the cache in the
  compiled program, the output aliases it, and the donated buffers are consumed."""
  check_native(platform)
  rng = np.random.default_rng(11)
  dtype = platform_dtypes(platform)[-1]
  batch = ragged_batch(rng, [1, 4], [9, 30], 8)
  k, v = random_cache(rng, batch.num_pages, 8, 2, 64, dtype)
  q, nk, nv = (random_rows(rng, batch.num_tokens, h, 64, dtype).astype(DTYPES[dtype])
               for h in (8, 2, 2))
  step = jax.jit(jpa.ragged_paged_attention, donate_argnames="kv_cache")
  with jax.default_device(device):
    args = put((q, nk, nv, cache_in_form(k, v, dtype, "NHD", "5d")), device) + batch.args()
    text = step.lower(*args).compile().as_text()
    assert "input_output_alias" in text, "the compiled call aliases no output to an input"
    from test_jit import _cache_copies  # noqa: PLC0415
    assert not _cache_copies(text, [args[3]]), "\n".join(_cache_copies(text, [args[3]]))
    with warnings.catch_warnings():
      warnings.filterwarnings("error", message=".*donated buffers.*")
      jax.block_until_ready(step(*args))
  assert args[3].is_deleted(), "the donated cache was not consumed"


# ------------------------------------------------------------------ bad input


def _base(rng):
  batch = ragged_batch(rng, [1, 3, 2], [4, 10, 2], 4, max_num_seqs=4, decode_end=1)
  k, v = random_cache(rng, batch.num_pages, 4, 2, 64, "f32")
  q, nk, nv = (random_rows(rng, batch.num_tokens + 1, h, 64, "f32") for h in (8, 2, 2))
  arrays = dict(queries=q, keys=nk, values=nv, kv_cache=np.stack([k, v], axis=1),
                kv_lens=batch.kv_lens, page_indices=batch.page_indices,
                cu_q_lens=batch.cu_q_lens, distribution=batch.distribution)
  return arrays, batch


def _edit(name, index, value):
  def apply(a, batch):
    x = a[name].copy()
    x[index] = value
    a[name] = x
  return apply


def _set(**changes):
  def apply(a, batch):
    for name, f in changes.items():
      a[name] = f(a[name], batch) if callable(f) else f
  return apply


BAD = {
    # value rules, checked on concrete arrays
    "cu_q_lens_start": (_edit("cu_q_lens", 0, 1), ValueError, r"cu_q_lens\[0\] must be 0"),
    "cu_q_lens_decreasing": (_edit("cu_q_lens", 2, 0), ValueError, r"cu_q_lens must be non-dec"),
    "too_many_tokens": (_edit("cu_q_lens", 3, 99), ValueError, r"cu_q_lens\[num_seqs\].*rows"),
    "distribution_order": (_edit("distribution", 0, 3), ValueError, r"distribution = \(3, 1, 3\)"),
    "distribution_num_seqs": (_edit("distribution", 2, 5), ValueError, r"max_num_seqs = 4"),
    "decode_seq_not_one_token": (_edit("distribution", slice(0, 2), 2), ValueError,
                                 r"distribution\[0\] = 2.*sequence 1 has 3"),
    "kv_len_below_new_tokens": (_edit("kv_lens", 1, 2), ValueError, r"kv_lens\[1\] = 2"),
    "kv_len_beyond_pages": (lambda a, b: _edit("kv_lens", 2, 4 * b.pages_per_seq + 1)(a, b),
                            ValueError, r"kv_lens\[2\].*pages_per_seq"),
    "page_beyond_cache": (lambda a, b: _edit("page_indices", b.pages_per_seq, b.num_pages)(a, b),
                          ValueError, r"page_indices\[\d+\] = \d+ \(sequence 1, page 0\)"),
    "page_negative": (_edit("page_indices", 0, -1), ValueError, r"page_indices\[0\] = -1"),
    # static rules
    "keys_rows": (_set(keys=lambda x, b: x[1:]), ValueError, r"keys must be \[max_num_tokens"),
    "values_shape": (_set(values=lambda x, b: x[:, :1]), ValueError, r"values"),
    "heads_not_divisible": (_set(queries=lambda x, b: x[:, :3]), ValueError, r"num_qo_heads"),
    "head_dim": (_set(queries=lambda x, b: x[..., :48], keys=lambda x, b: x[..., :48],
                      values=lambda x, b: x[..., :48]), ValueError, r"head_dim"),
    "keys_dtype": (_set(keys=lambda x, b: x.astype(np.float16)), TypeError, r"keys has dtype"),
    "cache_heads": (_set(kv_cache=lambda x, b: x[:, :, :, :1]), ValueError, r"kv_cache holds 1"),
    "cache_rank": (_set(kv_cache=lambda x, b: x[:, 0]), ValueError, r"kv_cache must be 5-D"),
    "page_indices_length": (_set(page_indices=lambda x, b: x[:-1]), ValueError,
                            r"page_indices must have max_num_seqs \* pages_per_seq"),
    "cu_q_lens_length": (_set(cu_q_lens=lambda x, b: x[:-1]), ValueError,
                         r"cu_q_lens must be shape \(5,\)"),
    "distribution_shape": (_set(distribution=lambda x, b: x[:2]), ValueError, r"distribution"),
    "kv_lens_float": (_set(kv_lens=lambda x, b: x.astype(np.float32)), TypeError,
                      r"kv_lens must hold integers"),
}
BAD_OPTIONS = {
    "sliding_window_zero": (dict(sliding_window=0), ValueError, r"sliding_window"),
    "soft_cap_zero": (dict(soft_cap=0.0), ValueError, r"soft_cap"),
    "soft_cap_negative": (dict(soft_cap=-1.0), ValueError, r"soft_cap"),
    "sm_scale_nan": (dict(sm_scale=float("nan")), ValueError, r"sm_scale"),
    "k_scale": (dict(k_scale=np.ones(3, np.float32)), ValueError, r"k_scale must be a scalar"),
    "v_scale": (dict(v_scale=np.int32(2)), TypeError, r"v_scale must be floating"),
    "kv_layout": (dict(kv_layout="NDH"), ValueError, r"kv_layout"),
    "causal": (dict(causal="yes"), TypeError, r"causal"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_arrays_raise_named_errors(kind, rng):
  arrays, batch = _base(rng)
  jax.block_until_ready(jpa.ragged_paged_attention(**arrays))  # the base batch is valid
  edit, error, message = BAD[kind]
  arrays, batch = _base(rng)
  edit(arrays, batch)
  with pytest.raises(error, match=message):
    jpa.ragged_paged_attention(**arrays)


@pytest.mark.parametrize("kind", list(BAD_OPTIONS))
def test_bad_options_raise_named_errors(kind, rng):
  arrays, _ = _base(rng)
  options, error, message = BAD_OPTIONS[kind]
  with pytest.raises(error, match=message):
    jpa.ragged_paged_attention(**arrays, **options)


def test_garbage_under_jit_stays_inside_the_outputs(platform, device, rng):
  """Traced arrays are not checked: random lengths, offsets, page ids and distribution
  give outputs of the right shape and no fault, and a valid call afterwards is right."""
  check_native(platform)
  arrays, batch = _base(rng)
  if platform != "cpu":
    arrays = {n: x.astype(np.float16) if x.dtype == np.float32 else x for n, x in arrays.items()}
  step = jax.jit(jpa.ragged_paged_attention)
  with jax.default_device(device):
    for seed in range(4):
      g = np.random.default_rng(seed)
      bad = dict(arrays)
      bad["kv_lens"] = g.integers(-10, 2**31 - 1, size=4).astype(np.int32)
      bad["cu_q_lens"] = g.integers(-10, 40, size=5).astype(np.int32)
      bad["page_indices"] = g.integers(-(2**31), 2**31 - 1, size=batch.page_indices.size,
                                       dtype=np.int64).astype(np.int32)
      bad["distribution"] = g.integers(-2, 9, size=3).astype(np.int32)
      out, cache = jax.block_until_ready(step(**put(bad, device)))
      assert out.shape == arrays["queries"].shape and cache.shape == arrays["kv_cache"].shape
    out, _ = step(**put(arrays, device))
    want, _ = jpa.ragged_paged_attention(**put(arrays, device))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


def test_scales_scale_the_logits_and_the_output(rng):
  """k_scale / v_scale as in the paged wrappers: the same call with scales equals the
  call with sm_scale * k_scale, times v_scale."""
  arrays, _ = _base(rng)
  plain = dict(arrays)
  out_scaled, _ = jpa.ragged_paged_attention(**arrays, sm_scale=0.1, k_scale=0.5, v_scale=3.0)
  out_plain, _ = jpa.ragged_paged_attention(**plain, sm_scale=0.05)
  np.testing.assert_allclose(np.asarray(out_scaled), 3.0 * np.asarray(out_plain), rtol=1e-5,
                             atol=1e-5)
