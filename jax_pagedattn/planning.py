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
import numbers
import os

import jax
import jax.numpy as jnp
import numpy as np

from jax_pagedattn import _C, switches
from jax_pagedattn import layout as layout_lib

POS_ENCODING_MODES = {"NONE": 0, "ROPE_LLAMA": 1, "ALIBI": 2}
SUPPORTED_HEAD_DIMS = (64, 128, 256)
_DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}
# KV-cache-only dtypes: fp8 caches, read beside a float16 / bfloat16 query.
FP8_KV_DTYPES = {"float8_e4m3fn": jnp.float8_e4m3fn, "float8_e5m2": jnp.float8_e5m2}


@dataclasses.dataclass(frozen=True)
class Capacities:
  """Static sizes of a plan: requests, query tokens, kv_indices entries, work items,
  split-KV partial rows and bins (CTAs per kv head of the GPU grid). The C++ struct of
  the same name and fields (plan_layout.h) is what the native code reads."""

  batch: int
  tokens: int
  pages: int
  work: int
  partial_rows: int
  bins: int


def partial_row_bytes(num_qo_heads: int, head_dim: int) -> int:
  """Workspace bytes of one split-KV partial row (params.h, PartialRowBytes)."""
  return _C.partial_row_bytes(num_qo_heads, head_dim)


# The attention kernels, as tile_rows.h numbers them.
KERNELS = {"decode": 0, "tensor_core_decode": 1, "prefill": 2}


def hopper_prefill(kernel: str, q_dtype: str, kv_dtype: str, head_dim: int,
                   device=None) -> bool:
  """Whether `kernel`'s calls of these settings run on the Hopper prefill kernel on
  `device` (only the prefill kernel does; never an fp8 cache). The one answer that
  tile_rows and concurrent_ctas take."""
  return kernel == "prefill" and _hopper_prefill(device or _default_device(), str(q_dtype),
                                                 str(kv_dtype), int(head_dim),
                                                 switches.current().sm90_prefill)


def tile_rows(kernel: str, group_size: int, head_dim: int, hopper: bool) -> int:
  """Packed query rows per work item of `kernel` (tile_rows.h, TileRows): prefill items
  have the Hopper kernel's 128 rows at every head_dim where `hopper` (hopper_prefill)."""
  return _C.tile_rows(KERNELS[kernel], int(group_size), int(head_dim), bool(hopper))


@functools.lru_cache(maxsize=None)
def _hopper_prefill(device, q_dtype, kv_dtype, head_dim, sm90_prefill) -> bool:
  """The sm90 prefill kernel runs prefill calls of these settings on `device`: the switch
  allows it, this build has it, and it covers the types and head_dim there."""
  if not sm90_prefill or device.platform != "gpu" or not getattr(_C, "HAS_SM90_PREFILL", False):
    return False
  # Asked of the current CUDA device, as _C.ctas_per_sm is (concurrent_ctas).
  return bool(_C.hopper_prefill_covers(q_dtype, kv_dtype, head_dim))


def _caps_attr(caps: Capacities) -> dict:
  return {f.name: np.int32(getattr(caps, f.name)) for f in dataclasses.fields(Capacities)}


def _kv_layout_attr(kv_layout: str):
  return np.int32(layout_lib.KV_LAYOUT_CODE[kv_layout])


def _attr(encode, name: str | None = None, **field_kwargs):
  """A PlanConfig field that is also an FFI attribute of the call (attention_attrs.h):
  `encode` turns its value into the attribute, `name` renames it there."""
  return dataclasses.field(metadata={"ffi": (encode, name)}, **field_kwargs)


@dataclasses.dataclass(frozen=True)
class PlanConfig:
  """Everything static about a plan: part of the compile key of a jitted step. Fields
  made with `_attr` are the attention call's FFI attributes (ffi_attrs), under the same
  names as in the C++ AttentionAttrs."""

  target: str  # FFI target: "jax_pagedattn_decode" or "jax_pagedattn_prefill"
  caps: Capacities = _attr(_caps_attr)
  tile_rows: int = _attr(np.int32)
  num_qo_heads: int = _attr(np.int32)
  num_kv_heads: int = _attr(np.int32)
  head_dim: int = _attr(np.int32)
  page_size: int = _attr(np.int32)
  kv_layout: str = _attr(_kv_layout_attr)
  causal: bool = _attr(np.bool_)
  pos_encoding_mode: str = _attr(lambda m: np.int32(POS_ENCODING_MODES[m]), "pos_encoding")
  sm_scale: float = _attr(np.float32)
  rope_scale: float = _attr(np.float32)
  rope_theta: float = _attr(np.float32)
  logits_soft_cap: float = _attr(np.float32)  # 0: none
  window_left: int = _attr(np.int32)  # -1: none
  q_dtype: str
  kv_dtype: str
  # "decode" or "prefill": the kind of wrapper that made the plan (a tensor-core decode
  # plan runs the prefill kernel, but only a decode wrapper's run() takes it).
  wrapper: str
  # Runtime switches (switches.py) the kernels read, fixed when the plan was made.
  sm90_prefill: bool = _attr(np.bool_)
  sm90_stages: int = _attr(np.int32)
  sm90_drawn_tasks: bool = _attr(np.bool_)
  dependent_launch: bool = _attr(np.bool_)
  # Whether an fp8 cache may run on the GPU's tensor-core kernel (the lowering's gate;
  # not an attribute).
  fp8_tensor_cores: bool = False
  # The Hopper prefill kernel rotates a RoPE call's keys once into the workspace
  # (attention_attrs.h); the wrapper sets it only where that kernel runs with RoPE.
  sm90_rope_keys: bool = _attr(np.bool_, default=False)
  # Its consumer warpgroups take turns to issue their GEMMs (attention_attrs.h).
  sm90_pingpong: int = _attr(np.int32, default=-1)

  @property
  def group_size(self) -> int:
    return self.num_qo_heads // self.num_kv_heads

  @property
  def workspace_bytes(self) -> int:
    """Split-KV partial rows, one int32 merge counter per (token, kv head), the task
    counter, and the rotated keys where sm90_rope_keys asks (params.h, WorkspaceBytes)."""
    return _C.workspace_bytes(self.caps, self.num_qo_heads, self.head_dim, self.num_kv_heads,
                              page_size=self.page_size,
                              pos_encoding=int(POS_ENCODING_MODES[self.pos_encoding_mode]),
                              sm90_rope_keys=self.sm90_rope_keys,
                              q_itemsize=jnp.dtype(self.q_dtype).itemsize)


@functools.lru_cache(maxsize=256)
def ffi_attrs(config: PlanConfig) -> dict:
  """The attention call's attributes from its config (all but `combined`, which the
  cache operand decides); the C++ side decodes them into AttentionAttrs. Shared: do not
  modify the returned dictionary."""
  attrs = {}
  for f in dataclasses.fields(PlanConfig):
    if "ffi" in f.metadata:
      encode, name = f.metadata["ffi"]
      attrs[name or f.name] = encode(getattr(config, f.name))
  return attrs


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


def canonical_dtype(dtype, name: str, fp8: bool = False) -> str:
  """'float16' / 'bfloat16' / 'float32' (with `fp8`, also 'float8_e4m3fn' /
  'float8_e5m2') for a dtype given as a string, a numpy or JAX dtype, or a torch dtype
  or its name ('torch.float16', as FlashInfer code passes)."""
  try:
    return _canonical_dtype_cached(dtype, name, fp8)
  except TypeError:  # unhashable or not a dtype: the slow path says which
    return _canonical_dtype(dtype, name, fp8)


# plan() runs every step: its per-call Python is kept to dictionary lookups.
@functools.lru_cache(maxsize=64)
def _canonical_dtype_cached(dtype, name: str, fp8: bool) -> str:
  return _canonical_dtype(dtype, name, fp8)


# torch dtype names (after 'torch.') and the dtypes they mean; torch is never imported.
_TORCH_DTYPE_NAMES = {"half": "float16", "bfloat16": "bfloat16", "float16": "float16",
                      "float": "float32", "float32": "float32",
                      "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2"}


def _canonical_dtype(dtype, name: str, fp8: bool = False) -> str:
  allowed = dict(_DTYPES, **FP8_KV_DTYPES) if fp8 else _DTYPES
  names = ", ".join(allowed)
  text = str(dtype)
  if text.startswith("torch."):  # a torch dtype, or its name as a string
    if _TORCH_DTYPE_NAMES.get(text[len("torch."):]) not in allowed:
      torch_names = ", ".join(f"torch.{n}" for n in allowed)
      raise TypeError(f"{name} must be one of {torch_names} (or their numpy / JAX dtypes or "
                      f"names), got {text}")
    dtype = _TORCH_DTYPE_NAMES[text[len("torch."):]]
  try:
    d = jnp.dtype(dtype)
  except TypeError as e:
    raise TypeError(f"{name}: not a dtype: {dtype!r}; pass jnp.float16, jnp.bfloat16, "
                    f"'float16', 'bfloat16' or a torch dtype") from e
  if d.name not in allowed:
    raise TypeError(f"{name} must be one of {names}, got {d.name}")
  return d.name


def next_pow2(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


# On the CPU the bins only feed the handler's dynamic task queue: a few per thread keep
# the threads balanced when request lengths differ.
_CPU_BINS_PER_THREAD = 4


def concurrent_ctas(tensor_cores: bool, dtype: str, head_dim: int, tile_rows: int,
                    hopper: bool, device=None) -> int:
  """CTAs of the attention kernel for this configuration that the device runs at once:
  SMs x CTAs per SM on a GPU, a few per thread on the CPU. The planner's bins (one CTA
  per kv head each) fill exactly this, so a launch is one balanced wave. `hopper`
  (hopper_prefill): the Hopper prefill kernel runs the calls; else the sm80 one, whose
  CTAs per SM with an fp8 cache are those of q's type (prefill_kernel.cuh)."""
  sw = switches.current()
  return _concurrent_ctas(device or _default_device(), bool(tensor_cores), str(dtype),
                          int(head_dim), int(tile_rows), sw.ctas_per_sm, bool(hopper))


@functools.lru_cache(maxsize=1)
def _default_device():
  return jax.devices()[0]


@functools.lru_cache(maxsize=None)
def _concurrent_ctas(device, tensor_cores, dtype, head_dim, tile_rows, ctas_per_sm,
                     hopper) -> int:
  if device.platform != "gpu":
    return _CPU_BINS_PER_THREAD * (os.cpu_count() or 1)
  sms = int(getattr(device, "core_count", 0) or 132)
  if ctas_per_sm:
    return sms * ctas_per_sm
  if getattr(_C, "HAS_CUDA", False) and dtype in ("float16", "bfloat16"):
    per_sm = _C.ctas_per_sm(tensor_cores, dtype, head_dim, tile_rows, hopper)
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
                      partial_rows_limit=-1, fixed_split_size=-1, max_qo_len=-1) -> Capacities:
  """Capacities holding any batch of up to `batch` requests, `tokens` query tokens and
  `pages` page ids, with bins for `num_ctas` concurrent CTAs (see concurrent_ctas).

  With `fixed_split_size` (pages, as plan_spec takes it) the work items and partial rows
  also hold the fixed pieces of any such batch whose requests have at most `max_qo_len`
  query tokens (1 for decode; -1 means `tokens`), unless `partial_rows_limit` (the
  workspace) is smaller: the planner then rejects a batch that needs more.
  """
  return Capacities(*_C.derive_capacities(batch, tokens, pages, group_size, tile_rows,
                                          num_kv_heads, num_ctas, partial_rows_limit,
                                          fixed_split_size, max_qo_len))


def plan_spec(*, page_size, group_size, tile_rows, causal, caps: Capacities,
              decode_names=False, num_pages=-1, fixed_split_size=-1, disable_split_kv=False,
              window_left=-1, longest_first=False):
  """The planner's spec (planner.h, PlanSpec): everything about a plan but the index
  arrays, made once per configuration. The deal comes from switches.py.

  fixed_split_size (pages, -1 none) and disable_split_kv fix every request's key
  pieces whatever the rest of the batch (batch invariance); window_left (-1 none) starts
  each query tile's keys at its window. longest_first orders the work items costliest
  first, for a kernel that draws them from one queue (the Hopper prefill kernel: pass
  hopper_prefill's answer). The planner rejects values outside their range.
  """
  return _C.PlanSpec(page_size=int(page_size), group_size=int(group_size),
                     tile_rows=int(tile_rows), causal=bool(causal), caps=caps,
                     deal=switches.DEALS[switches.current().deal],
                     decode_names=bool(decode_names), num_pages=int(num_pages),
                     fixed_split_size=int(fixed_split_size),
                     disable_split_kv=bool(disable_split_kv), window_left=int(window_left),
                     longest_first=bool(longest_first))


def plan_host(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, spec) -> np.ndarray:
  """Runs the C++ planner on host int32 arrays: the one way into it. Returns the plan
  buffer, a new read-only array.

  `qo_indptr=None` plans a decode batch (one query per request). Raises ValueError
  naming the offending argument.
  """
  return _C.plan(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, spec)


@functools.lru_cache(maxsize=256)
def plan_sections(caps: Capacities) -> dict:
  """{section: (offset, length)} of a plan buffer with these capacities."""
  return _C.plan_layout(caps)


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


def check_logits_soft_cap(cap) -> float:
  """FlashInfer's logits_soft_cap: None or 0 for none, else a positive finite float."""
  if cap is None:
    return 0.0
  value = float(cap)
  if not math.isfinite(value) or value < 0.0:
    raise ValueError(f"logits_soft_cap must be None, 0 or a positive finite number, got {cap!r}")
  return value


def check_window_left(window_left) -> int:
  """FlashInfer's window_left: -1 (or None) for no window, else keys p - window_left..p."""
  if window_left is None:
    return -1
  if isinstance(window_left, bool) or int(window_left) != window_left or window_left < -1:
    raise ValueError(f"window_left must be -1 (no window) or an integer >= 0, got {window_left!r}")
  if window_left > np.iinfo(np.int32).max:
    raise ValueError(f"window_left must fit int32, got {window_left}")
  return int(window_left)


def check_fixed_split_size(fixed_split_size) -> int:
  """plan()'s fixed_split_size (FlashInfer's: pages per piece; None or -1: none) as the
  planner's PlanSpec takes it; raises ValueError for anything else."""
  if fixed_split_size is None:
    return -1
  if isinstance(fixed_split_size, bool) or not isinstance(fixed_split_size, numbers.Integral):
    raise ValueError(f"fixed_split_size must be a positive int (pages per split), or None / -1 "
                     f"for none; got {fixed_split_size!r}")
  n, top = int(fixed_split_size), int(np.iinfo(np.int32).max)
  if n != -1 and not 1 <= n <= top:
    raise ValueError(f"fixed_split_size must be a positive int (pages per split) up to "
                     f"{top}, or None / -1 for none; got {n}")
  return n


def default_sm_scale(head_dim: int, sm_scale) -> float:
  return float(1.0 / math.sqrt(head_dim)) if sm_scale is None else float(sm_scale)
