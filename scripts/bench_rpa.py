"""Per-step cost of the in-graph ragged decode loop against the plan/run loop (issue 16).

    python3 scripts/bench_rpa.py [--batch 64] [--kv-len 4096] [--layers 1,16] [--json f]

Both loops run the same decode steps of a model of L layers (each its own cache; a
layer's output is the next layer's query, and its first heads are the layer's new key
and value, so no step can be hoisted or dropped), every request gaining one token a step:

* in-graph: one jitted `lax.fori_loop` of n steps calling `ragged_paged_attention` per
  layer (the cache carried and donated, kv_lens incremented in the loop); the batch is
  planned on the device, once per step for all layers, and the host is not involved
  between the loop's start and its end;
* plan/run: FlashInfer's loop, a Python loop of n steps, each `wrapper.plan()` on the
  host (BatchDecodeWithPagedKVCacheWrapper, tensor cores: the same kernel and the same
  capacities as the in-graph call) and one jitted step of L appends + L `run()`s,
  dispatched asynchronously.

The per-step time of each is (time of 2n steps - time of n steps) / n, medians over
`--reps`, so what starting and finishing a loop costs cancels. The planner alone (a
fori_loop of device plans) is timed too. The issue's bar: in-graph / plan-run <= 1.05
per step on one H200.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_pagedattn as jpa
from jax_pagedattn import device_planner, rpa


def build_parser():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=64, help="requests, each one token per step")
  p.add_argument("--kv-len", type=int, default=4096, help="keys of each request at the start")
  p.add_argument("--layers", default="1,16", help="comma list of layer counts to time")
  p.add_argument("--steps", type=int, default=32, help="n: loops of n and 2n steps are timed")
  p.add_argument("--reps", type=int, default=7, help="timed pairs of loops (median)")
  p.add_argument("--heads", default="32/8", help="query heads / KV heads")
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--dtype", default=None, help="bfloat16 (default on GPUs) | float16 | "
                 "float32 (default on the CPU, whose kernels have no bfloat16 matmul path)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--check", action="store_true",
                 help="also run both loops once from the same state and compare outputs")
  p.add_argument("--json", default=None, help="write the results here")
  return p


class Workload:
  """The model and batch: caches, page table, first query, on the default device."""

  def __init__(self, args, layers: int):
    hq, hk = (int(x) for x in args.heads.split("/"))
    self.hq, self.hk, self.d, self.ps = hq, hk, args.head_dim, args.page_size
    if hq < 2 * hk:
      raise SystemExit("--heads: the new keys and values are a layer's first 2 x KV heads of "
                       "its output, so query heads must be at least twice the KV heads")
    self.batch, self.layers = args.batch, layers
    platform = jax.devices()[0].platform
    self.dtype = jnp.dtype(args.dtype or ("bfloat16" if platform == "gpu" else "float32"))
    # Room for a loop of 2 x steps from the starting length, reused by every loop.
    self.kv0 = args.kv_len
    self.pps = -(-(args.kv_len + 2 * args.steps) // self.ps)
    num_pages = self.batch * self.pps
    rng = np.random.default_rng(args.seed)
    self.page_indices = jnp.asarray(rng.permutation(num_pages).astype(np.int32))
    self.table = np.asarray(self.page_indices).reshape(self.batch, self.pps)
    self.num_pages = num_pages
    self.sm_scale = 1.0 / float(np.sqrt(self.d))
    key = jax.random.key(args.seed)
    shape = (num_pages, 2, self.ps, hk, self.d)
    self.cache_shape = shape
    self.q = jax.random.normal(key, (self.batch, hq, self.d), jnp.float32).astype(self.dtype)

  def caches(self, seed=1):
    keys = jax.random.split(jax.random.key(seed), self.layers)
    return [jax.random.normal(k, self.cache_shape, jnp.float32).astype(self.dtype) for k in keys]

  def new_kv(self, x):
    return x[:, :self.hk], x[:, self.hk:2 * self.hk]


# ------------------------------------------------------------------ the two loops


def ingraph_loop(w: Workload):
  """jit(caches, q, kv_lens, n) -> (caches, q, kv_lens) after n steps, all on the device."""
  cu_q_lens = jnp.arange(w.batch + 1, dtype=jnp.int32)
  distribution = jnp.full((3,), w.batch, jnp.int32)

  @functools.partial(jax.jit, static_argnames="n", donate_argnums=(0,))
  def loop(caches, q, kv_lens, page_indices, *, n):
    def step(_, carry):
      caches, x, kv_lens = carry
      kv_lens = kv_lens + 1
      new = []
      for cache in caches:
        k, v = w.new_kv(x)
        x, cache = jpa.ragged_paged_attention(x, k, v, cache, kv_lens, page_indices, cu_q_lens,
                                              distribution, sm_scale=w.sm_scale)
        new.append(cache)
      return new, x, kv_lens

    return jax.lax.fori_loop(0, n, step, (caches, q, kv_lens))

  return loop


def planner_loop(w: Workload):
  """The device planner alone, n plans in a fori_loop (kv_lens advancing)."""
  setting = rpa._setting(  # noqa: SLF001 (the entry point's own static setup)
      w.q, *w.new_kv(w.q), jax.ShapeDtypeStruct(w.cache_shape, w.dtype),
      np.zeros(w.batch, np.int32),
      np.zeros(w.batch * w.pps, np.int32), np.zeros(w.batch + 1, np.int32),
      np.zeros(3, np.int32), sm_scale=w.sm_scale, sliding_window=None, soft_cap=None,
      k_scale=None, v_scale=None, causal=True, kv_layout="NHD")
  cu_q_lens = jnp.arange(w.batch + 1, dtype=jnp.int32)

  @functools.partial(jax.jit, static_argnames="n")
  def loop(kv_lens, page_indices, *, n):
    def step(_, carry):
      kv_lens, acc = carry
      kv_lens = kv_lens + 1
      p = device_planner.plan(cu_q_lens, kv_lens, page_indices, w.batch, spec=setting.spec)
      return kv_lens, acc + p.buffer[0]  # consumed, so the plan is not dropped

    return jax.lax.fori_loop(0, n, step, (kv_lens, jnp.int32(0)))

  return loop


def planrun_loop(w: Workload):
  """run(caches, q, kv_lens, n): n host-planned steps, each dispatched asynchronously."""
  wrapper = jpa.BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=True, max_batch_size=w.batch,
                                                   max_num_pages=w.num_pages)
  seqs = np.arange(w.batch, dtype=np.int32)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(caches, x, plan, positions, kv_indices, kv_indptr, last_page_len):
    new = []
    for cache in caches:
      k, v = w.new_kv(x)
      cache = jpa.append_paged_kv_cache(k, v, seqs, positions, cache, kv_indices, kv_indptr,
                                        last_page_len)
      x = wrapper.run(x, cache, plan=plan)
      new.append(cache)
    return new, x

  def run(caches, q, kv_lens, n):
    kv_lens = np.array(kv_lens)
    for _ in range(n):
      kv_lens = kv_lens + 1
      npages = -(-kv_lens // w.ps)
      kv_indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
      kv_indices = w.table[np.arange(w.pps)[None, :] < npages[:, None]].astype(np.int32)
      last = (kv_lens - (npages - 1) * w.ps).astype(np.int32)
      plan = wrapper.plan(kv_indptr, kv_indices, last, w.hq, w.hk, w.d, w.ps,
                          sm_scale=w.sm_scale, q_data_type=w.dtype)
      caches, q = step(caches, q, plan, (kv_lens - 1).astype(np.int32), kv_indices, kv_indptr,
                       last)
    return caches, q, kv_lens

  return run


# ------------------------------------------------------------------ timing


def per_step_us(run_n, n: int, reps: int) -> dict:
  """(t(2n) - t(n)) / n in microseconds, median over reps; run_n(n) runs and blocks."""
  for m in (n, 2 * n):
    run_n(m)  # compile / warm up both lengths
  samples = []
  for _ in range(reps):
    times = {}
    for m in (n, 2 * n):
      t0 = time.perf_counter()
      run_n(m)
      times[m] = time.perf_counter() - t0
    samples.append((times[2 * n] - times[n]) / n * 1e6)
  return dict(us_per_step=statistics.median(samples), min_us=min(samples), max_us=max(samples))


def measure(args, layers: int) -> dict:
  w = Workload(args, layers)
  kv0 = jnp.full((w.batch,), w.kv0, jnp.int32)
  state = {"caches": w.caches()}

  ingraph = ingraph_loop(w)

  def run_ingraph(n):
    caches, q, _ = ingraph(state["caches"], w.q, kv0, w.page_indices, n=n)
    jax.block_until_ready(q)
    state["caches"] = caches

  planrun = planrun_loop(w)

  def run_planrun(n):
    caches, q, _ = planrun(state["caches"], w.q, np.full(w.batch, w.kv0), n)
    jax.block_until_ready(q)
    state["caches"] = caches

  planner = planner_loop(w)

  def run_planner(n):
    jax.block_until_ready(planner(kv0, w.page_indices, n=n))

  record = dict(batch=w.batch, kv_len=w.kv0, layers=layers, heads=args.heads, head_dim=w.d,
                page_size=w.ps, dtype=w.dtype.name, steps=args.steps, reps=args.reps)
  record["ingraph"] = per_step_us(run_ingraph, args.steps, args.reps)
  record["planrun"] = per_step_us(run_planrun, args.steps, args.reps)
  record["planner"] = per_step_us(run_planner, args.steps, args.reps)
  record["ratio"] = record["ingraph"]["us_per_step"] / record["planrun"]["us_per_step"]
  if args.check:
    record["max_abs_diff"] = check(w, ingraph, planrun)
  return record


def check(w: Workload, ingraph, planrun) -> float:
  """Both loops from the same caches for a few steps: the largest output difference."""
  n = 3
  kv0 = np.full(w.batch, w.kv0)
  _, a, _ = ingraph(w.caches(seed=5), w.q, jnp.asarray(kv0, jnp.int32), w.page_indices, n=n)
  _, b, _ = planrun(w.caches(seed=5), w.q, kv0, n)
  diff = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
  tol = 1e-4 if w.dtype == jnp.float32 else 5e-2
  if not diff <= tol:
    raise SystemExit(f"the two loops disagree: max |difference| {diff} > {tol}")
  return diff


def main(argv=None) -> dict:
  args = build_parser().parse_args(argv)
  device = jax.devices()[0]
  doc = dict(device=getattr(device, "device_kind", str(device)), platform=device.platform,
             jax=jax.__version__, date=datetime.datetime.now().isoformat(timespec="seconds"),
             command="python3 scripts/bench_rpa.py " + " ".join(argv if argv is not None
                                                                else sys.argv[1:]),
             records=[])
  print(f"{doc['device']}: batch {args.batch} x kv {args.kv_len}, heads {args.heads}, head_dim "
        f"{args.head_dim}, page {args.page_size}; us per decode step (median of {args.reps})")
  print(f"{'layers':>6} {'in-graph':>10} {'plan/run':>10} {'ratio':>7} {'planner':>9}")
  for layers in (int(x) for x in args.layers.split(",")):
    r = measure(args, layers)
    doc["records"].append(r)
    print(f"{layers:>6} {r['ingraph']['us_per_step']:>10.1f} {r['planrun']['us_per_step']:>10.1f} "
          f"{r['ratio']:>7.3f} {r['planner']['us_per_step']:>9.1f}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(doc, f, indent=1)
  return doc


if __name__ == "__main__":
  main()
