"""Benchmark workloads: presets, length distributions, page tables and input data.

A workload is a batch shape (requests, their query and key lengths, head counts, head
dim, page size, layout, dtype). From it the benchmark builds a page pool, one or more
*page sets* (the same requests placed on disjoint random pages of the pool, so that
consecutive timed calls can read different memory when one call's bytes fit in L2),
and the random cache and queries on the device.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# DESIGN.md §6: the decode rows, two batches of very unequal lengths, and the causal
# prefill rows. Each value is (batch, length spec); see `parse_lengths`.
DECODE_PRESETS = {
    "16x4096": (16, "4096"),
    "64x4096": (64, "4096"),
    "128x2048": (128, "2048"),
    "8x32768": (8, "32768"),
    "256x1024": (256, "1024"),
    "lognormal64": (64, "lognormal:16:32768"),
    "zipf64": (64, "zipf:16:32768"),
}
# The other shapes issue 4 holds decode to: 64 x 4096 with one setting changed each.
# (batch, length spec, settings that differ from the command line's).
DECODE_VARIANTS = {
    "d64-64x4096": (64, "4096", dict(head_dim=64)),
    "d256-64x4096": (64, "4096", dict(head_dim=256)),
    "page1-64x4096": (64, "4096", dict(page_size=1)),
    "page64-64x4096": (64, "4096", dict(page_size=64)),
    "mha-64x4096": (64, "4096", dict(heads=(32, 32))),
    "gqa8-64x4096": (64, "4096", dict(heads=(8, 1))),
}
# The model-shaped decode step (issue 13): L attention ops, each layer with its own
# cache, sharing one fresh plan per step, on the rows the README's headline quotes.
MODEL_ROWS = ("16x4096", "64x4096", "256x1024", "lognormal64")
MODEL_LAYERS = (16, 32)
DECODE_MODEL = {f"{name}-L{layers}": (*DECODE_PRESETS[name], dict(layers=layers))
                for layers in MODEL_LAYERS for name in MODEL_ROWS}
# Issue 15's cascade row: 64 requests whose first 16k keys are one shared prefix (the
# same pages), plus 512 keys of their own. Plain decode reads the prefix once per
# request; MultiLevelCascadeAttentionWrapper reads it once for the batch.
DECODE_CASCADE = {"cascade64": (64, "512", dict(shared_prefix=16384))}
PREFILL_PRESETS = {
    "4x2048": (4, "2048"),
    "1x8192": (1, "8192"),
    "16x512": (16, "512"),
    # Chunked prefill: 1024 new tokens over a 4096-token cached prefix.
    "8x1024+4096": (8, "1024", dict(prefix=4096)),
    # Variable lengths: many short prompts and a few long ones.
    "lognormal16": (16, "lognormal:64:8192"),
}
# The rows issue 14 holds prefill to with one setting changed from 4 x 2048.
PREFILL_VARIANTS = {
    "d64-4x2048": (4, "2048", dict(head_dim=64)),
    "d256-4x2048": (4, "2048", dict(head_dim=256)),
    "page1-4x2048": (4, "2048", dict(page_size=1)),
    "rope-4x2048": (4, "2048", dict(pos_encoding="ROPE_LLAMA")),
    "alibi-4x2048": (4, "2048", dict(pos_encoding="ALIBI")),
}
PRESETS = {"decode": {**DECODE_PRESETS, **DECODE_VARIANTS, **DECODE_MODEL, **DECODE_CASCADE},
           "prefill": {**PREFILL_PRESETS, **PREFILL_VARIANTS}}
# Names that --preset accepts for several presets at once ('all' leaves out the model
# steps, which allocate a cache per layer, and the cascade row: ask for them by name or
# group).
PRESET_GROUPS = {
    "decode": {"all": [*DECODE_PRESETS, *DECODE_VARIANTS], "design": list(DECODE_PRESETS),
               "variants": list(DECODE_VARIANTS), "cascade": list(DECODE_CASCADE),
               **{f"model{layers}": [n for n, v in DECODE_MODEL.items()
                                     if v[2]["layers"] == layers] for layers in MODEL_LAYERS}},
    "prefill": {"all": [*PREFILL_PRESETS, *PREFILL_VARIANTS], "design": list(PREFILL_PRESETS),
                "variants": list(PREFILL_VARIANTS)},
}


def preset_names(kind: str, spec: str) -> list[str]:
  """Preset names of a --preset value: group names ('all', 'design', 'variants') and
  single names, comma separated, in order, without repeats."""
  out = []
  for part in (p.strip() for p in spec.split(",") if p.strip()):
    for name in PRESET_GROUPS[kind].get(part, [part]):
      if name not in out:
        out.append(name)
  return out


def preset(kind: str, name: str) -> tuple[int, str, dict]:
  """(batch, length spec, setting overrides) of a preset."""
  entry = PRESETS[kind][name]
  return (entry[0], entry[1], entry[2] if len(entry) > 2 else {})

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "f16": "float16", "half": "float16",
                  "fp32": "float32", "f32": "float32"}
# The fp8 KV-cache types (issue 15), one byte a value; the query stays in --dtype.
FP8_KV_DTYPES = {"float8_e4m3fn": "fp8e4m3", "float8_e5m2": "fp8e5m2"}
# FlashInfer's dequantisation scales of an fp8 cache, fixed for every fp8 row. Not 1, so
# that a scale which never reaches a kernel shows in the rel err.
FP8_K_SCALE = 0.75
FP8_V_SCALE = 1.25


def canonical_dtype(name: str) -> str:
  name = _DTYPE_ALIASES.get(name, name)
  if name not in _DTYPE_BYTES:
    raise ValueError(f"--dtype must be one of bfloat16, float16, float32, got {name!r}")
  return name


# ------------------------------------------------------------------ features


@dataclasses.dataclass(frozen=True)
class Features:
  """What a row asks of the attention beyond plain paged attention (issue 15): an fp8
  cache, soft-capping, a sliding window, sinks, fixed splits. The default is none."""

  kv_dtype: str | None = None  # a key of FP8_KV_DTYPES; None: the cache has q's dtype
  logits_soft_cap: float = 0.0  # > 0: c tanh(x / c) of each scaled logit
  window_left: int = -1  # >= 0: query position p sees keys p - window_left .. p
  sinks: bool = False  # one random float32 sink logit per query head (make_sinks)
  fixed_split_size: int = -1  # > 0: keys split at multiples of this many pages only
  disable_split_kv: bool = False  # no request's keys are split

  def __post_init__(self):
    if self.kv_dtype is not None and self.kv_dtype not in FP8_KV_DTYPES:
      raise ValueError(f"--kv-dtype must be one of {', '.join(FP8_KV_DTYPES)}, "
                       f"got {self.kv_dtype!r}")
    if self.logits_soft_cap < 0:
      raise ValueError(f"--soft-cap must be > 0, got {self.logits_soft_cap}")
    if self.window_left < -1:
      raise ValueError(f"--window-left must be >= 0 (or -1: none), got {self.window_left}")
    if self.fixed_split_size == 0 or self.fixed_split_size < -1:
      raise ValueError(f"--fixed-split-size must be >= 1 pages, got {self.fixed_split_size}")

  def labels(self) -> list[str]:
    """Short names of the features, in a fixed order: they make a row's name."""
    out = []
    if self.kv_dtype:
      out.append(FP8_KV_DTYPES[self.kv_dtype])
    if self.logits_soft_cap > 0:
      out.append(f"cap{self.logits_soft_cap:g}")
    if self.window_left >= 0:
      out.append(f"win{self.window_left}")
    if self.sinks:
      out.append("sinks")
    if self.fixed_split_size > 0:
      out.append(f"split{self.fixed_split_size}")
    if self.disable_split_kv:
      out.append("nosplit")
    return out

  @property
  def suffix(self) -> str:
    """Appended to a row's name ('-fp8e4m3-win4096'); empty without features."""
    return "".join("-" + label for label in self.labels())

  @property
  def changes_math(self) -> bool:
    """Whether the output differs from plain attention: the systems that lack these
    features cannot run the row. Fixed splits only change where a plan cuts."""
    return bool(self.kv_dtype or self.logits_soft_cap > 0 or self.window_left >= 0
                or self.sinks)

  def summary(self) -> dict:
    return dict(dataclasses.asdict(self), features=self.labels())


NO_FEATURES = Features()


# ------------------------------------------------------------------ lengths


def parse_lengths(spec: str):
  """A length spec -> function(batch, numpy Generator) -> int64 lengths [batch].

  Forms (all bounds inclusive, all lengths >= 1):
    N                      every request has N keys
    A:B                    uniform integers in [A, B]
    zipf:LO:HI[:S]         Zipf's law by rank: the r-th longest request (r = 1..batch)
                           has max(LO, HI / r**S) keys (S defaults to 1), in random
                           order; deterministic lengths, so runs compare exactly
    lognormal:LO:HI[:SIG]  exp(N(mu, SIG)) clipped to [LO, HI], mu the log-midpoint of
                           the bounds and SIG defaulting to ln(HI/LO)/4 (wide: a few
                           requests near HI, many short ones)
  """
  text = str(spec).strip()
  parts = text.split(":")
  try:
    if parts[0] == "zipf":
      if len(parts) not in (3, 4):
        raise ValueError
      lo, hi = int(parts[1]), int(parts[2])
      s = float(parts[3]) if len(parts) == 4 else 1.0
      _check_bounds(text, lo, hi)

      def zipf(batch, rng):
        ranks = np.arange(1, batch + 1, dtype=np.float64)
        lens = np.maximum(lo, np.round(hi / ranks**s)).astype(np.int64)
        return rng.permutation(np.minimum(lens, hi))

      return zipf
    if parts[0] == "lognormal":
      if len(parts) not in (3, 4):
        raise ValueError
      lo, hi = int(parts[1]), int(parts[2])
      _check_bounds(text, lo, hi)
      sigma = float(parts[3]) if len(parts) == 4 else max(math.log(hi / lo) / 4.0, 1e-6)
      mu = 0.5 * (math.log(lo) + math.log(hi))

      def lognormal(batch, rng):
        x = np.exp(rng.normal(mu, sigma, size=batch))
        return np.clip(np.round(x), lo, hi).astype(np.int64)

      return lognormal
    if len(parts) == 2:
      lo, hi = int(parts[0]), int(parts[1])
      _check_bounds(text, lo, hi)
      return lambda batch, rng: rng.integers(lo, hi + 1, size=batch).astype(np.int64)
    if len(parts) == 1:
      n = int(parts[0])
      _check_bounds(text, n, n)
      return lambda batch, rng: np.full(batch, n, np.int64)
  except _BoundsError:
    raise
  except ValueError:
    pass  # a number that does not parse, or the wrong number of fields
  raise ValueError(f"length spec {spec!r}: expected N, A:B, zipf:LO:HI[:S] or "
                   f"lognormal:LO:HI[:SIGMA]")


class _BoundsError(ValueError):
  pass


def _check_bounds(spec, lo, hi):
  if lo < 1 or hi < lo:
    raise _BoundsError(f"length spec {spec!r}: need 1 <= low <= high, got {lo}..{hi}")


def parse_heads(text: str) -> tuple[int, int]:
  """'32/8' -> (32, 8); '32' -> (32, 32)."""
  parts = str(text).split("/")
  try:
    qo = int(parts[0])
    kv = int(parts[1]) if len(parts) == 2 else qo
  except (ValueError, IndexError):
    raise ValueError(f"--heads must look like QO/KV (e.g. 32/8), got {text!r}") from None
  if len(parts) > 2 or qo < 1 or kv < 1 or qo % kv:
    raise ValueError(f"--heads {text!r}: need positive QO a multiple of KV")
  return qo, kv


# ------------------------------------------------------------------ workloads


@dataclasses.dataclass
class Workload:
  """One batch to time. qo_lens are ones for decode; for prefill, kv = prefix + qo."""

  name: str
  kind: str  # "decode" or "prefill"
  qo_lens: np.ndarray
  kv_lens: np.ndarray
  num_qo_heads: int
  num_kv_heads: int
  head_dim: int
  page_size: int
  kv_layout: str
  dtype: str
  causal: bool
  length_spec: str = ""
  # > 1: a model-shaped decode step of this many attention ops, each layer with its own
  # cache, sharing one fresh plan per step (bench_model.py); times are per layer.
  layers: int = 1
  # "NONE", "ROPE_LLAMA" or "ALIBI" (applied inside the attention, DESIGN.md §3).
  pos_encoding: str = "NONE"
  # Decode: the first `shared_prefix` keys of every request are one prefix on the same
  # pages (whole pages), included in kv_lens; the rest are the request's own.
  shared_prefix: int = 0
  # Prefill: the systems that can (ours, FlashInfer) read ragged K/V, every request's
  # keys contiguous (`ragged_kv`), instead of the paged cache.
  ragged: bool = False
  # fp8 cache, soft-cap, window, sinks, fixed splits; their labels end the name.
  features: Features = NO_FEATURES

  @property
  def batch(self) -> int:
    return int(self.kv_lens.shape[0])

  @property
  def itemsize(self) -> int:
    return _DTYPE_BYTES[self.dtype]

  @property
  def kv_dtype(self) -> str:
    """The cache's dtype: fp8 where the row asks for it, else q's."""
    return self.features.kv_dtype or self.dtype

  @property
  def kv_itemsize(self) -> int:
    return 1 if self.features.kv_dtype else self.itemsize

  @property
  def seed_name(self) -> str:
    """The name that seeds page placement and data: a row with features draws the
    numbers of the same row without them (fp8: rounded) and, when both cycle over as
    many page sets (`rotations_for`), its pages too, so the two compare like for like."""
    suffix = self.features.suffix
    return self.name[:-len(suffix)] if suffix and self.name.endswith(suffix) else self.name

  @property
  def group(self) -> int:
    return self.num_qo_heads // self.num_kv_heads

  @property
  def tokens(self) -> int:
    return int(self.qo_lens.sum())

  @property
  def pages_per_request(self) -> np.ndarray:
    return -(-self.kv_lens // self.page_size)

  @property
  def shared_pages(self) -> int:
    return self.shared_prefix // self.page_size

  @property
  def kv_bytes(self) -> int:
    """K and V bytes a kernel must read: every key of every request that some query of
    it sees, once (a shared prefix once per request, as plain decode reads it; with a
    sliding window only the keys from the first query's window start on)."""
    keys = self.kv_lens - self._first_visible_key(self.kv_lens - self.qo_lens)
    return int(keys.sum()) * self.num_kv_heads * self.head_dim * 2 * self.kv_itemsize

  @property
  def step_kv_bytes(self) -> int:
    """K and V bytes one timed call reads: every layer's cache."""
    return self.kv_bytes * self.layers

  @property
  def qo_bytes(self) -> int:
    """q read plus output written."""
    return self.tokens * self.num_qo_heads * self.head_dim * 2 * self.itemsize

  @property
  def bytes_moved(self) -> int:
    return self.kv_bytes + self.qo_bytes

  @property
  def flops(self) -> int:
    """4 * D * Hqo per (query, visible key) pair: QK^T and PV, 2 flops a multiply-add.
    Query i of a request sits at position p = kv_len - qo_len + i (bottom-right
    aligned); causal rows see keys up to p, so only the visible half of the square is
    counted, and a sliding window drops the keys before p - window_left."""
    pairs = 0
    for qo, kv in zip(self.qo_lens.tolist(), self.kv_lens.tolist()):
      pos = np.arange(kv - qo, kv, dtype=np.int64)
      end = pos + 1 if self.causal else np.full_like(pos, kv)
      pairs += int((end - self._first_visible_key(pos)).sum())
    return 4 * self.head_dim * self.num_qo_heads * pairs

  def _first_visible_key(self, pos):
    """The first key the query at position `pos` sees (the sliding window's start)."""
    w = self.features.window_left
    return np.maximum(pos - w, 0) if w >= 0 else np.zeros_like(pos)

  def summary(self) -> dict:
    kv = self.kv_lens
    out = dict(name=self.name, kind=self.kind, batch=self.batch, length_spec=self.length_spec,
               kv_len_min=int(kv.min()), kv_len_max=int(kv.max()), kv_len_mean=float(kv.mean()),
               kv_tokens=int(kv.sum()), qo_tokens=self.tokens, num_qo_heads=self.num_qo_heads,
               num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, page_size=self.page_size,
               kv_layout=self.kv_layout, dtype=self.dtype, causal=self.causal,
               kv_bytes=self.kv_bytes, bytes_moved=self.bytes_moved, flops=self.flops,
               layers=self.layers, pos_encoding=self.pos_encoding,
               shared_prefix=self.shared_prefix, ragged=self.ragged)
    out.update(self.features.summary(), kv_dtype=self.kv_dtype)  # the cache's, fp8 or not
    return out


def make_workload(name, kind, batch, length_spec, *, heads=(32, 8), head_dim=128, page_size=16,
                  kv_layout="NHD", dtype="bfloat16", causal=True, prefix=0, seed=0,
                  layers=1, pos_encoding="NONE", shared_prefix=0, ragged=False,
                  features=NO_FEATURES) -> Workload:
  """Draws the lengths (seeded by the workload name too, so each preset keeps its lengths
  when other presets are added or removed from a sweep; a model-shaped row '...-L16', a
  ragged row '...-ragged' and a row with features '...-cap30' draw those of the plain
  row)."""
  if batch < 1:
    raise ValueError(f"batch must be >= 1, got {batch}")
  if page_size < 1:
    raise ValueError(f"page size must be >= 1, got {page_size}")
  if kv_layout not in ("NHD", "HND"):
    raise ValueError(f"--layout must be NHD or HND, got {kv_layout!r}")
  if layers < 1 or (layers > 1 and kind != "decode"):
    raise ValueError(f"--layers must be >= 1, and > 1 only for decode, got {layers} ({kind})")
  if shared_prefix < 0 or shared_prefix % page_size or (shared_prefix and kind != "decode"):
    raise ValueError(f"--shared-prefix must be whole pages (a multiple of the page size "
                     f"{page_size}) and is for decode only, got {shared_prefix} ({kind})")
  if ragged and kind != "prefill":
    raise ValueError(f"--ragged is for prefill only, got {kind}")
  if features.suffix and name.endswith(features.suffix):
    name_wo_features = name[:-len(features.suffix)]
  else:
    name_wo_features = name
  suffix = RAGGED_SUFFIX if ragged else f"-L{layers}" if layers > 1 else None
  base = (name_wo_features[:-len(suffix)] if suffix and name_wo_features.endswith(suffix)
          else name_wo_features)
  rng = np.random.default_rng([seed, _stable_hash(base)])
  lens = parse_lengths(length_spec)(batch, rng)
  if kind == "decode":
    qo, kv = np.ones(batch, np.int64), lens + int(shared_prefix)
  elif kind == "prefill":
    qo, kv = lens, lens + int(prefix)
  else:
    raise ValueError(f"kind must be decode or prefill, got {kind!r}")
  return Workload(name=name, kind=kind, qo_lens=qo, kv_lens=kv, num_qo_heads=heads[0],
                  num_kv_heads=heads[1], head_dim=head_dim, page_size=page_size,
                  kv_layout=kv_layout, dtype=canonical_dtype(dtype),
                  causal=bool(causal) if kind == "prefill" else False, length_spec=str(length_spec),
                  layers=int(layers), pos_encoding=str(pos_encoding),
                  shared_prefix=int(shared_prefix), ragged=bool(ragged), features=features)


# Appended to the name of a prefill workload timed on ragged K/V (`--ragged`).
RAGGED_SUFFIX = "-ragged"


def _stable_hash(text: str) -> int:
  # Python's hash() of a str changes per process; this one does not.
  h = 0
  for ch in text.encode():
    h = (h * 131 + ch) % (1 << 31)
  return h


# ------------------------------------------------------------------ page sets


@dataclasses.dataclass
class PageSet:
  """One placement of the batch's requests on pages of the pool (FlashInfer's CSR)."""

  kv_indptr: np.ndarray  # int32 [B+1]
  kv_indices: np.ndarray  # int32 [sum pages]
  kv_last_page_len: np.ndarray  # int32 [B]
  block_table: np.ndarray  # int32 [B, max_pages], padded with the request's first page

  @property
  def num_pages(self) -> int:
    return int(self.kv_indices.shape[0])


def rotations_for(bytes_per_call: int, l2_bytes: int, max_rotations: int) -> int:
  """How many disjoint page sets to cycle through so that a call's inputs were evicted
  from L2 by the calls between its reuses: the sets together span at least 2x L2."""
  if bytes_per_call <= 0:
    return 1
  return int(max(1, min(max_rotations, math.ceil(2 * l2_bytes / bytes_per_call))))


def build_page_sets(w: Workload, rotations: int, seed: int) -> tuple[int, list[PageSet]]:
  """(pool size, page sets): the pool holds exactly `rotations` batches' pages, shuffled,
  so every page a request reads sits at a random place in the pool. A shared prefix is
  one run of pages per set, listed first in every request's pages."""
  npages = w.pages_per_request
  shared = w.shared_pages
  per_set = int(npages.sum()) - shared * (w.batch - 1)  # distinct pages of one set
  pool = per_set * rotations
  rng = np.random.default_rng([seed, _stable_hash(w.seed_name), 1])
  perm = rng.permutation(pool).astype(np.int32)
  indptr = np.zeros(w.batch + 1, np.int32)
  indptr[1:] = np.cumsum(npages)
  last = (w.kv_lens - (npages - 1) * w.page_size).astype(np.int32)
  max_pages = int(npages.max())
  sets = []
  for r in range(rotations):
    distinct = perm[r * per_set:(r + 1) * per_set]
    prefix, own_pages = distinct[:shared], distinct[shared:]
    own_indptr = indptr - shared * np.arange(w.batch + 1)
    indices = np.concatenate([np.concatenate([prefix, own_pages[own_indptr[b]:own_indptr[b + 1]]])
                              for b in range(w.batch)]).astype(np.int32)
    table = np.empty((w.batch, max_pages), np.int32)
    for b in range(w.batch):
      own = indices[indptr[b]:indptr[b + 1]]
      table[b, :own.shape[0]] = own
      table[b, own.shape[0]:] = own[0]  # padding reads a page of its own request, masked
    sets.append(PageSet(indptr.copy(), np.ascontiguousarray(indices), last.copy(), table))
  return pool, sets


def cascade_levels(w: Workload, s: PageSet) -> list[tuple]:
  """MultiLevelCascadeAttentionWrapper's two levels of a shared-prefix decode batch, as
  (qo_indptr, kv_indptr, kv_indices, kv_last_page_len) each: level 0 is every request's
  query against the shared pages (one group), level 1 each request's own pages."""
  shared = w.shared_pages
  batch = w.batch
  own = [s.kv_indices[s.kv_indptr[b] + shared:s.kv_indptr[b + 1]] for b in range(batch)]
  own_pages = np.array([len(x) for x in own])
  own_lens = w.kv_lens - w.shared_prefix
  i32 = lambda x: np.asarray(x, np.int32)
  prefix = (i32([0, batch]), i32([0, shared]), i32(s.kv_indices[:shared]),
            i32([w.page_size if shared else 0]))
  unique = (i32(np.arange(batch + 1)), i32(np.concatenate([[0], np.cumsum(own_pages)])),
            i32(np.concatenate(own)),
            i32(np.where(own_pages > 0, own_lens - (own_pages - 1) * w.page_size, 0)))
  return [prefix, unique]


def qo_indptr(w: Workload) -> np.ndarray:
  out = np.zeros(w.batch + 1, np.int32)
  out[1:] = np.cumsum(w.qo_lens)
  return out


def kv_indptr(w: Workload) -> np.ndarray:
  """Row offsets of each request's keys in ragged K/V."""
  out = np.zeros(w.batch + 1, np.int32)
  out[1:] = np.cumsum(w.kv_lens)
  return out


def ragged_kv(w: Workload, cache, s: PageSet):
  """The keys and values of page set `s`, every request's contiguous (FlashInfer's ragged
  tensors): `[kv_tokens, Hkv, D]` for NHD, `[Hkv, kv_tokens, D]` for HND, on the cache's
  device. The same numbers as the paged cache holds, so the paged reference checks a
  ragged system too; made once per set, outside the timing."""
  import jax
  import jax.numpy as jnp

  # Flat key slot (page position in the set's page list * page_size + slot) of each
  # request's keys, in order: request b's start at kv_indptr[b] * page_size.
  rows = np.concatenate([s.kv_indptr[b] * w.page_size + np.arange(n)
                         for b, n in enumerate(w.kv_lens.tolist())]).astype(np.int32)

  @jax.jit
  def gather(cache, pages, rows):
    kv = cache[pages]  # [P, 2, page, Hkv, D] (NHD) or [P, 2, Hkv, page, D] (HND)
    if w.kv_layout == "HND":
      kv = jnp.swapaxes(kv, 2, 3)
    k = kv[:, 0].reshape(-1, w.num_kv_heads, w.head_dim)[rows]
    v = kv[:, 1].reshape(-1, w.num_kv_heads, w.head_dim)[rows]
    if w.kv_layout == "HND":
      k, v = jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)
    return k, v

  return jax.block_until_ready(gather(cache, jnp.asarray(s.kv_indices), jnp.asarray(rows)))


def ragged_maps(w: Workload):
  """Index maps between ragged query rows [T] and a dense [B, Lq] grid.

  Returns (dense_to_ragged [B, Lq] row of each slot (clipped; invalid slots point at
  row 0), dense_valid [B, Lq] bool, ragged_to_dense [T] flat slot b * Lq + i).
  """
  lq = int(w.qo_lens.max())
  starts = qo_indptr(w)[:-1]
  i = np.arange(lq)[None, :]
  valid = i < w.qo_lens[:, None]
  d2r = np.where(valid, starts[:, None] + i, 0).astype(np.int32)
  b_of_t = np.repeat(np.arange(w.batch), w.qo_lens)
  i_of_t = np.arange(w.tokens) - starts[b_of_t]
  r2d = (b_of_t * lq + i_of_t).astype(np.int32)
  return d2r, valid, r2d


def cache_shape(w: Workload, pool: int) -> tuple:
  """FlashInfer's combined 5-D cache: [pages, 2, page, heads, dim] (NHD) or
  [pages, 2, heads, page, dim] (HND)."""
  if w.kv_layout == "NHD":
    return (pool, 2, w.page_size, w.num_kv_heads, w.head_dim)
  return (pool, 2, w.num_kv_heads, w.page_size, w.head_dim)


def make_device_inputs(w: Workload, pool: int, seed: int):
  """Random normal cache and queries, drawn on the default device (a GB of host random
  numbers plus the copy would cost seconds per workload)."""
  import jax
  import jax.numpy as jnp

  kc, kq = jax.random.split(_workload_key(w, seed))
  q_shape = (w.tokens, w.num_qo_heads, w.head_dim)
  q = jax.jit(lambda k: jax.random.normal(k, q_shape, jnp.dtype(w.dtype)))(kq)
  return random_cache(w, pool, kc), jax.block_until_ready(q)


def random_cache(w: Workload, pool: int, key):
  """One random normal combined cache of `pool` pages, on the default device: drawn in
  q's dtype and, for an fp8 row, rounded to the fp8 type (so it holds the plain row's
  numbers, rounded)."""
  import jax
  import jax.numpy as jnp

  shape, dtype, kv_dtype = cache_shape(w, pool), jnp.dtype(w.dtype), jnp.dtype(w.kv_dtype)
  draw = jax.jit(lambda k: jax.random.normal(k, shape, dtype).astype(kv_dtype))
  return jax.block_until_ready(draw(key))


def make_sinks(w: Workload, seed: int):
  """The row's sink logits, float32 [Hqo] on the default device, or None without sinks.

  Around the log of the mean key count: with unit-variance logits each sink then weighs
  about as much as all of its row's keys together, so a sink a kernel drops (or counts
  twice) moves the output far past the rel-err tolerance."""
  if not w.features.sinks:
    return None
  import jax
  import jax.numpy as jnp

  key = jax.random.fold_in(_workload_key(w, seed), 2)
  centre = math.log(max(float(w.kv_lens.mean()), 1.0))
  return centre + jax.random.normal(key, (w.num_qo_heads,), jnp.float32)


def layer_cache_key(w: Workload, seed: int, layer: int):
  """The random key of layer `layer`'s cache in a model-shaped step (layer 0's cache is
  make_device_inputs' own)."""
  import jax

  return jax.random.fold_in(_workload_key(w, seed), 1000 + layer)


def _workload_key(w: Workload, seed: int):
  import jax

  # rbg: XLA's RngBitGenerator compiles in a fraction of threefry's time on the CPU.
  return jax.random.fold_in(jax.random.key(seed, impl="rbg"), _stable_hash(w.seed_name))
