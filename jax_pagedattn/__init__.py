"""jax_pagedattn: paged KV-cache attention for JAX (FlashInfer's plan/run model).

Ops are XLA FFI custom calls: CUDA kernels on NVIDIA GPUs, C++ handlers on the CPU,
and the jax.numpy reference on any other platform.
"""

from jax_pagedattn.cascade import (MultiLevelCascadeAttentionWrapper, merge_state,
                                   merge_state_in_place, merge_states)
from jax_pagedattn.decode import BatchDecodeWithPagedKVCacheWrapper
from jax_pagedattn.page import append_paged_kv_cache, get_batch_indices_positions
from jax_pagedattn.planning import Plan
from jax_pagedattn.prefill import (BatchAttentionWithAttentionSinkWrapper,
                                   BatchPrefillWithPagedKVCacheWrapper)
from jax_pagedattn.ragged import BatchPrefillWithRaggedKVCacheWrapper
from jax_pagedattn.rpa import ragged_paged_attention
from jax_pagedattn import sharding  # Shards, shard_plan, ShardedPlan, heads_per_shard, ...
from jax_pagedattn import primitives as _primitives  # registers the lowerings

native_platforms = _primitives.native_platforms

__all__ = [
    "BatchAttentionWithAttentionSinkWrapper",
    "BatchDecodeWithPagedKVCacheWrapper",
    "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper",
    "MultiLevelCascadeAttentionWrapper",
    "Plan",
    "append_paged_kv_cache",
    "get_batch_indices_positions",
    "merge_state",
    "merge_state_in_place",
    "merge_states",
    "native_platforms",
    "ragged_paged_attention",
    "sharding",
]
__version__ = "0.1.0"
