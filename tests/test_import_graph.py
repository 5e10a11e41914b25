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


def _imports_of(path):
  """Every module a source file imports, at any level (function-level too)."""
  import ast
  tree = ast.parse(open(path).read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


@pytest.mark.parametrize("package", ["pallas", "sharding", "ops", "routing"])
def test_no_source_file_imports_layers(package):
  """Not even lazily inside a function (the old cycle was held apart so)."""
  import glob
  import os
  root = os.path.join(os.path.dirname(__file__), "..", "moejax", package)
  for path in glob.glob(os.path.join(root, "*.py")):
    bad = sorted(m for m in _imports_of(path)
                 if m.startswith(("moejax.layers", "moejax.models")))
    assert not bad, f"{path} imports {bad}"
