"""Backends for the test suite.

Every op test takes the ``platform`` fixture ("cpu" or "gpu") and the ``device`` fixture
built on it; gpu cases skip, with the reason, when this jaxlib has no GPU backend. Grid
tests (``@pytest.mark.grid(name)``) get ``platform`` and ``case`` parametrised jointly so
that each platform runs a pairwise covering set of configurations restricted to the
dtypes it supports (f32 is CPU-only).
"""

from __future__ import annotations

import jax
import pytest

import _helpers

PLATFORMS = ("cpu", "gpu")


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: runs on the GPU backend (skips without one)")
  config.addinivalue_line(
      "markers", "grid(name): parametrise (platform, case) over the named case grid")


def _platform_param(platform, *values, id_suffix=None):
  ident = platform if id_suffix is None else f"{platform}-{id_suffix}"
  marks = [pytest.mark.gpu] if platform == "gpu" else []
  return pytest.param(platform, *values, id=ident, marks=marks)


def pytest_generate_tests(metafunc):
  marker = metafunc.definition.get_closest_marker("grid")
  if marker is not None:
    name = marker.args[0]
    params = [
        _platform_param(p, case, id_suffix=case.id)
        for p in PLATFORMS
        for case in _helpers.grid_cases(name, p)
    ]
    metafunc.parametrize("platform,case", params)
  elif "platform" in metafunc.fixturenames:
    metafunc.parametrize("platform", [_platform_param(p) for p in PLATFORMS])


@pytest.fixture
def device(platform):
  """The first device of the platform; skips if this jaxlib has none."""
  try:
    devices = jax.devices(platform)
  except RuntimeError as e:  # jax raises RuntimeError for an unknown backend
    pytest.skip(f"no {platform} backend in this jaxlib: {e}")
  if not devices:
    pytest.skip(f"no {platform} devices")
  return devices[0]


@pytest.fixture
def rng(request):
  """A numpy Generator seeded from the test's id: fresh data per test, reproducible."""
  return _helpers.seeded_rng(request.node.nodeid)
