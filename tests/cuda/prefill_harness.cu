// Standalone check of LaunchPrefill (cuda/kernels/prefill.cu) against a CPU loop; built
// with -DJPA_HARNESS_SM90 (and cuda/kernels/sm90/prefill_sm90.cu, sm_90a) the same cases
// and bench run LaunchPrefillSm90 instead, on the settings that kernel covers, and the
// bench times the sm80 kernel beside it (scripts/sm90_prefill_session.sh builds that).
//
// Each case builds a random paged cache and a plan buffer by hand (PlanLayout
// offsets, work items as the planner would cut them: whole tokens per item, causal
// items ending at their last row's limit, some requests split in two key chunks that
// write workspace partials that the kernel also merges into out), runs the setup pass
// and the kernel once, and compares out/lse/partials with a double-precision reference that follows shared/DESIGN.md §3 (RoPE rotated in fp32
// and rounded to the input type, ALiBi, bottom-right causal mask, bad page ids masked).
// Outputs are poisoned first: every covered entry must be written, every other left.
//
//   prefill_harness [check|bench|all|garbage|quick] [seed]
// check: correctness cases (run it under compute-sanitizer too); bench: a few timings;
// garbage: random plans (indices, items, bins, merge offsets), which must neither fault,
// hang, nor write outside out/lse/workspace (guard bands checked); quick: a few of the
// check cases and garbage plans, sized for compute-sanitizer.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "fast_divmod.cuh"
#include "jax_pagedattn/params.h"
#include "jax_pagedattn/plan_layout.h"
#include "launchers.h"
#ifdef JPA_HARNESS_SM90
#include "sm90/prefill_sm90.h"
#endif

using namespace jax_pagedattn;

// An on/off environment variable of the harness: "0" off, unset or empty `dflt`, anything
// else on.
static bool EnvFlag(const char* name, bool dflt) {
  const char* v = std::getenv(name);
  return v == nullptr || *v == '\0' ? dflt : std::strcmp(v, "0") != 0;
}

// The launcher the checks exercise. JPA_SM90_PINGPONG=1 / 0 runs the sm90 checks with /
// without the warpgroup pingpong (default: the library's, Sm90PingpongByDefault);
// JPA_SM90_STAGES=2 / 3 with two / three K/V stages at head_dim 128 (default: the
// launcher's); JPA_SM90_STATIC=1 with one CTA per (bin, kv head) instead of drawn tasks;
// JPA_SM90_VARIANT=v with the kernel variant v (prefill_sm90_config.cuh, kVariant*) where
// it exists (below).
static cudaError_t LaunchUnderTest(const AttentionParams& p, cudaStream_t stream) {
#ifdef JPA_HARNESS_SM90
  static const int pingpong = [] {  // -1: the library's rule for the call's head_dim
    const char* v = std::getenv("JPA_SM90_PINGPONG");
    return v == nullptr || *v == '\0' ? -1 : int(std::strcmp(v, "0") != 0);
  }();
  static const int stages = [] {
    const char* v = std::getenv("JPA_SM90_STAGES");
    return v == nullptr ? PrefillSm90Tuning{}.stages : std::atoi(v);
  }();
  static const bool static_bins = [] {
    const char* v = std::getenv("JPA_SM90_STATIC");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  static const int variant = [] {
    const char* v = std::getenv("JPA_SM90_VARIANT");
    return v == nullptr ? 0 : std::atoi(v);
  }();
  PrefillSm90Tuning t;
  t.pingpong = Sm90Pingpong(pingpong, p.head_dim);
  t.drawn_tasks = !static_bins;
  t.stages = stages;  // other head_dims than 128 run 2 whatever it says (prefill_sm90.cu)
  // The variants exist for bf16 at head_dim 128 with 3 stages only (prefill_sm90.cu,
  // RunSm90); the other kernels run as they are.
  if (p.dtype == DType::kBF16 && p.head_dim == 128 && stages == 3) t.variant = variant;
  return LaunchPrefillSm90(p, stream, t);
#else
  return LaunchPrefill(p, stream);
#endif
}

// Whether RoPE calls get the workspace section of keys rotated once (sm90_rope_keys, as
// the library does by default); JPA_SM90_ROPE_KEYS=0 checks the in-kernel rotation.
static bool HarnessRopeKeys() {
  static const bool on = EnvFlag("JPA_SM90_ROPE_KEYS", true);
  return on;
}

// Workspace bytes of p (its attributes, caps and dtype set), as the FFI sizes them.
static size_t WorkspaceBytesOf(const AttentionParams& p) {
  return size_t(WorkspaceBytes(p.caps, p.num_qo_heads, p.head_dim, p.num_kv_heads,
                               RopeKeysBytes(p, p.dtype)));
}

#define CHECK_CUDA(x)                                                                  \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                                    \
    }                                                                                  \
  } while (0)

// ---- 16-bit storage on the host -------------------------------------------------------
static float ToFloat(uint16_t v, DType t) {
  if (t == DType::kBF16) {
    uint32_t u = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half_raw r;
  r.x = v;
  return __half2float(__half(r));
}
static uint16_t FromFloat(float f, DType t) {
  if (t == DType::kBF16) {
    __nv_bfloat16 b = __float2bfloat16_rn(f);
    __nv_bfloat16_raw r = b;
    return r.x;
  }
  __half h = __float2half_rn(f);
  __half_raw r = h;
  return r.x;
}
static float Round(float f, DType t) { return ToFloat(FromFloat(f, t), t); }

// ---- a test case ----------------------------------------------------------------------
struct Req {
  int qo_len, kv_len;
  bool split;  // key range cut in two chunks writing partials
};

struct Case {
  std::string name;
  DType dtype;
  int head_dim, num_kv_heads, group, page_size, tile_rows;
  KvLayout layout;
  bool combined, causal;
  PosEncoding pos;
  std::vector<Req> reqs;
  bool bad_pages;  // plant page ids outside [0, num_pages)
  int bins = 0;    // > 0: the items in this many bins (CTAs run several items); 0: one per item
};

struct Stats {
  double out_max = 0, out_num = 0, out_den = 0, lse_max = 0;
  double part_max = 0, part_lse_max = 0;
  long unwritten = 0, clobbered = 0, lse_inf_mismatch = 0, nan = 0;
  long rows = 0, partial_rows = 0;
};

static const uint16_t kPoison16 = 0x7fc1;  // NaN in bf16; NaN in f16 too (0x7c00 | payload)

// RoPE as the reference defines it: frequencies in double, rounded to float; angle a
// float product; rotation in fp32; result rounded to the input type.
static void RopeRef(std::vector<float>& x, int D, long pos, float scale, float theta, DType t) {
  const int half = D / 2;
  std::vector<float> y(x);
  for (int d = 0; d < half; ++d) {
    const float f = float(std::pow(double(theta), -2.0 * d / D) / double(scale));
    const float ang = float(pos) * f;
    const float c = float(std::cos(double(ang))), s = float(std::sin(double(ang)));
    y[d] = Round(x[d] * c - x[d + half] * s, t);
    y[d + half] = Round(x[d + half] * c + x[d] * s, t);
  }
  x.swap(y);
}

// p reads the device plan `dp` of layout `l` (with room for `partial_rows` partials).
static void UsePlan(AttentionParams& p, const PlanLayout& l, const int32_t* dp, int partial_rows) {
  p.layout = l;
  PointPlanSections(&p, dp);
  p.caps = Capacities{l.batch_cap, l.token_cap, l.page_cap, l.work_cap, partial_rows, l.bin_cap};
}

static bool RunCase(const Case& cs, std::mt19937& rng, bool verbose) {
#ifdef JPA_HARNESS_SM90
  // Name the case before it runs: a hang (a broken barrier protocol) then shows in the log.
  std::printf("... %s\n", cs.name.c_str());
  std::fflush(stdout);
#endif
  const DType dt = cs.dtype;
  const int D = cs.head_dim, Hkv = cs.num_kv_heads, G = cs.group, Hqo = Hkv * G;
  const int ps = cs.page_size, B = int(cs.reqs.size());
  std::uniform_real_distribution<float> uni(-1.f, 1.f);

  // Requests -> tokens and pages.
  std::vector<int> qo_indptr(B + 1, 0), kv_indptr(B + 1, 0), last_len(B, 0);
  for (int b = 0; b < B; ++b) {
    qo_indptr[b + 1] = qo_indptr[b] + cs.reqs[b].qo_len;
    const int np = (cs.reqs[b].kv_len + ps - 1) / ps;
    kv_indptr[b + 1] = kv_indptr[b] + np;
    last_len[b] = cs.reqs[b].kv_len == 0 ? 0 : cs.reqs[b].kv_len - (np - 1) * ps;
  }
  const int T = qo_indptr[B];
  const int q_rows = T + 3;  // padding rows: the setup pass zero-fills them
  const int used_pages = kv_indptr[B];
  const int num_pages = used_pages + 5;
  std::vector<int> perm(num_pages);
  for (int i = 0; i < num_pages; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int> kv_indices(perm.begin(), perm.begin() + used_pages);
  if (cs.bad_pages) {
    // One too-large and one negative page id, inside requests that have pages.
    for (int b = 0, planted = 0; b < B && planted < 2; ++b) {
      const int np = kv_indptr[b + 1] - kv_indptr[b];
      if (np < 2) continue;
      kv_indices[kv_indptr[b] + np / 2] = planted == 0 ? num_pages + 7 : -3;
      ++planted;
    }
  }

  // Work items, as the planner cuts them.
  struct Item { int b, rb, re, kb, ke, split; };
  std::vector<Item> items;
  std::vector<int> merge_indptr(q_rows + 1, 0);
  std::vector<int> tok_splits(q_rows, 0);
  const int chunk_rows = G <= cs.tile_rows ? (cs.tile_rows / G) * G : cs.tile_rows;
  for (int b = 0; b < B; ++b) {
    const Req& r = cs.reqs[b];
    const int rows = r.qo_len * G;
    for (int rb = 0; rb < rows; rb += chunk_rows) {
      const int re = std::min(rows, rb + chunk_rows);
      int kv_hi = r.kv_len;
      if (cs.causal) kv_hi = std::max(0, std::min(r.kv_len, r.kv_len - r.qo_len + (re - 1) / G + 1));
      if (!r.split) {
        items.push_back({b, rb, re, 0, kv_hi, -1});
      } else {
        const int mid = std::min(kv_hi, (r.kv_len * 11) / 20);
        items.push_back({b, rb, re, 0, mid, 0});
        items.push_back({b, rb, re, mid, kv_hi, 1});
      }
    }
    if (r.split)
      for (int i = 0; i < r.qo_len; ++i) tok_splits[qo_indptr[b] + i] = 2;
  }
  for (int t = 0; t < q_rows; ++t) merge_indptr[t + 1] = merge_indptr[t] + tok_splits[t];
  const int partial_rows = std::max(1, merge_indptr[q_rows]);
  std::shuffle(items.begin(), items.end(), rng);  // the kernel must not rely on order
  const int work_cap = int(items.size()) + 3;      // trailing padding items

  // One bin per item, or cs.bins bins of consecutive items (the padding ones included).
  const int bin_cap = cs.bins > 0 ? cs.bins : work_cap;
  const int per_bin = (work_cap + bin_cap - 1) / bin_cap;
  PlanLayout lay{B + 2, q_rows, used_pages + 4, work_cap, bin_cap};
  std::vector<int32_t> plan(lay.size(), 0);
  for (int i = 0; i <= bin_cap; ++i) plan[lay.bin_indptr() + i] = std::min(i * per_bin, work_cap);
  for (int w = 0; w < work_cap; ++w) {
    int32_t* it = plan.data() + lay.work() + w * kWorkFields;
    if (w >= int(items.size())) {
      for (int f = 0; f < kWorkFields; ++f) it[f] = f == 0 ? -1 : 0;
      continue;
    }
    const Item& x = items[w];
    it[kWorkRequest] = x.b; it[kWorkRowBegin] = x.rb; it[kWorkRowEnd] = x.re;
    it[kWorkKvBegin] = x.kb; it[kWorkKvEnd] = x.ke; it[kWorkSplit] = x.split;
    it[kWorkQoLen] = cs.reqs[x.b].qo_len; it[kWorkKvLen] = cs.reqs[x.b].kv_len;
  }
  int32_t* meta = plan.data() + lay.meta();
  meta[kMetaNumRequests] = B; meta[kMetaNumTokens] = T;
  meta[kMetaNumWork] = int(items.size()); meta[kMetaNumPartialRows] = merge_indptr[q_rows];
  for (int b = 0; b < lay.batch_cap + 1; ++b) {
    plan[lay.qo_indptr() + b] = qo_indptr[std::min(b, B)];
    plan[lay.kv_indptr() + b] = kv_indptr[std::min(b, B)];
  }
  for (int b = 0; b < B; ++b) plan[lay.kv_last_page_len() + b] = last_len[b];
  for (int t = 0; t <= q_rows; ++t) plan[lay.merge_indptr() + t] = merge_indptr[t];
  for (int i = 0; i < used_pages; ++i) plan[lay.kv_indices() + i] = kv_indices[i];

  // Data.
  std::vector<uint16_t> q(size_t(q_rows) * Hqo * D);
  for (auto& v : q) v = FromFloat(uni(rng), dt);
  const int64_t half_elems = int64_t(ps) * Hkv * D;
  const int64_t cache_elems = int64_t(num_pages) * 2 * half_elems;  // room for both forms
  std::vector<uint16_t> cache(cache_elems);
  for (auto& v : cache) v = FromFloat(uni(rng), dt);

  void *d_q, *d_cache, *d_out;
  float *d_lse, *d_ws;
  int32_t* d_plan;
  CHECK_CUDA(cudaMalloc(&d_q, q.size() * 2));
  CHECK_CUDA(cudaMalloc(&d_cache, cache.size() * 2));
  CHECK_CUDA(cudaMalloc(&d_out, q.size() * 2));
  CHECK_CUDA(cudaMalloc(&d_lse, size_t(q_rows) * Hqo * 4));
  CHECK_CUDA(cudaMalloc(&d_plan, plan.size() * 4));
  CHECK_CUDA(cudaMemcpy(d_q, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_cache, cache.data(), cache.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_plan, plan.data(), plan.size() * 4, cudaMemcpyHostToDevice));
  std::vector<uint16_t> out_init(q.size(), kPoison16);
  CHECK_CUDA(cudaMemcpy(d_out, out_init.data(), out_init.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemset(d_lse, 0xff, size_t(q_rows) * Hqo * 4));  // NaN

  // Separate caches: k = first half of the buffer, v = second half (4-D arrays).
  const void* kptr = d_cache;
  const void* vptr = static_cast<const uint16_t*>(d_cache) + int64_t(num_pages) * half_elems;
  AttentionParams p{};
  p.dependent_launch = true;  // as the library launches by default (switches.py)
  p.dtype = dt;
  p.kv_dtype = p.dtype;
  p.q = d_q; p.out = d_out; p.lse = d_lse; p.q_rows = q_rows;
  p.num_qo_heads = Hqo; p.num_kv_heads = Hkv; p.head_dim = D; p.group_size = G;
  p.kv = MakePagedKv(kptr, cs.combined ? kptr : vptr, cs.combined, cs.layout, num_pages, ps, Hkv, D, 2);
  UsePlan(p, lay, d_plan, partial_rows);
  p.tile_rows = cs.tile_rows; p.causal = cs.causal; p.pos_encoding = cs.pos;
  p.page_size = ps;
  p.sm90_rope_keys = HarnessRopeKeys();
  p.sm_scale = 1.0f / std::sqrt(float(D));
  p.rope_scale = cs.pos == PosEncoding::kRopeLlama ? 1.5f : 1.0f;
  p.rope_theta = 1e4f;
  // The workspace, poisoned: its sizes follow the attributes (the rotated keys with RoPE).
  const int64_t ws_floats = int64_t(WorkspaceBytesOf(p) + 3) / 4;
  CHECK_CUDA(cudaMalloc(&d_ws, ws_floats * 4));
  CHECK_CUDA(cudaMemset(d_ws, 0xff, ws_floats * 4));
  PointWorkspace(&p, d_ws);

  CHECK_CUDA(LaunchMergeSetup(p, 0));  // zeroes the poisoned counters
  CHECK_CUDA(LaunchUnderTest(p, 0));
  CHECK_CUDA(cudaDeviceSynchronize());

  std::vector<uint16_t> out(q.size());
  std::vector<float> lse(size_t(q_rows) * Hqo), ws(ws_floats);
  CHECK_CUDA(cudaMemcpy(out.data(), d_out, out.size() * 2, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(lse.data(), d_lse, lse.size() * 4, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(ws.data(), d_ws, ws.size() * 4, cudaMemcpyDeviceToHost));
  cudaFree(d_q); cudaFree(d_cache); cudaFree(d_out); cudaFree(d_lse); cudaFree(d_ws); cudaFree(d_plan);

  // Reference. K/V element (page, slot, head, d) sits at p.kv.offset(...) + d from the
  // k/v bases; both bases are offsets into `cache`.
  const int64_t k_base = 0;
  const int64_t v_base = cs.combined ? half_elems : int64_t(num_pages) * half_elems;
  auto kv_at = [&](int64_t base, int page, int slot, int h, int d) {
    return ToFloat(cache[base + p.kv.offset(page, slot, h) + d], dt);
  };
  std::vector<float> qv(D), kvec(D);
  // Keys as the kernel sees them: rotated (RoPE) and rounded, per request and kv head,
  // [b][hk][j][d]; masked keys (bad page) are never looked at.
  std::vector<std::vector<float>> kref(size_t(B) * Hkv);
  for (int b = 0; b < B; ++b)
    for (int hk = 0; hk < Hkv; ++hk) {
      std::vector<float>& kr = kref[size_t(b) * Hkv + hk];
      const int L = cs.reqs[b].kv_len;
      kr.assign(size_t(L) * D, 0.0f);
      for (int j = 0; j < L; ++j) {
        const int page = kv_indices[kv_indptr[b] + j / ps];
        if (page < 0 || page >= num_pages) continue;
        for (int d = 0; d < D; ++d) kvec[d] = kv_at(k_base, page, j % ps, hk, d);
        if (cs.pos == PosEncoding::kRopeLlama) RopeRef(kvec, D, j, p.rope_scale, p.rope_theta, dt);
        std::copy(kvec.begin(), kvec.end(), kr.begin() + size_t(j) * D);
      }
    }
  Stats st;
  std::vector<char> out_cov(size_t(q_rows) * Hqo, 0), part_cov(size_t(partial_rows) * Hqo, 0);
  std::vector<double> acc(D);
  const float ln2 = std::log(2.0f);
  // Split tokens: the merge of their partial references (base-2 lse m + log2 s, and
  // sum 2^(lse_i - m) o_i), compared with out/lse after the loop.
  std::vector<double> mrg_m(size_t(q_rows) * Hqo, -INFINITY), mrg_s(mrg_m.size(), 0.0);
  std::vector<double> mrg_acc(mrg_m.size() * D, 0.0);
  std::vector<char> mrg_cov(mrg_m.size(), 0);
  for (const Item& x : items) {
    const Req& r = cs.reqs[x.b];
    for (int hk = 0; hk < Hkv; ++hk) {
      for (int row = x.rb; row < x.re; ++row) {
        const int i = row / G, head = hk * G + row % G;
        const int tok = qo_indptr[x.b] + i;
        const long qpos = long(r.kv_len) - r.qo_len + i;
        for (int d = 0; d < D; ++d) qv[d] = ToFloat(q[(size_t(tok) * Hqo + head) * D + d], dt);
        if (cs.pos == PosEncoding::kRopeLlama) RopeRef(qv, D, qpos, p.rope_scale, p.rope_theta, dt);
        const double slope = cs.pos == PosEncoding::kAlibi ? AlibiSlope(head, Hqo) : 0.0;
        std::vector<double> logit;
        std::vector<int> keys;
        for (int j = x.kb; j < x.ke; ++j) {
          if (cs.causal && j > qpos) break;
          const int page = kv_indices[kv_indptr[x.b] + j / ps];
          if (page < 0 || page >= num_pages) continue;
          const float* kr = kref[size_t(x.b) * Hkv + hk].data() + size_t(j) * D;
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += double(qv[d]) * kr[d];
          logit.push_back(p.sm_scale * dot + slope * double(j - qpos));
          keys.push_back(j);
        }
        double ref_lse = -INFINITY;
        std::fill(acc.begin(), acc.end(), 0.0);
        if (!logit.empty()) {
          const double m = *std::max_element(logit.begin(), logit.end());
          double sum = 0;
          for (size_t n = 0; n < logit.size(); ++n) {
            const double w = std::exp(logit[n] - m);
            sum += w;
            const int j = keys[n];
            const int page = kv_indices[kv_indptr[x.b] + j / ps];
            for (int d = 0; d < D; ++d) acc[d] += w * kv_at(v_base, page, j % ps, hk, d);
          }
          for (int d = 0; d < D; ++d) acc[d] /= sum;
          ref_lse = (m + std::log(sum)) / ln2;
        }
        // Compare.
        const float* got_o = nullptr;
        float got_lse;
        std::vector<float> got(D);
        if (x.split < 0) {
          const size_t hr = size_t(tok) * Hqo + head;
          out_cov[hr] = 1;
          for (int d = 0; d < D; ++d) got[d] = ToFloat(out[hr * D + d], dt);
          got_lse = lse[hr];
          ++st.rows;
        } else {
          const size_t pr = size_t(merge_indptr[tok] + x.split) * Hqo + head;
          part_cov[pr] = 1;
          const size_t hr = size_t(tok) * Hqo + head;
          mrg_cov[hr] = 1;
          if (!std::isinf(ref_lse)) {
            const double m_new = std::max(mrg_m[hr], ref_lse);
            const double keep = std::exp2(mrg_m[hr] - m_new), add = std::exp2(ref_lse - m_new);
            mrg_s[hr] = mrg_s[hr] * keep + add;
            for (int d = 0; d < D; ++d)
              mrg_acc[hr * D + d] = mrg_acc[hr * D + d] * keep + add * acc[d];
            mrg_m[hr] = m_new;
          }
          for (int d = 0; d < D; ++d) got[d] = ws[pr * D + d];
          got_lse = ws[size_t(partial_rows) * Hqo * D + pr];
          ++st.partial_rows;
        }
        got_o = got.data();
        double omax = 0;
        for (int d = 0; d < D; ++d) {
          if (std::isnan(got_o[d])) { ++st.nan; continue; }
          const double e = std::fabs(got_o[d] - acc[d]);
          omax = std::max(omax, e);
          st.out_num += e * e;
          st.out_den += acc[d] * acc[d];
        }
        double lerr;
        if (std::isnan(got_lse)) { ++st.nan; lerr = 0; }
        else if (std::isinf(ref_lse) || std::isinf(got_lse)) {
          lerr = 0;
          if (!(std::isinf(ref_lse) && std::isinf(got_lse) && got_lse < 0)) ++st.lse_inf_mismatch;
        } else {
          lerr = std::fabs(got_lse - ref_lse);
        }
        if (x.split < 0) { st.out_max = std::max(st.out_max, omax); st.lse_max = std::max(st.lse_max, lerr); }
        else { st.part_max = std::max(st.part_max, omax); st.part_lse_max = std::max(st.part_lse_max, lerr); }
      }
    }
  }
  // Split tokens: out/lse written by the last CTA of each (token, kv head).
  for (size_t hr = 0; hr < mrg_cov.size(); ++hr) {
    if (!mrg_cov[hr]) continue;
    out_cov[hr] = 1;
    ++st.rows;
    const bool empty = mrg_s[hr] == 0.0;
    double omax = 0;
    for (int d = 0; d < D; ++d) {
      const float got = ToFloat(out[hr * D + d], dt);
      if (std::isnan(got)) { ++st.nan; continue; }
      const double want = empty ? 0.0 : mrg_acc[hr * D + d] / mrg_s[hr];
      const double e = std::fabs(got - want);
      omax = std::max(omax, e);
      st.out_num += e * e;
      st.out_den += want * want;
    }
    st.out_max = std::max(st.out_max, omax);
    const double want_lse = empty ? -INFINITY : mrg_m[hr] + std::log2(mrg_s[hr]);
    if (std::isnan(lse[hr])) ++st.nan;
    else if (std::isinf(want_lse) || std::isinf(lse[hr])) {
      if (!(std::isinf(want_lse) && std::isinf(lse[hr]) && lse[hr] < 0)) ++st.lse_inf_mismatch;
    } else {
      st.lse_max = std::max(st.lse_max, std::fabs(double(lse[hr]) - want_lse));
    }
  }
  // Padding rows t >= T: zeros and lse -inf, from the setup pass.
  for (size_t hr = size_t(T) * Hqo; hr < out_cov.size(); ++hr) {
    out_cov[hr] = 1;
    bool wrong = !(std::isinf(lse[hr]) && lse[hr] < 0);
    for (int d = 0; d < D; ++d) wrong |= out[hr * D + d] != 0;
    st.clobbered += wrong;
  }
  // Entries nobody owns must still hold the poison.
  for (size_t hr = 0; hr < out_cov.size(); ++hr) {
    if (out_cov[hr]) continue;
    bool touched = !std::isnan(lse[hr]);
    for (int d = 0; d < D; ++d) touched |= out[hr * D + d] != kPoison16;
    st.clobbered += touched;
  }
  for (size_t pr = 0; pr < part_cov.size(); ++pr) {
    if (part_cov[pr]) continue;
    bool touched = !std::isnan(ws[size_t(partial_rows) * Hqo * D + pr]);
    for (int d = 0; d < D; ++d) touched |= !std::isnan(ws[pr * D + d]);
    st.clobbered += touched;
  }
  const double rel = st.out_den > 0 ? std::sqrt(st.out_num / st.out_den) : 0;
  const double tol_o = dt == DType::kBF16 ? 2e-2 : 4e-3;
  const bool ok = st.nan == 0 && st.lse_inf_mismatch == 0 && st.clobbered == 0 &&
                  st.out_max < tol_o && st.part_max < tol_o && st.lse_max < 5e-3 &&
                  st.part_lse_max < 5e-3;
  std::printf("%-44s rows %5ld part %4ld | out max %.2e rel %.2e lse %.2e | part %.2e lse %.2e"
              " | nan %ld inf %ld clob %ld  %s\n",
              cs.name.c_str(), st.rows, st.partial_rows, st.out_max, rel, st.lse_max, st.part_max,
              st.part_lse_max, st.nan, st.lse_inf_mismatch, st.clobbered, ok ? "PASS" : "FAIL");
  (void)verbose;
  return ok;
}

// Request sets of both case lists ({qo_len, kv_len, split}).
// Prefill mix: qo < kv (chunked prefill), qo == kv, a decode row, qo > kv (early rows
// see nothing), an empty request, and a split request.
static const std::vector<Req> kMix = {{37, 100, false}, {1, 260, false}, {50, 50, false},
                                      {10, 5, false},   {3, 0, false},   {20, 300, true},
                                      {70, 333, true}};
static const std::vector<Req> kDecode = {{1, 17, false}, {1, 300, false}, {1, 1, false},
                                         {2, 129, false}, {1, 500, true}, {1, 0, false},
                                         {4, 77, true}};
// Long key ranges (many tiles through the offset ring and both stages), a page size
// that divides nothing, and a split request among them.
static const std::vector<Req> kLonger = {{100, 1500, true}, {64, 1024, false},
                                         {33, 700, false}, {1, 2000, false}};

[[maybe_unused]] static std::vector<Case> Cases() {
  const auto N = PosEncoding::kNone, R = PosEncoding::kRopeLlama, A = PosEncoding::kAlibi;
  const auto NHD = KvLayout::kNHD, HND = KvLayout::kHND;
  const auto BF = DType::kBF16, F16 = DType::kF16;
  const std::vector<Req>& mix = kMix;
  const std::vector<Req>& decode = kDecode;
  const std::vector<Req>& longer = kLonger;
  std::vector<Case> c;
  c.push_back({"bf16 D128 G4 NHD ps16 causal none t64", BF, 128, 2, 4, 16, 64, NHD, false, true, N, mix, false});
  c.push_back({"bf16 D128 G4 HND comb ps1 causal rope t128", BF, 128, 2, 4, 1, 128, HND, true, true, R, mix, false});
  c.push_back({"bf16 D128 G4 NHD ps16 causal alibi t64 badpg", BF, 128, 2, 4, 16, 64, NHD, false, true, A, mix, true});
  c.push_back({"bf16 D128 G4 NHD ps16 nocausal none t128", BF, 128, 2, 4, 16, 128, NHD, false, false, N, mix, false});
  c.push_back({"bf16 D128 G4 NHD ps16 t16 decode none", BF, 128, 2, 4, 16, 16, NHD, false, true, N, decode, false});
  c.push_back({"bf16 D128 G4 HND ps1 t16 decode rope", BF, 128, 2, 4, 1, 16, HND, false, true, R, decode, false});
  c.push_back({"bf16 D128 G4 NHD comb ps16 t16 alibi badpg", BF, 128, 2, 4, 16, 16, NHD, true, false, A, decode, true});
  c.push_back({"bf16 D128 G32 NHD ps16 t16 causal", BF, 128, 2, 32, 16, 16, NHD, false, true, N, decode, false});
  c.push_back({"bf16 D128 G8 HND ps16 t16 causal prefill", BF, 128, 1, 8, 16, 16, HND, false, true, N, mix, false});
  c.push_back({"f16 D128 G4 HND ps16 causal rope t64", F16, 128, 2, 4, 16, 64, HND, false, true, R, mix, false});
  c.push_back({"f16 D128 G4 NHD ps1 t16 decode alibi", F16, 128, 2, 4, 1, 16, NHD, false, true, A, decode, false});
  c.push_back({"bf16 D64 G4 NHD ps16 causal alibi t128", BF, 64, 2, 4, 16, 128, NHD, false, true, A, mix, false});
  c.push_back({"bf16 D64 G4 HND ps1 causal rope t64", BF, 64, 2, 4, 1, 64, HND, false, true, R, mix, false});
  c.push_back({"f16 D64 G4 NHD ps16 t16 decode none", F16, 64, 2, 4, 16, 16, NHD, false, true, N, decode, false});
  c.push_back({"bf16 D256 G4 NHD ps16 causal rope t64", BF, 256, 2, 4, 16, 64, NHD, false, true, R, mix, false});
  c.push_back({"bf16 D256 G4 HND comb ps1 t16 decode alibi", BF, 256, 2, 4, 1, 16, HND, true, true, A, decode, true});
  c.push_back({"bf16 D128 G4 NHD ps3 causal rope t128 long", BF, 128, 2, 4, 3, 128, NHD, false, true, R, longer, false});
  c.push_back({"bf16 D128 G4 HND ps7 causal alibi t64 long", BF, 128, 2, 4, 7, 64, HND, false, true, A, longer, true});
  c.push_back({"bf16 D64 G4 NHD ps5 causal none t128 long", BF, 64, 2, 4, 5, 128, NHD, false, true, N, longer, false});
  c.push_back({"f16 D128 G8 NHD ps16 t16 nocausal long", F16, 128, 1, 8, 16, 16, NHD, false, false, N, longer, false});
  c.push_back({"f16 D256 G2 NHD ps16 nocausal none t64", F16, 256, 2, 2, 16, 64, NHD, false, false, N, mix, false});
  return c;
}

// The settings the sm90 kernel covers (D 128, tile 128): both dtypes, NHD/HND, split and
// combined caches, page sizes 1/3/7/16/64, causal or not, qo < kv and qo > kv, GQA 1, 4,
// 8 and 32, split items, empty requests, bad page ids, several items per CTA (bins).
[[maybe_unused]] static std::vector<Case> Sm90Cases() {
  const auto N = PosEncoding::kNone, R = PosEncoding::kRopeLlama, A = PosEncoding::kAlibi;
  const auto NHD = KvLayout::kNHD, HND = KvLayout::kHND;
  const auto BF = DType::kBF16, F16 = DType::kF16;
  const std::vector<Req>& mix = kMix;
  const std::vector<Req>& decode = kDecode;
  const std::vector<Req>& longer = kLonger;
  // Requests of many items (32 tokens an item at G = 4): the causal diagonal in every
  // position of a 128-key tile, qo == kv and a long cached prefix.
  const std::vector<Req> many = {{300, 300, false}, {129, 1200, false}, {161, 161, true},
                                 {0, 50, false}, {64, 576, false}};
  std::vector<Case> c;
  c.push_back({"sm90 bf16 G4 NHD ps16 causal none mix", BF, 128, 2, 4, 16, 128, NHD, false, true, N, mix, false});
  c.push_back({"sm90 bf16 G4 HND ps16 causal none long bins3", BF, 128, 2, 4, 16, 128, HND, false, true, N, longer, false, 3});
  c.push_back({"sm90 f16 G4 NHD ps64 causal none long", F16, 128, 2, 4, 64, 128, NHD, false, true, N, longer, false});
  c.push_back({"sm90 bf16 G8 HND comb ps1 causal none mix", BF, 128, 1, 8, 1, 128, HND, true, true, N, mix, false});
  c.push_back({"sm90 bf16 G1 NHD ps16 causal none many", BF, 128, 4, 1, 16, 128, NHD, false, true, N, many, false});
  c.push_back({"sm90 bf16 G4 NHD ps16 causal none many bins5", BF, 128, 2, 4, 16, 128, NHD, false, true, N, many, false, 5});
  c.push_back({"sm90 bf16 G4 NHD ps16 nocausal none mix", BF, 128, 2, 4, 16, 128, NHD, false, false, N, mix, false});
  c.push_back({"sm90 f16 G8 HND ps64 nocausal none long bins2", F16, 128, 1, 8, 64, 128, HND, false, false, N, longer, false, 2});
  c.push_back({"sm90 bf16 G4 NHD ps16 causal alibi mix badpg", BF, 128, 2, 4, 16, 128, NHD, false, true, A, mix, true});
  c.push_back({"sm90 bf16 G4 HND ps7 causal alibi long badpg bins4", BF, 128, 2, 4, 7, 128, HND, false, true, A, longer, true, 4});
  c.push_back({"sm90 f16 G1 HND ps64 nocausal alibi long badpg", F16, 128, 2, 1, 64, 128, HND, false, false, A, longer, true});
  c.push_back({"sm90 bf16 G4 HND comb ps1 causal rope mix", BF, 128, 2, 4, 1, 128, HND, true, true, R, mix, false});
  c.push_back({"sm90 f16 G4 NHD ps3 causal rope long", F16, 128, 2, 4, 3, 128, NHD, false, true, R, longer, false});
  c.push_back({"sm90 bf16 G8 NHD ps16 nocausal rope mix badpg bins2", BF, 128, 1, 8, 16, 128, NHD, false, false, R, mix, true, 2});
  c.push_back({"sm90 bf16 G4 NHD ps16 causal rope many", BF, 128, 2, 4, 16, 128, NHD, false, true, R, many, false});
  c.push_back({"sm90 bf16 G32 NHD ps16 causal none decode", BF, 128, 2, 32, 16, 128, NHD, false, true, N, decode, false});
  c.push_back({"sm90 f16 G4 NHD comb ps16 causal none decode bins2", F16, 128, 2, 4, 16, 128, NHD, true, true, N, decode, true, 2});
  // head_dim 64 (4 lanes a key row, one 128-byte panel) and 256 (64-key tiles, two mask
  // words per stage and two copying producer warps; 128 rows only on this kernel).
  c.push_back({"sm90 bf16 D64 G4 NHD ps16 causal none mix", BF, 64, 2, 4, 16, 128, NHD, false, true, N, mix, false});
  c.push_back({"sm90 f16 D64 G8 HND comb ps1 nocausal rope long badpg bins3", F16, 64, 1, 8, 1, 128, HND, true, false, R, longer, true, 3});
  c.push_back({"sm90 bf16 D64 G4 NHD ps7 causal alibi many", BF, 64, 2, 4, 7, 128, NHD, false, true, A, many, false});
  c.push_back({"sm90 bf16 D256 G4 NHD ps16 causal none mix", BF, 256, 2, 4, 16, 128, NHD, false, true, N, mix, false});
  c.push_back({"sm90 f16 D256 G4 HND ps3 causal rope long bins2", F16, 256, 2, 4, 3, 128, HND, false, true, R, longer, false, 2});
  c.push_back({"sm90 bf16 D256 G8 NHD comb ps64 nocausal alibi mix badpg", BF, 256, 1, 8, 64, 128, NHD, true, false, A, mix, true});
  c.push_back({"sm90 bf16 D256 G1 HND ps16 causal rope many bins4", BF, 256, 2, 1, 16, 128, HND, false, true, R, many, false, 4});
  return c;
}

// A few cases for the sanitizers (racecheck is slow): one of each position encoding,
// splits, bad pages and several items per CTA among them.
static std::vector<Case> QuickCases() {
#ifdef JPA_HARNESS_SM90
  const std::vector<Case> all = Sm90Cases();
  const int pick[] = {0, 8, 11, 5, 18, 22};
#else
  const std::vector<Case> all = Cases();
  const int pick[] = {0, 1, 2};
#endif
  std::vector<Case> c;
  for (int i : pick) c.push_back(all[i]);
  return c;
}

// ---- garbage plans ------------------------------------------------------------------------
// Every int of the plan random (mostly small, some huge or negative; the work items
// mostly plausible so that the kernel gets deep into them), on a small cache. The call
// must finish without a CUDA error and leave the guard bands around out, lse and the
// workspace as they were; under compute-sanitizer memcheck no access may fall outside
// any allocation.
static bool RunGarbage(std::mt19937& rng, int iters, DType dt) {
  const int D = 128, Hkv = 2, G = 4, Hqo = Hkv * G, ps = 16, num_pages = 24, q_rows = 96;
  const int partial_rows = 16;
  PlanLayout lay{6, q_rows, 40, 24, 8};
  std::uniform_int_distribution<int> small(-4, 140), coin(0, 99);
  auto wild = [&](int lo, int hi) {
    const int c = coin(rng);
    if (c < 3) return INT32_MAX - coin(rng);
    if (c < 6) return INT32_MIN + coin(rng);
    if (c < 12) return small(rng);
    return std::uniform_int_distribution<int>(lo, hi)(rng);
  };
  const size_t out_elems = size_t(q_rows) * Hqo * D, lse_elems = size_t(q_rows) * Hqo;
  // The largest workspace a case asks for: RoPE's rotated keys (sm90_rope_keys) included.
  AttentionParams sizing{};
  sizing.dtype = dt;
  sizing.num_qo_heads = Hqo; sizing.num_kv_heads = Hkv; sizing.head_dim = D; sizing.page_size = ps;
  sizing.caps = Capacities{lay.batch_cap, lay.token_cap, lay.page_cap, lay.work_cap, partial_rows, lay.bin_cap};
  sizing.pos_encoding = PosEncoding::kRopeLlama;
  sizing.sm90_rope_keys = HarnessRopeKeys();
  const size_t ws_bytes = WorkspaceBytesOf(sizing);
  const size_t guard = 4096;  // bytes on each side
  const size_t cache_elems = size_t(num_pages) * 2 * ps * Hkv * D;
  std::vector<uint16_t> host_cache(cache_elems), host_q(out_elems);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  for (auto& v : host_cache) v = FromFloat(uni(rng), dt);
  for (auto& v : host_q) v = FromFloat(uni(rng), dt);
  void *d_cache, *d_q;
  uint8_t *g_out, *g_lse, *g_ws;
  int32_t* d_plan;
  CHECK_CUDA(cudaMalloc(&d_cache, cache_elems * 2));
  CHECK_CUDA(cudaMalloc(&d_q, out_elems * 2));
  CHECK_CUDA(cudaMalloc(&g_out, out_elems * 2 + 2 * guard));
  CHECK_CUDA(cudaMalloc(&g_lse, lse_elems * 4 + 2 * guard));
  CHECK_CUDA(cudaMalloc(&g_ws, ws_bytes + 2 * guard));
  CHECK_CUDA(cudaMalloc(&d_plan, lay.size() * 4));
  CHECK_CUDA(cudaMemcpy(d_cache, host_cache.data(), cache_elems * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_q, host_q.data(), out_elems * 2, cudaMemcpyHostToDevice));
  bool ok = true;
  long launched = 0;
  for (int iter = 0; iter < iters; ++iter) {
    std::vector<int32_t> plan(lay.size());
    for (auto& v : plan) v = wild(-3, 100);
    for (int w = 0; w < lay.work_cap; ++w) {
      int32_t* it = plan.data() + lay.work() + w * kWorkFields;
      it[kWorkRequest] = wild(-1, lay.batch_cap - 1);
      it[kWorkRowBegin] = wild(0, 200);
      it[kWorkRowEnd] = wild(0, 330);
      it[kWorkKvBegin] = wild(0, 400);
      it[kWorkKvEnd] = wild(0, 700);
      it[kWorkSplit] = wild(-1, 3);
      it[kWorkQoLen] = wild(0, 150);
      it[kWorkKvLen] = wild(0, 700);
    }
    for (int b = 0; b <= lay.bin_cap; ++b) plan[lay.bin_indptr() + b] = wild(-2, lay.work_cap + 2);
    for (int b = 0; b <= lay.batch_cap; ++b) {
      plan[lay.qo_indptr() + b] = wild(-10, q_rows + 10);
      plan[lay.kv_indptr() + b] = wild(-5, lay.page_cap + 5);
    }
    for (int t = 0; t <= q_rows; ++t) plan[lay.merge_indptr() + t] = wild(-3, partial_rows + 3);
    for (int i = 0; i < lay.page_cap; ++i) plan[lay.kv_indices() + i] = wild(-3, num_pages + 3);
    CHECK_CUDA(cudaMemcpy(d_plan, plan.data(), plan.size() * 4, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemset(g_out, 0xab, out_elems * 2 + 2 * guard));
    CHECK_CUDA(cudaMemset(g_lse, 0xab, lse_elems * 4 + 2 * guard));
    CHECK_CUDA(cudaMemset(g_ws, 0xab, ws_bytes + 2 * guard));

    AttentionParams p{};
    p.dependent_launch = true;  // as the library launches by default (switches.py)
    p.dtype = dt;
    p.kv_dtype = p.dtype;
    p.q = d_q; p.out = g_out + guard; p.lse = reinterpret_cast<float*>(g_lse + guard);
    p.q_rows = q_rows;
    p.num_qo_heads = Hqo; p.num_kv_heads = Hkv; p.head_dim = D; p.group_size = G;
    p.kv = MakePagedKv(d_cache, d_cache, true, coin(rng) < 50 ? KvLayout::kNHD : KvLayout::kHND,
                       num_pages, ps, Hkv, D, 2);
    UsePlan(p, lay, d_plan, partial_rows);
    p.tile_rows = 128;
    p.causal = coin(rng) < 50;
    const int pe = coin(rng) % 3;
    p.pos_encoding = pe == 0 ? PosEncoding::kNone : pe == 1 ? PosEncoding::kRopeLlama : PosEncoding::kAlibi;
    p.page_size = ps;
    p.sm90_rope_keys = HarnessRopeKeys();
    PointWorkspace(&p, g_ws + guard);  // (the buffer holds the largest layout: sizing above)
    p.sm_scale = 1.0f / std::sqrt(float(D));
    p.rope_scale = 1.0f; p.rope_theta = 1e4f;
#ifdef JPA_HARNESS_SM90
    std::printf("... garbage plan %d\n", iter);
    std::fflush(stdout);
#endif
    CHECK_CUDA(LaunchMergeSetup(p, 0));
    const cudaError_t le = LaunchUnderTest(p, 0);
    const cudaError_t se = cudaDeviceSynchronize();
    if (le != cudaSuccess || se != cudaSuccess) {
      std::printf("garbage plan %d: launch %s, sync %s  FAIL\n", iter, cudaGetErrorString(le),
                  cudaGetErrorString(se));
      ok = false;
      break;
    }
    ++launched;
    auto guards_intact = [&](uint8_t* base, size_t inner) {
      std::vector<uint8_t> h(inner + 2 * guard);
      CHECK_CUDA(cudaMemcpy(h.data(), base, h.size(), cudaMemcpyDeviceToHost));
      for (size_t k = 0; k < guard; ++k)
        if (h[k] != 0xab || h[guard + inner + k] != 0xab) return false;
      return true;
    };
    if (!guards_intact(g_out, out_elems * 2) || !guards_intact(g_lse, lse_elems * 4) ||
        !guards_intact(g_ws, ws_bytes)) {
      std::printf("garbage plan %d: a write outside out/lse/workspace  FAIL\n", iter);
      ok = false;
      break;
    }
  }
  cudaFree(d_cache); cudaFree(d_q); cudaFree(g_out); cudaFree(g_lse); cudaFree(g_ws); cudaFree(d_plan);
  std::printf("garbage plans (%s): %ld run, %s\n", dt == DType::kBF16 ? "bf16" : "f16", launched,
              ok ? "PASS" : "FAIL");
  return ok;
}

// Random bf16 in [-1, 1) from a hash of the index: gigabyte caches fill in
// microseconds instead of seconds of host RNG and copies.
__global__ void FillBf16(uint16_t* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 0x9e3779b1u ^ seed ^ uint32_t(i >> 32) * 0x85ebca77u;
    h ^= h >> 15; h *= 0x2c1b3c6du; h ^= h >> 12; h *= 0x297a2d39u; h ^= h >> 15;
    const float f = float(h >> 8) * (2.0f / 16777216.0f) - 1.0f;
    x[i] = __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
}

// ---- timing -------------------------------------------------------------------------------
// Uniform batches, bf16, 32/8 heads, D 128, page 16, NHD, random page placement. Items
// are cut as in the checks (no splitting), longest key range first.
#ifdef JPA_HARNESS_SM90
// The sm90 kernel with variant kVariant (prefill_sm90_config.cuh) and the pingpong as asked.
template <int kVariant, bool kPingpong = false>
static cudaError_t LaunchSm90Variant(const AttentionParams& p, cudaStream_t stream) {
  PrefillSm90Tuning t;
  t.variant = kVariant;
  t.pingpong = kPingpong;
  return LaunchPrefillSm90(p, stream, t);
}
#endif

static void Bench(int batch, int qo_len, int kv_len, int tile, bool causal, std::mt19937& rng,
                  PosEncoding pos = PosEncoding::kNone, int D = 128) {
  const int Hkv = 8, G = 4, Hqo = 32, ps = 16;
  const int T = batch * qo_len;
  const int np = (kv_len + ps - 1) / ps, pages = batch * np;
  const int chunk = (tile / G) * G;
  struct Item { int b, rb, re, ke; };
  std::vector<Item> items;
  for (int b = 0; b < batch; ++b)
    for (int rb = 0; rb < qo_len * G; rb += chunk) {
      const int re = std::min(qo_len * G, rb + chunk);
      const int ke = causal ? std::min(kv_len, kv_len - qo_len + (re - 1) / G + 1) : kv_len;
      items.push_back({b, rb, re, ke});
    }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.ke > b.ke; });
  // `bins` == 0: one bin per item (the hardware schedules the CTAs, longest first); else
  // the items dealt longest first to the least loaded of `bins` bins (cost: key tiles),
  // as the library's persistent launch runs them, so the two launches can be compared.
  std::vector<int> perm(pages);
  for (int i = 0; i < pages; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  auto make_plan = [&](int bins) {
    const int nb = bins > 0 ? bins : int(items.size());
    std::vector<std::vector<int>> of_bin(nb);
    std::vector<long> load(nb, 0);
    for (int w = 0; w < int(items.size()); ++w) {
      const int b = bins > 0 ? int(std::min_element(load.begin(), load.end()) - load.begin()) : w;
      of_bin[b].push_back(w);
      load[b] += (items[w].ke + 127) / 128;
    }
    PlanLayout l{batch, T, pages, int(items.size()), nb};
    std::vector<int32_t> pl(l.size(), 0);
    int w_out = 0;
    for (int b = 0; b < nb; ++b) {
      pl[l.bin_indptr() + b] = w_out;
      for (int w : of_bin[b]) {
        int32_t* it = pl.data() + l.work() + (w_out++) * kWorkFields;
        it[0] = items[w].b; it[1] = items[w].rb; it[2] = items[w].re; it[3] = 0; it[4] = items[w].ke;
        it[5] = -1; it[6] = qo_len; it[7] = kv_len;
      }
    }
    pl[l.bin_indptr() + nb] = w_out;
    for (int b = 0; b <= batch; ++b) {
      pl[l.qo_indptr() + b] = b * qo_len;
      pl[l.kv_indptr() + b] = b * np;
    }
    for (int i = 0; i < pages; ++i) pl[l.kv_indices() + i] = perm[i];
    pl[l.meta() + kMetaNumTokens] = T;
    pl[l.meta() + kMetaNumRequests] = batch;
    return std::make_pair(l, pl);
  };
  auto [lay, plan] = make_plan(0);

  const size_t q_elems = size_t(T) * Hqo * D, cache_elems = size_t(pages) * 2 * ps * Hkv * D;
  void *d_q, *d_cache, *d_out, *d_ws;
  float* d_lse;
  int32_t* d_plan;
  CHECK_CUDA(cudaMalloc(&d_q, q_elems * 2));
  CHECK_CUDA(cudaMalloc(&d_out, q_elems * 2));
  CHECK_CUDA(cudaMalloc(&d_cache, cache_elems * 2));
  CHECK_CUDA(cudaMalloc(&d_lse, size_t(T) * Hqo * 4));
  CHECK_CUDA(cudaMalloc(&d_plan, plan.size() * 4));
  FillBf16<<<1024, 256>>>(static_cast<uint16_t*>(d_q), q_elems, rng());
  FillBf16<<<1024, 256>>>(static_cast<uint16_t*>(d_cache), cache_elems, rng());
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaMemcpy(d_plan, plan.data(), plan.size() * 4, cudaMemcpyHostToDevice));
  AttentionParams p{};
  // The library's defaults (switches.py), which the `sm90` row's launch reads from p as
  // the library's does. (Until 2026-12-07 the drawn tasks were left off here: `sm90`
  // timed static bins, while the variant rows, on PrefillSm90Tuning's defaults, drew.)
  p.dependent_launch = true;
  p.sm90_drawn_tasks = true;  // (sm90_stages 0: the kernel's default ring)
  p.sm90_pingpong = -1;       // the library's rule for the head_dim
  p.dtype = DType::kBF16;
  p.kv_dtype = p.dtype;
  p.q = d_q; p.out = d_out; p.lse = d_lse; p.q_rows = T;
  p.num_qo_heads = Hqo; p.num_kv_heads = Hkv; p.head_dim = D; p.group_size = G;
  p.kv = MakePagedKv(d_cache, d_cache, true, KvLayout::kNHD, pages, ps, Hkv, D, 2);
  UsePlan(p, lay, d_plan, 0);
  p.tile_rows = tile; p.causal = causal; p.pos_encoding = pos;
  p.page_size = ps;
  p.sm90_rope_keys = true;  // the sm90 rows' default (the sm90-ropeip row turns it off)
  p.sm_scale = 1.0f / std::sqrt(float(D)); p.rope_scale = 1; p.rope_theta = 1e4f;
  // No split items: the task counter, and the rotated keys with RoPE.
  CHECK_CUDA(cudaMalloc(&d_ws, WorkspaceBytesOf(p)));
  PointWorkspace(&p, d_ws);
#ifdef JPA_HARNESS_SM90
  // The same items dealt to f x (SMs / Hkv) bins, f = 1 (the library's persistent wave
  // at one CTA per SM) and 4 (four waves the hardware balances).
  int sms = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  std::vector<int32_t*> binned_plans;
  auto binned = [&](int f) {
    auto [l, pl] = make_plan(f * std::max(1, sms / Hkv));
    int32_t* dp;
    CHECK_CUDA(cudaMalloc(&dp, pl.size() * 4));
    CHECK_CUDA(cudaMemcpy(dp, pl.data(), pl.size() * 4, cudaMemcpyHostToDevice));
    binned_plans.push_back(dp);
    AttentionParams q = p;
    UsePlan(q, l, dp, 0);
    return q;
  };
  // (Copies of p: every field is set above, so the bins' launches run the same call.)
  const AttentionParams p_bins1 = binned(1), p_bins4 = binned(4);
#endif

  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  // Causal FLOPs count the visible half (as the DESIGN table does).
  double pairs = 0;
  for (int i = 0; i < qo_len; ++i) pairs += causal ? std::min(kv_len, kv_len - qo_len + i + 1) : kv_len;
  const double flops = 4.0 * batch * Hqo * pairs * D;
  const double kv_bytes = double(batch) * kv_len * Hkv * D * 2 * 2;
  const char* pname = pos == PosEncoding::kRopeLlama ? "rope " : pos == PosEncoding::kAlibi ? "alibi" : "none ";

  // The kernels timed on this one plan, each against the first one's output.
  struct Timed {
    const char* name;
    cudaError_t (*launch)(const AttentionParams&, cudaStream_t);
    const AttentionParams* params = nullptr;  // another plan of the same items (dealt bins)
  };
  std::vector<Timed> kernels = {{"sm80", [](const AttentionParams& q, cudaStream_t st) { return LaunchPrefill(q, st); }}};
#ifdef JPA_HARNESS_SM90
  // sm90: drawn tasks (one CTA per SM, items in plan order: longest first here);
  // sm90-static: one CTA per item, which the hardware schedules; sm90-bins1/4: the
  // items dealt to persistent CTAs per kv head (the library before drawn tasks).
  kernels.push_back({"sm90", [](const AttentionParams& q, cudaStream_t st) { return LaunchPrefillSm90(q, st); }});
  auto static_bins = [](const AttentionParams& q, cudaStream_t st) {
    PrefillSm90Tuning t;
    t.drawn_tasks = false;
    return LaunchPrefillSm90(q, st, t);
  };
  kernels.push_back({"sm90-static", static_bins});
  kernels.push_back({"sm90-pp", [](const AttentionParams& q, cudaStream_t st) {
                       PrefillSm90Tuning t;
                       t.pingpong = true;
                       return LaunchPrefillSm90(q, st, t);
                     }});
  kernels.push_back({"sm90-2st", [](const AttentionParams& q, cudaStream_t st) {
                       PrefillSm90Tuning t;
                       t.stages = 2;
                       return LaunchPrefillSm90(q, st, t);
                     }});
  // The kernel's variants under measurement (prefill_sm90_config.cuh, kVariant*; built
  // with JPA_SM90_VARIANTS): the V ring of 2 tiles with a second Q buffer (v2), alone and
  // with the pingpong.
  if (D == 128) {
    kernels.push_back({"sm90-v2", LaunchSm90Variant<1>});
    kernels.push_back({"sm90-v2pp", LaunchSm90Variant<1, true>});
  }
  // The consumers' time alone: K/V not copied (its output is not compared).
  kernels.push_back({"sm90-nokv", [](const AttentionParams& q, cudaStream_t st) {
                       PrefillSm90Tuning t;
                       t.copy_kv = false;
                       return LaunchPrefillSm90(q, st, t);
                     }});
  if (pos == PosEncoding::kRopeLlama) {  // RoPE keys rotated by the producer, tile by tile
    kernels.push_back({"sm90-ropeip", [](const AttentionParams& q, cudaStream_t st) {
                         PrefillSm90Tuning t;
                         t.rope_keys = false;
                         return LaunchPrefillSm90(q, st, t);
                       }});
  }
  kernels.push_back({"sm90-bins1", static_bins, &p_bins1});
  kernels.push_back({"sm90-bins4", static_bins, &p_bins4});
#endif
  // JPA_BENCH_KERNELS="sm90,sm90-nokv" times only those (e.g. to profile one under ncu);
  // the outputs are then compared with the first one kept.
  if (const char* only = std::getenv("JPA_BENCH_KERNELS")) {
    const std::string names = std::string(",") + only + ",";
    std::vector<Timed> kept;
    for (const Timed& t : kernels)
      if (names.find("," + std::string(t.name) + ",") != std::string::npos) kept.push_back(t);
    kernels = kept;
  }
  // Timing: the first kernel (sm80, the reference) alone, then the others in rounds, each
  // round starting one kernel later (round r times kernels[1 + (r + j) % n], j = 0..n-1),
  // one warm-up and `launches` timed launches each, so that every row runs once in every
  // place; the median of all its launches is printed with the spread of its per-round
  // medians.
  struct Row {
    bool ok = false;
    std::vector<float> all, round_medians;
    double diff = 0;
    long nan = 0;
  };
  std::vector<Row> rows(kernels.size());
  auto time_launches = [&](const Timed& kern, int n, std::vector<float>* ms) {
    const AttentionParams& pk = kern.params ? *kern.params : p;
    for (int i = 0; i < n; ++i) {
      // The task counter, zeroed before each launch as the setup pass does (outside the
      // timed events: the library's setup overlaps the kernel by dependent launch).
      CHECK_CUDA(cudaMemsetAsync(pk.task_counter, 0, 8, 0));
      CHECK_CUDA(cudaEventRecord(e0));
      CHECK_CUDA(kern.launch(pk, 0));
      CHECK_CUDA(cudaEventRecord(e1));
      CHECK_CUDA(cudaEventSynchronize(e1));
      float t;
      CHECK_CUDA(cudaEventElapsedTime(&t, e0, e1));
      if (ms) ms->push_back(t);
    }
  };
  auto median = [](std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : double(v[v.size() / 2]);
  };
  std::vector<uint16_t> first_out, got_out;
  for (size_t k = 0; k < kernels.size(); ++k) {  // outputs and a warm-up of each
    const Timed& kern = kernels[k];
    const AttentionParams& pk = kern.params ? *kern.params : p;
    CHECK_CUDA(cudaMemset(d_out, 0xff, q_elems * 2));
    CHECK_CUDA(cudaMemsetAsync(pk.task_counter, 0, 8, 0));
    const cudaError_t le = kern.launch(pk, 0);
    if (le != cudaSuccess) {
      std::printf("bench bf16 d%d %3d x qo %5d kv %5d tile %3d %s %s %-9s: %s\n", D, batch, qo_len,
                  kv_len, tile, causal ? "causal" : "full  ", pname, kern.name, cudaGetErrorString(le));
      cudaGetLastError();
      continue;
    }
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<uint16_t>& dst = first_out.empty() ? first_out : got_out;
    dst.resize(q_elems);
    CHECK_CUDA(cudaMemcpy(dst.data(), d_out, q_elems * 2, cudaMemcpyDeviceToHost));
    Row& row = rows[k];
    row.ok = true;
    if (&dst == &got_out) {
      for (size_t e = 0; e < q_elems; ++e) {
        const float a = ToFloat(first_out[e], DType::kBF16), b = ToFloat(got_out[e], DType::kBF16);
        if (std::isnan(b)) { ++row.nan; continue; }
        row.diff = std::max(row.diff, double(std::fabs(a - b)));
      }
    }
    time_launches(kern, 2, nullptr);
  }
  auto timed_round = [&](size_t k, int launches) {
    std::vector<float> ms;
    time_launches(kernels[k], 1, nullptr);
    time_launches(kernels[k], launches, &ms);
    rows[k].all.insert(rows[k].all.end(), ms.begin(), ms.end());
    rows[k].round_medians.push_back(float(median(ms)));
  };
  if (rows[0].ok) timed_round(0, 10);
  const size_t n_rot = kernels.size() - 1;
  const int launches = std::max(3, int(24 / std::max<size_t>(n_rot, 1)));
  for (size_t r = 0; r < n_rot; ++r) {
    for (size_t j = 0; j < n_rot; ++j) {
      const size_t k = 1 + (r + j) % n_rot;
      if (rows[k].ok) timed_round(k, launches);
    }
  }
  const char* first_name = nullptr;
  for (size_t k = 0; k < kernels.size(); ++k) {
    const Row& row = rows[k];
    if (!row.ok) continue;
    const double med = median(row.all);
    const auto spread = std::minmax_element(row.round_medians.begin(), row.round_medians.end());
    std::printf("bench bf16 d%d %3d x qo %5d kv %5d tile %3d %s %s %-9s: %8.3f ms  %7.1f TFLOP/s  %7.1f GB/s (K+V)"
                "  [rounds %.3f..%.3f]",
                D, batch, qo_len, kv_len, tile, causal ? "causal" : "full  ", pname, kernels[k].name, med,
                flops / med / 1e9, kv_bytes / med / 1e6, *spread.first, *spread.second);
    if (first_name) std::printf("  max|out - %s| %.2e nan %ld", first_name, row.diff, row.nan);
    else first_name = kernels[k].name;
    std::printf("\n");
    std::fflush(stdout);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(d_q); cudaFree(d_out); cudaFree(d_cache); cudaFree(d_lse); cudaFree(d_ws); cudaFree(d_plan);
#ifdef JPA_HARNESS_SM90
  for (int32_t* dp : binned_plans) cudaFree(dp);
#endif
}

// FastDivmod (fast_divmod.cuh) against / and % on the device: every divisor of a list
// from 1 to 2^31 - 1, dividends at 0, at the top of the range, around multiples of the
// divisor and spread at random, 2^20 a divisor.
__global__ void FastDivmodCheckKernel(const int* divisors, int num_divisors, uint32_t seed,
                                      unsigned long long* mismatches) {
  const int d = divisors[blockIdx.y];
  const FastDivmod fd(d);
  unsigned long long bad = 0;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < (1u << 20); i += gridDim.x * blockDim.x) {
    uint32_t h = (i ^ seed) * 0x9e3779b9u;
    h ^= h >> 15;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    int n;
    switch (i & 3) {
      case 0: n = int(h & 0x7fffffffu); break;                             // anywhere
      case 1: {  // around multiples q d
        const int64_t v = int64_t(i >> 2) * d + int64_t(h % 3u) - 1;
        n = int(v < 0 ? 0 : (v > 0x7fffffff ? 0x7fffffff : v));
        break;
      }
      case 2: n = 0x7fffffff - int(i >> 2); break;                         // the top
      default: n = int(i >> 2); break;                                     // the bottom
    }
    bad += (fd.Div(n) != n / d) + (fd.Mod(n) != n % d);
  }
  if (bad) atomicAdd(mismatches, bad);
}

static bool CheckFastDivmod(unsigned seed) {
  const std::vector<int> ds = {1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 31, 32, 33, 48, 64, 100, 127, 128,
                               129, 1000, 4096, 32767, 32768, 32769, 65535, 65536, (1 << 30) + 7,
                               2147483647};
  int* d_ds;
  unsigned long long* d_bad;
  CHECK_CUDA(cudaMalloc(&d_ds, ds.size() * sizeof(int)));
  CHECK_CUDA(cudaMalloc(&d_bad, sizeof(unsigned long long)));
  CHECK_CUDA(cudaMemcpy(d_ds, ds.data(), ds.size() * sizeof(int), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemset(d_bad, 0, sizeof(unsigned long long)));
  FastDivmodCheckKernel<<<dim3(64, unsigned(ds.size())), 256>>>(d_ds, int(ds.size()), seed, d_bad);
  CHECK_CUDA(cudaGetLastError());
  unsigned long long bad = 0;
  CHECK_CUDA(cudaMemcpy(&bad, d_bad, sizeof(bad), cudaMemcpyDeviceToHost));
  cudaFree(d_ds);
  cudaFree(d_bad);
  std::printf("fast divmod against / and %%: %llu mismatches %s\n", bad, bad == 0 ? "PASS" : "FAIL");
  return bad == 0;
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "check";
  const unsigned seed = argc > 2 ? unsigned(std::strtoul(argv[2], nullptr, 10)) : std::random_device{}();
  std::printf("seed %u\n", seed);
  std::mt19937 rng(seed);
  int failed = 0;
  if (mode == "check" || mode == "all" || mode == "quick") {
#ifdef JPA_HARNESS_SM90
    const std::vector<Case> cases = mode == "quick" ? QuickCases() : Sm90Cases();
#else
    const std::vector<Case> cases = mode == "quick" ? QuickCases() : Cases();
#endif
    failed += !CheckFastDivmod(seed);
    for (const Case& c : cases) failed += !RunCase(c, rng, false);
    // Unsupported configurations must be refused, not launched.
    AttentionParams bad{};
    bad.dtype = DType::kBF16; bad.head_dim = 256; bad.num_kv_heads = 1; bad.num_qo_heads = 1;
    bad.group_size = 1; bad.kv.num_kv_heads = 1; bad.kv.head_dim = 256; bad.kv.page_size = 1;
    bad.layout.work_cap = 1; bad.layout.bin_cap = 1; bad.tile_rows = 128;
#ifdef JPA_HARNESS_SM90
    const cudaError_t kRefused = cudaErrorNotSupported;
#else
    const cudaError_t kRefused = cudaErrorInvalidValue;
#endif
    const bool refused = LaunchUnderTest(bad, 0) == kRefused;
    bad.tile_rows = 64; bad.head_dim = bad.kv.head_dim = 96;
    const bool refused2 = LaunchUnderTest(bad, 0) == kRefused;
    bool refused3 = true;
#ifdef JPA_HARNESS_SM90
    bad.head_dim = bad.kv.head_dim = 128;  // covered head_dim, uncovered tile
    refused3 = LaunchUnderTest(bad, 0) == kRefused;
    bad.tile_rows = 128; bad.dtype = DType::kF32;
    refused3 = refused3 && LaunchUnderTest(bad, 0) == kRefused;
#endif
    std::printf("unsupported configs refused: %s\n", refused && refused2 && refused3 ? "PASS" : "FAIL");
    failed += !(refused && refused2 && refused3);
  }
  if (mode == "garbage" || mode == "all" || mode == "quick") {
    const int iters = mode == "quick" ? 3 : 40;
    failed += !RunGarbage(rng, iters, DType::kBF16);
    failed += !RunGarbage(rng, mode == "quick" ? 1 : 10, DType::kF16);
  }
  if (mode == "check" || mode == "all" || mode == "quick" || mode == "garbage")
    std::printf("%s: %d case(s) failed\n", failed ? "FAILED" : "ALL PASSED", failed);
  if (mode == "bench" || mode == "all") {
    // JPA_BENCH_ROWS="0,4" runs only those rows (0-based, in the order below), e.g. to
    // profile one row under ncu.
    const char* rows_env = std::getenv("JPA_BENCH_ROWS");
    const std::string rows = rows_env ? std::string(",") + rows_env + "," : "";
    int row = 0;
    auto Bench = [&](auto&&... args) {
      const bool wanted = rows.empty() || rows.find("," + std::to_string(row) + ",") != std::string::npos;
      ++row;
      if (wanted) ::Bench(std::forward<decltype(args)>(args)...);
    };
#ifdef JPA_HARNESS_SM90
    // shared/DESIGN.md §6's causal prefill rows (8 x (1024 new over 4096 cached): kv 5120),
    // then the same with the other settings the sm90 kernel covers.
    Bench(4, 2048, 2048, 128, true, rng);
    Bench(1, 8192, 8192, 128, true, rng);
    Bench(16, 512, 512, 128, true, rng);
    Bench(8, 1024, 5120, 128, true, rng);
    Bench(4, 2048, 2048, 128, false, rng);
    Bench(4, 2048, 2048, 128, true, rng, PosEncoding::kRopeLlama);
    Bench(4, 2048, 2048, 128, true, rng, PosEncoding::kAlibi);
    Bench(4, 2048, 2048, 128, true, rng, PosEncoding::kNone, 64);
    Bench(4, 2048, 2048, 128, true, rng, PosEncoding::kNone, 256);
#else
    Bench(4, 2048, 2048, 128, true, rng);
    Bench(4, 2048, 2048, 64, true, rng);
    Bench(1, 8192, 8192, 128, true, rng);
    Bench(16, 512, 512, 128, true, rng);
    Bench(16, 512, 512, 64, true, rng);
    Bench(4, 2048, 2048, 128, true, rng, PosEncoding::kRopeLlama);
    Bench(4, 2048, 2048, 128, true, rng, PosEncoding::kAlibi);
    Bench(64, 1, 4096, 16, true, rng);
    Bench(128, 1, 2048, 16, true, rng);
    Bench(16, 1, 4096, 16, true, rng);
#endif
  }
  return failed ? 1 : 0;
}
