"""`--check`: the paged model's greedy tokens against the same weights run densely.

The dense model is the same Llama in float32 whose attention is plain causal attention
over the sequence's own rows: no cache, no pages, no plans, no custom calls. It reads
each served request's prompt plus generated tokens in one forward and must predict
every generated token. That is the same as comparing two free-running greedy
generations token for token: if all predictions agree, the dense model, fed its own
tokens, would have produced the same sequence.

With `--tp N` the run is also served again on one device (`--tp 1`) and the two runs'
tokens compared request by request: splitting the model over devices only reorders
float sums (the all-reduces), so the tokens must be the same.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama import model as model_lib
from llama.attention import dense_causal_attention


@dataclasses.dataclass
class CheckResult:
  requests: int
  tokens: int
  mismatches: list  # (request id, token index, paged token, dense token, logit gap)
  near_ties: int    # accepted disagreements within `tie_tolerance` (low precision only)
  max_tie_gap: float  # the largest logit gap among them
  min_margin: float  # smallest top-1 vs top-2 gap of the dense logits where checked

  @property
  def passed(self) -> bool:
    return not self.mismatches


class DenseModel:
  """The float32 model with dense causal attention: logits of every row of a sequence."""

  def __init__(self, cfg, state):
    graphdef = model_lib.abstract_graphdef(cfg, jnp.float32)
    self.state = jax.tree.map(lambda x: x.astype(jnp.float32), state)

    @jax.jit
    def logits(state, tokens):
      model = nnx.merge(graphdef, state)
      positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)
      hidden, _ = model(tokens, positions, dense_causal_attention, [None] * cfg.num_layers)
      return model.logits(hidden)

    self._logits = logits

  def logits(self, seq) -> np.ndarray:
    """[len(seq), vocab]: row i predicts token i + 1."""
    # Padding to a power of two bounds the compiles; causal rows never see it.
    padded = np.zeros(max(16, 1 << (len(seq) - 1).bit_length()), np.int32)
    padded[:len(seq)] = seq
    return np.asarray(self._logits(self.state, padded))[:len(seq)]


def dense_greedy_check(dense: DenseModel, requests, *,
                       tie_tolerance: float = 0.0) -> CheckResult:
  """Compares every generated token of `requests` with the dense float32 model.

  With tie_tolerance > 0 (a bf16 paged model), a different token is accepted when the
  dense logit of the paged token is within the tolerance of the dense maximum: the two
  precisions legitimately disagree there. For float32 the tolerance is 0: exact.
  """
  mismatches, ties, checked, min_margin = [], [], 0, np.inf
  for request in requests:
    produced = np.asarray(request.output, np.int32)
    seq = np.concatenate([request.prompt, produced[:-1]]).astype(np.int32)
    logits = dense.logits(seq)[len(request.prompt) - 1:]
    best = logits.argmax(-1)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    min_margin = min(min_margin, float((top2[:, 1] - top2[:, 0]).min()))
    for i, (mine, theirs) in enumerate(zip(produced, best)):
      if mine == theirs:
        continue
      gap = float(logits[i, theirs] - logits[i, mine])
      if gap <= tie_tolerance:
        ties.append(gap)
      else:
        mismatches.append((request.rid, i, int(mine), int(theirs), gap))
    checked += len(produced)
  return CheckResult(len(requests), checked, mismatches, len(ties), max(ties, default=0.0),
                     min_margin)


@dataclasses.dataclass
class RunComparison:
  requests: int
  tokens: int
  differing: list  # (request id, first differing token index, this run's, the other's, gap)
  near_ties: int   # requests whose first difference is within the tie tolerance

  @property
  def passed(self) -> bool:
    return not self.differing


def compare_runs(dense: DenseModel, mine, theirs, *, tie_tolerance: float = 0.0) -> RunComparison:
  """Greedy tokens of two serving runs of the same requests (`--tp N` and `--tp 1`).

  Equal up to a first difference, the two runs saw the same prefix there, so the dense
  model's logits at that point say whether it was a near tie (accepted with
  tie_tolerance > 0, as in dense_greedy_check; the sequences then legitimately go
  apart) or an error. In float32 the tolerance is 0: every token must be the same.
  """
  by_rid = {r.rid: r for r in theirs}
  differing, ties, tokens = [], 0, 0
  for request in sorted(mine, key=lambda r: r.rid):
    a = np.asarray(request.output, np.int32)
    b = np.asarray(by_rid[request.rid].output, np.int32)
    tokens += len(a)
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    if not diff.size and len(a) == len(b):
      continue
    i = int(diff[0]) if diff.size else n
    if i == n:  # one stopped early with the same tokens: no tie explains that
      differing.append((request.rid, i, None, None, float("inf")))
      continue
    seq = np.concatenate([request.prompt, a[:i]]).astype(np.int32)
    last = dense.logits(seq)[-1]
    gap = float(abs(last[a[i]] - last[b[i]]))
    if gap <= tie_tolerance:
      ties += 1
    else:
      differing.append((request.rid, i, int(a[i]), int(b[i]), gap))
  return RunComparison(len(mine), tokens, differing, ties)
