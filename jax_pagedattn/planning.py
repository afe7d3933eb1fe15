"""Plans: the host planner's output as a pytree that jitted steps take as an argument.

A `Plan` holds one int32 array (the plan buffer of docs/CONTRACT.md) and static
metadata (capacities, head counts, dtypes, tiling). Two plans with equal metadata have
equal buffer shapes, so a jitted step compiles once for every batch that fits.

Plans are values. `plan()` returns its buffer as a new read-only numpy array that
nothing writes again, so every copy of it (`jax.device_put` to any device or sharding,
`addressable_data`, a jit constant, a donated argument) holds that plan for as long as
it lives. A jitted step moves the buffer to the device once, with its other arguments,
however many attention ops (layers) read it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from jax_pagedattn import _C

POS_ENCODING_MODES = {"NONE": 0, "ROPE_LLAMA": 1, "ALIBI": 2}
SUPPORTED_HEAD_DIMS = (64, 128, 256)
_DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class Capacities:
  """Static sizes of a plan: requests, query tokens, kv_indices entries, work items,
  split-KV partial rows and bins (CTAs per kv head of the GPU grid)."""

  batch: int
  tokens: int
  pages: int
  work: int
  partial_rows: int
  bins: int


def partial_row_bytes(num_qo_heads: int, head_dim: int) -> int:
  """Workspace bytes of one split-KV partial row: float32 outputs and LSE of every head."""
  return num_qo_heads * (head_dim + 1) * 4


@dataclasses.dataclass(frozen=True)
class PlanConfig:
  """Everything static about a plan: part of the compile key of a jitted step."""

  target: str  # FFI target: "jax_pagedattn_decode" or "jax_pagedattn_prefill"
  caps: Capacities
  tile_rows: int
  num_qo_heads: int
  num_kv_heads: int
  head_dim: int
  page_size: int
  kv_layout: str
  causal: bool
  pos_encoding_mode: str
  sm_scale: float
  rope_scale: float
  rope_theta: float
  q_dtype: str
  kv_dtype: str
  # "decode" or "prefill": the kind of wrapper that made the plan (a tensor-core decode
  # plan runs the prefill kernel, but only a decode wrapper's run() takes it).
  wrapper: str

  @property
  def group_size(self) -> int:
    return self.num_qo_heads // self.num_kv_heads

  @property
  def workspace_bytes(self) -> int:
    """Split-KV partial rows, then one int32 merge counter per (token, kv head)
    (params.h, WorkspaceBytes)."""
    return (self.caps.partial_rows * partial_row_bytes(self.num_qo_heads, self.head_dim)
            + self.caps.tokens * self.num_kv_heads * 4)


@jax.tree_util.register_pytree_node_class
class Plan:
  """A planned batch: `buffer` (the int32 plan buffer: a read-only host numpy array
  from plan(), or any copy of it on a device) plus static `config`."""

  def __init__(self, buffer, config: PlanConfig):
    self.buffer = buffer
    self.config = config

  def tree_flatten(self):
    return (self.buffer,), self.config

  @classmethod
  def tree_unflatten(cls, config, children):
    return cls(children[0], config)

  def __repr__(self):
    c = self.config
    return (f"Plan(target={c.target}, caps={c.caps}, heads={c.num_qo_heads}/{c.num_kv_heads}, "
            f"head_dim={c.head_dim}, page_size={c.page_size}, layout={c.kv_layout})")


def canonical_dtype(dtype, name: str) -> str:
  """'float16' / 'bfloat16' / 'float32' for a dtype given as a string, a numpy or JAX
  dtype, or a torch dtype or its name ('torch.float16', as FlashInfer code passes)."""
  try:
    return _canonical_dtype_cached(dtype, name)
  except TypeError:  # unhashable or not a dtype: the slow path says which
    return _canonical_dtype(dtype, name)


# plan() runs every step: its per-call Python is kept to dictionary lookups.
@functools.lru_cache(maxsize=64)
def _canonical_dtype_cached(dtype, name: str) -> str:
  return _canonical_dtype(dtype, name)


# torch dtype names (after 'torch.') and the dtypes they mean; torch is never imported.
_TORCH_DTYPE_NAMES = {"half": "float16", "bfloat16": "bfloat16", "float16": "float16",
                      "float": "float32", "float32": "float32"}


def _canonical_dtype(dtype, name: str) -> str:
  text = str(dtype)
  if text.startswith("torch."):  # a torch dtype, or its name as a string
    if text[len("torch."):] not in _TORCH_DTYPE_NAMES:
      raise TypeError(f"{name} must be float16, bfloat16 or float32 (torch.float16, "
                      f"torch.bfloat16, torch.float32 or their numpy/JAX names), got {text}")
    dtype = _TORCH_DTYPE_NAMES[text[len("torch."):]]
  try:
    d = jnp.dtype(dtype)
  except TypeError as e:
    raise TypeError(f"{name}: not a dtype: {dtype!r}; pass jnp.float16, jnp.bfloat16, "
                    f"'float16', 'bfloat16' or a torch dtype") from e
  if d.name not in _DTYPES:
    raise TypeError(f"{name} must be float16, bfloat16 or float32, got {d.name}")
  return d.name


def next_pow2(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


# Environment override of the CTAs per SM the planner fills (a tuning knob for
# benchmarks; by default the occupancy calculator's answer for the kernel).
CTAS_PER_SM_ENV = "JAX_PAGEDATTN_CTAS_PER_SM"
# On the CPU the bins only feed the handler's dynamic task queue: a few per thread keep
# the threads balanced when request lengths differ.
_CPU_BINS_PER_THREAD = 4


def concurrent_ctas(tensor_cores: bool, dtype: str, head_dim: int, tile_rows: int,
                    device=None) -> int:
  """CTAs of the attention kernel for this configuration that the device runs at once:
  SMs x CTAs per SM on a GPU, a few per thread on the CPU. The planner's bins (one CTA
  per kv head each) fill exactly this, so a launch is one balanced wave."""
  return _concurrent_ctas(device or _default_device(), bool(tensor_cores), str(dtype),
                          int(head_dim), int(tile_rows), os.environ.get(CTAS_PER_SM_ENV, ""))


@functools.lru_cache(maxsize=1)
def _default_device():
  return jax.devices()[0]


@functools.lru_cache(maxsize=None)
def _concurrent_ctas(device, tensor_cores, dtype, head_dim, tile_rows, override) -> int:
  if device.platform != "gpu":
    return _CPU_BINS_PER_THREAD * (os.cpu_count() or 1)
  sms = int(getattr(device, "core_count", 0) or 132)
  if override:
    return sms * max(1, int(override))
  if getattr(_C, "HAS_CUDA", False) and dtype in ("float16", "bfloat16"):
    per_sm = _C.ctas_per_sm(tensor_cores, dtype, head_dim, tile_rows)
    if per_sm > 0:
      return sms * per_sm
  return sms


def as_host_int32(x, name: str) -> np.ndarray:
  if type(x) is np.ndarray and x.dtype == np.int32 and x.ndim == 1 and x.flags.c_contiguous:
    return x  # the common case, without the checks' cost
  a = np.asarray(x)
  if a.ndim != 1:
    raise ValueError(f"{name} must be a 1-D integer array, got shape {a.shape}")
  if a.size and not np.issubdtype(a.dtype, np.integer):
    raise TypeError(f"{name} must hold integers, got {a.dtype}")
  return np.ascontiguousarray(a, dtype=np.int32)


@functools.lru_cache(maxsize=256)
def derive_capacities(batch, tokens, pages, *, group_size, tile_rows, num_kv_heads, num_ctas,
                      partial_rows_limit=-1) -> Capacities:
  """Capacities holding any batch of up to `batch` requests, `tokens` query tokens and
  `pages` page ids, with bins for `num_ctas` concurrent CTAs (see concurrent_ctas)."""
  return Capacities(*_C.derive_capacities(batch, tokens, pages, group_size, tile_rows,
                                          num_kv_heads, num_ctas, partial_rows_limit))


def planner_args(*, page_size, num_qo_heads, num_kv_heads, tile_rows, causal,
                 caps: Capacities, num_pages=-1, decode_names=False) -> tuple:
  """The C++ planner's (`_C.plan`) arguments after the four index arrays."""
  return (int(page_size), int(num_qo_heads // num_kv_heads), int(num_kv_heads), int(tile_rows),
          bool(causal), int(num_pages), caps.batch, caps.tokens, caps.pages, caps.work,
          caps.partial_rows, caps.bins, bool(decode_names))


def plan_host(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, *, page_size, num_qo_heads,
              num_kv_heads, tile_rows, causal, caps: Capacities, num_pages=-1,
              decode_names=False) -> np.ndarray:
  """Runs the C++ planner on host arrays; returns the int32 plan buffer, a new
  read-only array.

  `qo_indptr=None` plans a decode batch (one query per request). Raises ValueError
  naming the offending argument.
  """
  args = planner_args(page_size=page_size, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
                      tile_rows=tile_rows, causal=causal, caps=caps, num_pages=num_pages,
                      decode_names=decode_names)
  return _C.plan(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, *args)


@functools.lru_cache(maxsize=256)
def plan_sections(caps: Capacities) -> dict:
  """{section: (offset, length)} of a plan buffer with these capacities."""
  return _C.plan_layout(caps.batch, caps.tokens, caps.pages, caps.work, caps.bins)


def unpack_plan(buffer, caps: Capacities) -> dict:
  """The sections of a plan buffer as numpy arrays (work is [work_cap, 8])."""
  buf = np.asarray(buffer)
  out = {}
  for name, section in plan_sections(caps).items():
    if name != "size":
      off, n = section
      out[name] = buf[off:off + n]
  out["work"] = out["work"].reshape(caps.work, _C.WORK_FIELDS)
  return out


def check_head_config(num_qo_heads, num_kv_heads, head_dim):
  if num_kv_heads <= 0 or num_qo_heads <= 0 or num_qo_heads % num_kv_heads:
    raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a positive multiple of "
                     f"num_kv_heads ({num_kv_heads})")
  if head_dim not in SUPPORTED_HEAD_DIMS:
    raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")


def check_pos_encoding(mode: str) -> str:
  if mode not in POS_ENCODING_MODES:
    raise ValueError(f"pos_encoding_mode must be one of {tuple(POS_ENCODING_MODES)}, got {mode!r}")
  return mode


def default_sm_scale(head_dim: int, sm_scale) -> float:
  return float(1.0 / math.sqrt(head_dim)) if sm_scale is None else float(sm_scale)
