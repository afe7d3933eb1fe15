// Every FFI handler symbol of the extension; module.cc exports them as capsules.
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnDecodeCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnPrefillCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnAppendCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnAppendKvCpu);

#ifdef JAX_PAGEDATTN_WITH_CUDA
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnDecodeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnPrefillCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnAppendCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxPagedAttnAppendKvCuda);
#endif
