// The Hopper prefill kernels of head_dim 64 (2 K/V stages; prefill_sm90_launch.cuh).
#include "prefill_sm90_launch.cuh"

namespace jax_pagedattn {
namespace sm90 {

template <>
cudaError_t RunSm90HeadDim<64>(DType dtype, int stages, const Sm90Call& call) {
  if (stages != 2) return cudaErrorNotSupported;
  switch (dtype) {
    case DType::kBF16: return Sm90Kernel<__nv_bfloat16, 64, 2>::Run(call);
    case DType::kF16: return Sm90Kernel<__half, 64, 2>::Run(call);
    default: return cudaErrorNotSupported;
  }
}

}  // namespace sm90
}  // namespace jax_pagedattn
