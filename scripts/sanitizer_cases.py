"""A small representative set of GPU calls for compute-sanitizer (memcheck, racecheck).

Each case runs once on fresh random data and is checked against the jax.numpy oracle,
so a sanitizer run also fails on a wrong answer. Then every attention kernel runs on
garbage plans and append on positions up to 2^31 - 1 and garbage indices (tests/
garbage_plans.py): memcheck must see no access outside the buffers, and the calls must
return. Kept small: the sanitizers slow kernels down by orders of magnitude.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_pagedattn as jpa
from jax_pagedattn import planning, reference, switches

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import garbage_plans  # noqa: E402


def random_batch(rng, batch, max_pages, page_size, num_pages):
  pages = rng.integers(0, max_pages + 1, size=batch)
  indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
  indices = rng.permutation(num_pages)[: indptr[-1]].astype(np.int32)
  last = rng.integers(1, page_size + 1, size=batch).astype(np.int32)
  return indptr, indices, last


def on_cpu(fn, *args, **kwargs):
  """Runs the oracle on the host CPU: XLA's own GPU kernels (autotuned GEMMs) need not
  run under the sanitizer, which only has to watch ours."""
  cpu = jax.devices("cpu")[0]
  args = [jax.device_put(a, cpu) if isinstance(a, jax.Array) else a for a in args]
  with jax.default_device(cpu):
    return fn(*args, **kwargs)


def partial_rows(plan) -> int:
  """Split-KV partial rows the plan uses: > 0 means the kernels' fused merge runs."""
  meta = planning.unpack_plan(plan.buffer, plan.config.caps)["meta"]
  return int(meta[3])  # kMetaNumPartialRows (plan_layout.h)


def check(name, got, want, tol=3e-2):
  want = np.asarray(want, np.float32)
  err = float(np.max(np.abs(np.asarray(got.astype(jnp.float32)) - want)))
  print(f"{name}: max abs err {err:.3g}")
  if not err <= tol:
    raise SystemExit(f"{name}: error {err} above {tol}")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--memcheck", action="store_true")
  ap.add_argument("--racecheck", action="store_true")
  args = ap.parse_args()
  rng = np.random.default_rng(1)
  key = jax.random.key(1)
  dt = jnp.bfloat16
  hq, hk, d = 8, 2, 128
  small = args.racecheck
  for layout, ps, tc, mode in (("NHD", 16, False, "NONE"), ("HND", 1, False, "ROPE_LLAMA"),
                               ("NHD", 16, True, "ALIBI")):
    num_pages = 512  # room for page_size 1 requests of 40 pages
    shape = (num_pages, 2, ps, hk, d) if layout == "NHD" else (num_pages, 2, hk, ps, d)
    cache = jax.random.normal(key, shape, dt)
    indptr, indices, last = random_batch(rng, 3 if small else 5, 12 if ps == 16 else 40, ps, num_pages)
    q = jax.random.normal(jax.random.key(2), (len(last), hq, d), dt)
    w = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout=layout, use_tensor_cores=tc)
    w.plan(indptr, indices, last, hq, hk, d, ps, pos_encoding_mode=mode, q_data_type=dt)
    out = w.run(q, cache)
    want, _ = on_cpu(reference.batch_decode, q.astype(jnp.float32), cache.astype(jnp.float32),
                     indptr, indices, last, kv_layout=layout, pos_encoding_mode=mode)
    check(f"decode {layout} page{ps} tc={tc} {mode}", out, want)

  # Split requests, so the cross-CTA merge inside the attention kernels runs: one long
  # request the planner must cut, one of a single key, one without pages.
  ps, num_pages = 16, 128
  cache = jax.random.normal(key, (num_pages, 2, ps, hk, d), dt)
  pages = np.array([40 if small else 64, 1, 0])
  indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
  indices = rng.permutation(num_pages)[: indptr[-1]].astype(np.int32)
  last = np.array([7, 1, 0], np.int32)
  q = jax.random.normal(jax.random.key(6), (3, hq, d), dt)
  for tc in (False, True):
    w = jpa.BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=tc)
    plan = w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=dt)
    if partial_rows(plan) == 0:
      raise SystemExit("split case: the plan cut no request, so the merge would not run")
    out, lse = w.run(q, cache, return_lse=True)
    want, want_lse = on_cpu(reference.batch_decode, q.astype(jnp.float32),
                            cache.astype(jnp.float32), indptr, indices, last)
    check(f"decode split tc={tc} ({partial_rows(plan)} partial rows)", out, want)
    # The request without pages has lse -inf in both; compare the other two.
    check(f"decode split tc={tc} lse", lse[:2], want_lse[:2])
  qo_indptr = np.array([0, 20, 21, 21], np.int32)
  q = jax.random.normal(jax.random.key(7), (21, hq, d), dt)
  w = jpa.BatchPrefillWithPagedKVCacheWrapper()
  plan = w.plan(qo_indptr, indptr, indices, last, hq, hk, d, ps, causal=True, q_data_type=dt)
  if partial_rows(plan) == 0:
    raise SystemExit("prefill split case: the plan cut no request")
  out = w.run(q, cache)
  want, _ = on_cpu(reference.batch_attention, q.astype(jnp.float32), cache.astype(jnp.float32),
                   qo_indptr, indptr, indices, last, causal=True)
  check(f"prefill split causal ({partial_rows(plan)} partial rows)", out, want)

  ps, num_pages = 16, 64
  cache = jax.random.normal(key, (num_pages, 2, ps, hk, d), dt)
  indptr, indices, last = random_batch(rng, 3, 6, ps, num_pages)
  kv_len = np.where(np.diff(indptr) > 0, (np.diff(indptr) - 1) * ps + last, 0)
  qo_len = np.minimum(kv_len, rng.integers(1, 40, size=len(last)))
  qo_indptr = np.concatenate([[0], np.cumsum(qo_len)]).astype(np.int32)
  q = jax.random.normal(jax.random.key(3), (int(qo_indptr[-1]), hq, d), dt)
  # RoPE: on the Hopper kernel, the pass that rotates the keys once into the workspace.
  for mode in ("NONE", "ROPE_LLAMA"):
    w = jpa.BatchPrefillWithPagedKVCacheWrapper()
    w.plan(qo_indptr, indptr, indices, last, hq, hk, d, ps, causal=True, q_data_type=dt,
           pos_encoding_mode=mode)
    out = w.run(q, cache)
    want, _ = on_cpu(reference.batch_attention, q.astype(jnp.float32),
                     cache.astype(jnp.float32), qo_indptr, indptr, indices, last, causal=True,
                     pos_encoding_mode=mode)
    check("prefill causal" + ("" if mode == "NONE" else f" {mode}"), out, want)

  nnz = int(qo_indptr[-1])
  bi, pos = jpa.get_batch_indices_positions(qo_indptr, kv_len, nnz)
  kn = jax.random.normal(jax.random.key(4), (nnz, hk, d), dt)
  vn = jax.random.normal(jax.random.key(5), (nnz, hk, d), dt)
  got = jpa.append_paged_kv_cache(kn, vn, bi, pos, cache, indices, indptr, last)
  want = on_cpu(reference.append_paged_kv_cache, kn, vn, bi, pos, cache, indices, indptr, last)
  check("append", got, want, tol=0)

  features(rng, key, dt, hq, hk, d, small)
  garbage(rng, key, dt, hq, hk, d, rounds=1 if small else 2)
  print("sanitizer cases done")


def features(rng, key, dt, hq, hk, d, small):
  """Soft-cap, window and sinks on every kernel (on a batch with a split request, so the
  sink's piece-0 rule and the merge run), fp8 caches with scales on the CUDA-core decode
  kernel (head_dim 64: its 8-byte-chunk tiles; d = 128: its wide tiles), and garbage plans
  for the wide fp8 decode."""
  ps, num_pages = 16, 128
  cache = jax.random.normal(key, (num_pages, 2, ps, hk, d), dt)
  pages = np.array([40 if small else 64, 1, 0, 5])
  indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
  indices = rng.permutation(num_pages)[: indptr[-1]].astype(np.int32)
  last = np.array([7, 1, 0, 16], np.int32)
  sinks = jnp.asarray(rng.standard_normal(hq).astype(np.float32))
  feats = dict(logits_soft_cap=20.0, window_left=300)
  f32 = cache.astype(jnp.float32)
  q = jax.random.normal(jax.random.key(10), (len(last), hq, d), dt)
  for tc in (False, True):
    w = jpa.BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=tc)
    w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=dt, **feats)
    out = w.run(q, cache, sinks=sinks)
    want, _ = on_cpu(reference.batch_decode, q.astype(jnp.float32), f32, indptr, indices, last,
                     sinks=np.asarray(sinks), **feats)
    check(f"decode tc={tc} soft-cap, window, sinks", out, want)
  qo_indptr = np.array([0, 30, 31, 31, 40], np.int32)
  qp = jax.random.normal(jax.random.key(11), (40, hq, d), dt)
  w = jpa.BatchPrefillWithPagedKVCacheWrapper()
  w.plan(qo_indptr, indptr, indices, last, hq, hk, d, ps, causal=True, q_data_type=dt, **feats)
  out = w.run(qp, cache, sinks=sinks)
  want, _ = on_cpu(reference.batch_attention, qp.astype(jnp.float32), f32, qo_indptr, indptr,
                   indices, last, causal=True, sinks=np.asarray(sinks), **feats)
  check("prefill causal soft-cap, window, sinks", out, want)
  # The fp8 tiles differ by head_dim (decode.cu): 8-byte chunks at 64, wide at 128 and
  # 256. d comes last, so the garbage plans below run on the wide tiles.
  for d8 in (64, d):
    c16 = cache if d8 == d else jax.random.normal(key, (num_pages, 2, ps, hk, d8), dt)
    q8 = q if d8 == d else jax.random.normal(jax.random.key(12), (len(last), hq, d8), dt)
    for fp8 in (jnp.float8_e4m3fn, jnp.float8_e5m2):
      cache8 = c16.astype(fp8)
      w = jpa.BatchDecodeWithPagedKVCacheWrapper()
      plan = w.plan(indptr, indices, last, hq, hk, d8, ps, q_data_type=dt, kv_data_type=fp8)
      out = w.run(q8, cache8, k_scale=0.5, v_scale=2.0)
      want, _ = on_cpu(reference.batch_decode, q8.astype(jnp.float32),
                       cache8.astype(jnp.float32), indptr, indices, last, k_scale=0.5,
                       v_scale=2.0)
      check(f"decode {jnp.dtype(fp8).name} head_dim {d8}", out, want, tol=6e-2)
  step = jax.jit(lambda q, c, p: w.run(q, c, return_lse=True, plan=p, k_scale=0.5))
  for kind in garbage_plans.KINDS:
    jax.block_until_ready(step(q, cache8, garbage_plans.garbage_plan(plan, rng, kind)))
  print("features: soft-cap / window / sinks on every kernel, fp8 decode (8-byte and wide "
        "tiles), fp8 garbage plans")
  fp8_tensor_cores(rng, cache, (indptr, indices, last), q, qo_indptr, qp, hq, hk, d, ps, dt)


def fp8_tensor_cores(rng, cache, table, q, qo_indptr, qp, hq, hk, d, ps, dt):
  """fp8 caches with scales on the tensor-core kernel (use_tensor_cores decode, causal
  prefill; the batch has a split request), then its garbage plans. Not with
  JAX_PAGEDATTN_FP8_TENSOR_CORES=0 (switches.fp8_tensor_cores), the path's gate."""
  if not switches.current().fp8_tensor_cores:
    print("fp8 on the tensor-core kernel: skipped (JAX_PAGEDATTN_FP8_TENSOR_CORES=0)")
    return
  indptr, indices, last = table
  for fp8 in (jnp.float8_e4m3fn, jnp.float8_e5m2):
    cache8 = cache.astype(fp8)
    f32 = cache8.astype(jnp.float32)
    for name, w, plan, qq, want in (
        ("decode tc", *_decode(indptr, indices, last, hq, hk, d, ps, dt, True, fp8)[:2], q,
         on_cpu(reference.batch_decode, q.astype(jnp.float32), f32, indptr, indices, last,
                k_scale=0.5, v_scale=2.0)[0]),
        ("prefill causal", *_prefill(qo_indptr, indptr, indices, last, hq, hk, d, ps, dt,
                                     fp8)[:2], qp,
         on_cpu(reference.batch_attention, qp.astype(jnp.float32), f32, qo_indptr, indptr,
                indices, last, causal=True, k_scale=0.5, v_scale=2.0)[0])):
      check(f"{name} {jnp.dtype(fp8).name} ({partial_rows(plan)} partial rows)",
            w.run(qq, cache8, k_scale=0.5, v_scale=2.0), want, tol=6e-2)
      step = jax.jit(lambda q, c, p, w=w: w.run(q, c, return_lse=True, plan=p, v_scale=2.0))
      for kind in garbage_plans.KINDS:
        jax.block_until_ready(step(qq, cache8, garbage_plans.garbage_plan(plan, rng, kind)))
  print("fp8 on the tensor-core kernel: decode tc and prefill, e4m3 / e5m2, garbage plans")


def garbage(rng, key, dt, hq, hk, d, rounds):
  """Each attention kernel on garbage plans of every kind, then append at extreme
  positions and with random page tables, all under jit; a valid call after each."""
  ps, num_pages = 16, 64
  cache = jax.random.normal(key, (num_pages, 2, ps, hk, d), dt)
  indptr, indices, last = random_batch(rng, 4, 6, ps, num_pages)
  kv_len = np.where(np.diff(indptr) > 0, (np.diff(indptr) - 1) * ps + last, 0)
  qo_indptr = np.concatenate([[0], np.cumsum(np.minimum(kv_len, 9))]).astype(np.int32)
  for name, w, plan, rows in (
      ("decode cc", *_decode(indptr, indices, last, hq, hk, d, ps, dt, False)),
      ("decode tc", *_decode(indptr, indices, last, hq, hk, d, ps, dt, True)),
      ("prefill", *_prefill(qo_indptr, indptr, indices, last, hq, hk, d, ps, dt)),
      ("prefill RoPE", *_prefill(qo_indptr, indptr, indices, last, hq, hk, d, ps, dt,
                                 pos="ROPE_LLAMA"))):
    q = jax.random.normal(jax.random.key(8), (rows, hq, d), dt)
    step = jax.jit(lambda q, cache, p, w=w: w.run(q, cache, return_lse=True, plan=p))
    for kind in garbage_plans.KINDS:
      for _ in range(rounds):
        out, lse = jax.block_until_ready(step(q, cache, garbage_plans.garbage_plan(plan, rng, kind)))
        assert out.shape == q.shape and lse.shape == q.shape[:2]
    jax.block_until_ready(step(q[: rows // 2], cache, plan))  # q shorter than the plan
    print(f"garbage plans: {name} ({', '.join(garbage_plans.KINDS)}) returned")
  pages = [int(n) for n in np.diff(indptr)]
  bi, pos, _ = garbage_plans.extreme_append_rows(pages, ps)
  kn = jax.random.normal(jax.random.key(9), (len(bi), hk, d), dt)
  append = jax.jit(jpa.append_paged_kv_cache)
  got = append(kn, kn, bi, pos, cache, indices, indptr, last)
  want = on_cpu(reference.append_paged_kv_cache, kn, kn, bi, pos, cache, indices, indptr, last)
  check("append at positions up to 2^31 - 1", got, want, tol=0)
  for _ in range(rounds):
    bad_indptr = rng.choice([0, 3, 7, -2, 2**31 - 1, -(2**31)], size=len(indptr)).astype(np.int32)
    bad_indices = rng.integers(-3, num_pages + 3, size=len(indices)).astype(np.int32)
    bad_pos = rng.choice([0, 5, 2**31 - 1, 2**30, -1], size=len(bi)).astype(np.int32)
    jax.block_until_ready(append(kn, kn, bi, bad_pos, cache, bad_indices, bad_indptr, last))
  print("garbage append indices returned")


def _decode(indptr, indices, last, hq, hk, d, ps, dt, tc, kv_dt=None):
  w = jpa.BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=tc)
  return w, w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=dt,
                   kv_data_type=kv_dt), len(last)


def _prefill(qo_indptr, indptr, indices, last, hq, hk, d, ps, dt, kv_dt=None, pos="NONE"):
  w = jpa.BatchPrefillWithPagedKVCacheWrapper()
  plan = w.plan(qo_indptr, indptr, indices, last, hq, hk, d, ps, causal=True, q_data_type=dt,
                kv_data_type=kv_dt, pos_encoding_mode=pos)
  return w, plan, int(qo_indptr[-1])


if __name__ == "__main__":
  main()
