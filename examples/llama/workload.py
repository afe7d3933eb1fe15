"""Synthetic requests: random prompts of varied lengths, varied output budgets, and
arrival steps (all at once, or a Poisson stream)."""

from __future__ import annotations

import numpy as np

from llama.scheduler import Request


def parse_range(text: str) -> tuple[int, int]:
  lo, _, hi = text.partition(":")
  lo, hi = int(lo), int(hi or lo)
  if not 1 <= lo <= hi:
    raise ValueError(f"expected LO:HI with 1 <= LO <= HI, got {text!r}")
  return lo, hi


def make_requests(num: int, *, vocab_size: int, prompt_len: tuple[int, int],
                  output_len: tuple[int, int], arrival_rate: float, seed: int,
                  reserved_ids: int = 3) -> list[Request]:
  """`arrival_rate` requests per step on average (0: all arrive at step 0). Prompt ids
  avoid the first `reserved_ids` (pad / bos / eos by Llama's convention)."""
  rng = np.random.default_rng(seed)
  arrivals = np.zeros(num, np.int64)
  if arrival_rate > 0:
    arrivals = np.floor(np.cumsum(rng.exponential(1.0 / arrival_rate, num))).astype(np.int64)
  requests = []
  for rid in range(num):
    length = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
    prompt = rng.integers(reserved_ids, vocab_size, length).astype(np.int32)
    budget = int(rng.integers(output_len[0], output_len[1] + 1))
    requests.append(Request(rid, prompt, budget, arrival=int(arrivals[rid])))
  return requests
