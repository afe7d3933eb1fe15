"""Model state to and from disk: an .npz of named arrays, or an orbax directory.

Names are the nnx state paths joined by "/" (e.g. "layers/3/attn/q_proj/kernel"), so an
.npz written by any tool with those names loads. Loading starts from the abstract state
of the configured model and checks every shape, so a checkpoint of another config fails
with the offending name instead of a broadcasting error later.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from llama import model as model_lib


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from _flatten(value, prefix + (str(key),))
  else:
    yield "/".join(prefix), tree


def _is_npz(path: str) -> bool:
  return path.endswith(".npz")


def _portable(array) -> np.ndarray:
  """numpy has no bfloat16 of its own: store those as float32 so any reader can load."""
  a = np.asarray(array)
  return a.astype(np.float32) if a.dtype.name == "bfloat16" else a


def save(path: str, state):
  arrays = dict(_flatten(nnx.to_pure_dict(state)))
  if _is_npz(path):
    np.savez(path, **{name: _portable(a) for name, a in arrays.items()})
  else:
    import orbax.checkpoint as ocp  # noqa: PLC0415 (optional dependency)

    with ocp.StandardCheckpointer() as saver:
      saver.save(os.path.abspath(path), arrays)


def load(path: str, cfg, dtype):
  """The nnx state of `cfg` with values from `path`, cast to `dtype`."""
  if _is_npz(path):
    with np.load(path) as f:
      stored = {name: f[name] for name in f.files}
  else:
    import orbax.checkpoint as ocp  # noqa: PLC0415

    with ocp.StandardCheckpointer() as loader:
      stored = dict(_flatten(loader.restore(os.path.abspath(path))))
  state = model_lib.abstract_state(cfg, dtype)
  pure = nnx.to_pure_dict(state)
  expected = dict(_flatten(pure))
  missing = sorted(set(expected) - set(stored))
  if missing:
    raise ValueError(f"{path}: missing {len(missing)} arrays, e.g. {missing[:3]}")

  def fill(tree, prefix=()):
    if isinstance(tree, dict):
      return {k: fill(v, prefix + (str(k),)) for k, v in tree.items()}
    name = "/".join(prefix)
    value = np.asarray(stored[name])
    if value.shape != tuple(tree.shape):
      raise ValueError(f"{path}: {name} has shape {value.shape}, the {cfg} model needs "
                       f"{tuple(tree.shape)}")
    return jax.numpy.asarray(value, dtype)

  nnx.replace_by_pure_dict(state, fill(pure))
  return state
