// Error conversion shared by the CPU attention and append handlers (the shape checks
// live in ffi_common.h, shared with the CUDA handlers).
#pragma once

#include <cstdint>

#include "cpu_backend.h"
#include "jax_pagedattn/params.h"
#include "xla/ffi/api/ffi.h"

namespace jax_pagedattn {
namespace cpu {

// The backend's message (nullptr: success) as an FFI error.
inline xla::ffi::Error ToFfiError(const char* msg) {
  if (msg == nullptr) return xla::ffi::Error::Success();
  if (msg == kOutOfHostMemory) return xla::ffi::Error(xla::ffi::ErrorCode::kResourceExhausted, msg);
  return xla::ffi::Error::InvalidArgument(msg);
}

}  // namespace cpu
}  // namespace jax_pagedattn
