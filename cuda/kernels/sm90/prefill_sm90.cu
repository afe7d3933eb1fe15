// LaunchPrefillSm90: the Hopper prefill kernel (prefill_sm90_kernel.cuh) for bf16 and
// fp16 caches and queries at head_dim 64, 128 and 256 with 2 K/V stages, and 3 stages at
// head_dim 128 (a measurement knob): eight instantiations, each after the pass that
// rotates a RoPE call's keys once (rope_keys.cuh) where the workspace holds them. Built for sm_90a only
// (-gencode=arch=compute_90a,code=sm_90a); on any other target the kernel body is empty
// and the launcher refuses (cudaErrorNotSupported), so the file may sit in a
// multi-architecture build.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "../dependent_launch.cuh"
#include "../kernel_setup.cuh"
#include "prefill_sm90.h"
#include "prefill_sm90_kernel.cuh"
#include "rope_keys.cuh"

namespace jax_pagedattn {
namespace {

using sm90::PrefillSm90Cfg;
using sm90::PrefillSm90Kernel;

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

// SMs of the current device, cached per device ordinal (0 if unknown).
int DeviceSms() {
  static std::atomic<int> sms[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
  int n = sms[dev].load(std::memory_order_relaxed);
  if (n == 0 && cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess)
    sms[dev].store(n, std::memory_order_relaxed);
  return n;
}

template <typename T, int D, int Stages, int Variant = 0>
struct Sm90Kernel {
  using Cfg = PrefillSm90Cfg<T, D, Stages, Variant>;

  static cudaError_t Ready() {
    static std::atomic<uint64_t> smem_set{0};
    return AllowSmem(PrefillSm90Kernel<T, D, Stages, Variant>, Cfg::kSmemBytes, &smem_set);
  }

  static cudaError_t Launch(const AttentionParams& p, cudaStream_t stream, const PrefillSm90Tuning& t) {
    const cudaError_t err = Ready();
    if (err != cudaSuccess) return err;
    // Drawn tasks: one CTA per SM (the kernel's occupancy), each drawing tasks until
    // none are left; the grid does not depend on the plan.
    const int sms = DeviceSms();
    const bool drawn = t.drawn_tasks && sms > 0 && p.task_counter != nullptr;
    const dim3 grid = drawn ? dim3(unsigned(sms)) : dim3(unsigned(p.layout.bin_cap), unsigned(p.num_kv_heads));
    // RoPE keys rotated once (rope_keys.cuh), where the workspace holds them, the
    // section's shape (from the attributes) is the one the kernels index (from the cache
    // and the plan layout), and its key slots fit an int (the kernel's index).
    const bool rope_keys = t.rope_keys && p.pos_encoding == PosEncoding::kRopeLlama &&
                           p.rope_keys != nullptr && p.page_size == p.kv.page_size &&
                           p.caps.pages == p.layout.page_cap && p.layout.page_cap > 0 &&
                           int64_t(p.layout.page_cap) * p.kv.page_size <= INT32_MAX;
    if (rope_keys) {
      const int blocks = std::min(p.layout.page_cap, std::max(sms, 1) * 8);
      const cudaError_t e = LaunchDependent(p.dependent_launch, sm90::RopeKeysKernel<T, D>,
                                            dim3(unsigned(blocks)), dim3(sm90::kRopeKeysThreads),
                                            0, stream, p);
      if (e != cudaSuccess) return e;
    }
    return LaunchDependent(p.dependent_launch, PrefillSm90Kernel<T, D, Stages, Variant>, grid,
                           dim3(Cfg::kThreads),
                           Cfg::kSmemBytes, stream, p,
                           (t.pingpong ? sm90::kFlagPingpong : 0) |
                               (t.copy_kv ? 0 : sm90::kFlagNoKvCopy) |
                               (drawn ? 0 : sm90::kFlagStaticBins) |
                               (rope_keys ? sm90::kFlagRopeKeys : 0));
  }

  static cudaError_t Occupancy(int32_t* ctas) {
    const cudaError_t err = Ready();
    if (err != cudaSuccess) return err;
    return CtasPerSm(PrefillSm90Kernel<T, D, Stages, Variant>, Cfg::kThreads, Cfg::kSmemBytes, ctas);
  }
};

// op(Sm90Kernel<T, D, stages, variant>{}) for the covered (dtype, head_dim, tile_rows,
// stages, variant); NotSupported else. Variants other than 0 (prefill_sm90_config.cuh,
// kVariant*) exist only in builds with JPA_SM90_VARIANTS (the kernel harness), for bf16
// at head_dim 128 with 3 stages.
template <typename Op>
cudaError_t WithSm90Kernel(DType dtype, int head_dim, int tile_rows, int stages, int variant,
                           Op&& op) {
  if (tile_rows != 128 || !DeviceIsSm90()) return cudaErrorNotSupported;
  if (head_dim != 128) stages = 2;  // the only 3-stage kernels are head_dim 128's
  if (variant != 0) {
#ifdef JPA_SM90_VARIANTS
    if (dtype != DType::kBF16 || head_dim != 128 || stages != 3) return cudaErrorNotSupported;
    switch (variant) {
      case sm90::kVariantTwoVStages: return op(Sm90Kernel<__nv_bfloat16, 128, 3, sm90::kVariantTwoVStages>{});
      case sm90::kVariantGeneralMask: return op(Sm90Kernel<__nv_bfloat16, 128, 3, sm90::kVariantGeneralMask>{});
      case sm90::kVariantRescaleFirst: return op(Sm90Kernel<__nv_bfloat16, 128, 3, sm90::kVariantRescaleFirst>{});
      case sm90::kVariantEarlyVTest: return op(Sm90Kernel<__nv_bfloat16, 128, 3, sm90::kVariantEarlyVTest>{});
      case sm90::kVariantSlotItems: return op(Sm90Kernel<__nv_bfloat16, 128, 3, sm90::kVariantSlotItems>{});
      case sm90::kVariantSlotItems | sm90::kVariantTwoVStages:
        return op(Sm90Kernel<__nv_bfloat16, 128, 3, sm90::kVariantSlotItems | sm90::kVariantTwoVStages>{});
      default: return cudaErrorNotSupported;
    }
#else
    return cudaErrorNotSupported;
#endif
  }
  auto with_stages = [&](auto elem) -> cudaError_t {
    using T = decltype(elem);
    switch (head_dim * 4 + stages) {
      case 64 * 4 + 2: return op(Sm90Kernel<T, 64, 2>{});
      case 128 * 4 + 2: return op(Sm90Kernel<T, 128, 2>{});
      case 128 * 4 + 3: return op(Sm90Kernel<T, 128, 3>{});
      case 256 * 4 + 2: return op(Sm90Kernel<T, 256, 2>{});
      default: return cudaErrorNotSupported;
    }
  };
  switch (dtype) {
    case DType::kBF16: return with_stages(__nv_bfloat16{});
    case DType::kF16: return with_stages(__half{});
    default: return cudaErrorNotSupported;
  }
}

bool Aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

}  // namespace

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
  auto launch = [&](auto kernel) {
    if (p.layout.work_cap == 0) return cudaSuccess;  // no items, nothing to launch
    return decltype(kernel)::Launch(p, stream, tuning);
  };
  return WithSm90Kernel(p.dtype, p.head_dim, p.tile_rows, tuning.stages, tuning.variant, launch);
}

bool PrefillSm90Covers(DType dtype, DType kv_dtype, int head_dim) {
  return (dtype == DType::kBF16 || dtype == DType::kF16) && kv_dtype == dtype &&
         (head_dim == 64 || head_dim == 128 || head_dim == 256) && DeviceIsSm90();
}

cudaError_t LaunchPrefillSm90(const AttentionParams& p, cudaStream_t stream) {
  PrefillSm90Tuning tuning;
  if (p.sm90_stages == 2 || p.sm90_stages == 3) tuning.stages = p.sm90_stages;
  tuning.drawn_tasks = p.sm90_drawn_tasks;
  tuning.pingpong = p.sm90_pingpong;
  tuning.rope_keys = p.sm90_rope_keys;
  return LaunchPrefillSm90(p, stream, tuning);
}

cudaError_t PrefillSm90CtasPerSm(DType dtype, int head_dim, int tile_rows, int32_t* ctas) {
  return WithSm90Kernel(dtype, head_dim, tile_rows, PrefillSm90Tuning{}.stages, 0,
                        [&](auto kernel) { return decltype(kernel)::Occupancy(ctas); });
}

}  // namespace jax_pagedattn
