"""Plain ``jax.numpy`` references for paged attention and the paged-cache append.

These are the test oracle and the lowering used where no native handler exists. They
are written from the semantics in DESIGN.md §3 alone, not from the kernels: the cache
normalisation, masking, RoPE and ALiBi here are implemented independently so that a
shared misunderstanding cannot hide a kernel bug.

All attention math is float32. Every function that returns an LSE returns it in
**base 2**: ``lse = log2(sum_j exp(logit_j))`` over the scaled (and biased) logits, i.e.
the natural-log LSE divided by ``ln 2`` -- FlashInfer's convention.

Two flavours of attention:

* :func:`batch_attention` / :func:`batch_decode` -- index arrays must be concrete; a
  Python loop over requests lists each request's key addresses (page, slot) and query
  rows, then one jitted dense attention over the per-request padded batch does the
  math. Simple rather than fast; this is what tests compare against.
* :func:`batch_attention_masked` -- static shapes only, jit-able: gathers every page
  slot of the (padded) index arrays at once and masks each query to its own request's
  keys. Used as a fallback lowering; tested against :func:`batch_attention`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "alibi_slopes",
    "append_paged_kv_cache",
    "batch_attention",
    "batch_attention_masked",
    "batch_decode",
    "get_batch_indices_positions",
    "split_paged_kv_cache",
]

_POS_ENCODINGS = ("NONE", "ROPE_LLAMA", "ALIBI")
_LOG2E = 1.0 / math.log(2.0)
# HIGHEST keeps f32 dots in f32 on accelerators (TF32 would make the oracle itself
# inaccurate at the ~1e-3 level); it is a no-op on the CPU.
_PREC = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- cache


def split_paged_kv_cache(paged_kv_cache, kv_layout: str = "NHD"):
  """Returns ``(k, v)`` as ``[num_pages, page_size, num_kv_heads, head_dim]`` (NHD).

  Accepts a 5-D combined cache (``[P, 2, S, H, D]`` for NHD, ``[P, 2, H, S, D]`` for
  HND) or a ``(k, v)`` pair of 4-D arrays (``[P, S, H, D]`` / ``[P, H, S, D]``).
  """
  if kv_layout not in ("NHD", "HND"):
    raise ValueError(f"kv_layout must be 'NHD' or 'HND', got {kv_layout!r}")
  if isinstance(paged_kv_cache, (tuple, list)):
    if len(paged_kv_cache) != 2:
      raise ValueError("paged_kv_cache: a tuple cache must be (k, v)")
    k, v = (jnp.asarray(x) for x in paged_kv_cache)
    if k.ndim != 4 or k.shape != v.shape:
      raise ValueError(
          f"paged_kv_cache: (k, v) must be two 4-D arrays of one shape, got "
          f"{k.shape} and {v.shape}")
  else:
    c = jnp.asarray(paged_kv_cache)
    if c.ndim != 5 or c.shape[1] != 2:
      raise ValueError(
          f"paged_kv_cache: a combined cache must be 5-D with dim 1 == 2, got {c.shape}")
    k, v = c[:, 0], c[:, 1]
  if kv_layout == "HND":
    # [P, H, S, D] -> [P, S, H, D]
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  return k, v


# ------------------------------------------------------------ position encodings


def alibi_slopes(num_qo_heads: int) -> np.ndarray:
  """ALiBi slope per query head (float32), FlashInfer's / the ALiBi paper's rule.

  ``n`` is the largest power of two <= num_qo_heads; heads below ``n`` get the
  geometric series ``2^(-8 (h+1) / n)``, the rest interleave the series of ``2n``.
  """
  n = 1 << (int(num_qo_heads).bit_length() - 1)
  h = np.arange(num_qo_heads, dtype=np.float64)
  first = np.exp2(-8.0 * (h + 1.0) / n)
  rest = np.exp2(-4.0 * (2.0 * (h + 1.0 - n) - 1.0) / n)
  return np.where(h < n, first, rest).astype(np.float32)


def _rope(x, pos, rope_scale, rope_theta):
  """Rotate-half RoPE of ``x [..., N, H, D]`` (float32) at integer positions ``pos [..., N]``."""
  d = x.shape[-1]
  half = d // 2
  # Frequency of pair (d, d + D/2): (1 / rope_scale) * theta^(-2 d / D).
  idx = jnp.arange(half, dtype=jnp.float32)
  inv_freq = (1.0 / rope_scale) * jnp.power(jnp.float32(rope_theta), -2.0 * idx / d)
  ang = pos.astype(jnp.float32)[..., None] * inv_freq  # [..., N, D/2]
  cos = jnp.cos(ang)[..., None, :]  # broadcast over heads
  sin = jnp.sin(ang)[..., None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _defaults(head_dim, pos_encoding_mode, sm_scale, rope_scale, rope_theta):
  if pos_encoding_mode not in _POS_ENCODINGS:
    raise ValueError(
        f"pos_encoding_mode must be one of {_POS_ENCODINGS}, got {pos_encoding_mode!r}")
  sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
  rope_scale = 1.0 if rope_scale is None else float(rope_scale)
  rope_theta = 1e4 if rope_theta is None else float(rope_theta)
  return sm_scale, rope_scale, rope_theta


def _masked_softmax(logits, valid, sink=None):
  """Softmax over the last axis restricted to ``valid`` (broadcast against logits).

  ``sink`` (broadcast against ``logits[..., :1]``; -inf for none) is one more logit per
  row that joins the denominator and weighs no value (an attention sink).
  Returns the normalised weights and the base-2 LSE; rows with no valid key (and no
  sink) get weights 0 and LSE -inf (never NaN).
  """
  neg = jnp.where(valid, logits, -jnp.inf)
  m = jnp.max(neg, axis=-1, keepdims=True)
  if sink is not None:
    m = jnp.maximum(m, sink)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(valid, jnp.exp(logits - m_safe), 0.0)
  s = jnp.sum(p, axis=-1, keepdims=True)
  if sink is not None:
    s = s + jnp.exp(sink - m_safe)
  w = p / jnp.where(s > 0, s, 1.0)
  lse = jnp.where(s > 0, (m_safe + jnp.log(jnp.where(s > 0, s, 1.0))) * _LOG2E, -jnp.inf)
  return w, lse[..., 0]


def _soft_cap(logits, logits_soft_cap):
  """``cap * tanh(logits / cap)`` (Gemma's logit soft-capping); identity without a cap."""
  if not logits_soft_cap:
    return logits
  return logits_soft_cap * jnp.tanh(logits / logits_soft_cap)


def _in_window(k_pos, q_pos, window_left):
  """Keys inside the sliding window: ``q_pos - window_left <= k_pos`` (all of them for
  ``window_left < 0``)."""
  if window_left is None or window_left < 0:
    return True
  return k_pos >= q_pos - window_left


def _sink_logits(sinks, num_kv_heads, group):
  """Per-head sink logits as [Hkv, G], or None."""
  if sinks is None:
    return None
  return jnp.asarray(sinks, jnp.float32).reshape(num_kv_heads, group)


# ---------------------------------------------------------------- eager oracle


def batch_attention(q, paged_kv_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
                    *, kv_layout="NHD", causal=False, pos_encoding_mode="NONE",
                    sm_scale=None, rope_scale=1.0, rope_theta=1e4, logits_soft_cap=None,
                    window_left=-1, sinks=None, k_scale=None, v_scale=None):
  """Paged attention of a ragged batch: the test oracle.

  Args:
    q: ``[T, num_qo_heads, head_dim]``; rows ``>= qo_indptr[-1]`` are padding.
    paged_kv_cache: 5-D combined cache or ``(k, v)`` 4-D pair, laid out per
      ``kv_layout``.
    qo_indptr: ``[B+1]`` query row offsets of each request.
    kv_indptr, kv_indices, kv_last_page_len: CSR page table; request ``b`` owns pages
      ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` and
      ``kv_len = (npages - 1) * page_size + kv_last_page_len[b]`` keys (0 if no pages).
    causal: bottom-right aligned: query ``i`` sees keys ``j <= kv_len - qo_len + i``.
    pos_encoding_mode: ``"NONE"``, ``"ROPE_LLAMA"`` or ``"ALIBI"`` (DESIGN.md §3).
    logits_soft_cap: ``c > 0`` maps each scaled logit ``x`` to ``c * tanh(x / c)``
      before ALiBi and masking; None or 0: none.
    window_left: ``w >= 0`` limits query position ``p`` to keys ``j >= p - w``; -1: none.
    sinks: float32 ``[num_qo_heads]`` sink logits (on the scale of the scaled logits):
      each joins its head's softmax denominator and weighs no value; None: none.
    k_scale, v_scale: dequantisation scales of a quantised (fp8) cache, FlashInfer's:
      logits use ``sm_scale * k_scale``, the output is multiplied by ``v_scale``. The
      cache itself is read as float32 from its stored values.

  The index arrays must be concrete: a Python loop over the requests turns the page
  table into each request's list of (page, slot) key addresses and its query rows,
  padded per request; one jitted dense attention over ``[B, qo_max, kv_max]`` then
  does the math (one compilation per padded shape bucket instead of one per op and
  request, which made an eager per-request loop take seconds per call).

  Returns:
    ``(out, lse)``: ``out`` float32 ``[T, Hqo, D]``; ``lse`` float32 ``[T, Hqo]``,
    **base 2** (``log2 sum exp`` of the scaled logits). Rows without any visible key
    give ``out = 0`` and ``lse = -inf`` (the sink's logit in base 2 with sinks);
    padding rows give ``out = 0`` and ``lse = -inf``.
  """
  combined = not isinstance(paged_kv_cache, (tuple, list))
  k_shape = _check_cache_shape(paged_kv_cache, kv_layout)  # [P, S, H, D] (NHD order)
  num_pages, page_size, num_kv_heads, head_dim = k_shape
  q = jnp.asarray(q)
  num_tokens, num_qo_heads, q_dim = q.shape
  if q_dim != head_dim:
    raise ValueError(f"q head_dim {q_dim} != cache head_dim {head_dim}")
  if num_qo_heads % num_kv_heads:
    raise ValueError("num_qo_heads must be a multiple of num_kv_heads")
  sm_scale, rope_scale, rope_theta = _defaults(
      head_dim, pos_encoding_mode, sm_scale, rope_scale, rope_theta)

  qo_indptr = np.asarray(qo_indptr, dtype=np.int64)
  kv_indptr = np.asarray(kv_indptr, dtype=np.int64)
  kv_indices = np.asarray(kv_indices, dtype=np.int64)
  kv_last_page_len = np.asarray(kv_last_page_len, dtype=np.int64)
  batch = len(qo_indptr) - 1
  if qo_indptr[-1] > num_tokens:
    raise ValueError("q has fewer rows than qo_indptr[-1]")

  qo_lens = np.diff(qo_indptr)
  npages = np.diff(kv_indptr)
  kv_lens = np.where(npages > 0, (npages - 1) * page_size + kv_last_page_len[:batch], 0)
  # Pad to power-of-two buckets so tests with similar batches share a compilation.
  q_pad = _bucket(max(int(qo_lens.max(initial=0)), 1))
  k_pad = _bucket(max(int(kv_lens.max(initial=0)), 1))
  q_rows = np.full((batch, q_pad), num_tokens, np.int32)  # num_tokens: dropped on scatter
  q_pos = np.zeros((batch, q_pad), np.int32)
  k_addr = np.zeros((batch, k_pad), np.int32)  # flat page * page_size + slot
  for b in range(batch):
    n, m = int(qo_lens[b]), int(kv_lens[b])
    q_rows[b, :n] = np.arange(qo_indptr[b], qo_indptr[b + 1])
    q_pos[b, :n] = np.arange(n) + (m - n)  # absolute position of each query
    pages = kv_indices[kv_indptr[b]:kv_indptr[b + 1]]
    if np.any((pages < 0) | (pages >= num_pages)):
      raise ValueError(f"kv_indices of request {b} hold pages outside [0, {num_pages})")
    j = np.arange(m)
    k_addr[b, :m] = pages[j // page_size] * page_size + j % page_size

  k_op, v_op = (paged_kv_cache, paged_kv_cache) if combined else paged_kv_cache
  return _dense_attention(
      q, jnp.asarray(k_op), jnp.asarray(v_op), q_rows, q_pos, k_addr,
      kv_lens.astype(np.int32), None if sinks is None else jnp.asarray(sinks, jnp.float32),
      kv_layout=kv_layout, combined=combined, causal=bool(causal),
      pos_encoding_mode=pos_encoding_mode,
      sm_scale=sm_scale * (1.0 if k_scale is None else float(k_scale)), rope_scale=rope_scale,
      rope_theta=rope_theta, logits_soft_cap=float(logits_soft_cap or 0.0),
      window_left=int(-1 if window_left is None else window_left),
      v_scale=1.0 if v_scale is None else float(v_scale))


def _bucket(n: int) -> int:
  return 1 << (n - 1).bit_length()


def _check_cache_shape(paged_kv_cache, kv_layout):
  """The cache's (pages, page_size, kv_heads, head_dim), after shape checks."""
  if kv_layout not in ("NHD", "HND"):
    raise ValueError(f"kv_layout must be 'NHD' or 'HND', got {kv_layout!r}")
  if isinstance(paged_kv_cache, (tuple, list)):
    if len(paged_kv_cache) != 2:
      raise ValueError("paged_kv_cache: a tuple cache must be (k, v)")
    k, v = paged_kv_cache
    if len(k.shape) != 4 or tuple(k.shape) != tuple(v.shape):
      raise ValueError(
          f"paged_kv_cache: (k, v) must be two 4-D arrays of one shape, got "
          f"{tuple(k.shape)} and {tuple(v.shape)}")
    shape = tuple(k.shape)
  else:
    shape = tuple(paged_kv_cache.shape)
    if len(shape) != 5 or shape[1] != 2:
      raise ValueError(
          f"paged_kv_cache: a combined cache must be 5-D with dim 1 == 2, got {shape}")
    shape = (shape[0],) + shape[2:]
  if kv_layout == "HND":
    shape = (shape[0], shape[2], shape[1], shape[3])
  return shape


@functools.partial(jax.jit, static_argnames=(
    "kv_layout", "combined", "causal", "pos_encoding_mode", "sm_scale", "rope_scale",
    "rope_theta", "logits_soft_cap", "window_left", "v_scale"))
def _dense_attention(q, k_op, v_op, q_rows, q_pos, k_addr, kv_lens, sinks, *, kv_layout,
                     combined, causal, pos_encoding_mode, sm_scale, rope_scale, rope_theta,
                     logits_soft_cap, window_left, v_scale):
  """Dense attention over per-request padded keys; see batch_attention."""
  k_pages, v_pages = split_paged_kv_cache(k_op if combined else (k_op, v_op), kv_layout)
  num_pages, page_size, num_kv_heads, head_dim = k_pages.shape
  num_tokens, num_qo_heads, _ = q.shape
  group = num_qo_heads // num_kv_heads
  batch, q_pad = q_rows.shape
  k_pad = k_addr.shape[1]

  flat_k = k_pages.reshape(num_pages * page_size, num_kv_heads, head_dim).astype(jnp.float32)
  flat_v = v_pages.reshape(num_pages * page_size, num_kv_heads, head_dim).astype(jnp.float32)
  k = flat_k[k_addr]  # [B, Kp, Hkv, D]
  v = flat_v[k_addr]
  qb = q.astype(jnp.float32)[jnp.clip(q_rows, 0, max(num_tokens - 1, 0))]  # [B, Qp, Hqo, D]
  k_pos = jnp.broadcast_to(jnp.arange(k_pad, dtype=jnp.int32), (batch, k_pad))
  if pos_encoding_mode == "ROPE_LLAMA":
    qb = _rope(qb, q_pos, rope_scale, rope_theta)
    k = _rope(k, k_pos, rope_scale, rope_theta)

  # GQA without copying keys per query head: q head h = kv head h // group, member h % group.
  qg = qb.reshape(batch, q_pad, num_kv_heads, group, head_dim)
  logits = jnp.einsum("bqngd,bknd->bngqk", qg, k, precision=_PREC) * sm_scale
  logits = _soft_cap(logits, logits_soft_cap)
  rel = (k_pos[:, None, :] - q_pos[:, :, None]).astype(jnp.float32)  # [B, Qp, Kp]
  if pos_encoding_mode == "ALIBI":
    slopes = jnp.asarray(alibi_slopes(num_qo_heads)).reshape(num_kv_heads, group)
    logits = logits + slopes[None, :, :, None, None] * rel[:, None, None]
  visible = (k_pos < kv_lens[:, None])[:, None, :] & (q_rows < num_tokens)[:, :, None]
  if causal:
    visible = visible & (rel <= 0)
  visible = visible & _in_window(k_pos[:, None, :], q_pos[:, :, None], window_left)
  sink = _sink_logits(sinks, num_kv_heads, group)
  w, lse = _masked_softmax(logits, visible[:, None, None],
                           None if sink is None else sink[None, :, :, None, None])
  o = jnp.einsum("bngqk,bknd->bqngd", w, v, precision=_PREC) * v_scale
  o = o.reshape(batch, q_pad, num_qo_heads, head_dim)
  lse = jnp.moveaxis(lse, 3, 1).reshape(batch, q_pad, num_qo_heads)  # [B,Hkv,G,Qp] -> rows

  # Scatter the padded rows back; padding rows carry index num_tokens and are dropped.
  rows = q_rows.reshape(-1)
  out = jnp.zeros((num_tokens, num_qo_heads, head_dim), jnp.float32)
  out = out.at[rows].set(o.reshape(-1, num_qo_heads, head_dim), mode="drop")
  lse_out = jnp.full((num_tokens, num_qo_heads), -jnp.inf, jnp.float32)
  lse_out = lse_out.at[rows].set(lse.reshape(-1, num_qo_heads), mode="drop")
  return out, lse_out


def batch_decode(q, paged_kv_cache, kv_indptr, kv_indices, kv_last_page_len, *,
                 kv_layout="NHD", pos_encoding_mode="NONE", sm_scale=None,
                 rope_scale=1.0, rope_theta=1e4, logits_soft_cap=None, window_left=-1,
                 sinks=None, k_scale=None, v_scale=None):
  """Decode: one query token per request (``q [B, Hqo, D]``).

  Same as :func:`batch_attention` with ``qo_indptr = arange(B + 1)``; the single
  query sits at position ``kv_len - 1``. Returns ``(out f32, lse f32 base 2)``.
  """
  batch = len(np.asarray(kv_indptr)) - 1
  return batch_attention(
      q, paged_kv_cache, np.arange(batch + 1), kv_indptr, kv_indices, kv_last_page_len,
      kv_layout=kv_layout, causal=False, pos_encoding_mode=pos_encoding_mode,
      sm_scale=sm_scale, rope_scale=rope_scale, rope_theta=rope_theta,
      logits_soft_cap=logits_soft_cap, window_left=window_left, sinks=sinks, k_scale=k_scale,
      v_scale=v_scale)


# ------------------------------------------------------------- jit-able masked


def batch_attention_masked(q, k_pages, v_pages, qo_indptr, kv_indptr, kv_indices,
                           kv_last_page_len, num_tokens, *, page_size, causal=False,
                           pos_encoding_mode="NONE", sm_scale=None, rope_scale=1.0,
                           rope_theta=1e4, num_requests=None, logits_soft_cap=None,
                           window_left=-1, sinks=None, k_scale=None, v_scale=None):
  """Static-shape, jit-able paged attention (dense masking over all page slots).

  Args:
    q: ``[T, Hqo, D]``.
    k_pages, v_pages: ``[P, page_size, Hkv, D]`` (already NHD, see
      :func:`split_paged_kv_cache`).
    qo_indptr, kv_indptr: ``[Bcap + 1]`` int32, padded by repeating the last value.
    kv_indices: ``[Pcap]`` int32; entries past ``kv_indptr[-1]`` are ignored (and
      clipped, so any padding value is safe).
    kv_last_page_len: ``[Bcap]`` int32 (padding entries are ignored).
    num_tokens: traced int32 scalar; rows ``>= num_tokens`` give ``out = 0`` and
      ``lse = -inf``.
    num_requests: optional (static or traced) count of live requests; requests at or
      past it are ignored. Not needed when the indptrs are padded as described.
    logits_soft_cap, window_left, sinks, k_scale, v_scale: as in
      :func:`batch_attention` (``sinks`` and the scales may be traced).

  Cost is ``O(T * Hqo * Pcap * page_size)`` -- a fallback, not a fast path.

  Returns:
    ``(out, lse)``: ``out`` in q's dtype ``[T, Hqo, D]``; ``lse`` float32 ``[T, Hqo]``,
    **base 2**.
  """
  num_rows, num_qo_heads, head_dim = q.shape
  num_pages, _, num_kv_heads, _ = k_pages.shape
  group = num_qo_heads // num_kv_heads
  sm_scale, rope_scale, rope_theta = _defaults(
      head_dim, pos_encoding_mode, sm_scale, rope_scale, rope_theta)
  bcap = qo_indptr.shape[0] - 1
  pcap = kv_indices.shape[0]
  qo_indptr = qo_indptr.astype(jnp.int32)
  kv_indptr = kv_indptr.astype(jnp.int32)
  kv_last_page_len = kv_last_page_len.astype(jnp.int32)
  if num_requests is None:
    num_requests = bcap

  # Per-request lengths; a request without pages has kv_len 0 whatever last_page_len.
  npages = kv_indptr[1:] - kv_indptr[:-1]
  kv_len = jnp.where(npages > 0, (npages - 1) * page_size + kv_last_page_len, 0)
  qo_len = qo_indptr[1:] - qo_indptr[:-1]
  req_live = jnp.arange(bcap) < num_requests

  # Query side: request of each row via the last b with qo_indptr[b] <= t (skips
  # empty requests, whose indptr entries are equal).
  t = jnp.arange(num_rows, dtype=jnp.int32)
  rq = jnp.searchsorted(qo_indptr, t, side="right").astype(jnp.int32) - 1
  rq_c = jnp.clip(rq, 0, bcap - 1)
  row_ok = (t < num_tokens) & (rq >= 0) & (rq < bcap) & (t < qo_indptr[-1])
  row_ok = row_ok & req_live[rq_c]
  q_pos = kv_len[rq_c] - qo_len[rq_c] + (t - qo_indptr[rq_c])  # absolute query position

  # Key side: every slot of every page-table entry.
  p = jnp.arange(pcap, dtype=jnp.int32)
  rk = jnp.searchsorted(kv_indptr, p, side="right").astype(jnp.int32) - 1
  rk_c = jnp.clip(rk, 0, bcap - 1)
  slot = jnp.arange(page_size, dtype=jnp.int32)
  k_pos = ((p - kv_indptr[rk_c]) * page_size)[:, None] + slot[None, :]  # [Pcap, S]
  key_ok = ((p < kv_indptr[-1]) & (rk >= 0) & (rk < bcap) & req_live[rk_c])[:, None]
  key_ok = key_ok & (k_pos < kv_len[rk_c][:, None])
  k_pos = k_pos.reshape(-1)
  key_ok = key_ok.reshape(-1)
  rk_slot = jnp.repeat(rk_c, page_size)

  # Page ids outside [0, num_pages) are masked, as in the native kernels (the clip only
  # keeps the gather in bounds; those keys never reach the softmax).
  page_ok = (kv_indices >= 0) & (kv_indices < num_pages)
  key_ok = key_ok & jnp.repeat(page_ok, page_size)
  page_ids = jnp.clip(kv_indices.astype(jnp.int32), 0, num_pages - 1)
  k = k_pages[page_ids].reshape(pcap * page_size, num_kv_heads, head_dim)
  v = v_pages[page_ids].reshape(pcap * page_size, num_kv_heads, head_dim)
  k = k.astype(jnp.float32)
  v = v.astype(jnp.float32)
  qf = q.astype(jnp.float32)
  if pos_encoding_mode == "ROPE_LLAMA":
    qf = _rope(qf, q_pos, rope_scale, rope_theta)
    k = _rope(k, k_pos, rope_scale, rope_theta)

  # [T, Hkv, G, K] logits without materialising the GQA-expanded keys.
  qg = qf.reshape(num_rows, num_kv_heads, group, head_dim)
  logits = jnp.einsum("tngd,knd->tngk", qg, k, precision=_PREC) * sm_scale
  if k_scale is not None:
    logits = logits * k_scale
  logits = _soft_cap(logits, logits_soft_cap)
  if pos_encoding_mode == "ALIBI":
    slopes = jnp.asarray(alibi_slopes(num_qo_heads)).reshape(num_kv_heads, group)
    rel = (k_pos[None, :] - q_pos[:, None]).astype(jnp.float32)  # [T, K]
    logits = logits + slopes[None, :, :, None] * rel[:, None, None, :]
  valid = (rk_slot[None, :] == rq_c[:, None]) & key_ok[None, :] & row_ok[:, None]
  if causal:
    valid = valid & (k_pos[None, :] <= q_pos[:, None])
  valid = valid & _in_window(k_pos[None, :], q_pos[:, None], window_left)
  sink = _sink_logits(sinks, num_kv_heads, group)
  if sink is not None:  # padding rows keep lse -inf: no sink there
    sink = jnp.where(row_ok[:, None, None, None], sink[None, :, :, None], -jnp.inf)
  w, lse = _masked_softmax(logits, valid[:, None, None, :], sink)
  out = jnp.einsum("tngk,knd->tngd", w, v, precision=_PREC)
  if v_scale is not None:
    out = out * v_scale
  out = out.reshape(num_rows, num_qo_heads, head_dim)
  lse = lse.reshape(num_rows, num_qo_heads)
  return out.astype(q.dtype), lse


# ----------------------------------------------------------------------- append


def get_batch_indices_positions(append_indptr, seq_lens, nnz):
  """Request index and key position of each appended row (FlashInfer's helper).

  Row ``i`` in ``[append_indptr[b], append_indptr[b+1])`` belongs to request ``b`` at
  position ``seq_lens[b] - (append_indptr[b+1] - append_indptr[b]) + (i -
  append_indptr[b])``; ``seq_lens`` are the lengths *after* the append. Rows
  ``>= append_indptr[-1]`` (up to ``nnz``) get batch index ``-1`` and position ``-1``,
  which the append skips. ``nnz`` is static; the arrays may be traced.

  Returns:
    ``(batch_indices, positions)``, int32 ``[nnz]`` each.
  """
  append_indptr = jnp.asarray(append_indptr, jnp.int32)
  seq_lens = jnp.asarray(seq_lens, jnp.int32)
  batch = append_indptr.shape[0] - 1
  i = jnp.arange(int(nnz), dtype=jnp.int32)
  b = jnp.searchsorted(append_indptr, i, side="right").astype(jnp.int32) - 1
  b_c = jnp.clip(b, 0, batch - 1)
  live = i < append_indptr[-1]
  n_b = append_indptr[b_c + 1] - append_indptr[b_c]
  pos = seq_lens[b_c] - n_b + (i - append_indptr[b_c])
  return jnp.where(live, b, -1), jnp.where(live, pos, -1)


def append_paged_kv_cache(append_key, append_value, batch_indices, positions,
                          paged_kv_cache, kv_indices, kv_indptr, kv_last_page_len=None,
                          kv_layout="NHD"):
  """Writes ``append_key/value [N, Hkv, D]`` into the paged cache; returns a new cache.

  Row ``i`` goes to request ``b = batch_indices[i]``, key position ``p =
  positions[i]``: page ``kv_indices[kv_indptr[b] + p // page_size]``, slot
  ``p % page_size``. Rows whose ``b`` is outside ``[0, B)``, whose page slot falls
  outside the request's ``[kv_indptr[b], kv_indptr[b+1])`` or whose page id is outside
  ``[0, num_pages)`` are skipped, whatever the index arrays hold (the page slot is
  compared with the request's page count, so no sum of int32 values can wrap into
  another request's pages). ``kv_last_page_len`` is accepted for FlashInfer signature
  compatibility and not needed. Jit-able; the result has the cache's structure (5-D
  array or ``(k, v)`` tuple) and dtype.
  """
  del kv_last_page_len
  if kv_layout not in ("NHD", "HND"):
    raise ValueError(f"kv_layout must be 'NHD' or 'HND', got {kv_layout!r}")
  combined = not isinstance(paged_kv_cache, (tuple, list))
  first = paged_kv_cache if combined else paged_kv_cache[0]
  num_pages = first.shape[0]
  # Page size sits at a different axis per layout and per cache form.
  s_axis = (2 if kv_layout == "NHD" else 3) if combined else (1 if kv_layout == "NHD" else 2)
  page_size = first.shape[s_axis]

  b = jnp.asarray(batch_indices, jnp.int32)
  p = jnp.asarray(positions, jnp.int32)
  kv_indptr = jnp.asarray(kv_indptr, jnp.int32)
  kv_indices = jnp.asarray(kv_indices, jnp.int32)
  batch = kv_indptr.shape[0] - 1
  num_indices = kv_indices.shape[0]
  if batch < 1 or num_indices == 0:  # no page to write to
    return paged_kv_cache if combined else tuple(paged_kv_cache)
  b_c = jnp.clip(b, 0, batch - 1)
  first, last = kv_indptr[b_c], kv_indptr[b_c + 1]
  n = jnp.floor_divide(p, page_size)  # >= 0 for the rows that count
  # The slot first + n must lie in [first, last) and in [0, num_indices), compared
  # without forming a sum that could wrap: for first >= 0 n is compared with the room
  # left (an int32 difference of two values in range), for first < 0 the sum of a
  # negative and a non-negative int32 cannot wrap.
  end = jnp.clip(jnp.minimum(last, num_indices), 0, num_indices)
  below = jnp.minimum(first, 0) + n
  in_table = jnp.where(first >= 0, n < end - jnp.maximum(first, 0), (below >= 0) & (below < end))
  ok = (b >= 0) & (b < batch) & (p >= 0) & in_table
  entry = jnp.where(ok, first + n, 0)
  page = kv_indices[entry]
  ok = ok & (page >= 0) & (page < num_pages)
  # Skipped rows get page id num_pages, out of bounds, and mode="drop" discards them.
  page = jnp.where(ok, page, num_pages)
  slot = jnp.remainder(p, page_size)

  def put(arr, kv_sel, vals):
    vals = jnp.asarray(vals).astype(arr.dtype)
    if combined:
      if kv_layout == "NHD":  # [P, 2, S, H, D]
        return arr.at[page, kv_sel, slot].set(vals, mode="drop")
      # [P, 2, H, S, D]: advanced indices split by a slice -> [N, H, D] update
      return arr.at[page, kv_sel, :, slot].set(vals, mode="drop")
    if kv_layout == "NHD":  # [P, S, H, D]
      return arr.at[page, slot].set(vals, mode="drop")
    return arr.at[page, :, slot].set(vals, mode="drop")  # [P, H, S, D]

  if combined:
    cache = put(jnp.asarray(paged_kv_cache), 0, append_key)
    return put(cache, 1, append_value)
  k, v = paged_kv_cache
  return (put(jnp.asarray(k), None, append_key), put(jnp.asarray(v), None, append_value))
