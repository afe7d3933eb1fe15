"""Loads the native extension and registers its FFI handlers with XLA, once."""

from __future__ import annotations

import jax

from jax_pagedattn import _C, switches

# XLA's platform names for jax.ffi.register_ffi_target and for mlir lowerings.
_LOWERING_PLATFORM = {"cpu": "cpu", "CUDA": "cuda"}


def _register() -> frozenset[tuple[str, str]]:
  # switches.command_buffers registers the CUDA handlers that declare XLA's command-buffer
  # trait, so XLA may record them into CUDA graphs. Off by default: a step's plan is a new
  # buffer every step, and re-recording the graph around it cost a decode step more than
  # the graph saved (docs/CONTRACT.md, "Command buffers").
  registered = set()
  for platform, targets in _C.registrations(
      command_buffers=switches.current().command_buffers).items():
    for name, capsule in targets.items():
      jax.ffi.register_ffi_target(name, capsule, platform=platform)
      registered.add((_LOWERING_PLATFORM[platform], name))
  return frozenset(registered)


# {(lowering platform, target name)} of every handler this build provides.
NATIVE_TARGETS = _register()
HAS_CUDA = bool(_C.HAS_CUDA)
HAS_SM90_PREFILL = bool(_C.HAS_SM90_PREFILL)
