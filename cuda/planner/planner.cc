// Host planner. One pass validates the batch, one builds the query tiles, one picks
// the split-KV chunk length, one writes the work items and merge offsets. Everything
// is sized by the capacities, so equal capacities always give equal buffer shapes.
//
// Bounds behind DeriveCapacities: with T tiles and a chunk length c >= total_keys /
// target, the items number sum_t max(1, ceil(e_t / c)) <= T + total_keys / c <= T +
// target; a split tile (e_t > c) has ceil(e_t / c) <= 2 e_t / c chunks, so split tiles
// hold at most 2 target chunks, each of at most tile_tokens query tokens.
#include "planner.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace jax_pagedattn {
namespace {

// Key-range granularity of a chunk: a multiple of the kernels' key tile, so only the
// last tile of a request is ragged.
constexpr int32_t kChunkAlign = 64;
// Below this many keys a chunk's partial write and merge cost more than the
// parallelism gained.
constexpr int32_t kMinChunk = 256;
// CTAs per SM the planner aims to fill when it splits.
constexpr int32_t kCtasPerSm = 2;

[[noreturn]] void Fail(const std::string& msg) { throw PlanError(msg); }

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

void CheckIndptr(const int32_t* p, int64_t len, int64_t want_len, const char* name) {
  if (len != want_len)
    Fail(std::string(name) + " must have batch_size + 1 = " + std::to_string(want_len) +
         " entries, got " + std::to_string(len));
  if (p[0] != 0) Fail(std::string(name) + "[0] must be 0, got " + std::to_string(p[0]));
  for (int64_t i = 0; i + 1 < len; ++i)
    if (p[i + 1] < p[i])
      Fail(std::string(name) + " must be non-decreasing, but " + name + "[" +
           std::to_string(i + 1) + "] = " + std::to_string(p[i + 1]) + " < " + name + "[" +
           std::to_string(i) + "] = " + std::to_string(p[i]));
}

struct Tile {
  int32_t request, row_begin, row_end, extent, first_token, num_tokens;
};

}  // namespace

int32_t TargetItems(int32_t num_sms, int32_t num_kv_heads) {
  return int32_t(CeilDiv(int64_t(std::max(num_sms, 1)) * kCtasPerSm, std::max(num_kv_heads, 1)));
}

static int32_t TileTokens(int32_t group_size, int32_t tile_rows) {
  return group_size <= tile_rows ? tile_rows / group_size : 1;
}

Capacities DeriveCapacities(int32_t batch_cap, int32_t token_cap, int32_t page_cap,
                            int32_t group_size, int32_t tile_rows, int32_t num_kv_heads,
                            int32_t num_sms, int32_t partial_rows_limit) {
  const int64_t tt = TileTokens(group_size, tile_rows);
  int64_t tiles = group_size <= tile_rows
                      ? std::min<int64_t>(token_cap, CeilDiv(token_cap, tt) + batch_cap)
                      : int64_t(token_cap) * CeilDiv(group_size, tile_rows);
  // Requests with queries but no keys still get one item each; they are counted above.
  const int64_t target = TargetItems(num_sms, num_kv_heads);
  Capacities c{};
  c.batch = batch_cap;
  c.tokens = token_cap;
  c.pages = page_cap;
  c.work = int32_t(std::max<int64_t>(1, tiles + target));
  int64_t rows = 2 * target * tt;
  if (partial_rows_limit >= 0) rows = std::min<int64_t>(rows, partial_rows_limit);
  c.partial_rows = int32_t(std::max<int64_t>(1, rows));
  return c;
}

void PlanBatch(const PlanRequest& r, int32_t* out) {
  const Capacities& caps = r.caps;
  const PlanLayout L{caps.batch, caps.tokens, caps.pages, caps.work};
  if (r.page_size < 1) Fail("page_size must be >= 1");
  if (r.group_size < 1 || r.tile_rows < 1) Fail("group_size and tile_rows must be >= 1");

  // ---- validation (DESIGN.md §3) ----
  const int64_t batch = r.kv_last_page_len_len;
  if (batch > caps.batch)
    Fail("batch of " + std::to_string(batch) + " requests exceeds max_batch_size = " +
         std::to_string(caps.batch) + " fixed by the first plan; create the wrapper with a larger max_batch_size");
  CheckIndptr(r.kv_indptr, r.kv_indptr_len, batch + 1, r.name_kv_indptr);
  if (r.kv_indptr[batch] != r.kv_indices_len)
    Fail(std::string(r.name_kv_indptr) + "[-1] = " + std::to_string(r.kv_indptr[batch]) +
         " must equal len(" + r.name_kv_indices + ") = " + std::to_string(r.kv_indices_len));
  if (r.kv_indices_len > caps.pages)
    Fail(std::string(r.name_kv_indices) + " has " + std::to_string(r.kv_indices_len) +
         " pages, more than max_num_pages = " + std::to_string(caps.pages));
  for (int64_t i = 0; i < r.kv_indices_len; ++i) {
    const int32_t p = r.kv_indices[i];
    if (p < 0 || (r.num_pages >= 0 && p >= r.num_pages))
      Fail(std::string(r.name_kv_indices) + "[" + std::to_string(i) + "] = " + std::to_string(p) +
           " is not a page of the cache (0 <= page < " +
           (r.num_pages >= 0 ? std::to_string(r.num_pages) : std::string("num_pages")) + ")");
  }
  for (int64_t b = 0; b < batch; ++b) {
    const bool has_pages = r.kv_indptr[b + 1] > r.kv_indptr[b];
    const int32_t l = r.kv_last_page_len[b];
    if (has_pages ? (l < 1 || l > r.page_size) : (l < 0 || l > r.page_size))
      Fail(std::string(r.name_kv_last_page_len) + "[" + std::to_string(b) + "] = " +
           std::to_string(l) + " must be in [1, page_size = " + std::to_string(r.page_size) +
           "] for a request with pages");
  }
  int64_t num_tokens = batch;
  if (r.qo_indptr) {
    CheckIndptr(r.qo_indptr, r.qo_indptr_len, batch + 1, r.name_qo_indptr);
    num_tokens = r.qo_indptr[batch];
  }
  if (num_tokens > caps.tokens)
    Fail(std::string(r.name_qo_indptr) + "[-1] = " + std::to_string(num_tokens) +
         " query tokens exceed max_num_tokens = " + std::to_string(caps.tokens));

  // ---- query tiles ----
  auto qo_begin = [&](int64_t b) -> int32_t { return r.qo_indptr ? r.qo_indptr[b] : int32_t(b); };
  auto kv_len_of = [&](int64_t b) -> int32_t {
    const int32_t pages = r.kv_indptr[b + 1] - r.kv_indptr[b];
    return pages == 0 ? 0 : (pages - 1) * r.page_size + r.kv_last_page_len[b];
  };
  const int32_t G = r.group_size;
  const int32_t tt = TileTokens(G, r.tile_rows);
  std::vector<Tile> tiles;
  tiles.reserve(size_t(std::min<int64_t>(caps.work, num_tokens + batch)));
  int64_t total_keys = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t qo_len = qo_begin(b + 1) - qo_begin(b);
    const int32_t kv_len = kv_len_of(b);
    auto extent_for_last = [&](int32_t last_token) -> int32_t {
      if (!r.causal) return kv_len;
      const int64_t e = int64_t(kv_len) - qo_len + last_token + 1;
      return int32_t(std::clamp<int64_t>(e, 0, kv_len));
    };
    if (G <= r.tile_rows) {
      for (int32_t t0 = 0; t0 < qo_len; t0 += tt) {
        const int32_t t1 = std::min(qo_len, t0 + tt);
        tiles.push_back({int32_t(b), t0 * G, t1 * G, extent_for_last(t1 - 1), t0, t1 - t0});
        total_keys += tiles.back().extent;
      }
    } else {
      for (int32_t t = 0; t < qo_len; ++t)
        for (int32_t c = 0; c < G; c += r.tile_rows) {
          tiles.push_back({int32_t(b), t * G + c, t * G + std::min(G, c + r.tile_rows),
                           extent_for_last(t), t, 1});
          total_keys += tiles.back().extent;
        }
    }
  }

  // ---- chunk length: aim at TargetItems items of equal key count ----
  const int64_t target = TargetItems(r.num_sms, r.num_kv_heads);
  int64_t chunk = std::max<int64_t>(kMinChunk, CeilDiv(std::max<int64_t>(total_keys, 1), target));
  chunk = CeilDiv(chunk, kChunkAlign) * kChunkAlign;
  auto count = [&](int64_t c, int64_t* items, int64_t* partial_rows) {
    *items = 0;
    *partial_rows = 0;
    for (const Tile& t : tiles) {
      const int64_t n = std::max<int64_t>(1, CeilDiv(t.extent, c));
      *items += n;
      // Heads of one token split over several tiles share the token's partial rows.
      if (n > 1 && t.row_begin % G == 0) *partial_rows += n * t.num_tokens;
    }
  };
  int64_t items = 0, partial_rows = 0;
  count(chunk, &items, &partial_rows);
  while (items > caps.work || partial_rows > caps.partial_rows) {
    if (int64_t(tiles.size()) > caps.work)
      Fail("batch needs " + std::to_string(tiles.size()) + " query tiles, more than the " +
           std::to_string(caps.work) + " work items the capacities allow (max_num_tokens / max_batch_size)");
    chunk *= 2;
    count(chunk, &items, &partial_rows);
  }

  // ---- write the buffer ----
  std::memset(out, 0, sizeof(int32_t) * size_t(L.size()));
  int32_t* work = out + L.work();
  int32_t* merge = out + L.merge_indptr();
  // Merge offsets per token: n chunks of its tile when split, else none.
  for (const Tile& t : tiles) {
    const int64_t n = std::max<int64_t>(1, CeilDiv(t.extent, chunk));
    if (n > 1 && t.row_begin % G == 0)
      for (int32_t k = 0; k < t.num_tokens; ++k) merge[qo_begin(t.request) + t.first_token + k + 1] = int32_t(n);
  }
  for (int64_t t = 0; t < caps.tokens; ++t) merge[t + 1] += merge[t];

  // Long items first: the hardware hands out CTAs roughly in order, so this is a
  // longest-processing-time-first schedule.
  std::vector<int32_t> order(tiles.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int32_t(i);
  auto cost = [&](int32_t i) { return std::min<int64_t>(tiles[i].extent, chunk); };
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return cost(a) > cost(b); });

  int64_t w = 0;
  for (int32_t i : order) {
    const Tile& t = tiles[i];
    const int64_t n = std::max<int64_t>(1, CeilDiv(t.extent, chunk));
    const int32_t qo_len = qo_begin(t.request + 1) - qo_begin(t.request);
    const int32_t kv_len = kv_len_of(t.request);
    for (int64_t j = 0; j < n; ++j) {
      int32_t* it = work + w * kWorkFields;
      it[kWorkRequest] = t.request;
      it[kWorkRowBegin] = t.row_begin;
      it[kWorkRowEnd] = t.row_end;
      it[kWorkKvBegin] = int32_t(std::min<int64_t>(j * chunk, t.extent));
      it[kWorkKvEnd] = int32_t(std::min<int64_t>((j + 1) * chunk, t.extent));
      it[kWorkSplit] = n > 1 ? int32_t(j) : -1;
      it[kWorkQoLen] = qo_len;
      it[kWorkKvLen] = kv_len;
      ++w;
    }
  }
  for (int64_t i = w; i < caps.work; ++i) {
    int32_t* it = work + i * kWorkFields;
    for (int f = 0; f < kWorkFields; ++f) it[f] = -1;
  }

  int32_t* meta = out + L.meta();
  meta[kMetaNumRequests] = int32_t(batch);
  meta[kMetaNumTokens] = int32_t(num_tokens);
  meta[kMetaNumWork] = int32_t(w);
  meta[kMetaNumPartialRows] = merge[caps.tokens];

  int32_t* qo = out + L.qo_indptr();
  int32_t* kvp = out + L.kv_indptr();
  for (int64_t b = 0; b <= caps.batch; ++b) {
    const int64_t s = std::min(b, batch);
    qo[b] = qo_begin(s);
    kvp[b] = r.kv_indptr[s];
  }
  int32_t* lpl = out + L.kv_last_page_len();
  std::memcpy(lpl, r.kv_last_page_len, sizeof(int32_t) * size_t(batch));
  std::memcpy(out + L.kv_indices(), r.kv_indices, sizeof(int32_t) * size_t(r.kv_indices_len));
}

}  // namespace jax_pagedattn
