"""Writing new keys and values into the paged cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_pagedattn import layout as layout_lib
from jax_pagedattn import planning, primitives, sharding


def get_batch_indices_positions(append_indptr, seq_lens, nnz: int):
  """Request index and key position of each appended row.

  Row i of request b (append_indptr[b] <= i < append_indptr[b+1]) lands at position
  seq_lens[b] - (append_indptr[b+1] - append_indptr[b]) + (i - append_indptr[b]), where
  seq_lens are the lengths after the append. Rows past append_indptr[-1] (up to the
  static `nnz`) get batch index -1 and position -1, which append_paged_kv_cache skips.
  Jit-friendly: only `nnz` is static. Returns (batch_indices, positions), int32 [nnz].
  """
  append_indptr = jnp.asarray(append_indptr, jnp.int32)
  seq_lens = jnp.asarray(seq_lens, jnp.int32)
  rows = jnp.arange(nnz, dtype=jnp.int32)
  b = jnp.searchsorted(append_indptr, rows, side="right").astype(jnp.int32) - 1
  b = jnp.clip(b, 0, max(append_indptr.shape[0] - 2, 0))
  live = rows < append_indptr[-1]
  start, end = append_indptr[b], append_indptr[b + 1]
  pos = seq_lens[b] - (end - start) + (rows - start)
  return jnp.where(live, b, -1), jnp.where(live, pos, -1)


def _check_host(num_rows, batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len, info):
  """Eager validation on concrete inputs (inside jit the kernels' guard skips bad rows)."""
  bi, pos = np.asarray(batch_indices), np.asarray(positions)
  indptr, indices, lpl = np.asarray(kv_indptr), np.asarray(kv_indices), np.asarray(kv_last_page_len)
  for name, a in (("batch_indices", bi), ("positions", pos)):
    if a.shape != (num_rows,):
      raise ValueError(f"{name} must have one entry per appended row ({num_rows}), got shape {a.shape}")
  batch = indptr.shape[0] - 1
  if indptr.shape[0] < 1 or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
    raise ValueError("kv_indptr must start at 0 and be non-decreasing")
  if indptr[-1] != indices.shape[0]:
    raise ValueError(f"kv_indptr[-1] = {indptr[-1]} must equal len(kv_indices) = {indices.shape[0]}")
  if lpl.shape[0] != batch:
    raise ValueError(f"kv_last_page_len must have {batch} entries (len(kv_indptr) - 1), got {lpl.shape[0]}")
  if indices.size and (indices.min() < 0 or indices.max() >= info.num_pages):
    raise ValueError(f"kv_indices must be pages of the cache (0 <= page < {info.num_pages}), "
                     f"found {int(indices.min())}..{int(indices.max())}")
  live = bi >= 0
  if np.any(bi[live] >= batch):
    raise ValueError(f"batch_indices must be < batch_size = {batch} (or -1 for padding rows)")
  pages = np.diff(indptr)
  kv_len = np.where(pages > 0, (pages - 1) * info.page_size + lpl, 0)
  bad = live & ((pos < 0) | (pos >= kv_len[np.clip(bi, 0, max(batch - 1, 0))] if batch else True))
  if np.any(bad):
    i = int(np.argmax(bad))
    raise ValueError(f"positions[{i}] = {int(pos[i])} is outside request {int(bi[i])}'s pages "
                     f"(its length after the append must cover it: kv_last_page_len / kv_indptr)")


def quantize_to_cache(x, cache_dtype, name: str):
  """`x` as an fp8 cache stores it: rounded to nearest, saturating at the type's largest
  finite value (a plain cast would give NaN for e4m3fn). Other caches: `x` unchanged (the
  op checks that its dtype is the cache's)."""
  cache_dtype = jnp.dtype(cache_dtype)
  if cache_dtype.name not in planning.FP8_KV_DTYPES or jnp.dtype(x.dtype) == cache_dtype:
    return x
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be floating point to be written into a {cache_dtype.name} "
                    f"cache, got {x.dtype}")
  top = float(jnp.finfo(cache_dtype).max)
  return jnp.clip(jnp.asarray(x, jnp.float32), -top, top).astype(cache_dtype)


def append_paged_kv_cache(append_key, append_value, batch_indices, positions, paged_kv_cache,
                          kv_indices, kv_indptr, kv_last_page_len, kv_layout: str = "NHD", *,
                          shards: sharding.Shards | None = None):
  """Writes rows of new keys/values into their pages and returns the updated cache.

  append_key/append_value: [rows, num_kv_heads, head_dim]; batch_indices/positions:
  [rows] (see get_batch_indices_positions); the page table describes the requests'
  lengths after the append. Returns a cache of the same structure as paged_kv_cache
  (a 5-D array or a (k, v) tuple). Under jax.jit with the cache donated, the write
  happens in place (the output aliases the input). Rows with batch index -1, or whose
  position falls outside the request's pages, are skipped. With `shards` (a
  `sharding.Shards`) each device writes its own rows into its block of the cache
  (docs/CONTRACT.md, "Sharded use", says how the arguments split). An fp8 cache
  (float8_e4m3fn / float8_e5m2) takes rows in its own dtype, or in a wider float type,
  which is rounded to it (to nearest, saturating at the fp8 range: divide by k_scale /
  v_scale first, as quantising serving code does).
  """
  if shards is not None:
    return sharding.append_paged_kv_cache(
        append_key, append_value, batch_indices, positions, paged_kv_cache, kv_indices,
        kv_indptr, kv_last_page_len, kv_layout=kv_layout, shards=shards, check_host=_check_host)
  info = layout_lib.inspect_cache(paged_kv_cache, kv_layout)
  append_key = quantize_to_cache(append_key, info.dtype, "append_key")
  append_value = quantize_to_cache(append_value, info.dtype, "append_value")
  ints = [batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len]
  if not any(isinstance(x, jax.core.Tracer) for x in ints):
    _check_host(append_key.shape[0], *ints, info)
  batch_indices, positions, kv_indices, kv_indptr = (
      jnp.asarray(x, jnp.int32) for x in (batch_indices, positions, kv_indices, kv_indptr))
  caches = (paged_kv_cache,) if info.combined else tuple(paged_kv_cache)
  out = primitives.append_p.bind(append_key, append_value, batch_indices, positions, kv_indices,
                                 kv_indptr, *caches, kv_layout=kv_layout, combined=info.combined)
  return out[0] if info.combined else (out[0], out[1])
