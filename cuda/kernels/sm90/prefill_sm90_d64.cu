// The Hopper prefill kernels of head_dim 64 (prefill_sm90_launch.cuh).
#include "prefill_sm90_launch.cuh"

template cudaError_t jax_pagedattn::sm90::RunSm90HeadDim<64>(
    jax_pagedattn::DType, int, const jax_pagedattn::sm90::Sm90Call&);
