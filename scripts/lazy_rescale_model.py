"""A numpy model of the sm90 prefill kernel's online softmax, to see what the lazy
rescale (branch crossitem, kVariantLazyRescale) costs in precision before timing it.

Each row visits 128-key tiles last to first, as the kernel does; P is rounded to bf16
before P V (the kernel's 16-bit A operand) while the normaliser sums the fp32 terms;
O accumulates in fp32. Eager: every tile moves the running maximum (the dominant key's
P is exactly 1). Lazy: the maximum moves only when a tile's exceeds it by more than the
slack, so P reaches 2^slack and the dominant key's P carries bf16 rounding too.

  python scripts/lazy_rescale_model.py
"""
import ml_dtypes
import numpy as np


def online_softmax(scores, v, lazy, slack=8.0, tile=128):
  rows = scores.shape[0]
  m = np.full(rows, -np.inf, np.float32)
  l = np.zeros(rows, np.float32)
  o = np.zeros((rows, v.shape[1]), np.float32)
  rescaling_tiles = 0
  for t in reversed(range(0, scores.shape[1], tile)):
    s = scores[:, t:t + tile].astype(np.float32)
    m_cand = np.maximum(m, s.max(1))
    moved = m_cand > m + slack if lazy else np.ones(rows, bool)
    m_new = np.where(moved, m_cand, m)
    base = np.where(np.isinf(m_new), 0, m_new)
    with np.errstate(invalid="ignore"):
      corr = np.where(moved, np.exp2(m - base), 1.0).astype(np.float32)
    rescaling_tiles += int((moved & ~np.isinf(m)).any())
    p = np.exp2(s - base[:, None]).astype(np.float32)
    l = l * corr + p.sum(1)
    o = o * corr[:, None] + p.astype(ml_dtypes.bfloat16).astype(np.float32) @ v[t:t + tile]
    m = m_new
  return o / l[:, None], m + np.log2(l), rescaling_tiles


def main():
  rng = np.random.default_rng(0)
  print("logit std (log2 units)  schedule  max|o - ref|  max|lse - ref|  tiles that rescaled (of 16)")
  for std in (1.0, 4.0, 16.0):
    scores = (rng.standard_normal((64, 2048)) * std).astype(np.float32)
    v = rng.standard_normal((2048, 128)).astype(ml_dtypes.bfloat16).astype(np.float32)
    p = np.exp2(scores - scores.max(1, keepdims=True)).astype(np.float64)
    ref, ref_lse = (p @ v) / p.sum(1, keepdims=True), scores.max(1) + np.log2(p.sum(1))
    for lazy in (False, True):
      o, lse, tiles = online_softmax(scores, v, lazy)
      print(f"{std:22.1f}  {'lazy' if lazy else 'eager':8}  {np.abs(o - ref).max():12.2e}  "
            f"{np.abs(lse - ref_lse).max():14.2e}  {tiles}")


if __name__ == "__main__":
  main()
