"""Where the host time of a decode step goes: planning, moving the plan, dispatching.

    python3 scripts/host_costs.py [--batch 16] [--kv-len 4096] [--steps 64]

Prints medians (us) of: wrapper.plan(); jax.device_put of the plan buffer (until it
returns / until it is ready); the dispatch of a jitted step (time until the call
returns, nothing blocked) with the plan as a host numpy array, as a device array and in
pinned host memory; and a loop of fresh plans + steps per step, beside the step's
device time. A diagnostic for docs/PERF_NOTES.md, not part of the benchmark.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_pagedattn as jpa
from jax_pagedattn import bench_workloads as wl


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
  ap.add_argument("--steps", type=int, default=64)
  args = ap.parse_args()
  w = wl.make_workload("host", "decode", args.batch, args.kv_len, heads=(32, 8))
  pool, sets = wl.build_page_sets(w, 1, 0)
  s = sets[0]
  cache, q = wl.make_device_inputs(w, pool, 0)
  dev = jax.devices()[0]
  wrapper = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout="NHD", use_tensor_cores=True)

  def plan():
    return wrapper.plan(s.kv_indptr, s.kv_indices, s.kv_last_page_len, 32, 8, 128, 16,
                        q_data_type="bfloat16")

  p0 = plan()
  step = jax.jit(lambda q, cache, p: wrapper.run(q, cache, plan=p))
  out = {}
  out["plan()"] = median_us(plan)
  out["device_put(buffer) returns"] = median_us(lambda: jax.device_put(p0.buffer, dev))
  out["device_put(buffer) ready"] = median_us(
      lambda: jax.block_until_ready(jax.device_put(p0.buffer, dev)))
  dev_plan = type(p0)(jax.device_put(p0.buffer, dev), p0.config)
  variants = {"numpy plan": p0, "device plan": dev_plan}
  try:
    pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    variants["pinned_host plan"] = type(p0)(jax.device_put(p0.buffer, pinned), p0.config)
  except Exception as e:  # noqa: BLE001
    print(f"pinned_host: {type(e).__name__}: {e}")
  for name, pl in variants.items():
    try:
      jax.block_until_ready(step(q, cache, pl))
      out[f"step dispatch, {name}"] = median_us(lambda: step(q, cache, pl), n=50)
      jax.block_until_ready(step(q, cache, pl))
      out[f"step blocked, {name}"] = median_us(
          lambda: jax.block_until_ready(step(q, cache, pl)), n=50)
    except Exception as e:  # noqa: BLE001
      print(f"{name}: {type(e).__name__}: {str(e)[:200]}")

  pinned_sharding = variants.get("pinned_host plan") and jax.sharding.SingleDeviceSharding(
      dev, memory_kind="pinned_host")
  movers = {
      "one plan": lambda: p0,
      "fresh numpy plans": plan,
      "fresh plans, device_put": lambda: (lambda pl: type(pl)(jax.device_put(pl.buffer, dev),
                                                              pl.config))(plan()),
  }
  if pinned_sharding:
    movers["fresh plans, pinned_host"] = lambda: (lambda pl: type(pl)(
        jax.device_put(pl.buffer, pinned_sharding), pl.config))(plan())

  def loop(make):
    x = q
    t0 = time.perf_counter()
    for _ in range(args.steps):
      x = step(x, cache, make())
    t1 = time.perf_counter()
    jax.block_until_ready(x)
    return (t1 - t0) / args.steps, (time.perf_counter() - t0) / args.steps

  for tag, make in movers.items():
    try:
      loop(make)
      issue, total = zip(*[loop(make) for _ in range(5)])
    except Exception as e:  # noqa: BLE001
      print(f"loop {tag}: {type(e).__name__}: {str(e)[:200]}")
      continue
    out[f"loop, {tag}: host issue per step"] = 1e6 * statistics.median(issue)
    out[f"loop, {tag}: per step"] = 1e6 * statistics.median(total)
  x = q
  for _ in range(3):
    x = step(x, cache, dev_plan)
  jax.block_until_ready(x)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    x = step(x, cache, dev_plan)
  jax.block_until_ready(x)
  out["loop, device plan: per step (~ device time)"] = 1e6 * (time.perf_counter() - t0) / args.steps
  print(f"host costs, decode {args.batch} x {args.kv_len} on {dev.device_kind} (us):")
  for k, v in out.items():
    print(f"  {k:50s} {v:9.1f}")


if __name__ == "__main__":
  main()
