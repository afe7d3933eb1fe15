"""Host page allocator for the paged KV cache.

Pages are handed out as a request's length grows and all return on finish. A page is
either on the free list or held by exactly one owner; `check()` verifies that.
"""

from __future__ import annotations

import numpy as np


class PoolExhausted(RuntimeError):
  """The pool has fewer free pages than a growth needs. Nothing was allocated."""

  def __init__(self, owner, needed: int, free: int, total: int):
    super().__init__(f"page pool exhausted: request {owner!r} needs {needed} more page(s), "
                     f"{free} of {total} are free")
    self.owner, self.needed, self.free, self.total = owner, needed, free, total


class PageAllocator:
  """A free list of page ids [0, num_pages) with owners.

  `seed` shuffles the initial free list, so requests get scattered pages as they would
  after a server has run a while (and the kernels' gathers are exercised honestly).
  """

  def __init__(self, num_pages: int, page_size: int, seed: int | None = None):
    if num_pages < 1 or page_size < 1:
      raise ValueError(f"need num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}")
    self.num_pages, self.page_size = num_pages, page_size
    order = np.arange(num_pages)
    if seed is not None:
      order = np.random.default_rng(seed).permutation(num_pages)
    # pop() takes from the end: reverse so the first pages handed out are order[0], ...
    self._free = [int(p) for p in order[::-1]]
    # Per owner: (page ids, count). The array grows by doubling, so `pages()` can hand
    # out a view without copying a long request's table every step.
    self._owned: dict[object, tuple[np.ndarray, int]] = {}

  @property
  def num_free(self) -> int:
    return len(self._free)

  def pages_for(self, num_tokens: int) -> int:
    return -(-num_tokens // self.page_size)

  def pages(self, owner) -> np.ndarray:
    """The owner's pages in order, int32. A snapshot: later growth or release does not
    change an array already returned."""
    table, count = self._owned.get(owner, (np.zeros(0, np.int32), 0))
    view = table[:count]
    view.flags.writeable = False
    return view

  def owners(self):
    return tuple(self._owned)

  def grow(self, owner, num_tokens: int) -> tuple[int, ...]:
    """Makes `owner` hold enough pages for `num_tokens` tokens; returns the new pages.

    All or nothing: raises PoolExhausted without allocating when the pool is short.
    """
    table, count = self._owned.get(owner, (np.zeros(4, np.int32), 0))
    needed = self.pages_for(num_tokens) - count
    if needed <= 0:
      return ()
    if needed > len(self._free):
      raise PoolExhausted(owner, needed, len(self._free), self.num_pages)
    new = [self._free.pop() for _ in range(needed)]
    if count + needed > len(table):
      # A fresh array: views handed out earlier keep their (old) contents.
      table = np.concatenate([table[:count], np.zeros(max(count + needed, 2 * len(table)),
                                                      np.int32)])
    table[count:count + needed] = new
    self._owned[owner] = (table, count + needed)
    return tuple(new)

  def release(self, owner) -> int:
    """Returns all of `owner`'s pages to the pool (none held is fine); how many."""
    table, count = self._owned.pop(owner, (None, 0))
    # Most recently freed pages are reused first: they are likely still in cache.
    if count:
      self._free.extend(int(p) for p in table[count - 1::-1])
    return count

  def check(self):
    """Raises AssertionError unless every page is free or held by exactly one owner."""
    seen = list(self._free)
    for table, count in self._owned.values():
      seen.extend(int(p) for p in table[:count])
    if len(seen) != self.num_pages or set(seen) != set(range(self.num_pages)):
      dupes = sorted({p for p in seen if seen.count(p) > 1})
      missing = sorted(set(range(self.num_pages)) - set(seen))
      raise AssertionError(f"page accounting broken: shared/duplicated {dupes}, leaked {missing}")
