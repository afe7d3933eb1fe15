"""The systems the benchmark times, ours and the baselines, on one prepared `Case`.

Every system gets the same random cache, queries and page sets. A system that cannot
run here raises `Skip` with the reason (printed, and kept in the JSON); any other
exception is reported as a failure of that system only.

Each `run_*` returns a dict: the timing (see bench_timing), `rel_err` of its output
against the jax.numpy paged reference on the first page set (||out - ref|| / ||ref||
in float64; bf16 kernels land near 1e-3..1e-2), and, for ours and FlashInfer, host
costs of planning.

A row's features (bench_workloads.Features: fp8 cache, soft-cap, window, sinks, fixed
splits) reach ours and FlashInfer through their own plan()/run() arguments, and the
reference through reference.py's; the baselines without them skip such rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from jax_pagedattn import bench_timing as timing
from jax_pagedattn import bench_workloads as wl

DECODE_SYSTEMS = ("ours-tc", "ours-cc", "cascade", "jnp", "pallas", "flashinfer-tc",
                  "flashinfer-cc")
PREFILL_SYSTEMS = ("ours", "jnp", "xla-dense", "cudnn-dense", "flashinfer-fa3", "flashinfer-fa2")
SYSTEMS = {"decode": DECODE_SYSTEMS, "prefill": PREFILL_SYSTEMS}


class Skip(Exception):
  """The system is absent or does not apply here; the message says why."""


@dataclasses.dataclass
class Options:
  pallas_interpret: bool = False
  check: bool = True
  host: bool = True
  fi_workspace_mb: int = 256


@dataclasses.dataclass
class Case:
  """A workload with its inputs on the device, shared by every system."""

  w: wl.Workload
  pool: int
  sets: list
  cache: object  # jax.Array, combined 5-D
  q: object  # jax.Array [tokens, Hqo, D]
  cfg: timing.TimingConfig
  opts: Options
  platform: str  # jax device platform: "cpu" or "gpu"
  sinks: object = None  # jax.Array float32 [Hqo] where the row has sinks (make_sinks)
  _ref: object = None
  _ragged: object = None

  @property
  def rotations(self) -> int:
    return len(self.sets)

  def ragged_kv(self) -> tuple:
    """(k, v) of each page set as ragged K/V (bench_workloads.ragged_kv), made once."""
    if self._ragged is None:
      self._ragged = tuple(wl.ragged_kv(self.w, self.cache, s) for s in self.sets)
    return self._ragged

  def reference(self) -> np.ndarray:
    """float32 output of the jax.numpy paged reference on page set 0 (computed once)."""
    if self._ref is None and (self.w.pos_encoding != "NONE" or self.w.features.changes_math
                              or len(reference_groups(self.w)) > 1):
      # The jnp baseline has no position encodings and none of the features: the eager
      # oracle does them (it reads an fp8 cache as float32). It also takes batches too
      # large for one padded jnp step (lognormal16's long prompts asked XLA for 128 GiB).
      self._ref = self._oracle()
    if self._ref is None:
      import jax

      consts, rots = _jnp_args(self)
      out = jax.jit(functools.partial(_jnp_step, w=self.w))(self.q, consts, rots[0])
      self._ref = np.asarray(out, np.float32)
    return self._ref

  def _oracle(self) -> np.ndarray:
    """reference.batch_attention with the row's position encoding and features on page
    set 0, a few consecutive requests per call (reference_groups)."""
    from jax_pagedattn import reference

    w, s, f = self.w, self.sets[0], self.w.features
    qo = wl.qo_indptr(w)
    outs = []
    for b0, b1 in reference_groups(w):
      p0, p1 = s.kv_indptr[b0], s.kv_indptr[b1]
      out, _ = reference.batch_attention(
          self.q[qo[b0]:qo[b1]], self.cache, qo[b0:b1 + 1] - qo[b0],
          s.kv_indptr[b0:b1 + 1] - p0, s.kv_indices[p0:p1], s.kv_last_page_len[b0:b1],
          kv_layout=w.kv_layout, causal=w.causal, pos_encoding_mode=w.pos_encoding,
          logits_soft_cap=f.logits_soft_cap, window_left=f.window_left, sinks=self.sinks,
          **fp8_scales(w))
      outs.append(np.asarray(out, np.float32))
    return np.concatenate(outs)


# float32 elements of the eager oracle's largest padded tensor per call (4 GiB).
REFERENCE_ELEMENTS = 1 << 30


def reference_groups(w: wl.Workload) -> list[tuple[int, int]]:
  """Consecutive request ranges [b0, b1) for the eager oracle, each small enough that its
  padded tensors stay under REFERENCE_ELEMENTS: the logits (requests x queries x query
  heads x keys) and the gathered K and V (requests x keys x kv heads x head_dim, twice),
  with queries and keys padded to powers of two as reference.batch_attention pads them.
  In one call, a batch like lognormal16's 8k-token prompts would not fit the device."""
  def pow2(n):
    return 1 << (max(int(n), 1) - 1).bit_length()

  groups, start, q_max, k_max = [], 0, 0, 0
  for b in range(w.batch):
    q, k = max(q_max, int(w.qo_lens[b])), max(k_max, int(w.kv_lens[b]))
    per_key = max(pow2(q) * w.num_qo_heads, 2 * w.num_kv_heads * w.head_dim)
    size = (b - start + 1) * pow2(k) * per_key
    if b > start and size > REFERENCE_ELEMENTS:
      groups.append((start, b))
      start, q, k = b, int(w.qo_lens[b]), int(w.kv_lens[b])
    q_max, k_max = q, k
  groups.append((start, w.batch))
  return groups


def fp8_scales(w: wl.Workload) -> dict:
  """k_scale / v_scale of a run() (ours, FlashInfer's, the reference's): the fixed
  dequantisation scales for an fp8 cache, none otherwise."""
  if not w.features.kv_dtype:
    return {}
  return dict(k_scale=wl.FP8_K_SCALE, v_scale=wl.FP8_V_SCALE)


def _our_plan_options(w: wl.Workload) -> dict:
  """The row's features as our plan()'s arguments (the same for every wrapper)."""
  f = w.features
  return dict(kv_data_type=w.kv_dtype, logits_soft_cap=f.logits_soft_cap or None,
              window_left=f.window_left,
              fixed_split_size=f.fixed_split_size if f.fixed_split_size > 0 else None,
              disable_split_kv=f.disable_split_kv)


def _our_run_options(case: Case) -> dict:
  """The row's features as our run()'s arguments."""
  return dict(sinks=case.sinks, **fp8_scales(case.w))


def _no_features(case: Case, system: str, *, splits: bool = False) -> None:
  """Skips a system that has none of the row's features; `splits`: nor a planner whose
  splits could be fixed (a system without one computes a fixed-split row unchanged)."""
  f = case.w.features
  if not splits:
    f = dataclasses.replace(f, fixed_split_size=-1, disable_split_kv=False)
  if f.labels():
    raise Skip(f"{system} has no {', '.join(f.labels())}")


def check_output(case: Case, out_fn) -> dict:
  """{'rel_err': ...} of out_fn() (float32 numpy, ragged rows) against the reference,
  or {'check_error': ...} when either side fails (say the reference runs out of memory
  on a huge batch): a failed check must not turn into a failed timing."""
  if not case.opts.check:
    return {}
  try:
    return {"rel_err": rel_err(out_fn(), case.reference())}
  except Exception as e:  # noqa: BLE001
    return {"check_error": f"{type(e).__name__}: {str(e).strip()[:300]}"}


def rel_err(out, ref) -> float:
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  if out.shape != ref.shape:
    raise ValueError(f"output shape {out.shape} != reference shape {ref.shape}")
  denom = np.linalg.norm(ref)
  return float(np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0))


# ---------------------------------------------------------------- JAX systems


def _time_jax_system(case: Case, step, q0, consts, rots, to_ragged=None) -> dict:
  """Compiles one chain of `inner` ops cycling over `rots` and times it.

  The chain also returns the first op's output (on the original q, page set 0) for
  the correctness check, so the check costs no second compilation.
  """
  import jax

  inner = max(1, case.cfg.inner)

  def chain(q, consts, rots):
    first = None
    for i in range(inner):
      q = step(q, consts, rots[i % len(rots)])
      first = q if first is None else first
    return q, first

  fn = jax.jit(chain)
  q_end, first = fn(q0, consts, rots)

  def out_fn():
    out = np.asarray(first, np.float32)
    return out if to_ragged is None else to_ragged(out)

  result = check_output(case, out_fn)
  del q_end
  t = timing.time_jax_chain(lambda q, c, r: fn(q, c, r)[0], q0, (consts, rots),
                            ops_per_call=inner, cfg=case.cfg)
  result.update(t.as_dict())
  return result


def _platform_name(case: Case) -> str:
  return "cuda" if case.platform == "gpu" else case.platform


def run_ours(case: Case, *, tensor_cores: bool = False) -> dict:
  import jax

  import jax_pagedattn

  native = jax_pagedattn.native_platforms()
  if _platform_name(case) not in native:
    raise Skip(f"jax_pagedattn has no native kernel for {case.platform} in this build "
               f"(native: {native or 'none'}); it would time its jax.numpy fallback")
  w = case.w
  if w.ragged:
    return _run_ours_ragged(case)
  decode = w.kind == "decode"
  if decode:
    wrapper = jax_pagedattn.BatchDecodeWithPagedKVCacheWrapper(
        kv_layout=w.kv_layout, use_tensor_cores=tensor_cores)

    def plan(s):
      return wrapper.plan(s.kv_indptr, s.kv_indices, s.kv_last_page_len, w.num_qo_heads,
                          w.num_kv_heads, w.head_dim, w.page_size,
                          pos_encoding_mode=w.pos_encoding, q_data_type=w.dtype,
                          **_our_plan_options(w))
  else:
    wrapper = jax_pagedattn.BatchPrefillWithPagedKVCacheWrapper(kv_layout=w.kv_layout)
    qo = wl.qo_indptr(w)

    def plan(s):
      return wrapper.plan(qo, s.kv_indptr, s.kv_indices, s.kv_last_page_len, w.num_qo_heads,
                          w.num_kv_heads, w.head_dim, w.page_size, causal=w.causal,
                          pos_encoding_mode=w.pos_encoding, q_data_type=w.dtype,
                          **_our_plan_options(w))

  plans = tuple(plan(s) for s in case.sets)
  # The kernel time is timed with each plan already on the device, as FlashInfer's
  # run() is (its plan() copies the plan over): passed as host numpy buffers, the plans
  # would be copied on every call of the chain and that copy counted as op time. What
  # moving a fresh plan costs is measured separately below (step_with_plan, loop step).
  device_plans = tuple(jax.tree.map(jax.device_put, p) for p in plans)
  options = _our_run_options(case)

  def step(q, cache, p):
    return wrapper.run(q, cache, plan=p, **options)

  result = _time_jax_system(case, step, case.q, case.cache, device_plans)
  if case.opts.host:
    s0 = case.sets[0]
    one = jax.jit(step)
    result.update(_host_costs(
        case, result, plans[0].config,
        (None if decode else wl.qo_indptr(w), s0.kv_indptr, s0.kv_indices, s0.kv_last_page_len),
        make_plan=lambda: plan(s0), call=lambda q, p: one(q, case.cache, p),
        decode_names=decode))
  return result


def _run_ours_ragged(case: Case) -> dict:
  """Ours on ragged K/V: BatchPrefillWithRaggedKVCacheWrapper, one plan (every page set
  has the same lengths), the calls cycling over the sets' K/V."""
  import jax

  import jax_pagedattn

  w = case.w
  wrapper = jax_pagedattn.BatchPrefillWithRaggedKVCacheWrapper(kv_layout=w.kv_layout)
  qo, kv = wl.qo_indptr(w), wl.kv_indptr(w)

  def plan():
    return wrapper.plan(qo, kv, w.num_qo_heads, w.num_kv_heads, w.head_dim, causal=w.causal,
                        pos_encoding_mode=w.pos_encoding, q_data_type=w.dtype,
                        **_our_plan_options(w))

  host_plan = plan()
  device_plan = jax.tree.map(jax.device_put, host_plan)  # on the device, as in run_ours
  options = _our_run_options(case)

  def step(q, p, kv):
    return wrapper.run(q, kv[0], kv[1], plan=p, **options)

  kvs = case.ragged_kv()
  result = _time_jax_system(case, step, case.q, device_plan, kvs)
  if case.opts.host:
    one = jax.jit(step)
    nnz = int(kv[-1])
    # The planner's input: the identity page table of one-key pages (ragged.py).
    tables = (qo, kv, np.arange(nnz, dtype=np.int32),
              np.minimum(np.diff(kv), 1).astype(np.int32))
    result.update(_host_costs(case, result, host_plan.config, tables, make_plan=plan,
                              call=lambda q, p: one(q, p, kvs[0]), decode_names=False))
  result["note"] = "ragged K/V"
  return result


def _host_costs(case: Case, result: dict, config, tables, *, make_plan, call,
                decode_names: bool) -> dict:
  """Host costs of one of our systems: the planner alone on `tables` (its index arrays),
  the wrapper's plan() (`make_plan`), and jitted single-op steps (`call(q, plan)`) with
  a kept and with a fresh plan, alone and pipelined; `result` holds the op's time_us."""
  import jax

  from jax_pagedattn import planning

  cfg = case.cfg
  f = case.w.features
  spec = planning.plan_spec(page_size=config.page_size, group_size=config.group_size,
                            tile_rows=config.tile_rows, causal=config.causal, caps=config.caps,
                            decode_names=decode_names, fixed_split_size=f.fixed_split_size,
                            disable_split_kv=f.disable_split_kv, window_left=f.window_left)
  out = {"plan_host_us": 1e6 * timing.time_host(lambda: planning.plan_host(*tables, spec), cfg),
         "wrapper_plan_us": 1e6 * timing.time_host(make_plan, cfg)}
  kept = make_plan()
  out["step_us"] = 1e6 * timing.time_host(
      lambda: jax.block_until_ready(call(case.q, kept)), cfg)
  out["step_with_plan_us"] = 1e6 * timing.time_host(
      lambda: jax.block_until_ready(call(case.q, make_plan())), cfg)
  out["step_overhead_us"] = out["step_with_plan_us"] - result["time_us"]
  # A serving loop plans step n + 1 while the device runs step n: steps with a fresh
  # plan each, dispatched back to back, each one's output the next one's query. Per
  # step in the steady state (the loop's fill and final sync cancel, as in the chain
  # timing of time_us); the whole loop's average, from the same loops, beside it.
  steps = 32

  def pipelined(n):
    q = case.q
    for _ in range(n):
      q = call(q, make_plan())
    jax.block_until_ready(q)

  steady_s, whole_s = timing.time_host_steady(pipelined, steps, cfg)
  out["step_pipelined_us"] = 1e6 * steady_s
  out["pipelined_overhead_us"] = out["step_pipelined_us"] - result["time_us"]
  out["step_pipelined_whole_loop_us"] = 1e6 * whole_s
  return out


def run_cascade(case: Case) -> dict:
  """Ours, MultiLevelCascadeAttentionWrapper on a shared-prefix decode batch: level 0 all
  queries against the shared pages at once, level 1 each request's own pages, merged.
  Its time beside our plain decode of the same batch is the report's `vs_plain_decode`."""
  import jax

  import jax_pagedattn

  w = case.w
  if w.kind != "decode" or w.shared_prefix == 0:
    raise Skip("cascade needs a decode batch with a shared prefix (--preset cascade, or "
               "--shared-prefix)")
  _no_pos_encoding(case, "the cascade (positions would count within each level)")
  _no_features(case, "the cascade row", splits=True)
  if _platform_name(case) not in jax_pagedattn.native_platforms():
    raise Skip(f"jax_pagedattn has no native kernel for {case.platform} in this build")
  wrapper = jax_pagedattn.MultiLevelCascadeAttentionWrapper(2, kv_layout=w.kv_layout)

  def plan(s):
    levels = wl.cascade_levels(w, s)
    return wrapper.plan(*(list(a) for a in zip(*levels)), w.num_qo_heads, w.num_kv_heads,
                        w.head_dim, w.page_size, q_data_type=w.dtype)

  plans = tuple(plan(s) for s in case.sets)
  device_plans = tuple(jax.tree.map(jax.device_put, p) for p in plans)  # as in run_ours

  def step(q, cache, p):
    return wrapper.run(q, cache, plans=p)

  result = _time_jax_system(case, step, case.q, case.cache, device_plans)
  if case.opts.host:
    result["wrapper_plan_us"] = 1e6 * timing.time_host(lambda: plan(case.sets[0]), case.cfg)
  result["note"] = "GB/s counts the shared prefix once per request"
  return result


def _no_pos_encoding(case: Case, system: str) -> None:
  if case.w.pos_encoding != "NONE":
    raise Skip(f"{system} has no {case.w.pos_encoding} inside the attention")


def _jnp_args(case: Case):
  import jax.numpy as jnp

  w = case.w
  d2r, _, r2d = wl.ragged_maps(w)
  consts = dict(cache=case.cache, kv_lens=jnp.asarray(w.kv_lens, jnp.int32),
                qo_lens=jnp.asarray(w.qo_lens, jnp.int32), d2r=jnp.asarray(d2r),
                r2d=jnp.asarray(r2d))
  rots = tuple(jnp.asarray(s.block_table) for s in case.sets)
  return consts, rots


def _jnp_step(q, consts, table, *, w: wl.Workload):
  """Dense-per-request paged attention in jax.numpy (the 'jnp reference' of DESIGN §6).

  Gathers each request's pages into [B, max_pages, page, Hkv, D] (two gathers on the
  combined cache viewed as [2 * pages, ...]: K is page 2p, V page 2p + 1, so no strided
  slice of the cache is ever materialised), then einsum attention with float32 logits
  and softmax, masking keys past each request's length and, if causal, after the query.
  """
  import jax.numpy as jnp

  cache = consts["cache"]
  batch, max_pages = table.shape
  hkv, g, d, s = w.num_kv_heads, w.group, w.head_dim, w.page_size
  flat = cache.reshape((-1,) + cache.shape[2:])
  k = jnp.take(flat, 2 * table, axis=0)
  v = jnp.take(flat, 2 * table + 1, axis=0)
  kv_sub = "bpsnd" if w.kv_layout == "NHD" else "bpnsd"
  if w.kind == "decode":
    lq = 1
    qd = q.reshape(batch, 1, hkv, g, d)
  else:
    lq = consts["d2r"].shape[1]
    qd = q[consts["d2r"]].reshape(batch, lq, hkv, g, d)
  logits = jnp.einsum(f"bqngd,{kv_sub}->bngqps", qd, k, preferred_element_type=jnp.float32)
  logits = logits * (1.0 / math.sqrt(d))
  kpos = (jnp.arange(max_pages)[:, None] * s + jnp.arange(s)[None, :])[None, None]  # [1,1,P,S]
  kv_lens = consts["kv_lens"][:, None, None, None]
  valid = kpos < kv_lens  # [B, 1, P, S]
  if w.causal:
    qpos = (consts["kv_lens"] - consts["qo_lens"])[:, None] + jnp.arange(lq)[None, :]
    valid = valid & (kpos <= qpos[:, :, None, None])  # [B, Lq, P, S]
  valid = valid[:, None, None]  # [B, 1, 1, Lq|1, P, S]
  logits = jnp.where(valid, logits, -jnp.inf)
  m = jnp.max(logits, axis=(-2, -1), keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(valid, jnp.exp(logits - m), 0.0)
  l = jnp.sum(p, axis=(-2, -1))  # [B, Hkv, G, Lq]
  o = jnp.einsum(f"bngqps,{kv_sub}->bqngd", p.astype(v.dtype), v,
                 preferred_element_type=jnp.float32)
  l = jnp.transpose(l, (0, 3, 1, 2))[..., None]
  o = (o / jnp.where(l > 0, l, 1.0)).astype(q.dtype)
  if w.kind == "decode":
    return o.reshape(batch, w.num_qo_heads, d)
  return o.reshape(batch * lq, w.num_qo_heads, d)[consts["r2d"]]


def run_jnp(case: Case) -> dict:
  _no_pos_encoding(case, "the jnp baseline")
  _no_features(case, "the jnp baseline")
  consts, rots = _jnp_args(case)
  result = _time_jax_system(case, functools.partial(_jnp_step, w=case.w), case.q, consts, rots)
  # Its rel_err against itself says nothing; on batches small enough for the eager
  # per-request oracle of reference.py, check it against that instead.
  result.pop("rel_err", None)
  w = case.w
  # The masked reference costs tokens x all keys of the batch: small batches only.
  if case.opts.check and w.tokens * int(w.kv_lens.sum()) <= 1 << 24:
    import jax

    from jax_pagedattn import reference

    s = case.sets[0]
    k_pages, v_pages = reference.split_paged_kv_cache(case.cache, w.kv_layout)
    oracle = jax.jit(functools.partial(reference.batch_attention_masked, page_size=w.page_size,
                                       causal=w.causal))
    out, _ = oracle(case.q, k_pages, v_pages, wl.qo_indptr(w), s.kv_indptr, s.kv_indices,
                    s.kv_last_page_len, w.tokens)
    result.update(check_output(case, lambda: np.asarray(out, np.float32)))
    result["note"] = "rel err: this reference vs reference.py's masked one"
  else:
    result["note"] = "the oracle of the rel err column"
  return result


def _pallas_tables(w: wl.Workload, sets, k_splits_max=16, block_pages=8):
  """Pallas' constraints: pages per sequence divisible by k_splits, and each split's
  pages a multiple of the compute block when longer than it. Pads the block tables."""
  max_pages = int(w.pages_per_request.max())
  k_splits = min(k_splits_max, 1 << max(0, (max_pages - 1).bit_length()))
  per_split = -(-max_pages // k_splits)
  if per_split > block_pages:
    per_split = -(-per_split // block_pages) * block_pages
  else:
    per_split = 1 << (per_split - 1).bit_length()  # Triton block shapes are powers of two
  width = per_split * k_splits
  tables = []
  for s in sets:
    t = np.repeat(s.block_table[:, :1], width, axis=1)
    t[:, :max_pages] = s.block_table
    tables.append(t)
  return tables, k_splits, min(per_split, block_pages)


def run_pallas(case: Case) -> dict:
  import jax
  import jax.numpy as jnp

  _no_pos_encoding(case, "the Pallas GPU kernel")
  _no_features(case, "the Pallas GPU kernel")
  try:
    from jax.experimental.pallas.ops.gpu import paged_attention as pallas_paged
  except Exception as e:  # noqa: BLE001 (any import failure means: absent)
    raise Skip(f"jax.experimental.pallas.ops.gpu.paged_attention not importable: "
               f"{type(e).__name__}: {e}") from None
  if case.platform != "gpu" and not case.opts.pallas_interpret:
    raise Skip("the Pallas GPU kernel needs a GPU (--pallas-interpret runs it in the "
               "interpreter, which checks the input adaptation but times nothing useful)")
  w = case.w
  # Pallas wants K and V as [Hkv, pages, page, D]: one transposed copy, made untimed.
  k, v = case.cache[:, 0], case.cache[:, 1]
  perm = (2, 0, 1, 3) if w.kv_layout == "NHD" else (1, 0, 2, 3)
  kp, vp = jax.block_until_ready((jnp.transpose(k, perm), jnp.transpose(v, perm)))
  tables, k_splits, block_pages = _pallas_tables(w, case.sets)
  lengths = jnp.asarray(w.kv_lens, jnp.int32)

  scale = 1.0 / math.sqrt(w.head_dim)

  def step(q, consts, table):
    kp, vp, lengths = consts
    # The Pallas kernel applies no softmax scale: fold it into q (a [B, Hqo, D] op).
    q = (q * scale).astype(q.dtype)
    return pallas_paged.paged_attention(q, kp, vp, table, lengths, k_splits=k_splits,
                                        pages_per_compute_block=block_pages,
                                        interpret=case.opts.pallas_interpret)

  rots = tuple(jnp.asarray(t) for t in tables)
  result = _time_jax_system(case, step, case.q, (kp, vp, lengths), rots)
  result["note"] = f"k_splits={k_splits}, pages_per_compute_block={block_pages}"
  return result


def run_dense(case: Case, *, implementation: str) -> dict:
  """jax.nn.dot_product_attention on contiguous [B, L, H, D] K/V (not paged): the
  'XLA dense' and 'cuDNN via jax' columns of DESIGN §6."""
  import jax
  import jax.numpy as jnp

  w = case.w
  _no_pos_encoding(case, "jax.nn.dot_product_attention")
  _no_features(case, "jax.nn.dot_product_attention (as timed here)")
  if not np.array_equal(w.qo_lens, w.kv_lens):
    raise Skip("dense baselines need kv_len == qo_len (no --prefix): jax.nn causal masks "
               "are top-left aligned")
  if implementation == "cudnn" and case.platform != "gpu":
    raise Skip("cuDNN attention needs a GPU")
  d2r, _, r2d = wl.ragged_maps(w)
  lq = d2r.shape[1]
  q0 = jax.block_until_ready(case.q[jnp.asarray(d2r)])  # [B, Lq, Hqo, D]
  # Equal lengths need no length masks (cuDNN's fastest path); otherwise pass them.
  uniform = bool(np.all(w.qo_lens == lq))
  lens = None if uniform else jnp.asarray(w.qo_lens, jnp.int32)

  def dense_kv(table):
    # [B, P, 2, page..] -> [B, P * page, Hkv, D] for K and V, cut to the longest request.
    g = case.cache[jnp.asarray(table)]  # [B, P, 2, page, Hkv, D] (NHD)
    if w.kv_layout == "HND":
      g = jnp.swapaxes(g, 3, 4)
    return (g[:, :, 0].reshape(w.batch, -1, w.num_kv_heads, w.head_dim)[:, :lq],
            g[:, :, 1].reshape(w.batch, -1, w.num_kv_heads, w.head_dim)[:, :lq])

  rots = tuple(jax.block_until_ready(dense_kv(s.block_table)) for s in case.sets)

  def step(q, lens, kv):
    return jax.nn.dot_product_attention(q, kv[0], kv[1], is_causal=w.causal,
                                        query_seq_lengths=lens, key_value_seq_lengths=lens,
                                        implementation=implementation)

  def to_ragged(out):
    return out.reshape(w.batch * lq, w.num_qo_heads, w.head_dim)[r2d]

  return _time_jax_system(case, step, q0, lens, rots, to_ragged=to_ragged)


# ---------------------------------------------------------------- FlashInfer


def _flashinfer(case: Case):
  if case.platform != "gpu":
    raise Skip("JAX is not on a GPU here, so FlashInfer cannot run side by side")
  try:
    import torch
  except Exception as e:  # noqa: BLE001
    raise Skip(f"torch not importable: {type(e).__name__}: {e}") from None
  if not torch.cuda.is_available():
    raise Skip("torch sees no CUDA device")
  try:
    import flashinfer
  except Exception as e:  # noqa: BLE001
    raise Skip(f"flashinfer not importable: {type(e).__name__}: {e}") from None
  return torch, flashinfer


def to_torch(x):
  """A JAX device array as a torch CUDA tensor: shared through DLPack when possible,
  else copied through host memory (bf16 travels as its uint16 bits). An fp8 array
  crosses as its bytes (DLPack may not know fp8), bitcast on the device, and is viewed
  as torch's fp8 type of the same name."""
  import torch

  name = x.dtype.name
  if name in wl.FP8_KV_DTYPES:
    import jax

    raw = jax.block_until_ready(jax.lax.bitcast_convert_type(x, np.uint8))
    return to_torch(raw).view(getattr(torch, name))
  try:
    return torch.from_dlpack(x)
  except Exception:  # noqa: BLE001
    a = np.asarray(x)
    if name == "bfloat16":
      return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16).cuda()
    return torch.from_numpy(a.copy()).cuda()


def _torch_dtype(torch, name: str):
  return getattr(torch, name)  # bfloat16, float16, float32, float8_e4m3fn, float8_e5m2


def _flashinfer_gaps(w: wl.Workload, mode: str) -> list[str]:
  """What FlashInfer 0.7.2 cannot do of a row's features in `mode` (tc / cc decode,
  fa2 / fa3 prefill), read from its source: sinks come only through
  BatchAttentionWithAttentionSinkWrapper, a paged prefill-kernel wrapper (so also
  tensor-core decode) whose AttentionSink variant applies no soft-cap; the fixed-split
  options reach only the FA2 planners, and the CUDA-core decode planner rejects
  fixed_split_size."""
  f = w.features
  gaps = []
  if f.sinks:
    if mode == "cc":
      gaps.append("sinks on CUDA-core decode (its sink wrapper runs the prefill kernel: "
                  "flashinfer-tc)")
    if w.ragged:
      gaps.append("sinks on ragged K/V")
    if f.logits_soft_cap > 0:
      gaps.append("soft-cap beside sinks (BatchAttentionWithAttentionSinkWrapper)")
  if mode == "fa3" and (f.fixed_split_size > 0 or f.disable_split_kv):
    gaps.append("fixed_split_size / disable_split_kv on FA3 (FA2's planner only)")
  if mode == "cc" and f.fixed_split_size > 0:
    gaps.append("fixed_split_size on CUDA-core decode (tensor-core decode only)")
  return gaps


def _flashinfer_plan_options(w: wl.Workload, torch) -> dict:
  """The row's features as FlashInfer's plan() arguments (decode, prefill, ragged)."""
  f = w.features
  options = dict(q_data_type=_torch_dtype(torch, w.dtype),
                 kv_data_type=_torch_dtype(torch, w.kv_dtype), window_left=f.window_left,
                 logits_soft_cap=f.logits_soft_cap or None)
  if f.fixed_split_size > 0:
    options["fixed_split_size"] = f.fixed_split_size
  if f.disable_split_kv:
    options["disable_split_kv"] = True
  return options


def run_flashinfer(case: Case, *, mode: str) -> dict:
  if mode == "fa3":
    _no_pos_encoding(case, "FlashInfer's FA3 prefill")
  torch, flashinfer = _flashinfer(case)
  w = case.w
  gaps = _flashinfer_gaps(w, mode)
  if gaps:
    raise Skip("FlashInfer 0.7.2 has no " + "; no ".join(gaps))
  cache = to_torch(case.cache)
  q0 = to_torch(case.q)
  workspace = torch.empty(case.opts.fi_workspace_mb << 20, dtype=torch.uint8, device="cuda")
  qo = torch.from_numpy(wl.qo_indptr(w))
  options = _flashinfer_plan_options(w, torch)
  if w.ragged:
    return _run_flashinfer_ragged(case, flashinfer, mode, workspace, qo, q0, options)

  def host_args(s):
    # Index pointers on the host (FlashInfer's plan() reads them there), pages on the GPU.
    return (torch.from_numpy(s.kv_indptr), torch.from_numpy(s.kv_indices).cuda(),
            torch.from_numpy(s.kv_last_page_len))

  args = [host_args(s) for s in case.sets]
  if w.features.sinks:
    # Decode through the sink wrapper: one query per request, the prefill kernel.
    qo_sinks = torch.from_numpy(np.arange(w.batch + 1, dtype=np.int32)) if (
        w.kind == "decode") else qo
    backend = "fa2" if w.kind == "decode" else mode

    def make():
      return flashinfer.BatchAttentionWithAttentionSinkWrapper(
          workspace, w.kv_layout, backend=backend, q_data_type=options["q_data_type"],
          kv_data_type=options["kv_data_type"], head_dim_qk=w.head_dim,
          head_dim_vo=w.head_dim, window_left=w.features.window_left)

    def plan(wrapper, a):
      wrapper.plan(qo_sinks, a[0], a[1], a[2], w.num_qo_heads, w.num_kv_heads, w.head_dim,
                   w.page_size, causal=w.causal, pos_encoding_mode=w.pos_encoding, **options)
  elif w.kind == "decode":
    def make():
      return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
          workspace, w.kv_layout, use_tensor_cores=(mode == "tc"))

    def plan(wrapper, a):
      wrapper.plan(a[0], a[1], a[2], w.num_qo_heads, w.num_kv_heads, w.head_dim, w.page_size,
                   pos_encoding_mode=w.pos_encoding, **options)
  else:
    def make():
      return flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, w.kv_layout, backend=mode)

    def plan(wrapper, a):
      wrapper.plan(qo_indptr=qo, paged_kv_indptr=a[0], paged_kv_indices=a[1],
                   paged_kv_last_page_len=a[2], num_qo_heads=w.num_qo_heads,
                   num_kv_heads=w.num_kv_heads, head_dim_qk=w.head_dim, page_size=w.page_size,
                   causal=w.causal, pos_encoding_mode=w.pos_encoding, **options)

  # One wrapper per page set: each keeps its own plan, and runs share the workspace
  # (they are sequential on one stream).
  wrappers = []
  for a in args:
    wr = make()
    plan(wr, a)
    wrappers.append(wr)
  run = _flashinfer_run(case)
  result = check_output(case, lambda: run(wrappers[0], q0, cache).float().cpu().numpy())
  n = len(wrappers)
  t = timing.time_torch_chain(lambda i, q: run(wrappers[i % n], q, cache), q0, cfg=case.cfg)
  result.update(t.as_dict())
  if case.opts.host:
    result["wrapper_plan_us"] = 1e6 * timing.time_host(lambda: plan(wrappers[0], args[0]),
                                                       case.cfg)
  result["flashinfer_version"] = getattr(flashinfer, "__version__", "?")
  return result


def _flashinfer_run(case: Case):
  """run(wrapper, q, *kv) with the row's run()-time features: the sinks (the sink
  wrapper's first extra argument; it derives sm_scale, k_scale included, itself) and
  the fp8 scales."""
  scales = fp8_scales(case.w)
  extra = () if case.sinks is None else (to_torch(case.sinks),)

  def run(wrapper, q, *kv):
    return wrapper.run(q, *kv, *extra, **scales)

  return run


def _run_flashinfer_ragged(case: Case, flashinfer, mode, workspace, qo, q0, options) -> dict:
  """FlashInfer's BatchPrefillWithRaggedKVCacheWrapper on the same ragged K/V as ours:
  one plan (every page set has the same lengths), the calls cycling over the sets' K/V."""
  import torch

  w = case.w
  kv = torch.from_numpy(wl.kv_indptr(w))
  wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, w.kv_layout,
                                                            backend=mode)

  def plan():
    wrapper.plan(qo_indptr=qo, kv_indptr=kv, num_qo_heads=w.num_qo_heads,
                 num_kv_heads=w.num_kv_heads, head_dim_qk=w.head_dim, causal=w.causal,
                 pos_encoding_mode=w.pos_encoding, **options)

  plan()
  kvs = [(to_torch(k), to_torch(v)) for k, v in case.ragged_kv()]
  run = _flashinfer_run(case)
  result = check_output(case, lambda: run(wrapper, q0, *kvs[0]).float().cpu().numpy())
  n = len(kvs)
  t = timing.time_torch_chain(lambda i, q: run(wrapper, q, *kvs[i % n]), q0, cfg=case.cfg)
  result.update(t.as_dict())
  if case.opts.host:
    result["wrapper_plan_us"] = 1e6 * timing.time_host(plan, case.cfg)
  result["flashinfer_version"] = getattr(flashinfer, "__version__", "?")
  result["note"] = "ragged K/V"
  return result


RUNNERS = {
    ("decode", "ours-tc"): functools.partial(run_ours, tensor_cores=True),
    ("decode", "ours-cc"): functools.partial(run_ours, tensor_cores=False),
    ("decode", "cascade"): run_cascade,
    ("decode", "jnp"): run_jnp,
    ("decode", "pallas"): run_pallas,
    ("decode", "flashinfer-tc"): functools.partial(run_flashinfer, mode="tc"),
    ("decode", "flashinfer-cc"): functools.partial(run_flashinfer, mode="cc"),
    ("prefill", "ours"): run_ours,
    ("prefill", "jnp"): run_jnp,
    ("prefill", "xla-dense"): functools.partial(run_dense, implementation="xla"),
    ("prefill", "cudnn-dense"): functools.partial(run_dense, implementation="cudnn"),
    ("prefill", "flashinfer-fa3"): functools.partial(run_flashinfer, mode="fa3"),
    ("prefill", "flashinfer-fa2"): functools.partial(run_flashinfer, mode="fa2"),
}


def select_systems(kind: str, spec: str | None) -> list[str]:
  """Systems of a kind named by a comma list; a name also matches by prefix
  ('ours' -> ours-tc, ours-cc; 'flashinfer' -> both FlashInfer modes)."""
  names = SYSTEMS[kind]
  if not spec or spec == "all":
    return list(names)
  chosen = []
  for part in (p.strip() for p in spec.split(",") if p.strip()):
    hits = [n for n in names if n.startswith(part)]
    if not hits:
      continue  # a name of the other kind (e.g. 'pallas' in a prefill sweep)
    chosen.extend(h for h in hits if h not in chosen)
  return chosen


def all_system_names() -> set[str]:
  return set(DECODE_SYSTEMS) | set(PREFILL_SYSTEMS)
