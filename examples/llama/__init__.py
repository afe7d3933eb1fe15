"""A Llama-style decoder served with continuous batching over jax_pagedattn's paged cache.

model      the Flax NNX decoder; attention is a callable it is handed, so one model
           serves the paged engine, the jax.numpy comparison and the dense check
attention  those attention callables: library wrappers, jnp over pages, dense
allocator  host page pool
scheduler  request queue, admission, chunked prefill, preemption
engine     the jitted step, shape buckets, plans and compile log
tensor_parallel  --tp N: the mesh, the weights' Megatron split, KV-head replication
packing    a step's small index arrays sent as one host-to-device copy
check      greedy tokens of the paged model vs a dense float32 run
checkpoint model state to and from .npz / orbax
workload   synthetic requests
metrics    step timings and the attention share
"""
