"""Routed LoRA experts over a frozen FFN: only adapters and routers train,
and the optimizer state exists only for them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moejax import layers as L
from moejax import models
from moejax.layers import lora_experts as le
from moejax.models import accounting
from moejax.train import optim
from moejax.train import state as state_lib


def test_hand_case():
  # (M=1, H=1, E=2, r=1, k=1), relu base y0 = relu(2x) * 3.
  base = L.DenseFFN(1, 1, rngs=nnx.Rngs(0))
  base.w_in_MH[...] = jnp.array([[2.0]])
  base.w_out_HM[...] = jnp.array([[3.0]])
  ffn = le.LoRAExpertsFFN(base, 1, num_experts=2, rank=1, k=1, alpha=2.0,
                          rngs=nnx.Rngs(1))
  assert float(ffn(jnp.array([[1.5]]))[0, 0]) == 9.0     # B = 0: the base
  ffn.router.w_router_ME[...] = jnp.array([[1.0, -1.0]])  # x > 0: expert 0
  ffn.experts.a_EMR[...] = jnp.array([[[0.5]], [[7.0]]])
  ffn.experts.b_ERM[...] = jnp.array([[[4.0]], [[7.0]]])
  # 9 + (alpha / r = 2) * 1.0 * (1.5 * 0.5) * 4 = 15.
  np.testing.assert_allclose(ffn(jnp.array([[1.5]]))[0, 0], 15.0, rtol=1e-6)


def test_soft_gate_mixes_all_experts():
  base = L.DenseFFN(4, 8, rngs=nnx.Rngs(0))
  ffn = le.LoRAExpertsFFN(base, 4, num_experts=3, rank=2, rngs=nnx.Rngs(1))
  ffn.experts.b_ERM[...] = jax.random.normal(jax.random.key(0), (3, 2, 4))
  x = jax.random.normal(jax.random.key(1), (5, 4))
  g = jax.nn.softmax(x @ ffn.router.w_router_ME[...], -1)
  want = base(x) + ffn.scale * jnp.einsum(
      "xe,xem->xm", g, jnp.einsum("xm,emr,erk->xek", x, ffn.experts.a_EMR[...],
                                  ffn.experts.b_ERM[...]))
  np.testing.assert_allclose(ffn(x), want, rtol=1e-5, atol=1e-6)


def _model():
  return models.DecoderLM(
      32, 8, 2, 2, 16, wrappers={"lora_experts": {"num_experts": 3, "rank": 2,
                                                  "k": 2}},
      rngs=nnx.Rngs(0))


def test_only_adapters_and_routers_are_params_and_have_optimizer_state():
  plain = models.DecoderLM(32, 8, 2, 2, 16, rngs=nnx.Rngs(0))
  model = _model()
  params = nnx.state(model, nnx.Param).to_pure_dict()
  names = {"/".join(map(str, p)) for p, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]}
  paths = [tuple(str(getattr(k, "key", k)) for k in p) for p, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  assert paths and all(p[-1] in ("a_EMR", "b_ERM", "w_router_ME")
                       for p in paths), names
  assert len(paths) == 3 * 2                       # 2 blocks x (a, b, router)
  # The model computes what it did before (B = 0) ...
  tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 32)
  np.testing.assert_allclose(model(tokens)[0], plain(tokens)[0], rtol=1e-6)
  # ... its accounting still counts the frozen weights ...
  adapters = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
  assert accounting.count_params(model)["total"] == (
      accounting.count_params(plain)["total"] + adapters)
  assert accounting.flops_per_token(model, 6) > accounting.flops_per_token(
      plain, 6)
  # ... and the trainer's state has optimizer leaves for the adapters only.
  tx = optim.make_optimizer(optim.make_schedule(
      learning_rate=1e-2, total_steps=10, warmup_steps=1))
  mesh = state_lib.make_train_mesh({"data": -1})
  _, state, _ = state_lib.create_train_state(_model, tx, mesh)
  adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x:
                                     isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0]
  assert jax.tree.structure(adam.mu) == jax.tree.structure(state.params)
  sizes = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adam.mu))
  assert sizes == adapters


def test_a_training_step_moves_adapters_not_the_base():
  model = _model()
  frozen_before = jax.tree.map(np.asarray, nnx.state(model, le.FrozenParam)
                               .to_pure_dict())
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 32)

  def loss(m):
    logits, _ = m(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1], tokens[:, 1:]).mean()
  for _ in range(2):
    grads = nnx.grad(loss)(model)
    opt.update(model, grads)
  after = nnx.state(model, le.FrozenParam).to_pure_dict()
  jax.tree.map(np.testing.assert_array_equal, frozen_before,
               jax.tree.map(np.asarray, after))
  assert float(jnp.abs(model.blocks[0].ffn.experts.b_ERM[...]).sum()) > 0


def test_nothing_selected_is_an_error():
  with pytest.raises(L.MoEConfigError, match="select"):
    models.DecoderLM(32, 8, 2, 2, 16, moe_every=1,
                     moe={"experts": {"num_experts": 2}},
                     wrappers={"lora_experts": {}}, rngs=nnx.Rngs(0))


def test_select_by_class_path_from_a_config():
  model = models.DecoderLM(
      32, 8, 2, 2, 16, wrappers={"lora_experts": {
          "select": "moejax.layers.ffn.DenseFFN", "num_experts": 2}},
      rngs=nnx.Rngs(0))
  assert all(isinstance(b.ffn, le.LoRAExpertsFFN) for b in model.blocks)
  with pytest.raises(L.MoEConfigError, match="select"):
    models.DecoderLM(32, 8, 2, 2, 16, wrappers={"lora_experts": {
        "select": "moejax.layers.ffn.NoSuchFFN"}}, rngs=nnx.Rngs(0))
