// Launch setup shared by the attention launchers: the dynamic shared-memory opt-in of a
// kernel (once per device) and the occupancy query that the planner sizes bins with.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "jax_pagedattn/params.h"

namespace jax_pagedattn {

// Raises `kernel`'s dynamic shared-memory limit to `bytes` once per device (`done`
// holds one bit per device ordinal, owned by the caller's instantiation): the
// attribute is per device, and a process may drive several GPUs with one kernel. The
// call is legal during stream capture, so a first launch inside a graph is fine.
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

// CTAs of `kernel` (after AllowSmem) one SM of the current device holds at once.
template <typename Kernel>
cudaError_t CtasPerSm(Kernel kernel, int threads, int smem_bytes, int32_t* ctas) {
  int n = 0;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads,
                                                                        size_t(smem_bytes));
  *ctas = n;
  return err;
}

// Calls op(T{}) with T the CUDA element type of `dtype`; cudaErrorInvalidValue for
// float32, which has no GPU kernels (it runs on the CPU backend).
template <typename Op>
cudaError_t WithElementType(DType dtype, Op&& op) {
  switch (dtype) {
    case DType::kF16: return op(__half{});
    case DType::kBF16: return op(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace jax_pagedattn
