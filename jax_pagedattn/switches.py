"""The runtime switches: every environment variable the library reads, read here once.

They are knobs for measurement and debugging, not API. Their values reach the native
code as data: the planner's deal through the PlanSpec, the kernels' choices as
attributes of each call (part of the PlanConfig, so part of a jitted step's compile
key), the command-buffer choice when the handlers are registered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

# Planner deals by name, and their codes in PlanSpec (planner.h, Deal).
DEALS = {"auto": 0, "bins": 1, "equal": 2}


@dataclasses.dataclass(frozen=True)
class Switches:
  # JAX_PAGEDATTN_SM90_PREFILL=0: the sm80 prefill kernel even where the Hopper one covers
  # a call (default on since it passed the GPU suite on an H100; docs/CONTRACT.md).
  sm90_prefill: bool = True
  # JAX_PAGEDATTN_SM90_STAGES=2|3: K/V stages of the Hopper prefill kernel's ring (3 exists
  # at head_dim 128 only; other head_dims keep 2). 3 is the default since it timed up to
  # 5% faster in the library and 5-8% in the harness (docs/PERF_NOTES.md).
  sm90_stages: int = 3
  # JAX_PAGEDATTN_SM90_DRAWN_TASKS=0: the Hopper prefill kernel runs one CTA per (bin, kv
  # head) instead of one CTA per SM drawing (item, kv head) tasks costliest first (its
  # plans ordered so: PlanSpec longest_first). Drawn tasks are the default since they
  # passed the GPU suite and sanitizers and timed 1.06-1.19x faster (docs/PERF_NOTES.md).
  sm90_drawn_tasks: bool = True
  # JAX_PAGEDATTN_SM90_ROPE_KEYS=0: the Hopper prefill kernel rotates RoPE keys in every
  # CTA that loads them, instead of once per call into a workspace section of the plan's
  # key capacity (rope_keys.cuh; docs/CONTRACT.md).
  sm90_rope_keys: bool = True
  # JAX_PAGEDATTN_SM90_PINGPONG=1|0: the Hopper prefill kernel's two consumer warpgroups
  # take turns to issue their GEMMs (named barriers), or never do; unset (-1), the kernel
  # takes them at head_dim 64 only, where they timed faster (docs/PERF_NOTES.md).
  sm90_pingpong: int = -1
  # JAX_PAGEDATTN_DEPENDENT_LAUNCH=0: no programmatic dependent launch (sm90+).
  dependent_launch: bool = True
  # JAX_PAGEDATTN_DEAL=bins|equal: force one of the planner's two deals.
  deal: str = "auto"
  # JAX_PAGEDATTN_CTAS_PER_SM=n: bins fill n CTAs per SM instead of the occupancy
  # calculator's answer (0).
  ctas_per_sm: int = 0
  # JAX_PAGEDATTN_COMMAND_BUFFERS=1: register the CUDA handlers that XLA may record into
  # CUDA graphs (read when the extension registers its handlers, at import).
  command_buffers: bool = False
  # JAX_PAGEDATTN_FP8_TENSOR_CORES=0: no fp8 caches on the GPU's tensor-core kernel
  # (prefill, use_tensor_cores decode): those calls then raise NotImplementedError and fp8
  # runs on the CUDA-core decode kernel only. On by default since the path passed the GPU
  # suite and memcheck on an H100 (docs/PERF_NOTES.md).
  fp8_tensor_cores: bool = True

  def plan_fields(self) -> dict:
    """The switches every plan carries for its kernels, as the PlanConfig fields of the
    same names (the wrapper adds sm90_rope_keys, which depends on the call too)."""
    return dict(sm90_prefill=self.sm90_prefill, sm90_stages=self.sm90_stages,
                sm90_drawn_tasks=self.sm90_drawn_tasks, sm90_pingpong=self.sm90_pingpong,
                dependent_launch=self.dependent_launch, fp8_tensor_cores=self.fp8_tensor_cores)


def _flag(environ, name: str, default: bool) -> bool:
  """An on/off variable: "0" is off, unset or empty the default, anything else on."""
  value = environ.get(name, "")
  return default if value == "" else value != "0"


def _forced(environ, name: str) -> int:
  """A variable that forces a kernel's choice: unset or empty -1 (the kernel's own rule),
  "0" 0 (off), anything else 1 (on)."""
  value = environ.get(name, "")
  return -1 if value == "" else int(value != "0")


def from_environment(environ=os.environ) -> Switches:
  deal = environ.get("JAX_PAGEDATTN_DEAL", "auto") or "auto"
  if deal not in DEALS:
    raise ValueError(f"JAX_PAGEDATTN_DEAL must be one of {tuple(DEALS)}, got {deal!r}")
  ctas = environ.get("JAX_PAGEDATTN_CTAS_PER_SM", "") or "0"
  try:
    ctas_per_sm = int(ctas)
  except ValueError:
    raise ValueError(f"JAX_PAGEDATTN_CTAS_PER_SM must be an integer, got {ctas!r}") from None
  stages = environ.get("JAX_PAGEDATTN_SM90_STAGES", "") or "3"
  if stages not in ("2", "3"):
    raise ValueError(f"JAX_PAGEDATTN_SM90_STAGES must be 2 or 3, got {stages!r}")
  return Switches(
      sm90_prefill=_flag(environ, "JAX_PAGEDATTN_SM90_PREFILL", True),
      sm90_stages=int(stages),
      sm90_drawn_tasks=_flag(environ, "JAX_PAGEDATTN_SM90_DRAWN_TASKS", True),
      sm90_rope_keys=_flag(environ, "JAX_PAGEDATTN_SM90_ROPE_KEYS", True),
      dependent_launch=_flag(environ, "JAX_PAGEDATTN_DEPENDENT_LAUNCH", True),
      deal=deal,
      ctas_per_sm=max(0, ctas_per_sm),
      command_buffers=_flag(environ, "JAX_PAGEDATTN_COMMAND_BUFFERS", False),
      fp8_tensor_cores=_flag(environ, "JAX_PAGEDATTN_FP8_TENSOR_CORES", True),
      sm90_pingpong=_forced(environ, "JAX_PAGEDATTN_SM90_PINGPONG"),
  )


_current = from_environment()


def current() -> Switches:
  """The switches in force (read from the environment when the package was imported)."""
  return _current


@contextlib.contextmanager
def overridden(**changes):
  """Switches changed for the duration of a `with` block (tests, benchmarks). Plans made
  inside carry the changed values; wrappers derive their static setup again."""
  global _current
  saved = _current
  _current = dataclasses.replace(saved, **changes)
  try:
    yield _current
  finally:
    _current = saved
