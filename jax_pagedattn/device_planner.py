"""The in-graph planner: a plan buffer built from device arrays with jax.numpy.

The host planner (planner.cc) needs the batch's index arrays on the host, so a decode
loop that plans with it leaves the device every step. This planner takes the arrays of
the RPA-v3 entry point (cu_q_lens, kv_lens, a fixed-stride page table, num_seqs) as
device values and writes the same kind of plan buffer (docs/CONTRACT.md, "The plan
buffer": the same PlanLayout, work items, merge offsets, bins, counts and padded index
sections), with static shapes only, so a whole decode loop can run inside
`lax.while_loop` and compile once.

It deals the way the host planner does, vectorised instead of sequential:

* Units: each request's query tokens in tiles of `tile_rows / G` tokens (one token with
  all its heads when G > tile_rows, as `ceil(G / tile_rows)` items per key piece); each
  unit sees keys [begin, extent): its causal extent, from its first token's window.
* Dealt bins: the units' costs (keys + an item's start-up) laid end to end, cut into
  `bins` equal spans; where a span boundary falls inside a unit the unit is cut there
  (on a multiple of 64 keys from its first key, unless a piece would be shorter than
  128 keys), and each piece goes to the bin that holds its middle. Bins left empty are
  dropped, so used bins come first.
* Equal pieces: when there are no more units than bins, every unit cut into pieces of
  at most `chunk` keys, the smallest chunk (a multiple of 16, at least 128) whose pieces
  fit the bins, one piece per bin (the host planner's rule; the chunk is found by a
  k-ary search of a few vectorised rounds instead of a binary search).
* Both deals are priced (keys + 128 per item in the costliest bin) and the cheaper kept
  (`DeviceSpec.deal` forces one, as JAX_PAGEDATTN_DEAL does for the host planner).

It differs from the host planner in the details (no slack before a cut, no sequential
bookkeeping), so its plans are not the host's bit for bit; on the decode shapes of
DESIGN.md §6 its costliest bin is within a few percent of the host plan's either way
(tests/test_rpa.py bounds it at 10%), and every plan it writes satisfies the host
planner's invariants (tests/test_rpa.py runs tests/test_planner.py's check_plan on it).
Capacities are those `planning.derive_capacities` gives for the same sizes: its bounds
(at most units + bins - 1 pieces, at most 2 (bins - 1) tile-token partial rows) hold for
both deals here too, since every cut sits on a bin boundary, one per boundary.

Cost: a few dozen small fused XLA kernels per plan, paid once per step however many
layers call `ragged_paged_attention` with the same batch arrays (XLA's common
subexpression elimination merges the layers' identical planner computations).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_pagedattn import planning

# How the deal fills bins, in keys. The host planner tunes its own deal with the same
# numbers (planner.cc); they decide balance only, never validity.
_CUT_ALIGN = 64        # dealt cuts fall on multiples of this many keys of a unit
_MIN_PIECE = 128       # no piece of a cut unit is shorter than this
_MIN_BIN_KEYS = 256    # a bin gets at least this much cost: small batches use fewer bins
_ITEM_OVERHEAD = 32    # an item's start-up, counted when bins are filled
_ITEM_COST = 128       # an item's start plus end, counted when the two deals are priced
_PIECE_ALIGN = 16      # equal pieces start on multiples of this many keys
# Candidates per round of the equal-chunk search: log2(range) / 10 rounds.
_SEARCH_WIDTH = 1024
# Line positions are int32: costs are counted in quanta of 2^s keys, s chosen from the
# static capacities so that the whole line stays below 2^30.
_LINE_BITS = 30

_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  """Everything static about an in-graph plan (hashable: part of the compile key).

  `pages_per_seq` is the stride of the page table: request b's page p is entry
  `b * pages_per_seq + p`. `window_left` is FlashInfer's (-1: none). `caps` are the
  plan's capacities, from `capacities()`."""

  page_size: int
  pages_per_seq: int
  group_size: int
  tile_rows: int
  causal: bool
  window_left: int
  caps: planning.Capacities
  # "auto" prices both deals and keeps the cheaper; "bins" / "equal" force one where it
  # applies (the host planner's JAX_PAGEDATTN_DEAL knob, switches.py).
  deal: str = "auto"

  def __post_init__(self):
    # The deal's bounds (module docstring) are those of derive_capacities; capacities
    # made otherwise could drop items.
    c, tt = self.caps, self.tile_tokens
    if c.work < self.piece_cap * self.per_piece or c.partial_rows < 2 * (c.bins - 1) * tt:
      raise ValueError(f"capacities {c} do not hold the in-graph planner's pieces: derive "
                       f"them with device_planner.capacities")

  @property
  def tile_tokens(self) -> int:
    """Query tokens of one unit."""
    g, t = self.group_size, self.tile_rows
    return t // g if g <= t else 1

  @property
  def per_piece(self) -> int:
    """Work items per key piece of a unit (head slices when G > tile_rows)."""
    g, t = self.group_size, self.tile_rows
    return 1 if g <= t else -(-g // t)

  @property
  def unit_cap(self) -> int:
    """Units of any batch within the capacities (planner.cc, DeriveCapacities)."""
    c, tt = self.caps, self.tile_tokens
    if self.group_size <= self.tile_rows:
      return min(c.tokens, -(-c.tokens // tt) + c.batch)
    return c.tokens

  @property
  def piece_cap(self) -> int:
    return self.unit_cap + self.caps.bins - 1


def capacities(max_num_seqs: int, max_num_tokens: int, pages_per_seq: int, *, group_size: int,
               tile_rows: int, num_kv_heads: int, num_ctas: int) -> planning.Capacities:
  """The host planner's capacities for these sizes: the in-graph plan's are the same,
  so a plan of either planner runs with one compiled attention call."""
  return planning.derive_capacities(max_num_seqs, max_num_tokens, max_num_seqs * pages_per_seq,
                                    group_size=group_size, tile_rows=tile_rows,
                                    num_kv_heads=num_kv_heads, num_ctas=num_ctas)


class DevicePlan(NamedTuple):
  """An in-graph plan and the append rows that go with it.

  buffer: int32 plan buffer (docs/CONTRACT.md). batch_indices, positions: int32
  [token_cap], the request and key position of every query row (-1 past the batch's
  tokens); kv_indices, kv_indptr, kv_last_page_len: the plan's page table sections.
  Together they are `append_paged_kv_cache`'s arguments for the batch's new tokens."""

  buffer: jax.Array
  batch_indices: jax.Array
  positions: jax.Array
  kv_indices: jax.Array
  kv_indptr: jax.Array
  kv_last_page_len: jax.Array


def _count_le(sorted_vals, x):
  """For each x, how many entries of the non-decreasing `sorted_vals` are <= x."""
  # Comparing all pairs is one fused compare-and-sum; past a few million pairs an
  # unrolled binary search (a gather per level) does less work.
  small = sorted_vals.size * max(x.size, 1) <= 1 << 22
  return jnp.searchsorted(sorted_vals, x, side="right",
                          method="compare_all" if small else "scan_unrolled").astype(jnp.int32)


def _div(a, b):
  """a // b for a >= 0, b > 0: one integer division (jnp's floor division of signed
  integers is a sign-correcting sequence of a dozen ops, on every one of these)."""
  a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))
  return jax.lax.div(a, b)


def _rem(a, b):
  """a % b for a >= 0, b > 0."""
  a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))
  return jax.lax.rem(a, b)


def _cdiv(a, b):
  """ceil(a / b) for a >= 0, b > 0."""
  return _div(a + (b - 1), b)


# Below this length a prefix sum or a segment sum is one masked [n, n] reduction: a
# single fused kernel, where a scan (cumsum) or a scatter is a few kernels of its own on
# the GPU. The planner's arrays over requests, units, pieces and bins are this small for
# any realistic batch; longer ones (query tokens of a long prefill) take the scan.
_DENSE_LIMIT = 2048


def _cumsum(x):
  n = x.shape[0]
  if n > _DENSE_LIMIT:
    return jnp.cumsum(x)
  i = jnp.arange(n, dtype=jnp.int32)
  return jnp.sum(jnp.where(i[None, :] <= i[:, None], x[None, :], 0), axis=1, dtype=x.dtype)


def _exclusive_cumsum(x):
  return jnp.concatenate([jnp.zeros((1,), x.dtype), _cumsum(x)])


def _segment_sum(values, ids, n: int):
  """out[k] = sum of values[i] with ids[i] == k, for k < n; ids must be >= 0 (those >= n
  are dropped)."""
  if values.shape[0] * n > _DENSE_LIMIT * _DENSE_LIMIT:
    return jnp.zeros((n,), values.dtype).at[ids].add(values, mode="drop")
  k = jnp.arange(n, dtype=jnp.int32)
  return jnp.sum(jnp.where(ids[None, :] == k[:, None], values[None, :], 0), axis=1,
                 dtype=values.dtype)


def _line_shift(spec: DeviceSpec) -> int:
  """s such that the units' costs counted in 2^s keys stay below 2^_LINE_BITS."""
  most = spec.unit_cap * spec.per_piece * (spec.pages_per_seq * spec.page_size + _ITEM_OVERHEAD)
  return max(0, int(most).bit_length() - _LINE_BITS)


def _search_rounds(spec: DeviceSpec) -> int:
  """Rounds of the k-ary equal-chunk search that narrow any start to one candidate."""
  gap, rounds = -(-spec.pages_per_seq * spec.page_size // _PIECE_ALIGN) + 1, 0
  while gap > 1:
    gap, rounds = gap // _SEARCH_WIDTH + 1, rounds + 1
  return rounds


@functools.partial(jax.jit, static_argnames=("spec",))
def plan(cu_q_lens, kv_lens, page_indices, num_seqs, *, spec: DeviceSpec) -> DevicePlan:
  """Plans a ragged batch on the device.

  Args:
    cu_q_lens: int32 [max_num_seqs + 1], query-token offsets of the requests.
    kv_lens: int32 [max_num_seqs], keys of each request, its new tokens included.
    page_indices: int32 [max_num_seqs * pages_per_seq]; request b's pages start at
      entry b * pages_per_seq.
    num_seqs: int32 scalar; requests at or past it are not in the batch.
    spec: the static DeviceSpec.

  Inputs are not checked (they may be traced): the caller validates concrete ones.
  Whatever they hold, the plan stays inside its capacities and the kernels clamp it
  (docs/CONTRACT.md, "Kernels trust nothing"); a valid batch gets a valid plan.
  """
  caps = spec.caps
  batch = caps.batch
  cu_q_lens = jnp.asarray(cu_q_lens, jnp.int32)
  kv_lens = jnp.asarray(kv_lens, jnp.int32)
  page_indices = jnp.asarray(page_indices, jnp.int32)
  num_seqs = jnp.clip(jnp.asarray(num_seqs, jnp.int32), 0, batch)

  req = _requests(cu_q_lens, kv_lens, page_indices, num_seqs, spec)
  units = _units(req, spec)
  dealt = _deal_bins(units, spec)
  equal = _deal_equal(units, dealt["bins_used"], spec)
  use_equal = equal["applies"] & {"auto": equal["worst"] < dealt["worst"], "equal": True,
                                  "bins": False}[spec.deal]
  pieces = jax.tree_util.tree_map(lambda e, d: jnp.where(use_equal, e, d),
                                  equal["pieces"], dealt["pieces"])
  work, item_bins, num_items = _work_items(units, pieces, spec)
  bin_indptr = jnp.searchsorted(item_bins, jnp.arange(caps.bins + 1, dtype=jnp.int32),
                                side="left", method="compare_all").astype(jnp.int32)
  num_bins = jnp.where(num_items > 0, jnp.max(jnp.where(item_bins < caps.bins, item_bins, -1)) + 1,
                       0)
  merge_indptr, batch_indices, positions = _tokens(req, units, pieces["n_unit"], spec)
  meta = jnp.stack([num_seqs, req["num_tokens"], num_items, merge_indptr[-1], num_bins])
  sections = {
      "work": work.reshape(-1),
      "meta": meta,
      "bin_indptr": bin_indptr,
      "qo_indptr": req["qo_indptr"],
      "kv_indptr": req["kv_indptr"],
      "kv_last_page_len": req["last_page_len"],
      "merge_indptr": merge_indptr,
      "kv_indices": req["kv_indices"],
  }
  return DevicePlan(_assemble(sections, caps), batch_indices, positions, req["kv_indices"],
                    req["kv_indptr"], req["last_page_len"])


def _take(columns: dict, index) -> dict:
  """{name: column[index]} for int32 columns of one length, as one gather of the stacked
  columns: a gather per column would be its own loop on the CPU and split fusions on
  the GPU. `index` must lie in range (callers clip it)."""
  names = list(columns)
  rows = jnp.stack([columns[n] for n in names], axis=1)[index]
  return {n: rows[..., i] for i, n in enumerate(names)}


def _requests(cu_q_lens, kv_lens, page_indices, num_seqs, spec: DeviceSpec) -> dict:
  """Per-request lengths and the page table in the plan's CSR form."""
  batch, ps, pps = spec.caps.batch, spec.page_size, spec.pages_per_seq
  live = jnp.arange(batch, dtype=jnp.int32) < num_seqs
  # Lengths are made non-negative and kv_len bounded by the page-table stride, so the
  # plan's index sections stay monotone and inside their capacities for any input.
  q_len = jnp.where(live, jnp.maximum(cu_q_lens[1:] - cu_q_lens[:-1], 0), 0)
  kv_len = jnp.where(live, jnp.clip(kv_lens, 0, pps * ps), 0)
  qo_indptr = _exclusive_cumsum(q_len)
  npages = _cdiv(kv_len, ps)
  kv_indptr = _exclusive_cumsum(npages)
  last_page_len = jnp.where(npages > 0, kv_len - (npages - 1) * ps, 0)
  # The fixed-stride table compacted: request b's pages follow request b - 1's.
  slot = jnp.arange(pps, dtype=jnp.int32)[None, :]
  dest = jnp.where(slot < npages[:, None], kv_indptr[:-1, None] + slot, spec.caps.pages)
  kv_indices = jnp.zeros((spec.caps.pages,), jnp.int32).at[dest.reshape(-1)].set(
      page_indices.reshape(-1), mode="drop")
  return dict(q_len=q_len, kv_len=kv_len, qo_indptr=qo_indptr, kv_indptr=kv_indptr,
              last_page_len=last_page_len, kv_indices=kv_indices, num_tokens=qo_indptr[-1])


def _units(req: dict, spec: DeviceSpec) -> dict:
  """The query tiles of every request, in request order, with the keys each sees."""
  tt = spec.tile_tokens
  unit_start = _exclusive_cumsum(_cdiv(req["q_len"], tt))  # [batch + 1]
  u = jnp.arange(spec.unit_cap, dtype=jnp.int32)
  live = u < unit_start[-1]
  b = jnp.clip(_count_le(unit_start[1:], u), 0, spec.caps.batch - 1)
  r = _take(dict(start=unit_start[:-1], qo=req["q_len"], kv=req["kv_len"]), b)
  qo, kv = r["qo"], r["kv"]
  t0 = (u - r["start"]) * tt
  ntok = jnp.clip(qo - t0, 0, tt)
  extent = kv
  if spec.causal:  # what the unit's last token sees (bottom-right alignment)
    extent = jnp.clip(kv - qo + t0 + ntok, 0, kv)
  begin = jnp.zeros_like(extent)
  if spec.window_left >= 0:  # from the unit's first token's window on
    begin = jnp.clip(kv - qo + t0 - spec.window_left, 0, extent)
  keys = jnp.where(live, extent - begin, 0)
  return dict(live=live, request=b, t0=t0, ntok=ntok, begin=begin, keys=keys, qo=qo, kv=kv,
              count=unit_start[-1], unit_start=unit_start)


def _enumerate_pieces(n_unit, unit_columns: dict, spec: DeviceSpec):
  """Piece slots [0, piece_cap) for units of n_unit pieces each (0 for units that do not
  exist): the unit of each, its index in the unit, whether it is live, the unit's first
  piece, and `unit_columns` of its unit."""
  piece_end = _cumsum(n_unit)
  p = jnp.arange(spec.piece_cap, dtype=jnp.int32)
  u = jnp.clip(_count_le(piece_end, p), 0, spec.unit_cap - 1)
  cols = _take(dict(unit_columns, n=n_unit, end=piece_end), u)
  first = cols["end"] - cols["n"]
  return dict(unit=u, index=p - first, live=p < piece_end[-1], first=first), cols


def _piece_cost(spec, begin, end, live):
  return jnp.where(live, spec.per_piece * (end - begin + _ITEM_COST), 0)


def _deal_bins(units: dict, spec: DeviceSpec) -> dict:
  """Units laid end to end by cost and cut at the bin boundaries (module docstring)."""
  P, nb_cap = spec.per_piece, spec.caps.bins
  quantum = 1 << _line_shift(spec)
  keys, live = units["keys"], units["live"]
  cost = jnp.where(live, _cdiv(P * (keys + _ITEM_OVERHEAD), quantum), 0)
  line_end = _cumsum(cost)
  line_start = line_end - cost
  total = line_end[-1]
  bins = jnp.clip(_cdiv(total, max(1, P * _MIN_BIN_KEYS // quantum)), 1, nb_cap)
  # Boundary i (1 <= i < bins) at i / bins of the line, computed without overflow.
  i = jnp.arange(1, nb_cap, dtype=jnp.int32)
  boundary = i * _div(total, bins) + _div(i * _rem(total, bins), bins)
  boundary = jnp.where(i < bins, boundary, _INT32_MAX)
  u = jnp.clip(_count_le(line_end, boundary), 0, spec.unit_cap - 1)
  at = _take(dict(start=line_start, keys=keys), u)
  offset = _div(jnp.maximum(boundary - at["start"], 0) * quantum, P) - _ITEM_OVERHEAD
  cut = jnp.floor_divide(offset + _CUT_ALIGN // 2, _CUT_ALIGN) * _CUT_ALIGN
  # Bins hold at least _MIN_BIN_KEYS keys, so the cuts inside one unit lie at least
  # _MIN_BIN_KEYS - _CUT_ALIGN > _MIN_PIECE apart: only a unit's first and last cut can
  # leave a short piece, which these two tests drop.
  valid = (i < bins) & (cut >= _MIN_PIECE) & (at["keys"] - cut >= _MIN_PIECE)
  n_unit = jnp.where(live, 1, 0) + _segment_sum(valid.astype(jnp.int32), u, spec.unit_cap)
  rank = _cumsum(valid.astype(jnp.int32)) - 1
  cuts = _segment_sum(jnp.where(valid, cut, 0), jnp.where(valid, rank, nb_cap), nb_cap)

  pc, cols = _enumerate_pieces(n_unit, dict(keys=keys, start=line_start), spec)
  j, n = pc["index"], cols["n"]
  before = pc["first"] - pc["unit"]  # cuts of the units before this one
  last_cut = nb_cap - 1
  a = jnp.where(j > 0, cuts[jnp.clip(before + j - 1, 0, last_cut)], 0)
  b = jnp.where(j < n - 1, cuts[jnp.clip(before + j, 0, last_cut)], cols["keys"])
  # Each piece to the bin holding its middle; then empty bins are squeezed out.
  middle = cols["start"] + _div(P * (_ITEM_OVERHEAD + _div(a + b, 2)), quantum)
  bin_of = jnp.clip(_count_le(boundary, middle), 0, nb_cap - 1)
  filled = _segment_sum(pc["live"].astype(jnp.int32), bin_of, nb_cap) > 0
  bin_of = jnp.maximum(_cumsum(filled.astype(jnp.int32)) - 1, 0)[bin_of]
  bin_cost = _segment_sum(_piece_cost(spec, a, b, pc["live"]), bin_of, nb_cap)
  pieces = dict(n_unit=n_unit, unit=pc["unit"], index=j, live=pc["live"], begin=a, end=b,
                bin=bin_of)
  return dict(pieces=pieces, worst=jnp.max(bin_cost), bins_used=bins)


def _deal_equal(units: dict, bins, spec: DeviceSpec) -> dict:
  """Every unit in pieces of at most `chunk` keys, one piece per bin (module docstring)."""
  keys, live, count = units["keys"], units["live"], units["count"]
  # Only batches of at most `bins` units qualify, so the first bin_cap units are all.
  ncand = min(spec.unit_cap, spec.caps.bins)
  k, lv = keys[:ncand], live[:ncand]

  def fits(chunk16):  # chunk16: [C] chunk sizes in units of _PIECE_ALIGN keys
    chunk = chunk16[:, None] * _PIECE_ALIGN
    pieces = jnp.where(lv[None, :], jnp.maximum(1, _cdiv(k[None, :], chunk)), 0)
    return jnp.sum(pieces, axis=1) <= bins

  # The smallest chunk in [lo, hi] whose pieces fit; hi (the longest unit) always does.
  min16 = _MIN_PIECE // _PIECE_ALIGN
  lo = jnp.maximum(min16, _cdiv(_cdiv(jnp.sum(k), bins), _PIECE_ALIGN))
  hi = jnp.maximum(min16, _cdiv(jnp.max(k, initial=0), _PIECE_ALIGN))
  hi = jnp.where((lo >= hi) | ~fits(lo[None])[0], hi, lo)
  lo = jnp.minimum(lo, hi)
  steps = jnp.arange(1, _SEARCH_WIDTH + 1, dtype=jnp.int32)
  for _ in range(_search_rounds(spec)):  # fits(hi); lo == hi or not fits(lo)
    gap = hi - lo
    cand = (lo + _div(gap, _SEARCH_WIDTH) * steps
            + _div(_rem(gap, _SEARCH_WIDTH) * steps, _SEARCH_WIDTH))
    ok = fits(cand)
    hi = jnp.min(jnp.where(ok, cand, hi))
    lo = jnp.maximum(lo, jnp.max(jnp.where(ok, lo, cand)))
  chunk = hi * _PIECE_ALIGN

  n_unit = jnp.where(live, jnp.maximum(1, _cdiv(keys, chunk)), 0)
  pc, cols = _enumerate_pieces(n_unit, dict(keys=keys), spec)
  j, kk, n1 = pc["index"], cols["keys"], jnp.maximum(cols["n"], 1)

  def boundary(m):  # the m-th of n equal parts, rounded to _PIECE_ALIGN, without overflow
    exact = _div(kk, n1) * m + _div(_rem(kk, n1) * m, n1)
    return _div(exact + _PIECE_ALIGN // 2, _PIECE_ALIGN) * _PIECE_ALIGN

  a = jnp.where(j > 0, boundary(j), 0)
  b = jnp.where(j + 1 < n1, boundary(j + 1), kk)
  pieces = dict(n_unit=n_unit, unit=pc["unit"], index=j, live=pc["live"], begin=a, end=b,
                bin=jnp.arange(spec.piece_cap, dtype=jnp.int32))
  worst = jnp.max(_piece_cost(spec, a, b, pc["live"]))
  return dict(pieces=pieces, worst=worst, applies=(count > 0) & (count <= bins))


def _work_items(units: dict, pieces: dict, spec: DeviceSpec):
  """The work section [work_cap, 8], each live item's bin (bin_cap for padding), and
  the number of live items."""
  P, G, caps = spec.per_piece, spec.group_size, spec.caps
  piece_columns = dict(unit=pieces["unit"], index=pieces["index"],
                       live=pieces["live"].astype(jnp.int32), begin=pieces["begin"],
                       end=pieces["end"], bin=pieces["bin"])
  w = jnp.arange(caps.work, dtype=jnp.int32)
  pc = piece_columns if P == 1 else _take(piece_columns, _div(w, P))
  uc = _take(dict(request=units["request"], t0=units["t0"], ntok=units["ntok"],
                  begin=units["begin"], qo=units["qo"], kv=units["kv"], n=pieces["n_unit"]),
             pc["unit"])
  t0 = uc["t0"]
  if P == 1:
    row_begin, row_end = t0 * G, (t0 + uc["ntok"]) * G
  else:  # one token, heads [k tile_rows, (k + 1) tile_rows)
    k = _rem(w, P)
    row_begin = t0 * G + k * spec.tile_rows
    row_end = t0 * G + jnp.minimum(G, (k + 1) * spec.tile_rows)
  split = jnp.where(uc["n"] == 1, -1, pc["index"])
  fields = [uc["request"], row_begin, row_end, uc["begin"] + pc["begin"], uc["begin"] + pc["end"],
            split, uc["qo"], uc["kv"]]
  live = pc["live"] > 0
  work = jnp.where(live[:, None], jnp.stack(fields, axis=1), -1)
  item_bins = jnp.where(live, pc["bin"], caps.bins)
  return work, item_bins, jnp.sum(pc["live"])


def _tokens(req: dict, units: dict, n_unit, spec: DeviceSpec):
  """merge_indptr [token_cap + 1], and each query row's request and key position for
  the append (-1 past the batch's tokens)."""
  caps, tt = spec.caps, spec.tile_tokens
  t = jnp.arange(caps.tokens, dtype=jnp.int32)
  qo_indptr = req["qo_indptr"]
  live = t < req["num_tokens"]
  b = jnp.clip(_count_le(qo_indptr[1:], t), 0, caps.batch - 1)
  r = _take(dict(start=qo_indptr[:-1], units=units["unit_start"][:-1], qo=req["q_len"],
                 kv=req["kv_len"]), b)
  i = t - r["start"]  # index within the request
  u = jnp.clip(r["units"] + _div(jnp.maximum(i, 0), tt), 0, spec.unit_cap - 1)
  pieces = n_unit[u]
  merge_indptr = _exclusive_cumsum(jnp.where(live & (pieces > 1), pieces, 0))
  position = r["kv"] - r["qo"] + i
  return merge_indptr, jnp.where(live, b, -1), jnp.where(live, position, -1)


def _assemble(sections: dict, caps: planning.Capacities):
  """The plan buffer: every section at its PlanLayout offset, alignment gaps zero."""
  layout = planning.plan_sections(caps)
  parts, at = [], 0
  for name, (offset, length) in sorted(((n, s) for n, s in layout.items() if n != "size"),
                                       key=lambda item: item[1][0]):
    x = sections[name].astype(jnp.int32)
    assert x.shape == (length,), (name, x.shape, length)
    parts += [jnp.zeros((offset - at,), jnp.int32), x]
    at = offset + length
  parts.append(jnp.zeros((layout["size"] - at,), jnp.int32))
  return jnp.concatenate(parts)
