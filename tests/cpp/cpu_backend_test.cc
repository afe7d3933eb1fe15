// Standalone test of the CPU backend (cuda/cpu/): drives RunAttentionCpu/RunAppendCpu
// with hand-built plan buffers and compares against a naive double-precision loop per
// (token, head) written independently here. Also times a 64 x 2048 bf16 decode.
//
// Build and run from the repository root (one command line):
//   g++ -O3 -std=c++17 -pthread -Icuda/include
//       -I$(python3 -c "import jax.ffi; print(jax.ffi.include_dir())")
//       tests/cpp/cpu_backend_test.cc cuda/cpu/*.cc -o /tmp/cpu_backend_test
//   /tmp/cpu_backend_test            # all cases and the benchmark
//   /tmp/cpu_backend_test --quick    # skip the benchmark
//   /tmp/cpu_backend_test --bench    # only the benchmark
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../../cuda/cpu/cpu_backend.h"
#include "../../cuda/cpu/cpu_numeric.h"
#include "jax_pagedattn/params.h"
#include "jax_pagedattn/plan_layout.h"

using namespace jax_pagedattn;
using cpu::BFloat16;
using cpu::Half;

namespace {

int g_failures = 0;

void Expect(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::printf("  FAIL: %s\n", what.c_str());
  }
}

const char* DTypeName(DType t) {
  return t == DType::kF32 ? "f32" : t == DType::kF16 ? "f16" : "bf16";
}

int ElemSize(DType t) { return t == DType::kF32 ? 4 : 2; }

// ---------------------------------------------------------------------------------------
// Conversions: checked against the compiler's _Float16 where it has one, and against a
// rounding rule computed in double for bf16. Everything below then stores f16/bf16
// through these conversions.

// bf16 nearest-even computed the slow way: the two neighbouring bf16 values and a
// distance comparison in double.
uint16_t SlowBf16(float f) {
  if (std::isnan(f)) return 0x7fc0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t down = u & 0xffff0000u;
  const uint32_t up = down + 0x10000u;
  float fd, fu;
  std::memcpy(&fd, &down, 4);
  std::memcpy(&fu, &up, 4);
  const double dd = std::fabs(double(f) - double(fd));
  // `up` of the largest finite magnitude is infinity; IEEE rounding treats it as 2^128.
  const double fu_d = std::isinf(fu) ? std::copysign(std::ldexp(1.0, 128), double(f)) : double(fu);
  const double du = std::fabs(fu_d - double(f));
  if (dd < du) return uint16_t(down >> 16);
  if (du < dd) return uint16_t(up >> 16);
  return uint16_t(((down >> 16) & 1u) ? (up >> 16) : (down >> 16));
}

void TestConversions() {
  std::printf("conversions\n");
  std::mt19937 rng(7);
  std::vector<float> samples;
  const float specials[] = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65519.99f, 65520.0f, 70000.0f,
                            6.1035156e-05f, 5.9604645e-08f, 2.9802322e-08f, 2.9802326e-08f,
                            1e-10f, 3.0e38f, 3.4028235e38f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::denorm_min()};
  for (float f : specials) samples.push_back(f);
  for (int i = 0; i < 2000000; ++i) {
    uint32_t u = rng();
    float f;
    std::memcpy(&f, &u, 4);
    if (!std::isnan(f)) samples.push_back(f);
  }
  // Dense sweep over the f16 range, where the interesting rounding happens.
  for (int i = 0; i < 1000000; ++i)
    samples.push_back(std::ldexp(float(rng() & 0xffffff) / float(1 << 24), int(rng() % 45) - 30) *
                      ((rng() & 1) ? 1.0f : -1.0f));

  int bad_bf16 = 0;
  for (float f : samples)
    if (cpu::FromFloat<BFloat16>(f).bits != SlowBf16(f)) ++bad_bf16;
  Expect(bad_bf16 == 0, "float -> bf16 round-to-nearest-even mismatches: " + std::to_string(bad_bf16));
  Expect((cpu::FromFloat<BFloat16>(std::nanf("")).bits & 0x7fffu) > 0x7f80u, "bf16 NaN stays NaN");
  int bad_bf16_widen = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = cpu::ToFloat(BFloat16{uint16_t(h)});
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (u != h << 16) ++bad_bf16_widen;
  }
  Expect(bad_bf16_widen == 0, "bf16 -> float");

#if defined(__FLT16_MAX__)
  int bad_widen = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    _Float16 ref;
    const uint16_t bits = uint16_t(h);
    std::memcpy(&ref, &bits, 2);
    const float want = float(ref);
    const float got = cpu::ToFloat(Half{bits});
    if (std::isnan(want) ? !std::isnan(got) : std::memcmp(&want, &got, 4) != 0) ++bad_widen;
  }
  Expect(bad_widen == 0, "f16 -> float mismatches: " + std::to_string(bad_widen));
  int bad_narrow = 0;
  for (float f : samples) {
    const _Float16 ref = _Float16(f);
    uint16_t want;
    std::memcpy(&want, &ref, 2);
    if (cpu::FromFloat<Half>(f).bits != want) ++bad_narrow;
  }
  Expect(bad_narrow == 0, "float -> f16 mismatches: " + std::to_string(bad_narrow));
  Expect((cpu::FromFloat<Half>(std::nanf("")).bits & 0x7fffu) > 0x7c00u, "f16 NaN stays NaN");
  std::printf("  %zu floats, all 65536 halves checked against _Float16\n", samples.size());
#else
  std::printf("  (no _Float16 in this compiler: f16 checked through the attention cases only)\n");
#endif
}

// ---------------------------------------------------------------------------------------
// Typed storage.

struct Tensor {
  DType dtype = DType::kF32;
  std::vector<uint8_t> bytes;

  Tensor() = default;
  Tensor(DType t, int64_t n) : dtype(t), bytes(size_t(n) * ElemSize(t)) {}
  int64_t size() const { return int64_t(bytes.size()) / ElemSize(dtype); }
  void* data() { return bytes.data(); }
  const void* data() const { return bytes.data(); }

  double Get(int64_t i) const {
    switch (dtype) {
      case DType::kF32: return reinterpret_cast<const float*>(bytes.data())[i];
      case DType::kF16: return cpu::ToFloat(reinterpret_cast<const Half*>(bytes.data())[i]);
      case DType::kBF16: return cpu::ToFloat(reinterpret_cast<const BFloat16*>(bytes.data())[i]);
    }
    return 0;
  }
  void Set(int64_t i, float v) {
    switch (dtype) {
      case DType::kF32: reinterpret_cast<float*>(bytes.data())[i] = v; break;
      case DType::kF16: reinterpret_cast<Half*>(bytes.data())[i] = cpu::FromFloat<Half>(v); break;
      case DType::kBF16:
        reinterpret_cast<BFloat16*>(bytes.data())[i] = cpu::FromFloat<BFloat16>(v);
        break;
    }
  }
  void FillRandom(std::mt19937_64& rng, float scale) {
    std::uniform_real_distribution<float> u(-scale, scale);
    for (int64_t i = 0; i < size(); ++i) Set(i, u(rng));
  }
};

// A paged cache with its own index arithmetic (written from the documented shapes, not
// from PagedKv), so the strides the backend uses are checked too.
struct Cache {
  bool combined = true;
  KvLayout layout = KvLayout::kNHD;
  int P = 0, S = 1, H = 1, D = 8;
  Tensor k, v;  // combined: everything in k

  Cache() = default;
  Cache(DType t, bool combined_, KvLayout layout_, int pages, int page_size, int heads, int dim)
      : combined(combined_), layout(layout_), P(pages), S(page_size), H(heads), D(dim) {
    const int64_t half = int64_t(P) * S * H * D;
    k = Tensor(t, combined ? 2 * half : half);
    if (!combined) v = Tensor(t, half);
  }
  // part 0 = K, 1 = V.
  int64_t Index(int part, int64_t page, int64_t slot, int64_t head, int64_t d) const {
    const int64_t inner = layout == KvLayout::kNHD ? (slot * H + head) * D + d
                                                   : (head * S + slot) * D + d;
    if (combined) return ((page * 2 + part) * S * H * D) + inner;
    return page * S * H * D + inner;
  }
  const Tensor& Part(int part) const { return combined || part == 0 ? k : v; }
  Tensor& Part(int part) { return combined || part == 0 ? k : v; }
  double Get(int part, int64_t page, int64_t slot, int64_t head, int64_t d) const {
    return Part(part).Get(Index(part, page, slot, head, d));
  }
  PagedKv Kv() const {
    return MakePagedKv(k.data(), combined ? k.data() : v.data(), combined, layout, P, S, H, D,
                       ElemSize(k.dtype));
  }
};

// Requests' page tables: distinct random pages.
struct Batch {
  std::vector<int> qo_len, kv_len;
  std::vector<int32_t> qo_indptr, kv_indptr, kv_indices, last_page_len;
};

Batch MakeBatch(const std::vector<int>& qo, const std::vector<int>& kv, int page_size,
                int num_pages, std::mt19937_64& rng) {
  Batch b;
  b.qo_len = qo;
  b.kv_len = kv;
  std::vector<int32_t> pages(num_pages);
  std::iota(pages.begin(), pages.end(), 0);
  std::shuffle(pages.begin(), pages.end(), rng);
  size_t next = 0;
  b.qo_indptr.push_back(0);
  b.kv_indptr.push_back(0);
  for (size_t r = 0; r < qo.size(); ++r) {
    b.qo_indptr.push_back(b.qo_indptr.back() + qo[r]);
    const int n = (kv[r] + page_size - 1) / page_size;
    for (int i = 0; i < n; ++i) {
      if (next >= pages.size()) {
        std::printf("test setup: not enough pages\n");
        std::exit(2);
      }
      b.kv_indices.push_back(pages[next++]);
    }
    b.kv_indptr.push_back(int32_t(b.kv_indices.size()));
    b.last_page_len.push_back(kv[r] == 0 ? 0 : kv[r] - (n - 1) * page_size);
  }
  return b;
}

// ---------------------------------------------------------------------------------------
// The hand-built plan: what a planner would emit, from a simple policy.

struct PlanPolicy {
  int tile_rows = 16;
  int kv_chunk = 0;            // split keys into chunks of this length (0: never split)
  bool padding_between = false;  // put a padding item among the live ones
  int work_padding = 3;        // padding items after the live ones
};

struct Plan {
  PlanLayout layout;
  std::vector<int32_t> buf;
  int32_t partial_rows = 0;
  int32_t num_work = 0;
};

Plan BuildPlan(const Batch& b, int G, int q_rows, const PlanPolicy& pol) {
  const int B = int(b.qo_len.size());
  const int num_tokens = b.qo_indptr.back();
  std::vector<std::array<int32_t, kWorkFields>> items;
  std::vector<int32_t> partials(num_tokens, 0);
  for (int r = 0; r < B; ++r) {
    const int qo = b.qo_len[r], kv = b.kv_len[r];
    if (qo == 0) continue;
    // Row tiles: whole tokens when a group fits a tile, else part of one token's heads.
    std::vector<std::pair<int, int>> tiles;
    if (G <= pol.tile_rows) {
      const int step = (pol.tile_rows / G) * G;
      for (int row = 0; row < qo * G; row += step) tiles.push_back({row, std::min(row + step, qo * G)});
    } else {
      for (int i = 0; i < qo; ++i)
        for (int c = 0; c < G; c += pol.tile_rows)
          tiles.push_back({i * G + c, i * G + std::min(c + pol.tile_rows, G)});
    }
    std::vector<std::pair<int, int>> chunks;
    if (pol.kv_chunk > 0 && kv > pol.kv_chunk) {
      for (int j = 0; j < kv; j += pol.kv_chunk) chunks.push_back({j, std::min(j + pol.kv_chunk, kv)});
    } else {
      chunks.push_back({0, kv});
    }
    const bool split = chunks.size() > 1;
    if (split)
      for (int i = 0; i < qo; ++i) partials[b.qo_indptr[r] + i] = int32_t(chunks.size());
    for (auto [r0, r1] : tiles)
      for (size_t c = 0; c < chunks.size(); ++c)
        items.push_back({r, r0, r1, chunks[c].first, chunks[c].second, split ? int32_t(c) : -1, qo, kv});
  }
  const std::array<int32_t, kWorkFields> pad = {-1, 7777, 8888, 9999, 12345, 3, 11, 13};
  Plan plan;
  plan.num_work = int32_t(items.size());
  if (pol.padding_between && items.size() > 1) items.insert(items.begin() + items.size() / 2, pad);
  for (int i = 0; i < pol.work_padding; ++i) items.push_back(pad);

  const int32_t batch_cap = B + 2;
  const int32_t token_cap = q_rows + 3;
  const int32_t page_cap = int32_t(b.kv_indices.size()) + 5;
  const int32_t work_cap = int32_t(items.size());
  // One bin per item: the old one-CTA-per-item grid, which every plan must also allow.
  plan.layout = PlanLayout{batch_cap, token_cap, page_cap, work_cap, std::max(work_cap, 1)};
  const PlanLayout& L = plan.layout;
  plan.buf.assign(size_t(L.size()), 0);
  int32_t* buf = plan.buf.data();
  for (int32_t i = 0; i <= L.bin_cap; ++i) buf[L.bin_indptr() + i] = std::min(i, work_cap);
  for (size_t w = 0; w < items.size(); ++w)
    std::copy(items[w].begin(), items[w].end(), buf + L.work() + w * kWorkFields);
  for (int i = 0; i <= batch_cap; ++i) {
    buf[L.qo_indptr() + i] = b.qo_indptr[std::min(i, B)];
    buf[L.kv_indptr() + i] = b.kv_indptr[std::min(i, B)];
  }
  for (int i = 0; i < B; ++i) buf[L.kv_last_page_len() + i] = b.last_page_len[i];
  int32_t run = 0;
  for (int t = 0; t <= token_cap; ++t) {
    buf[L.merge_indptr() + t] = run;
    if (t < num_tokens) run += partials[t];
  }
  plan.partial_rows = run;
  std::copy(b.kv_indices.begin(), b.kv_indices.end(), buf + L.kv_indices());
  buf[L.meta() + kMetaNumRequests] = B;
  buf[L.meta() + kMetaNumTokens] = num_tokens;
  buf[L.meta() + kMetaNumWork] = plan.num_work;
  buf[L.meta() + kMetaNumPartialRows] = run;
  return plan;
}

// ---------------------------------------------------------------------------------------
// Attention cases and the naive reference.

struct AttnCase {
  std::string name;
  DType dtype = DType::kBF16;
  KvLayout layout = KvLayout::kNHD;
  bool combined = true;
  int Hqo = 8, Hkv = 2, D = 128, page_size = 16;
  std::vector<int> qo_lens, kv_lens;
  bool causal = false;
  PosEncoding pos = PosEncoding::kNone;
  float rope_scale = 1.0f, rope_theta = 1e4f;
  PlanPolicy policy;
  int extra_q_rows = 3;  // q rows past num_tokens (padding rows)
  int bad_pages = 0;     // kv_indices entries pointed outside the cache
};

double RefAlibiSlope(int h, int n) {
  int p = 1;
  while (p * 2 <= n) p *= 2;
  if (h < p) return std::pow(2.0, -8.0 * (h + 1) / p);
  return std::pow(2.0, -4.0 * (2.0 * (h + 1 - p) - 1.0) / p);
}

// Rotate-half RoPE in double at position pos.
void RefRope(std::vector<double>& x, double pos, int D, double scale, double theta) {
  const int half = D / 2;
  for (int d = 0; d < half; ++d) {
    const double freq = std::pow(theta, -2.0 * d / D) / scale;
    const double c = std::cos(pos * freq), s = std::sin(pos * freq);
    const double a = x[d], bb = x[d + half];
    x[d] = a * c - bb * s;
    x[d + half] = bb * c + a * s;
  }
}

// out [T, Hqo, D] and lse [T, Hqo] (base 2) for the live tokens.
void Reference(const AttnCase& c, const Batch& b, const Cache& cache, const Tensor& q,
               std::vector<double>& out, std::vector<double>& lse) {
  const int G = c.Hqo / c.Hkv, D = c.D, S = c.page_size;
  const double sm_scale = 1.0 / std::sqrt(double(D));
  const double inf = std::numeric_limits<double>::infinity();
  for (size_t r = 0; r < b.qo_len.size(); ++r) {
    const int qo = b.qo_len[r], kv = b.kv_len[r];
    // Keys of the request once per kv head, rotated if needed; invalid pages flagged.
    for (int hk = 0; hk < c.Hkv; ++hk) {
      std::vector<std::vector<double>> K(kv, std::vector<double>(D)), V = K;
      std::vector<bool> valid(kv);
      for (int j = 0; j < kv; ++j) {
        const int32_t page = b.kv_indices[b.kv_indptr[r] + j / S];
        valid[j] = page >= 0 && page < cache.P;
        if (!valid[j]) continue;
        for (int d = 0; d < D; ++d) {
          K[j][d] = cache.Get(0, page, j % S, hk, d);
          V[j][d] = cache.Get(1, page, j % S, hk, d);
        }
        if (c.pos == PosEncoding::kRopeLlama) RefRope(K[j], j, D, c.rope_scale, c.rope_theta);
      }
      for (int i = 0; i < qo; ++i) {
        const int64_t t = b.qo_indptr[r] + i;
        const int64_t qpos = int64_t(kv) - qo + i;
        for (int g = 0; g < G; ++g) {
          const int h = hk * G + g;
          std::vector<double> qv(D);
          for (int d = 0; d < D; ++d) qv[d] = q.Get((t * c.Hqo + h) * D + d);
          if (c.pos == PosEncoding::kRopeLlama) RefRope(qv, double(qpos), D, c.rope_scale, c.rope_theta);
          std::vector<double> logit;
          std::vector<int> keys;
          for (int j = 0; j < kv; ++j) {
            if (!valid[j] || (c.causal && j > qpos)) continue;
            double s = 0;
            for (int d = 0; d < D; ++d) s += qv[d] * K[j][d];
            s *= sm_scale;
            if (c.pos == PosEncoding::kAlibi) s += RefAlibiSlope(h, c.Hqo) * double(j - qpos);
            logit.push_back(s);
            keys.push_back(j);
          }
          double* o = &out[(t * c.Hqo + h) * D];
          std::fill(o, o + D, 0.0);
          if (keys.empty()) {
            lse[t * c.Hqo + h] = -inf;
            continue;
          }
          const double mx = *std::max_element(logit.begin(), logit.end());
          double sum = 0;
          for (size_t n = 0; n < keys.size(); ++n) {
            const double w = std::exp(logit[n] - mx);
            sum += w;
            for (int d = 0; d < D; ++d) o[d] += w * V[keys[n]][d];
          }
          for (int d = 0; d < D; ++d) o[d] /= sum;
          lse[t * c.Hqo + h] = (mx + std::log(sum)) / std::log(2.0);
        }
      }
    }
  }
}

struct AttnSetup {
  Batch batch;
  Plan plan;
  Cache cache;
  Tensor q, out;
  std::vector<float> lse, workspace;
  AttentionParams params{};
};

// Fills cache/q at random and wires AttentionParams to the buffers.
void Setup(const AttnCase& c, std::mt19937_64& rng, AttnSetup& s) {
  const int G = c.Hqo / c.Hkv;
  int pages_needed = 0;
  for (int kv : c.kv_lens) pages_needed += (kv + c.page_size - 1) / c.page_size;
  const int num_pages = pages_needed + 4;
  s.batch = MakeBatch(c.qo_lens, c.kv_lens, c.page_size, num_pages, rng);
  // Point some page-table entries outside the cache: their keys must be masked.
  for (int i = 0; i < c.bad_pages && !s.batch.kv_indices.empty(); ++i) {
    const size_t at = size_t(rng() % s.batch.kv_indices.size());
    s.batch.kv_indices[at] = (i % 2 == 0) ? num_pages + int32_t(rng() % 100) : -1 - int32_t(rng() % 5);
  }
  const int num_tokens = s.batch.qo_indptr.back();
  const int q_rows = num_tokens + c.extra_q_rows;
  s.plan = BuildPlan(s.batch, G, q_rows, c.policy);
  s.cache = Cache(c.dtype, c.combined, c.layout, num_pages, c.page_size, c.Hkv, c.D);
  s.cache.k.FillRandom(rng, 1.0f);
  if (!c.combined) s.cache.v.FillRandom(rng, 1.0f);
  s.q = Tensor(c.dtype, int64_t(q_rows) * c.Hqo * c.D);
  s.q.FillRandom(rng, 1.5f);
  s.out = Tensor(c.dtype, s.q.size());
  std::fill(s.out.bytes.begin(), s.out.bytes.end(), 0x7f);  // garbage: every row must be written
  s.lse.assign(size_t(q_rows) * c.Hqo, std::nanf(""));
  const int32_t partial_cap = s.plan.partial_rows + 2;
  s.workspace.assign(size_t(partial_cap) * c.Hqo * (c.D + 1), std::nanf(""));

  AttentionParams& p = s.params;
  p = AttentionParams{};
  p.dtype = c.dtype;
  p.kv_dtype = p.dtype;
  p.q = s.q.data();
  p.out = s.out.data();
  p.lse = s.lse.data();
  p.q_rows = q_rows;
  p.num_qo_heads = c.Hqo;
  p.num_kv_heads = c.Hkv;
  p.head_dim = c.D;
  p.group_size = G;
  p.kv = s.cache.Kv();
  const PlanLayout& L = s.plan.layout;
  const int32_t* base = s.plan.buf.data();
  p.layout = L;
  p.work = base + L.work();
  p.meta = base + L.meta();
  p.bin_indptr = base + L.bin_indptr();
  p.qo_indptr = base + L.qo_indptr();
  p.kv_indptr = base + L.kv_indptr();
  p.kv_last_page_len = base + L.kv_last_page_len();
  p.merge_indptr = base + L.merge_indptr();
  p.kv_indices = base + L.kv_indices();
  p.partial_o = s.workspace.data();
  p.partial_lse = s.workspace.data() + size_t(partial_cap) * c.Hqo * c.D;
  p.caps = Capacities{p.layout.batch_cap, p.layout.token_cap, p.layout.page_cap,
                      p.layout.work_cap, partial_cap, p.layout.bin_cap};
  p.tile_rows = c.policy.tile_rows;
  p.causal = c.causal;
  p.pos_encoding = c.pos;
  p.sm_scale = float(1.0 / std::sqrt(double(c.D)));
  p.rope_scale = c.rope_scale;
  p.rope_theta = c.rope_theta;
}

// Output tolerance: the reference sees the same quantised inputs, so what remains is
// float32 accumulation plus one rounding of the output to the storage type.
double OutTolerance(DType t) {
  return t == DType::kF32 ? 2e-5 : t == DType::kF16 ? 1.2e-3 : 8e-3;
}

void RunAttnCase(const AttnCase& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  AttnSetup s;
  Setup(c, rng, s);
  const char* err = cpu::RunAttentionCpu(s.params);
  Expect(err == nullptr, c.name + ": RunAttentionCpu returned " + (err ? err : ""));
  const int q_rows = s.params.q_rows, num_tokens = s.batch.qo_indptr.back();
  std::vector<double> ref_out(size_t(q_rows) * c.Hqo * c.D, 0.0), ref_lse(size_t(q_rows) * c.Hqo);
  Reference(c, s.batch, s.cache, s.q, ref_out, ref_lse);

  double max_out = 0, max_lse = 0;
  int bad_inf = 0, nans = 0, pad_bad = 0, empty_rows = 0;
  for (int t = 0; t < q_rows; ++t)
    for (int h = 0; h < c.Hqo; ++h) {
      const float got_lse = s.lse[size_t(t) * c.Hqo + h];
      if (std::isnan(got_lse)) ++nans;
      for (int d = 0; d < c.D; ++d)
        if (std::isnan(s.out.Get((int64_t(t) * c.Hqo + h) * c.D + d))) ++nans;
      if (t >= num_tokens) {
        for (int d = 0; d < c.D; ++d)
          if (s.out.Get((int64_t(t) * c.Hqo + h) * c.D + d) != 0.0) ++pad_bad;
        if (!(std::isinf(got_lse) && got_lse < 0)) ++pad_bad;
        continue;
      }
      const double want_lse = ref_lse[size_t(t) * c.Hqo + h];
      if (std::isinf(want_lse)) {
        ++empty_rows;
        if (!(std::isinf(got_lse) && got_lse < 0)) ++bad_inf;
      } else {
        max_lse = std::max(max_lse, std::fabs(double(got_lse) - want_lse));
      }
      for (int d = 0; d < c.D; ++d) {
        const size_t i = (size_t(t) * c.Hqo + h) * c.D + d;
        max_out = std::max(max_out, std::fabs(s.out.Get(int64_t(i)) - ref_out[i]));
      }
    }
  std::printf("  %-44s %-4s max|out err| %.2e  max|lse err| %.2e  (%d empty rows, %d items)\n",
              c.name.c_str(), DTypeName(c.dtype), max_out, max_lse, empty_rows, s.plan.num_work);
  Expect(nans == 0, c.name + ": NaN in out/lse: " + std::to_string(nans));
  Expect(pad_bad == 0, c.name + ": padding rows not zero / -inf: " + std::to_string(pad_bad));
  Expect(bad_inf == 0, c.name + ": rows without keys must have lse -inf: " + std::to_string(bad_inf));
  Expect(max_out <= OutTolerance(c.dtype), c.name + ": out error too large");
  Expect(max_lse <= 2e-4, c.name + ": lse error too large");
}

void TestAttention() {
  std::printf("attention vs double-precision reference\n");
  std::vector<AttnCase> cases;
  {
    AttnCase c;
    c.name = "decode nhd combined p16 split+empty req";
    c.dtype = DType::kBF16;
    c.Hqo = 32, c.Hkv = 8, c.D = 128, c.page_size = 16;
    c.qo_lens = {1, 1, 1, 1, 1, 1};
    c.kv_lens = {1, 17, 100, 0, 64, 300};
    c.policy.tile_rows = 16, c.policy.kv_chunk = 64;
    cases.push_back(c);
  }
  {
    AttnCase c;
    c.name = "decode hnd pair p1 G=8>tile_rows split";
    c.dtype = DType::kF16;
    c.layout = KvLayout::kHND, c.combined = false;
    c.Hqo = 16, c.Hkv = 2, c.D = 64, c.page_size = 1;
    c.qo_lens = {1, 1, 1, 1};
    c.kv_lens = {5, 40, 1, 23};
    c.policy.tile_rows = 4, c.policy.kv_chunk = 7, c.policy.padding_between = true;
    cases.push_back(c);
  }
  {
    AttnCase c;
    c.name = "prefill causal nhd pair p16 qo<kv split";
    c.dtype = DType::kF32;
    c.combined = false;
    c.Hqo = 8, c.Hkv = 2, c.D = 128, c.page_size = 16;
    c.qo_lens = {5, 33, 1, 0, 17, 3};
    c.kv_lens = {20, 33, 9, 4, 40, 0};
    c.causal = true;
    c.policy.tile_rows = 64, c.policy.kv_chunk = 16;
    cases.push_back(c);
  }
  {
    AttnCase c;
    c.name = "prefill causal hnd combined p1 no split";
    c.dtype = DType::kBF16;
    c.layout = KvLayout::kHND;
    c.Hqo = 4, c.Hkv = 4, c.D = 64, c.page_size = 1;
    c.qo_lens = {7, 130, 2};
    c.kv_lens = {7, 150, 9};
    c.causal = true;
    c.policy.tile_rows = 32;
    cases.push_back(c);
  }
  {
    // Items of 256 packed rows: one kv head per task, rows in passes of 128.
    AttnCase c;
    c.name = "prefill causal nhd tile_rows 256 G=2";
    c.dtype = DType::kBF16;
    c.Hqo = 4, c.Hkv = 2, c.D = 64, c.page_size = 16;
    c.qo_lens = {150, 7};
    c.kv_lens = {170, 7};
    c.causal = true;
    c.policy.tile_rows = 256, c.policy.kv_chunk = 100;
    cases.push_back(c);
  }
  {
    // Head dim not a multiple of 8: the widened path with zero padding, no RoPE.
    AttnCase c;
    c.name = "decode nhd pair D=20 (widened path)";
    c.dtype = DType::kF16;
    c.combined = false;
    c.Hqo = 6, c.Hkv = 3, c.D = 20, c.page_size = 8;
    c.qo_lens = {1, 1, 2};
    c.kv_lens = {33, 8, 19};
    c.causal = true;
    c.policy.tile_rows = 16, c.policy.kv_chunk = 16;
    cases.push_back(c);
  }
  {
    AttnCase c;
    c.name = "prefill non-causal hnd combined p8 D=256";
    c.dtype = DType::kBF16;
    c.layout = KvLayout::kHND;
    c.Hqo = 4, c.Hkv = 4, c.D = 256, c.page_size = 8;
    c.qo_lens = {9, 3};
    c.kv_lens = {30, 3};
    c.policy.tile_rows = 8, c.policy.kv_chunk = 12;
    cases.push_back(c);
  }
  {
    AttnCase c;
    c.name = "rope prefill causal nhd p16 scale2";
    c.dtype = DType::kF32;
    c.Hqo = 8, c.Hkv = 2, c.D = 128, c.page_size = 16;
    c.qo_lens = {6, 1, 20};
    c.kv_lens = {50, 33, 20};
    c.causal = true;
    c.pos = PosEncoding::kRopeLlama, c.rope_scale = 2.0f, c.rope_theta = 1e4f;
    c.policy.tile_rows = 16, c.policy.kv_chunk = 24;
    cases.push_back(c);
  }
  {
    AttnCase c;
    c.name = "rope decode hnd pair p16 split theta5e5";
    c.dtype = DType::kBF16;
    c.layout = KvLayout::kHND, c.combined = false;
    c.Hqo = 16, c.Hkv = 4, c.D = 64, c.page_size = 16;
    c.qo_lens = {1, 1, 1};
    c.kv_lens = {700, 16, 129};
    c.pos = PosEncoding::kRopeLlama, c.rope_theta = 5e5f;
    c.policy.tile_rows = 16, c.policy.kv_chunk = 128;
    cases.push_back(c);
  }
  {
    AttnCase c;
    c.name = "alibi prefill causal hnd 12 heads G=3 D=72";
    c.dtype = DType::kF16;
    c.layout = KvLayout::kHND;
    c.Hqo = 12, c.Hkv = 4, c.D = 72, c.page_size = 4;
    c.qo_lens = {11, 4, 1};
    c.kv_lens = {25, 4, 60};
    c.causal = true;
    c.pos = PosEncoding::kAlibi;
    c.policy.tile_rows = 16, c.policy.kv_chunk = 10;
    cases.push_back(c);
  }
  {
    AttnCase c;
    c.name = "alibi decode nhd combined 8 heads split";
    c.dtype = DType::kBF16;
    c.Hqo = 8, c.Hkv = 8, c.D = 128, c.page_size = 16;
    c.qo_lens = {1, 1};
    c.kv_lens = {200, 35};
    c.pos = PosEncoding::kAlibi;
    c.policy.tile_rows = 1, c.policy.kv_chunk = 50;
    cases.push_back(c);
  }
  {
    AttnCase c;
    c.name = "out-of-range page ids masked";
    c.dtype = DType::kF32;
    c.Hqo = 8, c.Hkv = 2, c.D = 64, c.page_size = 4;
    c.qo_lens = {3, 1, 2};
    c.kv_lens = {30, 17, 2};
    c.causal = true;
    c.bad_pages = 5;
    c.policy.tile_rows = 8, c.policy.kv_chunk = 8;
    cases.push_back(c);
  }
  {
    AttnCase c;
    c.name = "all requests empty + padding rows";
    c.dtype = DType::kF16;
    c.Hqo = 4, c.Hkv = 1, c.D = 32, c.page_size = 16;
    c.qo_lens = {1, 2};
    c.kv_lens = {0, 0};
    c.extra_q_rows = 5;
    cases.push_back(c);
  }
  {
    AttnCase c;
    c.name = "decode f32 D=256 G=4 p16 long";
    c.dtype = DType::kF32;
    c.Hqo = 8, c.Hkv = 2, c.D = 256, c.page_size = 16;
    c.qo_lens = {1, 1, 1};
    c.kv_lens = {1000, 999, 1};
    c.policy.tile_rows = 16, c.policy.kv_chunk = 256;
    cases.push_back(c);
  }
  uint64_t seed = 1;
  for (const AttnCase& c : cases) RunAttnCase(c, seed++);
}

// Plans full of nonsense (negative, huge and out-of-range values in every section)
// must neither crash nor touch memory outside the buffers; run under
// -fsanitize=address,undefined to check the latter.
void TestGarbagePlans() {
  std::printf("garbage plans\n");
  AttnCase c;
  c.dtype = DType::kBF16;
  c.Hqo = 4, c.Hkv = 2, c.D = 16, c.page_size = 4;
  c.qo_lens = {2, 3};
  c.kv_lens = {9, 14};
  c.causal = true;
  c.policy.tile_rows = 4, c.policy.kv_chunk = 5;
  std::mt19937_64 rng(11);
  AttnSetup s;
  Setup(c, rng, s);
  const std::vector<int32_t> clean = s.plan.buf;
  const int32_t extremes[] = {std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max(),
                              -1, 0, 1 << 30, -(1 << 30)};
  int errors = 0;
  for (int trial = 0; trial < 300; ++trial) {
    s.plan.buf = clean;
    const int edits = 1 + int(rng() % 12);
    for (int e = 0; e < edits; ++e) {
      const size_t at = size_t(rng() % s.plan.buf.size());
      s.plan.buf[at] = (rng() % 3 == 0) ? extremes[rng() % 6] : int32_t(rng() % 40) - 5;
    }
    for (int pos : {0, 1, 2, 3, 4})  // the flags of pos_encoding / causal vary too
      if (trial % 5 == pos) {
        s.params.pos_encoding = PosEncoding(pos % 3);
        s.params.causal = pos % 2 == 0;
      }
    if (cpu::RunAttentionCpu(s.params) != nullptr) ++errors;
  }
  Expect(errors == 0, "garbage plans must run (they only mask), got errors: " + std::to_string(errors));
  std::printf("  300 corrupted plans ran without error\n");
}

// Invalid parameters come back as messages, not crashes.
void TestRejects() {
  std::printf("parameter checks\n");
  AttnCase c;
  c.dtype = DType::kF32;
  c.Hqo = 4, c.Hkv = 2, c.D = 16, c.page_size = 4;
  c.qo_lens = {1};
  c.kv_lens = {5};
  std::mt19937_64 rng(3);
  AttnSetup s;
  Setup(c, rng, s);
  AttentionParams p = s.params;
  p.dtype = DType(7);
  Expect(cpu::RunAttentionCpu(p) != nullptr, "bad dtype rejected");
  p = s.params;
  p.group_size = 3;
  Expect(cpu::RunAttentionCpu(p) != nullptr, "inconsistent group size rejected");
  p = s.params;
  p.pos_encoding = PosEncoding(9);
  Expect(cpu::RunAttentionCpu(p) != nullptr, "bad pos_encoding rejected");
  p = s.params;
  p.q_rows = p.layout.token_cap + 1;
  Expect(cpu::RunAttentionCpu(p) != nullptr, "q_rows beyond token_cap rejected");

  AppendParams a{};
  a.dtype = DType(5);
  Expect(cpu::RunAppendCpu(a) != nullptr, "append: bad dtype rejected");
  std::printf("  ok\n");
}

// ---------------------------------------------------------------------------------------
// Append.

struct AppendCase {
  std::string name;
  DType dtype;
  KvLayout layout;
  bool combined;
  int H, D, page_size;
};

void RunAppendCase(const AppendCase& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  // Requests after the append: lengths; rows appended = the last `added` positions.
  const std::vector<int> kv_after = {5, 16, 33, 1, 0};
  const std::vector<int> added = {2, 16, 3, 1, 0};
  int pages = 0;
  for (int kv : kv_after) pages += (kv + c.page_size - 1) / c.page_size;
  const int num_pages = pages + 3;
  Batch b = MakeBatch(std::vector<int>(kv_after.size(), 0), kv_after, c.page_size, num_pages, rng);
  // Request 3's only page is pointed outside the cache: its row must be skipped.
  b.kv_indices[b.kv_indptr[3]] = num_pages + 2;

  std::vector<int32_t> bi, pos;
  for (size_t r = 0; r < kv_after.size(); ++r)
    for (int j = kv_after[r] - added[r]; j < kv_after[r]; ++j) {
      bi.push_back(int32_t(r));
      pos.push_back(j);
    }
  // Rows that must be skipped: no such request, negative position, a position beyond
  // the pages the request owns (would land in the next request's page).
  bi.push_back(-1), pos.push_back(0);
  bi.push_back(int32_t(kv_after.size())), pos.push_back(0);
  bi.push_back(0), pos.push_back(-3);
  bi.push_back(0), pos.push_back(((kv_after[0] + c.page_size - 1) / c.page_size) * c.page_size);
  bi.push_back(4), pos.push_back(0);
  // The same slot twice: the later row wins.
  bi.push_back(2), pos.push_back(31);
  const int N = int(bi.size());

  Cache cache(c.dtype, c.combined, c.layout, num_pages, c.page_size, c.H, c.D);
  cache.k.FillRandom(rng, 1.0f);
  if (!c.combined) cache.v.FillRandom(rng, 1.0f);
  Tensor new_k(c.dtype, int64_t(N) * c.H * c.D), new_v(c.dtype, int64_t(N) * c.H * c.D);
  new_k.FillRandom(rng, 2.0f);
  new_v.FillRandom(rng, 2.0f);

  // Expected cache: the naive scatter with this test's own index arithmetic.
  Cache want = cache;
  for (int i = 0; i < N; ++i) {
    const int r = bi[i], p = pos[i];
    if (r < 0 || r >= int(kv_after.size()) || p < 0) continue;
    const int slot = b.kv_indptr[r] + p / c.page_size;
    if (slot >= b.kv_indptr[r + 1]) continue;
    const int page = b.kv_indices[slot];
    if (page < 0 || page >= num_pages) continue;
    for (int h = 0; h < c.H; ++h)
      for (int d = 0; d < c.D; ++d) {
        const int64_t src = (int64_t(i) * c.H + h) * c.D + d;
        want.Part(0).Set(want.Index(0, page, p % c.page_size, h, d), float(new_k.Get(src)));
        want.Part(1).Set(want.Index(1, page, p % c.page_size, h, d), float(new_v.Get(src)));
      }
  }

  AppendParams a{};
  a.dtype = c.dtype;
  a.new_k = new_k.data();
  a.new_v = new_v.data();
  a.batch_indices = bi.data();
  a.positions = pos.data();
  a.kv_indices = b.kv_indices.data();
  a.kv_indptr = b.kv_indptr.data();
  a.num_rows = N;
  a.num_indices = int32_t(b.kv_indices.size());
  a.batch = int32_t(kv_after.size());
  a.kv = cache.Kv();
  a.k = const_cast<void*>(a.kv.k);
  a.v = const_cast<void*>(a.kv.v);
  const char* err = cpu::RunAppendCpu(a);
  Expect(err == nullptr, c.name + ": RunAppendCpu returned an error");
  const bool same = cache.k.bytes == want.k.bytes && cache.v.bytes == want.v.bytes;
  std::printf("  %-44s %-4s %s\n", c.name.c_str(), DTypeName(c.dtype),
              same ? "cache bit-identical to the naive scatter" : "MISMATCH");
  Expect(same, c.name + ": cache differs from the naive scatter");
}

void TestAppend() {
  std::printf("append vs naive scatter\n");
  const AppendCase cases[] = {
      {"append combined nhd p4", DType::kBF16, KvLayout::kNHD, true, 4, 64, 4},
      {"append combined hnd p16", DType::kF16, KvLayout::kHND, true, 2, 128, 16},
      {"append pair nhd p1", DType::kF32, KvLayout::kNHD, false, 3, 32, 1},
      {"append pair hnd p8", DType::kBF16, KvLayout::kHND, false, 8, 128, 8},
  };
  uint64_t seed = 100;
  for (const AppendCase& c : cases) RunAppendCase(c, seed++);
}

// ---------------------------------------------------------------------------------------
// Benchmark: 64 requests x 2048 keys, 32/8 heads, D=128, bf16, page 16, random pages.

struct Timing {
  double wall_min, wall_median, cpu_median;  // seconds
};

// Wall time, and the CPU time of all threads (less sensitive to a busy machine).
Timing TimeCalls(const AttentionParams& params, int reps) {
  std::vector<double> wall, cpu_time;
  for (int rep = 0; rep <= reps; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    const std::clock_t c0 = std::clock();
    const char* err = cpu::RunAttentionCpu(params);
    const std::clock_t c1 = std::clock();
    const auto t1 = std::chrono::steady_clock::now();
    Expect(err == nullptr, "benchmark call failed");
    if (rep == 0) continue;  // warm-up
    wall.push_back(std::chrono::duration<double>(t1 - t0).count());
    cpu_time.push_back(double(c1 - c0) / CLOCKS_PER_SEC);
  }
  std::sort(wall.begin(), wall.end());
  std::sort(cpu_time.begin(), cpu_time.end());
  return Timing{wall.front(), wall[wall.size() / 2], cpu_time[cpu_time.size() / 2]};
}

void Benchmark(bool check) {
  std::printf("benchmark: decode 64 x 2048, 32 q heads / 8 kv heads, D=128, bf16, page 16\n");
  struct Variant {
    const char* name;
    KvLayout layout;
    int kv_chunk;
  };
  const Variant variants[] = {{"NHD, one item per request", KvLayout::kNHD, 0},
                              {"HND, one item per request", KvLayout::kHND, 0},
                              {"NHD, split in 4 chunks + merge", KvLayout::kNHD, 512}};
  for (const Variant& v : variants) {
    AttnCase c;
    c.name = v.name;
    c.dtype = DType::kBF16;
    c.layout = v.layout;
    c.Hqo = 32, c.Hkv = 8, c.D = 128, c.page_size = 16;
    c.qo_lens.assign(64, 1);
    c.kv_lens.assign(64, 2048);
    c.policy.tile_rows = 16, c.policy.kv_chunk = v.kv_chunk;
    c.extra_q_rows = 0;
    std::mt19937_64 rng(42);
    AttnSetup s;
    Setup(c, rng, s);
    const Timing t = TimeCalls(s.params, 10);
    const double kv_bytes = 64.0 * 2048 * 8 * 128 * 2 * 2;
    std::printf("  %-32s wall min %.1f ms, median %.1f ms (%.1f GB/s of K+V); cpu %.1f ms\n",
                v.name, t.wall_min * 1e3, t.wall_median * 1e3, kv_bytes / t.wall_min / 1e9,
                t.cpu_median * 1e3);
    if (check && v.kv_chunk == 0 && v.layout == KvLayout::kNHD) {
      // Full-size correctness on the first variant.
      const int q_rows = s.params.q_rows;
      std::vector<double> ref_out(size_t(q_rows) * c.Hqo * c.D), ref_lse(size_t(q_rows) * c.Hqo);
      Reference(c, s.batch, s.cache, s.q, ref_out, ref_lse);
      double max_out = 0, max_lse = 0;
      for (size_t i = 0; i < ref_out.size(); ++i)
        max_out = std::max(max_out, std::fabs(s.out.Get(int64_t(i)) - ref_out[i]));
      for (size_t i = 0; i < ref_lse.size(); ++i)
        max_lse = std::max(max_lse, std::fabs(double(s.lse[i]) - ref_lse[i]));
      std::printf("  %-34s max|out err| %.2e  max|lse err| %.2e\n", "  (checked vs reference)",
                  max_out, max_lse);
      Expect(max_out <= OutTolerance(c.dtype) && max_lse <= 2e-4, "benchmark output wrong");
    }
  }

  // For scale: a causal prefill, 4 requests of 512 tokens, one 128-row tile per item.
  AttnCase c;
  c.dtype = DType::kBF16;
  c.Hqo = 32, c.Hkv = 8, c.D = 128, c.page_size = 16;
  c.qo_lens.assign(4, 512);
  c.kv_lens.assign(4, 512);
  c.causal = true;
  c.policy.tile_rows = 128;
  c.extra_q_rows = 0;
  std::mt19937_64 rng(43);
  AttnSetup s;
  Setup(c, rng, s);
  const Timing t = TimeCalls(s.params, 3);
  const double flops = 4.0 * 4 * (512.0 * 513 / 2) * 32 * 128;
  std::printf("benchmark: causal prefill 4 x 512, same heads/dtype: wall min %.1f ms "
              "(%.1f GFLOP/s); cpu %.1f ms\n",
              t.wall_min * 1e3, flops / t.wall_min / 1e9, t.cpu_median * 1e3);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "--bench") {
    Benchmark(/*check=*/false);
    return g_failures ? 1 : 0;
  }
  TestConversions();
  TestAttention();
  TestGarbagePlans();
  TestRejects();
  TestAppend();
  if (mode != "--quick") Benchmark(/*check=*/true);
  if (g_failures) {
    std::printf("%d FAILURE(S)\n", g_failures);
    return 1;
  }
  std::printf("all passed\n");
  return 0;
}
