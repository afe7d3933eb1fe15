// Every FFI handler symbol of the extension; module.cc exports them as capsules.
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnDecodeCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnPrefillCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnAppendCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnAppendKvCpu);

#ifdef JAX_PAGEDATTN_WITH_CUDA
// Each CUDA handler comes twice: `Name` runs as an ordinary XLA thunk, `NameGraph`
// declares kCmdBufferCompatible, so XLA may record it into a CUDA graph. The plain ones
// are registered by default: a step's plan is a new buffer every step, and re-recording
// a graph around it cost more than it saved (docs/CONTRACT.md, "Command buffers").
#define JPA_DEFINE_CUDA_HANDLERS(name, impl, binding)  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl, binding); \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name##Graph, impl, binding, \
                                {xla::ffi::Traits::kCmdBufferCompatible})

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnDecodeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnPrefillCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnAppendCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnAppendKvCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnDecodeCudaGraph);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnPrefillCudaGraph);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnAppendCudaGraph);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnAppendKvCudaGraph);
#endif
