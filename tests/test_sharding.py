"""The sharded ops on 8 host CPU devices: tests/sharding_cases.py, in a process of its own.

XLA fixes the number of host devices when jax starts its CPU backend, which this suite's
process has already done with one device; so the cases run under a fresh interpreter
with XLA_FLAGS asking for 8 (and JAX_PLATFORMS=cpu, so a GPU machine runs them on its
host devices too). Its pytest summary is printed here; a failure shows its report.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def test_sharded_ops_on_8_host_devices():
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  env["XLA_FLAGS"] = flags.strip()
  env["JAX_PLATFORMS"] = "cpu"
  # -P: import the installed package, not a source tree in the working directory.
  cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(HERE / "sharding_cases.py")]
  done = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True,
                        timeout=1800)
  report = done.stdout + done.stderr
  print(report.strip().splitlines()[-1] if report.strip() else "(no output)")
  assert done.returncode == 0, f"sharded cases failed (exit {done.returncode}):\n{report[-12000:]}"
  assert " passed" in report and " skipped" not in report.splitlines()[-1], report[-3000:]
