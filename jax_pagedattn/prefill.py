"""BatchPrefillWithPagedKVCacheWrapper: many query tokens per request."""

from __future__ import annotations

from jax_pagedattn import primitives
from jax_pagedattn._wrapper import PagedAttentionWrapper


class BatchPrefillWithPagedKVCacheWrapper(PagedAttentionWrapper):
  """Batched prefill / append attention over a paged KV cache (FlashInfer's API).

  Args:
    workspace_size: bytes the split-KV partial outputs may use at most, or FlashInfer's
      `float_workspace_buffer` (its size in bytes is taken).
    kv_layout: "NHD" or "HND".
    max_batch_size, max_num_pages, max_num_tokens: capacities; None fixes each at the
      first plan() (rounded up to a power of two) and keeps it.
  """

  _decode = False

  def __init__(self, workspace_size=128 * 1024 * 1024, kv_layout: str = "NHD",
               max_batch_size: int | None = None, max_num_pages: int | None = None,
               max_num_tokens: int | None = None):
    super().__init__(workspace_size, kv_layout, max_batch_size, max_num_pages, max_num_tokens)

  def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
           num_qo_heads: int, num_kv_heads: int, head_dim: int | None = None,
           page_size: int | None = None, causal: bool = False, pos_encoding_mode: str = "NONE",
           sm_scale=None, rope_scale=None, rope_theta=None, q_data_type="float16",
           kv_data_type=None, head_dim_qk: int | None = None, window_left: int = -1,
           logits_soft_cap=None, fixed_split_size: int | None = None,
           disable_split_kv: bool = False):
    """Plans a prefill batch on the host; returns the `Plan` (also kept for `run`).

    qo_indptr: int32 [batch+1] query-token offsets of each request; the paged_kv_*
    arrays as in decode. Causal masks are bottom-right aligned (query i of a request
    with qo_len queries and kv_len keys sees keys j <= kv_len - qo_len + i).
    `head_dim_qk` is FlashInfer's name for head_dim. `window_left` w >= 0 limits the
    query at position p = kv_len - qo_len + i to keys j >= p - w (-1: no limit);
    `logits_soft_cap` c > 0 maps each scaled logit x to c * tanh(x / c), before ALiBi
    and the masks (None or 0: none).

    Batch invariance: `fixed_split_size` (pages, as in FlashInfer) and
    `disable_split_kv` as in the decode wrapper's plan(): every query tile of a request
    gets the same key pieces whatever else is in the batch, so its output and lse are
    bitwise the same. A split tile needs a partial row per token and piece: a long
    context with a small fixed_split_size may need more than the workspace holds, which
    plan() reports, naming fixed_split_size.
    """
    if head_dim is None:
      head_dim = head_dim_qk
    if head_dim is None or page_size is None:
      raise TypeError("plan() needs head_dim and page_size")
    return self._make_plan(qo_indptr=qo_indptr, kv_indptr=paged_kv_indptr,
                           kv_indices=paged_kv_indices, kv_last_page_len=paged_kv_last_page_len,
                           num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
                           head_dim=head_dim, page_size=page_size, causal=causal,
                           pos_encoding_mode=pos_encoding_mode, sm_scale=sm_scale,
                           rope_scale=rope_scale, rope_theta=rope_theta, q_data_type=q_data_type,
                           kv_data_type=kv_data_type, kernel="prefill",
                           logits_soft_cap=logits_soft_cap, window_left=window_left,
                           fixed_split_size=fixed_split_size, disable_split_kv=disable_split_kv)

  def run(self, q, paged_kv_cache, return_lse: bool = False, plan=None, sinks=None,
          k_scale=None, v_scale=None):
    """Prefill attention: q [tokens, num_qo_heads, head_dim] -> out like q.

    With return_lse, also lse [tokens, num_qo_heads] float32, base 2. Inside jax.jit
    q may have more rows than qo_indptr[-1] (up to max_num_tokens): those padding rows
    come back as 0 with lse -inf. It must not have fewer: jit cannot see the plan's
    counts, so tokens past q's last row are not computed. `sinks`: float32
    [num_qo_heads] attention-sink logits, as in BatchAttentionWithAttentionSinkWrapper.
    `k_scale` / `v_scale`: dequantisation scales of an fp8 cache, as in decode's run().
    """
    return self._run(primitives.prefill_p, q, paged_kv_cache, return_lse, plan, sinks, k_scale,
                     v_scale)

  forward = run


class BatchAttentionWithAttentionSinkWrapper(BatchPrefillWithPagedKVCacheWrapper):
  """FlashInfer's attention-sink wrapper (GPT-OSS): prefill or decode over a paged cache
  where every query head has one sink logit that joins its softmax denominator and
  weighs no value. The same plans as BatchPrefillWithPagedKVCacheWrapper; `run` takes
  the sinks (float32 [num_qo_heads], on the scale of the sm_scale-scaled logits; the
  lse counts them). `window_left` given here is the default of every plan()."""

  def __init__(self, workspace_size=128 * 1024 * 1024, kv_layout: str = "NHD",
               max_batch_size: int | None = None, max_num_pages: int | None = None,
               max_num_tokens: int | None = None, window_left: int = -1):
    super().__init__(workspace_size, kv_layout, max_batch_size, max_num_pages, max_num_tokens)
    self._default_window_left = window_left

  def plan(self, *args, window_left: int | None = None, **kwargs):
    return super().plan(*args, window_left=self._default_window_left if window_left is None
                        else window_left, **kwargs)

  def run(self, q, paged_kv_cache, sinks, return_lse: bool = False, plan=None, k_scale=None,
          v_scale=None):
    """Attention with sinks: q [tokens, num_qo_heads, head_dim] -> out like q."""
    if sinks is None:
      raise TypeError("run() needs sinks: float32 [num_qo_heads] (use "
                      "BatchPrefillWithPagedKVCacheWrapper for attention without them)")
    return super().run(q, paged_kv_cache, return_lse=return_lse, plan=plan, sinks=sinks,
                       k_scale=k_scale, v_scale=v_scale)

  forward = run
