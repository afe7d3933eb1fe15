"""`--check`: the paged model's greedy tokens against the same weights run densely.

The dense model is the same Llama in float32 whose attention is plain causal attention
over the sequence's own rows: no cache, no pages, no plans, no custom calls. It reads
each served request's prompt plus generated tokens in one forward and must predict
every generated token. That is the same as comparing two free-running greedy
generations token for token: if all predictions agree, the dense model, fed its own
tokens, would have produced the same sequence.
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


def dense_greedy_check(cfg, state, requests, *, tie_tolerance: float = 0.0) -> CheckResult:
  """Compares every generated token of `requests` with the dense float32 model.

  With tie_tolerance > 0 (a bf16 paged model), a different token is accepted when the
  dense logit of the paged token is within the tolerance of the dense maximum: the two
  precisions legitimately disagree there. For float32 the tolerance is 0: exact.
  """
  graphdef = model_lib.abstract_graphdef(cfg, jnp.float32)
  state32 = jax.tree.map(lambda x: x.astype(jnp.float32), state)

  @jax.jit
  def dense_logits(state, tokens):
    model = nnx.merge(graphdef, state)
    positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    hidden, _ = model(tokens, positions, dense_causal_attention, [None] * cfg.num_layers)
    return model.logits(hidden)

  mismatches, ties, checked, min_margin = [], [], 0, np.inf
  for request in requests:
    produced = np.asarray(request.output, np.int32)
    seq = np.concatenate([request.prompt, produced[:-1]]).astype(np.int32)
    # Padding to a power of two bounds the compiles; causal rows never see it.
    padded = np.zeros(max(16, 1 << (len(seq) - 1).bit_length()), np.int32)
    padded[:len(seq)] = seq
    logits = np.asarray(dense_logits(state32, padded))
    logits = logits[len(request.prompt) - 1:len(seq)]
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
