"""The ops on a device mesh: each device runs its own shard, with no all-gather.

Two splits, alone or together on a 2-D mesh (docs/CONTRACT.md, "Sharded use"):

- **Tensor parallel** (`Shards(mesh, heads=axis)`): q, out, lse and appended K/V are split
  over heads, the cache over its KV-head axis; one plan serves every head shard,
  replicated. It is planned for one shard's head counts (`heads_per_shard`), because the
  plan's bins and workspace are sized per KV head a device runs. When the axis has more
  devices than the model has KV heads, the KV heads are replicated (as tpu-inference
  does): the cache holds `sharded_kv_heads` heads, each device one.
- **Data parallel** (`Shards(mesh, requests=axis)`): shard i owns the i-th equal block of
  q's rows, of the cache's pages and of the appended rows; its requests are planned on
  the host with page ids local to its block; the plans are stacked on a leading axis
  (`shard_plan`), so each device receives its own plan.

Mechanism: `jax.shard_map` inside the ops, over a mesh the caller names. On jax 0.10.2 a
custom call on sharded operands is all-gathered by XLA (jax's FFI tutorial says so, and
names shard_map first among the ways out); shard_map hands each device its local blocks,
and the kernels run unchanged on them. `custom_partitioning` was the alternative: it
infers the split from operand shardings, but the plan must know the head split and the
request split before tracing anyway (bins per KV head; one plan per request shard), it
lives in jax.experimental, and its Python partitioning callbacks defeat the persistent
compilation cache (jax issue 21159, open). `jax.shard_map` is the public entry point
(jax.pmap itself has been built on it since jax 0.8).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_pagedattn import layout as layout_lib
from jax_pagedattn import planning, primitives


# ---------------------------------------------------------------------------------------
# head counts under tensor parallelism


def _check_tp(num_qo_heads: int, num_kv_heads: int, tp: int):
  if tp < 1:
    raise ValueError(f"the head shard count must be >= 1, got {tp}")
  if num_kv_heads < 1 or num_qo_heads % num_kv_heads:
    raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a positive multiple of "
                     f"num_kv_heads ({num_kv_heads})")
  if num_qo_heads % tp:
    raise ValueError(f"num_qo_heads ({num_qo_heads}) must divide into {tp} head shards")
  if num_kv_heads % tp and tp % num_kv_heads:
    raise ValueError(f"{tp} head shards need num_kv_heads ({num_kv_heads}) to be a multiple "
                     f"of {tp}, or {tp} a multiple of it (then KV heads are replicated)")


def sharded_kv_heads(num_kv_heads: int, tp: int) -> int:
  """KV heads of a cache (and of appended K/V) split over `tp` head shards: the model's
  count, or `tp` when it is smaller (each KV head then repeated `tp // num_kv_heads`
  times, one copy per device, as `replicate_kv_heads` lays them out)."""
  return max(int(num_kv_heads), int(tp))


def heads_per_shard(num_qo_heads: int, num_kv_heads: int, tp: int) -> tuple[int, int]:
  """(query heads, KV heads) of one of `tp` head shards: what to pass to `plan()`.

  The group size is unchanged when `tp` divides num_kv_heads; with more shards than KV
  heads each shard runs one (replicated) KV head with num_qo_heads / tp query heads.
  """
  _check_tp(num_qo_heads, num_kv_heads, tp)
  return num_qo_heads // tp, sharded_kv_heads(num_kv_heads, tp) // tp


def replicate_kv_heads(x, num_kv_heads: int, tp: int, axis: int = 1):
  """`x` with its KV-head axis repeated for `tp` head shards (unchanged when tp <=
  num_kv_heads): head j of the result is head j // (tp // num_kv_heads) of `x`, so shard j
  holds the KV head its query heads read. Apply it to new keys/values before appending
  (axis 1 of [rows, heads, dim]), or once to the K/V projection weights."""
  if x.shape[axis] != num_kv_heads:
    raise ValueError(f"axis {axis} of x has {x.shape[axis]} entries, expected num_kv_heads "
                     f"= {num_kv_heads}")
  if tp <= num_kv_heads:
    return x
  if tp % num_kv_heads:
    raise ValueError(f"{tp} head shards are not a multiple of num_kv_heads ({num_kv_heads})")
  return jnp.repeat(x, tp // num_kv_heads, axis=axis)


# ---------------------------------------------------------------------------------------
# how arrays split over the mesh


def _names(axis) -> tuple:
  if axis is None:
    return ()
  return tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)


@dataclasses.dataclass(frozen=True)
class Shards:
  """How the ops' arrays split over `mesh`: `heads`, a mesh axis name (or a tuple of
  names) over which heads split (tensor parallel); `requests`, one over which requests,
  with their query rows and cache pages, split (data parallel). Either or both."""

  mesh: jax.sharding.Mesh
  heads: str | tuple | None = None
  requests: str | tuple | None = None

  def __post_init__(self):
    for field in ("heads", "requests"):
      value = getattr(self, field)
      if isinstance(value, list):  # keep the object hashable: it is part of a compile key
        object.__setattr__(self, field, tuple(value))
    heads, requests = _names(self.heads), _names(self.requests)
    if not heads and not requests:
      raise ValueError("Shards needs a mesh axis for heads=, requests= or both")
    for name in heads + requests:
      if name not in self.mesh.axis_names:
        raise ValueError(f"mesh axis {name!r} is not in the mesh {tuple(self.mesh.axis_names)}")
    if set(heads) & set(requests):
      raise ValueError(f"heads= and requests= must use different mesh axes, both use "
                       f"{sorted(set(heads) & set(requests))}")

  @property
  def tp(self) -> int:
    """Head shards."""
    return math.prod(self.mesh.shape[n] for n in _names(self.heads))

  @property
  def dp(self) -> int:
    """Request shards."""
    return math.prod(self.mesh.shape[n] for n in _names(self.requests))

  # PartitionSpecs of the operands, by role.
  def rows(self, *rest) -> P:
    """Arrays [rows, heads, ...rest]: q, out, lse, new K/V."""
    return P(self.requests, self.heads, *rest)

  def per_request_shard(self, ndim: int) -> P:
    """Host-made arrays with one row per request shard (plans, page tables), or
    replicated when requests are not split."""
    return P(self.requests, *([None] * (ndim - 1))) if self.requests is not None else P()

  def cache(self, kv_layout: str, combined: bool) -> P:
    """A cache operand: pages over requests, the KV-head axis over heads."""
    extra = (None,) if combined else ()
    if kv_layout == "NHD":
      return P(self.requests, *extra, None, self.heads, None)
    return P(self.requests, *extra, self.heads, None, None)

  def every_axis(self) -> P:
    """A per-device scratch result, concatenated over every split axis."""
    return P(_names(self.requests) + _names(self.heads))

  def local(self) -> bool:
    """Whether the caller is already inside a shard_map over these axes (its arrays are
    then one shard's, and the op runs on them directly)."""
    manual = set(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))
    used = set(_names(self.heads) + _names(self.requests))
    if manual & used and not used <= manual:
      raise ValueError(f"inside a shard_map over {sorted(manual)}: the op splits over "
                       f"{sorted(used)}; map over all of them or none")
    return used <= manual

  def counts(self) -> tuple[int, int]:
    """(request shards, head shards) the operands hold: 1, 1 inside a shard_map."""
    return (1, 1) if self.local() else (self.dp, self.tp)

  def place_small(self, x, spec: P):
    """A host-made operand (a plan, a page table) where `spec` puts it. On a mesh of
    explicit axes shard_map does not move operands; these are kilobytes, so they are
    resharded here rather than asking every caller to device_put them. q, K/V and the
    cache are never moved: a mismatch there is the caller's to see."""
    if self.local():
      return x
    names = [n for entry in spec for n in _names(entry)]
    types = dict(zip(self.mesh.axis_names, getattr(self.mesh, "axis_types", ())))
    if any(types.get(n) == jax.sharding.AxisType.Explicit for n in names):
      return jax.sharding.reshard(x, NamedSharding(self.mesh, spec))
    return x

  def map(self, fn: Callable, in_specs, out_specs) -> Callable:
    """`fn` applied to each device's blocks. check_vma=False: the kernels communicate with
    no other device, so each result varies over exactly the axes of its out_spec; and
    jax's per-primitive varying-axes API has changed between releases (vma, mat)."""
    if self.local():
      return fn
    return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)


# ---------------------------------------------------------------------------------------
# sharded plans


@jax.tree_util.register_pytree_node_class
class ShardedPlan(planning.Plan):
  """One shard's plan with the `Shards` that split the global arrays.

  `config` describes what one device runs (its head counts, token and page capacities);
  `buffer` is that plan's int32 buffer, or with `requests=` split, the request shards'
  plans stacked: int32 [dp, size]. Made by `shard_plan`.
  """

  def __init__(self, buffer, config: planning.PlanConfig, shards: Shards):
    super().__init__(buffer, config)
    self.shards = shards

  def tree_flatten(self):
    return (self.buffer,), (self.config, self.shards)

  @classmethod
  def tree_unflatten(cls, aux, children):
    config, shards = aux
    return cls(children[0], config, shards)

  @property
  def buffer_sharding(self) -> NamedSharding:
    """Where the buffer lives: `jax.device_put(plan, plan.buffer_sharding)` sends each
    device only its own row (otherwise a jitted step sends the stacked buffer whole)."""
    return NamedSharding(self.shards.mesh, self.shards.per_request_shard(np.ndim(self.buffer)))

  def __repr__(self):
    s = self.shards
    return (f"ShardedPlan(heads={s.heads!r} x{s.tp}, requests={s.requests!r} x{s.dp}, "
            f"per shard: {super().__repr__()})")


def _config_difference(a: planning.PlanConfig, b: planning.PlanConfig) -> list[str]:
  return [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def shard_plan(plans, shards: Shards) -> ShardedPlan:
  """A `ShardedPlan` from per-shard plans, made on the host once per step.

  `plans`: with `shards.requests` set, one `Plan` per request shard, in mesh order, each
  planned for that shard's requests with page ids local to its block of pages;
  otherwise a single `Plan`. With `shards.heads` set, every plan is made for one head
  shard's counts (`heads_per_shard`). All plans must share one config: plan them with one
  wrapper whose capacities are fixed (max_batch_size, max_num_pages, max_num_tokens) for
  the largest shard.
  """
  if isinstance(plans, planning.Plan):
    plans = [plans]
  plans = list(plans)
  want = shards.dp if shards.requests is not None else 1
  if len(plans) != want:
    where = f"mesh axis {shards.requests!r}" if shards.requests is not None else "no request split"
    raise ValueError(f"shard_plan needs {want} plan(s), one per request shard ({where}), "
                     f"got {len(plans)}")
  for i, p in enumerate(plans):
    if not isinstance(p, planning.Plan) or isinstance(p, ShardedPlan):
      raise TypeError(f"plans[{i}] must be a Plan from a wrapper's plan(), got {type(p).__name__}")
    diff = _config_difference(plans[0].config, p.config)
    if diff:
      raise ValueError(f"plans[{i}] differs from plans[0] in {diff}: plan every shard with "
                       f"one wrapper and fixed capacities (max_batch_size, max_num_pages, "
                       f"max_num_tokens) that hold the largest shard")
  if shards.requests is None:
    buffer = plans[0].buffer
  else:
    # A new read-only array: plans are values (docs/CONTRACT.md).
    buffer = np.stack([np.asarray(p.buffer) for p in plans])
    buffer.flags.writeable = False
  return ShardedPlan(buffer, plans[0].config, shards)


# ---------------------------------------------------------------------------------------
# the ops


def _check_split(name: str, size: int, parts: int, what: str):
  if size % parts:
    raise ValueError(f"{name} has {size} {what}, which do not split into {parts} equal shards")


def bind_attention(primitive, q, k_op, v_op, buffer, sinks, scales, plan: planning.Plan,
                   combined: bool):
  """(out, lse, workspace) of an attention call: one primitive call for a Plan, one per
  device for a ShardedPlan. `sinks` is float32 [global query heads] or [0]; `scales`
  float32 [2] (k_scale, v_scale) or [0], the same on every device."""
  config = plan.config
  if not isinstance(plan, ShardedPlan):
    return primitive.bind(q, k_op, v_op, buffer, sinks, scales, config=config,
                          combined=combined)
  shards = plan.shards
  dp, tp = shards.counts()
  if tp > 1 and config.pos_encoding_mode == "ALIBI":
    # Slopes follow the global head index; a shard only knows its local one.
    raise NotImplementedError("ALiBi with heads split over devices is not supported: each "
                              "shard would use the slopes of heads 0.. num_qo_heads/tp")
  if q.ndim != 3 or q.shape[1] != config.num_qo_heads * tp:
    raise ValueError(
        f"q must be [tokens, {config.num_qo_heads * tp}, head_dim]: the plan is for "
        f"{config.num_qo_heads} query heads per shard x {tp} head shards; got "
        f"{tuple(q.shape)} (plan each shard with sharding.heads_per_shard's counts)")
  info = layout_lib.inspect_cache(k_op if combined else (k_op, v_op), config.kv_layout)
  if info.num_kv_heads != config.num_kv_heads * tp:
    raise ValueError(
        f"paged_kv_cache has {info.num_kv_heads} KV heads; the plan is for "
        f"{config.num_kv_heads} per shard x {tp} head shards (with more shards than KV "
        f"heads, replicate them: sharding.replicate_kv_heads)")
  _check_split("q", q.shape[0], dp, "rows")
  _check_split("paged_kv_cache", info.num_pages, dp, "pages")
  size = planning.plan_sections(config.caps)["size"]
  want = (dp, size) if shards.requests is not None else (size,)
  if shards.local() and shards.requests is not None:
    want = (1, size)
  if tuple(buffer.shape) != want:
    raise ValueError(f"the sharded plan's buffer must be int32{list(want)}, got "
                     f"{list(buffer.shape)}")

  def run_shard(q, k, v, plan_rows, sinks, scales):
    return tuple(primitive.bind(q, k, v, plan_rows.reshape(-1), sinks, scales, config=config,
                                combined=combined))

  cache = shards.cache(config.kv_layout, combined)
  plan_spec = shards.per_request_shard(len(want))
  # Sinks follow q's head axis; an empty sinks operand is replicated (each shard's [0]).
  sinks_spec = P(shards.heads) if sinks.shape[0] else P()
  step = shards.map(run_shard,
                    in_specs=(shards.rows(None), cache, cache, plan_spec, sinks_spec, P()),
                    out_specs=(shards.rows(None), shards.rows(), shards.every_axis()))
  return step(q, k_op, v_op, shards.place_small(buffer, plan_spec),
              shards.place_small(sinks, sinks_spec), shards.place_small(scales, P()))


def append_paged_kv_cache(append_key, append_value, batch_indices, positions, paged_kv_cache,
                          kv_indices, kv_indptr, kv_last_page_len, *, kv_layout: str,
                          shards: Shards, check_host: Callable):
  """`jax_pagedattn.append_paged_kv_cache(..., shards=)`: each device writes its rows into
  its block of the cache.

  Appended rows, batch_indices and positions split into `dp` equal blocks; with
  `requests=` the page table is per request shard: kv_indices int32 [dp, L], kv_indptr
  [dp, B + 1], kv_last_page_len [dp, B] (`stack_page_tables`), with local request
  indices and page ids. `check_host` is page.py's validation, applied to each shard's
  arrays when they are concrete.
  """
  info = layout_lib.inspect_cache(paged_kv_cache, kv_layout)
  dp, tp = shards.counts()
  for name, x in (("append_key", append_key), ("append_value", append_value)):
    if x.ndim != 3 or x.shape[1] != info.num_kv_heads:
      raise ValueError(f"{name} must be [rows, {info.num_kv_heads}, head_dim] like the cache's "
                       f"KV heads (sharding.replicate_kv_heads repeats them for more head "
                       f"shards than KV heads); got {tuple(x.shape)}")
  _check_split("paged_kv_cache", info.num_kv_heads, tp, "KV heads")
  _check_split("paged_kv_cache", info.num_pages, dp, "pages")
  _check_split("append_key", append_key.shape[0], dp, "rows")
  table_ndim = 2 if shards.requests is not None else 1
  for name, x in (("kv_indices", kv_indices), ("kv_indptr", kv_indptr),
                  ("kv_last_page_len", kv_last_page_len)):
    if np.ndim(x) != table_ndim or (table_ndim == 2 and np.shape(x)[0] != dp):
      want = f"[{dp}, n] (one row per request shard)" if table_ndim == 2 else "1-D"
      raise ValueError(f"{name} must be {want} for these shards, got shape {np.shape(x)}")

  ints = (batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len)
  if not any(isinstance(x, jax.core.Tracer) for x in ints):
    local_info = dataclasses.replace(info, num_pages=info.num_pages // dp,
                                     num_kv_heads=info.num_kv_heads // tp)
    rows = append_key.shape[0] // dp
    bi, pos = np.asarray(batch_indices), np.asarray(positions)
    tables = [np.asarray(x) for x in ints[2:]]
    if table_ndim == 1:
      tables = [t[None] for t in tables]
    for s in range(len(tables[0])):
      indices, indptr, last = (t[s] for t in tables)
      indices = indices[:max(int(indptr[-1]), 0)] if table_ndim == 2 and indptr.size else indices
      check_host(rows, bi[s * rows:(s + 1) * rows], pos[s * rows:(s + 1) * rows], indices,
                 indptr, last, local_info)

  batch_indices, positions, kv_indices, kv_indptr = (
      jnp.asarray(x, jnp.int32) for x in (batch_indices, positions, kv_indices, kv_indptr))
  caches = (paged_kv_cache,) if info.combined else tuple(paged_kv_cache)
  table_spec = shards.per_request_shard(table_ndim)
  kv_indices, kv_indptr = (shards.place_small(x, table_spec) for x in (kv_indices, kv_indptr))

  def append_shard(nk, nv, bi, pos, indices, indptr, *caches):
    return tuple(primitives.append_p.bind(nk, nv, bi, pos, indices.reshape(-1),
                                          indptr.reshape(-1), *caches, kv_layout=kv_layout,
                                          combined=info.combined))

  cache_specs = (shards.cache(kv_layout, info.combined),) * len(caches)
  rows_spec = shards.rows(None)
  step = shards.map(append_shard,
                    in_specs=(rows_spec, rows_spec, P(shards.requests), P(shards.requests),
                              table_spec, table_spec, *cache_specs),
                    out_specs=cache_specs)
  out = step(append_key, append_value, batch_indices, positions, kv_indices, kv_indptr, *caches)
  return out[0] if info.combined else (out[0], out[1])


def stack_page_tables(tables: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-request-shard page tables `(kv_indptr, kv_indices, kv_last_page_len)` as the
  [dp, ...] arrays a sharded append takes: every shard's batch padded with empty requests
  to the largest, its page ids padded to the longest list (entries past its indptr's end,
  which no row addresses)."""
  tables = [tuple(planning.as_host_int32(a, n) for a, n in
                  zip(t, ("kv_indptr", "kv_indices", "kv_last_page_len"))) for t in tables]
  if not tables or any(len(t[0]) < 1 for t in tables):
    raise ValueError("stack_page_tables needs one page table per shard, each kv_indptr "
                     "with at least one entry")
  batch = max(len(t[0]) - 1 for t in tables)
  pages = max(len(t[1]) for t in tables)
  indptr = np.stack([np.pad(t[0], (0, batch + 1 - len(t[0])), mode="edge") for t in tables])
  indices = np.stack([np.pad(t[1], (0, pages - len(t[1]))) for t in tables])
  last = np.stack([np.pad(t[2], (0, batch - len(t[2]))) for t in tables])
  return indptr, indices, last
