// The inner loops of the CPU attention on one block of keys: scores Q K^T and the
// weighted sum P V, for up to kRowGroup query rows at once.
//
// Key and value rows are read through per-key pointers (they live in scattered pages)
// in their storage type T and widened in registers (cpu_simd.h), so a cache element is
// loaded once per row group and feeds R multiply-adds. Rows are dp floats (dp a
// multiple of 8; K/V rows hold at least dp elements) and the query/accumulator rows are
// in Loader<T>'s element order. The R x 8 partial sums live in 2R vector registers
// (8 for R = 4, within SSE2's 16), which gives the adder independent chains.
#pragma once

#include "cpu_simd.h"

namespace jax_pagedattn {
namespace cpu {

// Query rows handled together by the kernels below.
constexpr int kRowGroup = 4;

// s[r * s_stride + j] = dot(q row r, k[j]) for r < R, j < nk.
template <int R, typename T>
inline void BlockScores(const float* q, const T* const* k, int nk, int dp, float* s,
                        int s_stride) {
  for (int j = 0; j < nk; ++j) {
    const T* kr = k[j];
    F4 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = Splat(0.0f);
    for (int d = 0; d < dp; d += 8) {
      F4 k0, k1;
      Loader<T>::Load8(kr + d, k0, k1);
      for (int r = 0; r < R; ++r) {
        acc[r][0] += LoadF4(q + r * dp + d) * k0;
        acc[r][1] += LoadF4(q + r * dp + d + 4) * k1;
      }
    }
    for (int r = 0; r < R; ++r) s[r * s_stride + j] = HorizontalSum(acc[r][0] + acc[r][1]);
  }
}

// acc row r += sum_j p[r * p_stride + j] * v[j], for r < R, j < nk. Walks the head dim
// in slices of 8 so the R slices of acc stay in registers across all keys.
template <int R, typename T>
inline void BlockAccumulate(const float* p, int p_stride, const T* const* v, int nk, int dp,
                            float* acc) {
  for (int d = 0; d < dp; d += 8) {
    F4 a[R][2];
    for (int r = 0; r < R; ++r) {
      a[r][0] = LoadF4(acc + r * dp + d);
      a[r][1] = LoadF4(acc + r * dp + d + 4);
    }
    for (int j = 0; j < nk; ++j) {
      F4 v0, v1;
      Loader<T>::Load8(v[j] + d, v0, v1);
      for (int r = 0; r < R; ++r) {
        const F4 w = Splat(p[r * p_stride + j]);
        a[r][0] += w * v0;
        a[r][1] += w * v1;
      }
    }
    for (int r = 0; r < R; ++r) {
      StoreF4(acc + r * dp + d, a[r][0]);
      StoreF4(acc + r * dp + d + 4, a[r][1]);
    }
  }
}

// Dispatch on the row count of a group (1..kRowGroup).
template <typename T>
inline void BlockScoresN(int rows, const float* q, const T* const* k, int nk, int dp, float* s,
                         int s_stride) {
  switch (rows) {
    case 4: BlockScores<4>(q, k, nk, dp, s, s_stride); break;
    case 3: BlockScores<3>(q, k, nk, dp, s, s_stride); break;
    case 2: BlockScores<2>(q, k, nk, dp, s, s_stride); break;
    default: BlockScores<1>(q, k, nk, dp, s, s_stride); break;
  }
}

template <typename T>
inline void BlockAccumulateN(int rows, const float* p, int p_stride, const T* const* v, int nk,
                             int dp, float* acc) {
  switch (rows) {
    case 4: BlockAccumulate<4>(p, p_stride, v, nk, dp, acc); break;
    case 3: BlockAccumulate<3>(p, p_stride, v, nk, dp, acc); break;
    case 2: BlockAccumulate<2>(p, p_stride, v, nk, dp, acc); break;
    default: BlockAccumulate<1>(p, p_stride, v, nk, dp, acc); break;
  }
}

// y += a * x over n floats.
inline void Axpy(float* __restrict y, const float* __restrict x, float a, int n) {
  for (int d = 0; d < n; ++d) y[d] += a * x[d];
}

// y *= a over n floats.
inline void Scale(float* __restrict y, float a, int n) {
  for (int d = 0; d < n; ++d) y[d] *= a;
}

}  // namespace cpu
}  // namespace jax_pagedattn
