"""Continuous batching: which request feeds which tokens into the next step.

Each step every running request whose known tokens are all in the cache but one
decodes that one token; requests with more tokens to feed (a prompt, or the whole
sequence again after a preemption) get chunks from a per-step prefill token budget,
oldest first; waiting requests are admitted, first come first served, while batch slots,
budget and pages for their whole prompt are free. Pages are allocated as requests grow.
When the pool runs dry the newest running request is preempted: its pages go back and
it waits to be recomputed from its prompt plus the tokens it has produced.
"""

from __future__ import annotations

import collections
import dataclasses
import enum

import numpy as np

from llama.allocator import PageAllocator, PoolExhausted


class State(enum.Enum):
  PENDING = "pending"    # not arrived yet
  WAITING = "waiting"    # arrived, holds no pages
  RUNNING = "running"
  FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
  rid: int
  prompt: np.ndarray
  max_new_tokens: int
  arrival: int = 0  # the step at which it enters the queue
  output: list = dataclasses.field(default_factory=list)
  num_cached: int = 0  # leading tokens whose k/v are in the cache
  state: State = State.PENDING
  preemptions: int = 0
  finish_reason: str | None = None

  @property
  def seq_len(self) -> int:
    return len(self.prompt) + len(self.output)

  def token_slice(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of prompt + output, without copying the whole sequence
    (a decode step asks for one token of a long one)."""
    n = len(self.prompt)
    if stop <= n:
      return self.prompt[start:stop].astype(np.int32)
    tail = np.asarray(self.output[max(start - n, 0):stop - n], np.int32)
    return tail if start >= n else np.concatenate([self.prompt[start:], tail]).astype(np.int32)


@dataclasses.dataclass
class Work:
  """One request's rows in a step: `tokens` at positions start, start+1, ..."""

  request: Request
  tokens: np.ndarray
  start: int
  pages: np.ndarray  # the request's pages after the step's growth (int32, read-only)

  @property
  def kv_len(self) -> int:
    return self.start + len(self.tokens)


@dataclasses.dataclass
class Step:
  prefill: list  # [Work], several tokens each
  decode: list   # [Work], one token each
  preempted: list  # [Request] that lost their pages this step

  @property
  def empty(self) -> bool:
    return not self.prefill and not self.decode


class Scheduler:

  def __init__(self, allocator: PageAllocator, *, max_batch: int, max_prefill_requests: int,
               prefill_budget: int, max_seq_len: int, eos_id: int | None = None):
    self.allocator = allocator
    self.max_batch, self.max_prefill_requests = max_batch, max_prefill_requests
    self.prefill_budget, self.max_seq_len, self.eos_id = prefill_budget, max_seq_len, eos_id
    self.pending: list[Request] = []    # sorted by arrival
    self.waiting: collections.deque[Request] = collections.deque()
    self.running: list[Request] = []    # admission order: oldest first
    self.finished: list[Request] = []
    self.num_preemptions = 0
    self.num_generated = 0  # tokens appended to outputs so far

  def add(self, request: Request):
    if not 1 <= len(request.prompt) < self.max_seq_len:
      raise ValueError(f"request {request.rid}: prompt length {len(request.prompt)} must be in "
                       f"[1, max_seq_len={self.max_seq_len})")
    if request.max_new_tokens < 1:
      raise ValueError(f"request {request.rid}: max_new_tokens must be >= 1")
    request.state = State.PENDING
    self.pending.append(request)
    self.pending.sort(key=lambda r: r.arrival)

  @property
  def done(self) -> bool:
    return not (self.pending or self.waiting or self.running)

  def schedule(self, now: int) -> Step:
    """Picks the rows of step `now` and grows the pages they write."""
    while self.pending and self.pending[0].arrival <= now:
      request = self.pending.pop(0)
      request.state = State.WAITING
      self.waiting.append(request)
    step = Step([], [], [])
    budget = self.prefill_budget
    for request in list(self.running):
      if request.state is not State.RUNNING:  # preempted earlier in this loop
        continue
      budget -= self._feed(request, budget, step)
    # Admitting right after preempting would only hand the pages back and forth.
    while (not step.preempted and self.waiting and len(self.running) < self.max_batch
           and budget > 0 and len(step.prefill) < self.max_prefill_requests):
      request = self.waiting[0]
      if self.allocator.pages_for(request.seq_len) > self.allocator.num_free:
        break  # first come first served: no overtaking by shorter prompts
      self.waiting.popleft()
      request.state = State.RUNNING
      self.running.append(request)
      budget -= self._feed(request, budget, step)
    return step

  def _feed(self, request: Request, budget: int, step: Step) -> int:
    """Adds `request`'s rows for this step; returns the prefill budget used."""
    remaining = request.seq_len - request.num_cached
    is_decode = remaining == 1
    if is_decode:
      count = 1
    else:
      if len(step.prefill) >= self.max_prefill_requests:
        return 0
      count = min(remaining, budget)
      if count <= 0:
        return 0
    if not self._grow(request, request.num_cached + count, step):
      return 0
    start = request.num_cached
    work = Work(request, request.token_slice(start, start + count), start,
                self.allocator.pages(request.rid))
    (step.decode if is_decode else step.prefill).append(work)
    return 0 if is_decode else count

  def _grow(self, request: Request, num_tokens: int, step: Step) -> bool:
    """Grows `request` to num_tokens, preempting the newest requests while the pool is
    short. False when `request` itself had to be preempted."""
    while True:
      try:
        self.allocator.grow(request.rid, num_tokens)
        return True
      except PoolExhausted as e:
        victim = self.running[-1]
        if victim is request and len(self.running) == 1:
          raise PoolExhausted(request.rid, e.needed, e.free, e.total) from e
        # Running is oldest first and rows are added in that order, so the victim has
        # no rows in this step yet (or is `request` itself).
        self._preempt(victim)
        step.preempted.append(victim)
        if victim is request:
          return False

  def _preempt(self, request: Request):
    self.allocator.release(request.rid)
    self.running.remove(request)
    request.num_cached = 0
    request.state = State.WAITING
    request.preemptions += 1
    self.num_preemptions += 1
    self.waiting.appendleft(request)

  def commit(self, step: Step, prefill_tokens, decode_tokens) -> list[Request]:
    """Records the step's sampled tokens (one per Work, in order); returns the requests
    that finished. A prefill chunk's token counts only if the chunk reached the end of
    the request's known tokens."""
    done = []
    for works, tokens in ((step.prefill, prefill_tokens), (step.decode, decode_tokens)):
      for work, token in zip(works, tokens):
        request = work.request
        request.num_cached = work.kv_len
        if request.num_cached < request.seq_len:
          continue
        request.output.append(int(token))
        self.num_generated += 1
        reason = self._finish_reason(request)
        if reason:
          self._finish(request, reason)
          done.append(request)
    return done

  def _finish_reason(self, request: Request) -> str | None:
    if self.eos_id is not None and request.output[-1] == self.eos_id:
      return "eos"
    if len(request.output) >= request.max_new_tokens:
      return "length"
    if request.seq_len >= self.max_seq_len:
      return "context"
    return None

  def _finish(self, request: Request, reason: str):
    self.allocator.release(request.rid)
    self.running.remove(request)
    request.state = State.FINISHED
    request.finish_reason = reason
    self.finished.append(request)
