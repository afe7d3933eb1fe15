"""Timing for the benchmark: device time of JAX and torch calls, host time, ceilings.

JAX has no device events, so a JAX system is timed on the host clock around work that
keeps the device busy long enough for the clock's edges not to matter:

* the jitted function under test applies the op `inner` times (a Python-unrolled
  chain, each op's output is the next op's query, so XLA can neither hoist nor drop
  an op, nor run two at once), cycling over the workload's page sets;
* one repetition dispatches that function `calls` times back to back, again chained
  through the query, and blocks once at the end (`jax.block_until_ready`); JAX
  dispatches asynchronously, so the host enqueues the next call while the device runs
  the previous one and the device never waits on Python;
* `calls` is calibrated so that a repetition lasts about `rep_ms`; after `warmup` calls
  (compile, autotuning, allocator growth) each repetition is timed twice, with `calls`
  and with 2 x `calls` calls, and the time of one op is the difference over calls x
  inner: what a repetition pays once (the first dispatch, the final sync, whatever
  else starting and ending costs) cancels. We take the median over `reps` pairs.

Why the difference: on H200 hosts that fixed cost came to about 1 ms per repetition
(2026-12-02: 64 x 4096 decode, 20 ms repetitions, 262 us per op on the wall clock
against a 252 us op period on the profiler's device timeline), 4-5% of a 20 ms
repetition, not the fraction of a percent a single dispatch would cost. What remains
is each call's own gap on the device between jitted calls, which is why a call chains
many ops (`inner`).

FlashInfer (torch) is timed with CUDA events around `calls` chained calls, after
`torch.cuda._sleep` has queued a busy-wait kernel long enough for Python to enqueue
all of them, so the events see back-to-back kernels and not Python's per-call
overhead (the same situation the JAX side is in). Median over repetitions too.

Host costs (planners) are plain `time.perf_counter` medians over many calls.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time


@dataclasses.dataclass
class TimingConfig:
  warmup: int = 2
  reps: int = 15
  rep_ms: float = 20.0
  inner: int = 32
  host_iters: int = 200
  host_max_s: float = 2.0


@dataclasses.dataclass
class Timing:
  """Per-op seconds: median and spread over repetitions."""

  median_s: float
  min_s: float
  max_s: float
  reps: int
  ops_per_rep: int

  def as_dict(self) -> dict:
    return dict(time_us=self.median_s * 1e6, time_min_us=self.min_s * 1e6,
                time_max_us=self.max_s * 1e6, reps=self.reps, ops_per_rep=self.ops_per_rep)


def _summarise(samples, ops_per_rep) -> Timing:
  return Timing(statistics.median(samples), min(samples), max(samples), len(samples), ops_per_rep)


def _calls_for(seconds_per_call: float, rep_s: float, cap: int = 10000) -> int:
  return int(max(1, min(cap, math.ceil(rep_s / max(seconds_per_call, 1e-7)))))


def time_jax_chain(fn, q, rest, *, ops_per_call: int, cfg: TimingConfig) -> Timing:
  """Times `q = fn(q, *rest)`, whose one call applies the op `ops_per_call` times."""
  import jax

  for _ in range(max(1, cfg.warmup)):
    q = fn(q, *rest)
  jax.block_until_ready(q)
  t0 = time.perf_counter()
  q = jax.block_until_ready(fn(q, *rest))
  calls = _calls_for(time.perf_counter() - t0, cfg.rep_ms * 1e-3)

  def repetition(n):
    nonlocal q
    t0 = time.perf_counter()
    for _ in range(n):
      q = fn(q, *rest)
    jax.block_until_ready(q)
    return time.perf_counter() - t0

  samples = []
  for _ in range(cfg.reps):
    short = repetition(calls)
    long = repetition(2 * calls)
    samples.append(_per_unit(short, long, calls * ops_per_call))
  return _summarise(samples, calls * ops_per_call)


def _per_unit(short: float, long: float, units: int) -> float:
  """Seconds per unit from a run of `units` (short) and one of 2 x `units` (long): the
  difference, so what each run pays once cancels. Host noise can outweigh units of a
  few microseconds (CPU smoke runs): then the long run's plain time per unit."""
  return (long - short) / units if long > short else long / (2 * units)


def time_torch_chain(step, q, *, cfg: TimingConfig) -> Timing:
  """Times `q = step(i, q)` (i counts calls, for cycling page sets) with CUDA events."""
  import torch

  for i in range(max(1, cfg.warmup)):
    q = step(i, q)
  torch.cuda.synchronize()
  # Calibration on the host clock: an upper bound of the device time per call (it
  # includes Python), so repetitions come out at most rep_ms long.
  t0 = time.perf_counter()
  for i in range(4):
    q = step(i, q)
  torch.cuda.synchronize()
  per_call = (time.perf_counter() - t0) / 4
  calls = _calls_for(per_call, cfg.rep_ms * 1e-3, cap=2000)
  start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
  sleep = getattr(torch.cuda, "_sleep", None)
  samples = []
  for _ in range(cfg.reps):
    if sleep is not None:
      # ~2 GHz clock, ~100 us of Python per call at most: the device waits while the
      # host queues every call of the repetition, then runs them back to back.
      sleep(int(min(calls * 100e-6, 0.2) * 2e9))
    start.record()
    for i in range(calls):
      q = step(i, q)
    end.record()
    end.synchronize()
    samples.append(start.elapsed_time(end) * 1e-3 / calls)
  return _summarise(samples, calls)


def time_host(fn, cfg: TimingConfig) -> float:
  """Median wall seconds of fn() over up to host_iters calls (at most host_max_s)."""
  fn()  # first call pays for imports, allocations, compiles
  samples = []
  deadline = time.perf_counter() + cfg.host_max_s
  for _ in range(max(3, cfg.host_iters)):
    t0 = time.perf_counter()
    fn()
    samples.append(time.perf_counter() - t0)
    if time.perf_counter() > deadline and len(samples) >= 3:
      break
  return statistics.median(samples)


def time_host_steady(run, steps: int, cfg: TimingConfig) -> tuple[float, float]:
  """Seconds per step of run(n), a loop of n steps ended by one block, from repetitions
  of run(steps) and run(2 steps): (the median of their difference over `steps`, so the
  loop's fixed costs, the first dispatch before the device starts and the final sync,
  cancel as in time_jax_chain; the median of run(steps) over `steps`, the whole loop's
  average)."""
  run(steps)  # compiles, allocates
  steady, whole = [], []
  deadline = time.perf_counter() + cfg.host_max_s
  for _ in range(max(3, cfg.host_iters // 4)):
    t0 = time.perf_counter()
    run(steps)
    t1 = time.perf_counter()
    run(2 * steps)
    t2 = time.perf_counter()
    steady.append(_per_unit(t1 - t0, t2 - t1, steps))
    whole.append((t1 - t0) / steps)
    if time.perf_counter() > deadline and len(steady) >= 3:
      break
  return statistics.median(steady), statistics.median(whole)


# ---------------------------------------------------------------------- ceilings


def copy_ceiling_jax(nbytes: int, cfg: TimingConfig) -> dict:
  """Device-to-device bandwidth: y = x * s over a float32 buffer, bytes read + written.

  One op per call: chained elementwise ops inside one jit would fuse into a single
  pass and overstate the bandwidth. The scale is an argument so nothing folds away.
  """
  import jax
  import jax.numpy as jnp

  n = max(1, nbytes // 4)
  x = jax.block_until_ready(jax.random.normal(jax.random.key(7, impl="rbg"), (n,), jnp.float32))
  scale = jnp.float32(1.0001)
  fn = jax.jit(lambda x, s: x * s)
  t = time_jax_chain(fn, x, (scale,), ops_per_call=1, cfg=cfg)
  return dict(system="jax", bytes=2 * n * 4, gbps=2 * n * 4 / t.median_s / 1e9, **t.as_dict())


def copy_ceiling_torch(nbytes: int, cfg: TimingConfig) -> dict:
  import torch

  n = max(1, nbytes // 4)
  src = torch.randn(n, device="cuda", dtype=torch.float32)
  dst = torch.empty_like(src)
  t = time_torch_chain(lambda i, q: dst.copy_(src), None, cfg=cfg)
  return dict(system="torch", bytes=2 * n * 4, gbps=2 * n * 4 / t.median_s / 1e9, **t.as_dict())


def read_ceiling_torch(nbytes: int, cfg: TimingConfig) -> dict:
  """Read-only streaming rate: a sum over nbytes of float32 (one scalar written). Decode
  reads its cache and writes little, so this, not the copy, is its floor."""
  import torch

  n = max(1, nbytes // 4)
  src = torch.randn(n, device="cuda", dtype=torch.float32)
  t = time_torch_chain(lambda i, q: src.sum(), None, cfg=cfg)
  return dict(system="torch", bytes=n * 4, gbps=n * 4 / t.median_s / 1e9, **t.as_dict())


def matmul_ceiling_jax(n: int, cfg: TimingConfig) -> dict:
  """bf16 n x n x n matmul rate (jnp.dot under jit), 2 n^3 flops per call."""
  import jax
  import jax.numpy as jnp

  ka, kb = jax.random.split(jax.random.key(11, impl="rbg"))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  # Scaled so a @ b keeps a's magnitude along the chain (no overflow to inf).
  b = (jax.random.normal(kb, (n, n), jnp.float32) / math.sqrt(n)).astype(jnp.bfloat16)
  fn = jax.jit(lambda a, b: jnp.dot(a, b))
  t = time_jax_chain(fn, a, (b,), ops_per_call=1, cfg=cfg)
  return dict(system="jax", n=n, flops=2 * n**3, tflops=2 * n**3 / t.median_s / 1e12, **t.as_dict())
