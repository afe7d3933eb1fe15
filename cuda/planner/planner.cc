// Host planner, in four steps (PlanBatch at the end): Validate the batch, CutUnits of
// its queries, deal them into bins of equal cost, writing the work items (DealBalanced:
// cutting a unit's keys where a bin boundary falls inside it; or DealFixedPieces: cuts
// fixed by the spec alone; then OrderLongestFirst where the spec asks), WriteSections
// (merge offsets, counts, padded index arrays).
// It reads nothing but its arguments.
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
// Fixed pieces (PlanSpec::fixed_split_size, disable_split_kv: batch invariance). Here
// the cuts are a function of the unit alone: at the key positions that are multiples of
// fixed_split_size * page_size, or nowhere. The pieces are then dealt whole, in order, a
// piece going to the bin whose boundary its middle precedes, and no bin cuts anything.
// A kernel computes each item on its own and merges a token's partials in split order,
// so a request's output bits do not depend on the rest of the batch, nor on the bins.
//
// Windows (PlanSpec::window_left). A unit's keys are the union of its tokens' windows,
// [first token's position - window_left, extent): its items start there, so a windowed
// decode reads only its window, and costs, cuts and equal pieces count only those keys.
// Balancing cuts stay on multiples of the key tile from the unit's first key; fixed
// cuts stay absolute. Without a window every unit starts at key 0, as before.
//
// Longest first (PlanSpec::longest_first, the Hopper prefill kernel's plans). That kernel
// ignores the bins: each CTA draws (item, kv head) tasks from one queue in plan order, so
// after the deal the items are sorted costliest first (stable) and the bins re-cut as
// runs of about equal count, which every other kernel still runs correctly.
//
// Bounds behind DeriveCapacities: each of the B - 1 bin boundaries cuts at most one
// unit once, so pieces <= units + B - 1 and items <= (units + B - 1) * items_per_piece;
// a cut unit has n >= 2 pieces and n - 1 cuts, so cut units hold <= 2 (B - 1) pieces,
// each of at most tile_rows / G tokens, which bounds the partial rows. Equal pieces
// stay inside the same room: at most `bins` pieces in all, and `bins` is first cut down
// to what the work and partial-row capacities leave (PlanBatch, "bins:" below).
// Fixed pieces: a unit's keys lie in [0, kv_len), so it has at most
// ceil(kv_len / chunk) <= 1 + (pages - 1) / fixed_split_size pieces; summed over a
// request's units and over requests, the pieces beyond one per unit are at most
// (units per request) * (page_cap / fixed_split_size), and the partial rows at most
// token_cap + max_qo_len * (page_cap / fixed_split_size). A cut unit of k pieces writes
// at least k partial rows, so the extra pieces are also fewer than the partial rows.
#include "planner.h"

#include <algorithm>
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

// A unit sees keys [begin, extent): begin is 0 without a window.
struct Unit {
  int32_t request, first_token, num_tokens, begin, extent;
  int64_t Keys() const { return int64_t(extent) - begin; }
};

// Pieces of a unit of `keys` keys cut at most `chunk` keys long (one even if empty).
int64_t PiecesOf(int64_t keys, int64_t chunk) {
  return std::max<int64_t>(1, CeilDiv(keys, chunk));
}

// The smallest chunk (a multiple of kPieceAlign, at least kMinPiece) whose pieces fit
// `bins` bins, one piece each; 0 if even uncut units do not fit.
int64_t EqualChunk(const std::vector<Unit>& units, int64_t bins, int64_t total_keys) {
  if (int64_t(units.size()) > bins) return 0;
  int64_t longest = 0;
  for (const Unit& u : units) longest = std::max<int64_t>(longest, u.Keys());
  auto fits = [&](int64_t chunk) {
    int64_t n = 0;
    for (const Unit& u : units) n += PiecesOf(u.Keys(), chunk);
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

// Fixed pieces (see the file comment): keys per piece, 0 when no unit is cut at all.
int64_t FixedChunk(const PlanSpec& s) {
  return s.disable_split_kv ? 0 : int64_t(s.fixed_split_size) * s.page_size;
}

bool HasFixedPieces(const PlanSpec& s) { return s.disable_split_kv || s.fixed_split_size > 0; }

// End of the fixed piece of unit u that starts at key kb: the next multiple of chunk,
// or the unit's end.
int64_t FixedPieceEnd(const Unit& u, int64_t kb, int64_t chunk) {
  if (chunk <= 0) return u.extent;
  return std::min<int64_t>(u.extent, kb - kb % chunk + chunk);
}

// Fixed pieces of unit u: the chunks its keys touch (one even if it has none).
int64_t FixedPiecesOf(const Unit& u, int64_t chunk) {
  if (chunk <= 0 || u.extent <= u.begin) return 1;
  return CeilDiv(u.extent, chunk) - u.begin / chunk;
}

int32_t ClampToInt32(int64_t n) { return int32_t(std::min<int64_t>(n, INT32_MAX)); }

}  // namespace

Capacities DeriveCapacities(int32_t batch_cap, int32_t token_cap, int32_t page_cap,
                            int32_t group_size, int32_t tile_rows, int32_t num_kv_heads,
                            int32_t num_ctas, int32_t partial_rows_limit,
                            int32_t fixed_split_size, int32_t max_qo_len) {
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
  int64_t work = (units + c.bins - 1) * per_piece;
  int64_t rows = 2 * int64_t(c.bins - 1) * tt;
  // Fixed pieces (the file comment's bounds).
  const int64_t max_q = max_qo_len >= 0 ? std::min(max_qo_len, token_cap) : int64_t(token_cap);
  const int64_t chunks = fixed_split_size > 0 ? page_cap / fixed_split_size : 0;
  if (fixed_split_size > 0) rows = std::max(rows, token_cap + max_q * chunks);
  if (partial_rows_limit >= 0) rows = std::min<int64_t>(rows, partial_rows_limit);
  c.partial_rows = ClampToInt32(std::max<int64_t>(1, rows));
  if (fixed_split_size > 0) {
    const int64_t units_per_request = group_size <= tile_rows ? CeilDiv(max_q, tt) : max_q;
    const int64_t extra = std::min<int64_t>(units_per_request * chunks, c.partial_rows);
    work = std::max(work, (units + extra) * per_piece);
  }
  c.work = ClampToInt32(std::max<int64_t>(1, work));
  return c;
}

namespace {

// The names of the index arrays in messages (PlanSpec::decode_names).
struct ArgNames {
  const char* qo_indptr = "qo_indptr";
  const char* kv_indptr = "paged_kv_indptr";
  const char* kv_indices = "paged_kv_indices";
  const char* kv_last_page_len = "paged_kv_last_page_len";
};

ArgNames NamesOf(const PlanSpec& s) {
  ArgNames n;
  if (s.decode_names) {
    n.kv_indptr = "indptr";
    n.kv_indices = "indices";
    n.kv_last_page_len = "last_page_len";
  }
  return n;
}

// What validation learns about a batch, and its per-request lookups.
struct BatchFacts {
  const BatchArrays* a;
  int32_t page_size;
  int64_t batch;
  int64_t num_tokens;

  int32_t QoBegin(int64_t b) const { return a->qo_indptr ? a->qo_indptr[b] : int32_t(b); }
  int32_t QoLen(int64_t b) const { return QoBegin(b + 1) - QoBegin(b); }
  int32_t KvLen(int64_t b) const {
    const int32_t pages = a->kv_indptr[b + 1] - a->kv_indptr[b];
    return pages == 0 ? 0 : (pages - 1) * page_size + a->kv_last_page_len[b];
  }
};

void CheckSpec(const PlanSpec& s) {
  if (s.page_size < 1) Fail("page_size must be >= 1");
  if (s.group_size < 1 || s.tile_rows < 1) Fail("group_size and tile_rows must be >= 1");
  if (s.caps.bins < 1) Fail("the bin capacity must be >= 1");
  if (s.fixed_split_size == 0 || s.fixed_split_size < -1)
    Fail("fixed_split_size must be a positive number of pages, or -1 for none; got " +
         std::to_string(s.fixed_split_size));
  if (s.window_left < -1)
    Fail("window_left must be >= 0, or -1 for no window; got " + std::to_string(s.window_left));
}

// Page ids within [0, num_pages) (any non-negative id while num_pages is unknown). One
// branch-free pass finds whether any is out of range; the loop that names the first
// one runs only then.
void CheckPageIds(const BatchArrays& a, const PlanSpec& s, const ArgNames& n) {
  const uint32_t limit = s.num_pages >= 0 ? uint32_t(s.num_pages) : 0x80000000u;
  uint32_t bad = 0;
  for (int64_t i = 0; i < a.kv_indices_len; ++i) bad |= uint32_t(uint32_t(a.kv_indices[i]) >= limit);
  for (int64_t i = 0; bad && i < a.kv_indices_len; ++i) {
    const int32_t p = a.kv_indices[i];
    if (p < 0 || (s.num_pages >= 0 && p >= s.num_pages))
      Fail(std::string(n.kv_indices) + "[" + std::to_string(i) + "] = " + std::to_string(p) +
           " is not a page of the cache (0 <= page < " +
           (s.num_pages >= 0 ? std::to_string(s.num_pages) : std::string("num_pages")) + ")");
  }
}

// DESIGN.md §3: FlashInfer's rule is that the batch is len(kv_indptr) - 1 and the other
// arrays must agree; everything must fit the capacities.
BatchFacts Validate(const BatchArrays& a, const PlanSpec& s, const ArgNames& n) {
  const Capacities& caps = s.caps;
  if (a.kv_indptr_len < 1)
    Fail(std::string(n.kv_indptr) + " must have batch_size + 1 >= 1 entries, got 0");
  const int64_t batch = a.kv_indptr_len - 1;
  if (a.kv_last_page_len_len != batch)
    Fail(std::string(n.kv_last_page_len) + " must have batch_size = len(" + n.kv_indptr +
         ") - 1 = " + std::to_string(batch) + " entries, got " +
         std::to_string(a.kv_last_page_len_len));
  if (batch > caps.batch)
    Fail("batch of " + std::to_string(batch) + " requests exceeds max_batch_size = " +
         std::to_string(caps.batch) + " fixed by the first plan; create the wrapper with a larger max_batch_size");
  CheckIndptr(a.kv_indptr, a.kv_indptr_len, batch + 1, n.kv_indptr);
  if (a.kv_indptr[batch] != a.kv_indices_len)
    Fail(std::string(n.kv_indptr) + "[-1] = " + std::to_string(a.kv_indptr[batch]) +
         " must equal len(" + n.kv_indices + ") = " + std::to_string(a.kv_indices_len));
  if (a.kv_indices_len > caps.pages)
    Fail(std::string(n.kv_indices) + " has " + std::to_string(a.kv_indices_len) +
         " pages, more than max_num_pages = " + std::to_string(caps.pages));
  CheckPageIds(a, s, n);
  for (int64_t b = 0; b < batch; ++b) {
    const bool has_pages = a.kv_indptr[b + 1] > a.kv_indptr[b];
    const int32_t l = a.kv_last_page_len[b];
    if (has_pages ? (l < 1 || l > s.page_size) : (l < 0 || l > s.page_size))
      Fail(std::string(n.kv_last_page_len) + "[" + std::to_string(b) + "] = " +
           std::to_string(l) + " must be in [1, page_size = " + std::to_string(s.page_size) +
           "] for a request with pages");
  }
  int64_t num_tokens = batch;
  if (a.qo_indptr) {
    CheckIndptr(a.qo_indptr, a.qo_indptr_len, batch + 1, n.qo_indptr);
    num_tokens = a.qo_indptr[batch];
  }
  if (num_tokens > caps.tokens)
    Fail(std::string(n.qo_indptr) + "[-1] = " + std::to_string(num_tokens) +
         " query tokens exceed max_num_tokens = " + std::to_string(caps.tokens));
  return BatchFacts{&a, s.page_size, batch, num_tokens};
}

struct Units {
  std::vector<Unit> list;
  int64_t total_keys = 0;
};

// Each request's queries in units of up to TileTokens tokens, with the keys each sees.
// The unit's keys start at its first token's window (file comment), at 0 without one.
Units CutUnits(const BatchFacts& f, const PlanSpec& s) {
  const int32_t tt = TileTokens(s.group_size, s.tile_rows);
  Units u;
  u.list.reserve(size_t(std::min<int64_t>(s.caps.work, f.num_tokens + f.batch)));
  for (int64_t b = 0; b < f.batch; ++b) {
    const int32_t qo_len = f.QoLen(b);
    const int32_t kv_len = f.KvLen(b);
    for (int32_t t0 = 0; t0 < qo_len; t0 += tt) {
      const int32_t n = std::min(qo_len - t0, tt);
      // Keys the unit's last token sees (bottom-right causal alignment).
      int64_t extent = kv_len;
      if (s.causal) extent = std::clamp<int64_t>(int64_t(kv_len) - qo_len + t0 + n, 0, kv_len);
      int64_t begin = 0;
      if (s.window_left >= 0)
        begin = std::clamp<int64_t>(int64_t(kv_len) - qo_len + t0 - s.window_left, 0, extent);
      u.list.push_back({int32_t(b), t0, n, int32_t(begin), int32_t(extent)});
      u.total_keys += extent - begin;
    }
  }
  return u;
}

// Deals units into bins and writes their work items (or, when not writing, only prices
// the bins). One object per deal tried; see the file comment for the deals. `budget` is
// the cost that the bins' boundaries divide.
class Dealer {
 public:
  Dealer(const BatchFacts& f, const PlanSpec& s, int64_t bins, int64_t budget, int32_t* out,
         bool write)
      : f_(f), s_(s), write_(write), bins_(bins),
        per_piece_(ItemsPerPiece(s.group_size, s.tile_rows)),
        budget_(budget),
        slack_(CeilDiv(budget_, bins) / 16) {
    const PlanLayout L = PlanLayout::Of(s.caps);
    work_ = out + L.work();
    bin_indptr_ = out + L.bin_indptr();
    merge_ = out + L.merge_indptr();
  }

  // Bin i ends where the cost placed so far reaches (i + 1) / bins of the total
  // (absolute boundaries: rounding a cut never accumulates from bin to bin); a unit
  // that overruns a boundary by more than the slack is cut there.
  void DealBins(const std::vector<Unit>& units) {
    for (const Unit& u : units) {
      const int64_t first_item = w_;
      int32_t pieces = 0;
      int64_t k0 = u.begin;
      while (true) {
        const int64_t rest = u.extent - k0;
        const int64_t end = BinEnd();
        if (bin_ == bins_ - 1 || placed_ + per_piece_ * (rest + kItemOverhead) <= end + slack_) {
          Emit(u, pieces++, k0, u.extent);
          break;
        }
        // Keys up to the boundary, rounded to the nearest multiple of the key tile.
        int64_t take = ((end - placed_) / per_piece_ - kItemOverhead + kChunkAlign / 2) /
                       kChunkAlign * kChunkAlign;
        if (open_empty_) take = std::max(take, kMinPiece);  // an empty bin always takes a piece
        if (take >= kMinPiece) {
          if (rest - take < kMinPiece) {  // the remainder would be a sliver: keep it here
            Emit(u, pieces++, k0, u.extent);
            CloseBin();
            break;
          }
          Emit(u, pieces++, k0, k0 + take);
          k0 += take;
        }
        CloseBin();
      }
      FinishUnit(u, first_item, pieces);
    }
  }

  // Each unit in PiecesOf(keys, chunk) pieces of about equal length, a bin per piece.
  void DealEqual(const std::vector<Unit>& units, int64_t chunk) {
    for (const Unit& u : units) {
      const int64_t first_item = w_;
      const int64_t keys = u.Keys();
      const int64_t n = PiecesOf(keys, chunk);
      int64_t kb = u.begin;
      for (int64_t i = 1; i <= n; ++i) {
        // The i-th boundary of n equal parts, rounded to the nearest multiple of kPieceAlign.
        const int64_t ke = i == n ? u.extent
                                  : u.begin + (keys * i / n + kPieceAlign / 2) / kPieceAlign *
                                                  kPieceAlign;
        Emit(u, int32_t(i - 1), kb, ke);
        CloseBin();
        kb = ke;
      }
      FinishUnit(u, first_item, int32_t(n));
    }
  }

  // Each unit in its fixed pieces (FixedPieceEnd), dealt whole: a piece opens the next
  // bin when the open one has items and the piece's middle lies past its boundary.
  void DealFixed(const std::vector<Unit>& units, int64_t chunk) {
    for (const Unit& u : units) {
      const int64_t first_item = w_;
      int32_t pieces = 0;
      int64_t kb = u.begin;
      do {  // an empty unit still gets its one (empty) piece
        const int64_t ke = FixedPieceEnd(u, kb, chunk);
        const int64_t cost = per_piece_ * (ke - kb + kItemOverhead);
        if (!open_empty_ && bin_ < bins_ - 1 && placed_ + cost / 2 > BinEnd()) CloseBin();
        Emit(u, pieces++, kb, ke);
        kb = ke;
      } while (kb < u.extent);
      FinishUnit(u, first_item, pieces);
    }
  }

  // The costliest bin, each item counted with kItemCost.
  int64_t WorstBin() const { return std::max(worst_bin_, bin_cost_); }
  int64_t ItemsWritten() const { return w_; }
  // Bins with at least one item.
  int64_t BinsUsed() const { return open_empty_ ? bin_ : bin_ + 1; }
  int64_t OpenBin() const { return bin_; }

 private:
  int64_t BinEnd() const { return budget_ * (bin_ + 1) / bins_; }

  void CloseBin() {
    ++bin_;
    if (write_) bin_indptr_[bin_] = int32_t(w_);
    open_empty_ = true;
    worst_bin_ = std::max(worst_bin_, bin_cost_);
    bin_cost_ = 0;
  }

  // Items of unit u's key piece [kb, ke), the `split`-th piece.
  void Emit(const Unit& u, int32_t split, int64_t kb, int64_t ke) {
    placed_ += per_piece_ * (ke - kb + kItemOverhead);
    bin_cost_ += per_piece_ * (ke - kb + kItemCost);
    open_empty_ = false;
    if (!write_) {
      w_ += per_piece_;
      return;
    }
    const int32_t G = s_.group_size;
    for (int32_t k = 0; k < per_piece_; ++k) {
      int32_t* it = work_ + w_ * kWorkFields;
      it[kWorkRequest] = u.request;
      if (per_piece_ == 1) {
        it[kWorkRowBegin] = u.first_token * G;
        it[kWorkRowEnd] = (u.first_token + u.num_tokens) * G;
      } else {  // one token, heads [k tile_rows, (k + 1) tile_rows)
        it[kWorkRowBegin] = u.first_token * G + k * s_.tile_rows;
        it[kWorkRowEnd] = u.first_token * G + std::min(G, (k + 1) * s_.tile_rows);
      }
      it[kWorkKvBegin] = int32_t(kb);
      it[kWorkKvEnd] = int32_t(ke);
      it[kWorkSplit] = split;
      it[kWorkQoLen] = f_.QoLen(u.request);
      it[kWorkKvLen] = f_.KvLen(u.request);
      ++w_;
    }
  }

  // After a unit's pieces: an uncut unit's items are marked unsplit, a cut unit's
  // tokens get their partial-row counts (prefix-summed by WriteSections).
  void FinishUnit(const Unit& u, int64_t first_item, int32_t pieces) {
    if (!write_) return;
    if (pieces == 1) {
      for (int64_t i = first_item; i < w_; ++i) work_[i * kWorkFields + kWorkSplit] = -1;
    } else {
      const int32_t t0 = f_.QoBegin(u.request) + u.first_token;
      for (int32_t k = 0; k < u.num_tokens; ++k) merge_[t0 + k + 1] = pieces;
    }
  }

  const BatchFacts& f_;
  const PlanSpec& s_;
  const bool write_;
  const int64_t bins_;
  const int32_t per_piece_;
  const int64_t budget_;  // the total cost, with the item overhead of every cut the bins may add
  const int64_t slack_;   // overrun allowed rather than a cut
  int32_t* work_ = nullptr;
  int32_t* bin_indptr_ = nullptr;
  int32_t* merge_ = nullptr;
  int64_t w_ = 0;       // items dealt
  int64_t bin_ = 0;     // the open bin
  int64_t placed_ = 0;  // cost placed so far
  bool open_empty_ = true;
  int64_t bin_cost_ = 0, worst_bin_ = 0;  // kItemCost pricing of the open / costliest bin
};

// Bins to deal into: as many as the capacities allow for cuts, and no more than the work.
int64_t UsableBins(const PlanSpec& s, int64_t num_items, int64_t total_cost) {
  const int64_t per_piece = ItemsPerPiece(s.group_size, s.tile_rows);
  const int64_t tt = TileTokens(s.group_size, s.tile_rows);
  int64_t bins = s.caps.bins;
  bins = std::min<int64_t>(bins, (s.caps.work - num_items) / per_piece + 1);
  bins = std::min<int64_t>(bins, s.caps.partial_rows / (2 * tt) + 1);
  return std::max<int64_t>(1, std::min<int64_t>(bins, CeilDiv(total_cost, kMinBinCost)));
}

// What the writing dealer wrote: items, bins used, the open bin.
struct Dealt {
  int64_t items, bins_used, open_bin;
};

// The balancing deals: the one the spec forces, or both priced and the cheaper written.
Dealt DealBalanced(const BatchFacts& f, const PlanSpec& s, const Units& units, int32_t* out) {
  const int64_t per_piece = ItemsPerPiece(s.group_size, s.tile_rows);
  const int64_t num_units = int64_t(units.list.size());
  const int64_t total_cost = per_piece * (units.total_keys + num_units * kItemOverhead);
  const int64_t bins = UsableBins(s, num_units * per_piece, total_cost);
  // The item overhead of every cut the bins may add.
  const int64_t budget = total_cost + per_piece * (bins - 1) * kItemOverhead;
  const int64_t chunk = s.deal == Deal::kBins ? 0 : EqualChunk(units.list, bins, units.total_keys);
  bool equal = chunk > 0 && s.deal == Deal::kEqual;
  if (chunk > 0 && s.deal == Deal::kAuto) {
    Dealer by_bins(f, s, bins, budget, out, /*write=*/false);
    by_bins.DealBins(units.list);
    Dealer by_pieces(f, s, bins, budget, out, /*write=*/false);
    by_pieces.DealEqual(units.list, chunk);
    equal = by_pieces.WorstBin() < by_bins.WorstBin();
  }
  Dealer dealer(f, s, bins, budget, out, /*write=*/true);
  if (equal) {
    dealer.DealEqual(units.list, chunk);
  } else {
    dealer.DealBins(units.list);
  }
  return Dealt{dealer.ItemsWritten(), dealer.BinsUsed(), dealer.OpenBin()};
}

// The fixed pieces' work items and partial rows (a cut unit's every piece writes one
// per token).
struct PieceCount {
  int64_t pieces = 0, partial_rows = 0;
};

PieceCount CountFixedPieces(const std::vector<Unit>& units, int64_t chunk) {
  PieceCount c;
  for (const Unit& u : units) {
    const int64_t n = FixedPiecesOf(u, chunk);
    c.pieces += n;
    if (n > 1) c.partial_rows += n * u.num_tokens;
  }
  return c;
}

// Fixed pieces: they must fit the capacities as they are (no bin may trade a cut for
// room), then they are dealt whole into as many bins as their cost fills.
Dealt DealFixedPieces(const BatchFacts& f, const PlanSpec& s, const Units& units, int32_t* out) {
  const int64_t per_piece = ItemsPerPiece(s.group_size, s.tile_rows);
  const int64_t chunk = FixedChunk(s);
  const PieceCount n = CountFixedPieces(units.list, chunk);
  // (disable_split_kv's pieces are the units, which PlanBatch found room for.)
  auto option = [&] {
    return "fixed_split_size = " + std::to_string(s.fixed_split_size) + " pages";
  };
  // The workspace bounds the partial rows, and through them the work capacity of a
  // wrapper's plans (DeriveCapacities), so it is checked first.
  if (n.partial_rows > s.caps.partial_rows)
    Fail(option() + " cuts this batch into pieces that need " + std::to_string(n.partial_rows) +
         " split-KV partial rows, more than the " + std::to_string(s.caps.partial_rows) +
         " the workspace holds; pass a larger fixed_split_size, or a larger workspace_size "
         "to the wrapper");
  if (n.pieces * per_piece > s.caps.work)
    Fail(option() + " cuts this batch into " + std::to_string(n.pieces * per_piece) +
         " work items, more than the " + std::to_string(s.caps.work) +
         " the capacities allow; pass a larger fixed_split_size, or capacities derived for "
         "it (planning.derive_capacities(fixed_split_size=...), as a wrapper's plan() does)");
  const int64_t total_cost = per_piece * (units.total_keys + n.pieces * kItemOverhead);
  const int64_t bins =
      std::max<int64_t>(1, std::min<int64_t>(s.caps.bins, CeilDiv(total_cost, kMinBinCost)));
  Dealer dealer(f, s, bins, total_cost, out, /*write=*/true);
  dealer.DealFixed(units.list, chunk);
  return Dealt{dealer.ItemsWritten(), dealer.BinsUsed(), dealer.OpenBin()};
}

// Keys an item's rows see (causal limit of its last row, window start of its first),
// plus the fixed item overhead: what it costs a kernel that runs it alone.
int64_t ItemCost(const int32_t* it, const PlanSpec& s) {
  const int64_t G = s.group_size;
  const int64_t first_pos = int64_t(it[kWorkKvLen]) - it[kWorkQoLen];  // token 0's position
  int64_t lo = it[kWorkKvBegin], hi = it[kWorkKvEnd];
  if (s.causal) hi = std::min<int64_t>(hi, first_pos + (int64_t(it[kWorkRowEnd]) - 1) / G + 1);
  if (s.window_left >= 0)
    lo = std::max<int64_t>(lo, first_pos + it[kWorkRowBegin] / G - s.window_left);
  return std::max<int64_t>(0, hi - lo) + kItemOverhead;
}

// PlanSpec::longest_first: the dealt items sorted costliest first (stable), and the used
// bins re-cut as contiguous runs of about equal item count, so the plan stays a valid
// partition for kernels that run bins.
void OrderLongestFirst(const PlanSpec& s, Dealt* d, int32_t* out) {
  const PlanLayout L = PlanLayout::Of(s.caps);
  int32_t* work = out + L.work();
  const int64_t n = d->items;
  if (n == 0 || d->bins_used < 1) return;
  std::vector<int64_t> cost(size_t(n), 0);
  std::vector<int32_t> order(size_t(n), 0);
  for (int64_t i = 0; i < n; ++i) {
    cost[size_t(i)] = ItemCost(work + i * kWorkFields, s);
    order[size_t(i)] = int32_t(i);
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return cost[size_t(a)] > cost[size_t(b)]; });
  std::vector<int32_t> sorted(size_t(n) * kWorkFields);
  for (int64_t i = 0; i < n; ++i)
    std::memcpy(&sorted[size_t(i) * kWorkFields], work + int64_t(order[size_t(i)]) * kWorkFields,
                sizeof(int32_t) * kWorkFields);
  std::memcpy(work, sorted.data(), sizeof(int32_t) * sorted.size());
  const int64_t bins = d->bins_used;
  int32_t* bin_indptr = out + L.bin_indptr();
  for (int64_t b = 0; b <= bins; ++b) bin_indptr[b] = int32_t(n * b / bins);
  d->open_bin = bins - 1;
}

// Everything after the deal: padding of the bins and items, the merge offsets, the
// counts, and copies of the index arrays padded to the capacities.
void WriteSections(const BatchFacts& f, const PlanSpec& s, const Dealt& d, int32_t* out) {
  const Capacities& caps = s.caps;
  const PlanLayout L = PlanLayout::Of(caps);
  const BatchArrays& a = *f.a;
  int32_t* bin_indptr = out + L.bin_indptr();
  int32_t* work = out + L.work();
  int32_t* merge = out + L.merge_indptr();
  for (int64_t b = d.open_bin + 1; b <= caps.bins; ++b) bin_indptr[b] = int32_t(d.items);
  for (int64_t i = d.items * kWorkFields; i < int64_t(caps.work) * kWorkFields; ++i) work[i] = -1;
  for (int64_t t = 0; t < caps.tokens; ++t) merge[t + 1] += merge[t];

  int32_t* meta = out + L.meta();
  meta[kMetaNumRequests] = int32_t(f.batch);
  meta[kMetaNumTokens] = int32_t(f.num_tokens);
  meta[kMetaNumWork] = int32_t(d.items);
  meta[kMetaNumPartialRows] = merge[caps.tokens];
  meta[kMetaNumBins] = int32_t(d.bins_used);

  int32_t* qo = out + L.qo_indptr();
  int32_t* kvp = out + L.kv_indptr();
  for (int64_t b = 0; b <= caps.batch; ++b) {
    const int64_t last = std::min(b, f.batch);
    qo[b] = f.QoBegin(last);
    kvp[b] = a.kv_indptr[last];
  }
  std::memcpy(out + L.kv_last_page_len(), a.kv_last_page_len, sizeof(int32_t) * size_t(f.batch));
  int32_t* pages = out + L.kv_indices();
  std::memcpy(pages, a.kv_indices, sizeof(int32_t) * size_t(a.kv_indices_len));
  std::memset(pages + a.kv_indices_len, 0,
              sizeof(int32_t) * size_t(L.size() - L.kv_indices() - a.kv_indices_len));
}

}  // namespace

void PlanBatch(const BatchArrays& a, const PlanSpec& s, int32_t* out) {
  CheckSpec(s);
  const BatchFacts f = Validate(a, s, NamesOf(s));
  const Units units = CutUnits(f, s);
  const int64_t num_items = int64_t(units.list.size()) * ItemsPerPiece(s.group_size, s.tile_rows);
  if (num_items > s.caps.work)
    Fail("batch needs " + std::to_string(num_items) + " query tiles, more than the " +
         std::to_string(s.caps.work) + " work items the capacities allow (max_num_tokens / max_batch_size)");

  // Sections the deal does not write start zeroed (also the alignment gaps, so a plan
  // is a deterministic function of its input).
  const PlanLayout L = PlanLayout::Of(s.caps);
  std::memset(out + L.meta(), 0, sizeof(int32_t) * size_t(L.kv_indices() - L.meta()));
  Dealt d = HasFixedPieces(s) ? DealFixedPieces(f, s, units, out)
                              : DealBalanced(f, s, units, out);
  if (s.longest_first) OrderLongestFirst(s, &d, out);
  WriteSections(f, s, d, out);
}

}  // namespace jax_pagedattn
