// The merge pass of the CPU attention (docs/CONTRACT.md): after every work item ran,
// zero-fill padding rows and combine the split-KV partials of each token.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_attention_task.h"
#include "cpu_block_kernels.h"
#include "cpu_numeric.h"
#include "jax_pagedattn/params.h"

namespace jax_pagedattn {
namespace cpu {

// Tokens [t0, t1) of q; `o` is head_dim floats of scratch. Rows t >= num_tokens get
// out 0 and lse -inf; a token with n > 0 partials gets their lse-weighted mean
// (weights exp2(lse_i - max)), lse = max + log2(sum of weights), or 0 / -inf when
// every partial is empty; a token with n == 0 was written by its item and is left.
// Partial rows outside the workspace are ignored.
template <typename T>
void MergeTokens(const AttentionParams& p, std::vector<float>& o, int64_t t0, int64_t t1) {
  const int D = p.head_dim;
  const int H = p.num_qo_heads;
  const int64_t num_tokens = p.meta[kMetaNumTokens];
  T* out = static_cast<T*>(p.out);
  for (int64_t t = t0; t < t1; ++t) {
    if (t >= num_tokens) {
      std::memset(out + t * H * D, 0, sizeof(T) * size_t(H) * D);  // all-zero bits: +0
      std::fill(p.lse + t * H, p.lse + (t + 1) * H, kNegInf);
      continue;
    }
    const int64_t base = p.merge_indptr[t];
    const int64_t n = int64_t(p.merge_indptr[t + 1]) - base;
    if (n <= 0) continue;
    const int64_t first = std::max<int64_t>(base, 0);
    const int64_t last = std::min<int64_t>(base + n, p.caps.partial_rows);
    for (int h = 0; h < H; ++h) {
      float m = kNegInf;
      for (int64_t row = first; row < last; ++row) m = std::max(m, p.partial_lse[row * H + h]);
      std::fill(o.begin(), o.end(), 0.0f);
      float lse = kNegInf;
      if (m != kNegInf) {
        float wsum = 0.0f;
        for (int64_t row = first; row < last; ++row) {
          const float w = std::exp2(p.partial_lse[row * H + h] - m);
          if (w == 0.0f) continue;
          wsum += w;
          Axpy(o.data(), p.partial_o + (row * H + h) * D, w, D);
        }
        Scale(o.data(), 1.0f / wsum, D);
        lse = m + std::log2(wsum);
      }
      NarrowRow(o.data(), out + (t * H + h) * D, D);
      p.lse[t * H + h] = lse;
    }
  }
}

}  // namespace cpu
}  // namespace jax_pagedattn
