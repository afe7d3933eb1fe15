"""Serve a Llama-style model with continuous batching over jax_pagedattn's paged cache.

    python examples/serve_llama.py                      # tiny model, CPU-friendly
    python examples/serve_llama.py --check              # + greedy tokens vs dense float32
    python examples/serve_llama.py --attention reference   # same loop, jnp attention
    python examples/serve_llama.py --config 1b --batch 64 --context 2048   # on a GPU
    python examples/serve_llama.py --tp 4 --check       # heads and MLP over 4 devices

Requests with random prompts arrive in a queue; each step the scheduler picks decode
rows and prefill chunks, the allocator hands out pages, the engine plans the step on
the host and runs one jitted forward that appends k/v into the paged caches in place.
Weights are random unless --checkpoint is given, so the text is meaningless; the
machinery and the timings are the point.

--tp N splits the model over N devices (llama/tensor_parallel.py): attention heads,
the paged caches over KV heads, and the MLP; plans are still made once per step on the
host. On CPU the example asks jax for N host devices itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

import jax_pagedattn as jpa
from llama import checkpoint, model as model_lib
from llama.allocator import PageAllocator
from llama.attention import JnpPagedAttention, LibraryAttention
from llama.check import DenseModel, compare_runs, dense_greedy_check
from llama.engine import Engine
from llama.metrics import StepRecord, StepSampler, attention_share, summarize
from llama.scheduler import Scheduler
from llama.tensor_parallel import TensorParallel, collectives, request_host_devices
from llama.workload import make_requests, parse_range


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--config", choices=sorted(model_lib.CONFIGS), default="tiny")
  p.add_argument("--checkpoint", help=".npz or orbax directory of the model's nnx state")
  p.add_argument("--save-checkpoint", help="write the (random) weights here first")
  p.add_argument("--attention", choices=["pagedattn", "reference"], default="pagedattn",
                 help="jax_pagedattn's kernels, or dense jax.numpy over gathered pages")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                 help="default: bfloat16 on GPU, float32 on CPU")
  p.add_argument("--batch", type=int, default=8, help="most requests running at once")
  p.add_argument("--context", type=int, default=256, help="most tokens per request")
  p.add_argument("--num-requests", type=int, help="default: 4 x batch")
  p.add_argument("--prompt-len", help="LO:HI (default: context/2 : 3*context/4)")
  p.add_argument("--output-len", help="LO:HI (default: context/8 : context/4)")
  p.add_argument("--arrival-rate", type=float, default=0.0,
                 help="mean requests arriving per step; 0 = all queued at the start")
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--num-pages", type=int, help="default: enough for batch x context")
  p.add_argument("--prefill-budget", type=int,
                 help="prefill tokens per step (default: context, at most 2048)")
  p.add_argument("--max-prefill-requests", type=int, help="default: min(batch, 8)")
  p.add_argument("--eos-id", type=int, default=2)
  p.add_argument("--ignore-eos", action="store_true", help="always run to the output length")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tp", type=int, default=1, metavar="N",
                 help="tensor parallel over N devices (GPUs, or N host devices on CPU, "
                      "which the example requests from jax itself): q/k/v/o and MLP weights "
                      "split Megatron style, the caches over KV heads. N must divide the "
                      "query heads; with N > KV heads each KV head is replicated N / KV "
                      "heads times (as tpu-inference does), each device holding one")
  p.add_argument("--check", action="store_true",
                 help="compare greedy tokens with a dense float32 model, and with --tp N "
                      "with the same run on one device; exit 1 on mismatch")
  p.add_argument("--check-requests", type=int, default=4)
  p.add_argument("--bench-steps", type=int, default=4,
                 help="decode steps re-timed for the attention share (0 to skip)")
  p.add_argument("--bench-reps", type=int, default=10)
  p.add_argument("--json", help="write the numbers here")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("-v", "--verbose", action="store_true", help="log each compile as it happens")
  args = p.parse_args(argv)
  if args.tp < 1:
    p.error("--tp must be at least 1")
  request_host_devices(args.tp)  # before anything below starts jax's backends
  c = args.context
  args.num_requests = args.num_requests or 4 * args.batch
  args.prompt_len = parse_range(args.prompt_len or f"{max(1, c // 2)}:{max(1, 3 * c // 4)}")
  args.output_len = parse_range(args.output_len or f"{max(1, c // 8)}:{max(1, c // 4)}")
  args.num_pages = args.num_pages or args.batch * -(-c // args.page_size)
  args.prefill_budget = args.prefill_budget or max(16, min(c, 2048))
  args.max_prefill_requests = args.max_prefill_requests or min(args.batch, 8)
  args.dtype = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
  if args.prompt_len[1] >= c:
    p.error(f"prompts up to {args.prompt_len[1]} tokens leave no room in --context {c}")
  return args


def load_model(args, cfg):
  dtype = jnp.dtype(args.dtype)
  if args.checkpoint:
    return model_lib.abstract_graphdef(cfg, dtype), checkpoint.load(args.checkpoint, cfg, dtype)
  graphdef, state = model_lib.init_state(cfg, dtype, args.seed)
  if args.save_checkpoint:
    checkpoint.save(args.save_checkpoint, state)
  return graphdef, state


def make_backend(args, cfg, parallel):
  if args.attention == "reference":
    # Plain jnp over a head-split cache: XLA's partitioner keeps it per device.
    return JnpPagedAttention(page_size=args.page_size, max_pages=-(-args.context // args.page_size),
                             head_dim=cfg.head_dim)
  if parallel is None:
    heads, shards = (cfg.num_qo_heads, cfg.num_kv_heads), None
  else:  # plans for one device's heads, replicated
    heads, shards = parallel.local_heads, parallel.shards
  return LibraryAttention(num_qo_heads=heads[0], num_kv_heads=heads[1],
                          head_dim=cfg.head_dim, page_size=args.page_size,
                          num_pages=args.num_pages, max_batch=args.batch,
                          max_prefill_requests=args.max_prefill_requests,
                          max_prefill_tokens=args.prefill_budget, dtype=args.dtype,
                          shards=shards)


def serve(engine, scheduler, requests, *, progress: bool, sampler: StepSampler):
  """The serving loop; returns (step records, wall seconds)."""
  for request in requests:
    scheduler.add(request)
  records, now = [], 0
  bar = tqdm(total=len(requests), unit="req", disable=not progress, dynamic_ncols=True)
  start = time.perf_counter()
  while not scheduler.done:
    t0 = time.perf_counter()
    step = scheduler.schedule(now)
    if step.empty:
      if scheduler.running:
        raise RuntimeError("scheduler produced an empty step with requests running")
      now = scheduler.pending[0].arrival  # idle until the next arrival
      continue
    t1 = time.perf_counter()
    inputs = engine.prepare(step)
    t2 = time.perf_counter()
    compiles = len(engine.compiles)
    prefill_tokens, decode_tokens = engine.run(inputs)
    t3 = time.perf_counter()
    generated = scheduler.num_generated
    finished = scheduler.commit(step, prefill_tokens, decode_tokens)
    t4 = time.perf_counter()
    compiled = len(engine.compiles) > compiles
    if compiled:
      engine.compiles[-1].seconds = t3 - t2
    elif not step.prefill:
      sampler.offer(inputs)
    records.append(StepRecord(
        prefill_rows=sum(len(w.tokens) for w in step.prefill), decode_rows=len(step.decode),
        schedule_s=t1 - t0, prepare_s=t2 - t1, plan_s=engine.plan_seconds, device_s=t3 - t2,
        commit_s=t4 - t3, compiled=compiled,
        new_tokens=scheduler.num_generated - generated))
    bar.update(len(finished))
    bar.set_postfix(running=len(scheduler.running), waiting=len(scheduler.waiting),
                    free_pages=scheduler.allocator.num_free, refresh=False)
    now += 1
  bar.close()
  return records, time.perf_counter() - start


def report(args, cfg, engine, summary, share, check, same, comms, scheduler):
  device = jax.devices()[0]
  s = summary
  where = f"{device.platform} ({device.device_kind})"
  if engine.parallel is not None:
    p = engine.parallel
    where = (f"{p.tp} x {where}, tensor parallel (tp={p.tp}: {p.local_heads[0]} query "
             f"head(s), {p.local_heads[1]} KV head(s) per device"
             + (f", each KV head replicated {p.replicated_kv}x" if p.replicated_kv > 1 else "")
             + ")")
  print(f"\n{cfg.num_params() / 1e6:.1f}M-parameter '{args.config}' model, {args.dtype}, on "
        f"{where}; attention: {engine.backend.name} "
        f"(native jax_pagedattn platforms: {', '.join(jpa.native_platforms()) or 'none'})")
  print(f"served {s['requests']} requests ({s['output_tokens']} output tokens) in {s['steps']} "
        f"steps, {s['decode_steps']} of them decode-only; {scheduler.num_preemptions} "
        f"preemptions; tokens digest {s['output_digest']}")
  print(f"  output tokens/s      {s['output_tokens_per_s']:10.1f}      tp={args.tp}, steady "
        f"state, compile steps excluded (all rows incl. prefill {s['rows_per_s']:.1f}/s; end "
        f"to end incl. compiles {s['end_to_end_tokens_per_s']:.1f}/s)")
  print(f"  decode step          {s['decode_step_ms']:10.3f} ms   median (mean "
        f"{s['decode_step_mean_ms']:.3f}; on the device {s['decode_device_ms']:.3f}; "
        f"mean batch {s['decode_batch']:.1f})")
  print(f"  host overhead/step   {s['host_overhead_ms']:10.3f} ms   median (plan() "
        f"{s['plan_ms']:.3f}, index arrays {s['arrays_ms']:.3f}, schedule + commit "
        f"{s['schedule_ms']:.3f})")
  if share:
    print(f"  attention share      {100 * share['share']:10.1f} %    {share['attention_ms']:.3f} "
          f"ms of {share['step_ms']:.3f} ms per decode step")
    print(f"      how: the {cfg.num_layers} layers' attention alone, jitted over the plans and "
          f"caches of {share['steps']} recorded decode steps (padded batch "
          f"{share['padded_batch']:.0f}), timed against the whole step on the same inputs; "
          f"cross-check: with attention replaced by the identity the step takes "
          f"{share['without_attention_ms']:.3f} ms ({100 * share['share_by_difference']:.1f} % "
          f"by difference)")
  if comms is not None:
    listed = ", ".join(f"{n} x {op}" for op, n in comms.items()) or "none"
    print(f"  collectives/step     {sum(comms.values()):10d}      in the last step's compiled "
          f"HLO: {listed} (two all-reduces per layer after the row-parallel o and down "
          f"projections; q and the caches never move)")
  keys = ", ".join(f"{c.key} {c.seconds:.1f}s" for c in engine.compiles)
  print(f"  compiles             {len(engine.compiles):10d}      of at most {engine.max_compiles}; "
        f"(prefill rows, decode rows): {keys}")
  if check is not None:
    verdict = "PASSED" if check.passed else "FAILED"
    print(f"check {verdict}: {check.tokens} greedy tokens of {check.requests} requests vs the "
          f"dense float32 model: {len(check.mismatches)} mismatches, {check.near_ties} "
          f"accepted near-ties (logit gap <= {check.max_tie_gap:.3f}), smallest top-2 "
          f"logit gap {check.min_margin:.2e}")
    for rid, i, mine, theirs, gap in check.mismatches[:5]:
      print(f"  request {rid} token {i}: paged {mine}, dense {theirs} (logit gap {gap:.3g})")
  if same is not None:
    verdict = "PASSED" if same.passed else "FAILED"
    print(f"check {verdict}: {same.tokens} greedy tokens of {same.requests} requests with "
          f"--tp {args.tp} vs the same run on one device (--tp 1): {len(same.differing)} "
          f"requests differ, {same.near_ties} accepted as parting at a near-tie")
    for rid, i, mine, theirs, gap in same.differing[:5]:
      print(f"  request {rid} token {i}: tp={args.tp} {mine}, tp=1 {theirs} (dense logit gap "
            f"{gap:.3g})")


@dataclasses.dataclass
class Served:
  requests: list
  scheduler: Scheduler
  engine: Engine
  records: list
  wall_s: float
  sampler: StepSampler


def serve_once(args, cfg, graphdef, state, parallel, *, progress: bool,
               bench_steps: int) -> Served:
  """Serves a fresh copy of the run's requests (the same for the same --seed) with the
  model given: `parallel` None for one device, else its served graphdef and placed state."""
  requests = make_requests(args.num_requests, vocab_size=cfg.vocab_size,
                           prompt_len=args.prompt_len, output_len=args.output_len,
                           arrival_rate=args.arrival_rate, seed=args.seed)
  allocator = PageAllocator(args.num_pages, args.page_size, seed=args.seed)
  scheduler = Scheduler(allocator, max_batch=args.batch,
                        max_prefill_requests=args.max_prefill_requests,
                        prefill_budget=args.prefill_budget, max_seq_len=args.context,
                        eos_id=None if args.ignore_eos else args.eos_id)
  served_cfg = cfg if parallel is None else parallel.cfg
  engine = Engine(graphdef, state, served_cfg, make_backend(args, served_cfg, parallel),
                  num_pages=args.num_pages, page_size=args.page_size, max_batch=args.batch,
                  max_prefill_requests=args.max_prefill_requests,
                  prefill_budget=args.prefill_budget, dtype=args.dtype, parallel=parallel)
  sampler = StepSampler(bench_steps)
  records, wall = serve(engine, scheduler, requests, progress=progress, sampler=sampler)
  allocator.check()
  if allocator.num_free != allocator.num_pages:
    raise RuntimeError(f"{allocator.num_pages - allocator.num_free} pages leaked")
  return Served(requests, scheduler, engine, records, wall, sampler)


def main(argv=None) -> int:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                      format="%(name)s: %(message)s")
  cfg = model_lib.CONFIGS[args.config]
  graphdef, state = load_model(args, cfg)
  parallel, served = None, (graphdef, state)
  if args.tp > 1:
    parallel = TensorParallel(cfg, args.tp)
    served = (model_lib.abstract_graphdef(parallel.cfg, jnp.dtype(args.dtype)),
              parallel.shard_state(state))
  run = serve_once(args, cfg, *served, parallel, progress=not args.no_progress,
                   bench_steps=args.bench_steps)
  summary = summarize(run.records, run.requests, run.wall_s)
  # The last step served (normally decode-only), read before the timing re-runs steps.
  comms = None if parallel is None else collectives(
      run.engine.compiled_text(run.engine.last_inputs))
  share = attention_share(run.engine, run.sampler.picked(), args.bench_reps)
  check = same = None
  if args.check:
    dense = DenseModel(cfg, state)
    subset = sorted(run.requests, key=lambda r: r.rid)[:args.check_requests]
    tolerance = 0.0 if args.dtype == "float32" else 0.25
    check = dense_greedy_check(dense, subset, tie_tolerance=tolerance)
    if parallel is not None:
      single = serve_once(args, cfg, graphdef, state, None, progress=False, bench_steps=0)
      same = compare_runs(dense, run.requests, single.requests, tie_tolerance=tolerance)
  report(args, cfg, run.engine, summary, share, check, same, comms, run.scheduler)
  if args.json:
    e = run.engine
    numbers = dict(summary, attention=share, compiles=[list(c.key) for c in e.compiles],
                   compile_bound=e.max_compiles, preemptions=run.scheduler.num_preemptions,
                   config=args.config, dtype=args.dtype, attention_backend=e.backend.name,
                   device=jax.devices()[0].device_kind, tp=args.tp, collectives=comms,
                   batch=args.batch, context=args.context,
                   check=None if check is None else dict(passed=check.passed, tokens=check.tokens,
                                                         mismatches=len(check.mismatches)),
                   same_as_tp1=None if same is None else dict(
                       passed=same.passed, tokens=same.tokens, differing=len(same.differing),
                       near_ties=same.near_ties))
    with open(args.json, "w") as f:
      json.dump(numbers, f, indent=2)
  passed = (check is None or check.passed) and (same is None or same.passed)
  return 0 if passed else 1


if __name__ == "__main__":
  sys.exit(main())
