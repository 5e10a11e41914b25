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
  # A warmup as long as the run leaves the cosine no step (optax refuses).
  with pytest.raises(ValueError, match=r"warmup_steps must be in \[0, "
                     r"total_steps=5\)"):
    optim.make_schedule(learning_rate=1.0, total_steps=5, warmup_steps=5)


TOP2 = {"router": {"name": "token_choice", "k": 2},
        "experts": {"num_experts": 4}}


def test_loss_adds_the_weighted_aux_losses():
  # A tiny MoE LM: V=13, M=8, 1 MoE layer (E=4, k=2), batch [B=2, L=8].
  # (The full train step is checked on its metrics in test_train_app.)
  weights = {"load_balance": 0.5, "z_loss": 0.25, "sequence_balance": 0.0}
  model = models.DecoderLM(
      13, 8, 1, 2, 16, moe_every=1, moe=TOP2,
      rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 13)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  @nnx.jit
  def losses(model, batch):
    loss, (_, aux, task_loss, aux_loss) = train.compute_loss(
        train.LMTask(), model, batch, weights, deterministic=False)
    return loss, task_loss, aux_loss, aux.losses

  loss, task_loss, aux_loss, aux = jax.device_get(losses(model, batch))
  assert sorted(aux) == ["load_balance", "z_loss"]  # what the layer reports
  assert aux["load_balance"].shape == (1,)  # one MoE layer
  assert aux["load_balance"][0] > 0 and aux["z_loss"][0] > 0
  expected = 0.5 * aux["load_balance"].sum() + 0.25 * aux["z_loss"].sum()
  np.testing.assert_allclose(aux_loss, expected, rtol=1e-6)
  np.testing.assert_allclose(loss, task_loss + expected, rtol=1e-6)
  # A weight that is not a number is refused when the step is made; a
  # non-zero weight on a loss the layers do not report raises when traced
  # (typos with weight 0 are validate_config's: it knows the model).
  with pytest.raises(ValueError, match="is not a number"):
    train.make_train_step(None, train.LMTask(), None, None,
                          {"load_balance": "1e-2"})
  with pytest.raises(ValueError, match="sequence_balance"):
    train.compute_loss(train.LMTask(), model, batch,
                       {"sequence_balance": 1.0}, deterministic=False)


def test_dense_model_has_no_aux_loss():
  # No MoE layer (aux None): the weights of the base config add nothing.
  model = models.DecoderLM(13, 8, 1, 2, 16, moe_every=0,
                           rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 13)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  loss, (_, aux, task_loss, aux_loss) = train.compute_loss(
      train.LMTask(), model, batch, {"load_balance": 1e-2, "z_loss": 1e-3},
      deterministic=False)
  assert aux is None and float(aux_loss) == 0.0
  assert float(loss) == float(task_loss)


def _deepseek_lm():
  """A tiny LM with one DeepSeek MoE layer (bias_update_rate 0.1), its
  TrainState, graphdef and a batch."""
  moe = {"router": {"name": "deepseek", "k": 2, "bias_update_rate": 0.1},
         "engine": {"name": "indices"}, "experts": {"num_experts": 4},
         "capacity_factor": 2.0}
  model = models.DecoderLM(13, 8, 2, 2, 16, moe_every=2, moe=moe,
                           rngs=nnx.Rngs(0))
  tx = optim.make_optimizer(lambda step: 1e-2)
  mesh = train.make_train_mesh({"data": 1}, devices=jax.devices()[:1])
  graphdef, state, _ = train.create_train_state(lambda: model, tx, mesh)
  tokens = jax.random.randint(jax.random.key(1), (4, 9), 0, 13)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  return graphdef, state, tx, batch


def _bias(state):
  return np.asarray(state.model_state["blocks"][1]["ffn"]["router"][
      "bias_E"])


def test_train_step_updates_the_deepseek_bias_and_eval_does_not():
  graphdef, state, tx, batch = _deepseek_lm()
  weights = {"load_balance": 0.0, "z_loss": 0.0, "sequence_balance": 1e-4}
  before = _bias(state)
  np.testing.assert_array_equal(before, 0.0)
  eval_step = train.make_eval_step(graphdef, train.LMTask(), weights)
  metrics = jax.device_get(eval_step(state, batch))
  assert "aux/sequence_balance" in metrics
  np.testing.assert_array_equal(_bias(state), before)  # eval: no update
  step = train.make_train_step(graphdef, train.LMTask(), tx, lambda s: 1e-2,
                               weights, donate=False)
  new_state, metrics = step(state, batch)
  after = _bias(new_state)
  # bias += 0.1 * sign(mean load - load): every expert moves by 0.1 unless
  # its load is exactly the mean.
  assert np.any(after != before), after
  np.testing.assert_allclose(np.abs(after[after != 0]), 0.1, rtol=1e-6)
  assert sorted(k for k in metrics if k.startswith("aux/")) == [
      "aux/load_balance", "aux/sequence_balance", "aux/z_loss"]
  # The eval of the new state reads the new bias and changes it no more.
  eval_step(new_state, batch)
  np.testing.assert_array_equal(_bias(new_state), after)


@pytest.mark.parametrize("name,args", [
    ("lm_stdlib", ["", "dense", "size=smoke", "router=top1",
                   "dense,size=base"]),
    ("vit_digits", ["", "soft_moe", "dense", "size=smoke",
                    "soft_moe,size=smoke"]),
    ("router_study", ["router=top1", "router=top2", "router=dense",
                      "router=hash", "router=base", "router=deepseek",
                      "router=expert_choice", "vit_top2", "vit_bpr",
                      "vit_ec", "vit_soft", "vit_dense"]),
])
def test_configs_build_their_models(name, args):
  module = _config_module(name)
  for arg in args:
    config = module.get_config(arg)
    # The router study runs on one device (its ViT eval batch is 188).
    loop.validate_config(config, num_devices=(
        1 if name == "router_study" else None))
    model = nnx.eval_shape(loop.model_factory(config))  # shapes only
    counts = models.count_params(model)
    assert counts["active"] <= counts["total"]
    dense = "dense" in arg
    assert bool(model.moe_layers) != dense, arg


def test_configs_pass_the_nested_moe_config_to_the_model():
  module = _config_module("lm_stdlib")
  config = module.get_config("size=smoke")
  moe = loop.model_kwargs(config)["moe"]
  # None placeholders are dropped: they mean the layer's defaults.
  assert moe == {
      "router": {"name": "token_choice", "k": 2, "gating": "softmax",
                 "renormalize": True, "jitter_eps": 0.0},
      "engine": {"name": "indices"},
      "experts": {"num_experts": 4, "hidden_dim": 64},
      "capacity_factor": 1.25, "eval_capacity_factor": 2.0,
      "shared": {"num_experts": 0}}
  model = nnx.eval_shape(loop.model_factory(config))
  layer = model.blocks[1].ffn
  assert (type(layer.router).__name__, layer.router.k,
          layer.router.renormalize) == ("TokenChoiceRouter", 2, True)
  assert type(layer.engine).__name__ == "IndicesEngine"
  assert (layer.num_experts, layer.experts.hidden_dim) == (4, 64)
  assert model.blocks[1].ffn.router.w_router_ME.shape == (32, 4)
  top1 = module.get_config("router=top1,size=smoke")
  assert loop.model_kwargs(top1)["moe"]["router"]["k"] == 1
  assert loop.model_kwargs(top1)["moe"]["router"]["renormalize"] is False
  # Every router option exists (unset) so a flag can set it.
  config.lock()
  config.moe.router.name = "deepseek"
  config.moe.router.bias_update_rate = 0.01
  config.moe.router.jitter_eps = None
  config.moe.engine.name = "dropless"
  config.moe.engine.tile = 8
  moe = loop.model_kwargs(config)["moe"]
  assert moe["router"] == {"name": "deepseek", "k": 2, "gating": "softmax",
                           "renormalize": True, "bias_update_rate": 0.01}
  assert moe["engine"] == {"name": "dropless", "tile": 8}
  vit = _config_module("vit_digits").get_config("soft_moe,size=smoke")
  assert loop.model_kwargs(vit)["moe"] == {
      "layer": "soft_moe", "experts": {"num_experts": 4},
      "slots_per_expert": 2}


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


@pytest.mark.parametrize("name", ["lm_stdlib", "vit_digits",
                                  "router_study"])
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
  config = _config_module("lm_stdlib").get_config("size=smoke")
  config.moe.router.k = 9
  with pytest.raises(ValueError, match=r"config\.moe\.router\.k=9"):
    loop.validate_config(config)
