"""Where the host time of a decode step goes: planning, moving the plan, dispatching.

    python3 scripts/host_costs.py [--batch 16] [--kv-len 4096] [--steps 32]

Prints medians (us) of: wrapper.plan() (numpy and staged buffers); jax.device_put of
the plan buffer; the dispatch of a jitted step (time until the call returns, nothing
blocked) with the plan as a host numpy array, as a device array and staged in a mapped
host slot (plan_staging.py); the device time per op of a 32-op chain reading a device
plan and a staged one (the setup pass copies a staged plan before the attention reads
it); and serving loops of fresh plans + steps, per step in the steady state (a loop of
2n steps minus a loop of n, so the loop's fill and final sync cancel), with the host's
time per step split into making the plan and dispatching the step. The loop with one
device plan is about the step's device time. A diagnostic for docs/PERF_NOTES.md, not
part of the benchmark. Set JAX_PAGEDATTN_COMMAND_BUFFERS=1 to compare the handlers
that XLA may record into CUDA graphs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

import jax_pagedattn as jpa
from jax_pagedattn import bench_timing as timing
from jax_pagedattn import bench_workloads as wl
from jax_pagedattn import planning


def median_us(fn, n=200):
  fn()
  samples = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    samples.append(time.perf_counter() - t0)
  return 1e6 * statistics.median(samples)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--kv-len", default="4096")
  ap.add_argument("--steps", type=int, default=32)
  args = ap.parse_args()
  w = wl.make_workload("host", "decode", args.batch, args.kv_len, heads=(32, 8))
  pool, sets = wl.build_page_sets(w, 1, 0)
  s = sets[0]
  cache, q = wl.make_device_inputs(w, pool, 0)
  dev = jax.devices()[0]
  wrappers = {staging: jpa.BatchDecodeWithPagedKVCacheWrapper(
      kv_layout="NHD", use_tensor_cores=True, plan_staging=staging) for staging in (False, None)}

  def planner(staging):
    return lambda: wrappers[staging].plan(s.kv_indptr, s.kv_indices, s.kv_last_page_len, 32,
                                          8, 128, 16, q_data_type="bfloat16")

  numpy_plan, staged_plan = planner(False), planner(None)
  p0 = numpy_plan()
  print(f"plan buffer: {p0.buffer.nbytes} bytes, caps {p0.config.caps}")
  # Both wrappers run a plan of either kind: the config says how to read it.
  run = wrappers[None].run
  step = jax.jit(lambda q, cache, p: run(q, cache, plan=p))
  out = {}
  out["plan(), numpy buffer"] = median_us(numpy_plan)
  out["plan(), staged"] = median_us(staged_plan)
  out["device_put(buffer) returns"] = median_us(lambda: jax.device_put(p0.buffer, dev))
  out["device_put(buffer) ready"] = median_us(
      lambda: jax.block_until_ready(jax.device_put(p0.buffer, dev)))
  tiny = jax.jit(lambda x, y: x)
  one = jax.device_put(np.ones(1, np.int32), dev)
  out["jit dispatch, two device args, trivial"] = median_us(lambda: tiny(q, one))
  dev_plan = planning.Plan(jax.device_put(p0.buffer, dev), p0.config)
  staged0 = staged_plan()
  variants = {"numpy plan": p0, "device plan": dev_plan, "staged plan": staged0}
  for name, pl in variants.items():
    jax.block_until_ready(step(q, cache, pl))
    out[f"step dispatch, {name}"] = median_us(lambda: step(q, cache, pl), n=50)
    jax.block_until_ready(step(q, cache, pl))

  def chain(q, cache, p):
    for _ in range(32):
      q = run(q, cache, plan=p)
    return q

  chained = jax.jit(chain)
  cfg = timing.TimingConfig(reps=7, inner=32)
  for name, pl in (("device plan", dev_plan), ("staged plan", staged0),
                   ("staged plan moved to the device", planning.Plan(
                       jax.device_put(np.asarray(staged0.buffer), dev), staged0.config))):
    t = timing.time_jax_chain(chained, q, (cache, pl), ops_per_call=32, cfg=cfg)
    out[f"device time per op, 32-op chain, {name}"] = 1e6 * t.median_s
  del staged0

  loops = {
      "one device plan (~ device time)": lambda: dev_plan,
      "fresh numpy plans": numpy_plan,
      "fresh plans, device_put": lambda: (lambda pl: planning.Plan(
          jax.device_put(pl.buffer, dev), pl.config))(numpy_plan()),
      "fresh staged plans (plan_staging)": staged_plan,
  }

  def loop(make, n, split):
    x = q
    t0 = time.perf_counter()
    for _ in range(n):
      a = time.perf_counter()
      p = make()
      b = time.perf_counter()
      x = step(x, cache, p)
      split[0].append(b - a)
      split[1].append(time.perf_counter() - b)
    jax.block_until_ready(x)
    return time.perf_counter() - t0

  for tag, make in loops.items():
    split = ([], [])
    loop(make, args.steps, split)
    split = ([], [])
    steady, whole = [], []
    for _ in range(7):
      a = loop(make, args.steps, split)
      b = loop(make, 2 * args.steps, split)
      steady.append((b - a) / args.steps)
      whole.append(b / (2 * args.steps))
    out[f"loop, {tag}: per step, steady state"] = 1e6 * statistics.median(steady)
    out[f"loop, {tag}: per step, whole loop"] = 1e6 * statistics.median(whole)
    out[f"loop, {tag}: host, making the plan"] = 1e6 * statistics.median(split[0])
    out[f"loop, {tag}: host, dispatching the step"] = 1e6 * statistics.median(split[1])
  rings = [r for r in wrappers[None]._rings.values() if r is not None]
  if rings:
    out["staged ring: slots after the loops"] = rings[0].num_slots
  print(f"host costs, decode {args.batch} x {args.kv_len} on {dev.device_kind} (us):")
  for k, v in out.items():
    print(f"  {k:70s} {v:9.1f}")


if __name__ == "__main__":
  main()
