"""Shared builders and checks for the tests: page tables, caches, case grids, tolerances."""

from __future__ import annotations

import dataclasses
import itertools
import random
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jax_pagedattn import reference

DTYPES = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16}
# (num_qo_heads, num_kv_heads): GQA ratios 1, 4, 8, 8 with 32 heads (ALiBi's n = 32) and
# 3 (12 heads: not a power of two, so ALiBi's second slope series is used).
HEADS = ((4, 4), (8, 2), (16, 2), (32, 4), (12, 4))

# Tolerances against the float32 oracle fed the same rounded inputs. f32 differs from
# the oracle only by summation order (and RoPE's sin/cos at large angles); f16/bf16
# additionally round P before P@V on the GPU and round the output (bf16 ulp = 2^-8).
OUT_TOL = {"f32": 2e-5, "f16": 5e-3, "bf16": 2e-2}
ROPE_OUT_TOL_F32 = 1e-4
LSE_TOL = {"f32": 1e-3, "f16": 2e-2, "bf16": 2e-2}


def seeded_rng(text: str) -> np.random.Generator:
  return np.random.default_rng(zlib.crc32(text.encode()))


def cpu():
  return jax.devices("cpu")[0]


# jax platform name -> the lowering platform whose native FFI handlers must exist.
NATIVE_NAME = {"cpu": "cpu", "gpu": "cuda"}


def check_native(platform):
  """The lowering under test must be the native handler, not the jnp fallback (which
  the oracle tests separately); fails when this build lacks the platform's handlers."""
  import jax_pagedattn as jpa  # noqa: PLC0415 (keeps _helpers importable without it)

  assert NATIVE_NAME[platform] in jpa.native_platforms(), (
      f"this build has no native {platform} handlers: the tests would only exercise the "
      f"jax.numpy fallback")


# ------------------------------------------------------------------ case grids


@dataclasses.dataclass(frozen=True)
class Case:
  dtype: str
  kv_layout: str
  form: str  # "5d" (combined) or "tuple"
  page_size: int
  head_dim: int
  heads: tuple
  pos: str
  return_lse: bool
  causal: bool = False  # prefill only
  tensor_cores: bool = False  # decode only: use_tensor_cores=True

  @property
  def id(self):
    c = "-causal" if self.causal else ""
    lse = "-lse" if self.return_lse else ""
    tc = "-tc" if self.tensor_cores else ""
    return (f"{self.dtype}-{self.kv_layout}-{self.form}-p{self.page_size}-d{self.head_dim}"
            f"-h{self.heads[0]}x{self.heads[1]}-{self.pos}{lse}{c}{tc}")

  @property
  def out_tol(self):
    # RoPE at positions in the hundreds: f32 sin/cos of the angle differ by ~1e-5
    # between implementations, more than summation order does.
    if self.dtype == "f32" and self.pos == "ROPE_LLAMA":
      return ROPE_OUT_TOL_F32
    return OUT_TOL[self.dtype]


def pairwise(axes: dict, seed: int = 0) -> list[dict]:
  """A small set of assignments covering every pair of values of every two axes.

  Greedy (AETG-style): each new row starts from a still uncovered pair and keeps the
  random completion that covers most uncovered pairs. Deterministic for a seed.
  """
  names = list(axes)
  sizes = [len(axes[n]) for n in names]
  uncovered = {
      (i, a, j, b)
      for i, j in itertools.combinations(range(len(names)), 2)
      for a in range(sizes[i]) for b in range(sizes[j])
  }
  r = random.Random(seed)
  rows = []
  while uncovered:
    i, a, j, b = min(uncovered)  # deterministic choice of the pair to cover next
    best, best_gain = None, -1
    for _ in range(64):
      row = [r.randrange(s) for s in sizes]
      row[i], row[j] = a, b
      gain = sum((x, row[x], y, row[y]) in uncovered
                 for x, y in itertools.combinations(range(len(names)), 2))
      if gain > best_gain:
        best, best_gain = row, gain
    rows.append(best)
    pairs = itertools.combinations(range(len(names)), 2)
    uncovered -= {(x, best[x], y, best[y]) for x, y in pairs}
  return [{n: axes[n][v] for n, v in zip(names, row)} for row in rows]


def platform_dtypes(platform: str):
  # f32 kernels exist only in the CPU backend (DESIGN.md §4 / CONTRACT.md).
  return ("f32", "f16", "bf16") if platform == "cpu" else ("f16", "bf16")


@dataclasses.dataclass(frozen=True)
class AppendCase:
  dtype: str
  kv_layout: str
  form: str
  page_size: int

  @property
  def id(self):
    return f"{self.dtype}-{self.kv_layout}-{self.form}-p{self.page_size}"


def grid_cases(name: str, platform: str) -> list:
  if name == "features":
    return feature_cases(platform)
  if name == "append":
    axes = {"dtype": platform_dtypes(platform), "kv_layout": ("NHD", "HND"),
            "form": ("5d", "tuple"), "page_size": (1, 8, 16)}
    seed = zlib.crc32(f"append-{platform}".encode())
    return [AppendCase(**row) for row in pairwise(axes, seed)]
  axes = {
      "dtype": platform_dtypes(platform),
      "kv_layout": ("NHD", "HND"),
      "form": ("5d", "tuple"),
      "page_size": (1, 8, 16),
      "head_dim": (64, 128, 256),
      "heads": HEADS,
      "pos": ("NONE", "ROPE_LLAMA", "ALIBI"),
      "return_lse": (False, True),
  }
  if name == "prefill":
    axes["causal"] = (False, True)
  elif name == "decode":
    axes["tensor_cores"] = (False, True)
  else:
    raise KeyError(name)
  seed = zlib.crc32(f"{name}-{platform}".encode())
  return [Case(**row) for row in pairwise(axes, seed)]


@dataclasses.dataclass(frozen=True)
class FeatureCase:
  op: str  # "decode", "decode-tc", "prefill", "prefill-causal"
  dtype: str
  kv_layout: str
  form: str
  page_size: int
  head_dim: int
  heads: tuple
  pos: str
  soft_cap: float  # 0: none
  window_left: int  # -1: none
  sinks: bool

  @property
  def id(self):
    return (f"{self.op}-{self.dtype}-{self.kv_layout}-{self.form}-p{self.page_size}"
            f"-d{self.head_dim}-h{self.heads[0]}x{self.heads[1]}-{self.pos}"
            f"-cap{self.soft_cap:g}-w{self.window_left}{'-sinks' if self.sinks else ''}")


def feature_cases(platform):
  axes = {
      "op": ("decode", "decode-tc", "prefill", "prefill-causal"),
      "dtype": platform_dtypes(platform),
      "kv_layout": ("NHD", "HND"),
      "form": ("5d", "tuple"),
      "page_size": (1, 16),
      "head_dim": (64, 128, 256),
      "heads": ((8, 2), (12, 4), (4, 4)),
      "pos": ("NONE", "ROPE_LLAMA", "ALIBI"),
      # A small cap, so that the usual logits (|x| ~ 1-3) are visibly bent.
      "soft_cap": (0.0, 2.0),
      "window_left": (-1, 0, 7, 40),
      "sinks": (False, True),
  }
  rows = pairwise(axes, zlib.crc32(f"features-{platform}".encode()))
  # Every feature alone once, on the plainest setting, so a failure names it.
  plain = dict(dtype=platform_dtypes(platform)[-1], kv_layout="NHD", form="5d", page_size=16,
               head_dim=128, heads=(8, 2), pos="NONE", soft_cap=0.0, window_left=-1,
               sinks=False)
  for op in axes["op"]:
    for feature in (dict(soft_cap=2.0), dict(window_left=7), dict(sinks=True)):
      rows.append(dict(plain, op=op, **feature))
  return [FeatureCase(**r) for r in rows]


# ------------------------------------------------------------------ page tables


@dataclasses.dataclass
class PageTable:
  indptr: np.ndarray  # int32 [B+1]
  indices: np.ndarray  # int32 [nnz_pages]
  last_page_len: np.ndarray  # int32 [B]
  kv_lens: np.ndarray  # int64 [B]
  num_pages: int  # pages in the cache (>= nnz_pages: spare pages hold garbage)


def page_table(rng, kv_lens, page_size, spare_pages=3, last_len_of_empty=0) -> PageTable:
  """CSR page table for the given key lengths, pages placed at random in a larger cache.

  A request with 0 keys gets no pages and ``last_page_len = last_len_of_empty``.
  """
  kv_lens = np.asarray(kv_lens, dtype=np.int64)
  npages = -(-kv_lens // page_size)
  total = int(npages.sum())
  num_pages = total + spare_pages
  perm = rng.permutation(num_pages).astype(np.int32)
  indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
  last = np.where(npages > 0, kv_lens - (npages - 1) * page_size, last_len_of_empty)
  return PageTable(indptr, perm[:total], last.astype(np.int32), kv_lens, num_pages)


def varied_lengths(rng, page_size, count, max_len, include_zero=True):
  """Lengths mixing the edge cases (1, exact page multiples, 0) with random ones."""
  fixed = [1, page_size, 2 * page_size, 3 * page_size + 1]
  if include_zero:
    fixed.append(0)
  rest = rng.integers(1, max_len + 1, size=max(0, count - len(fixed))).tolist()
  lens = (fixed + rest)[:count]
  rng.shuffle(lens)
  return np.asarray(lens, dtype=np.int64)


# ------------------------------------------------------------------------ caches


def round_to(x, dtype) -> np.ndarray:
  """x rounded to `dtype` and returned as float32 numpy (the oracle's input)."""
  return np.array(jnp.asarray(x, jnp.float32).astype(dtype).astype(jnp.float32))  # writable copy


def random_cache(rng, num_pages, page_size, num_kv_heads, head_dim, dtype_name):
  """Random K and V pages [P, S, H, D] (NHD) as float32 holding `dtype`-exact values.

  Normal data is never zero, so a kernel that reads the wrong page or slot, or skips a
  page, changes the result visibly; every page and slot (including those no request
  owns) holds such data.
  """
  shape = (num_pages, page_size, num_kv_heads, head_dim)
  k = round_to(rng.standard_normal(shape, dtype=np.float32), DTYPES[dtype_name])
  v = round_to(rng.standard_normal(shape, dtype=np.float32), DTYPES[dtype_name])
  return k, v


def cache_in_form(k_nhd, v_nhd, dtype_name, kv_layout, form):
  """The user-facing cache built from NHD float32 pages: 5-D combined or (k, v) tuple,
  NHD ([P, S, H, D]) or HND ([P, H, S, D]), in the given dtype (numpy)."""
  dt = np.dtype(DTYPES[dtype_name])
  k, v = k_nhd, v_nhd
  if kv_layout == "HND":
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  k = np.ascontiguousarray(k).astype(dt)
  v = np.ascontiguousarray(v).astype(dt)
  if form == "tuple":
    return (k, v)
  return np.ascontiguousarray(np.stack([k, v], axis=1))


def split_run_result(res, return_lse):
  """(out, lse or None) from a wrapper's run(), checking its return shape."""
  if return_lse:
    assert isinstance(res, tuple) and len(res) == 2, "return_lse=True must give (out, lse)"
    return res
  assert not isinstance(res, tuple), "return_lse=False must give out alone"
  return res, None


def put(tree, device):
  return jax.tree_util.tree_map(lambda x: jax.device_put(x, device), tree)


def oracle(q, k_nhd, v_nhd, qo_indptr, table: PageTable, **kw):
  """The float32 reference, always evaluated on the CPU (no TF32, deterministic)."""
  with jax.default_device(cpu()):
    out, lse = reference.batch_attention(
        np.asarray(q, np.float32), (k_nhd, v_nhd), qo_indptr, table.indptr,
        table.indices, table.last_page_len, kv_layout="NHD", **kw)
    return np.asarray(out), np.asarray(lse)


# ------------------------------------------------------------------------ checks


def assert_attention_close(out, lse, ref_out, ref_lse, dtype_name, *, out_tol=None,
                           lse_tol=None, what=""):
  """Compares kernel output with the oracle.

  * no NaN anywhere; every output finite;
  * rows the oracle marks empty (lse = -inf: no visible key, or padding) must be
    exactly 0 in `out` and exactly -inf in `lse`;
  * other rows within the dtype's tolerance; lse finite there.
  `lse` may be None when the op was not asked for it.
  """
  out = np.asarray(jnp.asarray(out).astype(jnp.float32))
  assert out.shape == ref_out.shape, (what, out.shape, ref_out.shape)
  bad_at = np.argwhere(~np.isfinite(out))[:5]
  assert bad_at.size == 0, f"{what}: non-finite output at {bad_at.tolist()}"
  empty = np.isneginf(ref_lse)  # [T, H]
  if empty.any():
    bad = np.abs(out[empty]).max()
    assert bad == 0.0, f"{what}: rows without keys must be exactly 0, max |out| = {bad}"
  tol = OUT_TOL[dtype_name] if out_tol is None else out_tol
  live = ~empty
  np.testing.assert_allclose(out[live], ref_out[live], atol=tol, rtol=tol, err_msg=what)
  if lse is not None:
    lse = np.asarray(lse)
    assert lse.dtype == np.float32, f"{what}: lse dtype {lse.dtype}"
    assert lse.shape == ref_lse.shape, (what, lse.shape, ref_lse.shape)
    assert not np.isnan(lse).any(), f"{what}: NaN in lse"
    assert np.isneginf(lse[empty]).all(), f"{what}: rows without keys must have lse -inf"
    assert np.isfinite(lse[live]).all(), f"{what}: non-finite lse on a row with keys"
    ltol = LSE_TOL[dtype_name] if lse_tol is None else lse_tol
    np.testing.assert_allclose(lse[live], ref_lse[live], atol=ltol, rtol=0, err_msg=what)
