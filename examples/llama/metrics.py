"""What a serving run measures: per-step host and device times, and the share of a
decode step spent in attention.

Host overhead of a step = scheduling + building the index arrays + plan() + recording
the sampled tokens: everything the device waits for between two steps. Device time =
from the call of the jitted step to its tokens on the host (it includes dispatch and
the one host-to-device copy of the step's index arrays). Steps that compiled are kept
out of the averages and reported on their own.

Attention share: a separate jitted function runs only the decode attention of every
layer (the same backend, plans and caches as a recorded step). It and the whole step
are timed on the same recorded inputs after the run, so the ratio compares like with
like; appending k/v to the cache is counted on the non-attention side. As a cross-check
the step is also timed with attention replaced by the identity: whole step minus that
is attention's cost in place. The two differ where a separate call's own launch and
sync cost matters (small models), or where XLA overlaps work around the custom call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import jax
import numpy as np


@dataclasses.dataclass
class StepRecord:
  prefill_rows: int
  decode_rows: int
  schedule_s: float
  prepare_s: float  # arrays and plans
  plan_s: float     # of which plan()
  device_s: float
  commit_s: float
  compiled: bool
  new_tokens: int  # tokens the step generated

  @property
  def host_s(self) -> float:
    return self.schedule_s + self.prepare_s + self.commit_s

  @property
  def total_s(self) -> float:
    return self.host_s + self.device_s


class StepSampler:
  """Keeps the inputs of decode-only steps spread over the run: every `stride`-th one,
  at most 2 x limit, the stride doubling (and every other sample dropped) when full."""

  def __init__(self, limit: int):
    self.limit, self.stride, self.seen = limit, 1, 0
    self.samples: list = []

  def offer(self, inputs):
    if self.limit and self.seen % self.stride == 0:
      self.samples.append(inputs)
      if len(self.samples) > 2 * self.limit:
        self.samples, self.stride = self.samples[::2], self.stride * 2
    self.seen += 1

  def picked(self) -> list:
    """`limit` samples evenly spaced over the run (fewer if fewer were seen)."""
    if len(self.samples) <= self.limit:
      return list(self.samples)
    at = np.linspace(0, len(self.samples) - 1, self.limit).round().astype(int)
    return [self.samples[i] for i in at]


def _interleaved_medians(fns, reps: int) -> list[float]:
  """Median time of each function, the runs interleaved so that a noisy machine slows
  all of them alike (their ratio is what is reported)."""
  for fn in fns:
    jax.block_until_ready(fn())  # compile / warm up
  times = [[] for _ in fns]
  for _ in range(reps):
    for fn, bucket in zip(fns, times):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      bucket.append(time.perf_counter() - start)
  return [float(np.median(t)) for t in times]


def attention_share(engine, samples, reps: int) -> dict | None:
  """Times decode attention alone and the whole step on each sampled step's inputs.

  Runs after serving: re-running a step rewrites k/v the run already wrote (or into
  pages since reused by other requests, which no longer matters).
  """
  if not samples:
    return None
  attention = engine.attention_only()
  times, rows = [], []
  for inputs in samples:
    times.append(_interleaved_medians([lambda: attention(engine.caches, inputs),
                                       lambda: engine.run(inputs),
                                       lambda: engine.run(inputs, attention=False)], reps))
    rows.append(inputs["decode"]["host"].sizes["tokens"])
  attn_s, step_s, rest_s = (float(t) for t in np.mean(times, axis=0))
  return dict(steps=len(samples), padded_batch=float(np.mean(rows)),
              attention_ms=attn_s * 1e3, step_ms=step_s * 1e3, without_attention_ms=rest_s * 1e3,
              share=attn_s / step_s, share_by_difference=(step_s - rest_s) / step_s)


def summarize(records: list[StepRecord], requests, wall_s: float) -> dict:
  steady = [r for r in records if not r.compiled]
  decode = [r for r in steady if r.prefill_rows == 0]
  out_tokens = sum(len(r.output) for r in requests)
  steady_tokens = sum(r.new_tokens for r in steady)
  steady_rows = sum(r.prefill_rows + r.decode_rows for r in steady)
  compile_s = sum(r.total_s for r in records if r.compiled)
  steady_s = max(wall_s - compile_s, 1e-9)

  def mean_ms(values):
    return float(np.mean(values) * 1e3) if values else float("nan")

  def median_ms(values):
    # Medians for per-step times: a shared machine adds rare long stalls.
    return float(np.median(values) * 1e3) if values else float("nan")

  return dict(
      requests=len(requests), output_tokens=out_tokens,
      rows_processed=sum(r.prefill_rows + r.decode_rows for r in records),
      steps=len(records), decode_steps=len(decode), compiled_steps=len(records) - len(steady),
      wall_s=wall_s, compile_step_s=compile_s, steady_s=steady_s,
      output_tokens_per_s=steady_tokens / steady_s, rows_per_s=steady_rows / steady_s,
      end_to_end_tokens_per_s=out_tokens / wall_s,
      decode_step_ms=median_ms([r.total_s for r in decode]),
      decode_step_mean_ms=mean_ms([r.total_s for r in decode]),
      decode_device_ms=median_ms([r.device_s for r in decode]),
      decode_batch=float(np.mean([r.decode_rows for r in decode])) if decode else 0.0,
      host_overhead_ms=median_ms([r.host_s for r in steady]),
      plan_ms=median_ms([r.plan_s for r in steady]),
      schedule_ms=median_ms([r.schedule_s + r.commit_s for r in steady]),
      arrays_ms=median_ms([r.prepare_s - r.plan_s for r in steady]),
      output_digest=hashlib.sha256(b"".join(
          np.asarray(r.output, np.int32).tobytes() + b"|" for r in sorted(
              requests, key=lambda r: r.rid))).hexdigest()[:16],
  )
