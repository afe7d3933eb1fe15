"""KV-cache layouts: NHD / HND, 5-D combined vs (k, v) tuple, and shape checks."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

KV_LAYOUTS = ("NHD", "HND")
KV_LAYOUT_CODE = {"NHD": 0, "HND": 1}


def check_kv_layout(kv_layout: str) -> str:
  if kv_layout not in KV_LAYOUTS:
    raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
  return kv_layout


@dataclasses.dataclass(frozen=True)
class CacheInfo:
  """What the kernels need to know about a paged cache, read off its shape."""

  combined: bool
  num_pages: int
  page_size: int
  num_kv_heads: int
  head_dim: int
  dtype: Any


def inspect_cache(paged_kv_cache, kv_layout: str, name: str = "paged_kv_cache") -> CacheInfo:
  """Checks a cache's rank and shape for the layout and returns its dimensions.

  A combined cache is `[pages, 2, page_size, kv_heads, head_dim]` (NHD) or
  `[pages, 2, kv_heads, page_size, head_dim]` (HND); a tuple holds two 4-D arrays of
  the same shape without the axis of 2. When page_size == kv_heads the two layouts have
  the same shape, so a cache in the other layout cannot be told apart here (nor in
  FlashInfer): `kv_layout` is trusted.
  """
  check_kv_layout(kv_layout)
  if isinstance(paged_kv_cache, (tuple, list)):
    if len(paged_kv_cache) != 2:
      raise ValueError(f"{name} as a tuple must be (k_cache, v_cache), got {len(paged_kv_cache)} arrays")
    k, v = paged_kv_cache
    if k.ndim != 4 or v.ndim != 4:
      raise ValueError(
          f"{name}: (k, v) caches must be 4-D [pages, page_size, kv_heads, head_dim] ({kv_layout}); "
          f"got shapes {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape != v.shape or k.dtype != v.dtype:
      raise ValueError(f"{name}: k and v caches must match, got {k.shape}/{k.dtype} and {v.shape}/{v.dtype}")
    shape, combined, dtype = tuple(k.shape), False, k.dtype
  else:
    if paged_kv_cache.ndim != 5 or paged_kv_cache.shape[1] != 2:
      raise ValueError(
          f"{name} must be 5-D [pages, 2, page_size, kv_heads, head_dim] for NHD or "
          f"[pages, 2, kv_heads, page_size, head_dim] for HND (or a (k, v) tuple), got shape "
          f"{tuple(paged_kv_cache.shape)}")
    shape = (paged_kv_cache.shape[0],) + tuple(paged_kv_cache.shape[2:])
    combined, dtype = True, paged_kv_cache.dtype
  if kv_layout == "NHD":
    pages, page_size, heads, dim = shape
  else:
    pages, heads, page_size, dim = shape
  return CacheInfo(combined, int(pages), int(page_size), int(heads), int(dim), jnp.dtype(dtype))


def cache_operands(paged_kv_cache):
  """(k operand, v operand): the 5-D cache twice, or the tuple's two arrays."""
  if isinstance(paged_kv_cache, (tuple, list)):
    return paged_kv_cache[0], paged_kv_cache[1]
  return paged_kv_cache, paged_kv_cache


def to_nhd_pages(k_op, v_op, combined: bool, kv_layout: str):
  """k and v as `[pages, page_size, kv_heads, head_dim]` arrays (for the jnp fallback)."""
  if combined:
    k, v = k_op[:, 0], k_op[:, 1]
  else:
    k, v = k_op, v_op
  if kv_layout == "HND":
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  return k, v
