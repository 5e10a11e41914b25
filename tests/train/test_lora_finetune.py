"""Fine-tuning a pretrained checkpoint with LoRA experts from a config
(experiments/configs/finetune.py:lora: model.name='pretrained',
init_from.path, model.wrappers.lora_experts): the checkpoint is copied into
the wrapped, frozen FFNs, step 0 computes the checkpoint, only adapters and
routers train, and the run resumes."""

import importlib.util
import io
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax import models
from moejax import train
from moejax.layers import build as build_lib
from moejax.layers import lora_experts as le
from moejax.train import init_from as init_from_lib
from moejax.train import loop
from moejax.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
FIXTURES = os.path.join(REPO, "tests", "models", "fixtures")
ADAPTER_LEAVES = ("a_EMR", "b_ERM", "w_router_ME")


def _config(tmp_path, fixture, steps=3, stop_after=0):
  path = os.path.join(REPO, "experiments", "configs", "finetune.py")
  spec = importlib.util.spec_from_file_location("finetune", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("lora,size=smoke")
  c.init_from.path = os.path.join(FIXTURES, fixture)
  c.data.data_dir = str(tmp_path / "data")
  c.num_train_steps, c.checkpoint_every, c.eval_every = steps, 1, 0
  c.stop_after_steps = stop_after
  c.optimizer.learning_rate = 1e-2  # a visible change in a few steps
  c.optimizer.warmup_steps = 1      # step 1 at lr 0, then 1e-2
  return c


def _flat(model, kind):
  return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in
          nnx.to_flat_state(nnx.state(model, kind))}


def _is_adapter(path):
  return path.rsplit("/", 1)[-1] in ADAPTER_LEAVES


@pytest.mark.parametrize("fixture", ["qwen3", "olmoe"])
def test_the_trainers_state_starts_at_the_checkpoint(tmp_path, fixture):
  # The trainer's own path: the config's model (architecture + wrappers),
  # its TrainState and optimizer, then init_from's copy.
  c = _config(tmp_path, fixture)
  loop.validate_config(c)
  mesh = state_lib.make_train_mesh({"data": -1})
  tx = optax.adamw(1e-2)
  graphdef, state, _ = state_lib.create_train_state(
      loop.model_factory(c), tx, mesh)
  state, report = init_from_lib.fill_state(graphdef, state, c.init_from)
  assert report["copied"] and not report["initialised"]
  assert not report["broadcast"]
  # Optimizer state for the adapters and routers only.
  params = {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in
            jax.tree_util.tree_flatten_with_path(state.params)[0]}
  assert len(params) == 6 and all(map(_is_adapter, params)), sorted(params)
  mu = optax.tree.get(state.opt_state, "mu")
  assert sum(x.size for x in jax.tree.leaves(mu)) == sum(
      x.size for x in params.values())
  model = nnx.merge(graphdef, state.params, state.model_state)
  pretrained = models.from_pretrained(c.init_from.path)
  d = np.load(os.path.join(c.init_from.path, "inputs.npz"))
  ids_BL, mask_BL = jnp.asarray(d["ids_BL"]), jnp.asarray(d["mask_BL"])
  forward = nnx.jit(lambda m, x, mask: m(x, padding_mask_BL=mask)[0])
  got_BLV = forward(model, ids_BL, mask_BL)
  want_BLV = forward(pretrained, ids_BL, mask_BL)
  np.testing.assert_array_equal(np.asarray(got_BLV), np.asarray(want_BLV))


def test_lora_fine_tuning_trains_only_adapters_and_resumes(tmp_path):
  # OLMoE (all MoE: LoRA experts over whole frozen MoE layers); 3 steps,
  # stopped after 2, then resumed from the run's own checkpoint.
  c = _config(tmp_path, "olmoe", steps=3, stop_after=2)
  workdir = str(tmp_path / "run")
  first = io.StringIO()
  train.train_and_evaluate(c, workdir, stream=first)
  text = first.getvalue()
  assert "initialised from" in text and "0 left at their initialisation" in (
      text)
  assert "LoRAExpertsFFN x2" in text
  pretrained = models.from_pretrained(c.init_from.path)
  before = _flat(pretrained, nnx.Param)
  second = io.StringIO()
  train.train_and_evaluate(c, workdir, stream=second)
  assert "resumed from" in second.getvalue()
  assert "initialised from" not in second.getvalue()
  for step in (2, 3):
    model = train.load_model(workdir, step=step)
    assert all(isinstance(b.ffn, le.LoRAExpertsFFN) for b in model.blocks)
    params = _flat(model, nnx.Param)
    assert len(params) == 6 and all(map(_is_adapter, params))
    # Every pretrained weight is bitwise the checkpoint's.
    with build_lib.unwrapped(model):
      frozen = _flat(model, le.FrozenParam)
    assert set(frozen) == set(before)
    for path, value in before.items():
      np.testing.assert_array_equal(frozen[path], value, err_msg=path)
  # Step 2 moved B (zero at the start); step 3 (after the resume) moved A
  # and the routers too, whose gradients carry B.
  at2 = _flat(train.load_model(workdir, step=2), nnx.Param)
  at3 = _flat(train.load_model(workdir, step=3), nnx.Param)
  assert all(np.abs(v).sum() > 0 for p, v in at2.items()
             if p.endswith("b_ERM"))
  assert all(not np.array_equal(at2[p], at3[p]) for p in at2)


def test_bad_lora_options_are_config_errors_on_their_field(tmp_path):
  c = _config(tmp_path, "olmoe")
  c.model.wrappers.lora_experts.rank = 0
  c.model.wrappers.lora_experts.select = "moejax.layers.moe.NoSuchLayer"
  with pytest.raises(train.ConfigError) as err:
    loop.validate_config(c)
  text = str(err.value)
  assert "config.model.wrappers.lora_experts.rank=0" in text, text
  c = _config(tmp_path, "olmoe")
  c.model.wrappers.lora_experts.select = "moejax.layers.moe.NoSuchLayer"
  with pytest.raises(train.ConfigError, match=(
      r"config.model.wrappers.lora_experts.select=.*NoSuchLayer.*not an "
      r"importable class path")):
    loop.validate_config(c)
