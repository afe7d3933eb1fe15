"""`ragged_paged_attention`: the RPA-v3 entry point (tpu-inference's and sglang-jax's API).

One call writes a step's new keys and values into the paged cache and attends over it,
planning on the device (device_planner.py), so a decode loop runs inside
`lax.while_loop` with no host planner and no host round trip per step. Inside it is two
custom calls, the append then the tensor-core attention kernel, each reading the one
in-graph plan; docs/CONTRACT.md ("RPA-v3 entry point") says why that is enough and
states the semantics beside FlashInfer's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jax_pagedattn import device_planner, page, planning, primitives, switches
from jax_pagedattn import layout as layout_lib
from jax_pagedattn._wrapper import scales_operand


@dataclasses.dataclass(frozen=True)
class _Setting:
  """The static half of a call (hashable: the compile key of the jitted body)."""

  config: planning.PlanConfig
  spec: device_planner.DeviceSpec
  combined: bool


def ragged_paged_attention(queries, keys, values, kv_cache, kv_lens, page_indices, cu_q_lens,
                           distribution, *, sm_scale: float = 1.0, sliding_window=None,
                           soft_cap=None, k_scale=None, v_scale=None, causal: bool = True,
                           kv_layout: str = "NHD"):
  """Writes the new K/V of a ragged batch into the paged cache and attends; returns
  `(out, kv_cache)`.

  Args:
    queries: [max_num_tokens, num_q_heads, head_dim], the batch's query tokens packed
      request after request (cu_q_lens); rows past cu_q_lens[num_seqs] are padding.
    keys, values: [max_num_tokens, num_kv_heads, head_dim], the same tokens' new keys
      and values: row cu_q_lens[b] + i goes to key position kv_lens[b] - q_len_b + i of
      request b (its new tokens are its last q_len_b keys).
    kv_cache: our paged cache, 5-D `[pages, 2, page_size, num_kv_heads, head_dim]` (NHD;
      HND with kv_layout="HND") or a (k, v) pair; donated: the call writes in place and
      returns it (use the returned cache, as with RPA v3).
    kv_lens: int [max_num_seqs], keys of each request after this step's tokens.
    page_indices: int [max_num_seqs * pages_per_seq], request b's page p at entry
      b * pages_per_seq + p.
    cu_q_lens: int [max_num_seqs + 1], query-token offsets of the requests.
    distribution: int [3], (decode-only end, prefill-chunk end, num_seqs): requests
      [0, distribution[0]) have one query token each; only requests below
      distribution[2] are in the batch.
    sm_scale: scale of q.k (RPA v3's default 1.0, not FlashInfer's 1/sqrt(head_dim)).
    sliding_window: None, or w >= 1: query position p sees keys j with p - w < j
      (the last w keys up to itself); FlashInfer's window_left = w - 1.
    soft_cap: None, or c > 0: each scaled logit x becomes c * tanh(x / c).
    k_scale, v_scale: None, or the dequantisation scales (floats or traced scalars):
      logits use sm_scale * k_scale, the output is multiplied by v_scale, as in the
      paged wrappers' run(). The cache keeps queries' dtype here (fp8 caches go through
      the prefill kernel, which reads 16-bit tiles on the GPU).
    causal: bottom-right aligned causal mask; False lets every query see all kv_lens[b]
      keys of its request.
    kv_layout: "NHD" or "HND" (of kv_cache).

  Returns:
    out [max_num_tokens, num_q_heads, head_dim] in queries' dtype (padding rows and rows
    that see no key are 0), and the updated cache (same structure as kv_cache).

  Jit-able: under jax.jit every array may be traced and nothing is planned on the host.
  With concrete arrays the call first checks them and raises ValueError naming the
  argument and the rule it breaks.
  """
  setting = _setting(queries, keys, values, kv_cache, kv_lens, page_indices, cu_q_lens,
                     distribution, sm_scale=sm_scale, sliding_window=sliding_window,
                     soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale, causal=causal,
                     kv_layout=kv_layout)
  ints = (kv_lens, page_indices, cu_q_lens, distribution)
  if not any(isinstance(x, jax.core.Tracer) for x in ints):
    _check_values(*(np.asarray(x) for x in ints), num_tokens=int(queries.shape[0]),
                  setting=setting, kv_cache=kv_cache)
  return _run(queries, keys, values, kv_cache, *(jnp.asarray(x).astype(jnp.int32) for x in ints),
              scales_operand(k_scale, v_scale), setting=setting)


@functools.partial(jax.jit, static_argnames=("setting",), donate_argnames=("kv_cache",))
def _run(queries, keys, values, kv_cache, kv_lens, page_indices, cu_q_lens, distribution,
         scales, *, setting: _Setting):
  plan = device_planner.plan(cu_q_lens, kv_lens, page_indices, distribution[2], spec=setting.spec)
  # The append's rows are the query rows: keys[i] is the key of query token i.
  kv_cache = page.append_paged_kv_cache(keys, values, plan.batch_indices, plan.positions, kv_cache,
                                        plan.kv_indices, plan.kv_indptr, plan.kv_last_page_len,
                                        kv_layout=setting.config.kv_layout)
  k_op, v_op = layout_lib.cache_operands(kv_cache)
  out, _, _ = primitives.prefill_p.bind(queries, k_op, v_op, plan.buffer,
                                        jnp.zeros((0,), jnp.float32), scales,
                                        config=setting.config, combined=setting.combined)
  return out, kv_cache


# ---------------------------------------------------------------------------------------
# static checks and the static setting


def _int_array(x, name: str, shape: tuple | None = None):
  if not hasattr(x, "shape"):
    x = np.asarray(x)
  if x.ndim != 1 or (shape is not None and tuple(x.shape) != shape):
    want = f"shape {shape}" if shape is not None else "a 1-D array"
    raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must hold integers (int32), got {x.dtype}")
  return x


def _setting(queries, keys, values, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, *,
             sm_scale, sliding_window, soft_cap, k_scale, v_scale, causal, kv_layout) -> _Setting:
  """Checks everything static (shapes, dtypes, options) and derives the setting."""
  if queries.ndim != 3:
    raise ValueError(f"queries must be [max_num_tokens, num_q_heads, head_dim], got shape "
                     f"{tuple(queries.shape)}")
  num_tokens, num_q_heads, head_dim = (int(n) for n in queries.shape)
  for name, x in (("keys", keys), ("values", values)):
    if x.ndim != 3 or x.shape[0] != num_tokens or x.shape[2] != head_dim:
      raise ValueError(f"{name} must be [max_num_tokens={num_tokens}, num_kv_heads, "
                       f"head_dim={head_dim}] like queries, got shape {tuple(x.shape)}")
  if keys.shape != values.shape:
    raise ValueError(f"values shape {tuple(values.shape)} != keys shape {tuple(keys.shape)}")
  if num_tokens < 1:
    raise ValueError("queries must have at least one row (max_num_tokens >= 1)")
  num_kv_heads = int(keys.shape[1])
  planning.check_head_config(num_q_heads, num_kv_heads, head_dim)
  info = layout_lib.inspect_cache(kv_cache, kv_layout, "kv_cache")
  if (info.num_kv_heads, info.head_dim) != (num_kv_heads, head_dim):
    raise ValueError(f"kv_cache holds {info.num_kv_heads} KV heads of head_dim {info.head_dim} "
                     f"({kv_layout}), keys/values have {num_kv_heads} of {head_dim}")
  dtype = planning.canonical_dtype(queries.dtype, "queries")
  for name, x in (("keys", keys.dtype), ("values", values.dtype), ("kv_cache", info.dtype)):
    if jnp.dtype(x).name != dtype:
      raise TypeError(f"{name} has dtype {jnp.dtype(x).name}; it must be queries' dtype {dtype}")

  kv_lens = _int_array(kv_lens, "kv_lens")
  max_num_seqs = int(kv_lens.shape[0])
  if max_num_seqs < 1:
    raise ValueError("kv_lens must have max_num_seqs >= 1 entries")
  _int_array(cu_q_lens, "cu_q_lens", (max_num_seqs + 1,))
  _int_array(distribution, "distribution", (3,))
  page_indices = _int_array(page_indices, "page_indices")
  if page_indices.shape[0] < max_num_seqs or page_indices.shape[0] % max_num_seqs:
    raise ValueError(f"page_indices must have max_num_seqs * pages_per_seq entries, a positive "
                     f"multiple of len(kv_lens) = {max_num_seqs}; got {page_indices.shape[0]}")
  return _derive(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, max_num_seqs,
                 int(page_indices.shape[0]) // max_num_seqs, info.page_size, info.combined,
                 kv_layout, _scale(sm_scale), _window_left(sliding_window),
                 _soft_cap(soft_cap), _causal(causal), switches.current())


def _scale(sm_scale) -> float:
  if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real) or not math.isfinite(sm_scale):
    raise ValueError(f"sm_scale must be a finite number, got {sm_scale!r}")
  return float(sm_scale)


def _window_left(sliding_window) -> int:
  """RPA's sliding_window w (the last w keys, the query's own included) as FlashInfer's
  window_left (keys p - window_left .. p): w - 1; None: -1."""
  if sliding_window is None:
    return -1
  if (isinstance(sliding_window, bool) or not isinstance(sliding_window, numbers.Integral)
      or not 1 <= sliding_window <= np.iinfo(np.int32).max):
    raise ValueError(f"sliding_window must be None or an integer >= 1 (keys each query sees, "
                     f"its own included), got {sliding_window!r}")
  return int(sliding_window) - 1


def _soft_cap(soft_cap) -> float:
  if soft_cap is None:
    return 0.0
  if (isinstance(soft_cap, bool) or not isinstance(soft_cap, numbers.Real)
      or not math.isfinite(soft_cap) or soft_cap <= 0):
    raise ValueError(f"soft_cap must be None or a positive finite number, got {soft_cap!r}")
  return float(soft_cap)


def _causal(causal) -> bool:
  if not isinstance(causal, (bool, np.bool_)):
    raise TypeError(f"causal must be a bool, got {causal!r}")
  return bool(causal)


@functools.lru_cache(maxsize=256)
def _derive(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, max_num_seqs, pages_per_seq,
            page_size, combined, kv_layout, sm_scale, window_left, soft_cap, causal,
            sw: switches.Switches) -> _Setting:
  group = num_q_heads // num_kv_heads
  # The query tile: a decode step's buffers (no more query rows than requests) get the
  # tensor-core decode tile, anything else the prefill tile. Either is right for any
  # batch; the choice only decides how many MMA rows a one-token request wastes.
  kernel = "tensor_core_decode" if num_tokens <= max_num_seqs else "prefill"
  hopper = planning.hopper_prefill(kernel, dtype, dtype, head_dim)
  tile_rows = planning.tile_rows(kernel, group, head_dim, hopper)
  num_ctas = planning.concurrent_ctas(True, dtype, head_dim, tile_rows, hopper)
  caps = device_planner.capacities(max_num_seqs, num_tokens, pages_per_seq, group_size=group,
                                   tile_rows=tile_rows, num_kv_heads=num_kv_heads,
                                   num_ctas=num_ctas)
  config = planning.PlanConfig(
      target="jax_pagedattn_prefill", caps=caps, tile_rows=tile_rows, num_qo_heads=num_q_heads,
      num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size, kv_layout=kv_layout,
      causal=causal, pos_encoding_mode="NONE", sm_scale=sm_scale, rope_scale=1.0,
      rope_theta=1e4, logits_soft_cap=soft_cap, window_left=window_left, q_dtype=dtype,
      kv_dtype=dtype, wrapper="prefill", **sw.plan_fields())
  spec = device_planner.DeviceSpec(page_size=page_size, pages_per_seq=pages_per_seq,
                                   group_size=group, tile_rows=tile_rows, causal=causal,
                                   window_left=window_left, caps=caps, deal=sw.deal)
  return _Setting(config, spec, combined)


# ---------------------------------------------------------------------------------------
# checks of concrete values


def _check_values(kv_lens, page_indices, cu_q_lens, distribution, *, num_tokens: int,
                  setting: _Setting, kv_cache):
  """What RPA v3 requires of a batch, checked on host copies; raises ValueError naming
  the argument. (Under jit nothing is checked; the kernels clamp what they are given.)"""
  max_num_seqs = kv_lens.shape[0]
  pps, ps = setting.spec.pages_per_seq, setting.spec.page_size
  decode_end, prefill_end, num_seqs = (int(x) for x in distribution)
  if not 0 <= decode_end <= prefill_end <= num_seqs <= max_num_seqs:
    raise ValueError(f"distribution = ({decode_end}, {prefill_end}, {num_seqs}) must satisfy "
                     f"0 <= decode_end <= prefill_end <= num_seqs <= max_num_seqs = "
                     f"{max_num_seqs}")
  cu = cu_q_lens[:num_seqs + 1].astype(np.int64)
  if cu[0] != 0:
    raise ValueError(f"cu_q_lens[0] must be 0, got {cu[0]}")
  q_lens = np.diff(cu)
  if (q_lens < 0).any():
    b = int(np.argmax(q_lens < 0))
    raise ValueError(f"cu_q_lens must be non-decreasing over its first num_seqs + 1 entries, "
                     f"but cu_q_lens[{b + 1}] = {cu[b + 1]} < cu_q_lens[{b}] = {cu[b]}")
  if cu[-1] > num_tokens:
    raise ValueError(f"cu_q_lens[num_seqs] = {cu[-1]} query tokens exceed queries' "
                     f"{num_tokens} rows (max_num_tokens)")
  if (q_lens[:decode_end] != 1).any():
    b = int(np.argmax(q_lens[:decode_end] != 1))
    raise ValueError(f"sequences below distribution[0] = {decode_end} are decode-only and must "
                     f"have one query token; sequence {b} has {q_lens[b]} (cu_q_lens)")
  lens = kv_lens[:num_seqs].astype(np.int64)
  if (lens < q_lens).any():
    b = int(np.argmax(lens < q_lens))
    raise ValueError(f"kv_lens[{b}] = {lens[b]} is less than the sequence's {q_lens[b]} new "
                     f"tokens (cu_q_lens): kv_lens counts the keys after this step")
  pages = -(-lens // ps)
  if (pages > pps).any():
    b = int(np.argmax(pages > pps))
    raise ValueError(f"kv_lens[{b}] = {lens[b]} needs {pages[b]} pages of {ps} keys, more than "
                     f"pages_per_seq = len(page_indices) / max_num_seqs = {pps}")
  num_pages = layout_lib.inspect_cache(kv_cache, setting.config.kv_layout).num_pages
  used = np.arange(pps)[None, :] < pages[:, None]  # [num_seqs, pps]
  table = page_indices[:num_seqs * pps].reshape(num_seqs, pps)
  bad = used & ((table < 0) | (table >= num_pages))
  if bad.any():
    b, p = (int(x) for x in np.argwhere(bad)[0])
    raise ValueError(f"page_indices[{b * pps + p}] = {table[b, p]} (sequence {b}, page {p}) is "
                     f"not a page of kv_cache (0 <= page < {num_pages})")
