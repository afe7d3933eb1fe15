// LaunchPrefill: picks the (dtype, kv_dtype, head_dim, tile_rows) instantiation of the
// tensor-core prefill kernel (prefill_kernel.cuh) and launches it over the grid
// [bin_cap, num_kv_heads]; PrefillCtasPerSm reports how many of its CTAs an SM holds,
// which the planner's bins fill. Causal masking and the position encoding are run-time
// branches inside the kernel, and so is the fp8 format (e4m3 or e5m2) of an fp8 cache,
// so the template set stays at 28 kernels per arch: 16 for 16-bit caches, {f16, bf16} x
// ({64, 128} x {16, 64, 128} + {256} x {16, 64}), and 12 for fp8 caches at the tile
// sizes the planner uses (tile_rows.h: 16 for tensor-core decode, 128 for prefill at
// head_dim <= 128, 64 at 256), {f16, bf16} x ({64, 128} x {16, 128} + {256} x {16, 64}).
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "dependent_launch.cuh"
#include "kernel_setup.cuh"
#include "launchers.h"
#include "prefill_kernel.cuh"
#ifdef JAX_PAGEDATTN_WITH_SM90
#include "sm90/prefill_sm90.h"
#endif

namespace jax_pagedattn {
namespace {

using prefill_detail::PrefillCfg;
using prefill_detail::PrefillKernel;

// One instantiation: its shared-memory opt-in, launch and occupancy.
template <typename T, typename TKV, int D, int TILE_ROWS, int STAGES>
struct TileKernel {
  using Cfg = PrefillCfg<D, TILE_ROWS, STAGES, int(sizeof(TKV))>;

  static cudaError_t Ready() {
    static std::atomic<uint64_t> smem_set{0};
    return AllowSmem(PrefillKernel<T, TKV, D, TILE_ROWS, STAGES>, Cfg::kSmemBytes, &smem_set);
  }

  static cudaError_t Launch(const AttentionParams& p, cudaStream_t stream) {
    const cudaError_t err = Ready();
    if (err != cudaSuccess) return err;
    const dim3 grid(unsigned(p.layout.bin_cap), unsigned(p.num_kv_heads));
    return LaunchDependent(p.dependent_launch, PrefillKernel<T, TKV, D, TILE_ROWS, STAGES>, grid,
                           dim3(Cfg::kThreads),
                           Cfg::kSmemBytes, stream, p);
  }

  static cudaError_t Occupancy(int32_t* ctas) {
    const cudaError_t err = Ready();
    if (err != cudaSuccess) return err;
    return CtasPerSm(PrefillKernel<T, TKV, D, TILE_ROWS, STAGES>, Cfg::kThreads, Cfg::kSmemBytes, ctas);
  }
};

// Calls op(TileKernel<T, TKV, D, TILE_ROWS, STAGES>{}) for the instantiation of
// (dtype, kv_dtype, head_dim, tile_rows); cudaErrorInvalidValue where there is none.
template <typename T, typename TKV, int D, typename Op>
cudaError_t WithTileRows(int tile_rows, Op&& op) {
  // fp8 caches: only the tiles tile_rows.h gives (16, and 128 or 64 by head_dim).
  constexpr bool kFp8 = sizeof(TKV) == 1;
  switch (tile_rows) {
    // Two stages everywhere: a third one for the 16-row decode tile (two CTAs per SM
    // instead of three) measured the same on an H200 (docs/PERF_NOTES.md).
    case 16: return op(TileKernel<T, TKV, D, 16, 2>{});
    case 64:
      if constexpr (!kFp8 || D == 256) return op(TileKernel<T, TKV, D, 64, 2>{});
      return cudaErrorInvalidValue;
    case 128:
      // 128 rows x 256 dims would need 128 accumulator registers per thread with 8
      // warps; the Python layer uses 64-row tiles there.
      if constexpr (D != 256) return op(TileKernel<T, TKV, D, 128, 2>{});
      return cudaErrorInvalidValue;
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, typename TKV, typename Op>
cudaError_t WithHeadDim(int head_dim, int tile_rows, Op&& op) {
  switch (head_dim) {
    case 64: return WithTileRows<T, TKV, 64>(tile_rows, op);
    case 128: return WithTileRows<T, TKV, 128>(tile_rows, op);
    case 256: return WithTileRows<T, TKV, 256>(tile_rows, op);
    default: return cudaErrorInvalidValue;
  }
}

// The cache is q's type or an fp8 type beside it (MakeAttentionParams checked which);
// fp8 caches of both formats share the kernel with TKV = uint8_t.
template <typename Op>
cudaError_t WithKernel(DType dtype, DType kv_dtype, int head_dim, int tile_rows, Op&& op) {
  return WithElementType(dtype, [&](auto t) {
    using T = decltype(t);
    if (IsFp8(kv_dtype)) return WithHeadDim<T, uint8_t>(head_dim, tile_rows, op);
    return kv_dtype == dtype ? WithHeadDim<T, T>(head_dim, tile_rows, op)
                             : cudaErrorInvalidValue;
  });
}

}  // namespace

cudaError_t LaunchPrefill(const AttentionParams& p, cudaStream_t stream) {
#ifdef JAX_PAGEDATTN_WITH_SM90
  // The Hopper kernel (sm90/prefill_sm90.cu) where this build has it, it covers the call
  // and the call's sm90_prefill attribute allows it (switches.py).
  if (p.sm90_prefill) {
    const cudaError_t err = LaunchPrefillSm90(p, stream);
    if (err != cudaErrorNotSupported) return err;  // launched, or a real error
  }
#endif
  // The kernel indexes with these; a mismatch would read or write out of bounds.
  if (p.num_kv_heads <= 0 || p.num_kv_heads > 65535 || p.group_size <= 0 ||
      int64_t(p.group_size) * p.num_kv_heads != p.num_qo_heads ||
      p.kv.num_kv_heads != p.num_kv_heads || p.kv.head_dim != p.head_dim ||
      p.kv.page_size < 1 || p.layout.work_cap < 0 || p.layout.bin_cap < 1)
    return cudaErrorInvalidValue;
  if (p.layout.work_cap == 0) return cudaSuccess;  // no items, nothing to launch
  return WithKernel(p.dtype, p.kv_dtype, p.head_dim, p.tile_rows,
                    [&](auto kernel) { return decltype(kernel)::Launch(p, stream); });
}

cudaError_t PrefillCtasPerSm(DType dtype, int head_dim, int tile_rows, bool sm90_prefill,
                             int32_t* ctas) {
#ifdef JAX_PAGEDATTN_WITH_SM90
  if (sm90_prefill) {
    const cudaError_t err = PrefillSm90CtasPerSm(dtype, head_dim, tile_rows, ctas);
    if (err != cudaErrorNotSupported) return err;
  }
#endif
  // An fp8 cache's kernel needs no more shared memory than q's type's (PrefillCfg).
  return WithKernel(dtype, dtype, head_dim, tile_rows,
                    [&](auto kernel) { return decltype(kernel)::Occupancy(ctas); });
}

}  // namespace jax_pagedattn
