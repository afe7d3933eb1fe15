"""The model-shaped decode step: what a server runs, not one op alone.

A step of an L-layer model reads one plan in every layer: L attention ops, each over its
own layer's cache (each layer's output is the next layer's query, so nothing is hoisted
or overlapped), and a fresh plan every step. For us that is `plan()` on the host, then
one jitted call of L ops taking the plan as an argument (its buffer crosses to the
device once, with the call). For FlashInfer it is `plan()` followed by L `run()` calls.

Both are timed the same way: loops of n and 2n steps, dispatched back to back with
one sync at the end, on the host clock; the difference over n is one step in the steady
state (bench_timing.time_host_steady), so planning, transfers and dispatch count
wherever they do not overlap the device. Beside the fresh-plan step, each system is
also timed with one plan made before the loop and reused (ours: its buffer already on
the device), which is the floor a plan transport can reach, and ours once more with the
plan explicitly `jax.device_put` before each step (the other transport one could pick).

Records keep `time_us` per layer (the fresh-plan step over L), so GB/s and the ratio to
FlashInfer read like the single-op rows; the step times are in `step_*_us`.
"""

from __future__ import annotations

import math

from jax_pagedattn import bench_baselines as base
from jax_pagedattn import bench_timing as timing
from jax_pagedattn import bench_workloads as wl


def _steady(run, est_step_s: float, cfg: timing.TimingConfig) -> float:
  """Seconds per step of run(n) (n steps, one sync) in the steady state, with n chosen
  so that one run lasts about cfg.rep_ms."""
  steps = max(4, min(256, math.ceil(cfg.rep_ms * 1e-3 / max(est_step_s, 1e-6))))
  return timing.time_host_steady(run, steps, cfg)[0]


def _estimate(run) -> float:
  """Rough seconds per step of run(n) (after one warm-up run): calibrates loop lengths."""
  import time

  run(2)
  t0 = time.perf_counter()
  run(4)
  return (time.perf_counter() - t0) / 4


def layer_caches(case: base.Case) -> tuple:
  """One cache per layer, all of the case's pool; layer 0 is the case's own."""
  w = case.w
  return (case.cache,) + tuple(wl.random_cache(w, case.pool, wl.layer_cache_key(w, 0, layer))
                               for layer in range(1, w.layers))


def run_ours(case: base.Case, *, tensor_cores: bool) -> dict:
  import jax

  import jax_pagedattn

  if base._platform_name(case) not in jax_pagedattn.native_platforms():
    raise base.Skip(f"jax_pagedattn has no native kernel for {case.platform} in this build")
  w = case.w
  layers = w.layers
  wrapper = jax_pagedattn.BatchDecodeWithPagedKVCacheWrapper(
      kv_layout=w.kv_layout, use_tensor_cores=tensor_cores)
  s0 = case.sets[0]

  def plan():
    return wrapper.plan(s0.kv_indptr, s0.kv_indices, s0.kv_last_page_len, w.num_qo_heads,
                        w.num_kv_heads, w.head_dim, w.page_size, q_data_type=w.dtype)

  caches = layer_caches(case)

  @jax.jit
  def step(x, caches, p):
    for cache in caches:
      x = wrapper.run(x, cache, plan=p)
    return x

  first = jax.jit(lambda q, cache, p: wrapper.run(q, cache, plan=p))
  result = base.check_output(case, lambda: jax.device_get(first(case.q, caches[0], plan())))

  def loop(make_plan):
    def run(n):
      x = case.q
      for _ in range(n):
        x = step(x, caches, make_plan())
      jax.block_until_ready(x)
    return run

  made = plan()
  device_plan = jax_pagedattn.Plan(jax.device_put(made.buffer), made.config)
  fresh = loop(plan)
  est = _estimate(fresh)
  result["step_us"] = 1e6 * _steady(fresh, est, case.cfg)
  result["step_device_put_us"] = 1e6 * _steady(
      loop(lambda: jax.tree.map(jax.device_put, plan())), est, case.cfg)
  result["step_reused_us"] = 1e6 * _steady(loop(lambda: device_plan), est, case.cfg)
  result["wrapper_plan_us"] = 1e6 * timing.time_host(plan, case.cfg)
  return _per_layer(result, layers)


def run_flashinfer(case: base.Case, *, mode: str) -> dict:
  torch, flashinfer = base._flashinfer(case)
  w = case.w
  tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16,
            "float32": torch.float32}[w.dtype]
  caches = [base.to_torch(c) for c in layer_caches(case)]
  q0 = base.to_torch(case.q)
  workspace = torch.empty(case.opts.fi_workspace_mb << 20, dtype=torch.uint8, device="cuda")
  s0 = case.sets[0]
  # As a server holds them: index pointers on the host, page ids on the GPU.
  indptr, last = torch.from_numpy(s0.kv_indptr), torch.from_numpy(s0.kv_last_page_len)
  indices = torch.from_numpy(s0.kv_indices).cuda()
  wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
      workspace, w.kv_layout, use_tensor_cores=(mode == "tc"))

  def plan():
    wrapper.plan(indptr, indices, last, w.num_qo_heads, w.num_kv_heads, w.head_dim,
                 w.page_size, pos_encoding_mode="NONE", q_data_type=tdtype,
                 kv_data_type=tdtype)

  plan()
  result = base.check_output(case, lambda: wrapper.run(q0, caches[0]).float().cpu().numpy())

  def loop(fresh_plan: bool):
    def run(n):
      x = q0
      for _ in range(n):
        if fresh_plan:
          plan()
        for cache in caches:
          x = wrapper.run(x, cache)
      torch.cuda.synchronize()
    return run

  est = _estimate(loop(True))
  result["step_us"] = 1e6 * _steady(loop(True), est, case.cfg)
  result["step_reused_us"] = 1e6 * _steady(loop(False), est, case.cfg)
  result["wrapper_plan_us"] = 1e6 * timing.time_host(plan, case.cfg)
  result["flashinfer_version"] = getattr(flashinfer, "__version__", "?")
  return _per_layer(result, w.layers)


def _per_layer(result: dict, layers: int) -> dict:
  result.update(time_us=result["step_us"] / layers, layers=layers,
                step_vs_reused=result["step_us"] / result["step_reused_us"])
  return result


def _not_model_shaped(case: base.Case) -> dict:
  raise base.Skip("the model-shaped step is measured for ours and FlashInfer only")


RUNNERS = {
    "ours-tc": lambda case: run_ours(case, tensor_cores=True),
    "ours-cc": lambda case: run_ours(case, tensor_cores=False),
    "flashinfer-tc": lambda case: run_flashinfer(case, mode="tc"),
    "flashinfer-cc": lambda case: run_flashinfer(case, mode="cc"),
}


def runner(system: str):
  """The model-step runner of a decode system (one that skips where none applies)."""
  return RUNNERS.get(system, _not_model_shaped)
