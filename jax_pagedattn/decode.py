"""BatchDecodeWithPagedKVCacheWrapper: one query token per request."""

from __future__ import annotations

from jax_pagedattn import primitives
from jax_pagedattn._wrapper import PagedAttentionWrapper



class BatchDecodeWithPagedKVCacheWrapper(PagedAttentionWrapper):
  """Batched decode attention over a paged KV cache (FlashInfer's API, in JAX).

  Args:
    workspace_size: bytes the split-KV partial outputs may use at most, or FlashInfer's
      `float_workspace_buffer` (any array; its size in bytes is taken). The workspace
      itself is allocated by XLA per call, sized from the capacities.
    kv_layout: "NHD" or "HND".
    use_tensor_cores: run the GQA group as matrix rows through the prefill kernel.
    max_batch_size, max_num_pages: capacities; None fixes them at the first plan()
      (rounded up to a power of two) and keeps them, so later plans reuse compiled steps.
  """

  _decode = True

  def __init__(self, workspace_size=128 * 1024 * 1024, kv_layout: str = "NHD",
               use_tensor_cores: bool = False, max_batch_size: int | None = None,
               max_num_pages: int | None = None):
    super().__init__(workspace_size, kv_layout, max_batch_size, max_num_pages, None)
    self._use_tensor_cores = bool(use_tensor_cores)

  @property
  def use_tensor_cores(self) -> bool:
    return self._use_tensor_cores

  def plan(self, indptr, indices, last_page_len, num_qo_heads: int, num_kv_heads: int,
           head_dim: int, page_size: int, pos_encoding_mode: str = "NONE", sm_scale=None,
           rope_scale=None, rope_theta=None, q_data_type="float16", kv_data_type=None,
           data_type=None, window_left: int = -1, logits_soft_cap=None,
           fixed_split_size: int | None = None, disable_split_kv: bool = False):
    """Plans a decode batch on the host; returns the `Plan` (also kept for `run`).

    indptr: int32 [batch+1] page offsets of each request in `indices`; indices: the
    page ids; last_page_len: [batch] valid slots of each request's last page.
    `data_type` is FlashInfer's older alias of `kv_data_type`. `window_left` w >= 0
    limits each query to its last w + 1 keys (-1: all); `logits_soft_cap` c > 0 maps
    each scaled logit x to c * tanh(x / c) (None or 0: none).

    Batch invariance (FlashInfer's options): `fixed_split_size`, in pages as in
    FlashInfer, splits every request's keys at the key positions that are multiples of
    `fixed_split_size * page_size` and nowhere else, so a request's output and lse are
    bitwise the same whatever else is in the batch (pick about the typical request
    length: shorter splits need more workspace). `disable_split_kv=True` never splits a
    request (it wins over `fixed_split_size`). None / -1 and False: the planner splits to
    balance the GPU, which changes the last bits with the batch. Both work with and
    without tensor cores. The work and partial-row capacities fixed at a wrapper's plan
    hold the fixed splits of any batch within max_batch_size / max_num_pages unless the
    workspace is smaller; plan() then raises, naming fixed_split_size.
    """
    if kv_data_type is None:
      kv_data_type = data_type
    return self._make_plan(qo_indptr=None, kv_indptr=indptr, kv_indices=indices,
                           kv_last_page_len=last_page_len, num_qo_heads=num_qo_heads,
                           num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size,
                           causal=False, pos_encoding_mode=pos_encoding_mode, sm_scale=sm_scale,
                           rope_scale=rope_scale, rope_theta=rope_theta, q_data_type=q_data_type,
                           kv_data_type=kv_data_type,
                           kernel="tensor_core_decode" if self._use_tensor_cores else "decode",
                           logits_soft_cap=logits_soft_cap, window_left=window_left,
                           fixed_split_size=fixed_split_size, disable_split_kv=disable_split_kv)

  def run(self, q, paged_kv_cache, return_lse: bool = False, plan=None, sinks=None,
          k_scale=None, v_scale=None):
    """Decode attention: q [batch, num_qo_heads, head_dim] -> out like q.

    With return_lse, also returns lse [batch, num_qo_heads] float32 in base 2
    (log2 of the sum of exp2 of the scaled logits), as FlashInfer does. Inside jax.jit
    pass the plan explicitly; q may then have fewer rows than max_batch_size, but no
    fewer than the plan's batch_size: jit cannot see the plan's counts, so requests
    past q's last row are not computed (and q rows past the batch come back 0).
    `sinks`: float32 [num_qo_heads] attention-sink logits (as FlashInfer's
    BatchAttentionWithAttentionSinkWrapper): each joins its head's softmax denominator,
    on the scale of the scaled logits, weighs no value, and counts in the lse.
    `k_scale` / `v_scale` (floats or traced scalars; FlashInfer's): the logits use
    sm_scale * k_scale and the output is multiplied by v_scale, for quantised (fp8)
    caches planned with kv_data_type=jnp.float8_e4m3fn or jnp.float8_e5m2.
    """
    return self._run(primitives.decode_p, q, paged_kv_cache, return_lse, plan, sinks, k_scale,
                     v_scale)

  forward = run
