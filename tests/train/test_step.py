"""The loss, the train step, the optimizer and the config files, in process."""

import importlib.util
import os

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moejax import models
from moejax import train
from moejax.train import loop
from moejax.train import optim

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
CONFIGS = os.path.join(REPO, "experiments", "configs")


def _config_module(name):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(CONFIGS, name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_masked_cross_entropy_ignores_masked_positions():
  # (B=1, L=2, V=3): position 1 is masked out.
  logits = jnp.array([[[0.0, 0.0, 0.0], [5.0, -5.0, 0.0]]])
  labels = jnp.array([[1, 1]])
  ce, acc, weight = train.masked_cross_entropy(logits, labels,
                                               jnp.array([[1, 0]]))
  np.testing.assert_allclose(ce, np.log(3.0), rtol=1e-6)
  assert float(weight) == 1.0 and float(acc) in (0.0, 1.0)


def test_schedule_warmup_then_cosine_to_the_end_fraction():
  s = optim.make_schedule(learning_rate=1.0, total_steps=100, warmup_steps=10,
                          end_learning_rate_fraction=0.1)
  np.testing.assert_allclose([s(0), s(5), s(10), s(100)], [0, 0.5, 1.0, 0.1],
                             rtol=1e-6, atol=1e-7)
  assert 0.1 < float(s(55)) < 1.0
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.make_schedule(learning_rate=1.0, total_steps=5, warmup_steps=6)


def test_loss_adds_the_weighted_aux_losses():
  # A tiny MoE LM: V=13, M=8, 1 MoE layer (E=4, k=2), batch [B=2, L=8].
  # (The full train step is checked on its metrics in test_train_app.)
  weights = {"load_balance": 0.5, "z_loss": 0.25}
  model = models.DecoderLM(
      13, 8, 1, 2, 16, moe_every=1, moe_layer_kwargs=dict(num_experts=4, k=2),
      rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 13)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  @nnx.jit
  def losses(model, batch):
    loss, (_, aux, task_loss, aux_loss) = train.compute_loss(
        train.LMTask(), model, batch, weights, deterministic=False)
    return loss, task_loss, aux_loss, aux.losses

  loss, task_loss, aux_loss, aux = jax.device_get(losses(model, batch))
  assert aux.load_balance.shape == (1,)  # one MoE layer
  assert aux.load_balance[0] > 0 and aux.z_loss[0] > 0
  expected = 0.5 * aux.load_balance.sum() + 0.25 * aux.z_loss.sum()
  np.testing.assert_allclose(aux_loss, expected, rtol=1e-6)
  np.testing.assert_allclose(loss, task_loss + expected, rtol=1e-6)
  with pytest.raises(ValueError, match="unknown aux loss names"):
    train.make_train_step(None, train.LMTask(), None, None,
                          {"load_balanse": 1.0})


@pytest.mark.parametrize("name,args", [
    ("lm_stdlib", ["", "dense", "size=smoke", "router=top1",
                   "dense,size=base"]),
    ("vit_digits", ["", "soft_moe", "dense", "size=smoke",
                    "soft_moe,size=smoke"]),
])
def test_configs_build_their_models(name, args):
  module = _config_module(name)
  for arg in args:
    config = module.get_config(arg)
    loop.validate_config(config)
    model = nnx.eval_shape(loop.model_factory(config))  # shapes only
    counts = models.count_params(model)
    assert counts["active"] <= counts["total"]
    dense = "dense" in arg
    assert bool(model.moe_layers) != dense, arg


def test_dense_variant_is_flop_matched():
  module = _config_module("lm_stdlib")
  flops = {}
  for arg in ("", "dense"):
    config = module.get_config(arg)
    model = nnx.eval_shape(loop.model_factory(config))
    flops[arg] = models.flops_breakdown(model, config.data.seq_len)
  ffn = lambda f: f["dense_ffn"] + f["moe"]
  # Router FLOPs (2*M*E per token per MoE layer) are the only difference.
  assert abs(ffn(flops[""]) - ffn(flops["dense"])) / ffn(flops[""]) < 0.05


@pytest.mark.parametrize("name", ["lm_stdlib", "vit_digits"])
def test_sweep_points_are_valid_overrides(name):
  module = _config_module(name)
  points = module.sweep()
  assert len(points) >= 4
  built = set()
  for point in points:
    point = dict(point)
    arg = point.pop("config_arg", None)
    config = module.get_config(arg)
    config.lock()
    for key, value in point.items():
      target = config
      *parents, leaf = key.split(".")
      for p in parents:
        target = target[p]
      target[leaf] = value  # raises on a misspelt field (locked)
    if arg not in built:  # one model per variant: shapes only
      built.add(arg)
      nnx.eval_shape(loop.model_factory(config))


def test_parse_arg_errors_name_the_choices():
  with pytest.raises(ValueError, match="variant"):
    train.parse_arg("variant=sparse", variant=("moe", "dense"))
  with pytest.raises(ValueError, match="unknown key"):
    train.parse_arg("size=small", variant=("moe", "dense"))
  assert train.parse_arg(" dense ", variant=("moe", "dense"),
                         size=("a", "b")) == {"variant": "dense", "size": "a"}


def test_validate_config_names_the_field():
  config = _config_module("lm_stdlib").get_config("size=smoke")
  config.batch_size = 0
  with pytest.raises(ValueError, match="config.batch_size"):
    loop.validate_config(config)
  config = _config_module("lm_stdlib").get_config("size=smoke")
  config.aux_loss_weights = ml_collections.ConfigDict({"load_balanse": 1.0})
  with pytest.raises(ValueError, match="load_balanse"):
    loop.validate_config(config)
