"""load_model and export_params: a run trained on 8 virtual devices (mesh
data=2 x expert=4, expert parallel) loads in this process and in a
subprocess that has one device; its export loads to the same model."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
CONFIG = os.path.join(REPO, "experiments", "configs", "lm_stdlib.py")
TOKENS_BL = (np.arange(2 * 32).reshape(2, 32) * 7) % 257

CHILD = """
import sys
import jax, numpy as np
from moejax import train
workdir, export, out = sys.argv[1:]
assert jax.device_count() == 1, jax.devices()
tokens = (np.arange(64).reshape(2, 32) * 7) % 257
for name, path in (("run", workdir), ("export", export)):
  model = train.load_model(path)
  model.eval()
  np.save(f"{out}/{name}.npy", np.asarray(model(tokens)[0]))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-step run of the smoke config on 8 devices, checkpoints 1 and 2."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("lm_stdlib", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  base = tmp_path_factory.mktemp("load_model")
  c = module.get_config("size=smoke")
  c.data.data_dir = str(base / "data")
  c.num_train_steps, c.checkpoint_every, c.eval_every = 2, 1, 0
  c.optimizer.warmup_steps = 1
  c.mesh.data, c.mesh.expert = 2, 4
  c.expert_parallel = "shard_map"
  workdir = str(base / "run")
  with open(os.devnull, "w") as null:
    train.train_and_evaluate(c, workdir, stream=null)
  return base, workdir


def _logits(model):
  model.eval()
  return np.asarray(model(jnp.asarray(TOKENS_BL))[0])


def test_a_run_saved_on_8_devices_loads_on_1_and_its_export_too(run):
  base, workdir = run
  assert jax.device_count() == 8
  model = train.load_model(workdir)
  assert type(model).__name__ == "DecoderLM"
  # Block indices are ints, as NNX's List expects.
  assert isinstance(model.blocks[1].ffn.router.w_router_ME[...], jax.Array)
  here = _logits(model)
  assert np.isfinite(here).all()
  first = _logits(train.load_model(workdir, step=1))
  assert not np.allclose(first, here)  # step 1 is another model
  with pytest.raises(ValueError, match=r"step=7 is not a checkpoint .* "
                     r"\[1, 2\]"):
    train.load_model(workdir, step=7)

  export = train.export_params(workdir, str(base / "export"))
  with open(os.path.join(export, "export.json")) as f:
    info = json.load(f)
  assert info["step"] == 2 and info["config"]["model"]["name"] == "decoder_lm"
  assert not os.path.exists(os.path.join(export, "checkpoints"))
  np.testing.assert_allclose(_logits(train.load_model(export)), here,
                             rtol=1e-6)
  with pytest.raises(FileExistsError, match="not empty"):
    train.export_params(workdir, export)

  out = base / "child"
  out.mkdir()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run(
      [sys.executable, "-c", CHILD, workdir, export, str(out)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("run", "export"):
    np.testing.assert_allclose(np.load(out / f"{name}.npy"), here, rtol=1e-5,
                               atol=1e-6)


def test_load_model_names_what_is_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="has no checkpoints"):
    train.load_model(str(tmp_path))
