"""Plans staged in mapped host memory, so a jitted step pays nothing to move them.

A plan passed as a host numpy array is moved by JAX when the step is dispatched; on the
GPU that costs 70-150 us of host time per step, several times the planner. A `PlanRing`
instead keeps plan-sized slots of mapped page-locked host memory, each imported once into
JAX as a *device* array (a DLPack view of the address the GPU reads it at), and writes
each new plan into one of them in place. The step's dispatch sees a device array JAX
already has: no transfer, no host-memory argument. The GPU reads the slot over the bus
once per call: the setup pass copies it into the workspace, where the attention kernel
reads it (cuda/kernels/merge_setup.cu; the plan's config says `plan_mapped`).

A slot is rewritten only when no step can read it any more:
  - nothing outside the ring references its array (no Plan, no copy of one), so no
    step can be dispatched with it again; the ring notes a ticket when it first sees
    that, and
  - the device has acknowledged a plan made after that. Every plan carries a ticket
    (unique in the process, increasing) and its ring's board entry; the setup pass of
    each attention call stores its plan's ticket there (cuda/include/jax_pagedattn/
    plan_acks.h). The device runs one stream's steps in order, so a stored ticket newer
    than the note means every step that could read the slot has finished.
When no slot qualifies the ring grows. Past its soft limit (64 slots or 32 MiB) it first
waits for the device to drain (a tiny computation, blocked on); every slot unreferenced
before the wait is then free. A loop that dispatches steps without ever waiting runs
ahead of the device by as many plans as it likes, and plans made without any step never
get acknowledged: both end up draining once per soft limit's worth of plans.
"""

from __future__ import annotations

import functools
import itertools
import sys
import threading

import jax
import numpy as np

# Unique and increasing in the process: a late store in a board entry from the ring
# that held it before is older than any ticket the current owner waits for.
_tickets = itertools.count(1)

# sys.getrefcount of a slot array that only its slot holds (the slot, the call's argument).
_UNREFERENCED = 2
# Where a ring drains instead of growing: steps in flight rarely exceed a few dozen.
SOFT_LIMIT_SLOTS = 64
SOFT_LIMIT_BYTES = 32 << 20


class _Slot:
  __slots__ = ("array", "view", "fresh", "seen_free_at")

  def __init__(self, array, view):
    self.array = array         # the jax.Array that steps read
    self.view = view           # a writable numpy view of the same memory
    self.fresh = True          # never handed out
    self.seen_free_at = None   # ticket noted when first seen unreferenced, or None

  def referenced(self) -> bool:
    return sys.getrefcount(self.array) > _UNREFERENCED


class PlanRing:
  """Pinned host slots for plans of one buffer size on one device.

  `board` has acquire() -> entry (0: none left), read(entry) -> last stored ticket and
  release(entry): the extension's board (`ExtensionBoard`) by default, a fake in tests.
  `mapped`: the device reads the slots over the bus (a GPU), so plans must say
  `plan_mapped` and the kernels copy them first; on the CPU the slots are plain memory.
  """

  def __init__(self, size: int, device, board, soft_limit: int | None = None):
    self.size = int(size)
    self.device = device
    self.mapped = device.platform == "gpu"
    self._board = board
    self.entry = board.acquire()
    if not self.entry:
      raise RuntimeError("jax_pagedattn: no plan acknowledgement entry is available")
    if soft_limit is None:
      soft_limit = max(4, min(SOFT_LIMIT_SLOTS, SOFT_LIMIT_BYTES // (4 * self.size)))
    self._soft_limit = int(soft_limit)
    self._slots: list[_Slot] = []
    self._lock = threading.Lock()

  def __del__(self):
    board, entry = getattr(self, "_board", None), getattr(self, "entry", 0)
    if board is not None and entry:
      board.release(entry)

  @property
  def num_slots(self) -> int:
    return len(self._slots)

  def stage(self, fill, make_plan):
    """Writes a plan into a free slot; returns (make_plan(slot's jax array), the slot's
    numpy view).

    fill(out=view, ticket=, ack_entry=) writes the plan buffer into the view. If it
    raises, the slot was never handed out and stays free.
    """
    with self._lock:
      slot = self._take()
      fill(out=slot.view, ticket=next(_tickets), ack_entry=self.entry)
      slot.fresh = False
      slot.seen_free_at = None
      return make_plan(slot.array), slot.view

  def _take(self) -> _Slot:
    slot = self._find_free(self._board.read(self.entry))
    if slot is None and len(self._slots) >= self._soft_limit:
      unreferenced = [s for s in self._slots if not s.referenced()]
      if unreferenced:
        self._drain()
        for s in unreferenced:
          s.fresh = True  # no step can read it: none may be dispatched, none is pending
        slot = unreferenced[0]
    return slot if slot is not None else self._new_slot()

  def _find_free(self, acked: int):
    # Lowest index first: a loop then cycles through the few slots its steps in flight
    # need, not through every slot the ring ever grew to, and the GPU reads slots whose
    # pages its address translation has just seen.
    for s in self._slots:
      if s.fresh:
        return s
      if s.referenced():
        continue
      if s.seen_free_at is None:
        # Unreferenced since some moment before now: a step dispatched with a plan made
        # after now proves, once acknowledged, that none can still read the slot.
        s.seen_free_at = next(_tickets)
        continue
      if acked > s.seen_free_at:
        return s
    return None

  def _drain(self) -> None:
    """Returns once the device has run everything dispatched to it so far."""
    x = jax.device_put(np.zeros((), np.int32), self.device)
    jax.block_until_ready(x + 1)  # queued behind every earlier step on the stream

  def _new_slot(self) -> _Slot:
    view, array = (_mapped_slot if self.mapped else _host_slot)(self.size, self.device)
    slot = _Slot(array, view)
    self._slots.append(slot)
    return slot


def _mapped_slot(size: int, device):
  """(numpy view, device jax.Array) of one new slot of mapped page-locked host memory
  (the extension allocates it; freed when both are gone)."""
  from jax_pagedattn import _C
  view, exported = _C.mapped_plan_slot(size, device.local_hardware_id)
  return view, jax.dlpack.from_dlpack(exported, copy=False)


def _host_slot(size: int, device):
  """(numpy view, jax.Array) sharing one plain host buffer, for a CPU device."""
  raw = np.zeros(size + 16, np.int32)
  start = (-raw.ctypes.data % 64) // 4  # XLA's CPU client aliases 64-byte aligned memory
  view = raw[start:start + size]
  return view, jax.dlpack.from_dlpack(view, device=device, copy=False)


class ExtensionBoard:
  """The extension's plan acknowledgement board (CUDA builds)."""

  def __init__(self, ext):
    self._ext = ext

  def acquire(self) -> int:
    return int(self._ext.plan_ack_acquire())

  def read(self, entry: int) -> int:
    return int(self._ext.plan_ack_read(entry))

  def release(self, entry: int) -> None:
    self._ext.plan_ack_release(entry)


def current_device():
  """The device computations go to now: jax.default_device's, else the first one."""
  d = jax.config.jax_default_device
  if d is None:
    return _first_device()
  return jax.devices(d)[0] if isinstance(d, str) else d


@functools.lru_cache(maxsize=1)
def _first_device():
  return jax.devices()[0]


def default_board():
  """The extension's board when this build has one (CUDA builds), else None."""
  from jax_pagedattn import _C
  return ExtensionBoard(_C) if hasattr(_C, "plan_ack_acquire") else None


def make_ring(size: int, device, required: bool):
  """A ring for plans of `size` int32 on `device`, or None where staging does not apply
  (not a GPU, or no board) unless `required`, which raises instead."""
  board = default_board() if (required or device.platform == "gpu") else None
  if board is not None:
    try:
      return PlanRing(size, device, board)
    except RuntimeError:
      if required:
        raise
      return None
  if required:
    raise ValueError("plan_staging=True needs a CUDA build of jax_pagedattn on a GPU "
                     f"(device {device} on platform {device.platform!r})")
  return None
