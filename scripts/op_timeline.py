"""Where the device time of a chained attention op goes: kernels and the gaps between.

    python3 scripts/op_timeline.py [--preset 64x4096,16x4096] [--ops 24] [--cc]

Runs the benchmark's chain (each op's output is the next op's query, page sets
rotated) under `jax.profiler.trace`, reads the GPU kernel events back with
`jax.profiler.ProfileData`, and prints per kernel name its count and median duration,
then the median period of one op (start of an attention kernel to the next) and the
median idle time inside it (the period minus the kernels' busy time). Beside it, the
per-op time of the benchmark's own chain timing (bench_timing.time_jax_chain, 32
ops per call) with the plans passed as host numpy buffers and as device arrays. A
diagnostic for docs/PERF_NOTES.md, not part of the benchmark.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import tempfile

import jax

import jax_pagedattn as jpa
from jax_pagedattn import bench_timing
from jax_pagedattn import bench_workloads as wl


def gpu_kernel_events(logdir: str):
  """(name, start_ns, duration_ns) of every event on the GPU planes' stream lines."""
  from jax.profiler import ProfileData

  paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise RuntimeError(f"no xplane.pb under {logdir}")
  data = ProfileData.from_file(paths[0])
  events = []
  for plane in data.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      # Stream lines hold kernels and copies; skip XLA's op/module summary lines.
      if "Stream" not in line.name or "XLA" in line.name:
        continue
      for ev in line.events:
        events.append((ev.name, ev.start_ns, ev.duration_ns))
  events.sort(key=lambda e: e[1])
  return events


def measure(name: str, ops: int, tensor_cores: bool):
  batch, spec, extra = wl.preset("decode", name)
  kw = dict(heads=extra.get("heads", (32, 8)), head_dim=extra.get("head_dim", 128),
            page_size=extra.get("page_size", 16))
  w = wl.make_workload(name, "decode", batch, spec, **kw)
  pool, sets = wl.build_page_sets(w, 4, 0)
  cache, q = wl.make_device_inputs(w, pool, 0)
  wrapper = jpa.BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=tensor_cores)
  host_plans = [wrapper.plan(s.kv_indptr, s.kv_indices, s.kv_last_page_len, w.num_qo_heads,
                             w.num_kv_heads, w.head_dim, w.page_size, q_data_type=w.dtype)
                for s in sets]
  plans = [jpa.Plan(jax.device_put(p.buffer), p.config) for p in host_plans]

  def make_chain(n):
    def chain(q, cache, plans):
      for i in range(n):
        q = wrapper.run(q, cache, plan=plans[i % len(plans)])
      return q
    return jax.jit(chain)

  cfg = bench_timing.TimingConfig()
  wall = {}
  for label, ps in (("numpy plans", host_plans), ("device plans", plans)):
    t = bench_timing.time_jax_chain(make_chain(cfg.inner), q, (cache, ps),
                                    ops_per_call=cfg.inner, cfg=cfg)
    wall[label] = t.median_s * 1e6
  chain = make_chain(ops)
  jax.block_until_ready(chain(q, cache, plans))
  jax.block_until_ready(chain(q, cache, plans))
  logdir = tempfile.mkdtemp()
  with jax.profiler.trace(logdir):
    for _ in range(3):
      q = chain(q, cache, plans)
    jax.block_until_ready(q)
  events = gpu_kernel_events(logdir)
  by_name = {}
  for n, s, d in events:
    by_name.setdefault(n, []).append(d)
  attn = [e for e in events if "Kernel" in e[0] and "Merge" not in e[0]
          and ("Prefill" in e[0] or "Decode" in e[0])]
  periods, idles = [], []
  for a, b in zip(attn, attn[1:]):
    period = b[1] - a[1]
    if period > 4 * a[2]:  # the gap between two chain calls, not within one
      continue
    busy = sum(min(e[1] + e[2], b[1]) - e[1] for e in events if a[1] <= e[1] < b[1])
    periods.append(period)
    idles.append(period - busy)
  print(f"\n{name} ({'tc' if tensor_cores else 'cc'}), {w.kv_bytes / 1e9:.3f} GB of K+V")
  for n, ds in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
    print(f"  {len(ds):5d} x {statistics.median(ds) / 1e3:9.2f} us  {n[:110]}")
  if periods:
    per = statistics.median(periods) / 1e3
    print(f"  op period {per:.2f} us, idle in it {statistics.median(idles) / 1e3:.2f} us, "
          f"attention kernel {statistics.median([a[2] for a in attn]) / 1e3:.2f} us, "
          f"GB/s per period {w.kv_bytes / per / 1e3:.0f}")
  print("  bench chain time per op: " +
        ", ".join(f"{k} {v:.2f} us ({w.kv_bytes / v / 1e3:.0f} GB/s)" for k, v in wall.items()))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="64x4096,16x4096,256x1024")
  ap.add_argument("--ops", type=int, default=24)
  ap.add_argument("--cc", action="store_true", help="also the CUDA-core decode kernel")
  args = ap.parse_args()
  for name in args.preset.split(","):
    for tc in ((True, False) if args.cc else (True,)):
      measure(name.strip(), args.ops, tc)


if __name__ == "__main__":
  main()
