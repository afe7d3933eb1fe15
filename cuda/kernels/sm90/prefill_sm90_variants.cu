// The Hopper prefill kernel's variants under measurement (prefill_sm90_config.cuh,
// kVariant*), for bf16 at head_dim 128 with 3 stages. Built only into the kernel harness
// (scripts/sm90_prefill_session.sh, with JPA_SM90_VARIANTS), never into the library.
#include "prefill_sm90_launch.cuh"

namespace jax_pagedattn {
namespace sm90 {

cudaError_t RunSm90Variant(int variant, const Sm90Call& call) {
  switch (variant) {
    case kVariantTwoVStages: return Sm90Kernel<__nv_bfloat16, 128, 3, kVariantTwoVStages>::Run(call);
    default: return cudaErrorNotSupported;
  }
}

}  // namespace sm90
}  // namespace jax_pagedattn
