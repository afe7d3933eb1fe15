"""Attention over the paged cache, two ways, plus the dense attention of the check.

A step's rows come in two parts (see engine.py): prefill chunks, several rows per
request and causal, and decode rows, one per request. A backend answers both from the
per-part arrays the engine builds:

  qo_indptr [R+1]   rows of each request in the part (padded by repeating the end)
  kv_indptr [R+1], kv_indices [num_pages], kv_last_page_len [R]   the page table
  seq_lens [R]      each request's cache length after this step's append
  plan              the library's Plan for the part (LibraryAttention only)

LibraryAttention runs jax_pagedattn's wrappers; JnpPagedAttention gathers each
request's pages into a dense [keys, heads, dim] block and runs masked jax.numpy
attention, the baseline `--attention reference` measures against.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

import jax_pagedattn as jpa


class LibraryAttention:
  """jax_pagedattn's decode and prefill wrappers, planned on the host every step."""

  name = "jax_pagedattn"

  def __init__(self, *, num_qo_heads, num_kv_heads, head_dim, page_size, num_pages,
               max_batch, max_prefill_requests, max_prefill_tokens, dtype, shards=None):
    """With `shards` (heads split over devices) the head counts are one device's
    (`sharding.heads_per_shard`): a plan is made once for them and replicated."""
    self.shards = shards
    # Capacities are fixed up front, so every plan has the same static config and a
    # jitted step compiles once per shape bucket, never per plan.
    self.decode_wrapper = jpa.BatchDecodeWithPagedKVCacheWrapper(
        kv_layout="NHD", max_batch_size=max_batch, max_num_pages=num_pages)
    self.prefill_wrapper = jpa.BatchPrefillWithPagedKVCacheWrapper(
        kv_layout="NHD", max_batch_size=max_prefill_requests, max_num_pages=num_pages,
        max_num_tokens=max_prefill_tokens)
    self._heads = dict(num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       page_size=page_size, pos_encoding_mode="NONE", q_data_type=dtype)

  def plan_prefill(self, qo_indptr, kv_indptr, kv_indices, kv_last_page_len):
    """Host arrays of the live requests only (no padding); returns the Plan."""
    return self._placed(self.prefill_wrapper.plan(qo_indptr, kv_indptr, kv_indices,
                                                  kv_last_page_len, causal=True, **self._heads))

  def plan_decode(self, kv_indptr, kv_indices, kv_last_page_len):
    return self._placed(self.decode_wrapper.plan(kv_indptr, kv_indices, kv_last_page_len,
                                                 **self._heads))

  def _placed(self, plan):
    # A ShardedPlan makes run() call the kernels per device on its heads (shard_map).
    return plan if self.shards is None else jpa.sharding.shard_plan(plan, self.shards)

  def prefill(self, q, cache, part):
    return self.prefill_wrapper.run(q, cache, plan=part["plan"])

  def decode(self, q, cache, part):
    return self.decode_wrapper.run(q, cache, plan=part["plan"])


class JnpPagedAttention:
  """Dense jax.numpy attention over gathered pages: no plans, no custom calls.

  Every request is gathered to `max_pages` pages (the longest context the run allows),
  so its cost follows the context limit, not each request's length.
  """

  name = "jnp reference"

  def __init__(self, *, page_size: int, max_pages: int, head_dim: int):
    self.page_size, self.max_pages = page_size, max_pages
    self.sm_scale = 1.0 / math.sqrt(head_dim)

  def plan_prefill(self, *args):
    return None

  def plan_decode(self, *args):
    return None

  def _gather(self, cache, part):
    """k, v [R, max_pages * page_size, Hkv, D] of each request in the part."""
    starts = part["kv_indptr"][:-1]
    counts = part["kv_indptr"][1:] - starts
    slot = jnp.arange(self.max_pages)
    entry = jnp.clip(starts[:, None] + slot, 0, part["kv_indices"].shape[0] - 1)
    pages = jnp.where(slot < counts[:, None], part["kv_indices"][entry], 0)
    kv = cache[pages]  # [R, max_pages, 2, page_size, Hkv, D]
    r, _, _, _, hkv, d = kv.shape
    k = kv[:, :, 0].reshape(r, -1, hkv, d)
    v = kv[:, :, 1].reshape(r, -1, hkv, d)
    return k, v

  def decode(self, q, cache, part):
    k, v = self._gather(cache, part)
    keys = jnp.arange(k.shape[1])
    mask = keys[None, None, :] < part["seq_lens"][:, None, None]  # [B, 1, K]
    return masked_attention(q[:, None], k, v, mask, self.sm_scale)[:, 0]

  def prefill(self, q, cache, part):
    k, v = self._gather(cache, part)
    qo_indptr, seq_lens = part["qo_indptr"], part["seq_lens"]
    rows = q.shape[0]
    row = jnp.arange(rows)
    keys = jnp.arange(k.shape[1])
    owner = jnp.searchsorted(qo_indptr, row, side="right") - 1
    padded_q = jnp.concatenate([q, jnp.zeros_like(q)])  # slices below never clamp
    out = jnp.zeros_like(q)
    # One request at a time: all requests' keys against all rows would be R times the
    # memory. Each pass takes `rows` rows starting at the request's first one.
    for b in range(seq_lens.shape[0]):
      start = qo_indptr[b]
      qo_len = qo_indptr[b + 1] - start
      local = jnp.arange(rows)
      visible = ((local[:, None] < qo_len)
                 & (keys[None, :] <= seq_lens[b] - qo_len + local[:, None]))
      qb = jax.lax.dynamic_slice_in_dim(padded_q, start, rows)
      ob = masked_attention(qb[None], k[b:b + 1], v[b:b + 1], visible[None], self.sm_scale)[0]
      mine = (owner == b) & (row < qo_indptr[-1])
      out = jnp.where(mine[:, None, None], ob[jnp.clip(row - start, 0, rows - 1)], out)
    return out


def masked_attention(q, k, v, mask, sm_scale):
  """q [B, T, Hq, D], k/v [B, K, Hkv, D], mask [B, T, K] -> [B, T, Hq, D] in q's dtype.

  GQA without repeating k/v: q head h reads kv head h // (Hq / Hkv). Logits and
  softmax in float32; a row that sees no key gives zeros, not NaN.
  """
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, t, hkv, hq // hkv, d)
  logits = jnp.einsum("btkgd,bskd->btkgs", qg, k, preferred_element_type=jnp.float32) * sm_scale
  mask = mask[:, :, None, None, :]
  top = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weights = jnp.where(mask, jnp.exp(logits - top), 0.0)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  weights = weights / jnp.where(total > 0, total, 1.0)
  out = jnp.einsum("btkgs,bskd->btkgd", weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, t, hq, d).astype(q.dtype)


def dense_causal_attention(q, k, v, cache):
  """Plain causal attention over one sequence's own rows (the check's model): no cache,
  no pages. Padding rows at the end never reach earlier rows under the causal mask."""
  t = q.shape[0]
  causal = np.tril(np.ones((t, t), bool))
  out = masked_attention(q[None], k[None], v[None], jnp.asarray(causal)[None],
                         1.0 / math.sqrt(q.shape[-1]))
  return out[0], cache
