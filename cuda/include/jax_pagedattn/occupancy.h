// How many CTAs of an attention kernel one SM holds at once: what the planner's bins
// fill (plan_layout.h). Plain C++ declarations, so the nanobind module needs no CUDA
// headers; implemented beside the CUDA handlers.
#pragma once

#include <cstdint>

#include "jax_pagedattn/params.h"

namespace jax_pagedattn {

// CTAs per SM of the decode kernel (tensor_cores = false) or of the tensor-core kernel
// (tensor_cores = true; prefill and use_tensor_cores decode) for this dtype, head_dim,
// tile_rows and sm90_prefill attribute, on the current device. Returns nullptr on
// success, else the CUDA error's message.
const char* AttentionCtasPerSm(bool tensor_cores, DType dtype, int32_t head_dim,
                               int32_t tile_rows, bool sm90_prefill, int32_t* ctas);

// Whether this build's Hopper prefill kernel runs calls of these types and head_dim on the
// current device (false in a build without it).
bool HopperPrefillCovers(DType dtype, DType kv_dtype, int32_t head_dim);

}  // namespace jax_pagedattn
