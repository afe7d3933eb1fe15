// The Hopper prefill kernels of head_dim 256 (prefill_sm90_launch.cuh).
#include "prefill_sm90_launch.cuh"

template cudaError_t jax_pagedattn::sm90::RunSm90HeadDim<256>(
    jax_pagedattn::DType, int, const jax_pagedattn::sm90::Sm90Call&);
