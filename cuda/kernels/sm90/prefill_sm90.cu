// LaunchPrefillSm90: the Hopper prefill kernel (prefill_sm90_kernel.cuh) for bf16 and
// fp16 caches and queries at head_dim 64, 128 and 256 with 2 K/V stages, and 3 stages at
// head_dim 128: eight instantiations, each after the pass that rotates a RoPE call's keys
// once (rope_keys.cuh) where the workspace holds them. This file checks a call and picks
// the translation unit of its head_dim (prefill_sm90_d64.cu, _d128.cu, _d256.cu; one per
// head_dim so that a parallel build compiles them side by side). Built for sm_90a only
// (-gencode=arch=compute_90a,code=sm_90a); on any other target the kernel body is empty
// and the launcher refuses (cudaErrorNotSupported), so the files may sit in a
// multi-architecture build.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "prefill_sm90.h"
#include "prefill_sm90_launch.cuh"

namespace jax_pagedattn {
namespace {

// Compute capability 9.0 (sm_90a code runs there and nowhere else), cached per device.
bool DeviceIsSm90() {
  static std::atomic<uint64_t> known{0}, yes{0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  const uint64_t bit = uint64_t(1) << dev;
  if ((known.load(std::memory_order_acquire) & bit) == 0) {
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
      return false;
    if (major == 9 && minor == 0) yes.fetch_or(bit, std::memory_order_relaxed);
    known.fetch_or(bit, std::memory_order_release);
  }
  return (yes.load(std::memory_order_relaxed) & bit) != 0;
}

// The kernel for (dtype, head_dim, tile_rows, stages, variant) run for `call`
// (prefill_sm90_launch.cuh); cudaErrorNotSupported where none exists. Variants other than
// 0 exist only in builds with JPA_SM90_VARIANTS (the kernel harness).
cudaError_t RunSm90(DType dtype, int head_dim, int tile_rows, int stages, int variant,
                    const sm90::Sm90Call& call) {
  if (tile_rows != 128 || !DeviceIsSm90()) return cudaErrorNotSupported;
  if (head_dim != 128) stages = 2;  // the only 3-stage kernels are head_dim 128's
  if (variant != 0) {
#ifdef JPA_SM90_VARIANTS
    if (dtype != DType::kBF16 || head_dim != 128 || stages != 3) return cudaErrorNotSupported;
    return sm90::RunSm90Variant(variant, call);
#else
    return cudaErrorNotSupported;
#endif
  }
  switch (head_dim) {
    case 64: return sm90::RunSm90HeadDim<64>(dtype, stages, call);
    case 128: return sm90::RunSm90HeadDim<128>(dtype, stages, call);
    case 256: return sm90::RunSm90HeadDim<256>(dtype, stages, call);
    default: return cudaErrorNotSupported;
  }
}

bool Aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

}  // namespace

namespace sm90 {
int DeviceSms() {
  static std::atomic<int> sms[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
  int n = sms[dev].load(std::memory_order_relaxed);
  if (n == 0 && cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess)
    sms[dev].store(n, std::memory_order_relaxed);
  return n;
}
}  // namespace sm90

cudaError_t LaunchPrefillSm90(const AttentionParams& p, cudaStream_t stream,
                              const PrefillSm90Tuning& tuning) {
  // The kernel indexes with these; a mismatch would read or write out of bounds.
  if (p.num_kv_heads <= 0 || p.num_kv_heads > 65535 || p.group_size <= 0 ||
      int64_t(p.group_size) * p.num_kv_heads != p.num_qo_heads ||
      p.kv.num_kv_heads != p.num_kv_heads || p.kv.head_dim != p.head_dim ||
      p.kv.page_size < 1 || p.layout.work_cap < 0 || p.layout.bin_cap < 1)
    return cudaErrorInvalidValue;
  // 16-byte copies of q, out and every K/V row: element strides multiples of 8.
  if (!Aligned16(p.q) || !Aligned16(p.out) || !Aligned16(p.kv.k) || !Aligned16(p.kv.v) ||
      p.kv.page_stride % 8 != 0 || p.kv.slot_stride % 8 != 0 || p.kv.head_stride % 8 != 0)
    return cudaErrorNotSupported;
  if (!PrefillSm90Covers(p.dtype, p.kv_dtype, p.head_dim)) return cudaErrorNotSupported;
  return RunSm90(p.dtype, p.head_dim, p.tile_rows, tuning.stages, tuning.variant,
                 sm90::Sm90Call{&p, stream, tuning, nullptr});
}

bool PrefillSm90Covers(DType dtype, DType kv_dtype, int head_dim) {
  return (dtype == DType::kBF16 || dtype == DType::kF16) && kv_dtype == dtype &&
         (head_dim == 64 || head_dim == 128 || head_dim == 256) && DeviceIsSm90();
}

cudaError_t LaunchPrefillSm90(const AttentionParams& p, cudaStream_t stream) {
  PrefillSm90Tuning tuning;
  if (p.sm90_stages == 2 || p.sm90_stages == 3) tuning.stages = p.sm90_stages;
  tuning.drawn_tasks = p.sm90_drawn_tasks;
  tuning.pingpong = Sm90Pingpong(p.sm90_pingpong, p.head_dim);
  tuning.rope_keys = p.sm90_rope_keys;
  return LaunchPrefillSm90(p, stream, tuning);
}

cudaError_t PrefillSm90CtasPerSm(DType dtype, int head_dim, int tile_rows, int32_t* ctas) {
  return RunSm90(dtype, head_dim, tile_rows, PrefillSm90Tuning{}.stages, 0,
                 sm90::Sm90Call{nullptr, nullptr, PrefillSm90Tuning{}, ctas});
}

}  // namespace jax_pagedattn
