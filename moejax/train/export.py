"""Loading a trained run's model, and params-only exports for sharing.

    model = moejax.train.load_model("workdirs/lm_stdlib")       # newest step
    logits_BLV, aux = model(tokens_BL)
    moejax.train.export_params("workdirs/lm_stdlib", "exports/lm")
    model = moejax.train.load_model("exports/lm")                # same model

A run's checkpoints hold the whole TrainState (parameters, model state,
optimizer state) sharded over the mesh the run trained on. load_model reads
the run's config, builds the model's structure abstractly (nothing is
initialised) and restores the checkpoint into arrays replicated over the
current devices, giving orbax the target shapes and shardings: a run saved
on 8 (virtual) devices loads in a process with one, and the restored tree
keeps the model's own keys (block indices are ints, as NNX expects). The
checkpoint is verified as a resume verifies it (fingerprints, step).

An export is a directory with

    export.json   the model's config (task, model, moe, prng_impl), the
                  step and the run it came from
    params/       orbax StandardSave of {'params', 'model_state'} (no
                  optimizer state, no data position)

load_model tells the two apart by export.json.
"""

import contextlib
import json
import os

from absl import logging

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax.train import checkpoint as ckpt_lib
from moejax.train import optim
from moejax.train import state as state_lib

EXPORT_FILE = "export.json"
PARAMS_DIR = "params"
# The config sections a model needs (the rest is about training).
MODEL_FIELDS = ("task", "model", "moe", "prng_impl", "seed")


def _run_config(workdir, step):
  """The config dict of `workdir`'s checkpoint `step` (its meta), else
  workdir/config.json."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  meta_path = os.path.join(ckpt_dir, str(step), ckpt_lib.META, "metadata")
  try:
    with open(meta_path) as f:
      config = json.load(f).get("config")
    if isinstance(config, dict):
      return config
  except (OSError, ValueError):
    pass
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} holds no config.json: not a moejax "
                            f"run or export")
  with open(path) as f:
    return json.load(f)


def _factory(config):
  from moejax.train import loop  # pylint: disable=g-import-not-at-top
  return loop.model_factory(ml_collections.ConfigDict(config))


def _replicated():
  """A sharding that puts a whole array on every current device."""
  mesh = Mesh(np.asarray(jax.devices()), ("devices",))
  return NamedSharding(mesh, P())


def _abstract(tree, sharding):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      tree)


def _split(model):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params.to_pure_dict(), rest.to_pure_dict()


def _is_key(x):
  return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_data(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x,
                      tree)


def _wrap_keys(tree, template, impl):
  """Typed PRNG keys back where `template` (abstract) has them."""
  return jax.tree.map(
      lambda t, x: jax.random.wrap_key_data(x, impl=impl) if _is_key(t)
      else x, template, tree)


def _structure(config):
  """(graphdef, abstract params, abstract model_state with typed keys) of
  the config's model, built with nnx.eval_shape (nothing initialised)."""
  graphdef, params, rest = _split(nnx.eval_shape(_factory(config)))
  return graphdef, params, rest


def list_steps(workdir):
  """The checkpoint steps of a run, oldest first."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


def _restore_run(workdir, step):
  """(config dict, step, params, model_state) of a run's checkpoint, on the
  current devices (replicated)."""
  steps = list_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"{workdir} has no checkpoints (looked in "
                            f"{os.path.join(workdir, 'checkpoints')})")
  if step is None:
    step = steps[-1]
  elif int(step) not in steps:
    raise ValueError(f"step={step} is not a checkpoint of {workdir}; its "
                     f"steps: {steps}")
  step = int(step)
  config = _run_config(workdir, step)
  c = ml_collections.ConfigDict(config)
  factory = _factory(config)
  o = c.optimizer
  tx = optim.make_optimizer(
      optim.make_schedule(
          learning_rate=o.learning_rate, total_steps=int(c.num_train_steps),
          warmup_steps=o.warmup_steps,
          end_learning_rate_fraction=o.end_learning_rate_fraction),
      weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
      grad_clip_norm=o.grad_clip_norm)

  def build():  # the checkpoint tree's structure, shapes and dtypes
    _, params, rest = _split(factory())
    return state_lib.to_checkpoint_tree(state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, model_state=rest,
        opt_state=tx.init(params)))

  abstract = _abstract(jax.eval_shape(build), _replicated())
  with _quiet_orbax():  # "Given directory is read only": as asked
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 async_save=False, read_only=True)
  try:
    tree, _ = ckpt.restore_tree(step, abstract)
  finally:
    ckpt.close(quiet=True)
  return config, step, tree["params"], tree["model_state"]


@contextlib.contextmanager
def _quiet_orbax():
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def _model(config, params, model_state):
  graphdef, _, rest = _structure(config)
  model_state = _wrap_keys(model_state, rest, config.get("prng_impl") or None)
  return nnx.merge(graphdef, params, model_state)


def load_model(path, step=None):
  """The trained model of a run's workdir (checkpoint `step`, default the
  newest) or of an export directory (export_params), on the current
  devices whatever mesh it was trained on.

  Args:
    path: a run's workdir, or a directory export_params wrote.
    step: a checkpoint step of the run; None: the newest. Not used for an
      export (it holds one step).
  Returns:
    The nnx model (DecoderLM or ViTClassifier) with its trained parameters
    and model state (router biases, RNG streams), arrays replicated over
    jax.devices(). The expert-parallel setting of the run is not applied
    (it is a property of a mesh); call model.eval() for inference.
  Raises:
    FileNotFoundError: no checkpoints and no export at `path`.
    ValueError: `step` is not one of the run's checkpoints.
    moejax.train.CorruptCheckpointError: the checkpoint does not verify.
  """
  path = os.path.abspath(path)
  export_file = os.path.join(path, EXPORT_FILE)
  if os.path.exists(export_file):
    with open(export_file) as f:
      info = json.load(f)
    config = info["config"]
    factory = _factory(config)
    sharding = _replicated()
    target = _abstract(jax.eval_shape(lambda: dict(zip(
        ("params", "model_state"), map(_key_data, _split(factory())[1:])))),
                       sharding)
    with ocp.StandardCheckpointer() as checkpointer:
      tree = checkpointer.restore(os.path.join(path, PARAMS_DIR), target)
    return _model(config, tree["params"], tree["model_state"])
  config, _, params, model_state = _restore_run(path, step)
  return _model(config, params, model_state)


def export_params(workdir, out_dir, step=None):
  """Writes a params-only export of a run's checkpoint to `out_dir`:
  parameters and model state (orbax), and export.json (the model's config,
  the step, the source run). load_model(out_dir) reads it back.

  Returns:
    out_dir (absolute).
  Raises:
    FileExistsError: out_dir exists and is not empty.
    As load_model for the run.
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"{out_dir} exists and is not empty; choose a new "
                          f"directory for the export")
  config, step, params, model_state = _restore_run(os.path.abspath(workdir),
                                                   step)
  os.makedirs(out_dir, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(out_dir, PARAMS_DIR),
                      {"params": params, "model_state": model_state})
  info = {"config": {k: config[k] for k in MODEL_FIELDS if k in config},
          "step": step, "source": os.path.abspath(workdir)}
  ckpt_lib.write_json_atomic(os.path.join(out_dir, EXPORT_FILE), info)
  return out_dir
