"""switches.py: the one reader of the environment, and how its values reach plans."""

from __future__ import annotations

import numpy as np
import pytest

import jax_pagedattn as jpa
from jax_pagedattn import planning, switches


def test_switches_are_read_from_the_environment():
  sw = switches.from_environment({})
  assert (sw.sm90_prefill, sw.sm90_stages, sw.dependent_launch, sw.deal, sw.ctas_per_sm) == (
      True, 2, True, "auto", 0)
  sw = switches.from_environment({"JAX_PAGEDATTN_SM90_PREFILL": "0", "JAX_PAGEDATTN_DEAL": "equal",
                                  "JAX_PAGEDATTN_DEPENDENT_LAUNCH": "0",
                                  "JAX_PAGEDATTN_CTAS_PER_SM": "2",
                                  "JAX_PAGEDATTN_SM90_STAGES": "3"})
  assert (sw.sm90_prefill, sw.sm90_stages, sw.dependent_launch, sw.deal, sw.ctas_per_sm) == (
      False, 3, False, "equal", 2)
  with pytest.raises(ValueError, match="JAX_PAGEDATTN_SM90_STAGES"):
    switches.from_environment({"JAX_PAGEDATTN_SM90_STAGES": "4"})
  with pytest.raises(ValueError, match="JAX_PAGEDATTN_DEAL"):
    switches.from_environment({"JAX_PAGEDATTN_DEAL": "random"})
  with pytest.raises(ValueError, match="JAX_PAGEDATTN_CTAS_PER_SM"):
    switches.from_environment({"JAX_PAGEDATTN_CTAS_PER_SM": "many"})


def test_switches_reach_the_plan_and_its_attributes():
  """A plan carries the switches in force when it was made, as FFI attributes, and a
  wrapper derives its setup again when they change."""
  w = jpa.BatchPrefillWithPagedKVCacheWrapper()
  args = (np.array([0, 1], np.int32), np.array([0, 1], np.int32), np.array([0], np.int32),
          np.array([1], np.int32), 4, 2, 64, 16)
  with switches.overridden(sm90_prefill=True, sm90_stages=3, dependent_launch=False):
    on = w.plan(*args).config
  off = w.plan(*args).config
  assert (on.sm90_prefill, on.sm90_stages, on.dependent_launch) == (True, 3, False)
  assert (off.sm90_prefill, off.dependent_launch) == (switches.current().sm90_prefill,
                                                      switches.current().dependent_launch)
  attrs = planning.ffi_attrs(on)
  assert attrs["sm90_prefill"] == np.bool_(True) and attrs["dependent_launch"] == np.bool_(False)
  assert attrs["sm90_stages"] == np.int32(3)
