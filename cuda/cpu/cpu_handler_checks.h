// Checks and error conversion shared by the CPU attention and append handlers.
// MakeAttentionParams and MakeAppendParams take page size, head count and head dim from
// attributes; these checks make sure the cache buffers really have that shape before
// any pointer arithmetic trusts it.
#pragma once

#include <cstdint>

#include "cpu_backend.h"
#include "jax_pagedattn/params.h"
#include "xla/ffi/api/ffi.h"

namespace jax_pagedattn {
namespace cpu {

// Combined: [P, 2, S, H, D] (NHD) or [P, 2, H, S, D] (HND); pair: the same without the 2.
inline bool CacheDimsMatch(xla::ffi::AnyBuffer::Dimensions dims, bool combined, int32_t kv_layout,
                           int32_t page_size, int32_t num_kv_heads, int32_t head_dim) {
  const size_t rank = combined ? 5 : 4;
  if (dims.size() != rank || dims[0] < 0) return false;
  size_t i = 1;
  if (combined && dims[i++] != 2) return false;
  const int64_t slot_then_head[2] = {page_size, num_kv_heads};
  const int64_t head_then_slot[2] = {num_kv_heads, page_size};
  const int64_t* mid = kv_layout == int32_t(KvLayout::kNHD) ? slot_then_head : head_then_slot;
  return dims[i] == mid[0] && dims[i + 1] == mid[1] && dims[i + 2] == head_dim;
}

inline bool ValidLayout(int32_t kv_layout) {
  return kv_layout == int32_t(KvLayout::kNHD) || kv_layout == int32_t(KvLayout::kHND);
}

// The backend's message (nullptr: success) as an FFI error.
inline xla::ffi::Error ToFfiError(const char* msg) {
  if (msg == nullptr) return xla::ffi::Error::Success();
  if (msg == kOutOfHostMemory) return xla::ffi::Error(xla::ffi::ErrorCode::kResourceExhausted, msg);
  return xla::ffi::Error::InvalidArgument(msg);
}

}  // namespace cpu
}  // namespace jax_pagedattn
