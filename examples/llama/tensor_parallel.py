"""The model split over a 1-D mesh of `tp` devices: heads and the MLP (Megatron style).

Column parallel: q/k/v projections (their output columns are heads, heads are
contiguous blocks of head_dim columns) and the MLP's gate and up projections; row
parallel: the o and down projections. Each device then computes its heads' attention
and its slice of the MLP on its own, and the row-parallel matmuls end in partial sums
that XLA adds with one all-reduce each, two per layer. The embedding, the norms and
lm_head are replicated: they are a small part of a layer's work, and a replicated
lm_head leaves the sampled tokens on every device without a gather.

Attention runs through jax_pagedattn's sharded ops (`sharding.Shards(mesh, heads="tp")`):
q and the paged caches stay split over heads, each device runs the kernels on its own
heads with a plan made once per step on the host for one shard's head counts
(`sharding.heads_per_shard`) and replicated. With more devices than KV heads the KV heads
are replicated, as tpu-inference does: the K/V projection weights are repeated once here
(`sharding.replicate_kv_heads`), so the served model has `tp` KV heads, each device one,
and its cache holds `tp / num_kv_heads` copies of each model head.

The mesh's axis is of the auto kind: XLA's partitioner carries the weights' shardings
through the matmuls and inserts the all-reduces, so the model code stays the same as
on one device. The sharded ops' own shard_map fixes q, the new K/V and the caches to
the head split, which the column-parallel projections already produce: no collective
touches them.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jax_pagedattn import sharding

AXIS = "tp"
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def request_host_devices(tp: int):
  """Asks jax for `tp` CPU devices when it has not started its backends yet.

  Harmless on a GPU machine (it only sizes the CPU client); after any jax computation it
  is too late, and `TensorParallel` then says how to ask through XLA_FLAGS instead. An
  XLA_FLAGS count that is already large enough is left alone (this setting overrides it).
  """
  if tp <= 1 or jax.config.jax_num_cpu_devices >= tp:
    return
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if f.startswith("--xla_force_host_platform_device_count=")]
  if flags and int(flags[-1].split("=")[1]) >= tp:
    return
  try:
    jax.config.update("jax_num_cpu_devices", tp)
  except RuntimeError:  # backends already started: TensorParallel reports the shortfall
    pass


class TensorParallel:
  """Where the served model's arrays live on a `tp`-device mesh, and its served shape."""

  def __init__(self, cfg, tp: int):
    devices = jax.devices()
    if len(devices) < tp:
      platform = devices[0].platform
      raise SystemExit(
          f"--tp {tp} needs {tp} {platform} devices, jax sees {len(devices)}. On CPU run "
          f"with XLA_FLAGS=--xla_force_host_platform_device_count={tp} (serve_llama.py asks "
          f"for them itself unless jax was started before it); on a GPU machine with fewer "
          f"GPUs, JAX_PLATFORMS=cpu runs on host devices.")
    try:  # tp must divide num_qo_heads, and divide num_kv_heads or be a multiple of it
      self.local_heads = sharding.heads_per_shard(cfg.num_qo_heads, cfg.num_kv_heads, tp)
    except ValueError as e:
      raise SystemExit(f"--tp {tp} does not fit the model's heads: {e}") from None
    if cfg.intermediate_size % tp:
      raise SystemExit(f"--tp {tp} must divide the MLP width {cfg.intermediate_size}")
    self.tp, self.model_cfg = tp, cfg
    # The served model: KV heads replicated up to tp when there are fewer.
    self.cfg = dataclasses.replace(
        cfg, num_kv_heads=sharding.sharded_kv_heads(cfg.num_kv_heads, tp))
    self.mesh = jax.make_mesh((tp,), (AXIS,), axis_types=(AxisType.Auto,),
                              devices=devices[:tp])
    self.shards = sharding.Shards(self.mesh, heads=AXIS)

  @property
  def replicated_kv(self) -> int:
    """Copies of each model KV head in the served model (1: none replicated)."""
    return self.cfg.num_kv_heads // self.model_cfg.num_kv_heads

  def cache_sharding(self) -> NamedSharding:
    """An NHD cache [pages, 2, page_size, kv_heads, head_dim] split over KV heads."""
    return NamedSharding(self.mesh, self.shards.cache("NHD", combined=True))

  def shard_state(self, state):
    """The model's state laid out for the mesh: K/V projections widened to the served
    KV heads, then every weight placed with its split."""

    def place(path, x):
      names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
      module = names[names.index("kernel") - 1] if "kernel" in names else None
      if module in ("k_proj", "v_proj"):
        x = self._replicate_kv(x)
      if module in COLUMN_PARALLEL:
        spec = P(None, AXIS)
      elif module in ROW_PARALLEL:
        spec = P(AXIS, None)
      else:
        spec = P()
      return jax.device_put(x, NamedSharding(self.mesh, spec))

    return jax.tree_util.tree_map_with_path(place, state)

  def _replicate_kv(self, kernel):
    """[hidden, num_kv_heads * head_dim] -> [hidden, served kv heads * head_dim]: served
    head j computes model head j // (tp / num_kv_heads), the head its query heads read."""
    cfg = self.model_cfg
    heads = kernel.reshape(kernel.shape[0], cfg.num_kv_heads, cfg.head_dim)
    heads = sharding.replicate_kv_heads(heads, cfg.num_kv_heads, self.tp, axis=1)
    return heads.reshape(kernel.shape[0], -1)


# An HLO instruction `name = shape op(...)`; the shape may be a tuple (XLA combines
# collectives), and GPU code splits them into op-start / op-done.
_COLLECTIVE = re.compile(r"=\s*(.+?)\s+(all-gather|all-to-all|collective-permute|all-reduce|"
                         r"reduce-scatter)(?:-start)?\(")


def collectives(hlo_text: str) -> dict[str, int]:
  """Cross-device ops of a compiled step, counted by kind and result shape
  ("all-reduce f32[6,256]"): what the split costs in communication. The design gives
  two all-reduces of [rows, hidden] per layer, and nothing that moves q or the caches."""
  found = collections.Counter(f"{kind} {re.sub(r'{[^}]*}', '', shape)}"
                              for shape, kind in _COLLECTIVE.findall(hlo_text))
  return dict(sorted(found.items()))
