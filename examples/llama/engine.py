"""The jitted serving step: one forward over every scheduled row, paged caches updated
in place.

Rows of a step are laid out as [prefill rows, padded to a bucket | decode rows, padded
to a bucket]. Each part has its own page table and plan (prefill: causal chunks,
decode: one query per request), so the boundary between them must be static: hence
two row buckets rather than one. The model state is split once (`nnx.split`): the
graphdef is closed over (static), the state is an argument, the per-layer caches are
donated and returned. The step's shapes depend only on the (prefill bucket, decode
bucket) pair, so the run compiles at most (|prefill buckets|+1)(|decode buckets|+1)-1
times, and every compile is logged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_pagedattn as jpa
from llama.packing import HostArrays
from llama.scheduler import Step

log = logging.getLogger("llama.engine")


def buckets(capacity: int, smallest: int, factor: int = 4) -> tuple[int, ...]:
  """capacity, capacity/factor, ... down to `smallest`: few sizes, bounded padding."""
  sizes = [capacity]
  while sizes[-1] // factor >= smallest:
    sizes.append(sizes[-1] // factor)
  return tuple(sorted(sizes))


def pick(sizes, n: int) -> int:
  for size in sizes:
    if size >= n:
      return size
  raise ValueError(f"{n} rows exceed the largest bucket {sizes[-1]}")


@dataclasses.dataclass
class Compile:
  key: tuple  # (prefill rows, decode rows); 0 = part absent
  seconds: float = 0.0  # wall time of the call that compiled, filled in by the caller


class Engine:

  def __init__(self, graphdef, state, cfg, backend, *, num_pages: int, page_size: int,
               max_batch: int, max_prefill_requests: int, prefill_budget: int, dtype,
               parallel=None):
    """`parallel`: a tensor_parallel.TensorParallel when the model is split over
    devices (then `state` is already placed by it and `cfg` is its served config)."""
    self.graphdef, self.state, self.cfg, self.backend = graphdef, state, cfg, backend
    self.parallel = parallel
    self.shards = parallel.shards if parallel is not None else None
    self.num_pages, self.page_size = num_pages, page_size
    self.max_prefill_requests = max_prefill_requests
    self.dtype = jnp.dtype(dtype)
    self.decode_buckets = buckets(max_batch, smallest=min(4, max_batch))
    self.prefill_buckets = buckets(prefill_budget, smallest=min(16, prefill_budget))
    # One 5-D NHD cache per layer: [pages, 2 (k, v), page_size, kv_heads, head_dim].
    # Split over the mesh, each device allocates only its KV heads' share.
    shape = (num_pages, 2, page_size, cfg.num_kv_heads, cfg.head_dim)
    where = parallel.cache_sharding() if parallel is not None else None
    self.caches = [jnp.zeros(shape, self.dtype, device=where) for _ in range(cfg.num_layers)]
    self.compiles: list[Compile] = []
    self._step = jax.jit(self._forward, donate_argnums=1)
    # The same step with attention replaced by the identity (out = q; k/v still
    # appended), only for measuring what attention costs inside the step. Identity, not
    # zeros: XLA would drop the q and o projections of a zero output. Compiled on first use.
    self._step_without_attention = jax.jit(
        functools.partial(self._forward, attention=False), donate_argnums=1)
    self.plan_seconds = 0.0  # host time in plan() during the last prepare()
    self.last_inputs = None  # of the last step run

  @property
  def max_compiles(self) -> int:
    return (len(self.prefill_buckets) + 1) * (len(self.decode_buckets) + 1) - 1

  # ------------------------------------------------------------------ host side

  def prepare(self, step: Step) -> dict:
    """Host arrays (one buffer per part) and plans for `step`."""
    self.plan_seconds = 0.0
    inputs = {}
    if step.prefill:
      inputs["prefill"] = self._part(step.prefill, self.prefill_buckets,
                                     self.max_prefill_requests, self.backend.plan_prefill)
    if step.decode:
      rows = pick(self.decode_buckets, len(step.decode))
      inputs["decode"] = self._part(step.decode, self.decode_buckets, rows,
                                    lambda qo, *table: self.backend.plan_decode(*table))
    return inputs

  def _part(self, works, row_buckets, num_slots, plan_fn) -> dict:
    """One part's arrays, padded: rows to a bucket, requests to `num_slots` (padding
    requests own no rows and no pages), kv_indices to the whole pool."""
    # Per-request numbers via one pass in Python; everything per row or per page is
    # numpy, since a batch of long requests holds thousands of pages.
    lens, starts, page_counts = (np.array(v, np.int32) for v in zip(
        *[(len(w.tokens), w.start, len(w.pages)) for w in works]))
    kv_lens = starts + lens
    qo_indptr = np.zeros(len(works) + 1, np.int32)
    np.cumsum(lens, out=qo_indptr[1:])
    kv_indptr = np.zeros(len(works) + 1, np.int32)
    np.cumsum(page_counts, out=kv_indptr[1:])
    live_rows, live_pages = int(qo_indptr[-1]), int(kv_indptr[-1])
    rows = pick(row_buckets, live_rows)
    kv_indices = np.concatenate([w.pages for w in works])
    last_page_len = kv_lens - (page_counts - 1) * self.page_size
    # Row i of request b sits at position start_b + (i - qo_indptr[b]).
    positions = np.repeat(starts - qo_indptr[:-1], lens) + np.arange(live_rows, dtype=np.int32)

    def padded(values, size, fill=0):
      out = np.full(size, fill, np.int32)
      out[:len(values)] = values
      return out

    arrays = dict(
        tokens=padded(np.concatenate([w.tokens for w in works]), rows),
        positions=padded(positions, rows),
        qo_indptr=padded(qo_indptr, num_slots + 1, fill=live_rows),
        kv_indptr=padded(kv_indptr, num_slots + 1, fill=live_pages),
        kv_indices=padded(kv_indices, self.num_pages),
        kv_last_page_len=padded(last_page_len, num_slots),
        seq_lens=padded(kv_lens, num_slots))
    part = {"host": HostArrays.pack(arrays)}
    start = time.perf_counter()
    plan = plan_fn(qo_indptr, kv_indptr, kv_indices, last_page_len)
    self.plan_seconds += time.perf_counter() - start
    if plan is not None:
      part["plan"] = plan
    return part

  def run(self, inputs: dict, attention: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Runs one step; returns the sampled tokens of (prefill requests, decode rows)."""
    step = self._step if attention else self._step_without_attention
    tokens, self.caches = step(self.state, self.caches, inputs)
    self.last_inputs = inputs
    tokens = np.asarray(tokens)  # waits for the step: the scheduler needs the tokens
    num_prefill = self.max_prefill_requests if "prefill" in inputs else 0
    return tokens[:num_prefill], tokens[num_prefill:]

  # ------------------------------------------------------------------ device side

  def _forward(self, state, caches, inputs, attention: bool = True):
    parts = [(name, _unpack(inputs[name])) for name in ("prefill", "decode") if name in inputs]
    key = tuple(inputs[n]["host"].sizes["tokens"] if n in inputs else 0
                for n in ("prefill", "decode"))
    if attention:
      self.compiles.append(Compile(key))  # runs once per trace, i.e. per compile
      log.info("compiling step for (prefill rows, decode rows) = %s", key)
    model = nnx.merge(self.graphdef, state)
    tokens = jnp.concatenate([part["tokens"] for _, part in parts])
    positions = jnp.concatenate([part["positions"] for _, part in parts])
    sizes = [part["tokens"].shape[0] for _, part in parts]
    # Where each row lands in the cache; computed once, shared by every layer.
    targets = [jpa.get_batch_indices_positions(part["qo_indptr"], part["seq_lens"], size)
               for (_, part), size in zip(parts, sizes)]
    attend = functools.partial(self._attend, parts, sizes, targets, attention)
    hidden, caches = model(tokens, positions, attend, caches)
    sampled, offset = [], 0
    for (name, part), size in zip(parts, sizes):
      if name == "prefill":  # the last row of each request's chunk
        sampled.append(part["qo_indptr"][1:] - 1)
      else:
        sampled.append(offset + jnp.arange(size))
      offset += size
    logits = model.logits(hidden[jnp.concatenate(sampled)])
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), caches

  def _attend(self, parts, sizes, targets, attention, q, k, v, cache):
    """Writes the step's k/v into the pages, then attends each part with its plan."""
    outs, offset = [], 0
    for (name, part), size, (batch_indices, positions) in zip(parts, sizes, targets):
      rows = slice(offset, offset + size)
      cache = jpa.append_paged_kv_cache(k[rows], v[rows], batch_indices, positions, cache,
                                        part["kv_indices"], part["kv_indptr"],
                                        part["kv_last_page_len"], kv_layout="NHD",
                                        shards=self.shards)
      run = self.backend.prefill if name == "prefill" else self.backend.decode
      outs.append(run(q[rows], cache, part) if attention else q[rows])
      offset += size
    return jnp.concatenate(outs), cache

  # ------------------------------------------------------------------ measurement

  def compiled_text(self, inputs) -> str:
    """The compiled HLO of the step for `inputs` (jit's cache has it once that step ran)."""
    return self._step.lower(self.state, self.caches, inputs).compile().as_text()

  def attention_only(self):
    """A jitted function running only a decode part's attention, every layer, over the
    same caches and plan as the step: what the step spends in attention."""
    num_qo, head_dim = self.cfg.num_qo_heads, self.cfg.head_dim

    def attention(caches, inputs):
      part = _unpack(inputs["decode"])
      rows = part["tokens"].shape[0]
      # Any q gives the same time; derive it from the tokens so nothing is constant-folded.
      q = jnp.broadcast_to(part["tokens"][:, None, None].astype(self.dtype) * 1e-3,
                           (rows, num_qo, head_dim))
      outs = [self.backend.decode(q, cache, part) for cache in caches]
      return jnp.stack(outs)

    return jax.jit(attention)


def _unpack(part: dict) -> dict:
  """A part's arrays by name, with its plan (absent for the jnp backend)."""
  return {**part["host"].unpack(), "plan": part.get("plan")}
