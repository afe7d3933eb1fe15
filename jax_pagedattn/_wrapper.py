"""What the decode and prefill wrappers share: capacities, planning, running."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jax_pagedattn import layout as layout_lib
from jax_pagedattn import planning, sharding, switches


@dataclasses.dataclass
class _LastPlan:
  """The wrapper's last plan with the host facts an eager run() checks, replaced as one
  object by each plan() (so a run() never pairs one plan with another's facts)."""

  plan: planning.Plan
  num_tokens: int
  num_indices: int
  names: tuple
  device_buffer: object = None  # (device, the buffer's copy there), by the first eager run()


def workspace_bytes_of(workspace, name: str = "workspace") -> int | None:
  """Bytes of a workspace given as a size or as FlashInfer's float_workspace_buffer (any
  array: only its size is used; XLA allocates the workspace each call)."""
  if workspace is None:
    return None
  if isinstance(workspace, numbers.Integral) and not isinstance(workspace, bool):
    n = int(workspace)
  elif hasattr(workspace, "nbytes"):
    n = int(workspace.nbytes)
  elif hasattr(workspace, "shape") and hasattr(workspace, "dtype"):
    n = math.prod(workspace.shape) * int(getattr(workspace.dtype, "itemsize", 1))
  else:
    raise TypeError(f"{name} must be a size in bytes or a workspace buffer (an array), "
                    f"got {type(workspace).__name__}")
  if n <= 0:
    raise ValueError(f"{name} must hold a positive number of bytes, got {n}")
  return n


class PagedAttentionWrapper:
  """FlashInfer's plan/run object. `plan()` runs the host planner and returns a `Plan`
  (also kept on the wrapper); `run()` executes with the kept plan or one passed in,
  which is how a jitted step takes a new plan each call without recompiling."""

  _decode: bool  # set by subclasses

  def __init__(self, workspace, kv_layout: str, max_batch_size, max_num_pages,
               max_num_tokens):
    self._kv_layout = layout_lib.check_kv_layout(kv_layout)
    self._workspace_size = workspace_bytes_of(workspace, "float_workspace_buffer")
    self._fixed = dict(batch=max_batch_size, pages=max_num_pages, tokens=max_num_tokens)
    for name, value in (("max_batch_size", max_batch_size), ("max_num_pages", max_num_pages),
                        ("max_num_tokens", max_num_tokens)):
      if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    self._caps_base = None  # (batch, tokens, pages) fixed by the first plan
    self._last = None  # _LastPlan
    self._statics = {}  # plan()'s static arguments -> _derive_static's result

  @property
  def kv_layout(self) -> str:
    return self._kv_layout

  @property
  def last_plan(self):
    last = self._last
    return None if last is None else last.plan

  def _base_capacities(self, batch: int, tokens: int, pages: int):
    """Capacities fixed at the first plan (given ones, else rounded up to a power of
    two) and kept after, as FlashInfer does in its CUDA-graph mode."""
    if self._caps_base is None:
      b = self._fixed["batch"] or planning.next_pow2(batch)
      t = b if self._decode else (self._fixed["tokens"] or planning.next_pow2(tokens))
      p = self._fixed["pages"] or planning.next_pow2(pages, 16)
      self._caps_base = (b, t, p)
    return self._caps_base

  def _make_plan(self, *, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, num_qo_heads,
                 num_kv_heads, head_dim, page_size, causal, pos_encoding_mode, sm_scale, rope_scale,
                 rope_theta, q_data_type, kv_data_type, kernel, logits_soft_cap=None,
                 window_left=-1, fixed_split_size=None, disable_split_kv=False):
    names = (("indptr", "indices", "last_page_len") if self._decode else
             ("paged_kv_indptr", "paged_kv_indices", "paged_kv_last_page_len"))
    kv_indptr = planning.as_host_int32(kv_indptr, names[0])
    kv_indices = planning.as_host_int32(kv_indices, names[1])
    kv_last_page_len = planning.as_host_int32(kv_last_page_len, names[2])
    if qo_indptr is not None:
      qo_indptr = planning.as_host_int32(qo_indptr, "qo_indptr")
    batch = max(kv_indptr.shape[0] - 1, 0)
    tokens = batch if qo_indptr is None else int(qo_indptr[-1]) if qo_indptr.size else 0
    # Everything but the index arrays is the same step after step: derived once per
    # distinct setting (plan() runs every step; its Python is most of its host time).
    key = (num_qo_heads, num_kv_heads, head_dim, page_size, causal, pos_encoding_mode, sm_scale,
           rope_scale, rope_theta, q_data_type, kv_data_type, kernel, logits_soft_cap,
           window_left, fixed_split_size, disable_split_kv, switches.current())
    try:
      static = self._statics.get(key)
    except TypeError:  # an unhashable argument: derive without the memo
      key, static = None, None
    if static is None:
      static = self._derive_static(
          batch, tokens, kv_indices.shape[0], num_qo_heads=num_qo_heads,
          num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size, causal=causal,
          pos_encoding_mode=pos_encoding_mode, sm_scale=sm_scale, rope_scale=rope_scale,
          rope_theta=rope_theta, q_data_type=q_data_type, kv_data_type=kv_data_type,
          kernel=kernel, logits_soft_cap=logits_soft_cap, window_left=window_left,
          fixed_split_size=fixed_split_size, disable_split_kv=disable_split_kv)
      if key is not None:
        self._statics[key] = static
    config, spec = static
    # A new read-only host buffer: a jitted step moves it with its other arguments.
    buffer = planning.plan_host(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, spec)
    plan = planning.Plan(buffer, config)
    self._last = _LastPlan(plan, tokens, int(kv_indices.shape[0]), names)
    return plan

  def _derive_static(self, batch, tokens, pages, *, num_qo_heads, num_kv_heads, head_dim,
                     page_size, causal, pos_encoding_mode, sm_scale, rope_scale, rope_theta,
                     q_data_type, kv_data_type, kernel, logits_soft_cap, window_left,
                     fixed_split_size, disable_split_kv):
    """(PlanConfig, the planner's PlanSpec) for one setting of plan()'s static
    arguments; raises on bad ones. `kernel` names the attention kernel (its tile rows)."""
    planning.check_head_config(num_qo_heads, num_kv_heads, head_dim)
    split_pages = planning.check_fixed_split_size(fixed_split_size)
    planning.check_pos_encoding(pos_encoding_mode)
    logits_soft_cap = planning.check_logits_soft_cap(logits_soft_cap)
    window_left = planning.check_window_left(window_left)
    if page_size < 1:
      raise ValueError(f"page_size must be >= 1, got {page_size}")
    q_dtype = planning.canonical_dtype(q_data_type, "q_data_type")
    kv_dtype = planning.canonical_dtype(kv_data_type if kv_data_type is not None else q_data_type,
                                        "kv_data_type", fp8=True)
    if kv_dtype in planning.FP8_KV_DTYPES:
      if q_dtype == "float32":
        raise TypeError(f"kv_data_type={kv_dtype} needs a float16 or bfloat16 query, got "
                        f"q_data_type=float32")
    elif q_dtype != kv_dtype:
      raise TypeError(f"kv_data_type ({kv_dtype}) must equal q_data_type ({q_dtype}) unless "
                      f"it is an fp8 type (float8_e4m3fn, float8_e5m2)")
    b, t, p = self._base_capacities(batch, tokens, pages)
    group = num_qo_heads // num_kv_heads
    hopper = planning.hopper_prefill(kernel, q_dtype, kv_dtype, head_dim)
    tile_rows = planning.tile_rows(kernel, group, head_dim, hopper)
    num_ctas = planning.concurrent_ctas(kernel != "decode", q_dtype, head_dim, tile_rows, hopper)
    limit = -1
    if self._workspace_size is not None:
      limit = self._workspace_size // planning.partial_row_bytes(num_qo_heads, head_dim)
    # Fixed pieces are sized for the capacities fixed at the first plan (one query per
    # request in decode), within the workspace (the planner names what to change when a
    # batch needs more). disable_split_kv wins over fixed_split_size, as in FlashInfer.
    caps = planning.derive_capacities(b, t, p, group_size=group, tile_rows=tile_rows,
                                      num_kv_heads=num_kv_heads, num_ctas=num_ctas,
                                      partial_rows_limit=limit,
                                      fixed_split_size=-1 if disable_split_kv else split_pages,
                                      max_qo_len=1 if self._decode else t)
    sw = switches.current()
    config = _plan_config(
        target="jax_pagedattn_decode" if kernel == "decode" else "jax_pagedattn_prefill",
        caps=caps, tile_rows=tile_rows, num_qo_heads=int(num_qo_heads),
        num_kv_heads=int(num_kv_heads), head_dim=int(head_dim), page_size=int(page_size),
        kv_layout=self._kv_layout, causal=bool(causal), pos_encoding_mode=pos_encoding_mode,
        sm_scale=planning.default_sm_scale(head_dim, sm_scale),
        rope_scale=1.0 if rope_scale is None else float(rope_scale),
        rope_theta=1e4 if rope_theta is None else float(rope_theta),
        logits_soft_cap=logits_soft_cap, window_left=window_left, q_dtype=q_dtype,
        kv_dtype=kv_dtype, wrapper="decode" if self._decode else "prefill",
        sm90_rope_keys=hopper and pos_encoding_mode == "ROPE_LLAMA" and sw.sm90_rope_keys,
        **sw.plan_fields())
    spec = planning.plan_spec(page_size=page_size, group_size=group, tile_rows=tile_rows,
                              causal=causal, caps=caps, decode_names=self._decode,
                              fixed_split_size=split_pages,
                              disable_split_kv=bool(disable_split_kv), window_left=window_left,
                              longest_first=hopper and sw.sm90_drawn_tasks)
    return config, spec

  def _max_page(self, last: _LastPlan) -> int:
    """Largest page id of the wrapper's own plan, read from its buffer's page section
    when an eager run() checks it (plan() does not pay for it every step)."""
    if last.num_indices == 0:
      return -1
    offset = planning.plan_sections(last.plan.config.caps)["kv_indices"][0]
    return int(last.plan.buffer[offset:offset + last.num_indices].max())

  def _run(self, primitive, q, paged_kv_cache, return_lse, plan, sinks=None, k_scale=None,
           v_scale=None):
    last = self._last
    if plan is None:
      if last is None:
        raise RuntimeError("run() called before plan(): call plan() first or pass plan=")
      plan = last.plan
    if not isinstance(plan, planning.Plan):
      raise TypeError(f"plan must be a jax_pagedattn.Plan, got {type(plan).__name__}")
    kind = "decode" if self._decode else "prefill"
    if plan.config.wrapper != kind:
      raise ValueError(f"plan was made by a {plan.config.wrapper} wrapper; this {kind} "
                       f"wrapper's run() needs a plan from its own kind's plan()")
    info = layout_lib.inspect_cache(paged_kv_cache, plan.config.kv_layout)
    if plan.config.kv_layout != self._kv_layout:
      raise ValueError(f"plan was made for kv_layout={plan.config.kv_layout!r}, this wrapper "
                       f"uses {self._kv_layout!r}")
    buffer = plan.buffer
    if last is not None and plan is last.plan and not isinstance(q, jax.core.Tracer):
      # The eager FlashInfer path: host facts of this very plan are known, and its
      # buffer goes to the device once, however many layers run() it.
      if q.shape[0] != last.num_tokens:
        want = "batch_size" if self._decode else "qo_indptr[-1]"
        raise ValueError(f"q has {q.shape[0]} rows but the plan has {want} = "
                         f"{last.num_tokens} query tokens")
      max_page = self._max_page(last)
      if max_page >= info.num_pages:
        raise ValueError(f"{last.names[1]} holds page {max_page}, but "
                         f"paged_kv_cache has only {info.num_pages} pages")
      buffer = _eager_buffer(last, q)
    k_op, v_op = layout_lib.cache_operands(paged_kv_cache)
    sinks = _sink_operand(sinks, plan.config.num_qo_heads * _head_shards(plan))
    scales = scales_operand(k_scale, v_scale)
    out, lse, _ = sharding.bind_attention(primitive, q, k_op, v_op, buffer, sinks, scales, plan,
                                          info.combined)
    return (out, lse) if return_lse else out


def _head_shards(plan) -> int:
  """Head shards a (sharded) plan's per-shard head counts are multiplied by."""
  shards = getattr(plan, "shards", None)
  return shards.counts()[1] if shards is not None else 1


def _sink_operand(sinks, num_qo_heads: int):
  """The attention call's sinks operand: float32 [num_qo_heads], or [0] for none."""
  if sinks is None:
    return jnp.zeros((0,), jnp.float32)
  if not hasattr(sinks, "shape"):
    sinks = np.asarray(sinks)
  if tuple(sinks.shape) != (num_qo_heads,):
    raise ValueError(f"sinks must hold one logit per query head: shape ({num_qo_heads},), "
                     f"got {tuple(sinks.shape)}")
  if not jnp.issubdtype(sinks.dtype, jnp.floating):
    raise TypeError(f"sinks must be floating point (taken as float32), got {sinks.dtype}")
  return jnp.asarray(sinks, jnp.float32)



def scales_operand(k_scale, v_scale):
  """The attention call's scales operand: float32 [k_scale, v_scale] (a missing one is 1),
  or [0] when neither is given. Python floats or traced scalars."""
  if k_scale is None and v_scale is None:
    return jnp.zeros((0,), jnp.float32)
  parts = []
  for name, x in (("k_scale", k_scale), ("v_scale", v_scale)):
    if x is None:
      x = 1.0
    if hasattr(x, "shape") and tuple(x.shape) not in ((), (1,)):
      raise ValueError(f"{name} must be a scalar (a float or a 0-d array), got shape "
                       f"{tuple(x.shape)}")
    if hasattr(x, "dtype") and not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating point, got {x.dtype}")
    parts.append(jnp.asarray(x, jnp.float32).reshape(()))
  return jnp.stack(parts)


def _eager_buffer(last: _LastPlan, q):
  """The plan buffer on q's device, copied there once per plan (an eager FlashInfer loop
  runs one plan for every layer); the host buffer where q is not on one device."""
  devices = q.devices() if isinstance(q, jax.Array) else ()
  if len(devices) != 1:
    return last.plan.buffer
  device = next(iter(devices))
  if last.device_buffer is None or last.device_buffer[0] != device:
    last.device_buffer = (device, jax.device_put(last.plan.buffer, device))
  return last.device_buffer[1]


@functools.lru_cache(maxsize=256)
def _plan_config(**fields) -> planning.PlanConfig:
  """One PlanConfig per distinct static configuration: plan() runs every step, and the
  same (hashable, frozen) config also makes the jit cache lookup cheap."""
  return planning.PlanConfig(**fields)
