// The Hopper prefill kernels of head_dim 128, with 2 or 3 K/V stages
// (prefill_sm90_launch.cuh).
#include "prefill_sm90_launch.cuh"

namespace jax_pagedattn {
namespace sm90 {

template <>
cudaError_t RunSm90HeadDim<128>(DType dtype, int stages, const Sm90Call& call) {
  const bool three = stages == 3;
  if (!three && stages != 2) return cudaErrorNotSupported;
  switch (dtype) {
    case DType::kBF16:
      return three ? Sm90Kernel<__nv_bfloat16, 128, 3>::Run(call) : Sm90Kernel<__nv_bfloat16, 128, 2>::Run(call);
    case DType::kF16:
      return three ? Sm90Kernel<__half, 128, 3>::Run(call) : Sm90Kernel<__half, 128, 2>::Run(call);
    default: return cudaErrorNotSupported;
  }
}

}  // namespace sm90
}  // namespace jax_pagedattn
