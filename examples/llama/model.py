"""A Llama-style decoder in Flax NNX: RMSNorm, rotary embeddings, GQA, SwiGLU.

The model knows nothing about pages. Each attention layer rotates q and k at their
absolute positions and hands (q, k, v, cache) to an `attend` callable that it is given,
which returns (out, new cache). Rotating before the cache write means the cache holds
rotated keys, so the paged kernels run with pos_encoding_mode="NONE" and never
re-rotate old keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_qo_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 1e4
  norm_eps: float = 1e-5

  def num_params(self) -> int:
    h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
    attn = h * d * (2 * self.num_qo_heads + 2 * self.num_kv_heads)
    layer = attn + 3 * h * i + 2 * h
    return self.num_layers * layer + 2 * self.vocab_size * h + h


CONFIGS = {
    # Small enough that a 2-core CPU serves dozens of requests in seconds.
    "tiny": LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                        num_qo_heads=4, num_kv_heads=2, head_dim=64),
    # Llama-3.2-1B's shape with a Llama-2 vocabulary: ~1.1B parameters.
    "1b": LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_layers=16,
                      num_qo_heads=32, num_kv_heads=8, head_dim=64),
}

# attend(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], cache) -> (out [T, Hq, D], cache)
Attend = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def rotate(x, positions, theta: float):
  """Rotate-half RoPE of x [T, H, D] at positions [T], computed in float32.

  Pairs element d with d + D/2 at frequency theta^(-2d/D), as Llama and
  jax_pagedattn's ROPE_LLAMA do.
  """
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[:, None, None] * inv_freq  # [T, 1, D/2]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class RMSNorm(nnx.Module):

  def __init__(self, size: int, eps: float, dtype):
    self.scale = nnx.Param(jnp.ones((size,), dtype))
    self.eps = eps

  def __call__(self, x):
    # Statistics in float32: bf16 squares lose the small activations.
    x32 = x.astype(jnp.float32)
    norm = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (norm * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def _linear(n_in, n_out, dtype, rngs):
  return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)


class Attention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
    h, d = cfg.hidden_size, cfg.head_dim
    self.q_proj = _linear(h, cfg.num_qo_heads * d, dtype, rngs)
    self.k_proj = _linear(h, cfg.num_kv_heads * d, dtype, rngs)
    self.v_proj = _linear(h, cfg.num_kv_heads * d, dtype, rngs)
    self.o_proj = _linear(cfg.num_qo_heads * d, h, dtype, rngs)
    self.heads = (cfg.num_qo_heads, cfg.num_kv_heads, d)
    self.theta = cfg.rope_theta

  def __call__(self, x, positions, attend: Attend, cache):
    hq, hkv, d = self.heads
    q = self.q_proj(x).reshape(-1, hq, d)
    k = self.k_proj(x).reshape(-1, hkv, d)
    v = self.v_proj(x).reshape(-1, hkv, d)
    q, k = rotate(q, positions, self.theta), rotate(k, positions, self.theta)
    out, cache = attend(q, k, v, cache)
    return self.o_proj(out.reshape(-1, hq * d)), cache


class MLP(nnx.Module):

  def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
    self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, dtype, rngs)
    self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, dtype, rngs)
    self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, dtype, rngs)

  def __call__(self, x):
    return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
    self.attn = Attention(cfg, dtype, rngs)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
    self.mlp = MLP(cfg, dtype, rngs)

  def __call__(self, x, positions, attend: Attend, cache):
    a, cache = self.attn(self.input_norm(x), positions, attend, cache)
    x = x + a
    return x + self.mlp(self.post_attn_norm(x)), cache


class Llama(nnx.Module):
  """Decoder over a flat list of tokens: rows of several requests side by side.

  Every op but attention is row-wise, so requests never mix outside `attend`, and
  padding rows only cost compute.
  """

  def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
    self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype,
                           rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
    self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, dtype, rngs)

  def __call__(self, tokens, positions, attend: Attend, caches):
    """tokens, positions: int32 [T]; caches: one entry per layer (None when `attend`
    keeps no cache). Returns (final hidden states [T, hidden], new caches)."""
    x = self.embed(tokens)
    new_caches = []
    for layer, cache in zip(self.layers, caches):
      x, cache = layer(x, positions, attend, cache)
      new_caches.append(cache)
    return self.norm(x), new_caches

  def logits(self, hidden):
    return self.lm_head(hidden).astype(jnp.float32)


def init_state(cfg: LlamaConfig, dtype, seed: int):
  """(graphdef, state) of a randomly initialised model.

  The parameters are created inside one jit, on the device, instead of one eager
  op per initialiser (which takes a while for the 1b config).
  """
  graphdef = abstract_graphdef(cfg, dtype)
  state = jax.jit(lambda: nnx.split(Llama(cfg, dtype, nnx.Rngs(seed)))[1])()
  return graphdef, state


def abstract_graphdef(cfg: LlamaConfig, dtype):
  """The static half of `nnx.split`, without allocating parameters."""
  return nnx.split(nnx.eval_shape(lambda: Llama(cfg, dtype, nnx.Rngs(0))))[0]


def abstract_state(cfg: LlamaConfig, dtype):
  return nnx.split(nnx.eval_shape(lambda: Llama(cfg, dtype, nnx.Rngs(0))))[1]
