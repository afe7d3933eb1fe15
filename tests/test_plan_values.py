"""Plans are values: every copy of a plan, however it was made, keeps giving the same
result after any number of later plans (shared/DESIGN.md §3), and a step moves a plan
to the device once however many ops read it."""

from __future__ import annotations

import re
import threading

import jax
import numpy as np
import pytest

import jax_pagedattn as jpa
from _helpers import DTYPES, cache_in_form, page_table, put, random_cache, round_to

HQ, HK, D, PS = 8, 2, 64, 8
LATER_PLANS = 200


def _setup(rng, device, tensor_cores=True):
  dtype = "f16"
  kv_lens = [37, 1, 64, 9]
  table = page_table(rng, kv_lens, PS, spare_pages=40)
  k, v = random_cache(rng, table.num_pages, PS, HK, D, dtype)
  cache = put(cache_in_form(k, v, dtype, "NHD", "5d"), device)
  q = put(round_to(rng.standard_normal((len(kv_lens), HQ, D), dtype=np.float32),
                   DTYPES[dtype]).astype(np.float16), device)
  with jax.default_device(device):
    w = jpa.BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=tensor_cores, max_batch_size=8,
                                               max_num_pages=table.num_pages)
  return w, table, cache, q


def _plan(w, table):
  return w.plan(table.indptr, table.indices, table.last_page_len, HQ, HK, D, PS,
                q_data_type="float16")


def _later_plans(w, rng, table, n=LATER_PLANS):
  """n plans of other batches on the same wrapper (same capacities), each dropped at
  once, as a serving loop drops the last step's plan."""
  for _ in range(n):
    lens = rng.integers(1, 64, size=rng.integers(1, 8))
    other = page_table(rng, lens, PS, spare_pages=table.num_pages - int((-(-lens // PS)).sum()))
    _plan(w, other)


def test_plan_buffers_are_read_only_new_arrays(rng):
  w, table, _, _ = _setup(rng, jax.devices("cpu")[0])
  a, b = _plan(w, table), _plan(w, table)
  assert isinstance(a.buffer, np.ndarray) and not a.buffer.flags.writeable
  assert not np.shares_memory(a.buffer, b.buffer)
  np.testing.assert_array_equal(a.buffer, b.buffer)
  with pytest.raises(ValueError):
    a.buffer[0] = 1


def _copies(plan, device, step, q, cache):
  """{alias path: a function giving that copy's step output}."""
  mesh = jax.sharding.Mesh(np.array([device]), ("x",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  on_device = jax.tree.map(lambda x: jax.device_put(x, device), plan)
  sharded = jax.tree.map(lambda x: jax.device_put(x, replicated), plan)
  shard0 = jpa.Plan(on_device.buffer.addressable_data(0), plan.config)
  constant = jax.jit(lambda q, cache: step(q, cache, plan))  # plan captured at trace time
  donating = jax.jit(step, donate_argnums=(2,))
  return {
      "numpy": lambda: step(q, cache, plan),
      "device_put same device": lambda: step(q, cache, on_device),
      "replicated NamedSharding": lambda: step(q, cache, sharded),
      "addressable_data": lambda: step(q, cache, shard0),
      "jit constant": lambda: constant(q, cache),
      # Each call donates its own fresh device copy; the kept plan must stay intact.
      "donated copy": lambda: donating(q, cache, jax.tree.map(
          lambda x: jax.device_put(np.asarray(x), device), plan)),
  }


# The plan operand is an input no output can alias, so XLA declines the donation.
@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
def test_every_copy_of_a_plan_survives_later_plans(platform, device, rng):
  w, table, cache, q = _setup(rng, device)
  with jax.default_device(device):
    plan = _plan(w, table)
    step = jax.jit(lambda q, cache, p: w.run(q, cache, return_lse=True, plan=p))
    copies = _copies(plan, device, step, q, cache)
    before = {name: jax.device_get(run()) for name, run in copies.items()}
    _later_plans(w, rng, table)
    for name, run in copies.items():
      after = jax.device_get(run())
      for got, want in zip(after, before[name]):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
    # And every copy is the same plan.
    for name, got in before.items():
      np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(before["numpy"][0]),
                                    err_msg=name)


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
def test_a_donated_plan_leaves_the_wrapper_working(platform, device, rng):
  """Donating a plan's device copy deletes that copy only: later plans and steps run."""
  w, table, cache, q = _setup(rng, device)
  with jax.default_device(device):
    step = jax.jit(lambda q, cache, p: w.run(q, cache, plan=p), donate_argnums=(2,))
    want = np.asarray(step(q, cache, jax.tree.map(jax.device_put, _plan(w, table))))
    for _ in range(5):
      plan = jax.tree.map(jax.device_put, _plan(w, table))
      np.testing.assert_array_equal(np.asarray(step(q, cache, plan)), want)


def test_plans_made_in_two_threads_stay_their_own(platform, device, rng):
  """Two threads plan different batches on one wrapper and run them: each result is
  that of its own batch, and matches a plan made alone."""
  w, table, cache, q = _setup(rng, device)
  tables = [table, page_table(rng, [5, 63, 2, 30], PS, spare_pages=table.num_pages - 14)]
  with jax.default_device(device):
    step = jax.jit(lambda q, cache, p: w.run(q, cache, plan=p))
    want = [np.asarray(step(q, cache, _plan(w, t))) for t in tables]
    errors = []

    def worker(i):
      try:
        with jax.default_device(device):
          for _ in range(40):
            got = np.asarray(step(q, cache, _plan(w, tables[i])))
            np.testing.assert_array_equal(got, want[i])
      except Exception as e:  # noqa: BLE001 (reported below)
        errors.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  assert not errors, errors


def test_a_step_of_many_layers_carries_one_plan_transfer(platform, device, rng):
  """Sixteen ops read one plan argument: the compiled step takes it once, as one
  parameter, and every custom call reads that parameter (no per-layer copy)."""
  w, table, cache, q = _setup(rng, device)
  with jax.default_device(device):
    plan = _plan(w, table)

    def model(q, cache, p):
      for _ in range(16):
        q = w.run(q, cache, plan=p)
      return q

    hlo = jax.jit(model).lower(q, cache, plan).as_text()
  calls = re.findall(r"stablehlo\.custom_call @jax_pagedattn_\w+\(([^)]*)\)", hlo)
  if not calls:
    pytest.skip("this platform lowers to the jax.numpy fallback (no custom calls)")
  assert len(calls) == 16
  # Operands: q, k_cache, v_cache, plan, sinks, scales.
  assert {c.split(",")[3].strip() for c in calls} == {"%arg2"}, calls[:2]


def test_eager_runs_move_one_plan_once(platform, device, rng):
  """FlashInfer's eager loop (plan once, run() per layer) copies the plan to q's device
  once and reuses that copy; a new plan makes a new copy."""
  w, table, cache, q = _setup(rng, device)
  with jax.default_device(device):
    _plan(w, table)
    first = np.asarray(w.run(q, cache))
    copy = w._last.device_buffer  # noqa: SLF001
    assert copy is not None and copy[0] == device
    np.testing.assert_array_equal(np.asarray(w.run(q, cache)), first)
    assert w._last.device_buffer is copy  # noqa: SLF001
    _plan(w, table)
    assert w._last.device_buffer is None  # noqa: SLF001
    np.testing.assert_array_equal(np.asarray(w.run(q, cache)), first)
