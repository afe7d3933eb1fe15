"""Where the host time of a decode step goes: planning, moving the plan, dispatching.

    python3 scripts/host_costs.py [--batch 16] [--kv-len 4096] [--steps 32]

Prints medians (us) of: wrapper.plan() (numpy and staged buffers); jax.device_put of
the plan buffer (to the device and to pinned host memory); the dispatch of a jitted
step (time until the call returns, nothing blocked) with the plan as a host numpy
array, as a device array and in pinned host memory (copied to the device inside the
step); and serving loops of fresh plans + steps, per step in the steady state (a loop
of 2n steps minus a loop of n, so the loop's fill and final sync cancel), beside the
loop with one device plan (~ the step's device time), including the wrapper's own
staged plans (plan_staging.py). A diagnostic for docs/PERF_NOTES.md, not part of the
benchmark.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

import jax_pagedattn as jpa
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
  wrapper = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout="NHD", use_tensor_cores=True,
                                                   plan_staging=False)
  pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")

  def plan():
    return wrapper.plan(s.kv_indptr, s.kv_indices, s.kv_last_page_len, 32, 8, 128, 16,
                        q_data_type="bfloat16")

  p0 = plan()
  print(f"plan buffer: {p0.buffer.nbytes} bytes, caps {p0.config.caps}")
  # run() copies a plan in pinned host memory to the device inside the step (an XLA copy
  # on the step's stream) instead of the dispatch moving a numpy argument.
  step = jax.jit(lambda q, cache, p: wrapper.run(q, cache, plan=p))
  out = {}
  out["plan()"] = median_us(plan)
  out["device_put(buffer, device) returns"] = median_us(lambda: jax.device_put(p0.buffer, dev))
  out["device_put(buffer, device) ready"] = median_us(
      lambda: jax.block_until_ready(jax.device_put(p0.buffer, dev)))
  out["device_put(buffer, pinned_host) returns"] = median_us(
      lambda: jax.device_put(p0.buffer, pinned))
  out["device_put(buffer, pinned_host) ready"] = median_us(
      lambda: jax.block_until_ready(jax.device_put(p0.buffer, pinned)))
  one = np.ones(1, np.int32)
  tiny = jax.jit(lambda x, y: x)
  out["jit dispatch, one int32 numpy arg"] = median_us(lambda: tiny(q, one))
  one_on_device = jax.device_put(one, dev)
  out["jit dispatch, one int32 device arg"] = median_us(lambda: tiny(q, one_on_device))
  dev_plan = planning.Plan(jax.device_put(p0.buffer, dev), p0.config)
  pin_plan = planning.Plan(jax.device_put(p0.buffer, pinned), p0.config)
  variants = {"numpy plan": p0, "device plan": dev_plan,
              "pinned_host plan, copied in the step": pin_plan}
  for name, pl in variants.items():
    try:
      jax.block_until_ready(step(q, cache, pl))
      out[f"step dispatch, {name}"] = median_us(lambda: step(q, cache, pl), n=50)
      jax.block_until_ready(step(q, cache, pl))
      out[f"step blocked, {name}"] = median_us(
          lambda: jax.block_until_ready(step(q, cache, pl)), n=50)
    except Exception as e:  # noqa: BLE001
      print(f"{name}: {type(e).__name__}: {str(e)[:300]}")

  # The wrapper's own staging (plan_staging.py): plans written in place into pinned
  # host slots reused once the device acknowledges (the default on a GPU).
  staged = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout="NHD", use_tensor_cores=True)

  def staged_plan():
    return staged.plan(s.kv_indptr, s.kv_indices, s.kv_last_page_len, 32, 8, 128, 16,
                       q_data_type="bfloat16")

  out["plan(), staged"] = median_us(staged_plan)

  def moved(sharding):
    return lambda: (lambda pl: planning.Plan(jax.device_put(pl.buffer, sharding),
                                             pl.config))(plan())

  # One step serves every transport: both wrappers plan for the same layout.
  loops = {
      "one device plan (~ device time)": lambda: dev_plan,
      "fresh numpy plans": plan,
      "fresh plans, device_put to device": moved(dev),
      "fresh plans, device_put to pinned_host": moved(pinned),
      "fresh staged plans (plan_staging)": staged_plan,
  }

  def loop(make, n):
    x = q
    t0 = time.perf_counter()
    for _ in range(n):
      x = step(x, cache, make())
    t1 = time.perf_counter()
    jax.block_until_ready(x)
    return t1 - t0, time.perf_counter() - t0

  for tag, make in loops.items():
    try:
      loop(make, args.steps)
      issue, short, long = [], [], []
      for _ in range(7):
        a = loop(make, args.steps)
        b = loop(make, 2 * args.steps)
        issue.append(b[0] / (2 * args.steps))
        short.append(a[1])
        long.append(b[1])
    except Exception as e:  # noqa: BLE001
      print(f"loop {tag}: {type(e).__name__}: {str(e)[:300]}")
      continue
    out[f"loop, {tag}: host issue per step"] = 1e6 * statistics.median(issue)
    out[f"loop, {tag}: per step, whole loop"] = 1e6 * statistics.median(long) / (2 * args.steps)
    out[f"loop, {tag}: per step, steady state"] = 1e6 * statistics.median(
        [(b - a) / args.steps for a, b in zip(short, long)])
  rings = list(staged._rings.values())
  if rings and rings[0] is not None:
    out["staged ring: slots after the loops"] = rings[0].num_slots
  print(f"host costs, decode {args.batch} x {args.kv_len} on {dev.device_kind} (us):")
  for k, v in out.items():
    print(f"  {k:70s} {v:9.1f}")


if __name__ == "__main__":
  main()
