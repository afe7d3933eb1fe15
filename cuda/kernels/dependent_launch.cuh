// Programmatic dependent launch (Hopper and later) between the setup pass of an
// attention call (merge_setup.cu) and the attention kernel that follows it on the
// same stream.
//
// The attention kernel needs the setup's work (zeroed merge counters) only when its
// first split item finishes, long after it starts. So every setup CTA lets the
// dependent grid launch first thing, and the attention kernel waits for the setup grid
// (`griddepcontrol.wait`: the prerequisite grid finished and its writes are visible)
// only before it first touches a counter, and once more before it exits, so that the
// attention grid never completes before the setup grid: work queued after the call
// sees all of it done. The setup then costs no time between two ops.
//
// On older GPUs both instructions are compiled out and the kernels launch plainly.
// JAX_PAGEDATTN_DEPENDENT_LAUNCH=0 turns it off (switches.py reads it; it reaches the
// launch as the dependent_launch attribute): a switch for measurement and for ruling it
// out when debugging.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <utility>

namespace jax_pagedattn {

// Called by every CTA of the primary (setup) kernel, first thing.
__device__ __forceinline__ void LetDependentGridLaunch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Called by every thread of the dependent (attention) kernel before it touches what the
// primary wrote, and before it exits. A no-op when launched without the attribute, and
// cheap once the primary has finished.
__device__ __forceinline__ void WaitForPrimaryGrid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Whether launches on the current device may use programmatic stream serialization:
// `allowed` (the call's dependent_launch attribute, switches.py) and compute capability
// 9.0 or later. The capability is cached per device ordinal.
inline bool DependentLaunchEnabled(bool allowed) {
  if (!allowed) return false;
  static std::atomic<uint64_t> known{0}, capable{0};  // one bit per device ordinal
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  const uint64_t bit = uint64_t(1) << dev;
  if ((known.load(std::memory_order_acquire) & bit) == 0) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
      return false;
    if (major >= 9) capable.fetch_or(bit, std::memory_order_relaxed);
    known.fetch_or(bit, std::memory_order_release);
  }
  return (capable.load(std::memory_order_relaxed) & bit) != 0;
}

// Launches `kernel` as the dependent grid of the kernel before it on `stream` where
// DependentLaunchEnabled(allowed), plainly otherwise.
template <typename... Params, typename... Args>
cudaError_t LaunchDependent(bool allowed, void (*kernel)(Params...), dim3 grid, dim3 block,
                            int smem_bytes, cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = size_t(smem_bytes);
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = DependentLaunchEnabled(allowed) ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
  return err != cudaSuccess ? err : cudaGetLastError();
}

}  // namespace jax_pagedattn
