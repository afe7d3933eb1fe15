// CPU append: scatters new K/V rows into their cache pages (docs/CONTRACT.md, Append),
// plus the two FFI handlers (one 5-D cache, or a (k, v) pair).
//
// Appending is a pure copy, so it works on bytes and needs no per-dtype code. Threads
// split the kv heads, and each walks the rows in order: a slot named twice ends up with
// the later row, the same result on any thread count.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_backend.h"
#include "cpu_handler_checks.h"
#include "cpu_parallel.h"
#include "jax_pagedattn/ffi_common.h"
#include "jax_pagedattn/handlers.h"

namespace jax_pagedattn {
namespace cpu {
namespace {

// Page id for row i, or -1 when the row must be skipped: request outside [0, batch),
// negative position, page slot outside the request's [kv_indptr[b], kv_indptr[b+1]) or
// outside kv_indices, page id outside the cache.
int64_t TargetPage(const AppendParams& p, int32_t i) {
  const int32_t b = p.batch_indices[i];
  const int32_t pos = p.positions[i];
  if (b < 0 || b >= p.batch || pos < 0) return -1;
  const int64_t slot = int64_t(p.kv_indptr[b]) + pos / p.kv.page_size;
  if (slot < p.kv_indptr[b] || slot >= p.kv_indptr[b + 1]) return -1;
  if (slot < 0 || slot >= p.num_indices) return -1;
  const int64_t page = p.kv_indices[slot];
  return page >= 0 && page < p.kv.num_pages ? page : -1;
}

}  // namespace

const char* RunAppendCpu(const AppendParams& p) {
  if (p.dtype != DType::kF32 && p.dtype != DType::kF16 && p.dtype != DType::kBF16 &&
      !IsFp8(p.dtype))
    return "jax_pagedattn: unsupported dtype (want f32, f16, bf16 or fp8)";
  if (p.kv.page_size <= 0 || p.kv.num_kv_heads <= 0 || p.kv.head_dim <= 0)
    return "jax_pagedattn: page_size, num_kv_heads and head_dim must be positive";
  if (p.num_rows < 0 || p.batch < 0 || p.num_indices < 0)
    return "jax_pagedattn: negative row, request or index count";
  if (p.num_rows == 0) return nullptr;

  const int64_t elem = ElemBytes(p.dtype);
  const int64_t H = p.kv.num_kv_heads;
  const int64_t row_bytes = int64_t(p.kv.head_dim) * elem;
  const char* new_k = static_cast<const char*>(p.new_k);
  const char* new_v = static_cast<const char*>(p.new_v);
  char* k = static_cast<char*>(p.k);
  char* v = static_cast<char*>(p.v);

  // A byte copied is weighed like a flop when deciding whether threads pay.
  const double bytes = 2.0 * double(p.num_rows) * double(H) * double(row_bytes);
  const bool ok = ParallelTasks(H, ChooseThreads(H, bytes), [&]() {
    return [&](int64_t h) {
      for (int32_t i = 0; i < p.num_rows; ++i) {
        const int64_t page = TargetPage(p, i);
        if (page < 0) continue;
        const int64_t dst = p.kv.offset(page, p.positions[i] % p.kv.page_size, h) * elem;
        const int64_t src = (int64_t(i) * H + h) * row_bytes;
        std::memcpy(k + dst, new_k + src, size_t(row_bytes));
        std::memcpy(v + dst, new_v + src, size_t(row_bytes));
      }
    };
  });
  return ok ? nullptr : kOutOfHostMemory;
}

}  // namespace cpu
}  // namespace jax_pagedattn

namespace {

namespace ffi = ::xla::ffi;
using namespace ::jax_pagedattn;

// The result is meant to alias the operand; if XLA gave it separate memory, start it
// from the operand's contents so untouched pages survive.
void CopyIfNotAliased(ffi::AnyBuffer cache, ffi::AnyBuffer cache_out) {
  if (cache_out.untyped_data() != cache.untyped_data() && cache.size_bytes() > 0)
    std::memcpy(cache_out.untyped_data(), cache.untyped_data(), cache.size_bytes());
}

// Operands: new_k, new_v, batch_indices, positions, kv_indices, kv_indptr, paged_kv_cache
// (5-D); result: the cache, aliased; attributes: page_size, kv_layout, num_kv_heads, head_dim.
ffi::Error AppendImpl(ffi::AnyBuffer new_k, ffi::AnyBuffer new_v,
                      ffi::Buffer<ffi::S32> batch_indices, ffi::Buffer<ffi::S32> positions,
                      ffi::Buffer<ffi::S32> kv_indices, ffi::Buffer<ffi::S32> kv_indptr,
                      ffi::AnyBuffer cache, ffi::Result<ffi::AnyBuffer> cache_out,
                      int32_t page_size, int32_t kv_layout, int32_t num_kv_heads,
                      int32_t head_dim) {
  AppendParams p;
  ffi::Error err = MakeAppendParams(new_k, new_v, batch_indices, positions, kv_indices, kv_indptr,
                                    cache, cache, *cache_out, *cache_out, /*combined=*/true,
                                    page_size, kv_layout, num_kv_heads, head_dim, &p);
  if (err.failure()) return err;
  CopyIfNotAliased(cache, *cache_out);
  return cpu::ToFfiError(cpu::RunAppendCpu(p));
}

// As AppendImpl with a (k_cache, v_cache) pair of 4-D operands and two aliased results.
ffi::Error AppendKvImpl(ffi::AnyBuffer new_k, ffi::AnyBuffer new_v,
                        ffi::Buffer<ffi::S32> batch_indices, ffi::Buffer<ffi::S32> positions,
                        ffi::Buffer<ffi::S32> kv_indices, ffi::Buffer<ffi::S32> kv_indptr,
                        ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                        ffi::Result<ffi::AnyBuffer> k_out, ffi::Result<ffi::AnyBuffer> v_out,
                        int32_t page_size, int32_t kv_layout, int32_t num_kv_heads,
                        int32_t head_dim) {
  AppendParams p;
  ffi::Error err = MakeAppendParams(new_k, new_v, batch_indices, positions, kv_indices, kv_indptr,
                                    k_cache, v_cache, *k_out, *v_out, /*combined=*/false,
                                    page_size, kv_layout, num_kv_heads, head_dim, &p);
  if (err.failure()) return err;
  CopyIfNotAliased(k_cache, *k_out);
  CopyIfNotAliased(v_cache, *v_out);
  return cpu::ToFfiError(cpu::RunAppendCpu(p));
}

}  // namespace

// Operands and results in the order of the handler parameters above; attributes last.
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxPagedAttnAppendCpu, AppendImpl,
    ::jax_pagedattn::BindAppendAttrs(
        ::jax_pagedattn::BindAppendInputs(::xla::ffi::Ffi::Bind())
            .Arg<::xla::ffi::AnyBuffer>()   // paged_kv_cache
            .Ret<::xla::ffi::AnyBuffer>()));  // the cache, aliased
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxPagedAttnAppendKvCpu, AppendKvImpl,
    ::jax_pagedattn::BindAppendAttrs(
        ::jax_pagedattn::BindAppendInputs(::xla::ffi::Ffi::Bind())
            .Arg<::xla::ffi::AnyBuffer>()   // k_cache
            .Arg<::xla::ffi::AnyBuffer>()   // v_cache
            .Ret<::xla::ffi::AnyBuffer>()   // k_cache, aliased
            .Ret<::xla::ffi::AnyBuffer>()));  // v_cache, aliased
