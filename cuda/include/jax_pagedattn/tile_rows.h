// Packed query rows per work item: the query tile of each attention kernel. The planner
// cuts work items to at most this many rows and the kernels are instantiated for these
// sizes, so this is the one place that says what they are (Python asks _C.tile_rows).
#pragma once

#include <algorithm>
#include <cstdint>

namespace jax_pagedattn {

enum class AttentionKernel : int32_t {
  kDecode = 0,             // CUDA-core decode (decode.cu)
  kTensorCoreDecode = 1,   // decode's use_tensor_cores path: the prefill kernel
  kPrefill = 2,            // the tensor-core prefill kernel (prefill.cu, sm90/)
};

// The CUDA-core decode kernel keeps up to this many query heads of a GQA group in
// registers per pass over the keys; larger groups become items of this many heads.
constexpr int32_t kDecodeMaxRows = 8;
// The tensor-core decode tile: one mma row block holding a token's (padded) group.
constexpr int32_t kTensorCoreDecodeRows = 16;

// `hopper_prefill`: the Hopper prefill kernel (sm90/prefill_sm90.h) covers the call, so
// kPrefill items have its 128 rows (two consumer warpgroups of 64) at every head_dim.
inline int32_t TileRows(AttentionKernel kernel, int32_t group_size, int32_t head_dim,
                        bool hopper_prefill = false) {
  switch (kernel) {
    case AttentionKernel::kDecode: return std::clamp(group_size, 1, kDecodeMaxRows);
    case AttentionKernel::kTensorCoreDecode: return kTensorCoreDecodeRows;
    // On the sm80 kernel 128 rows x 256 dims would need 128 accumulator registers per
    // thread with 8 warps.
    case AttentionKernel::kPrefill: return head_dim <= 128 || hopper_prefill ? 128 : 64;
  }
  return 0;
}

}  // namespace jax_pagedattn
