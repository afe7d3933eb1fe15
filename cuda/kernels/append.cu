// Scatter new K/V rows into their pages, in place (the cache results alias the inputs).
//
// Row i of new_k/new_v ([N, Hkv, D]) goes to request b = batch_indices[i] at key
// position pos = positions[i]: page kv_indices[kv_indptr[b] + pos / page_size], slot
// pos % page_size. A row whose b is outside [0, batch), whose pos is negative, whose page
// slot is outside [kv_indptr[b], kv_indptr[b+1]) (or outside kv_indices) or whose page id
// is outside [0, num_pages) is skipped, so no call writes outside the pages it owns. The
// slot is formed in 64 bits: positions near 2^31 must not wrap into another request.
//
// One thread per 16-byte unit of a (row, head) for K and the same unit of V: a warp moves
// 512 contiguous bytes of new_k and of new_v per instruction, and each head's destination
// row is contiguous too. Narrower units are only a fallback for rows that are not a
// multiple of 16 bytes or buffers that are not 16-byte aligned.
#include <cuda_runtime.h>

#include <cstdint>

#include "jax_pagedattn/params.h"
#include "launchers.h"

namespace jax_pagedattn {
namespace {

constexpr int kAppendThreads = 256;

template <int kBytes>
struct Unit;
template <>
struct Unit<16> { using Type = uint4; };
template <>
struct Unit<8> { using Type = uint2; };
template <>
struct Unit<4> { using Type = uint32_t; };
template <>
struct Unit<2> { using Type = uint16_t; };

template <int kBytes>
__global__ void __launch_bounds__(kAppendThreads)
    AppendKernel(const AppendParams p, int elem_bytes, int units_per_row) {
  using U = typename Unit<kBytes>::Type;
  const int H = p.kv.num_kv_heads;
  const int64_t total = int64_t(p.num_rows) * H * units_per_row;
  const int64_t stride = int64_t(gridDim.x) * kAppendThreads;
  const int elems_per_unit = kBytes / elem_bytes;
  for (int64_t idx = int64_t(blockIdx.x) * kAppendThreads + threadIdx.x; idx < total;
       idx += stride) {
    const int u = int(idx % units_per_row);
    const int64_t rest = idx / units_per_row;
    const int h = int(rest % H);
    const int i = int(rest / H);

    const int b = __ldg(p.batch_indices + i);
    const int pos = __ldg(p.positions + i);
    if (b < 0 || b >= p.batch || pos < 0) continue;
    const int64_t first = __ldg(p.kv_indptr + b), last = __ldg(p.kv_indptr + b + 1);
    const int64_t page_slot = first + pos / p.kv.page_size;
    if (page_slot < 0 || page_slot >= last || page_slot >= p.num_indices) continue;
    const int page = __ldg(p.kv_indices + page_slot);
    if (page < 0 || page >= p.kv.num_pages) continue;

    // Offsets in units: cache strides are multiples of D elements, hence of a unit.
    const int64_t dst = p.kv.offset(page, pos % p.kv.page_size, h) / elems_per_unit + u;
    const int64_t src = rest * units_per_row + u;  // (i * H + h) * units_per_row + u
    static_cast<U*>(p.k)[dst] = __ldg(static_cast<const U*>(p.new_k) + src);
    static_cast<U*>(p.v)[dst] = __ldg(static_cast<const U*>(p.new_v) + src);
  }
}

bool Aligned(const void* ptr, int bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % uintptr_t(bytes) == 0;
}

}  // namespace

cudaError_t LaunchAppend(const AppendParams& p, cudaStream_t stream) {
  const int elem_bytes = ElemBytes(p.dtype);
  if (p.kv.page_size <= 0 || p.kv.num_kv_heads <= 0 || p.kv.head_dim <= 0)
    return cudaErrorInvalidValue;
  if (p.num_rows <= 0 || p.batch <= 0) return cudaSuccess;  // nothing can be written
  const int row_bytes = p.kv.head_dim * elem_bytes;
  // The widest unit that divides a row and every base pointer (all offsets are whole rows).
  int unit = 16;
  while (unit > elem_bytes &&
         (row_bytes % unit != 0 || !Aligned(p.new_k, unit) || !Aligned(p.new_v, unit) ||
          !Aligned(p.k, unit) || !Aligned(p.v, unit)))
    unit /= 2;
  const int units_per_row = row_bytes / unit;
  const int64_t total = int64_t(p.num_rows) * p.kv.num_kv_heads * units_per_row;
  // Grid from static shapes only; a grid-stride loop covers anything past the cap.
  const int64_t want = (total + kAppendThreads - 1) / kAppendThreads;
  const unsigned blocks = unsigned(want < (1 << 20) ? want : (1 << 20));
  switch (unit) {
    case 16:
      AppendKernel<16><<<blocks, kAppendThreads, 0, stream>>>(p, elem_bytes, units_per_row);
      break;
    case 8:
      AppendKernel<8><<<blocks, kAppendThreads, 0, stream>>>(p, elem_bytes, units_per_row);
      break;
    case 4:
      AppendKernel<4><<<blocks, kAppendThreads, 0, stream>>>(p, elem_bytes, units_per_row);
      break;
    default:
      AppendKernel<2><<<blocks, kAppendThreads, 0, stream>>>(p, elem_bytes, units_per_row);
      break;
  }
  return cudaGetLastError();
}

}  // namespace jax_pagedattn
