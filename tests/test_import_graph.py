"""The import graph points down (docs/design.md): kernels and sharding know
arrays and meshes, not layers; layers do not reach up into sharding."""

import subprocess
import sys

import pytest


def _loaded_after(module):
  code = (f"import sys, {module}; print('\\n'.join(sorted(m for m in "
          f"sys.modules if m.startswith('moejax'))))")
  out = subprocess.run([sys.executable, "-c", code], check=True,
                       capture_output=True, text=True, timeout=300)
  return set(out.stdout.split())


@pytest.mark.parametrize("module, forbidden", [
    ("moejax.pallas", ("moejax.layers", "moejax.sharding", "moejax.models")),
    ("moejax.sharding", ("moejax.layers", "moejax.models", "moejax.pallas")),
    ("moejax.layers", ("moejax.sharding", "moejax.models", "moejax.train")),
    ("moejax.routing", ("moejax.layers", "moejax.sharding", "moejax.ops")),
])
def test_module_does_not_load(module, forbidden):
  loaded = _loaded_after(module)
  bad = sorted(m for m in loaded if m.startswith(forbidden))
  assert not bad, f"importing {module} loads {bad}"
