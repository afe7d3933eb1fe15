// The CPU backend as plain C++ over the structs of params.h, so that tests can drive it
// with hand-built plan buffers and no XLA call frame. The FFI handlers in
// attention_cpu.cc / append_cpu.cc only check their buffers and call these.
#pragma once

#include "jax_pagedattn/params.h"

namespace jax_pagedattn {
namespace cpu {

// Returned (this exact pointer) when a host allocation failed, so that handlers can
// report it as resource exhaustion rather than as a bad argument.
extern const char kOutOfHostMemory[];

// The attention pass over every live work item and kv head, then the merge pass over
// all p.q_rows rows (CONTRACT.md). Never reads or writes outside the buffers that `p`
// describes, whatever the plan holds: out-of-range pages, tokens and partial rows are
// masked or skipped. Returns nullptr on success, kOutOfHostMemory, or a message about an
// unsupported parameter.
const char* RunAttentionCpu(const AttentionParams& p);

// Scatters the new rows into their pages; rows that would land outside the pages
// their request owns are skipped. Returns nullptr on success, else a message.
const char* RunAppendCpu(const AppendParams& p);

}  // namespace cpu
}  // namespace jax_pagedattn
