// Host planner. One pass validates the batch, one cuts the queries into units, one
// deals the units into bins of equal cost (cutting a unit's keys where a bin boundary
// falls inside it) and writes the work items, one writes the merge offsets.
//
// Bins. The GPU runs one CTA per (bin, kv head), all resident at once, each running its
// bin's items in order (plan_layout.h). A launch lasts as long as its costliest bin, so
// the planner gives every bin the same cost, whatever the request lengths: units are
// dealt in request order, bin i ends where the cost dealt reaches (i + 1) / bins of the
// total, and a unit that overruns that boundary by more than a little is cut there (at
// a multiple of the kernels' key tile), the rest going on in the next bin. Boundaries
// are absolute, so a bin closed early or late only moves the next bin's start.
//
// Units. With G = group size <= tile_rows a unit is a query tile of up to tile_rows / G
// whole tokens (one work item per key piece). With G > tile_rows a unit is one token
// with all its G heads, ceil(G / tile_rows) items per key piece, all cut at the same
// keys: partial rows are per token, so every head of a token must split alike.
//
// Equal pieces. When there are no more units than bins, a second plan is priced: every
// unit cut into pieces of at most `chunk` keys, each piece alone in a bin, with the
// smallest chunk for which the pieces fit the bins (FlashInfer's split rule). The
// dealt bins balance cost more finely but mostly hold two items each (the end of one
// request, the start of the next), and an item's start (page ids, the first tile's
// latency) and end (partial write, merge counter) leave its CTA's stream idle for a few
// microseconds; on uniform batches the equal pieces give one item per bin. The planner
// keeps the deal whose costliest bin, counted with kItemCost per item, is cheaper.
//
// Bounds behind DeriveCapacities: each of the B - 1 bin boundaries cuts at most one
// unit once, so pieces <= units + B - 1 and items <= (units + B - 1) * items_per_piece;
// a cut unit has n >= 2 pieces and n - 1 cuts, so cut units hold <= 2 (B - 1) pieces,
// each of at most tile_rows / G tokens, which bounds the partial rows. Equal pieces
// stay inside the same room: at most `bins` pieces in all, and `bins` is first cut down
// to what the work and partial-row capacities leave (PlanBatch, "bins:" below).
#include "planner.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace jax_pagedattn {
namespace {

// Cuts fall on multiples of this many keys of a request: the kernels' key tile, so
// only a request's last tile is ragged.
constexpr int64_t kChunkAlign = 64;
// No piece of a cut unit is shorter than this: below it the partial write and merge
// cost more than the balance gained.
constexpr int64_t kMinPiece = 128;
// A bin is given at least this much cost; fewer bins are used for small batches.
constexpr int64_t kMinBinCost = 256;
// Fixed cost of one work item in keys: the latency of starting an item (page ids, q)
// during which its CTA streams nothing.
constexpr int64_t kItemOverhead = 32;
// What an item costs its bin when the two deals are compared (see the file comment):
// start plus end, about 5 us of one CTA's ~23 keys/us share of an H200's stream at
// head_dim 128 (GQA 8/1, 64 x 4096: 264 dealt bins of ~2 items 48.4 us, FlashInfer's
// 256 one-item CTAs 42.7 us; our equal pieces then 44.9 us against 48.1 dealt).
constexpr int64_t kItemCost = 128;
// Equal pieces start on multiples of this many keys.
constexpr int64_t kPieceAlign = 16;

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

// Query tokens of one unit (see the file comment).
int32_t TileTokens(int32_t group_size, int32_t tile_rows) {
  return group_size <= tile_rows ? tile_rows / group_size : 1;
}

// Work items per key piece of a unit.
int32_t ItemsPerPiece(int32_t group_size, int32_t tile_rows) {
  return group_size <= tile_rows ? 1 : int32_t(CeilDiv(group_size, tile_rows));
}

struct Unit {
  int32_t request, first_token, num_tokens, extent;  // extent: keys the unit sees
};

// JAX_PAGEDATTN_DEAL=bins|equal forces one deal where both are possible (a tuning
// knob for benchmarks, read once per process); anything else prices both.
enum class Deal { kAuto, kBins, kEqual };
Deal ForcedDeal() {
  static const Deal deal = [] {
    const char* v = std::getenv("JAX_PAGEDATTN_DEAL");
    if (v && !std::strcmp(v, "bins")) return Deal::kBins;
    if (v && !std::strcmp(v, "equal")) return Deal::kEqual;
    return Deal::kAuto;
  }();
  return deal;
}

// Pieces of a unit of `extent` keys cut at most `chunk` keys long (one even if empty).
int64_t PiecesOf(int64_t extent, int64_t chunk) {
  return std::max<int64_t>(1, CeilDiv(extent, chunk));
}

// The smallest chunk (a multiple of kPieceAlign, at least kMinPiece) whose pieces fit
// `bins` bins, one piece each; 0 if even uncut units do not fit.
int64_t EqualChunk(const std::vector<Unit>& units, int64_t bins, int64_t total_keys) {
  if (int64_t(units.size()) > bins) return 0;
  int64_t longest = 0;
  for (const Unit& u : units) longest = std::max<int64_t>(longest, u.extent);
  auto fits = [&](int64_t chunk) {
    int64_t n = 0;
    for (const Unit& u : units) n += PiecesOf(u.extent, chunk);
    return n <= bins;
  };
  int64_t hi = std::max(kMinPiece, CeilDiv(longest, kPieceAlign) * kPieceAlign);  // fits
  int64_t lo = std::max(kMinPiece, CeilDiv(CeilDiv(total_keys, bins), kPieceAlign) * kPieceAlign);
  if (lo >= hi) return hi;
  if (fits(lo)) return lo;
  while (hi - lo > kPieceAlign) {  // fits(hi), !fits(lo)
    const int64_t mid = (lo + hi) / 2 / kPieceAlign * kPieceAlign;
    (fits(mid) ? hi : lo) = mid;
  }
  return hi;
}

}  // namespace

Capacities DeriveCapacities(int32_t batch_cap, int32_t token_cap, int32_t page_cap,
                            int32_t group_size, int32_t tile_rows, int32_t num_kv_heads,
                            int32_t num_ctas, int32_t partial_rows_limit) {
  const int64_t tt = TileTokens(group_size, tile_rows);
  const int64_t per_piece = ItemsPerPiece(group_size, tile_rows);
  // Requests with queries but no keys still get one unit each; they are counted here.
  const int64_t units = group_size <= tile_rows
                            ? std::min<int64_t>(token_cap, CeilDiv(token_cap, tt) + batch_cap)
                            : int64_t(token_cap);
  Capacities c{};
  c.batch = batch_cap;
  c.tokens = token_cap;
  c.pages = page_cap;
  c.bins = int32_t(std::max<int64_t>(1, int64_t(num_ctas) / std::max(num_kv_heads, 1)));
  c.work = int32_t(std::max<int64_t>(1, (units + c.bins - 1) * per_piece));
  int64_t rows = 2 * int64_t(c.bins - 1) * tt;
  if (partial_rows_limit >= 0) rows = std::min<int64_t>(rows, partial_rows_limit);
  c.partial_rows = int32_t(std::max<int64_t>(1, rows));
  return c;
}

void PlanBatch(const PlanRequest& r, int32_t* out) {
  const Capacities& caps = r.caps;
  const PlanLayout L{caps.batch, caps.tokens, caps.pages, caps.work, caps.bins};
  if (r.page_size < 1) Fail("page_size must be >= 1");
  if (r.group_size < 1 || r.tile_rows < 1) Fail("group_size and tile_rows must be >= 1");
  if (caps.bins < 1) Fail("the bin capacity must be >= 1");

  // ---- validation (DESIGN.md §3) ----
  // FlashInfer's rule: the batch is len(kv_indptr) - 1; the other arrays must agree.
  if (r.kv_indptr_len < 1)
    Fail(std::string(r.name_kv_indptr) + " must have batch_size + 1 >= 1 entries, got 0");
  const int64_t batch = r.kv_indptr_len - 1;
  if (r.kv_last_page_len_len != batch)
    Fail(std::string(r.name_kv_last_page_len) + " must have batch_size = len(" +
         r.name_kv_indptr + ") - 1 = " + std::to_string(batch) + " entries, got " +
         std::to_string(r.kv_last_page_len_len));
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
  {
    // One branch-free pass finds whether any page id is out of range; the slow loop
    // that names the first one runs only then.
    const uint32_t limit = r.num_pages >= 0 ? uint32_t(r.num_pages) : 0x80000000u;
    uint32_t bad = 0;
    for (int64_t i = 0; i < r.kv_indices_len; ++i) bad |= uint32_t(uint32_t(r.kv_indices[i]) >= limit);
    for (int64_t i = 0; bad && i < r.kv_indices_len; ++i) {
      const int32_t p = r.kv_indices[i];
      if (p < 0 || (r.num_pages >= 0 && p >= r.num_pages))
        Fail(std::string(r.name_kv_indices) + "[" + std::to_string(i) + "] = " + std::to_string(p) +
             " is not a page of the cache (0 <= page < " +
             (r.num_pages >= 0 ? std::to_string(r.num_pages) : std::string("num_pages")) + ")");
    }
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

  // ---- units ----
  auto qo_begin = [&](int64_t b) -> int32_t { return r.qo_indptr ? r.qo_indptr[b] : int32_t(b); };
  auto kv_len_of = [&](int64_t b) -> int32_t {
    const int32_t pages = r.kv_indptr[b + 1] - r.kv_indptr[b];
    return pages == 0 ? 0 : (pages - 1) * r.page_size + r.kv_last_page_len[b];
  };
  const int32_t G = r.group_size;
  const int32_t tt = TileTokens(G, r.tile_rows);
  const int32_t per_piece = ItemsPerPiece(G, r.tile_rows);
  std::vector<Unit> units;
  units.reserve(size_t(std::min<int64_t>(caps.work, num_tokens + batch)));
  int64_t total_keys = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t qo_len = qo_begin(b + 1) - qo_begin(b);
    const int32_t kv_len = kv_len_of(b);
    for (int32_t t0 = 0; t0 < qo_len; t0 += tt) {
      const int32_t n = std::min(qo_len - t0, tt);
      // Keys the unit's last token sees (bottom-right causal alignment).
      int64_t extent = kv_len;
      if (r.causal) extent = std::clamp<int64_t>(int64_t(kv_len) - qo_len + t0 + n, 0, kv_len);
      units.push_back({int32_t(b), t0, n, int32_t(extent)});
      total_keys += extent;
    }
  }
  const int64_t num_items = int64_t(units.size()) * per_piece;
  if (num_items > caps.work)
    Fail("batch needs " + std::to_string(num_items) + " query tiles, more than the " +
         std::to_string(caps.work) + " work items the capacities allow (max_num_tokens / max_batch_size)");

  // ---- bins: as many as the capacities allow for cuts, and no more than the work ----
  const int64_t total_cost = per_piece * (total_keys + int64_t(units.size()) * kItemOverhead);
  int64_t bins = caps.bins;
  bins = std::min<int64_t>(bins, (caps.work - num_items) / per_piece + 1);
  bins = std::min<int64_t>(bins, caps.partial_rows / (2 * int64_t(tt)) + 1);
  bins = std::max<int64_t>(1, std::min<int64_t>(bins, CeilDiv(total_cost, kMinBinCost)));

  // Sections the passes below do not overwrite start zeroed (also the alignment gaps,
  // so a plan is a deterministic function of its input).
  std::memset(out + L.meta(), 0, sizeof(int32_t) * size_t(L.kv_indices() - L.meta()));
  int32_t* work = out + L.work();
  int32_t* bin_indptr = out + L.bin_indptr();
  int32_t* merge = out + L.merge_indptr();

  // Bin i ends where the cost placed so far reaches (i + 1) / bins of the total
  // (absolute boundaries: rounding a cut never accumulates from bin to bin). The total
  // counts the item overhead of every cut the bins may add.
  const int64_t budget = total_cost + per_piece * (bins - 1) * kItemOverhead;
  const int64_t slack = CeilDiv(budget, bins) / 16;  // overrun allowed rather than a cut
  // Both deals run through these; with `write` false they only price the bins.
  bool write = true;
  int64_t w = 0;       // items written
  int64_t bin = 0;     // the open bin
  int64_t placed = 0;  // cost placed so far
  bool open_empty = true;
  int64_t bin_cost = 0, worst_bin = 0;  // kItemCost pricing of the open / costliest bin
  auto reset = [&](bool write_items) {
    write = write_items;
    w = bin = placed = bin_cost = worst_bin = 0;
    open_empty = true;
  };
  auto bin_end = [&]() { return budget * (bin + 1) / bins; };
  auto close_bin = [&]() {
    ++bin;
    if (write) bin_indptr[bin] = int32_t(w);
    open_empty = true;
    worst_bin = std::max(worst_bin, bin_cost);
    bin_cost = 0;
  };
  // Items of unit u's key piece [kb, ke), the `split`-th piece.
  auto emit = [&](const Unit& u, int32_t split, int64_t kb, int64_t ke) {
    placed += per_piece * (ke - kb + kItemOverhead);
    bin_cost += per_piece * (ke - kb + kItemCost);
    open_empty = false;
    if (!write) {
      w += per_piece;
      return;
    }
    const int32_t qo_len = qo_begin(u.request + 1) - qo_begin(u.request);
    const int32_t kv_len = kv_len_of(u.request);
    for (int32_t k = 0; k < per_piece; ++k) {
      int32_t* it = work + w * kWorkFields;
      it[kWorkRequest] = u.request;
      if (per_piece == 1) {
        it[kWorkRowBegin] = u.first_token * G;
        it[kWorkRowEnd] = (u.first_token + u.num_tokens) * G;
      } else {  // one token, heads [k tile_rows, (k + 1) tile_rows)
        it[kWorkRowBegin] = u.first_token * G + k * r.tile_rows;
        it[kWorkRowEnd] = u.first_token * G + std::min(G, (k + 1) * r.tile_rows);
      }
      it[kWorkKvBegin] = int32_t(kb);
      it[kWorkKvEnd] = int32_t(ke);
      it[kWorkSplit] = split;
      it[kWorkQoLen] = qo_len;
      it[kWorkKvLen] = kv_len;
      ++w;
    }
  };
  // After a unit's pieces: an uncut unit's items are marked unsplit, a cut unit's
  // tokens get their partial-row counts (prefix-summed at the end).
  auto finish_unit = [&](const Unit& u, int64_t first_item, int32_t pieces) {
    if (!write) return;
    if (pieces == 1) {
      for (int64_t i = first_item; i < w; ++i) work[i * kWorkFields + kWorkSplit] = -1;
    } else {
      const int32_t t0 = qo_begin(u.request) + u.first_token;
      for (int32_t k = 0; k < u.num_tokens; ++k) merge[t0 + k + 1] = pieces;
    }
  };
  auto deal_bins = [&]() {
    for (const Unit& u : units) {
      const int64_t first_item = w;
      int32_t pieces = 0;
      int64_t k0 = 0;
      while (true) {
        const int64_t rest = u.extent - k0;
        const int64_t end = bin_end();
        if (bin == bins - 1 || placed + per_piece * (rest + kItemOverhead) <= end + slack) {
          emit(u, pieces++, k0, u.extent);
          break;
        }
        // Keys up to the boundary, rounded to the nearest multiple of the key tile.
        int64_t take = ((end - placed) / per_piece - kItemOverhead + kChunkAlign / 2) /
                       kChunkAlign * kChunkAlign;
        if (open_empty) take = std::max(take, kMinPiece);  // an empty bin always takes a piece
        if (take >= kMinPiece) {
          if (rest - take < kMinPiece) {  // the remainder would be a sliver: keep it here
            emit(u, pieces++, k0, u.extent);
            close_bin();
            break;
          }
          emit(u, pieces++, k0, k0 + take);
          k0 += take;
        }
        close_bin();
      }
      finish_unit(u, first_item, pieces);
    }
  };
  // Each unit in PiecesOf(extent, chunk) pieces of about equal length, a bin per piece.
  auto deal_equal = [&](int64_t chunk) {
    for (const Unit& u : units) {
      const int64_t first_item = w;
      const int64_t n = PiecesOf(u.extent, chunk);
      int64_t kb = 0;
      for (int64_t i = 1; i <= n; ++i) {
        // The i-th boundary of n equal parts, rounded to the nearest multiple of kPieceAlign.
        const int64_t ke =
            i == n ? u.extent : (u.extent * i / n + kPieceAlign / 2) / kPieceAlign * kPieceAlign;
        emit(u, int32_t(i - 1), kb, ke);
        close_bin();
        kb = ke;
      }
      finish_unit(u, first_item, int32_t(n));
    }
  };

  const Deal forced = ForcedDeal();
  const int64_t chunk = forced == Deal::kBins ? 0 : EqualChunk(units, bins, total_keys);
  bool equal = chunk > 0 && forced == Deal::kEqual;
  if (chunk > 0 && forced == Deal::kAuto) {  // price both deals, write the cheaper
    reset(false);
    deal_bins();
    const int64_t cost_bins = std::max(worst_bin, bin_cost);
    reset(false);
    deal_equal(chunk);
    equal = worst_bin < cost_bins;
    reset(true);
  }
  if (equal) {
    deal_equal(chunk);
  } else {
    deal_bins();
  }
  for (int64_t b = bin + 1; b <= caps.bins; ++b) bin_indptr[b] = int32_t(w);
  for (int64_t i = w * kWorkFields; i < int64_t(caps.work) * kWorkFields; ++i) work[i] = -1;
  for (int64_t t = 0; t < caps.tokens; ++t) merge[t + 1] += merge[t];

  int32_t* meta = out + L.meta();
  meta[kMetaNumRequests] = int32_t(batch);
  meta[kMetaNumTokens] = int32_t(num_tokens);
  meta[kMetaNumWork] = int32_t(w);
  meta[kMetaNumPartialRows] = merge[caps.tokens];
  meta[kMetaNumBins] = int32_t(open_empty ? bin : bin + 1);

  int32_t* qo = out + L.qo_indptr();
  int32_t* kvp = out + L.kv_indptr();
  for (int64_t b = 0; b <= caps.batch; ++b) {
    const int64_t s = std::min(b, batch);
    qo[b] = qo_begin(s);
    kvp[b] = r.kv_indptr[s];
  }
  std::memcpy(out + L.kv_last_page_len(), r.kv_last_page_len, sizeof(int32_t) * size_t(batch));
  int32_t* pages = out + L.kv_indices();
  std::memcpy(pages, r.kv_indices, sizeof(int32_t) * size_t(r.kv_indices_len));
  std::memset(pages + r.kv_indices_len, 0,
              sizeof(int32_t) * size_t(L.size() - L.kv_indices() - r.kv_indices_len));
}

}  // namespace jax_pagedattn
