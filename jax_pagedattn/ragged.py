"""BatchPrefillWithRaggedKVCacheWrapper: prefill over contiguous (ragged) K/V, FlashInfer's API.

Ragged K/V is every request's keys and values packed one after the other, without
padding: request `b` owns rows `kv_indptr[b] .. kv_indptr[b+1]-1` of `k` and `v`
(FlashInfer's "ragged tensor"). SGLang attends a request's new tokens this way, before
they are in the paged cache, and merges the result with a paged prefill over the cached
prefix (`merge_state`).

Nothing here is a new kernel. `k [nnz_kv, Hkv, D]` is, byte for byte, an NHD paged cache
with page size 1 (`k[:, None]`: `[nnz_kv, 1, Hkv, D]`, a free reshape), whose page table
is the identity: request `b` owns pages `kv_indptr[b] .. kv_indptr[b+1]-1` in order, each
holding one key (last page length 1; 0 for a request without keys). FlashInfer's own
ragged planner runs its paged scheduler with page size 1 the same way. So `plan()` is the
paged prefill plan of that table (kv_indices = 0, 1, ..., built on the host) and `run()`
is the paged prefill op: every backend and every feature of the paged prefill (causal,
GQA, RoPE/ALiBi, return_lse, soft-cap, window_left, sinks, fixed splits) applies as is.

Costs of that choice: the plan carries the identity page table, 4 bytes per key of the
key capacity (docs/CONTRACT.md, "Ragged K/V"), and kv_layout="HND" (FlashInfer's
`[Hkv, nnz_kv, D]`) is not a page-size-1 cache in memory, so `run()` transposes K and V
to NHD first (one XLA copy of each); NHD is the zero-copy layout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_pagedattn import layout as layout_lib
from jax_pagedattn import planning
from jax_pagedattn.prefill import BatchPrefillWithPagedKVCacheWrapper


@dataclasses.dataclass(frozen=True)
class _RaggedPlan:
  """The wrapper's last plan with its key count (what an eager run() checks k against)."""

  plan: planning.Plan
  num_keys: int


class BatchPrefillWithRaggedKVCacheWrapper:
  """Batched prefill / append attention over ragged (contiguous) K/V (FlashInfer's API).

  Args:
    workspace_size: bytes the split-KV partial outputs may use at most, or FlashInfer's
      `float_workspace_buffer` (its size in bytes is taken).
    kv_layout: how `run()` receives k and v: "NHD" `[nnz_kv, num_kv_heads, head_dim]`
      or "HND" `[num_kv_heads, nnz_kv, head_dim]`, as FlashInfer reads them (its ragged
      kernels take the head and row strides from kv_layout). HND costs a transpose of K
      and V per run(); NHD none.
    max_batch_size, max_num_kv_tokens, max_num_tokens: capacities (requests, keys
      `kv_indptr[-1]`, query tokens `qo_indptr[-1]`); None fixes each at the first
      plan() (rounded up to a power of two) and keeps it, so plans of later batches
      within them run in one compiled step.
  """

  def __init__(self, workspace_size=128 * 1024 * 1024, kv_layout: str = "NHD",
               max_batch_size: int | None = None, max_num_kv_tokens: int | None = None,
               max_num_tokens: int | None = None):
    self._kv_layout = layout_lib.check_kv_layout(kv_layout)
    if max_num_kv_tokens is not None and max_num_kv_tokens < 1:
      raise ValueError(f"max_num_kv_tokens must be >= 1, got {max_num_kv_tokens}")
    # The plans are page-size-1 NHD plans whatever kv_layout says: run() hands the
    # paged wrapper K/V as NHD pages of one key.
    self._paged = BatchPrefillWithPagedKVCacheWrapper(
        workspace_size, "NHD", max_batch_size=max_batch_size, max_num_pages=max_num_kv_tokens,
        max_num_tokens=max_num_tokens)
    self._max_num_kv_tokens = max_num_kv_tokens
    self._identity = np.zeros((0,), np.int32)  # 0, 1, 2, ...: sliced for every plan
    self._last = None  # _RaggedPlan

  @property
  def kv_layout(self) -> str:
    return self._kv_layout

  @property
  def last_plan(self):
    return None if self._last is None else self._last.plan

  def plan(self, qo_indptr, kv_indptr, num_qo_heads: int, num_kv_heads: int,
           head_dim_qk: int, head_dim_vo: int | None = None, *, causal: bool = False,
           pos_encoding_mode: str = "NONE", window_left: int = -1, logits_soft_cap=None,
           sm_scale=None, rope_scale=None, rope_theta=None, q_data_type="float16",
           kv_data_type=None, fixed_split_size: int | None = None,
           disable_split_kv: bool = False):
    """Plans a ragged prefill batch on the host; returns the `Plan` (also kept for `run`).

    qo_indptr, kv_indptr: int32 [batch+1] offsets of each request's query tokens and of
    its rows of k / v. Arguments after head_dim_vo are keyword-only (FlashInfer's
    positions there hold custom masks, which this library does not have); their meaning
    is that of the paged prefill wrapper's plan(): causal masks are bottom-right aligned
    (query i of a request with qo_len queries and kv_len keys sees keys j <= kv_len -
    qo_len + i), RoPE / ALiBi positions count the request's keys from 0,
    `window_left` and `logits_soft_cap` as there. `fixed_split_size` is in pages as in
    FlashInfer, and a ragged page holds one key, so it counts keys (FlashInfer's ragged
    planner also uses page size 1). `head_dim_vo` must equal head_dim_qk (or be None).
    """
    if head_dim_vo is not None and head_dim_vo != head_dim_qk:
      raise ValueError(f"head_dim_vo ({head_dim_vo}) must equal head_dim_qk ({head_dim_qk}) "
                       f"or be None: values and keys share one head_dim here")
    kv_indptr = planning.as_host_int32(kv_indptr, "kv_indptr")
    num_keys = max(int(kv_indptr[-1]), 0) if kv_indptr.size else 0
    cap = self._key_capacity()
    if cap is not None and num_keys > cap:
      raise ValueError(f"kv_indptr[-1] = {num_keys} keys exceed max_num_kv_tokens = {cap}, "
                       f"the key capacity fixed by the first plan; create the wrapper with a "
                       f"larger max_num_kv_tokens")
    # Page size 1: a non-empty request's last page holds one key; an empty one has none.
    last_page_len = np.clip(np.diff(kv_indptr), 0, 1).astype(np.int32)
    try:
      plan = self._paged.plan(
          qo_indptr, kv_indptr, self._identity_pages(num_keys), last_page_len, num_qo_heads,
          num_kv_heads, head_dim_qk, 1, causal=causal, pos_encoding_mode=pos_encoding_mode,
          sm_scale=sm_scale, rope_scale=rope_scale, rope_theta=rope_theta,
          q_data_type=q_data_type, kv_data_type=kv_data_type, window_left=window_left,
          logits_soft_cap=logits_soft_cap, fixed_split_size=fixed_split_size,
          disable_split_kv=disable_split_kv)
    except ValueError as e:
      # The planner checks kv_indptr (start, order, length) under the paged name; the
      # caller passed it as kv_indptr.
      raise ValueError(str(e).replace("paged_kv_indptr", "kv_indptr")) from None
    self._last = _RaggedPlan(plan, num_keys)
    return plan

  def run(self, q, k, v, return_lse: bool = False, plan=None, sinks=None, k_scale=None,
          v_scale=None):
    """Prefill attention over ragged K/V: q [tokens, num_qo_heads, head_dim] -> out like q.

    k, v: `[nnz_kv, num_kv_heads, head_dim]` (NHD) or `[num_kv_heads, nnz_kv, head_dim]`
    (HND), one dtype, the plan's kv_data_type. With return_lse, also lse [tokens,
    num_qo_heads] float32, base 2 (a request without keys gives 0 and -inf, or the
    sink's logit in base 2 with sinks). `sinks`: float32 [num_qo_heads] attention-sink
    logits, as in BatchAttentionWithAttentionSinkWrapper. `k_scale` / `v_scale`: the
    dequantisation scales, as in the paged wrappers' run().

    Outside jit k and v have exactly kv_indptr[-1] rows, as in FlashInfer. Inside
    jax.jit, with `plan=` passed in, they may have more (padding rows, never read; pad
    them to the key capacity to compile once for every batch within it), as q may have
    more rows than qo_indptr[-1] (up to max_num_tokens; those rows come back 0 with lse
    -inf). Never fewer: jit cannot see the plan's counts, so keys past the last row are
    treated as masked, and the results are wrong (never a read outside k and v).
    """
    own = self._last
    if plan is None:
      if own is None:
        raise RuntimeError("run() called before plan(): call plan() first or pass plan=")
      plan = own.plan
    _check_ragged_plan(plan)
    rows = self._check_kv(k, v, plan.config)
    num_keys = own.num_keys if own is not None and plan is own.plan else _host_num_keys(plan)
    if num_keys is not None:
      traced = isinstance(k, jax.core.Tracer) or isinstance(v, jax.core.Tracer)
      if not traced and rows != num_keys:
        raise ValueError(f"k and v have {rows} rows but the plan has kv_indptr[-1] = "
                         f"{num_keys} keys (outside jit they must be equal)")
      if rows < num_keys:
        raise ValueError(f"k and v have {rows} rows, fewer than the plan's kv_indptr[-1] = "
                         f"{num_keys} keys")
    if self._kv_layout == "HND":
      k, v = jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)
    # [rows, Hkv, D] -> [rows, 1, Hkv, D]: NHD pages of one key, the same bytes.
    return self._paged.run(q, (k[:, None], v[:, None]), return_lse=return_lse, plan=plan,
                           sinks=sinks, k_scale=k_scale, v_scale=v_scale)

  forward = run

  def _key_capacity(self) -> int | None:
    """Keys a plan may hold: the given max_num_kv_tokens, else the page capacity the
    first plan fixed (None before it)."""
    if self._max_num_kv_tokens is not None:
      return int(self._max_num_kv_tokens)
    return None if self._last is None else self._last.plan.config.caps.pages

  def _identity_pages(self, num_keys: int) -> np.ndarray:
    """0 .. num_keys-1 as int32: a read-only view of one array grown on demand (plan()
    runs every step; the planner copies the pages into the plan buffer)."""
    if self._identity.shape[0] < num_keys:
      self._identity = np.arange(planning.next_pow2(num_keys, 16), dtype=np.int32)
      self._identity.setflags(write=False)
    return self._identity[:num_keys]

  def _check_kv(self, k, v, config: planning.PlanConfig) -> int:
    """Rows of k and v (keys, in either layout); raises ValueError / TypeError naming k
    or v for a shape or dtype the plan cannot take."""
    layout = "[nnz_kv, num_kv_heads, head_dim]" if self._kv_layout == "NHD" else \
        "[num_kv_heads, nnz_kv, head_dim]"
    for x, name in ((k, "k"), (v, "v")):
      if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
      if len(x.shape) != 3:
        raise ValueError(f"{name} must be 3-D {layout} (kv_layout={self._kv_layout!r}), got "
                         f"shape {tuple(x.shape)}")
    if tuple(k.shape) != tuple(v.shape):
      raise ValueError(f"k and v must have one shape {layout}, got {tuple(k.shape)} and "
                       f"{tuple(v.shape)}")
    if k.dtype != v.dtype:
      raise TypeError(f"k and v must have one dtype, got {jnp.dtype(k.dtype).name} and "
                      f"{jnp.dtype(v.dtype).name}")
    if self._kv_layout == "NHD":
      rows, heads, dim = k.shape
    else:
      heads, rows, dim = k.shape
    if heads != config.num_kv_heads:
      raise ValueError(f"k and v have {heads} kv heads ({layout}, kv_layout="
                       f"{self._kv_layout!r}) but the plan was made for num_kv_heads="
                       f"{config.num_kv_heads}")
    if dim != config.head_dim:
      raise ValueError(f"k and v have head_dim {dim} but the plan was made for head_dim_qk="
                       f"{config.head_dim}")
    if jnp.dtype(k.dtype).name != config.kv_dtype:
      raise TypeError(f"k and v have dtype {jnp.dtype(k.dtype).name} but the plan was made "
                      f"for kv_data_type={config.kv_dtype}")
    return int(rows)


def _check_ragged_plan(plan) -> None:
  """A ragged plan is a page-size-1 NHD prefill plan of one device (what plan() makes)."""
  if not isinstance(plan, planning.Plan):
    raise TypeError(f"plan must be a jax_pagedattn.Plan, got {type(plan).__name__}")
  if getattr(plan, "shards", None) is not None:
    raise TypeError("plan is a sharded plan: ragged prefill runs on one device's plans only")
  c = plan.config
  if c.wrapper != "prefill" or c.page_size != 1 or c.kv_layout != "NHD":
    raise ValueError(f"plan was not made by a ragged wrapper's plan() (a {c.wrapper} plan with "
                     f"page_size={c.page_size}, kv_layout={c.kv_layout!r}; a ragged plan is a "
                     f"prefill plan with page_size=1 and kv_layout='NHD')")


def _host_num_keys(plan: planning.Plan) -> int | None:
  """kv_indptr[-1] of a plan whose buffer is on the host (plan() returns it there), read
  from its kv_indptr section; None for a device or traced buffer (reading it would wait
  for the device, or cannot be done)."""
  if not isinstance(plan.buffer, np.ndarray):
    return None
  offset, length = planning.plan_sections(plan.config.caps)["kv_indptr"]
  return int(plan.buffer[offset + length - 1])
