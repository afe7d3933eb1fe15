"""The example server's page allocator and scheduler, without a model.

A seeded random walk drives requests through arrival, chunked prefill, decode, EOS,
preemption and completion, with tokens made up on the spot; after every step it checks
that each page is free or held by exactly one running request, that each request holds
exactly the pages its cache length needs, and at the end that every page came back.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

from llama.allocator import PageAllocator, PoolExhausted  # noqa: E402
from llama.scheduler import Request, Scheduler, State  # noqa: E402
from llama.workload import make_requests  # noqa: E402


# ------------------------------------------------------------------------- allocator

def test_allocator_grows_releases_and_reuses():
  pool = PageAllocator(8, page_size=4)
  assert pool.grow("a", 5) and len(pool.pages("a")) == 2
  assert pool.grow("a", 8) == ()  # still fits in two pages
  pool.grow("b", 1)
  assert not set(pool.pages("a")) & set(pool.pages("b"))
  assert pool.num_free == 5
  freed = pool.pages("a")
  assert pool.release("a") == 2
  assert pool.release("a") == 0  # twice is harmless
  pool.grow("c", 8)
  assert set(pool.pages("c")) == set(freed)  # freed pages are reused first
  pool.check()


def test_allocator_exhaustion_is_all_or_nothing():
  pool = PageAllocator(4, page_size=2)
  pool.grow("a", 5)  # 3 pages
  with pytest.raises(PoolExhausted, match="needs 2 more page.*1 of 4 are free") as info:
    pool.grow("b", 4)
  assert (info.value.needed, info.value.free) == (2, 1)
  assert len(pool.pages("b")) == 0 and "b" not in pool.owners()
  with pytest.raises(PoolExhausted):
    pool.grow("a", 9)
  assert len(pool.pages("a")) == 3  # unchanged by the failed growth
  pool.check()


def test_allocator_page_tables_are_snapshots():
  pool = PageAllocator(16, page_size=1)
  pool.grow("a", 3)
  before = pool.pages("a")
  snapshot = before.copy()
  pool.grow("a", 4)   # in place, within the table's capacity
  pool.grow("a", 12)  # reallocates the table
  np.testing.assert_array_equal(before, snapshot)
  np.testing.assert_array_equal(pool.pages("a")[:3], snapshot)
  with pytest.raises(ValueError):
    before[0] = 99  # read-only: the allocator's bookkeeping is not the caller's
  pool.release("a")
  np.testing.assert_array_equal(before, snapshot)
  pool.check()


def test_allocator_check_catches_a_shared_page():
  pool = PageAllocator(4, page_size=2, seed=1)
  pool.grow("a", 2)
  pool.grow("b", 2)
  pool._owned["b"][0][0] = pool._owned["a"][0][0]  # corrupt on purpose
  with pytest.raises(AssertionError, match="shared"):
    pool.check()


# ------------------------------------------------------------------------- scheduler

def _check_step(sched: Scheduler, step):
  pool = sched.allocator
  pool.check()
  holders = set(pool.owners())
  running = {r.rid for r in sched.running}
  assert holders <= running, f"pages held by requests not running: {holders - running}"
  assert len(sched.running) <= sched.max_batch
  assert len(step.prefill) <= sched.max_prefill_requests
  assert sum(len(w.tokens) for w in step.prefill) <= sched.prefill_budget
  rows = step.prefill + step.decode
  assert len({id(w.request) for w in rows}) == len(rows), "a request scheduled twice"
  for w in rows:
    r = w.request
    assert r.state is State.RUNNING and w.start == r.num_cached
    np.testing.assert_array_equal(w.pages, pool.pages(r.rid))
    assert len(w.pages) == pool.pages_for(w.kv_len), "pages must match the cache length"
    expected = np.concatenate([r.prompt, np.asarray(r.output, np.int32)])[w.start:w.kv_len]
    np.testing.assert_array_equal(w.tokens, expected)
  for w in step.decode:
    assert len(w.tokens) == 1 and w.kv_len == w.request.seq_len
  for r in step.preempted:
    assert r.state is State.WAITING and len(pool.pages(r.rid)) == 0


def _walk(seed: int, *, num_pages: int, batch: int, budget: int, context: int, eos: bool,
          page_size: int | None = None):
  rng = np.random.default_rng(seed)
  requests = make_requests(int(rng.integers(5, 40)), vocab_size=50,
                           prompt_len=(1, context // 2), output_len=(1, context // 2),
                           arrival_rate=float(rng.choice([0.0, 0.3, 2.0])), seed=seed)
  pool = PageAllocator(num_pages, page_size or int(rng.choice([1, 4, 16])), seed=seed)
  sched = Scheduler(pool, max_batch=batch, max_prefill_requests=int(rng.integers(1, batch + 1)),
                    prefill_budget=budget, max_seq_len=context, eos_id=3 if eos else None)
  for r in requests:
    sched.add(r)
  now = steps = 0
  while not sched.done:
    step = sched.schedule(now)
    if step.empty:
      assert not sched.running
      now = sched.pending[0].arrival
      continue
    _check_step(sched, step)
    draw = lambda n: rng.integers(0, 50, n)  # token 3 is EOS when enabled
    sched.commit(step, draw(len(step.prefill)), draw(len(step.decode)))
    now, steps = now + 1, steps + 1
    assert steps < 20_000, "no progress"
  assert pool.num_free == num_pages and not pool.owners(), "pages leaked"
  for r in requests:
    assert r.state is State.FINISHED and 1 <= len(r.output) <= r.max_new_tokens
    assert r.finish_reason in ("eos", "length", "context")
    assert r.finish_reason != "eos" or (eos and r.output[-1] == 3)
    assert r.seq_len <= context
  return sched


@pytest.mark.parametrize("seed", range(40))
def test_random_walk_never_leaks_or_shares_pages(seed):
  rng = np.random.default_rng(1000 + seed)
  context = int(rng.integers(8, 96))
  # From one longest request's worth of pages at page size 1 (constant preemption) to
  # plenty; fewer would make a lone request unservable, tested separately below.
  num_pages = int(rng.integers(context, 4 * context))
  _walk(seed, num_pages=num_pages, batch=int(rng.integers(1, 9)),
        budget=int(rng.integers(1, 64)), context=context, eos=bool(seed % 2))


def test_tight_pool_preempts_and_still_finishes_everything():
  sched = _walk(7, num_pages=48, batch=8, budget=16, context=48, eos=False, page_size=1)
  assert sched.num_preemptions > 0


def test_pool_too_small_for_one_request_raises():
  pool = PageAllocator(2, page_size=4)
  sched = Scheduler(pool, max_batch=4, max_prefill_requests=4, prefill_budget=4,
                    max_seq_len=64)
  sched.add(Request(0, np.arange(3, 7, dtype=np.int32), max_new_tokens=40))
  now = 0
  with pytest.raises(PoolExhausted, match="request 0"):
    while True:  # 8 tokens fill the pool; the 9th has nowhere to go
      step = sched.schedule(now)
      sched.commit(step, [5] * len(step.prefill), [5] * len(step.decode))
      now += 1
  pool.check()


def test_admission_waits_for_pages_first_come_first_served():
  pool = PageAllocator(4, page_size=4)
  sched = Scheduler(pool, max_batch=4, max_prefill_requests=4, prefill_budget=64,
                    max_seq_len=32)
  big = Request(0, np.full(12, 5, np.int32), max_new_tokens=2)    # 3 pages
  bigger = Request(1, np.full(8, 5, np.int32), max_new_tokens=2)  # 2 pages: must wait
  small = Request(2, np.full(2, 5, np.int32), max_new_tokens=2)   # fits, but queued behind
  for r in (big, bigger, small):
    sched.add(r)
  step = sched.schedule(0)
  assert [w.request.rid for w in step.prefill] == [0]
  assert [r.rid for r in sched.waiting] == [1, 2]


def test_bad_requests_are_rejected():
  sched = Scheduler(PageAllocator(4, 4), max_batch=1, max_prefill_requests=1,
                    prefill_budget=4, max_seq_len=8)
  with pytest.raises(ValueError, match="prompt length"):
    sched.add(Request(0, np.zeros(8, np.int32), 1))
  with pytest.raises(ValueError, match="max_new_tokens"):
    sched.add(Request(1, np.zeros(2, np.int32), 0))
