// LaunchPrefill: picks the (dtype, head_dim, tile_rows) instantiation of the
// tensor-core prefill kernel (prefill_kernel.cuh) and launches it over the grid
// [bin_cap, num_kv_heads]; PrefillCtasPerSm reports how many of its CTAs an SM holds,
// which the planner's bins fill. Causal masking and the position encoding are run-time
// branches inside the kernel, so the template set stays at 16 kernels per arch:
// {f16, bf16} x ({64, 128} x {16, 64, 128} + {256} x {16, 64}).
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
template <typename T, int D, int TILE_ROWS, int STAGES>
struct TileKernel {
  using Cfg = PrefillCfg<D, TILE_ROWS, STAGES>;

  static cudaError_t Ready() {
    static std::atomic<uint64_t> smem_set{0};
    return AllowSmem(PrefillKernel<T, D, TILE_ROWS, STAGES>, Cfg::kSmemBytes, &smem_set);
  }

  static cudaError_t Launch(const AttentionParams& p, cudaStream_t stream) {
    const cudaError_t err = Ready();
    if (err != cudaSuccess) return err;
    const dim3 grid(unsigned(p.layout.bin_cap), unsigned(p.num_kv_heads));
    return LaunchDependent(p.dependent_launch, PrefillKernel<T, D, TILE_ROWS, STAGES>, grid,
                           dim3(Cfg::kThreads),
                           Cfg::kSmemBytes, stream, p);
  }

  static cudaError_t Occupancy(int32_t* ctas) {
    const cudaError_t err = Ready();
    if (err != cudaSuccess) return err;
    return CtasPerSm(PrefillKernel<T, D, TILE_ROWS, STAGES>, Cfg::kThreads, Cfg::kSmemBytes, ctas);
  }
};

// Calls op(TileKernel<T, D, TILE_ROWS, STAGES>{}) for the instantiation of (dtype,
// head_dim, tile_rows); cudaErrorInvalidValue where there is none.
template <typename T, int D, typename Op>
cudaError_t WithTileRows(int tile_rows, Op&& op) {
  switch (tile_rows) {
    // Two stages everywhere: a third one for the 16-row decode tile (two CTAs per SM
    // instead of three) measured the same on an H200 (docs/PERF_NOTES.md).
    case 16: return op(TileKernel<T, D, 16, 2>{});
    case 64: return op(TileKernel<T, D, 64, 2>{});
    case 128:
      // 128 rows x 256 dims would need 128 accumulator registers per thread with 8
      // warps; the Python layer uses 64-row tiles there.
      if constexpr (D != 256) return op(TileKernel<T, D, 128, 2>{});
      return cudaErrorInvalidValue;
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, typename Op>
cudaError_t WithHeadDim(int head_dim, int tile_rows, Op&& op) {
  switch (head_dim) {
    case 64: return WithTileRows<T, 64>(tile_rows, op);
    case 128: return WithTileRows<T, 128>(tile_rows, op);
    case 256: return WithTileRows<T, 256>(tile_rows, op);
    default: return cudaErrorInvalidValue;
  }
}

template <typename Op>
cudaError_t WithKernel(DType dtype, int head_dim, int tile_rows, Op&& op) {
  return WithElementType(dtype, [&](auto t) {
    return WithHeadDim<decltype(t)>(head_dim, tile_rows, op);
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
  return WithKernel(p.dtype, p.head_dim, p.tile_rows,
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
  return WithKernel(dtype, head_dim, tile_rows,
                    [&](auto kernel) { return decltype(kernel)::Occupancy(ctas); });
}

}  // namespace jax_pagedattn
