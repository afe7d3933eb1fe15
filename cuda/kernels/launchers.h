// Host-side entry points of the CUDA kernels, one .cu file each, called by the thin FFI
// handlers in cuda/ffi/. Each launches on `stream`, allocates nothing, reads no device
// memory on the host, and returns the launch's error (cudaGetLastError) so the handler
// can turn it into an FFI error. Grids depend only on static capacities.
#pragma once

#include <cuda_runtime.h>

#include "jax_pagedattn/params.h"

namespace jax_pagedattn {

// CUDA-core decode: one CTA per (bin, kv head) running the bin's work items; an item's
// packed rows are the query heads of one token's GQA group. Writes out/lse, or
// workspace partials that the last CTA of a token merges into out/lse.
cudaError_t LaunchDecode(const AttentionParams& p, cudaStream_t stream);

// Tensor-core prefill (also the use_tensor_cores decode path): one CTA per (bin, kv
// head), items of up to p.tile_rows packed query rows.
cudaError_t LaunchPrefill(const AttentionParams& p, cudaStream_t stream);

// CTAs per SM of the kernel LaunchDecode / LaunchPrefill would launch for this dtype,
// head_dim and tile_rows (and sm90_prefill attribute), on the current device (the
// occupancy calculator).
cudaError_t DecodeCtasPerSm(DType dtype, int head_dim, int tile_rows, int32_t* ctas);
cudaError_t PrefillCtasPerSm(DType dtype, int head_dim, int tile_rows, bool sm90_prefill,
                             int32_t* ctas);

// Before LaunchDecode/LaunchPrefill, always: zeroes the split-merge counters of the
// workspace and zero-fills (lse = -inf) rows t >= meta[kMetaNumTokens]. The attention
// kernels merge split partials themselves (split_merge.cuh) and launch as this pass's
// dependent grid (dependent_launch.cuh).
cudaError_t LaunchMergeSetup(const AttentionParams& p, cudaStream_t stream);

// Scatters new K/V rows into their pages in place.
cudaError_t LaunchAppend(const AppendParams& p, cudaStream_t stream);

}  // namespace jax_pagedattn
