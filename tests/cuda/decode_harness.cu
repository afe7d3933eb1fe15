// Standalone GPU check of the CUDA-core decode, merge and append kernels (no JAX, no
// planner): builds small random paged caches and plan buffers by hand, runs
// LaunchMergeSetup + LaunchDecode (which merges its split partials), and compares with a float64 CPU loop over the same
// bf16/f16 inputs. Also checks LaunchAppend bit-exactly and, unless --no-bench, times a
// few large decode shapes against a device-to-device copy.
//
// Build and run (from the repository root, on a machine with a GPU):
//   nvcc -O2 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icuda/include -Icuda/kernels \
//     tests/cuda/decode_harness.cu cuda/kernels/decode.cu cuda/kernels/merge_setup.cu \
//     cuda/kernels/append.cu -o /tmp/h && /tmp/h [--no-bench] [--quick]
// Exit status 0 only if every check passed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "jax_pagedattn/params.h"
#include "jax_pagedattn/plan_layout.h"
#include "launchers.h"

using namespace jax_pagedattn;

#define CHECK_CUDA(x)                                                                   \
  do {                                                                                  \
    cudaError_t e_ = (x);                                                               \
    if (e_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d: %s -> %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                                     \
    }                                                                                   \
  } while (0)

// ---------------------------------------------------------------- 16-bit host values
static float Bf16ToFloat(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
static float HalfToFloat(uint16_t h) {
  __half_raw r;
  r.x = h;
  return __half2float(__half(r));
}
static uint16_t FloatToHalf(float f) {
  __half_raw r = __half_raw(__float2half_rn(f));
  return r.x;
}
static float ToFloat(DType t, uint16_t h) { return t == DType::kBF16 ? Bf16ToFloat(h) : HalfToFloat(h); }
static uint16_t FromFloat(DType t, float f) { return t == DType::kBF16 ? FloatToBf16(f) : FloatToHalf(f); }

// ---------------------------------------------------------------- configuration
struct Request {
  int qo_len;
  int kv_len;
};

struct Config {
  std::string name;
  DType dtype = DType::kBF16;
  int head_dim = 128;
  int num_qo_heads = 8;
  int num_kv_heads = 2;
  int page_size = 16;
  KvLayout layout = KvLayout::kNHD;
  bool combined = true;
  bool causal = true;
  PosEncoding pos = PosEncoding::kNone;
  int tile_rows = 0;  // 0: group size
  int chunk = 1 << 30;  // keys per split (work item); >= kv_len: no split
  std::vector<Request> requests;
  int bad_page_request = -1;  // this request gets one out-of-range page id
  float q_amp = 1.0f;
};

struct HostPlan {
  PlanLayout layout;
  std::vector<int32_t> buf;
  int num_tokens = 0;
  int num_partial_rows = 0;
  int q_rows = 0;
};

// The plan a simple planner would write: per request, items of tile_rows packed rows x
// key chunks of `chunk` keys; split requests get one partial row per chunk and token.
static HostPlan BuildPlan(const Config& c, const std::vector<int>& kv_indptr,
                          const std::vector<int>& kv_indices, int page_cap_extra) {
  const int G = c.num_qo_heads / c.num_kv_heads;
  const int tile_rows = c.tile_rows > 0 ? c.tile_rows : G;
  const int B = int(c.requests.size());
  std::vector<std::array<int, 8>> items;
  std::vector<int> qo_indptr(B + 1, 0);
  for (int b = 0; b < B; ++b) qo_indptr[b + 1] = qo_indptr[b] + c.requests[b].qo_len;
  const int T = qo_indptr[B];
  std::vector<int> merge_count(T, 0);
  for (int b = 0; b < B; ++b) {
    const Request r = c.requests[b];
    const int nchunks = r.kv_len == 0 ? 1 : (r.kv_len + c.chunk - 1) / c.chunk;
    const int rows = r.qo_len * G;
    std::vector<std::pair<int, int>> row_tiles;
    if (tile_rows >= G) {
      const int per = (tile_rows / G) * G;
      for (int r0 = 0; r0 < rows; r0 += per) row_tiles.push_back({r0, std::min(rows, r0 + per)});
    } else {
      for (int t = 0; t < r.qo_len; ++t)
        for (int h0 = 0; h0 < G; h0 += tile_rows)
          row_tiles.push_back({t * G + h0, t * G + std::min(G, h0 + tile_rows)});
    }
    for (auto rt : row_tiles) {
      for (int ch = 0; ch < nchunks; ++ch) {
        const int kb = std::min(r.kv_len, ch * c.chunk), ke = std::min(r.kv_len, (ch + 1) * c.chunk);
        items.push_back({b, rt.first, rt.second, kb, ke, nchunks > 1 ? ch : -1, r.qo_len, r.kv_len});
      }
    }
    if (nchunks > 1)
      for (int t = 0; t < r.qo_len; ++t) merge_count[qo_indptr[b] + t] = nchunks;
  }
  HostPlan hp;
  hp.num_tokens = T;
  hp.q_rows = T + 2;  // two padding rows that the merge must zero
  const int work_cap = int(items.size()) + 3;  // three padding items
  // One bin per item (the grid of one CTA per item).
  hp.layout = PlanLayout{B + 1, hp.q_rows, int(kv_indices.size()) + page_cap_extra, work_cap, work_cap};
  hp.buf.assign(size_t(hp.layout.size()), 0);
  int32_t* base = hp.buf.data();
  for (int i = 0; i <= work_cap; ++i) base[hp.layout.bin_indptr() + i] = i;
  for (int w = 0; w < work_cap; ++w) {
    int32_t* it = base + hp.layout.work() + int64_t(w) * kWorkFields;
    if (w < int(items.size())) {
      for (int f = 0; f < 8; ++f) it[f] = items[w][f];
    } else {
      it[0] = -1;
    }
  }
  int32_t* meta = base + hp.layout.meta();
  int32_t* qo = base + hp.layout.qo_indptr();
  int32_t* kvp = base + hp.layout.kv_indptr();
  int32_t* mi = base + hp.layout.merge_indptr();
  int32_t* ki = base + hp.layout.kv_indices();
  for (int b = 0; b <= hp.layout.batch_cap; ++b) {
    qo[b] = qo_indptr[std::min(b, B)];
    kvp[b] = kv_indptr[std::min(b, B)];
  }
  int acc = 0;
  for (int t = 0; t <= hp.layout.token_cap; ++t) {
    mi[t] = acc;
    if (t < T) acc += merge_count[t];
  }
  hp.num_partial_rows = acc;
  for (size_t i = 0; i < kv_indices.size(); ++i) ki[i] = kv_indices[i];
  meta[kMetaNumRequests] = B;
  meta[kMetaNumTokens] = T;
  meta[kMetaNumWork] = int(items.size());
  meta[kMetaNumPartialRows] = acc;
  return hp;
}

// ---------------------------------------------------------------- reference
static double RopeFreqRef(int i, int D, double scale, double theta) {
  return (1.0 / scale) * std::pow(theta, -2.0 * i / D);
}

// Rotated (or plain) vector of D elements at position pos.
static void RopeRef(std::vector<double>& x, double pos, int D, double scale, double theta) {
  const int h = D / 2;
  std::vector<double> y = x;
  for (int i = 0; i < h; ++i) {
    const double a = pos * (double)(float)RopeFreqRef(i, D, scale, theta);
    const double cs = std::cos(a), sn = std::sin(a);
    y[i] = x[i] * cs - x[i + h] * sn;
    y[i + h] = x[i + h] * cs + x[i] * sn;
  }
  x = y;
}

struct Result {
  double max_out_err = 0, max_lse_err = 0;
  long bad = 0;  // NaN / unwritten / -inf mismatches
};

static bool RunCase(const Config& c, std::mt19937& rng, bool verbose_fail) {
  const int G = c.num_qo_heads / c.num_kv_heads;
  const int D = c.head_dim, Hq = c.num_qo_heads, Hk = c.num_kv_heads, S = c.page_size;
  const int B = int(c.requests.size());
  // Pages: a random permutation of all pages, plus spares that no request uses.
  std::vector<int> kv_indptr(B + 1, 0);
  for (int b = 0; b < B; ++b)
    kv_indptr[b + 1] = kv_indptr[b] + (c.requests[b].kv_len + S - 1) / S;
  const int used = kv_indptr[B];
  const int P = used + 5;
  std::vector<int> perm(P);
  for (int i = 0; i < P; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int> kv_indices(perm.begin(), perm.begin() + used);
  if (c.bad_page_request >= 0) {
    const int b = c.bad_page_request;
    const int n = kv_indptr[b + 1] - kv_indptr[b];
    if (n > 1) kv_indices[kv_indptr[b] + n / 2] = P + 7;  // out of range: keys masked
    if (n > 2) kv_indices[kv_indptr[b]] = -3;
  }
  HostPlan hp = BuildPlan(c, kv_indptr, kv_indices, 2);

  // Cache and q.
  const int64_t half = int64_t(S) * Hk * D;
  const int64_t cache_elems = int64_t(P) * 2 * half;  // combined, or k then v
  std::vector<uint16_t> cache(cache_elems);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  for (auto& x : cache) x = FromFloat(c.dtype, uni(rng));
  const int Tq = hp.q_rows;
  std::vector<uint16_t> q(size_t(Tq) * Hq * D);
  for (auto& x : q) x = FromFloat(c.dtype, c.q_amp * uni(rng));

  uint16_t* d_cache;
  CHECK_CUDA(cudaMalloc(&d_cache, cache_elems * 2));
  CHECK_CUDA(cudaMemcpy(d_cache, cache.data(), cache_elems * 2, cudaMemcpyHostToDevice));
  const void* hk = cache.data();
  const void* hv = c.combined ? nullptr : cache.data() + P * half;
  const void* dk = d_cache;
  const void* dv = c.combined ? nullptr : d_cache + P * half;
  PagedKv hkv = MakePagedKv(hk, hv, c.combined, c.layout, P, S, Hk, D, 2);
  PagedKv dkv = MakePagedKv(dk, dv, c.combined, c.layout, P, S, Hk, D, 2);

  uint16_t* d_q;
  uint16_t* d_out;
  float* d_lse;
  float* d_ws;
  int32_t* d_plan;
  const int partial_cap = hp.num_partial_rows + 1;
  const size_t ws_bytes = size_t(WorkspaceBytes(Capacities{0, Tq, 0, 0, partial_cap, 0}, Hq, D, Hk));
  CHECK_CUDA(cudaMalloc(&d_q, q.size() * 2));
  CHECK_CUDA(cudaMalloc(&d_out, q.size() * 2));
  CHECK_CUDA(cudaMalloc(&d_lse, size_t(Tq) * Hq * 4));
  CHECK_CUDA(cudaMalloc(&d_ws, ws_bytes));
  CHECK_CUDA(cudaMalloc(&d_plan, hp.buf.size() * 4));
  CHECK_CUDA(cudaMemcpy(d_q, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_plan, hp.buf.data(), hp.buf.size() * 4, cudaMemcpyHostToDevice));
  // Poison: NaN everywhere, so any element left unwritten fails.
  CHECK_CUDA(cudaMemset(d_out, 0xff, q.size() * 2));
  CHECK_CUDA(cudaMemset(d_lse, 0xff, size_t(Tq) * Hq * 4));
  CHECK_CUDA(cudaMemset(d_ws, 0xff, ws_bytes));

  AttentionParams p{};
  p.dependent_launch = true;  // as the library launches by default (switches.py)
  p.dtype = c.dtype;
  p.kv_dtype = p.dtype;
  p.q = d_q;
  p.out = d_out;
  p.lse = d_lse;
  p.q_rows = Tq;
  p.num_qo_heads = Hq;
  p.num_kv_heads = Hk;
  p.head_dim = D;
  p.group_size = G;
  p.kv = dkv;
  p.layout = hp.layout;
  p.work = d_plan + hp.layout.work();
  p.meta = d_plan + hp.layout.meta();
  p.bin_indptr = d_plan + hp.layout.bin_indptr();
  p.qo_indptr = d_plan + hp.layout.qo_indptr();
  p.kv_indptr = d_plan + hp.layout.kv_indptr();
  p.kv_last_page_len = d_plan + hp.layout.kv_last_page_len();
  p.merge_indptr = d_plan + hp.layout.merge_indptr();
  p.kv_indices = d_plan + hp.layout.kv_indices();
  p.partial_o = d_ws;
  p.partial_lse = d_ws + int64_t(partial_cap) * Hq * D;
  p.merge_counters = reinterpret_cast<int32_t*>(p.partial_lse + int64_t(partial_cap) * Hq);
  p.caps = Capacities{p.layout.batch_cap, p.layout.token_cap, p.layout.page_cap,
                      p.layout.work_cap, partial_cap, p.layout.bin_cap};
  p.tile_rows = c.tile_rows > 0 ? c.tile_rows : G;
  p.causal = c.causal;
  p.pos_encoding = c.pos;
  p.sm_scale = 1.0f / std::sqrt(float(D));
  p.rope_scale = 1.0f;
  p.rope_theta = 1e4f;

  CHECK_CUDA(LaunchMergeSetup(p, 0));
  CHECK_CUDA(LaunchDecode(p, 0));
  CHECK_CUDA(cudaDeviceSynchronize());

  std::vector<uint16_t> out(q.size());
  std::vector<float> lse(size_t(Tq) * Hq);
  CHECK_CUDA(cudaMemcpy(out.data(), d_out, out.size() * 2, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(lse.data(), d_lse, lse.size() * 4, cudaMemcpyDeviceToHost));

  // Reference.
  Result res;
  const double scale = p.sm_scale;
  int first_bad_t = -1, first_bad_h = -1;
  for (int b = 0; b < B; ++b) {
    const Request r = c.requests[b];
    // Keys of the request (rotated if RoPE), in float64; empty vector = masked.
    std::vector<std::vector<double>> K(r.kv_len), V(r.kv_len);
    for (int kh = 0; kh < Hk; ++kh) {
      for (int j = 0; j < r.kv_len; ++j) {
        K[j].clear();
        V[j].clear();
        const int page = kv_indices[kv_indptr[b] + j / S];
        if (page < 0 || page >= P) continue;
        const int64_t off = hkv.offset(page, j % S, kh);
        const uint16_t* kp = static_cast<const uint16_t*>(hkv.k) + off;
        const uint16_t* vp = static_cast<const uint16_t*>(hkv.v) + off;
        K[j].resize(D);
        V[j].resize(D);
        for (int d = 0; d < D; ++d) {
          K[j][d] = ToFloat(c.dtype, kp[d]);
          V[j][d] = ToFloat(c.dtype, vp[d]);
        }
        if (c.pos == PosEncoding::kRopeLlama) RopeRef(K[j], j, D, 1.0, 1e4);
      }
      for (int i = 0; i < r.qo_len; ++i) {
        int token = 0;
        for (int bb = 0; bb < b; ++bb) token += c.requests[bb].qo_len;
        token += i;
        const int qpos = r.kv_len - r.qo_len + i;
        for (int g = 0; g < G; ++g) {
          const int h = kh * G + g;
          std::vector<double> qv(D);
          for (int d = 0; d < D; ++d) qv[d] = ToFloat(c.dtype, q[(size_t(token) * Hq + h) * D + d]);
          if (c.pos == PosEncoding::kRopeLlama) RopeRef(qv, qpos, D, 1.0, 1e4);
          const double slope = c.pos == PosEncoding::kAlibi ? AlibiSlope(h, Hq) : 0.0;
          std::vector<double> z(r.kv_len, -INFINITY);
          double mx = -INFINITY;
          for (int j = 0; j < r.kv_len; ++j) {
            if (K[j].empty()) continue;
            if (c.causal && j > qpos) continue;
            double s = 0;
            for (int d = 0; d < D; ++d) s += qv[d] * K[j][d];
            z[j] = s * scale + slope * (j - qpos);
            mx = std::max(mx, z[j]);
          }
          std::vector<double> o(D, 0.0);
          double sum = 0;
          if (mx != -INFINITY) {
            for (int j = 0; j < r.kv_len; ++j) {
              if (z[j] == -INFINITY) continue;
              const double w = std::exp(z[j] - mx);
              sum += w;
              for (int d = 0; d < D; ++d) o[d] += w * V[j][d];
            }
            for (int d = 0; d < D; ++d) o[d] /= sum;
          }
          const double ref_lse = mx == -INFINITY ? -INFINITY : (mx + std::log(sum)) / std::log(2.0);
          const float got_lse = lse[size_t(token) * Hq + h];
          bool bad = false;
          if (std::isinf(ref_lse)) {
            if (!(std::isinf(got_lse) && got_lse < 0)) bad = true;
          } else if (!std::isfinite(got_lse)) {
            bad = true;
          } else {
            res.max_lse_err = std::max(res.max_lse_err, std::fabs(got_lse - ref_lse));
          }
          for (int d = 0; d < D; ++d) {
            const float got = ToFloat(c.dtype, out[(size_t(token) * Hq + h) * D + d]);
            if (!std::isfinite(got)) {
              bad = true;
              continue;
            }
            res.max_out_err = std::max(res.max_out_err, std::fabs(got - o[d]));
          }
          if (bad) {
            ++res.bad;
            if (first_bad_t < 0) {
              first_bad_t = token;
              first_bad_h = h;
            }
          }
        }
      }
    }
  }
  // Padding rows: zeros and -inf.
  for (int t = hp.num_tokens; t < Tq; ++t)
    for (int h = 0; h < Hq; ++h) {
      const float got_lse = lse[size_t(t) * Hq + h];
      bool bad = !(std::isinf(got_lse) && got_lse < 0);
      for (int d = 0; d < D; ++d)
        if (out[(size_t(t) * Hq + h) * D + d] != 0) bad = true;
      if (bad) ++res.bad;
    }

  const bool ok = res.bad == 0 && res.max_out_err < 2e-2 && res.max_lse_err < 2e-2;
  std::printf("%-44s out_err %.3e  lse_err %.3e  bad %ld  %s\n", c.name.c_str(), res.max_out_err,
              res.max_lse_err, res.bad, ok ? "PASS" : "FAIL");
  if (!ok && verbose_fail && first_bad_t >= 0)
    std::printf("   first bad row: token %d head %d lse %f\n", first_bad_t, first_bad_h,
                lse[size_t(first_bad_t) * Hq + first_bad_h]);
  cudaFree(d_cache);
  cudaFree(d_q);
  cudaFree(d_out);
  cudaFree(d_lse);
  cudaFree(d_ws);
  cudaFree(d_plan);
  return ok;
}

// ---------------------------------------------------------------- append
static bool RunAppendCase(std::mt19937& rng, KvLayout layout, bool combined) {
  const int P = 9, S = 4, H = 2, D = 64, B = 3;
  const int64_t half = int64_t(S) * H * D;
  std::vector<uint16_t> cache(size_t(P) * 2 * half);
  for (size_t i = 0; i < cache.size(); ++i) cache[i] = uint16_t(rng());
  std::vector<int> kv_indptr = {0, 2, 2, 5};
  std::vector<int> kv_indices = {4, 1, 7, 0, 8};
  // Rows: (b, pos); invalid ones are skipped.
  std::vector<std::pair<int, int>> rows = {{0, 0}, {0, 7}, {2, 11}, {2, 5}, {1, 0} /*no pages*/,
                                           {0, 8} /*past pages*/, {3, 0} /*b >= batch*/,
                                           {-1, 0}, {2, -1}, {2, 0}};
  const int N = int(rows.size());
  std::vector<uint16_t> nk(size_t(N) * H * D), nv(size_t(N) * H * D);
  for (auto& x : nk) x = uint16_t(rng());
  for (auto& x : nv) x = uint16_t(rng());
  std::vector<int> bi(N), pos(N);
  for (int i = 0; i < N; ++i) {
    bi[i] = rows[i].first;
    pos[i] = rows[i].second;
  }
  std::vector<uint16_t> expect = cache;
  PagedKv hkv = MakePagedKv(expect.data(), combined ? nullptr : expect.data() + P * half, combined,
                            layout, P, S, H, D, 2);
  for (int i = 0; i < N; ++i) {
    const int b = bi[i], ps = pos[i];
    if (b < 0 || b >= B || ps < 0) continue;
    const int slot = kv_indptr[b] + ps / S;
    if (slot >= kv_indptr[b + 1]) continue;
    const int page = kv_indices[slot];
    for (int h = 0; h < H; ++h)
      for (int d = 0; d < D; ++d) {
        const int64_t off = hkv.offset(page, ps % S, h) + d;
        const_cast<uint16_t*>(static_cast<const uint16_t*>(hkv.k))[off] = nk[(size_t(i) * H + h) * D + d];
        const_cast<uint16_t*>(static_cast<const uint16_t*>(hkv.v))[off] = nv[(size_t(i) * H + h) * D + d];
      }
  }
  uint16_t *d_cache, *d_nk, *d_nv;
  int32_t *d_bi, *d_pos, *d_ki, *d_kp;
  CHECK_CUDA(cudaMalloc(&d_cache, cache.size() * 2));
  CHECK_CUDA(cudaMalloc(&d_nk, nk.size() * 2));
  CHECK_CUDA(cudaMalloc(&d_nv, nv.size() * 2));
  CHECK_CUDA(cudaMalloc(&d_bi, N * 4));
  CHECK_CUDA(cudaMalloc(&d_pos, N * 4));
  CHECK_CUDA(cudaMalloc(&d_ki, kv_indices.size() * 4));
  CHECK_CUDA(cudaMalloc(&d_kp, kv_indptr.size() * 4));
  CHECK_CUDA(cudaMemcpy(d_cache, cache.data(), cache.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_nk, nk.data(), nk.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_nv, nv.data(), nv.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_bi, bi.data(), N * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_pos, pos.data(), N * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_ki, kv_indices.data(), kv_indices.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_kp, kv_indptr.data(), kv_indptr.size() * 4, cudaMemcpyHostToDevice));
  AppendParams ap{};
  ap.dtype = DType::kBF16;
  ap.new_k = d_nk;
  ap.new_v = d_nv;
  ap.batch_indices = d_bi;
  ap.positions = d_pos;
  ap.kv_indices = d_ki;
  ap.kv_indptr = d_kp;
  ap.num_rows = N;
  ap.num_indices = int(kv_indices.size());
  ap.batch = B;
  ap.kv = MakePagedKv(d_cache, combined ? nullptr : d_cache + P * half, combined, layout, P, S, H, D, 2);
  ap.k = const_cast<void*>(ap.kv.k);
  ap.v = const_cast<void*>(ap.kv.v);
  CHECK_CUDA(LaunchAppend(ap, 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<uint16_t> got(cache.size());
  CHECK_CUDA(cudaMemcpy(got.data(), d_cache, got.size() * 2, cudaMemcpyDeviceToHost));
  long diff = 0;
  for (size_t i = 0; i < got.size(); ++i) diff += got[i] != expect[i];
  const bool ok = diff == 0;
  std::printf("append %s %-8s                              mismatches %ld  %s\n",
              layout == KvLayout::kNHD ? "NHD" : "HND", combined ? "5-D" : "pair", diff,
              ok ? "PASS" : "FAIL");
  cudaFree(d_cache);
  cudaFree(d_nk);
  cudaFree(d_nv);
  cudaFree(d_bi);
  cudaFree(d_pos);
  cudaFree(d_ki);
  cudaFree(d_kp);
  return ok;
}

// ---------------------------------------------------------------- timing
static void Bench(int batch, int kv_len, int chunk, KvLayout layout, std::mt19937& rng,
                  int Hq = 32, int Hk = 8, int D = 128, PosEncoding pos = PosEncoding::kNone) {
  const int S = 16, G = Hq / Hk;
  const int pages_per = (kv_len + S - 1) / S;
  const int P = batch * pages_per;
  std::vector<int> kv_indptr(batch + 1), kv_indices(P);
  for (int b = 0; b <= batch; ++b) kv_indptr[b] = b * pages_per;
  for (int i = 0; i < P; ++i) kv_indices[i] = i;
  std::shuffle(kv_indices.begin(), kv_indices.end(), rng);
  Config c;
  c.head_dim = D;
  c.num_qo_heads = Hq;
  c.num_kv_heads = Hk;
  c.page_size = S;
  c.layout = layout;
  c.chunk = chunk;
  for (int b = 0; b < batch; ++b) c.requests.push_back({1, kv_len});
  HostPlan hp = BuildPlan(c, kv_indptr, kv_indices, 0);
  const int64_t cache_elems = int64_t(P) * 2 * S * Hk * D;
  uint16_t* d_cache;
  CHECK_CUDA(cudaMalloc(&d_cache, cache_elems * 2));
  {
    // Random-ish finite bf16 data, made on the device-sized host buffer in slices.
    std::vector<uint16_t> slice(1 << 24);
    std::uniform_real_distribution<float> uni(-1.f, 1.f);
    for (auto& x : slice) x = FloatToBf16(uni(rng));
    for (int64_t o = 0; o < cache_elems; o += int64_t(slice.size())) {
      const int64_t n = std::min<int64_t>(slice.size(), cache_elems - o);
      CHECK_CUDA(cudaMemcpy(d_cache + o, slice.data(), n * 2, cudaMemcpyHostToDevice));
    }
  }
  const int Tq = hp.q_rows;
  uint16_t *d_q, *d_out;
  float *d_lse, *d_ws;
  int32_t* d_plan;
  const int partial_cap = hp.num_partial_rows + 1;
  CHECK_CUDA(cudaMalloc(&d_q, size_t(Tq) * Hq * D * 2));
  CHECK_CUDA(cudaMemset(d_q, 0x3c, size_t(Tq) * Hq * D * 2));
  CHECK_CUDA(cudaMalloc(&d_out, size_t(Tq) * Hq * D * 2));
  CHECK_CUDA(cudaMalloc(&d_lse, size_t(Tq) * Hq * 4));
  CHECK_CUDA(cudaMalloc(&d_ws, size_t(WorkspaceBytes(Capacities{0, Tq, 0, 0, partial_cap, 0}, Hq, D, Hk))));
  CHECK_CUDA(cudaMalloc(&d_plan, hp.buf.size() * 4));
  CHECK_CUDA(cudaMemcpy(d_plan, hp.buf.data(), hp.buf.size() * 4, cudaMemcpyHostToDevice));
  AttentionParams p{};
  p.dependent_launch = true;  // as the library launches by default (switches.py)
  p.dtype = DType::kBF16;
  p.kv_dtype = p.dtype;
  p.q = d_q;
  p.out = d_out;
  p.lse = d_lse;
  p.q_rows = Tq;
  p.num_qo_heads = Hq;
  p.num_kv_heads = Hk;
  p.head_dim = D;
  p.group_size = G;
  p.kv = MakePagedKv(d_cache, nullptr, true, layout, P, S, Hk, D, 2);
  p.layout = hp.layout;
  p.work = d_plan + hp.layout.work();
  p.meta = d_plan + hp.layout.meta();
  p.bin_indptr = d_plan + hp.layout.bin_indptr();
  p.qo_indptr = d_plan + hp.layout.qo_indptr();
  p.kv_indptr = d_plan + hp.layout.kv_indptr();
  p.kv_last_page_len = d_plan + hp.layout.kv_last_page_len();
  p.merge_indptr = d_plan + hp.layout.merge_indptr();
  p.kv_indices = d_plan + hp.layout.kv_indices();
  p.partial_o = d_ws;
  p.partial_lse = d_ws + int64_t(partial_cap) * Hq * D;
  p.merge_counters = reinterpret_cast<int32_t*>(p.partial_lse + int64_t(partial_cap) * Hq);
  p.caps = Capacities{p.layout.batch_cap, p.layout.token_cap, p.layout.page_cap,
                      p.layout.work_cap, partial_cap, p.layout.bin_cap};
  p.tile_rows = G;
  p.causal = true;
  p.pos_encoding = pos;
  p.sm_scale = 1.0f / std::sqrt(float(D));
  p.rope_scale = 1.f;
  p.rope_theta = 1e4f;
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) {
    CHECK_CUDA(LaunchMergeSetup(p, 0));
    CHECK_CUDA(LaunchDecode(p, 0));
  }
  std::vector<float> ts;
  for (int i = 0; i < 20; ++i) {
    CHECK_CUDA(cudaEventRecord(e0));
    CHECK_CUDA(LaunchMergeSetup(p, 0));
    CHECK_CUDA(LaunchDecode(p, 0));
    CHECK_CUDA(cudaEventRecord(e1));
    CHECK_CUDA(cudaEventSynchronize(e1));
    float ms;
    CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    ts.push_back(ms);
  }
  std::sort(ts.begin(), ts.end());
  const double bytes = double(batch) * kv_len * Hk * D * 2 * 2;
  const double ms = ts[ts.size() / 2];
  const char* pos_name = pos == PosEncoding::kRopeLlama ? "rope" : pos == PosEncoding::kAlibi ? "alibi" : "none";
  std::printf("bench %s %4d x %6d chunk %6d items %5d H%d/%d D%d %s: %8.1f us  %7.1f GB/s\n",
              layout == KvLayout::kNHD ? "NHD" : "HND", batch, kv_len, chunk,
              hp.layout.work_cap - 3, Hq, Hk, D, pos_name, ms * 1e3, bytes / (ms * 1e-3) / 1e9);
  cudaFree(d_cache);
  cudaFree(d_q);
  cudaFree(d_out);
  cudaFree(d_lse);
  cudaFree(d_ws);
  cudaFree(d_plan);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
}

static void BenchCopy() {
  const size_t n = size_t(1) << 30;
  void *a, *b;
  CHECK_CUDA(cudaMalloc(&a, n));
  CHECK_CUDA(cudaMalloc(&b, n));
  CHECK_CUDA(cudaMemset(a, 1, n));
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) CHECK_CUDA(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice));
  std::vector<float> ts;
  for (int i = 0; i < 10; ++i) {
    CHECK_CUDA(cudaEventRecord(e0));
    CHECK_CUDA(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice));
    CHECK_CUDA(cudaEventRecord(e1));
    CHECK_CUDA(cudaEventSynchronize(e1));
    float ms;
    CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    ts.push_back(ms);
  }
  std::sort(ts.begin(), ts.end());
  std::printf("bench copy 1 GiB d2d: %.1f GB/s (read + write)\n", 2.0 * n / (ts[5] * 1e-3) / 1e9);
  cudaFree(a);
  cudaFree(b);
}

int main(int argc, char** argv) {
  bool bench = true, quick = false, bench_only = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--no-bench")) bench = false;
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    if (!std::strcmp(argv[i], "--bench-only")) bench_only = true;
  }
  int dev;
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDevice(&dev));
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  std::mt19937 rng(1234);

  std::vector<Config> cases;
  const std::vector<Request> mixed = {{1, 1}, {1, 17}, {1, 100}, {1, 300}, {1, 0}, {1, 64}};
  auto add = [&](Config c) { cases.push_back(c); };
  {
    Config c;
    c.name = "bf16 D128 ps16 NHD 5D none";
    c.requests = mixed;
    add(c);
    c.name = "bf16 D128 ps16 NHD 5D none split128";
    c.chunk = 128;
    add(c);
    c.name = "bf16 D128 ps16 HND pair none split48 badpage";
    c.layout = KvLayout::kHND;
    c.combined = false;
    c.chunk = 48;
    c.bad_page_request = 3;
    add(c);
    c.name = "bf16 D128 ps1 NHD 5D rope split100";
    c.page_size = 1;
    c.layout = KvLayout::kNHD;
    c.combined = true;
    c.pos = PosEncoding::kRopeLlama;
    c.chunk = 100;
    c.bad_page_request = -1;
    add(c);
    c.name = "bf16 D128 ps1 HND pair alibi split64";
    c.layout = KvLayout::kHND;
    c.combined = false;
    c.pos = PosEncoding::kAlibi;
    c.chunk = 64;
    add(c);
    c.name = "bf16 D128 ps16 NHD rope qo3 causal";
    c.page_size = 16;
    c.layout = KvLayout::kNHD;
    c.pos = PosEncoding::kRopeLlama;
    c.chunk = 1 << 30;
    c.requests = {{3, 40}, {2, 2}, {4, 130}};
    add(c);
    c.name = "bf16 D128 ps16 NHD alibi qo3 tile16 split32";
    c.pos = PosEncoding::kAlibi;
    c.tile_rows = 16;  // 4 tokens per item: 2 passes of 8 rows
    c.chunk = 32;
    add(c);
    c.name = "bf16 D128 ps16 NHD none qo3 noncausal tile2";
    c.pos = PosEncoding::kNone;
    c.causal = false;
    c.tile_rows = 2;  // half the heads of a token per item
    c.chunk = 1 << 30;
    add(c);
  }
  {
    Config c;
    c.name = "f16 D64 ps16 HND 5D alibi H12/3 split64";
    c.dtype = DType::kF16;
    c.head_dim = 64;
    c.num_qo_heads = 12;
    c.num_kv_heads = 3;
    c.layout = KvLayout::kHND;
    c.pos = PosEncoding::kAlibi;
    c.chunk = 64;
    c.requests = mixed;
    add(c);
    c.name = "f16 D256 ps8 NHD pair rope G8 split96";
    c.head_dim = 256;
    c.num_qo_heads = 16;
    c.num_kv_heads = 2;
    c.page_size = 8;
    c.layout = KvLayout::kNHD;
    c.combined = false;
    c.pos = PosEncoding::kRopeLlama;
    c.chunk = 96;
    add(c);
    c.name = "bf16 D256 ps16 HND 5D none G1";
    c.dtype = DType::kBF16;
    c.num_qo_heads = 4;
    c.num_kv_heads = 4;
    c.page_size = 16;
    c.layout = KvLayout::kHND;
    c.combined = true;
    c.pos = PosEncoding::kNone;
    c.chunk = 1 << 30;
    add(c);
    c.name = "bf16 D64 ps3 NHD 5D rope G2 split50 q4x";
    c.head_dim = 64;
    c.num_qo_heads = 4;
    c.num_kv_heads = 2;
    c.page_size = 3;
    c.layout = KvLayout::kNHD;
    c.pos = PosEncoding::kRopeLlama;
    c.chunk = 50;
    c.q_amp = 4.f;
    c.requests = {{1, 1000}, {1, 5}, {2, 77}};
    add(c);
    c.name = "bf16 D128 ps16 NHD none long 8000 split-none";
    c.head_dim = 128;
    c.num_qo_heads = 8;
    c.num_kv_heads = 2;
    c.page_size = 16;
    c.pos = PosEncoding::kNone;
    c.chunk = 1 << 30;
    c.q_amp = 1.f;
    c.requests = {{1, 8000}, {1, 4097}};
    add(c);
  }
  if (quick) cases.resize(4);
  if (bench_only) cases.clear();

  int failures = 0;
  for (const auto& c : cases) failures += !RunCase(c, rng, true);
  if (!bench_only)
    for (KvLayout l : {KvLayout::kNHD, KvLayout::kHND})
      for (bool comb : {true, false}) failures += !RunAppendCase(rng, l, comb);

  if (bench && !quick) {
    const KvLayout N = KvLayout::kNHD;
    BenchCopy();
    Bench(64, 4096, 4096, N, rng);
    Bench(64, 4096, 1024, N, rng);
    Bench(64, 4096, 1024, KvLayout::kHND, rng);
    Bench(16, 4096, 512, N, rng);
    Bench(16, 4096, 1366, N, rng);   // 3 splits: 384 CTAs, about one per resident slot
    Bench(8, 32768, 5462, N, rng);   // 6 splits: 384 CTAs
    Bench(128, 2048, 1024, N, rng);
    Bench(8, 32768, 2048, N, rng);
    Bench(8, 32768, 1024, N, rng);
    Bench(256, 1024, 1024, N, rng);
    Bench(64, 4096, 1024, N, rng, 64, 8, 128);  // G = 8: R = 8
    Bench(64, 4096, 1024, N, rng, 8, 8, 128);   // G = 1: R = 1
    Bench(64, 4096, 1024, N, rng, 32, 8, 64);
    Bench(64, 2048, 1024, N, rng, 32, 8, 256);
    Bench(64, 4096, 1024, N, rng, 32, 8, 128, PosEncoding::kRopeLlama);
    Bench(64, 4096, 1024, N, rng, 32, 8, 128, PosEncoding::kAlibi);
  }
  const int total = int(cases.size()) + (bench_only ? 0 : 4);
  std::printf("%d passed, %d failed\n", total - failures, failures);
  return failures == 0 ? 0 : 1;
}
