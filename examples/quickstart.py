"""FlashInfer's "batch attention" quick start, in JAX: plan once on the host, then run
decode and prefill attention over one paged KV cache, and append new keys/values.

Runs on any JAX platform: CUDA kernels on an NVIDIA GPU, C++ handlers on the CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np

import jax_pagedattn as jpa

num_layers, num_qo_heads, num_kv_heads, head_dim = 2, 32, 8, 128
page_size, max_num_pages, batch_size = 16, 128, 7
dtype = jnp.float16 if jax.default_backend() == "gpu" else jnp.float32
rng = np.random.default_rng(0)
keys = iter(jax.random.split(jax.random.key(0), 64))

# Each request owns some pages of the cache; the last page is partly filled.
pages_per_request = rng.integers(1, 16, size=batch_size)
kv_page_indptr = np.concatenate([[0], np.cumsum(pages_per_request)]).astype(np.int32)
kv_page_indices = rng.permutation(max_num_pages)[: kv_page_indptr[-1]].astype(np.int32)
kv_last_page_len = rng.integers(1, page_size + 1, size=batch_size).astype(np.int32)

# One 5-D cache per layer: [pages, 2 (k/v), page_size, kv_heads, head_dim] ("NHD").
caches = [jax.random.normal(next(keys), (max_num_pages, 2, page_size, num_kv_heads, head_dim), dtype)
          for _ in range(num_layers)]

# --- decode: one query token per request -----------------------------------------
decode = jpa.BatchDecodeWithPagedKVCacheWrapper(kv_layout="NHD")
decode.plan(kv_page_indptr, kv_page_indices, kv_last_page_len, num_qo_heads, num_kv_heads,
            head_dim, page_size, pos_encoding_mode="NONE", q_data_type=dtype)
for layer in range(num_layers):
  q = jax.random.normal(next(keys), (batch_size, num_qo_heads, head_dim), dtype)
  o, lse = decode.run(q, caches[layer], return_lse=True)
  print(f"decode layer {layer}: out {o.shape} {o.dtype}, lse {lse.shape} (base 2)")

# --- prefill: several query tokens per request, causal -----------------------------
qo_lens = rng.integers(1, 9, size=batch_size)
qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
prefill = jpa.BatchPrefillWithPagedKVCacheWrapper(kv_layout="NHD")
prefill.plan(qo_indptr, kv_page_indptr, kv_page_indices, kv_last_page_len, num_qo_heads,
             num_kv_heads, head_dim, page_size, causal=True, q_data_type=dtype)
q = jax.random.normal(next(keys), (int(qo_indptr[-1]), num_qo_heads, head_dim), dtype)
o = prefill.run(q, caches[0])
print(f"prefill: out {o.shape}")

# --- append: write the new tokens' keys/values into their pages ----------------------
kv_lens = (kv_page_indptr[1:] - kv_page_indptr[:-1] - 1) * page_size + kv_last_page_len
nnz = int(qo_indptr[-1])
batch_indices, positions = jpa.get_batch_indices_positions(qo_indptr, kv_lens, nnz)
k_new = jax.random.normal(next(keys), (nnz, num_kv_heads, head_dim), dtype)
v_new = jax.random.normal(next(keys), (nnz, num_kv_heads, head_dim), dtype)
append = jax.jit(jpa.append_paged_kv_cache, static_argnames="kv_layout", donate_argnums=4)
caches[0] = append(k_new, v_new, batch_indices, positions, caches[0], kv_page_indices,
                   kv_page_indptr, kv_last_page_len, kv_layout="NHD")
print(f"append: wrote {nnz} rows in place; native platforms: {jpa.native_platforms()}")
