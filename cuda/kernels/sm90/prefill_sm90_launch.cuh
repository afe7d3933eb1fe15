// The Hopper prefill kernel's launch, shared by the translation units that instantiate
// it: one per head_dim (prefill_sm90_d64.cu, _d128.cu, _d256.cu, compiled in parallel)
// and, in the kernel harness only, the variants under measurement
// (prefill_sm90_variants.cu). prefill_sm90.cu checks a call and picks the unit.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "../dependent_launch.cuh"
#include "../kernel_setup.cuh"
#include "jax_pagedattn/params.h"
#include "prefill_sm90.h"
#include "prefill_sm90_kernel.cuh"
#include "rope_keys.cuh"

namespace jax_pagedattn {
namespace sm90 {

// SMs of the current device, cached per device ordinal (0 if unknown; prefill_sm90.cu).
int DeviceSms();

// One call for a kernel: with `p`, launch it on *p (nothing where the plan has no items);
// without, write its CTAs per SM to *ctas.
struct Sm90Call {
  const AttentionParams* p;
  cudaStream_t stream;
  PrefillSm90Tuning tuning;
  int32_t* ctas;
};

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

  static cudaError_t Run(const Sm90Call& c) {
    if (c.p == nullptr) return Occupancy(c.ctas);
    if (c.p->layout.work_cap == 0) return cudaSuccess;  // no items, nothing to launch
    return Launch(*c.p, c.stream, c.tuning);
  }
};

// The kernels of head_dim D for (dtype, stages); cudaErrorNotSupported for any other.
// Head_dims 64 and 256 have the bf16 and fp16 kernels with 2 stages (this definition,
// instantiated in prefill_sm90_d64.cu and _d256.cu only), 128 also 3 stages
// (prefill_sm90_d128.cu).
template <int D>
cudaError_t RunSm90HeadDim(DType dtype, int stages, const Sm90Call& call) {
  if (stages != 2) return cudaErrorNotSupported;
  switch (dtype) {
    case DType::kBF16: return Sm90Kernel<__nv_bfloat16, D, 2>::Run(call);
    case DType::kF16: return Sm90Kernel<__half, D, 2>::Run(call);
    default: return cudaErrorNotSupported;
  }
}
template <>
cudaError_t RunSm90HeadDim<128>(DType dtype, int stages, const Sm90Call& call);
extern template cudaError_t RunSm90HeadDim<64>(DType dtype, int stages, const Sm90Call& call);
extern template cudaError_t RunSm90HeadDim<256>(DType dtype, int stages, const Sm90Call& call);

// bf16, head_dim 128, 3 stages, variant `variant` (prefill_sm90_config.cuh, kVariant*);
// cudaErrorNotSupported for any other variant. Defined in prefill_sm90_variants.cu, built
// only into the kernel harness (with JPA_SM90_VARIANTS).
cudaError_t RunSm90Variant(int variant, const Sm90Call& call);

}  // namespace sm90
}  // namespace jax_pagedattn
