// The Hopper prefill kernel's variants under measurement (prefill_sm90_config.cuh,
// kVariant*), for bf16 at head_dim 128 with 3 stages. Built only into the kernel harness
// (scripts/sm90_prefill_session.sh, with JPA_SM90_VARIANTS), never into the library.
#include "prefill_sm90_launch.cuh"

namespace jax_pagedattn {
namespace sm90 {

cudaError_t RunSm90Variant(int variant, const Sm90Call& call) {
  switch (variant) {
    case kVariantTwoVStages: return Sm90Kernel<__nv_bfloat16, 128, 3, kVariantTwoVStages>::Run(call);
    case kVariantGeneralMask: return Sm90Kernel<__nv_bfloat16, 128, 3, kVariantGeneralMask>::Run(call);
    case kVariantRescaleFirst: return Sm90Kernel<__nv_bfloat16, 128, 3, kVariantRescaleFirst>::Run(call);
    case kVariantEarlyVTest: return Sm90Kernel<__nv_bfloat16, 128, 3, kVariantEarlyVTest>::Run(call);
    case kVariantSlotItems: return Sm90Kernel<__nv_bfloat16, 128, 3, kVariantSlotItems>::Run(call);
    case kVariantSlotItems | kVariantTwoVStages:
      return Sm90Kernel<__nv_bfloat16, 128, 3, kVariantSlotItems | kVariantTwoVStages>::Run(call);
    default: return cudaErrorNotSupported;
  }
}

}  // namespace sm90
}  // namespace jax_pagedattn
