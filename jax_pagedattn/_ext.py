"""Loads the native extension and registers its FFI handlers with XLA, once."""

from __future__ import annotations

import jax

from jax_pagedattn import _C

# XLA's platform names for jax.ffi.register_ffi_target and for mlir lowerings.
_LOWERING_PLATFORM = {"cpu": "cpu", "CUDA": "cuda"}


def _register() -> frozenset[tuple[str, str]]:
  registered = set()
  for platform, targets in _C.registrations().items():
    for name, capsule in targets.items():
      jax.ffi.register_ffi_target(name, capsule, platform=platform)
      registered.add((_LOWERING_PLATFORM[platform], name))
  return frozenset(registered)


# {(lowering platform, target name)} of every handler this build provides.
NATIVE_TARGETS = _register()
HAS_CUDA = bool(_C.HAS_CUDA)
