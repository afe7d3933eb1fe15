// Typed-FFI CUDA handlers of jax_pagedattn_decode and jax_pagedattn_prefill.
//
// Thin: bind the operands (ffi_common.h, shared with the CPU handlers), check what the
// GPU kernels need beyond the shared checks, then launch the setup pass and the
// attention pass (which merges its own split partials) on XLA's stream. No allocation,
// no host reads of device memory, no stream queries: the same launches for the same
// shapes, as kCmdBufferCompatible promises (handlers.h registers both kinds).
#include <cuda_runtime.h>

#include <string>

#include "jax_pagedattn/ffi_common.h"
#include "jax_pagedattn/handlers.h"
#include "jax_pagedattn/occupancy.h"
#include "launchers.h"
#ifdef JAX_PAGEDATTN_WITH_SM90
#include "sm90/prefill_sm90.h"
#endif

namespace jax_pagedattn {
namespace {

ffi::Error LaunchError(const char* what, cudaError_t err) {
  return ffi::Error::Internal(std::string("jax_pagedattn: ") + what + " launch failed: " +
                              cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

// Checks that only the GPU kernels impose (the shared ones ran in MakeAttentionParams).
ffi::Error CheckGpuParams(const AttentionParams& p) {
  if (p.dtype == DType::kF32)
    return ffi::Error::InvalidArgument(
        "jax_pagedattn: float32 attention is not supported on the GPU; use float16 or "
        "bfloat16 (float32 runs on the CPU backend)");
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256)
    return ffi::Error::InvalidArgument("jax_pagedattn: head_dim must be 64, 128 or 256 on the GPU");
  if (p.kv.page_size < 1)
    return ffi::Error::InvalidArgument("jax_pagedattn: page_size must be at least 1");
  if (p.num_qo_heads < 1)
    return ffi::Error::InvalidArgument("jax_pagedattn: num_qo_heads must be at least 1");
  if (p.num_kv_heads > 65535)
    return ffi::Error::InvalidArgument("jax_pagedattn: num_kv_heads must be at most 65535");
  if (p.layout.work_cap < 0 || p.caps.partial_rows < 0)
    return ffi::Error::InvalidArgument("jax_pagedattn: capacities must not be negative");
  if (p.kv.num_kv_heads != p.num_kv_heads || p.kv.head_dim != p.head_dim)
    return ffi::Error::InvalidArgument("jax_pagedattn: cache heads/head_dim do not match the attributes");
  return ffi::Error::Success();
}

template <cudaError_t (*kAttention)(const AttentionParams&, cudaStream_t)>
ffi::Error SetupThenAttention(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                              ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> plan,
                              ffi::Buffer<ffi::F32> sinks, ffi::Buffer<ffi::F32> scales,
                              ffi::Result<ffi::AnyBuffer> out,
                              ffi::ResultBuffer<ffi::F32> lse, ffi::ResultBuffer<ffi::U8> workspace,
                              AttentionAttrs attrs) {
  AttentionParams p;
  ffi::Error err =
      MakeAttentionParams({q, k_cache, v_cache, plan, sinks, scales, out, lse, workspace}, attrs, &p);
  if (err.failure()) return err;
  err = CheckGpuParams(p);
  if (err.failure()) return err;
  // fp8 caches run on every kernel: the CUDA-core decode kernel and the sm80 tensor-core
  // one (the Hopper kernel declines them, LaunchPrefill falls back). Python gates the
  // tensor-core path behind switches.fp8_tensor_cores until it is validated on a GPU.
  cudaError_t cu = LaunchMergeSetup(p, stream);
  if (cu != cudaSuccess) return LaunchError("merge setup kernel", cu);
  cu = kAttention(p, stream);
  if (cu != cudaSuccess) return LaunchError(kAttention == LaunchDecode ? "decode kernel" : "prefill kernel", cu);
  return ffi::Error::Success();
}

}  // namespace

const char* AttentionCtasPerSm(bool tensor_cores, DType dtype, int32_t head_dim,
                               int32_t tile_rows, bool sm90_prefill, int32_t* ctas) {
  *ctas = 0;
  const cudaError_t err = tensor_cores
                              ? PrefillCtasPerSm(dtype, head_dim, tile_rows, sm90_prefill, ctas)
                              : DecodeCtasPerSm(dtype, head_dim, tile_rows, ctas);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

bool HopperPrefillCovers(DType dtype, DType kv_dtype, int32_t head_dim) {
#ifdef JAX_PAGEDATTN_WITH_SM90
  return PrefillSm90Covers(dtype, kv_dtype, head_dim);
#else
  (void)dtype, (void)kv_dtype, (void)head_dim;
  return false;
#endif
}

}  // namespace jax_pagedattn

// The bindings: stream context, then ffi_common.h's operand list.
JPA_DEFINE_CUDA_HANDLERS(
    JaxPagedAttnDecodeCuda, jax_pagedattn::SetupThenAttention<jax_pagedattn::LaunchDecode>,
    jax_pagedattn::BindAttention(
        xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()));

JPA_DEFINE_CUDA_HANDLERS(
    JaxPagedAttnPrefillCuda, jax_pagedattn::SetupThenAttention<jax_pagedattn::LaunchPrefill>,
    jax_pagedattn::BindAttention(
        xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()));
