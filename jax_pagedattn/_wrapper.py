"""What the decode and prefill wrappers share: capacities, planning, running."""

from __future__ import annotations

import functools

import jax

from jax_pagedattn import layout as layout_lib
from jax_pagedattn import _C, plan_staging, planning


class PagedAttentionWrapper:
  """FlashInfer's plan/run object. `plan()` runs the host planner and returns a `Plan`
  (also kept on the wrapper); `run()` executes with the kept plan or one passed in,
  which is how a jitted step takes a new plan each call without recompiling."""

  _decode: bool  # set by subclasses

  def __init__(self, workspace_size: int, kv_layout: str, max_batch_size, max_num_pages,
               max_num_tokens, plan_staging):
    self._kv_layout = layout_lib.check_kv_layout(kv_layout)
    if workspace_size is not None and workspace_size <= 0:
      raise ValueError(f"workspace_size must be positive, got {workspace_size}")
    self._workspace_size = workspace_size
    self._fixed = dict(batch=max_batch_size, pages=max_num_pages, tokens=max_num_tokens)
    for name, value in (("max_batch_size", max_batch_size), ("max_num_pages", max_num_pages),
                        ("max_num_tokens", max_num_tokens)):
      if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    self._caps_base = None  # (batch, tokens, pages) fixed by the first plan
    self._plan = None
    self._host = None  # host facts of the last plan for eager checks
    if plan_staging not in (None, True, False):
      raise TypeError(f"plan_staging must be None, True or False, got {plan_staging!r}")
    self._plan_staging = plan_staging
    self._rings = {}  # (buffer size, device) -> PlanRing or None (staging not available)
    self._statics = {}  # plan()'s static arguments -> _derive_static's result

  @property
  def kv_layout(self) -> str:
    return self._kv_layout

  @property
  def last_plan(self):
    return self._plan

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
                 rope_theta, q_data_type, kv_data_type, target, tile_rows_for):
    names = (("indptr", "indices", "last_page_len") if self._decode else
             ("paged_kv_indptr", "paged_kv_indices", "paged_kv_last_page_len"))
    kv_indptr = planning.as_host_int32(kv_indptr, names[0])
    kv_indices = planning.as_host_int32(kv_indices, names[1])
    kv_last_page_len = planning.as_host_int32(kv_last_page_len, names[2])
    if qo_indptr is not None:
      qo_indptr = planning.as_host_int32(qo_indptr, "qo_indptr")
    batch = kv_last_page_len.shape[0]
    tokens = batch if qo_indptr is None else int(qo_indptr[-1]) if qo_indptr.size else 0
    # Everything but the index arrays is the same step after step: derived once per
    # distinct setting (plan() runs every step; its Python is most of its host time).
    key = (num_qo_heads, num_kv_heads, head_dim, page_size, causal, pos_encoding_mode, sm_scale,
           rope_scale, rope_theta, q_data_type, kv_data_type, target,
           plan_staging.current_device())
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
          target=target, tile_rows_for=tile_rows_for)
      if key is not None:
        self._statics[key] = static
    config, ring, planner_args = static
    arrays = (qo_indptr, kv_indptr, kv_indices, kv_last_page_len)
    if ring is None:
      # A host numpy buffer: a jitted step moves it with its other arguments.
      host_view = _C.plan(*arrays, *planner_args)
      plan = planning.Plan(host_view, config)
    else:
      # Written in place into a mapped host slot that the step reads as a device array.
      plan, host_view = ring.stage(
          lambda out, ticket, ack_entry: _C.plan(*arrays, *planner_args, out, ticket, ack_entry),
          lambda array: planning.Plan(array, config))
    self._plan = plan
    self._host = dict(num_tokens=tokens, num_indices=int(kv_indices.shape[0]), names=names,
                      view=host_view)
    return plan

  def _derive_static(self, batch, tokens, pages, *, num_qo_heads, num_kv_heads, head_dim,
                     page_size, causal, pos_encoding_mode, sm_scale, rope_scale, rope_theta,
                     q_data_type, kv_data_type, target, tile_rows_for):
    """(PlanConfig, plan ring or None, the planner's arguments after the index arrays)
    for one setting of plan()'s static arguments; raises on bad ones."""
    planning.check_head_config(num_qo_heads, num_kv_heads, head_dim)
    planning.check_pos_encoding(pos_encoding_mode)
    if page_size < 1:
      raise ValueError(f"page_size must be >= 1, got {page_size}")
    q_dtype = planning.canonical_dtype(q_data_type, "q_data_type")
    kv_dtype = planning.canonical_dtype(kv_data_type if kv_data_type is not None else q_data_type,
                                        "kv_data_type")
    if q_dtype != kv_dtype:
      raise TypeError(f"kv_data_type ({kv_dtype}) must equal q_data_type ({q_dtype})")
    b, t, p = self._base_capacities(batch, tokens, pages)
    group = num_qo_heads // num_kv_heads
    tile_rows = tile_rows_for(group, head_dim)
    num_ctas = planning.concurrent_ctas(target == "jax_pagedattn_prefill", q_dtype, head_dim,
                                        tile_rows)
    limit = -1
    if self._workspace_size is not None:
      limit = self._workspace_size // planning.partial_row_bytes(num_qo_heads, head_dim)
    caps = planning.derive_capacities(b, t, p, group_size=group, tile_rows=tile_rows,
                                      num_kv_heads=num_kv_heads, num_ctas=num_ctas,
                                      partial_rows_limit=limit)
    ring = self._ring(planning.plan_sections(caps)["size"])
    config = _plan_config(
        target, caps, tile_rows, int(num_qo_heads), int(num_kv_heads), int(head_dim),
        int(page_size), self._kv_layout, bool(causal), pos_encoding_mode,
        planning.default_sm_scale(head_dim, sm_scale),
        1.0 if rope_scale is None else float(rope_scale),
        1e4 if rope_theta is None else float(rope_theta), q_dtype, kv_dtype,
        ring is not None and ring.mapped)
    planner_args = planning.planner_args(
        page_size=page_size, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
        tile_rows=tile_rows, causal=causal, caps=caps, decode_names=self._decode)
    return config, ring, planner_args

  def _ring(self, size: int):
    """The wrapper's plan ring for buffers of `size` on the current default device (where
    a step will run), or None when plans stay host numpy arrays (plan_staging=False, or
    not on a GPU)."""
    if self._plan_staging is False:
      return None
    device = plan_staging.current_device()
    key = (size, device)
    if key not in self._rings:
      self._rings[key] = plan_staging.make_ring(size, device, self._plan_staging is True)
    return self._rings[key]

  def _max_page(self, plan) -> int:
    """Largest page id of the wrapper's own plan, read from its buffer's page section
    when an eager run() checks it (plan() does not pay for it every step)."""
    n = self._host["num_indices"]
    if n == 0:
      return -1
    offset = planning.plan_sections(plan.config.caps)["kv_indices"][0]
    return int(self._host["view"][offset:offset + n].max())

  def _run(self, primitive, q, paged_kv_cache, return_lse, plan):
    if plan is None:
      plan = self._plan
      if plan is None:
        raise RuntimeError("run() called before plan(): call plan() first or pass plan=")
    if not isinstance(plan, planning.Plan):
      raise TypeError(f"plan must be a jax_pagedattn.Plan, got {type(plan).__name__}")
    info = layout_lib.inspect_cache(paged_kv_cache, plan.config.kv_layout)
    if plan.config.kv_layout != self._kv_layout:
      raise ValueError(f"plan was made for kv_layout={plan.config.kv_layout!r}, this wrapper "
                       f"uses {self._kv_layout!r}")
    if plan is self._plan and not isinstance(q, jax.core.Tracer):
      # The eager FlashInfer path: host facts of this very plan are known.
      if q.shape[0] != self._host["num_tokens"]:
        want = "batch_size" if self._decode else "qo_indptr[-1]"
        raise ValueError(f"q has {q.shape[0]} rows but the plan has {want} = "
                         f"{self._host['num_tokens']} query tokens")
      max_page = self._max_page(plan)
      if max_page >= info.num_pages:
        raise ValueError(f"{self._host['names'][1]} holds page {max_page}, but "
                         f"paged_kv_cache has only {info.num_pages} pages")
    k_op, v_op = layout_lib.cache_operands(paged_kv_cache)
    out, lse, _ = primitive.bind(q, k_op, v_op, plan.buffer, config=plan.config,
                                 combined=info.combined)
    return (out, lse) if return_lse else out


@functools.lru_cache(maxsize=256)
def _plan_config(*fields) -> planning.PlanConfig:
  """One PlanConfig per distinct static configuration: plan() runs every step, and the
  same (hashable, frozen) config also makes the jit cache lookup cheap."""
  return planning.PlanConfig(*fields)
