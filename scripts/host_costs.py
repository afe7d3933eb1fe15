"""Where the host time of a decode step goes: planning, moving the plan, dispatching.

    python3 scripts/host_costs.py [--batch 16] [--kv-len 4096] [--steps 32]

Prints medians (us) of: wrapper.plan(); jax.device_put of the plan buffer; the dispatch
of a jitted step (time until the call returns, nothing blocked) with the plan as a host
numpy array and as a device array; the device time per op of a 32-op chain reading a
device plan; and serving loops of fresh plans + steps, per step in the steady state (a
loop of 2n steps minus a loop of n, so the loop's fill and final sync cancel), with the
host's time per step split into making the plan and dispatching the step. The loop with
one device plan is about the step's device time. A diagnostic of single-op steps for
docs/PERF_NOTES.md; the model-shaped step is `python -m jax_pagedattn.bench decode
--layers L`. Set JAX_PAGEDATTN_COMMAND_BUFFERS=1 to compare the handlers that XLA may
record into CUDA graphs.
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
  wrapper = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout="NHD", use_tensor_cores=True)

  def numpy_plan():
    return wrapper.plan(s.kv_indptr, s.kv_indices, s.kv_last_page_len, 32, 8, 128, 16,
                        q_data_type="bfloat16")

  p0 = numpy_plan()
  print(f"plan buffer: {p0.buffer.nbytes} bytes, caps {p0.config.caps}")
  run = wrapper.run
  step = jax.jit(lambda q, cache, p: run(q, cache, plan=p))
  out = {}
  out["plan()"] = median_us(numpy_plan)
  out["device_put(buffer) returns"] = median_us(lambda: jax.device_put(p0.buffer, dev))
  out["device_put(buffer) ready"] = median_us(
      lambda: jax.block_until_ready(jax.device_put(p0.buffer, dev)))
  tiny = jax.jit(lambda x, y: x)
  one = jax.device_put(np.ones(1, np.int32), dev)
  out["jit dispatch, two device args, trivial"] = median_us(lambda: tiny(q, one))
  dev_plan = planning.Plan(jax.device_put(p0.buffer, dev), p0.config)
  variants = {"numpy plan": p0, "device plan": dev_plan}
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
  t = timing.time_jax_chain(chained, q, (cache, dev_plan), ops_per_call=32, cfg=cfg)
  out["device time per op, 32-op chain, device plan"] = 1e6 * t.median_s

  loops = {
      "one device plan (~ device time)": lambda: dev_plan,
      "fresh numpy plans": numpy_plan,
      "fresh plans, device_put": lambda: (lambda pl: planning.Plan(
          jax.device_put(pl.buffer, dev), pl.config))(numpy_plan()),
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
  print(f"host costs, decode {args.batch} x {args.kv_len} on {dev.device_kind} (us):")
  for k, v in out.items():
    print(f"  {k:70s} {v:9.1f}")


if __name__ == "__main__":
  main()
