// Typed-FFI CUDA handlers of jax_pagedattn_append (one 5-D cache) and
// jax_pagedattn_append_kv (a (k, v) pair of 4-D caches). The cache results alias the
// cache operands, so the kernel scatters into the result buffers in place.
#include <cuda_runtime.h>

#include <string>

#include "jax_pagedattn/ffi_common.h"
#include "jax_pagedattn/handlers.h"
#include "launchers.h"

namespace jax_pagedattn {
namespace {

// With operand_output_aliases XLA hands the operand's buffer as the result. Should it
// ever hand a distinct one, copy the cache over first (a stream operation, capturable)
// so untouched pages are still the operand's.
ffi::Error EnsureAliased(cudaStream_t stream, ffi::AnyBuffer in, ffi::AnyBuffer out) {
  if (in.untyped_data() == out.untyped_data()) return ffi::Error::Success();
  if (in.size_bytes() != out.size_bytes())
    return ffi::Error::InvalidArgument("jax_pagedattn: append cache result does not match its operand");
  const cudaError_t err = cudaMemcpyAsync(out.untyped_data(), in.untyped_data(), in.size_bytes(),
                                          cudaMemcpyDeviceToDevice, stream);
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("jax_pagedattn: append cache copy failed: ") +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

ffi::Error RunAppend(cudaStream_t stream, const AppendParams& p) {
  const cudaError_t err = LaunchAppend(p, stream);
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("jax_pagedattn: append kernel launch failed: ") +
                                cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  return ffi::Error::Success();
}

ffi::Error AppendCuda(cudaStream_t stream, ffi::AnyBuffer new_k, ffi::AnyBuffer new_v,
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
  err = EnsureAliased(stream, cache, *cache_out);
  if (err.failure()) return err;
  return RunAppend(stream, p);
}

ffi::Error AppendKvCuda(cudaStream_t stream, ffi::AnyBuffer new_k, ffi::AnyBuffer new_v,
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
  err = EnsureAliased(stream, k_cache, *k_out);
  if (err.failure()) return err;
  err = EnsureAliased(stream, v_cache, *v_out);
  if (err.failure()) return err;
  return RunAppend(stream, p);
}

}  // namespace
}  // namespace jax_pagedattn

// The bindings: stream context, ffi_common.h's inputs, the cache operand(s), the aliased
// cache result(s), then the attributes.
JPA_DEFINE_CUDA_HANDLERS(
    JaxPagedAttnAppendCuda, jax_pagedattn::AppendCuda,
    jax_pagedattn::BindAppendAttrs(
        jax_pagedattn::BindAppendInputs(
            xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>())
            .Arg<xla::ffi::AnyBuffer>()   // cache
            .Ret<xla::ffi::AnyBuffer>()));  // cache (aliased)

JPA_DEFINE_CUDA_HANDLERS(
    JaxPagedAttnAppendKvCuda, jax_pagedattn::AppendKvCuda,
    jax_pagedattn::BindAppendAttrs(
        jax_pagedattn::BindAppendInputs(
            xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>())
            .Arg<xla::ffi::AnyBuffer>()   // k_cache
            .Arg<xla::ffi::AnyBuffer>()   // v_cache
            .Ret<xla::ffi::AnyBuffer>()   // k_cache (aliased)
            .Ret<xla::ffi::AnyBuffer>()));  // v_cache (aliased)
