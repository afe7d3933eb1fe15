// CPU attention: runs the items of every bin of the plan, as the CUDA grid [bin_cap,
// Hkv] does (cpu_attention_task.h; the CPU hands items out dynamically instead of one
// bin per thread), then runs the merge pass over every query row
// (cpu_merge.h); docs/CONTRACT.md has the contract. Also the decode/prefill FFI
// handlers, one implementation for both: the CPU has one code path.
#include <algorithm>
#include <cstdint>
#include <exception>
#include <memory>
#include <utility>
#include <vector>

#include "cpu_attention_task.h"
#include "cpu_backend.h"
#include "cpu_handler_checks.h"
#include "cpu_merge.h"
#include "cpu_numeric.h"
#include "cpu_parallel.h"
#include "cpu_rope.h"
#include "jax_pagedattn/ffi_common.h"
#include "jax_pagedattn/handlers.h"

namespace jax_pagedattn {
namespace cpu {
namespace {

// Query tokens per merge task.
constexpr int kMergeTokens = 16;

const char* CheckParams(const AttentionParams& p) {
  if (p.dtype != DType::kF32 && p.dtype != DType::kF16 && p.dtype != DType::kBF16)
    return "jax_pagedattn: unsupported dtype (want f32, f16 or bf16)";
  if (!(p.kv_dtype == p.dtype || (IsFp8(p.kv_dtype) && p.dtype != DType::kF32)))
    return "jax_pagedattn: the cache must have q's dtype, or an fp8 type beside an f16/bf16 q";
  if (p.head_dim <= 0 || p.num_qo_heads <= 0 || p.num_kv_heads <= 0 || p.group_size <= 0 ||
      p.group_size * p.num_kv_heads != p.num_qo_heads)
    return "jax_pagedattn: head counts must be positive and num_qo_heads a multiple of num_kv_heads";
  if (p.kv.head_dim != p.head_dim || p.kv.num_kv_heads != p.num_kv_heads)
    return "jax_pagedattn: cache head count or head_dim differs from the call's";
  if (p.kv.page_size <= 0) return "jax_pagedattn: page_size must be positive";
  if (p.q_rows < 0 || p.q_rows > p.layout.token_cap)
    return "jax_pagedattn: q has more rows than token_cap";
  if (p.caps.partial_rows < 0) return "jax_pagedattn: partial_rows_cap must not be negative";
  if (p.pos_encoding != PosEncoding::kNone && p.pos_encoding != PosEncoding::kRopeLlama &&
      p.pos_encoding != PosEncoding::kAlibi)
    return "jax_pagedattn: pos_encoding must be 0 (NONE), 1 (ROPE_LLAMA) or 2 (ALIBI)";
  if (p.pos_encoding == PosEncoding::kRopeLlama && p.head_dim % 2 != 0)
    return "jax_pagedattn: ROPE_LLAMA needs an even head_dim";
  return nullptr;
}

// Reads the bins and work items on the host (allowed here: this is the CPU) to find
// the live items, order them by cost and size the RoPE table. Only items some bin
// names run, as on the GPU.
void PrepareCall(const AttentionParams& p, CallPlan& c) {
  c.p = &p;
  c.dp = PaddedDim(p.head_dim);
  c.half = p.head_dim / 2;
  // In place only where the kernels read the cache's own type (not fp8: widened).
  c.direct = p.pos_encoding != PosEncoding::kRopeLlama && p.head_dim % 8 == 0 &&
             p.kv_dtype == p.dtype;
  std::vector<std::pair<double, int32_t>> cost;
  int64_t max_key = 0;
  for (int32_t bin = 0; bin < p.layout.bin_cap; ++bin) {
    const int32_t begin = std::max(p.bin_indptr[bin], 0);
    const int32_t end = std::min(p.bin_indptr[bin + 1], p.layout.work_cap);
    for (int32_t w = begin; w < end; ++w) {
      const int32_t* it = p.work + int64_t(w) * kWorkFields;
      if (!LiveItem(p, it)) continue;
      const KeyRange keys = ItemKeys(p, it);
      const double nkeys = double(std::max<int64_t>(keys.end - keys.begin, 0));
      const double nrows = double(it[kWorkRowEnd]) - double(it[kWorkRowBegin]);
      // Rows beyond q are skipped, so a bogus row count must not inflate the estimate.
      const double rows = std::min(nrows, double(p.q_rows) * p.group_size);
      cost.emplace_back(rows * (nkeys + 1.0), w);
      max_key = std::max(max_key, keys.end);
    }
  }
  std::stable_sort(cost.begin(), cost.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  c.live.reserve(cost.size());
  for (const auto& e : cost) {
    c.live.push_back(e.second);
    c.flops += 4.0 * e.first * p.head_dim * p.num_kv_heads;
  }
  if (p.pos_encoding == PosEncoding::kRopeLlama) {
    c.inv_freq = RopeInvFreq(p.head_dim, p.rope_scale, p.rope_theta);
    c.rope_positions = max_key;
    c.rope_cos.resize(size_t(max_key) * c.half);
    c.rope_sin.resize(size_t(max_key) * c.half);
  }
}

// How many adjacent kv heads one task takes: as many as the scratch holds rows for
// (all of them for decode), but few enough to leave each thread several tasks. Never
// more than kRowChunk, so every head gets at least one row per pass.
int32_t HeadsPerTask(const CallPlan& c, int threads) {
  const AttentionParams& p = *c.p;
  int64_t max_rows = 1;
  for (int32_t w : c.live) {
    const int32_t* it = p.work + int64_t(w) * kWorkFields;
    const int64_t rows = int64_t(it[kWorkRowEnd]) - it[kWorkRowBegin];
    max_rows = std::max(max_rows, std::min<int64_t>(rows, int64_t(p.q_rows) * p.group_size));
  }
  int64_t hpt = std::min<int64_t>({int64_t(p.num_kv_heads), kRowChunk / max_rows, kRowChunk});
  hpt = std::max<int64_t>(hpt, 1);
  const int64_t items = int64_t(c.live.size());
  while (hpt > 1 && items * ((p.num_kv_heads + hpt - 1) / hpt) < 4 * int64_t(threads))
    hpt = (hpt + 1) / 2;
  return int32_t(hpt);
}

// The three passes of one call with q/out type T and cache type C; the attention pass's
// kernels read K (C in place, or float after widening).
template <typename T, typename C, typename K>
bool RunPasses(CallPlan& c) {
  const AttentionParams& p = *c.p;
  // RoPE table: one row per key position, filled in parallel.
  constexpr int64_t kRopeChunk = 256;
  const int64_t rope_tasks = (c.rope_positions + kRopeChunk - 1) / kRopeChunk;
  if (rope_tasks > 0) {
    const double rope_flops = 40.0 * double(c.rope_positions) * c.half;
    const bool ok = ParallelTasks(rope_tasks, ChooseThreads(rope_tasks, rope_flops), [&]() {
      return [&](int64_t task) {
        const int64_t end = std::min(c.rope_positions, (task + 1) * kRopeChunk);
        for (int64_t pos = task * kRopeChunk; pos < end; ++pos)
          RopeCosSin(pos, c.inv_freq.data(), c.half, c.rope_cos.data() + pos * c.half,
                     c.rope_sin.data() + pos * c.half);
      };
    });
    if (!ok) return false;
  }

  // Attention pass: the CUDA grid [items, kv heads] over live items, heads_per_task
  // adjacent kv heads per task.
  const int64_t grid = int64_t(c.live.size()) * p.num_kv_heads;
  if (grid > 0) {
    const int threads = ChooseThreads(grid, c.flops);
    const int32_t hpt = HeadsPerTask(c, threads);
    const int32_t groups = (p.num_kv_heads + hpt - 1) / hpt;
    const int64_t tasks = int64_t(c.live.size()) * groups;
    const bool ok = ParallelTasks(tasks, threads, [&]() {
      auto scratch = std::make_shared<Scratch<K>>(c.dp, hpt, !c.direct);
      return [&c, scratch, hpt, groups](int64_t task) {
        const int32_t h0 = int32_t(task % groups) * hpt;
        const int32_t h1 = std::min(h0 + hpt, c.p->num_kv_heads);
        RunTask<T, C>(c, *scratch, c.live[task / groups], h0, h1);
      };
    });
    if (!ok) return false;
  }

  // Merge pass over every row of q, after all partials exist.
  const int64_t merge_tasks = (int64_t(p.q_rows) + kMergeTokens - 1) / kMergeTokens;
  if (merge_tasks > 0) {
    const double merge_flops = 4.0 * double(p.q_rows) * p.num_qo_heads * p.head_dim;
    const bool ok = ParallelTasks(merge_tasks, ChooseThreads(merge_tasks, merge_flops), [&]() {
      auto o = std::make_shared<std::vector<float>>(p.head_dim);
      return [&p, o](int64_t task) {
        const int64_t t0 = task * kMergeTokens;
        MergeTokens<T>(p, *o, t0, std::min<int64_t>(t0 + kMergeTokens, p.q_rows));
      };
    });
    if (!ok) return false;
  }
  return true;
}

template <typename T>
bool RunTyped(CallPlan& c) {
  switch (c.p->kv_dtype) {
    case DType::kF8E4M3: return RunPasses<T, Fp8E4M3, float>(c);
    case DType::kF8E5M2: return RunPasses<T, Fp8E5M2, float>(c);
    default: return c.direct ? RunPasses<T, T, T>(c) : RunPasses<T, T, float>(c);
  }
}

}  // namespace

const char kOutOfHostMemory[] = "jax_pagedattn: out of host memory in the CPU backend";

const char* RunAttentionCpu(const AttentionParams& p) {
  if (const char* msg = CheckParams(p)) return msg;
  CallPlan c;
  try {
    PrepareCall(p, c);
  } catch (const std::exception&) {
    return kOutOfHostMemory;
  }
  bool ok = false;
  switch (p.dtype) {
    case DType::kF32: ok = RunTyped<float>(c); break;
    case DType::kF16: ok = RunTyped<Half>(c); break;
    case DType::kBF16: ok = RunTyped<BFloat16>(c); break;
    default: break;  // CheckParams allows no other
  }
  return ok ? nullptr : kOutOfHostMemory;
}

}  // namespace cpu
}  // namespace jax_pagedattn

namespace {

namespace ffi = ::xla::ffi;
using namespace ::jax_pagedattn;

// Decode and prefill share this: on the CPU there is one code path.
ffi::Error AttentionImpl(ffi::AnyBuffer q, ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                         ffi::Buffer<ffi::S32> plan, ffi::Buffer<ffi::F32> sinks,
                         ffi::Buffer<ffi::F32> scales, ffi::Result<ffi::AnyBuffer> out,
                         ffi::ResultBuffer<ffi::F32> lse, ffi::ResultBuffer<ffi::U8> workspace,
                         AttentionAttrs attrs) {
  AttentionParams p;
  ffi::Error err =
      MakeAttentionParams({q, k_cache, v_cache, plan, sinks, scales, out, lse, workspace}, attrs, &p);
  if (err.failure()) return err;
  return cpu::ToFfiError(cpu::RunAttentionCpu(p));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxPagedAttnDecodeCpu, AttentionImpl,
    ::jax_pagedattn::BindAttention(::xla::ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxPagedAttnPrefillCpu, AttentionImpl,
    ::jax_pagedattn::BindAttention(::xla::ffi::Ffi::Bind()));
