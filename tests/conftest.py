"""Test setup: 8 virtual CPU devices, configured before any JAX operation."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import hypothesis  # noqa: E402
import pytest  # noqa: E402

hypothesis.settings.register_profile(
    "moejax", deadline=None, max_examples=25, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile("moejax")


def _has_platform(platform):
  """Whether JAX sees a device of this platform ('gpu' or 'tpu')."""
  try:
    return bool(jax.devices(platform))
  except RuntimeError:  # platform not present or not enabled (JAX_PLATFORMS)
    return False


def pytest_collection_modifyitems(config, items):
  """Skips @pytest.mark.gpu / @pytest.mark.tpu tests without that backend.

  This conftest defaults JAX_PLATFORMS to cpu; on a GPU machine run them with
  e.g. `JAX_PLATFORMS=cuda,cpu python -m pytest -m gpu tests/pallas`.
  """
  del config
  present = {}
  for item in items:
    for platform in ("gpu", "tpu"):
      if item.get_closest_marker(platform) is None:
        continue
      if platform not in present:
        present[platform] = _has_platform(platform)
      if not present[platform]:
        item.add_marker(pytest.mark.skip(
            reason=f"needs a {platform.upper()} (set JAX_PLATFORMS to "
                   f"include it; this run sees {jax.default_backend()})"))
