// Division by a divisor fixed for a whole kernel (the GQA group size): a multiply and a
// shift instead of the ~18-instruction sequence (with a MUFU.RCP) the compiler emits for
// each division by a runtime int. The kernels divide packed row indices by the group
// size several times per item.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace jax_pagedattn {

// For d >= 1 and any n in [0, 2^31): Div(n) == n / d and Mod(n) == n % d (other n give
// some value, no fault). With l = ceil(log2 d) and m = ceil(2^(31 + l) / d), which is
// below 2^32 because d > 2^(l - 1) (m = 2^31 at d = 1),
// n m / 2^(31 + l) = n / d + n e / (d 2^(31 + l)) where e = m d - 2^(31 + l) is in
// [0, d); the second term is below 2^31 d / (d 2^(31 + l)) = 2^-l <= 1 / d, too little
// to reach the next multiple of 1 / d, so the floor of the product is n / d's.
struct FastDivmod {
  uint32_t mul;
  int shift;  // 31 + l
  int d;

  __device__ explicit FastDivmod(int divisor) : d(divisor) {
    const int l = divisor > 1 ? 32 - __clz(unsigned(divisor - 1)) : 0;
    shift = 31 + l;
    mul = uint32_t(((uint64_t(1) << shift) + uint64_t(divisor) - 1) / uint64_t(divisor));
  }
  __device__ __forceinline__ int Div(int n) const {
    return int((uint64_t(unsigned(n)) * uint64_t(mul)) >> shift);
  }
  __device__ __forceinline__ int Mod(int n) const { return n - Div(n) * d; }
};

}  // namespace jax_pagedattn
