"""Many small host int32 arrays sent to the device as one buffer.

A step needs about eight index arrays per part. Passed one by one, each becomes its own
host-to-device transfer; packed, the step pays for one. The layout (names and sizes)
is static pytree metadata, so it is part of the jit cache key like any shape.
"""

from __future__ import annotations

import jax
import numpy as np


@jax.tree_util.register_pytree_node_class
class HostArrays:

  def __init__(self, buffer, layout: tuple):
    self.buffer = buffer
    self.layout = layout  # ((name, size), ...) in buffer order

  @classmethod
  def pack(cls, arrays: dict) -> "HostArrays":
    layout = tuple((name, int(a.shape[0])) for name, a in arrays.items())
    return cls(np.concatenate([np.asarray(a, np.int32) for a in arrays.values()]), layout)

  @property
  def sizes(self) -> dict:
    return dict(self.layout)

  def unpack(self) -> dict:
    """Static slices of the buffer, by name (works on numpy and traced buffers)."""
    out, offset = {}, 0
    for name, size in self.layout:
      out[name] = self.buffer[offset:offset + size]
      offset += size
    return out

  def tree_flatten(self):
    return (self.buffer,), self.layout

  @classmethod
  def tree_unflatten(cls, layout, children):
    return cls(children[0], layout)
