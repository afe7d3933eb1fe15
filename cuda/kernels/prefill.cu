// LaunchPrefill: picks the (dtype, head_dim, tile_rows) instantiation of the
// tensor-core prefill kernel (prefill_kernel.cuh) and launches it over the grid
// [work_cap, num_kv_heads]. Causal masking and the position encoding are run-time
// branches inside the kernel, so the template set stays at 16 kernels per arch:
// {f16, bf16} x ({64, 128} x {16, 64, 128} + {256} x {16, 64}).
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "launchers.h"
#include "prefill_kernel.cuh"

namespace jax_pagedattn {
namespace {

using prefill_detail::PrefillCfg;
using prefill_detail::PrefillKernel;

// Raises the kernel's dynamic shared-memory limit once per device: the attribute is
// per device, and a process may drive several GPUs with the same kernel.
template <typename Kernel>
cudaError_t AllowSmem(Kernel kernel, int bytes, std::atomic<uint64_t>* done) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const uint64_t bit = dev >= 0 && dev < 64 ? uint64_t(1) << dev : 0;
  if (bit != 0 && (done->load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && bit != 0) done->fetch_or(bit, std::memory_order_release);
  return err;
}

template <typename T, int D, int TILE_ROWS>
cudaError_t LaunchTile(const AttentionParams& p, cudaStream_t stream) {
  using Cfg = PrefillCfg<D, TILE_ROWS>;
  static std::atomic<uint64_t> smem_set{0};
  auto kernel = PrefillKernel<T, D, TILE_ROWS>;
  cudaError_t err = AllowSmem(kernel, Cfg::kSmemBytes, &smem_set);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(p.layout.work_cap), unsigned(p.num_kv_heads));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t LaunchHeadDim(const AttentionParams& p, cudaStream_t stream) {
  switch (p.tile_rows) {
    case 16: return LaunchTile<T, D, 16>(p, stream);
    case 64: return LaunchTile<T, D, 64>(p, stream);
    case 128:
      // 128 rows x 256 dims would need 128 accumulator registers per thread with 8
      // warps; the Python layer uses 64-row tiles there.
      if constexpr (D != 256) return LaunchTile<T, D, 128>(p, stream);
      return cudaErrorInvalidValue;
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t LaunchType(const AttentionParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return LaunchHeadDim<T, 64>(p, stream);
    case 128: return LaunchHeadDim<T, 128>(p, stream);
    case 256: return LaunchHeadDim<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t LaunchPrefill(const AttentionParams& p, cudaStream_t stream) {
  // The kernel indexes with these; a mismatch would read or write out of bounds.
  if (p.num_kv_heads <= 0 || p.num_kv_heads > 65535 || p.group_size <= 0 ||
      int64_t(p.group_size) * p.num_kv_heads != p.num_qo_heads ||
      p.kv.num_kv_heads != p.num_kv_heads || p.kv.head_dim != p.head_dim ||
      p.kv.page_size < 1 || p.layout.work_cap < 0)
    return cudaErrorInvalidValue;
  if (p.layout.work_cap == 0) return cudaSuccess;  // no items, nothing to launch
  switch (p.dtype) {
    case DType::kF16: return LaunchType<__half>(p, stream);
    case DType::kBF16: return LaunchType<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;  // f32 runs on the CPU backend only
  }
}

}  // namespace jax_pagedattn
