"""`python -m jax_pagedattn.bench`: paged attention timed side by side with baselines.

Subcommands `decode`, `prefill` and `all` (both, sharing one process and one set of
ceilings). Workloads are the DESIGN.md §6 presets (`--preset all`, the default, or a
comma list of names) and/or one custom batch (`--batch`, `--kv-len`); every workload
gets a random cache whose pages sit at random places of the pool.

`--layers L` (decode) times the model-shaped step instead of one op: L attention ops,
each layer with its own cache, sharing one fresh plan per step, against FlashInfer's
plan() plus L run() calls (bench_model.py). The presets `model16` and `model32` are
the headline rows at 16 and 32 layers.

`prefill --ragged` is issue 15's ragged row: the same workloads (names get '-ragged'), with
ours as BatchPrefillWithRaggedKVCacheWrapper and flashinfer-fa2 / flashinfer-fa3 as
FlashInfer's BatchPrefillWithRaggedKVCacheWrapper, both reading every request's keys
contiguous (ragged K/V gathered from the paged cache once, untimed; the other systems
still read the cache as without --ragged).

`--preset cascade` is issue 15's cascade row: 64 requests sharing a 16k-key prefix (the
same pages) plus 512 keys each, timed as plain decode over every request's pages and
as `cascade` (MultiLevelCascadeAttentionWrapper: the prefix read once for the batch);
the cascade's row reports our best plain decode's time over its own. `--shared-prefix N`
gives a custom decode batch such a prefix.

Features (issue 15), on any single-op row: `--kv-dtype float8_e4m3fn|float8_e5m2` (an fp8
cache beside a --dtype query, with fixed k/v dequantisation scales), `--soft-cap C`,
`--window-left W`, `--sinks` (random float32 sink logits per query head),
`--fixed-split-size N` (pages) and `--disable-split-kv`. Each reaches ours and FlashInfer
through their own plan()/run() arguments and the rel-err oracle through reference.py's;
a system without a feature skips the row, saying which (on the GPU our fp8 cache runs
on the CUDA-core decode kernel only; FlashInfer takes sinks through its
BatchAttentionWithAttentionSinkWrapper). A row's name ends with its features
('64x4096-fp8e4m3', '16x32768-win4096'). `--feature-ratio` also times every row without
its features, first, in the same process, and reports each system's time with them
over its time without them (and, for ours, over our best system without them).

Systems, each skipped with a printed reason where absent:
  decode:  ours-tc, ours-cc (use_tensor_cores True / False), cascade (shared-prefix
           batches only), jnp (gather + einsum reference), pallas
           (jax.experimental.pallas.ops.gpu.paged_attention), flashinfer-tc, flashinfer-cc
  prefill: ours, jnp, xla-dense / cudnn-dense (jax.nn.dot_product_attention on
           contiguous K/V: not paged), flashinfer-fa3, flashinfer-fa2

Timing method (details in bench_timing): a JAX system is a jitted chain of `--inner`
ops (each op's output is the next op's query, so nothing is hoisted, dropped or
overlapped), dispatched back to back and timed on the host clock around
`jax.block_until_ready`: each repetition runs `calls` calls (calibrated to ~`--rep-ms`)
and then 2 x `calls`, and the difference over calls x inner is one op's time, so the
fixed cost of starting and ending a repetition (~1 ms on H200 hosts) cancels; after
`--warmup` calls the median over `--reps` such pairs is reported. What a jitted call
still costs the device between calls is charged to its ops, so the default chain is 32
ops long; our plans are on the device, as FlashInfer's are in its run(). FlashInfer is timed
with CUDA events around the same kind of chain, queued behind a busy-wait kernel so that Python's
per-call cost stays out. When one call's K/V bytes are under 2x `--l2-mb`, the calls
cycle over several disjoint page sets (`rotations` in the JSON) so that L2 never holds
the next call's data. Ceilings (device copy GB/s, bf16 matmul TFLOP/s) are measured in
the same run. Host costs: our planner alone (plan_host), wrapper.plan(), and a jitted
single-op step with a fresh plan each call (planning + host-to-device copy + dispatch
+ kernel + sync), reported also minus the kernel time.

Examples:
  python -m jax_pagedattn.bench decode                      # the §6 decode presets
  python -m jax_pagedattn.bench all --json b.json --plot b.png
  python -m jax_pagedattn.bench decode --preset model16           # 16-layer steps
  python -m jax_pagedattn.bench decode --preset 64x4096 --layers 32 --systems ours-tc,flashinfer-tc
  python -m jax_pagedattn.bench decode --preset 64x4096,zipf64 --systems ours,flashinfer
  python -m jax_pagedattn.bench decode --preset cascade --systems ours,cascade
  python -m jax_pagedattn.bench decode --batch 64 --kv-len lognormal:16:32768 --heads 32/8
  python -m jax_pagedattn.bench prefill --batch 8 --kv-len 256:2048 --head-dim 64
  python -m jax_pagedattn.bench prefill --ragged --preset design --systems ours,flashinfer-fa2,flashinfer-fa3
  python -m jax_pagedattn.bench decode --batch 2 --kv-len 64 --heads 4/2 --head-dim 64 --quick
  python -m jax_pagedattn.bench decode --preset 64x4096 --kv-dtype float8_e4m3fn --feature-ratio
  python -m jax_pagedattn.bench decode --batch 16 --kv-len 32768 --window-left 4096 --feature-ratio
"""

from __future__ import annotations

import os

# Before any JAX backend starts: JAX must not grab 75% of the GPU up front, FlashInfer
# (torch) allocates beside it in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import platform as py_platform  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

from jax_pagedattn import bench_baselines as systems_lib  # noqa: E402
from jax_pagedattn import bench_model  # noqa: E402
from jax_pagedattn import bench_report as report  # noqa: E402
from jax_pagedattn import bench_timing as timing  # noqa: E402
from jax_pagedattn import bench_workloads as wl  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m jax_pagedattn.bench",
      description="Times jax_pagedattn's paged attention beside the jnp reference, Pallas "
                  "and FlashInfer, with copy / matmul ceilings measured in the same run.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Length specs: N | A:B (uniform) | zipf:LO:HI[:S] | lognormal:LO:HI[:SIGMA].\n"
             "Presets: decode " + ", ".join(wl.PRESETS["decode"]) + "; prefill "
             + ", ".join(wl.PRESETS["prefill"]) + ". Groups: all, design (DESIGN.md §6 rows, "
             "chunked and variable-length prefill), variants (decode: head_dim, page size "
             "and head-count variants of 64x4096; prefill: head_dim, page size and position "
             "encodings of 4x2048), "
             "model16 / model32 (decode: the model-shaped step of the headline rows), cascade "
             "(decode: 64 requests sharing a 16k prefix, plain decode beside the cascade).")
  p.add_argument("kind", choices=("decode", "prefill", "all"))
  g = p.add_argument_group("workloads")
  g.add_argument("--preset", default=None,
                 help="comma-separated preset names or groups (all, design, variants; "
                      "default: all, unless "
                      "--batch/--kv-len describe a custom batch)")
  g.add_argument("--batch", type=int, default=None, help="requests of a custom batch")
  g.add_argument("--kv-len", default=None,
                 help="custom batch lengths: keys per request (decode) or query tokens "
                      "per request (prefill, causal, kv = --prefix + this)")
  g.add_argument("--prefix", type=int, default=0,
                 help="prefill: cached keys before each request's new tokens")
  g.add_argument("--shared-prefix", type=int, default=0,
                 help="decode: keys (whole pages) at the start of every request of a custom "
                      "batch that all requests share, before its --kv-len own keys")
  g.add_argument("--ragged", action="store_true",
                 help="prefill: ours and FlashInfer on ragged (contiguous) K/V, "
                      "BatchPrefillWithRaggedKVCacheWrapper, instead of the paged cache")
  g.add_argument("--no-causal", action="store_true", help="prefill without a causal mask")
  g.add_argument("--pos-encoding", default="NONE", choices=("NONE", "ROPE_LLAMA", "ALIBI"),
                 help="position encoding applied inside the attention")
  g.add_argument("--heads", default="32/8", help="query heads / kv heads (default 32/8)")
  g.add_argument("--head-dim", type=int, default=128)
  g.add_argument("--page-size", type=int, default=16)
  g.add_argument("--layout", default="NHD", choices=("NHD", "HND"))
  g.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16 | float32")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--layers", type=int, default=None,
                 help="decode: time the model-shaped step of this many layers (one cache "
                      "each, one fresh plan per step) instead of one op")
  f = p.add_argument_group("features (issue 15; a system without one skips the row)")
  f.add_argument("--kv-dtype", default=None, choices=tuple(wl.FP8_KV_DTYPES),
                 help="fp8 KV cache (q stays --dtype), dequantisation scales "
                      f"k {wl.FP8_K_SCALE} / v {wl.FP8_V_SCALE}")
  f.add_argument("--soft-cap", type=float, default=0.0, metavar="C",
                 help="logits_soft_cap C > 0: C tanh(x / C) of each scaled logit")
  f.add_argument("--window-left", type=int, default=-1, metavar="W",
                 help="sliding window: the query at position p sees keys p - W .. p")
  f.add_argument("--sinks", action="store_true",
                 help="one random float32 attention-sink logit per query head")
  f.add_argument("--fixed-split-size", type=int, default=-1, metavar="N",
                 help="plan(fixed_split_size=N): keys split at multiples of N pages only")
  f.add_argument("--disable-split-kv", action="store_true",
                 help="plan(disable_split_kv=True): no request's keys are split")
  f.add_argument("--feature-ratio", action="store_true",
                 help="also time every row without its features (same process, first) and "
                      "report time with / time without")
  s = p.add_argument_group("systems")
  s.add_argument("--systems", default="all",
                 help="comma list, prefixes match (e.g. ours,flashinfer); decode: "
                      + ", ".join(systems_lib.DECODE_SYSTEMS) + "; prefill: "
                      + ", ".join(systems_lib.PREFILL_SYSTEMS))
  s.add_argument("--pallas-interpret", action="store_true",
                 help="run the Pallas GPU kernel in its interpreter (CPU checks only)")
  s.add_argument("--fi-workspace-mb", type=int, default=256)
  t = p.add_argument_group("timing")
  t.add_argument("--reps", type=int, default=15, help="timed repetitions (median taken)")
  t.add_argument("--warmup", type=int, default=2)
  t.add_argument("--rep-ms", type=float, default=20.0, help="target length of a repetition")
  t.add_argument("--inner", type=int, default=32, help="ops chained inside one jitted call")
  t.add_argument("--l2-mb", type=float, default=50.0,
                 help="L2 size: smaller inputs are rotated over disjoint page sets")
  t.add_argument("--max-rotations", type=int, default=8)
  t.add_argument("--host-iters", type=int, default=200, help="calls per host-cost median")
  t.add_argument("--copy-mb", type=float, default=None,
                 help="copy-ceiling buffer (default 1024 on GPU, 64 on CPU)")
  t.add_argument("--matmul-n", type=int, default=None,
                 help="matmul-ceiling size (default 8192 on GPU, 512 on CPU)")
  t.add_argument("--no-ceilings", action="store_true")
  t.add_argument("--no-check", action="store_true", help="skip the rel-err check")
  t.add_argument("--no-host", action="store_true", help="skip host-cost measurements")
  t.add_argument("--quick", action="store_true",
                 help="few short repetitions and small ceilings (smoke tests)")
  o = p.add_argument_group("output")
  o.add_argument("--json", default=None, help="write every number to this JSON file")
  o.add_argument("--plot", default=None, help="write a PNG of achieved GB/s / TFLOP/s")
  o.add_argument("--markdown", default=None,
                 help="write docs/BENCHMARKS.md-style tables (Markdown) to this file")
  o.add_argument("--no-progress", action="store_true")
  return p


def _workloads(args, kind: str) -> list[wl.Workload]:
  heads = wl.parse_heads(args.heads)
  common = dict(heads=heads, head_dim=args.head_dim, page_size=args.page_size,
                kv_layout=args.layout, dtype=args.dtype, causal=not args.no_causal,
                prefix=args.prefix, seed=args.seed, pos_encoding=args.pos_encoding)
  custom = args.batch is not None or args.kv_len is not None
  preset = args.preset if args.preset is not None else (None if custom else "all")
  layers = {} if args.layers is None or kind != "decode" else {"layers": args.layers}
  if args.ragged:
    common["ragged"] = True
  features = _features(args)
  out = []
  if preset:
    table = wl.PRESETS[kind]
    for name in wl.preset_names(kind, preset):
      if name not in table:
        if any(name in t for t in wl.PRESETS.values()):
          continue  # the other kind's preset in an `all` sweep
        raise SystemExit(f"unknown preset {name!r}; {kind} presets: {', '.join(table)}")
      batch, spec, overrides = wl.preset(kind, name)
      settings = {**common, **overrides, **layers}
      out += _with_features(_ragged_name(_layers_name(name, settings), settings), kind, batch,
                            spec, settings, features, args.feature_ratio)
  if custom:
    batch = args.batch if args.batch is not None else 16
    spec = args.kv_len if args.kv_len is not None else ("4096" if kind == "decode" else "2048")
    settings = {**common, **layers}
    name = f"{batch}x{spec}"
    if kind == "decode" and args.shared_prefix:
      settings["shared_prefix"] = args.shared_prefix
      name += f"-shared{args.shared_prefix}"
    out += _with_features(_ragged_name(_layers_name(name, settings), settings), kind, batch,
                          spec, settings, features, args.feature_ratio)
  return out


def _features(args) -> wl.Features:
  return wl.Features(kv_dtype=args.kv_dtype, logits_soft_cap=args.soft_cap,
                     window_left=args.window_left, sinks=args.sinks,
                     fixed_split_size=args.fixed_split_size,
                     disable_split_kv=args.disable_split_kv)


def _with_features(name, kind, batch, spec, settings, features, ratio) -> list[wl.Workload]:
  """The row with `features` (its name ends with their labels); with `ratio`, the same
  row without them first, which it is compared with (report.derive's vs_base)."""
  row = wl.make_workload(name + features.suffix, kind, batch, spec, features=features,
                         **settings)
  if not ratio:
    return [row]
  return [wl.make_workload(name, kind, batch, spec, **settings), row]


def _ragged_name(name: str, settings: dict) -> str:
  """A workload's name, marked when it is timed on ragged K/V (--ragged)."""
  return name + wl.RAGGED_SUFFIX if settings.get("ragged") else name


def _layers_name(name: str, settings: dict) -> str:
  """A workload's name with its layer count, where --layers gave one the preset lacks."""
  layers = settings.get("layers", 1)
  suffix = f"-L{layers}"
  return name if layers == 1 or name.endswith(suffix) else name.split("-L")[0] + suffix


def _timing_config(args) -> timing.TimingConfig:
  if args.quick:
    return timing.TimingConfig(warmup=1, reps=3, rep_ms=2.0, inner=2, host_iters=10,
                               host_max_s=0.2)
  return timing.TimingConfig(warmup=args.warmup, reps=args.reps, rep_ms=args.rep_ms,
                             inner=args.inner, host_iters=args.host_iters)


def _meta(args, device) -> dict:
  import jax
  import numpy as np

  meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              command="python -m jax_pagedattn.bench " + " ".join(sys.argv[1:]),
              device=str(getattr(device, "device_kind", device)), platform=device.platform,
              python=py_platform.python_version(), jax=jax.__version__,
              numpy=np.__version__)
  try:
    import jaxlib

    meta["jaxlib"] = jaxlib.__version__
  except Exception:  # noqa: BLE001
    pass
  try:
    import jax_pagedattn

    meta["jax_pagedattn"] = jax_pagedattn.__version__
    import dataclasses

    from jax_pagedattn import _ext, switches

    meta["sm90_prefill_built"] = _ext.HAS_SM90_PREFILL
    meta["switches"] = dataclasses.asdict(switches.current())
  except Exception:  # noqa: BLE001
    pass
  for mod in ("torch", "flashinfer"):
    if mod in sys.modules:
      meta[mod] = getattr(sys.modules[mod], "__version__", "?")
  return meta


def _measure_ceilings(args, cfg, platform, say) -> dict:
  gpu = platform == "gpu"
  copy_mb = args.copy_mb if args.copy_mb is not None else (8 if args.quick else 1024 if gpu else 64)
  n = args.matmul_n if args.matmul_n is not None else (128 if args.quick else 8192 if gpu else 512)
  out = {}
  try:
    c = timing.copy_ceiling_jax(int(copy_mb * (1 << 20)), cfg)
    out["copy_jax"], out["copy_gbps_jax"] = c, c["gbps"]
  except Exception as e:  # noqa: BLE001
    say(f"copy ceiling (jax) failed: {type(e).__name__}: {e}")
  if gpu:
    try:
      import torch

      if torch.cuda.is_available():
        c = timing.copy_ceiling_torch(int(copy_mb * (1 << 20)), cfg)
        out["copy_torch"], out["copy_gbps_torch"] = c, c["gbps"]
        r = timing.read_ceiling_torch(int(copy_mb * (1 << 20)), cfg)
        out["read_torch"], out["read_gbps"] = r, r["gbps"]
        del torch
    except Exception as e:  # noqa: BLE001
      say(f"copy ceiling (torch) skipped: {type(e).__name__}: {e}")
  copies = [out[k] for k in ("copy_gbps_jax", "copy_gbps_torch") if out.get(k)]
  # The faster copy is the bandwidth the card demonstrably has.
  out["copy_gbps"] = max(copies) if copies else None
  try:
    m = timing.matmul_ceiling_jax(n, cfg)
    out["matmul"], out["matmul_tflops"], out["matmul_n"] = m, m["tflops"], n
  except Exception as e:  # noqa: BLE001
    say(f"matmul ceiling failed: {type(e).__name__}: {e}")
  return out


def _progress(items, enabled):
  if enabled:
    try:
      from tqdm import tqdm

      bar = tqdm(items, desc="bench", unit="run", dynamic_ncols=True)
      return bar, bar.write
    except ImportError:
      pass
  return items, (lambda msg: print(msg, file=sys.stderr, flush=True))


def _release_torch_memory():
  torch = sys.modules.get("torch")
  if torch is not None:
    try:
      if torch.cuda.is_available():
        torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
      pass


def main(argv=None) -> dict:
  args = build_parser().parse_args(argv)
  import jax

  kinds = ["decode", "prefill"] if args.kind == "all" else [args.kind]
  try:
    wl.canonical_dtype(args.dtype)
    wl.parse_heads(args.heads)
    if args.kv_len is not None:
      wl.parse_lengths(args.kv_len)
    if args.ragged and args.kind != "prefill":
      raise ValueError(f"--ragged is for prefill (ragged K/V), not {args.kind}")
    if args.shared_prefix < 0 or args.shared_prefix % args.page_size:
      raise ValueError(f"--shared-prefix must be whole pages (a multiple of --page-size "
                       f"{args.page_size}), got {args.shared_prefix}")
    features = _features(args)
    if features.labels() and args.layers is not None:
      raise ValueError("feature flags are timed on single ops: drop --layers (the "
                       "model-shaped step plans without features)")
    if args.feature_ratio and not features.labels():
      raise ValueError("--feature-ratio compares a row with its features to the row without "
                       "them: give a feature (--kv-dtype, --soft-cap, --window-left, --sinks, "
                       "--fixed-split-size, --disable-split-kv)")
  except ValueError as e:
    raise SystemExit(str(e)) from None
  unknown = [p for p in args.systems.split(",") if p.strip() and args.systems != "all"
             and not any(n.startswith(p.strip()) for n in systems_lib.all_system_names())]
  if unknown:
    raise SystemExit(f"unknown system(s) {unknown}; known: "
                     f"{sorted(systems_lib.all_system_names())}")
  cfg = _timing_config(args)
  opts = systems_lib.Options(pallas_interpret=args.pallas_interpret, check=not args.no_check,
                             host=not args.no_host, fi_workspace_mb=args.fi_workspace_mb)
  device = jax.devices()[0]
  platform = device.platform
  plan = []  # (workload, [systems])
  for kind in kinds:
    names = systems_lib.select_systems(kind, args.systems)
    for w in _workloads(args, kind):
      plan.append((w, names))
  items = [(w, s) for w, names in plan for s in names]

  ceilings = {}
  if not args.no_ceilings:
    print(f"measuring ceilings on {getattr(device, 'device_kind', device)} ...",
          file=sys.stderr, flush=True)
    ceilings = _measure_ceilings(args, cfg, platform, lambda m: print(m, file=sys.stderr))

  bar, say = _progress(items, not args.no_progress)
  records, workloads = [], {}
  case = None
  l2 = int(args.l2_mb * (1 << 20))
  for w, system in bar:
    key = report.wkey(w.kind, w.name)
    if case is None or case.w is not w:
      case = None
      gc.collect()
      _release_torch_memory()
      rotations = wl.rotations_for(w.step_kv_bytes, l2, args.max_rotations)
      pool, sets = wl.build_page_sets(w, rotations, args.seed)
      cache, q = wl.make_device_inputs(w, pool, args.seed)
      case = systems_lib.Case(w=w, pool=pool, sets=sets, cache=cache, q=q, cfg=cfg, opts=opts,
                              platform=platform, sinks=wl.make_sinks(w, args.seed))
      workloads[key] = dict(w.summary(), rotations=rotations, pool_pages=pool)
      base = report.wkey(w.kind, w.seed_name)
      if base != key and base in workloads:  # --feature-ratio: its plain twin ran first
        workloads[key]["base_workload"] = base
    if hasattr(bar, "set_postfix_str"):
      bar.set_postfix_str(f"{w.kind} {w.name} {system}")
    rec = dict(workload=w.name, kind=w.kind, system=system, features=w.features.labels())
    try:
      run = (bench_model.runner(system) if w.layers > 1
             else systems_lib.RUNNERS[(w.kind, system)])
      rec.update(run(case))
      rec["status"] = "ok"
    except (systems_lib.Skip, NotImplementedError) as e:
      # NotImplementedError: the library says it has no kernel for the row's features
      # here (e.g. an fp8 cache on a tensor-core path); the row is not this system's.
      message = str(e) if isinstance(e, systems_lib.Skip) else f"not implemented: {_first_line(e)}"
      rec.update(status="skipped", message=message)
      say(f"skip {w.kind} {w.name} {system}: {message}")
    except Exception as e:  # noqa: BLE001 (one system failing must not end the sweep)
      rec.update(status="failed", message=f"{type(e).__name__}: {e}",
                 traceback=traceback.format_exc(limit=6))
      say(f"FAILED {w.kind} {w.name} {system}: {type(e).__name__}: {_first_line(e)}")
    records.append(rec)
    if args.json:
      # Rewritten after every run, so a sweep cut short (a time limit) keeps its numbers.
      report.derive(records, workloads, ceilings)
      report.write_json(args.json, _document(args, device, cfg, ceilings, workloads, records,
                                             complete=False))
  case = None
  if hasattr(bar, "close"):
    bar.close()

  report.derive(records, workloads, ceilings)
  doc = _document(args, device, cfg, ceilings, workloads, records, complete=True)
  print(f"{doc['meta']['device']} ({platform}), jax {doc['meta']['jax']}, "
        f"{doc['meta']['date']}")
  print(report.format_ceilings(ceilings))
  for kind in kinds:
    text = report.format_results(records, workloads, ceilings, kind)
    if text:
      print()
      print(text)
  feature_costs = report.format_features(records, workloads)
  if feature_costs:
    print()
    print(feature_costs)
  model = report.format_model(records, workloads)
  if model:
    print()
    print(model)
  host = report.format_host(records)
  if host:
    print()
    print(host)
  if args.json:
    report.write_json(args.json, doc)
    print(f"\nwrote {args.json}")
  if args.markdown:
    report.write_markdown(args.markdown, doc)
    print(f"wrote {args.markdown}")
  if args.plot:
    try:
      report.write_plot(args.plot, records, ceilings,
                        title=f"{doc['meta']['device']}, {doc['meta']['date'][:10]}")
      print(f"wrote {args.plot}")
    except ImportError as e:
      print(f"no plot: {e}", file=sys.stderr)
  return doc


def _document(args, device, cfg, ceilings, workloads, records, *, complete) -> dict:
  return dict(meta=dict(_meta(args, device), complete=complete,
                        features=_features(args).summary()),
              method=timing.__doc__.strip(), timing=dict(vars(cfg)), args=vars(args),
              ceilings=dict(ceilings), workloads=workloads, results=records)


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0] if text else ""


if __name__ == "__main__":
  main()
