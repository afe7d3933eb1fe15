"""Merging attention states, and cascade attention over shared prefixes (FlashInfer's
`flashinfer.cascade`, in JAX).

An attention *state* is a partial result over one segment of a row's keys: the
normalised output `v` and its log-sum-exp `s` in **base 2** (`log2 sum exp2` of the
scaled logits), which is what every op of this package returns with `return_lse=True`.
Two states over disjoint key segments combine exactly into the state over their union:
with `m = max(s_i)` and `w_i = exp2(s_i - m)`,

    v = sum_i w_i v_i / sum_i w_i,    s = m + log2(sum_i w_i).

A state over no keys (`s = -inf`, as a request without keys returns) has weight 0: its
`v` is never read, merging it leaves the other state as it was, and merging only such
states gives `v = 0`, `s = -inf`.

The merges are jax.numpy, not a kernel: elementwise work over [rows, heads, head_dim]
and a sum over a handful of states, which XLA fuses into a few loops (the CPU backend
keeps the weighted states as one float32 intermediate). A cascade's merge touches
`levels x tokens x heads x head_dim` values, far fewer than the keys its attention
reads, so a hand-written kernel would have little to save.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_pagedattn._wrapper import workspace_bytes_of
from jax_pagedattn.planning import Plan
from jax_pagedattn.prefill import BatchPrefillWithPagedKVCacheWrapper

__all__ = ["MultiLevelCascadeAttentionWrapper", "merge_state", "merge_state_in_place",
           "merge_states"]

_V_DTYPES = ("float16", "bfloat16", "float32")


# ------------------------------------------------------------------- merging states


def merge_state(v_a, s_a, v_b, s_b):
  """The state over the keys of segments A and B together, from the states of each.

  Args:
    v_a, v_b: attention outputs `[seq_len, num_heads, head_dim]`, float16, bfloat16 or
      float32, the same dtype.
    s_a, s_b: their log-sum-exp `[seq_len, num_heads]` in base 2 (as `run(...,
      return_lse=True)` returns it); any float dtype, taken as float32.

  Returns:
    `(v, s)`: `v` in v_a's dtype, `s` float32 base 2; equal to attention over the keys
    of A and B concatenated. A row with `s = -inf` on one side (no keys there) comes back
    as the other side's row, unchanged; `-inf` on both gives `v = 0`, `s = -inf`.
  """
  _check_state(v_a, s_a, "v_a", "s_a", rank=3)
  _check_state(v_b, s_b, "v_b", "s_b", rank=3)
  _check_same(v_a, v_b, "v_a", "v_b")
  return _merge_states(jnp.stack([v_a, v_b], axis=1),
                       jnp.stack([_as_f32(s_a), _as_f32(s_b)], axis=1))


def merge_state_in_place(v, s, v_other, s_other, mask=None):
  """Merges `(v_other, s_other)` into `(v, s)`; returns the new `(v, s)`.

  FlashInfer updates `v` and `s` in place. JAX arrays are immutable, so this returns the
  merged pair and leaves the arguments alone; under `jax.jit` with `v` and `s` donated
  (`donate_argnums`) XLA writes the result into their buffers instead (the results have
  their shapes and dtypes when `s` is float32), which is the in-place update.

  Args:
    v, v_other: `[seq_len, num_heads, head_dim]`, one dtype (float16, bfloat16, float32).
    s, s_other: `[seq_len, num_heads]`, base 2 (taken as float32).
    mask: optional bool `[seq_len]`; rows where it is False keep `v` and `s` as they
      were (the merge for all rows, as in FlashInfer, when None).

  Returns:
    `(v, s)`: `v` in its dtype, `s` float32 base 2.
  """
  _check_state(v, s, "v", "s", rank=3)
  _check_state(v_other, s_other, "v_other", "s_other", rank=3)
  _check_same(v, v_other, "v", "v_other")
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_ or mask.shape != (v.shape[0],):
      raise ValueError(f"mask must be bool [seq_len] = [{v.shape[0]}], got "
                       f"{mask.dtype}{list(mask.shape)}")
  return _merge_into(v, _as_f32(s), v_other, _as_f32(s_other), mask)


def merge_states(v, s):
  """The state over all segments of each row, from the state of each segment.

  Args:
    v: `[seq_len, num_states, num_heads, head_dim]`, float16, bfloat16 or float32.
    s: `[seq_len, num_states, num_heads]`, base 2 (taken as float32).

  Returns:
    `(v, s)`: `v [seq_len, num_heads, head_dim]` in v's dtype, `s [seq_len, num_heads]`
    float32 base 2. States with `s = -inf` count for nothing; a row whose states all have
    `-inf` (or that has none, `num_states == 0`) gives `v = 0`, `s = -inf`.
  """
  _check_state(v, s, "v", "s", rank=4)
  return _merge_states(v, _as_f32(s))


@jax.jit
def _merge_states(v, s):
  """merge_states on checked arrays (`s` float32), states on axis 1. The one place that
  says how states combine; jitted so that an eager call is one dispatch."""
  if v.shape[1] == 0:
    return (jnp.zeros(v.shape[:1] + v.shape[2:], v.dtype),
            jnp.full(s.shape[:1] + s.shape[2:], -jnp.inf, jnp.float32))
  m = jnp.max(s, axis=1, keepdims=True)
  # Where every state is empty, m is -inf; any finite stand-in keeps the weights 0.
  w = jnp.exp2(s - jnp.where(jnp.isneginf(m), 0.0, m))
  # An empty state's v is not read at all: 0 * inf or 0 * NaN would otherwise leak in.
  wv = jnp.where((w > 0)[..., None], w[..., None] * v.astype(jnp.float32), 0.0)
  total = jnp.sum(w, axis=1)
  nonempty = total > 0
  out = jnp.sum(wv, axis=1) / jnp.where(nonempty, total, 1.0)[..., None]
  lse = jnp.where(nonempty, m[:, 0] + jnp.log2(jnp.where(nonempty, total, 1.0)), -jnp.inf)
  return out.astype(v.dtype), lse


@jax.jit
def _merge_into(v, s, v_other, s_other, mask):
  merged_v, merged_s = _merge_states(jnp.stack([v, v_other], axis=1),
                                     jnp.stack([s, s_other], axis=1))
  if mask is None:
    return merged_v, merged_s
  return (jnp.where(mask[:, None, None], merged_v, v), jnp.where(mask[:, None], merged_s, s))


def _as_f32(s):
  return s if s.dtype == jnp.float32 else s.astype(jnp.float32)


def _check_state(v, s, v_name: str, s_name: str, *, rank: int):
  """Shape and dtype rules of a state (rank 3: one state per row; rank 4: a states axis)."""
  for x, name in ((v, v_name), (s, s_name)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  layout = ("[seq_len, num_heads, head_dim]" if rank == 3
            else "[seq_len, num_states, num_heads, head_dim]")
  if len(v.shape) != rank:
    raise ValueError(f"{v_name} must be {layout}, got shape {tuple(v.shape)}")
  if jnp.dtype(v.dtype).name not in _V_DTYPES:
    raise TypeError(f"{v_name} must be float16, bfloat16 or float32, got {jnp.dtype(v.dtype)}")
  if tuple(s.shape) != tuple(v.shape[:-1]):
    raise ValueError(f"{s_name} must have {v_name}'s shape without head_dim, "
                     f"{tuple(v.shape[:-1])}, got {tuple(s.shape)}")
  if not jnp.issubdtype(s.dtype, jnp.floating):
    raise TypeError(f"{s_name} must be a float array (the base-2 LSE), got {jnp.dtype(s.dtype)}")


def _check_same(v, v_other, name: str, other: str):
  if tuple(v.shape) != tuple(v_other.shape):
    raise ValueError(f"{name} and {other} must have one shape, got {tuple(v.shape)} and "
                     f"{tuple(v_other.shape)}")
  if v.dtype != v_other.dtype:
    raise TypeError(f"{name} and {other} must have one dtype, got {jnp.dtype(v.dtype)} and "
                    f"{jnp.dtype(v_other.dtype)}")


# ------------------------------------------------------------------ cascade attention


class MultiLevelCascadeAttentionWrapper:
  """Cascade attention over a paged cache whose requests share prefixes (FlashInfer's
  `MultiLevelCascadeAttentionWrapper`, in JAX).

  Each level is a `BatchPrefillWithPagedKVCacheWrapper` plan over the same query tokens,
  grouped differently: level 0 typically holds the prefix shared by many requests (one
  group of all their query tokens against its pages, so those pages are read once, not
  once per request), later levels narrower groups, the last level each request's own
  keys. `run()` attends every level with its LSE and merges the levels with
  `merge_states`; where the levels split each request's keys into disjoint segments, the
  result is attention over the keys of all levels concatenated.

  Every level shares one cache (a unified page table), as in FlashInfer.

  Args:
    num_levels: number of levels (>= 1).
    workspace_size: bytes of split-KV partials each level's call may use at most, or
      FlashInfer's `float_workspace_buffer` (its size is taken). XLA allocates each
      level's workspace per call.
    kv_layout: "NHD" or "HND".
    max_batch_size, max_num_pages, max_num_tokens: capacities of each level's plan:
      None (fixed by the first plan(), rounded up to a power of two), one int for every
      level, or a sequence of one value per level (a shared-prefix level has few groups).
  """

  def __init__(self, num_levels: int, workspace_size=128 * 1024 * 1024,
               kv_layout: str = "NHD", max_batch_size=None, max_num_pages=None,
               max_num_tokens=None):
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
      raise ValueError(f"num_levels must be an int >= 1, got {num_levels!r}")
    workspace = workspace_bytes_of(workspace_size, "float_workspace_buffer")
    caps = [_per_level(value, name, num_levels) for value, name in (
        (max_batch_size, "max_batch_size"), (max_num_pages, "max_num_pages"),
        (max_num_tokens, "max_num_tokens"))]
    self._levels = tuple(
        BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout, max_batch_size=b,
                                            max_num_pages=p, max_num_tokens=t)
        for b, p, t in zip(*caps))
    self._plans = None

  @property
  def num_levels(self) -> int:
    return len(self._levels)

  @property
  def kv_layout(self) -> str:
    return self._levels[0].kv_layout

  @property
  def last_plans(self):
    """The per-level plans of the last plan() (None before the first)."""
    return self._plans

  def plan(self, qo_indptr_arr, paged_kv_indptr_arr, paged_kv_indices_arr,
           paged_kv_last_page_len, num_qo_heads: int, num_kv_heads: int, head_dim: int,
           page_size: int, causal: bool = False, pos_encoding_mode: str = "NONE",
           sm_scale=None, rope_scale=None, rope_theta=None, q_data_type="float16",
           kv_data_type=None, **prefill_options):
    """Plans every level on the host; returns the tuple of per-level `Plan`s (also kept
    for `run`), a pytree that a jitted step takes as `run(..., plans=)`.

    Each `*_arr` argument holds one array per level, as the prefill wrapper's `plan()`
    takes them: level `i` has groups `qo_indptr_arr[i]` of the query tokens (all levels
    cover the same tokens: every `qo_indptr_arr[i][-1]` is equal) and the page table
    `paged_kv_indptr_arr[i]`, `paged_kv_indices_arr[i]`, `paged_kv_last_page_len[i]`.

    `causal` applies to the last level only; earlier levels are planned non-causal, as
    FlashInfer 0.7 does (cascade.py plans level `i` with `causal if i == num_levels - 1
    else False`): every query token follows all of its shared prefixes. Masks are
    bottom-right aligned within a level, so the cascade equals causal attention over
    the concatenated keys when each request's query tokens are the last of its
    last-level keys (last-level kv_len >= qo_len - 1; a decode token with no keys of its
    own at the last level is fine).

    Position encodings inside the attention (`ROPE_LLAMA`, `ALIBI`) are applied per
    level, with positions counted within that level's keys, as FlashInfer does; the
    cascade then differs from attention over the concatenated keys. Serving code that
    rotates q and k before the cache (`pos_encoding_mode="NONE"`) is unaffected.

    Further keyword arguments go to every level's
    `BatchPrefillWithPagedKVCacheWrapper.plan()`.
    """
    arrays = dict(qo_indptr_arr=qo_indptr_arr, paged_kv_indptr_arr=paged_kv_indptr_arr,
                  paged_kv_indices_arr=paged_kv_indices_arr,
                  paged_kv_last_page_len=paged_kv_last_page_len)
    for name, value in arrays.items():
      if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of {self.num_levels} arrays (one per "
                        f"level), got {type(value).__name__}")
      if len(value) != self.num_levels:
        raise ValueError(f"{name} must hold one array per level ({self.num_levels}), got "
                         f"{len(value)}")
    totals = [_last_entry(x) for x in qo_indptr_arr]
    if len(set(totals)) > 1:
      raise ValueError(f"qo_indptr_arr: every level must cover the same query tokens "
                       f"(equal qo_indptr[-1]), got {totals}")
    last = self.num_levels - 1
    plans = tuple(
        level.plan(qo, indptr, indices, last_len, num_qo_heads, num_kv_heads, head_dim,
                   page_size, causal=bool(causal) and i == last,
                   pos_encoding_mode=pos_encoding_mode, sm_scale=sm_scale,
                   rope_scale=rope_scale, rope_theta=rope_theta, q_data_type=q_data_type,
                   kv_data_type=kv_data_type, **prefill_options)
        for i, (level, qo, indptr, indices, last_len) in enumerate(zip(
            self._levels, qo_indptr_arr, paged_kv_indptr_arr, paged_kv_indices_arr,
            paged_kv_last_page_len)))
    self._plans = plans
    return plans

  begin_forward = plan

  def run(self, q, paged_kv_cache, return_lse: bool = False, plans=None):
    """Cascade attention: q `[tokens, num_qo_heads, head_dim]` -> out like q.

    With `return_lse`, also the LSE `[tokens, num_qo_heads]` float32, base 2, over the
    keys of every level (FlashInfer's run() returns the output alone). Inside `jax.jit`
    pass `plans` (the tuple plan() returned); a new tuple of plans with the same
    capacities reuses the compiled step. As with the prefill wrapper, q may then have
    more rows than the plans' tokens (they come back 0, LSE -inf), never fewer.
    """
    if plans is None:
      if self._plans is None:
        raise RuntimeError("run() called before plan(): call plan() first or pass plans=")
      # Each level runs its own kept plan: the eager checks of q and the cache apply.
      levels = [level.run(q, paged_kv_cache, return_lse=True) for level in self._levels]
    else:
      if isinstance(plans, Plan) or not isinstance(plans, Sequence):
        raise TypeError(f"plans must be the tuple of {self.num_levels} Plans that plan() "
                        f"returns, got {type(plans).__name__}")
      if len(plans) != self.num_levels:
        raise ValueError(f"plans must hold one Plan per level ({self.num_levels}), got "
                         f"{len(plans)}")
      levels = [level.run(q, paged_kv_cache, return_lse=True, plan=p)
                for level, p in zip(self._levels, plans)]
    if len(levels) == 1:
      out, lse = levels[0]
    else:
      out, lse = _merge_states(jnp.stack([o for o, _ in levels], axis=1),
                               jnp.stack([s for _, s in levels], axis=1))
    return (out, lse) if return_lse else out

  forward = run


def _per_level(value, name: str, num_levels: int) -> tuple:
  """A capacity given once for all levels, or one per level, as a tuple per level."""
  if value is None or isinstance(value, int):
    return (value,) * num_levels
  values = tuple(value)
  if len(values) != num_levels:
    raise ValueError(f"{name} must be one int or one value per level ({num_levels}), got "
                     f"{len(values)} values")
  return values


def _last_entry(indptr) -> int:
  """Query tokens a level's qo_indptr covers (its last entry; 0 when empty)."""
  flat = np.asarray(indptr).reshape(-1)
  return int(flat[-1]) if flat.size else 0
