"""switches.py: the one reader of the environment, and how its values reach plans."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jax_pagedattn as jpa
from jax_pagedattn import planning, switches


def test_switches_are_read_from_the_environment():
  sw = switches.from_environment({})
  assert (sw.sm90_prefill, sw.sm90_stages, sw.dependent_launch, sw.deal, sw.ctas_per_sm) == (
      True, 3, True, "auto", 0)
  sw = switches.from_environment({"JAX_PAGEDATTN_SM90_PREFILL": "0", "JAX_PAGEDATTN_DEAL": "equal",
                                  "JAX_PAGEDATTN_DEPENDENT_LAUNCH": "0",
                                  "JAX_PAGEDATTN_CTAS_PER_SM": "2",
                                  "JAX_PAGEDATTN_SM90_STAGES": "2"})
  assert (sw.sm90_prefill, sw.sm90_stages, sw.dependent_launch, sw.deal, sw.ctas_per_sm) == (
      False, 2, False, "equal", 2)
  with pytest.raises(ValueError, match="JAX_PAGEDATTN_SM90_STAGES"):
    switches.from_environment({"JAX_PAGEDATTN_SM90_STAGES": "4"})
  with pytest.raises(ValueError, match="JAX_PAGEDATTN_DEAL"):
    switches.from_environment({"JAX_PAGEDATTN_DEAL": "random"})
  with pytest.raises(ValueError, match="JAX_PAGEDATTN_CTAS_PER_SM"):
    switches.from_environment({"JAX_PAGEDATTN_CTAS_PER_SM": "many"})


def test_fp8_tensor_cores_switch():
  """JAX_PAGEDATTN_FP8_TENSOR_CORES: on unless set to "0"; a plan carries the value in
  force when it was made (the CUDA lowering's gate)."""
  _assert_on_unless_zero("fp8_tensor_cores", "JAX_PAGEDATTN_FP8_TENSOR_CORES")
  w = jpa.BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=True)
  args = (np.array([0, 1], np.int32), np.array([0], np.int32), np.array([3], np.int32), 4, 2,
          64, 16)
  with switches.overridden(fp8_tensor_cores=True) as sw:
    assert sw.fp8_tensor_cores
    on = w.plan(*args, q_data_type="bfloat16", kv_data_type="float8_e4m3fn").config
  with switches.overridden(fp8_tensor_cores=False):
    off = w.plan(*args, q_data_type="bfloat16", kv_data_type="float8_e4m3fn").config
  assert on.fp8_tensor_cores is True and off.fp8_tensor_cores is False
  assert "fp8_tensor_cores" not in planning.ffi_attrs(on)  # the lowering's, not the kernel's


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


# A prefill batch of one 300-token request over 19 pages (8/2 heads, head_dim 64, page 16).
_PREFILL_ARGS = (np.array([0, 300], np.int32), np.array([0, 19], np.int32),
                 np.arange(19, dtype=np.int32), np.array([12], np.int32), 8, 2, 64, 16)


def _assert_on_unless_zero(field: str, variable: str):
  """An on/off variable defaulting to on: "0" turns it off, unset or empty keep it."""
  assert getattr(switches.from_environment({}), field) is True
  for value, want in (("1", True), ("0", False), ("", True), ("yes", True)):
    assert getattr(switches.from_environment({variable: value}), field) is want, value


def test_sm90_drawn_tasks_switch():
  """JAX_PAGEDATTN_SM90_DRAWN_TASKS: on unless set to "0"; a prefill plan carries it as
  the sm90_drawn_tasks attribute the Hopper launcher reads, and only where the Hopper
  kernel runs the call (never on the CPU) are its items ordered for drawing."""
  _assert_on_unless_zero("sm90_drawn_tasks", "JAX_PAGEDATTN_SM90_DRAWN_TASKS")
  w = jpa.BatchPrefillWithPagedKVCacheWrapper()
  args = _PREFILL_ARGS
  with switches.overridden(sm90_drawn_tasks=True):
    on = w.plan(*args, causal=True)
  with switches.overridden(sm90_drawn_tasks=False):
    off = w.plan(*args, causal=True)
  assert on.config.sm90_drawn_tasks is True and off.config.sm90_drawn_tasks is False
  assert planning.ffi_attrs(on.config)["sm90_drawn_tasks"] == np.bool_(True)
  if planning.hopper_prefill("prefill", "float16", "float16", 64):
    assert not np.array_equal(on.buffer, off.buffer), "causal tiles reordered, longest first"
  else:
    np.testing.assert_array_equal(on.buffer, off.buffer)


def test_sm90_rope_keys_switch():
  """JAX_PAGEDATTN_SM90_ROPE_KEYS: on unless set to "0". A RoPE prefill plan asks for the
  workspace section of rotated keys (attribute sm90_rope_keys) only where the Hopper
  kernel runs it and the switch is on; the section holds every key slot of the plan's
  page capacity for every kv head, and nothing else grows."""
  _assert_on_unless_zero("sm90_rope_keys", "JAX_PAGEDATTN_SM90_ROPE_KEYS")
  w = jpa.BatchPrefillWithPagedKVCacheWrapper()
  args = _PREFILL_ARGS
  hopper = planning.hopper_prefill("prefill", "float16", "float16", 64)
  with switches.overridden(sm90_rope_keys=True):
    rope = w.plan(*args, causal=True, pos_encoding_mode="ROPE_LLAMA", q_data_type="float16")
    plain = w.plan(*args, causal=True, q_data_type="float16")
  with switches.overridden(sm90_rope_keys=False):
    rope_off = w.plan(*args, causal=True, pos_encoding_mode="ROPE_LLAMA", q_data_type="float16")
  assert rope.config.sm90_rope_keys is hopper
  assert plain.config.sm90_rope_keys is False and rope_off.config.sm90_rope_keys is False
  assert planning.ffi_attrs(rope.config)["sm90_rope_keys"] == np.bool_(hopper)
  # The formula, asked of the C++ owner directly (any backend).
  forced = dataclasses.replace(rope_off.config, sm90_rope_keys=True)
  caps = forced.caps
  section = caps.pages * 16 * 2 * 64 * 2  # slots x kv heads x head_dim x 2 bytes
  assert section > 0
  assert rope_off.config.workspace_bytes < forced.workspace_bytes
  assert forced.workspace_bytes - rope_off.config.workspace_bytes <= section + 128 + 8
  assert forced.workspace_bytes - rope_off.config.workspace_bytes >= section
  assert plain.config.workspace_bytes == rope_off.config.workspace_bytes


def test_sm90_pingpong_switch():
  """JAX_PAGEDATTN_SM90_PINGPONG: unset, -1 (the kernel's rule by head_dim); "0" forces the
  pingpong off, anything else on. A prefill plan carries it as the int32 sm90_pingpong
  attribute the Hopper launcher reads."""
  assert switches.from_environment({}).sm90_pingpong == -1
  for value, want in (("1", 1), ("0", 0), ("", -1), ("yes", 1)):
    sw = switches.from_environment({"JAX_PAGEDATTN_SM90_PINGPONG": value})
    assert sw.sm90_pingpong == want, value
  w = jpa.BatchPrefillWithPagedKVCacheWrapper()
  plans = {}
  for forced in (1, 0, -1):
    with switches.overridden(sm90_pingpong=forced):
      plans[forced] = w.plan(*_PREFILL_ARGS, causal=True)
    assert plans[forced].config.sm90_pingpong == forced
    assert planning.ffi_attrs(plans[forced].config)["sm90_pingpong"] == np.int32(forced)
  np.testing.assert_array_equal(plans[1].buffer, plans[-1].buffer)  # a schedule, not a plan


def test_plan_fields_carry_every_kernel_switch():
  """Switches.plan_fields is the one place that maps switches into a PlanConfig: every
  switch that is a PlanConfig field is in it (sm90_rope_keys aside: the wrapper decides it
  per call), and nothing else is."""
  config_fields = {f.name for f in dataclasses.fields(planning.PlanConfig)}
  switch_fields = {f.name for f in dataclasses.fields(switches.Switches)}
  carried = set(switches.from_environment({}).plan_fields())
  assert carried == (switch_fields & config_fields) - {"sm90_rope_keys"}
  with switches.overridden(sm90_pingpong=1, sm90_stages=2, fp8_tensor_cores=False):
    fields = switches.current().plan_fields()
  assert (fields["sm90_pingpong"], fields["sm90_stages"], fields["fp8_tensor_cores"]) == (
      1, 2, False)
