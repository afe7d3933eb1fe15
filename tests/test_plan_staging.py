"""Plans staged in reused host slots (plan_staging.py): slots are reused only once no
step can read them, and staged plans give the same results as host numpy plans."""

from __future__ import annotations

import dataclasses
import gc

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import jax_pagedattn as jpa
from jax_pagedattn import plan_staging, planning

from _helpers import (DTYPES, assert_attention_close, cache_in_form, cpu, oracle, page_table,
                      put, random_cache, round_to)


class FakeBoard:
  """One entry per acquire; the tests play the device and store tickets themselves."""

  def __init__(self):
    self.values = {}
    self.released = []

  def acquire(self):
    entry = len(self.values) + 1
    self.values[entry] = 0
    return entry

  def read(self, entry):
    return self.values[entry]

  def release(self, entry):
    self.released.append(entry)


def test_planner_stamps_ticket_and_entry():
  caps = planning.derive_capacities(4, 4, 16, group_size=2, tile_rows=2, num_kv_heads=2,
                                    num_ctas=8)
  args = (None, np.array([0, 2, 3], np.int32), np.arange(3, dtype=np.int32),
          np.array([5, 1], np.int32))
  kw = dict(page_size=8, num_qo_heads=4, num_kv_heads=2, tile_rows=2, causal=False, caps=caps)
  meta_at = planning.plan_sections(caps)["meta"][0]
  plain = planning.plan_host(*args, **kw)
  assert list(plain[meta_at + 5:meta_at + 8]) == [0, 0, 0]
  out = np.full(planning.plan_sections(caps)["size"], -7, np.int32)
  ticket = (1 << 33) + 5
  got = planning.plan_host(*args, **kw, out=out, ticket=ticket, ack_entry=3)
  assert got is out
  low, high, entry = (int(x) for x in out[meta_at + 5:meta_at + 8])
  assert (low & 0xFFFFFFFF) | (high << 32) == ticket and entry == 3
  np.testing.assert_array_equal(np.delete(out, np.arange(meta_at + 5, meta_at + 8)),
                                np.delete(plain, np.arange(meta_at + 5, meta_at + 8)))
  with pytest.raises(ValueError, match="out has the wrong size"):
    planning.plan_host(*args, **kw, out=np.zeros(3, np.int32))


def _ring(board, size=64, soft_limit=16):
  return plan_staging.PlanRing(size, cpu(), board, soft_limit=soft_limit)


class _Plan:
  """Stands in for planning.Plan: holds the slot array, as a Plan does."""

  def __init__(self, buffer, ticket):
    self.buffer = buffer
    self.ticket = ticket


def _stage(ring, check_free=None):
  seen = {}

  def fill(out, ticket, ack_entry):
    if check_free is not None:
      check_free(out.ctypes.data)  # at the moment of writing, drains included
    out[:] = ticket
    seen["ticket"] = ticket
    assert ack_entry == ring.entry

  plan, view = ring.stage(fill, lambda array: _Plan(array, None))
  plan.ticket = seen["ticket"]
  assert int(view[0]) == plan.ticket and np.asarray(plan.buffer)[0] == plan.ticket
  return plan


def test_ring_reuses_a_slot_only_after_it_is_dropped_and_the_device_moved_past():
  board = FakeBoard()
  ring = _ring(board)
  a = _stage(ring)
  b = _stage(ring)
  assert ring.num_slots == 2 and a.buffer is not b.buffer
  slot_a = id(a.buffer)  # an id: holding the array would keep the slot
  a_ticket = a.ticket
  del a
  gc.collect()
  # Dropped, but the device has not acknowledged anything made after: a new slot.
  c = _stage(ring)
  assert id(c.buffer) != slot_a and ring.num_slots == 3
  # The device reaching a plan made before the drop proves nothing either.
  board.values[ring.entry] = a_ticket
  d = _stage(ring)
  assert id(d.buffer) != slot_a and ring.num_slots == 4
  # Reaching d (made after the ring saw a's slot unreferenced): reused.
  board.values[ring.entry] = d.ticket
  e = _stage(ring)
  assert id(e.buffer) == slot_a and ring.num_slots == 4
  del b, c, d, e


def test_ring_keeps_slots_of_copies_of_a_plan():
  """A copy holding the slot's array (a tree_map, say) keeps the slot as the Plan does."""
  board = FakeBoard()
  ring = _ring(board)
  a = _stage(ring)
  held = a.buffer
  del a
  for _ in range(4):
    newest = _stage(ring)
    board.values[ring.entry] = newest.ticket
    assert newest.buffer is not held
  del held, newest


def test_ring_drains_past_its_soft_limit_instead_of_growing():
  board = FakeBoard()
  ring = _ring(board, soft_limit=3)
  drains = []
  ring._drain = lambda: drains.append(1)
  plans = [_stage(ring) for _ in range(3)]
  del plans[0]
  # Nothing acknowledged ever (as if the device never ran a step): at the soft limit the
  # ring drains and then takes the slot that was unreferenced before the drain.
  p = _stage(ring)
  assert len(drains) == 1 and ring.num_slots == 3
  # Every slot held: growing is the only way.
  q = _stage(ring)
  assert ring.num_slots == 4
  # After one drain every slot unreferenced before it is free: no drain per plan.
  del plans, p
  board.values[ring.entry] = 0
  drains.clear()
  more = [_stage(ring) for _ in range(3)]
  assert len(drains) == 1 and ring.num_slots == 4
  del q, more


def test_ring_slot_stays_free_when_planning_fails():
  board = FakeBoard()
  ring = _ring(board)
  a = _stage(ring)

  def bad_fill(out, ticket, ack_entry):
    raise ValueError("indptr is broken")

  with pytest.raises(ValueError, match="indptr"):
    ring.stage(bad_fill, lambda array: _Plan(array, None))
  b = _stage(ring)  # the slot the failed call took was never handed out
  assert ring.num_slots == 2
  del a, b


def test_ring_releases_its_board_entry():
  board = FakeBoard()
  ring = _ring(board)
  entry = ring.entry
  del ring
  gc.collect()
  assert board.released == [entry]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["plan", "drop", "dispatch", "run", "run_all"]),
                          st.integers(0, 7)), min_size=1, max_size=60),
       st.integers(2, 6))
# A dropped plan whose step is still queued (only the acknowledgement protects it) and a
# live plan whose slot an acknowledgement alone would free (only holding it protects it).
@example([("plan", 0), ("plan", 0), ("dispatch", 0), ("drop", 0), ("plan", 0), ("plan", 0)], 8)
@example([("plan", 0), ("plan", 0), ("dispatch", 1), ("run", 0), ("plan", 0), ("plan", 0)], 8)
def test_ring_never_hands_out_a_slot_a_step_may_read(ops, soft_limit):
  """A model of the device: dispatched steps queue in order; running one stores its
  plan's ticket on the board. A slot handed out must be held by no live plan and read
  by no queued step."""
  board = FakeBoard()
  ring = _ring(board, size=8, soft_limit=soft_limit)
  live = []
  queue = []  # (ticket, slot address) of dispatched, not yet run steps

  def run_one():
    ticket, _ = queue.pop(0)
    board.values[ring.entry] = ticket

  def drain():
    while queue:
      run_one()

  ring._drain = drain
  peak_live = 0
  for op, k in ops:
    if op == "plan":
      def check_free(address):
        assert address not in {p.buffer.unsafe_buffer_pointer() for p in live}, "held"
        assert address not in {slot for _, slot in queue}, "read by a queued step"

      live.append(_stage(ring, check_free))  # no other name holds it
      peak_live = max(peak_live, len(live))
    elif op == "drop" and live:
      live.pop(k % len(live))
    elif op == "dispatch" and live:
      queue.append((live[k % len(live)].ticket,
                    live[k % len(live)].buffer.unsafe_buffer_pointer()))
    elif op == "run" and queue:
      run_one()
    elif op == "run_all":
      drain()
  # It grows past its soft limit only when every slot is held by a live plan.
  assert ring.num_slots <= max(soft_limit, peak_live)


def _decode_steps(device, rng, staging, steps, jit=True, sync=False):
  """`steps` fresh decode plans of different batches, each run by one jitted step (no
  sync in between unless `sync`); returns the wrapper and per-step (outputs, references)."""
  dtype = "f16"
  hq, hk, d, ps = 8, 2, 64, 8
  max_batch, num_pages = 8, 96
  k, v = random_cache(rng, num_pages, ps, hk, d, dtype)
  cache = put(cache_in_form(k, v, dtype, "NHD", "5d"), device)
  results = []
  with jax.default_device(device):
    w = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout="NHD", use_tensor_cores=True,
                                               max_batch_size=max_batch,
                                               max_num_pages=num_pages, plan_staging=staging)
    step = jax.jit(lambda q, cache, plan: w.run(q, cache, return_lse=True, plan=plan))
    for _ in range(steps):
      batch = int(rng.integers(1, max_batch + 1))
      kv_lens = [int(x) for x in rng.integers(0, 90, batch)]
      table = page_table(rng, kv_lens, ps, spare_pages=0)
      table.indices = rng.choice(num_pages, len(table.indices), replace=False).astype(np.int32)
      plan = w.plan(table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
                    q_data_type="float16")
      q = round_to(rng.standard_normal((batch, hq, d), dtype=np.float32), DTYPES[dtype])
      qd = put(q.astype(np.float16), device)
      out = step(qd, cache, plan) if jit else w.run(qd, cache, return_lse=True)
      if sync:
        jax.block_until_ready(out)
      table.num_pages = num_pages
      results.append((out, oracle(q, k, v, np.arange(batch + 1), table), kv_lens))
  return w, results


def _check(results):
  for (out, lse), (ref_out, ref_lse), kv_lens in results:
    assert_attention_close(out, lse, ref_out, ref_lse, "f16", what=str(kv_lens))


@pytest.mark.parametrize("jit", [True, False])
def test_staged_plans_run_on_the_cpu_with_a_fake_board(monkeypatch, rng, jit):
  """The plumbing (slots rewritten in place under JAX arrays that alias them, eager
  runs) on the CPU backend. Nothing acknowledges here, so the ring drains at its soft
  limit; the CPU client may run independent computations at once, so each step is
  waited for (the ordering argument is the GPU stream's)."""
  monkeypatch.setattr(plan_staging, "default_board", FakeBoard)
  monkeypatch.setattr(plan_staging, "SOFT_LIMIT_SLOTS", 4)
  w, results = _decode_steps(cpu(), rng, True, steps=20, jit=jit, sync=True)
  _check(results)
  plan = w.last_plan
  assert isinstance(plan.buffer, jax.Array) and not plan.config.plan_mapped
  assert plan.buffer.unsafe_buffer_pointer() == w._host["view"].ctypes.data
  (ring,) = w._rings.values()
  assert ring.num_slots == 4


def test_a_mapped_plan_config_sizes_the_workspace_the_handlers_check(rng):
  """plan_mapped adds the plan's device copy to the workspace (params.h's formula); the
  CPU handler checks that size and reads the plan in place, so the results match."""
  dtype = "f16"
  hq, hk, d, ps = 4, 2, 64, 8
  k, v = random_cache(rng, 24, ps, hk, d, dtype)
  cache = put(cache_in_form(k, v, dtype, "NHD", "5d"), cpu())
  table = page_table(rng, [1, 17, 40], ps, spare_pages=0)
  with jax.default_device(cpu()):
    w = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout="NHD", plan_staging=False)
    plan = w.plan(table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
                  q_data_type="float16")
    mapped = planning.Plan(plan.buffer, dataclasses.replace(plan.config, plan_mapped=True))
    extra = mapped.config.workspace_bytes - plan.config.workspace_bytes
    assert 4 * planning.plan_sections(plan.config.caps)["size"] <= extra
    q = put(round_to(rng.standard_normal((3, hq, d), dtype=np.float32), DTYPES[dtype])
            .astype(np.float16), cpu())
    step = jax.jit(lambda q, cache, p: w.run(q, cache, return_lse=True, plan=p))
    a, b = step(q, cache, plan), step(q, cache, mapped)
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_plan_staging_true_without_a_board_is_an_error(monkeypatch):
  monkeypatch.setattr(plan_staging, "default_board", lambda: None)
  with jax.default_device(cpu()):
    w = jpa.BatchDecodeWithPagedKVCacheWrapper(plan_staging=True)
    with pytest.raises(ValueError, match="plan_staging=True"):
      w.plan(np.array([0, 1], np.int32), np.array([0], np.int32), np.array([3], np.int32),
             4, 2, 64, 8)
  with pytest.raises(TypeError, match="plan_staging"):
    jpa.BatchDecodeWithPagedKVCacheWrapper(plan_staging="yes")


def test_cpu_plans_stay_numpy_by_default():
  with jax.default_device(cpu()):
    w = jpa.BatchDecodeWithPagedKVCacheWrapper()
    plan = w.plan(np.array([0, 1], np.int32), np.array([0], np.int32), np.array([3], np.int32),
                  4, 2, 64, 8)
  assert isinstance(plan.buffer, np.ndarray)


@pytest.mark.gpu
def test_staged_plans_on_the_gpu_are_acknowledged_and_right(rng):
  """Fresh plans dispatched back to back with no sync: every result is right (no slot
  was rewritten under a pending step) and the ring stays small, which it only does if
  the device acknowledges tickets (without acks it grows to its soft limit)."""
  try:
    device = jax.devices("gpu")[0]
  except RuntimeError as e:
    pytest.skip(f"no gpu backend: {e}")
  w, results = _decode_steps(device, rng, None, steps=40)
  plan = w.last_plan
  assert plan.config.plan_mapped, "GPU plans are staged in mapped slots by default"
  assert plan.buffer.sharding.memory_kind == "device"
  assert plan.buffer.unsafe_buffer_pointer() == w._host["view"].ctypes.data
  _check(results)
  (ring,) = w._rings.values()
  assert ring.num_slots < 8, f"{ring.num_slots} slots: the device did not acknowledge"
  meta_at = planning.plan_sections(plan.config.caps)["meta"][0]
  view = np.asarray(plan.buffer)
  last = (int(view[meta_at + 5]) & 0xFFFFFFFF) | (int(view[meta_at + 6]) << 32)
  from jax_pagedattn import _C
  assert _C.plan_ack_read(ring.entry) == last


@pytest.mark.gpu
@pytest.mark.parametrize("tensor_cores", [False, True])
def test_a_mapped_plan_reads_the_same_from_either_memory(rng, tensor_cores):
  """One staged plan three ways: in its mapped slot (copied by the setup pass), moved
  to device memory under the same config (the copy reads device memory), and moved with
  plan_mapped off (read in place): bit-identical outputs, and right."""
  try:
    device = jax.devices("gpu")[0]
  except RuntimeError as e:
    pytest.skip(f"no gpu backend: {e}")
  dtype = "bf16"
  hq, hk, d, ps = 8, 2, 128, 16
  k, v = random_cache(rng, 64, ps, hk, d, dtype)
  cache = put(cache_in_form(k, v, dtype, "NHD", "5d"), device)
  table = page_table(rng, [1, 16, 17, 300, 0, 129], ps, spare_pages=0)
  with jax.default_device(device):
    w = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout="NHD", use_tensor_cores=tensor_cores,
                                               max_batch_size=8)
    staged = w.plan(table.indptr, table.indices, table.last_page_len, hq, hk, d, ps,
                    q_data_type="bfloat16")
    assert staged.config.plan_mapped
    host = np.asarray(staged.buffer)
    moved = planning.Plan(jax.device_put(host, device), staged.config)
    plain = planning.Plan(jax.device_put(host, device),
                          dataclasses.replace(staged.config, plan_mapped=False))
    q32 = round_to(rng.standard_normal((6, hq, d), dtype=np.float32), DTYPES[dtype])
    q = put(q32.astype(DTYPES[dtype]), device)
    step = jax.jit(lambda q, cache, p: w.run(q, cache, return_lse=True, plan=p))
    outs = [jax.block_until_ready(step(q, cache, p)) for p in (staged, moved, plain)]
  for out, lse in outs[1:]:
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(outs[0][0], np.float32))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(outs[0][1]))
  table.num_pages = 64
  ref_out, ref_lse = oracle(q32, k, v, np.arange(7), table)
  assert_attention_close(outs[0][0], outs[0][1], ref_out, ref_lse, dtype, what="staged")
