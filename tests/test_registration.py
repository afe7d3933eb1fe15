"""The extension's FFI handler table: both registrations (plain, and the handlers that
declare XLA's command-buffer trait) name the same targets, and the CUDA ones differ."""

from __future__ import annotations

import ctypes

from jax_pagedattn import _C, switches


def _addresses(table):
  get = ctypes.pythonapi.PyCapsule_GetPointer
  get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
  return {platform: {name: get(capsule, None) for name, capsule in targets.items()}
          for platform, targets in table.items()}


def test_both_registrations_name_the_same_targets():
  plain = _addresses(_C.registrations())
  graphs = _addresses(_C.registrations(command_buffers=True))
  assert {p: set(t) for p, t in plain.items()} == {p: set(t) for p, t in graphs.items()}
  # The CPU backend has one kind of handler; the CUDA handlers come in two.
  assert plain["cpu"] == graphs["cpu"]
  if _C.HAS_CUDA:
    assert set(plain["CUDA"]) == {"jax_pagedattn_decode", "jax_pagedattn_prefill",
                                  "jax_pagedattn_append", "jax_pagedattn_append_kv"}
    for name, address in plain["CUDA"].items():
      assert address != graphs["CUDA"][name], name


def test_the_plain_handlers_are_registered_unless_asked():
  env = "JAX_PAGEDATTN_COMMAND_BUFFERS"
  assert not switches.from_environment({}).command_buffers
  assert not switches.from_environment({env: "0"}).command_buffers
  assert not switches.from_environment({env: ""}).command_buffers
  assert switches.from_environment({env: "1"}).command_buffers
