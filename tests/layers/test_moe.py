"""MoELayer and SoftMoELayer: against the reference, options, errors, bridge."""

import logging

from flax import linen
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import layers
from moejax import routing
from moejax.layers import SoftMoELayer
from moejax.layers import moe as moe_lib
from moejax.layers import reference

B, L, M, H, E = 2, 8, 8, 16, 4
ENGINES = {"einsum": lambda: layers.EinsumEngine(),
           "indices": lambda: layers.IndicesEngine(),
           "dropless": lambda: layers.DroplessEngine(tile=4)}


def _x(seed=0, shape=(B, L, M)):
  return jax.random.normal(jax.random.key(seed), shape)


def _moe(router=None, engine="indices", *, seed=0, causal=False, **kwargs):
  """An (M, H, E) relu layer built by build_moe from a config.

  router: the router dict (default token choice with k=2); engine: a
  registry name or an engine dict; kwargs: other top-level config fields.
  """
  config = {"router": router or {"name": "token_choice", "k": 2},
            "engine": engine if isinstance(engine, dict) else {"name": engine},
            "experts": {"num_experts": E, "hidden_dim": H,
                        "activation": "relu"}}
  config.update(kwargs)
  return layers.build_moe(config, model_dim=M, rngs=nnx.Rngs(seed),
                          causal=causal)


def _layer_reference(layer, x_BLM, capacity):
  """The layer's output recomputed with the slow loop from its own params."""
  x_GSM, mask_GS, _ = moe_lib.group_tokens(x_BLM, layer.group_size or L, None)
  logits = jnp.einsum("GSM,ME->GSE", x_GSM, layer.router.w_router_ME[...])
  plan = routing.token_choice(logits, k=layer.router.k, capacity=capacity,
                              padding_mask_GS=mask_GS)
  y = reference.reference_moe(plan, x_GSM, layer.experts.weights(),
                              layer.experts.activation)
  return y.reshape(-1, M)[:x_BLM.shape[0] * x_BLM.shape[1]].reshape(
      x_BLM.shape)


@pytest.mark.parametrize("engine", ["einsum", "indices", "dropless"])
def test_layer_matches_reference(engine):
  rngs = nnx.Rngs(0)
  layer = layers.MoELayer(
      router=layers.TokenChoiceRouter(M, E, k=2, rngs=rngs),
      experts=layers.Experts(E, M, H, activation="relu", rngs=rngs),
      engine=ENGINES[engine](), group_size=8, capacity_factor=1.0)
  x = _x()
  y, aux = nnx.jit(lambda m, x: m(x))(layer, x)
  cap = None if engine == "dropless" else routing.compute_capacity(8, E, k=2)
  assert layer.layer_capacity(8, deterministic=False) == cap
  np.testing.assert_allclose(y, _layer_reference(layer, x, cap), atol=1e-5,
                             rtol=1e-5)
  assert aux.metrics.expert_load_E.shape == (E,)
  np.testing.assert_allclose(aux.metrics.expert_load_E.sum(), 1.0, rtol=1e-5)
  assert set(aux.losses) == {"load_balance", "z_loss"}
  if engine == "dropless":
    assert float(aux.metrics.dropped_fraction) == 0.0


def test_gradients_reach_router_and_experts():
  layer = _moe(group_size=8)
  x = _x()

  def loss(model):
    y, aux = model(x)
    return jnp.mean(y ** 2) + 1e-2 * aux.losses["load_balance"]
  grads = nnx.grad(loss)(layer)
  assert float(jnp.abs(grads.router.w_router_ME[...]).sum()) > 0
  assert float(jnp.abs(grads.experts.w_in_EMH[...]).sum()) > 0


@pytest.mark.parametrize("router,engine,extra", [
    (dict(name="token_choice", batch_prioritized=True, jitter_eps=0.1),
     "indices", {}),
    (dict(name="token_choice", gating="topk_softmax", k=2), "einsum", {}),
    (dict(name="expert_choice"), "indices", {}),
    (dict(name="hash", k=2), "dropless", {}),
    (dict(name="balanced"), "indices", {}),
    (dict(name="deepseek", num_expert_groups=2, topk_groups=1, k=2),
     "dropless", dict(shared={"num_experts": 1})),
    (dict(name="noisy_top_k"), "einsum", {}),
    (dict(name="cosine", k=2, routing_dim=4), "indices", {}),
])
def test_every_router_runs_and_reports(router, engine, extra):
  layer = _moe(router, {"name": engine, "tile": 4} if engine == "dropless"
               else engine, group_size=8, **extra)
  assert type(layer.router) is layers.ROUTERS[router["name"]]
  ids = jax.random.randint(jax.random.key(1), (B, L), 0, 256)
  y, aux = nnx.jit(lambda m, x, i: m(x, token_ids_BL=i))(layer, _x(), ids)
  assert y.shape == (B, L, M) and bool(jnp.all(jnp.isfinite(y)))
  leaves = jax.tree.leaves(aux)
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in leaves)
  # The layer reports its own losses and exactly the router's extra ones.
  assert set(aux.losses) == {"load_balance", "z_loss",
                             *type(layer.router).loss_names}
  if router["name"] == "noisy_top_k":
    assert float(aux.losses["importance"]) >= 0
  if router["name"] == "deepseek":
    assert layer.shared is not None
    assert float(aux.losses["sequence_balance"]) >= 0
    assert aux.stats["load_E"].shape == (E,)


def test_forward_never_changes_the_deepseek_bias():
  # Capacity for every token, so the observed load equals the demand the
  # bias balances.
  layer = _moe(dict(name="deepseek", k=1, bias_update_rate=0.1),
               group_size=8, capacity_factor=4.0)
  call = nnx.jit(lambda m, x, det: m(x, deterministic=det),
                 static_argnames="det")
  call(layer, _x(), det=True)
  np.testing.assert_array_equal(layer.router.bias_E[...], 0.0)
  _, aux = call(layer, _x(), det=False)
  # A forward call (training or evaluation) changes no router state.
  np.testing.assert_array_equal(layer.router.bias_E[...], 0.0)
  load = np.asarray(aux.stats["load_E"])
  assert load.shape == (E,) and load.sum() == B * L  # k=1, nothing padded
  np.testing.assert_allclose(load / load.sum(),
                             aux.metrics.expert_load_E, rtol=1e-6)
  # The train step applies the update from the stats the forward reported.
  nnx.jit(layers.update_routers)(layer, aux)
  bias = np.asarray(layer.router.bias_E[...])
  # bias += rate * sign(mean load - load): overloaded experts go down.
  np.testing.assert_allclose(bias, 0.1 * np.sign(load.mean() - load),
                             atol=1e-6)
  assert np.any(bias != 0)
  # The next forward routes with the new bias; again it leaves it alone.
  call(layer, _x(), det=False)
  np.testing.assert_array_equal(layer.router.bias_E[...], bias)


def test_eval_capacity_factor_and_explicit_capacity():
  layer = _moe(dict(name="token_choice", k=1), group_size=8,
               capacity_factor=1.0, eval_capacity_factor=2.0)
  assert layer.layer_capacity(8, deterministic=False) == 2
  assert layer.layer_capacity(8, deterministic=True) == 4
  layer = _moe(dict(name="token_choice", k=1), capacity=3)
  assert layer.layer_capacity(8, deterministic=False) == 3
  # A dropless engine has no capacity.
  layer = _moe(dict(name="token_choice", k=1), engine="dropless", capacity=3)
  assert layer.layer_capacity(8, deterministic=False) is None


def test_padding_mask_and_group_padding(caplog):
  layer = _moe(group_size=5, engine="indices", capacity_factor=2.0)
  x = _x()
  with caplog.at_level(logging.WARNING):
    y, aux = layer(x)                       # 16 tokens -> 4 groups of 5
  assert "padding 4 tokens" in caplog.text
  np.testing.assert_allclose(
      y, _layer_reference(layer, x, routing.compute_capacity(
          5, E, k=2, capacity_factor=2.0)), atol=1e-5, rtol=1e-5)
  # Masked tokens take no slot: the other tokens' outputs are unchanged when
  # we append a padded sequence.
  mask = jnp.concatenate([jnp.ones((B, L), bool), jnp.zeros((1, L), bool)])
  layer8 = _moe(group_size=8)
  y_ref, aux_ref = layer8(x)
  y_pad, aux_pad = layer8(jnp.concatenate([x, _x(5, (1, L, M))]),
                          padding_mask_BL=mask)
  np.testing.assert_allclose(y_pad[:B], y_ref, atol=1e-6)
  np.testing.assert_allclose(aux_pad.losses["load_balance"],
                             aux_ref.losses["load_balance"], rtol=1e-6)
  with pytest.raises(ValueError, match="does not divide the token count 16"):
    _moe(group_size=5, pad_groups=False)(x)


def test_shared_experts_and_residual_branch():
  base = _moe(group_size=8)
  shared = _moe(group_size=8, shared={"num_experts": 2})
  assert shared.shared.w_in_MH.shape == (M, 2 * H)
  x = _x()
  y_shared, _ = shared(x)
  y_base, _ = base(x)
  np.testing.assert_allclose(y_shared - y_base, shared.shared(x), atol=1e-5)
  summed = _moe(group_size=8, residual={"hidden_dim": H})
  assert summed.residual.mix == "sum"
  np.testing.assert_allclose(summed(x)[0], y_base + summed.residual.ffn(x),
                             atol=1e-5)
  learned = _moe(group_size=8, residual={"hidden_dim": H, "mix": "learned"})
  y, _ = learned(x)
  # Zero-initialised mixing logits: an even 50/50 mix.
  np.testing.assert_allclose(
      y, 0.5 * y_base + 0.5 * learned.residual.ffn(x), atol=1e-5)


def _with(**overrides):
  """A factory rngs -> MoELayer(top-2 router, relu experts, indices engine)
  with some arguments replaced; `router` and `experts` are given as
  functions of rngs."""
  def make(rngs):
    kwargs = dict(router=lambda r: layers.TokenChoiceRouter(M, E, k=2,
                                                            rngs=r),
                  experts=lambda r: layers.Experts(E, M, H, rngs=r),
                  engine=layers.IndicesEngine())
    kwargs.update(overrides)
    kwargs["router"] = kwargs["router"](rngs)
    kwargs["experts"] = kwargs["experts"](rngs)
    return layers.MoELayer(**kwargs)
  return make


def _config_error(**config):
  """A factory rngs -> build_moe of _moe's config with these fields."""
  return lambda rngs: _moe(**config)


class _NoExperts(nnx.Module):
  """A callable without the router contract (no num_experts / k)."""

  def __call__(self, x_GSM, **kwargs):
    return x_GSM


@pytest.mark.parametrize("make,match", [
    # Router arguments (the router checks its own).
    (_with(router=lambda r: layers.TokenChoiceRouter(M, E, k=0, rngs=r)),
     "k must"),
    (_with(router=lambda r: layers.TokenChoiceRouter(M, E, k=5, rngs=r)),
     "k must"),
    (_with(router=lambda r: layers.TokenChoiceRouter(M, 0, rngs=r)),
     "num_experts must be an integer >= 1"),
    (_with(router=lambda r: layers.TokenChoiceRouter(M, E, gating="relu",
                                                     rngs=r)), "gating"),
    # Experts.
    (_with(experts=lambda r: layers.Experts(E, M, H, activation="tanh",
                                            rngs=r)),
     "unknown activation 'tanh'"),
    (_with(experts=lambda r: layers.Experts(0, M, H, rngs=r)),
     "num_experts must be an integer >= 1"),
    # MoELayer's own arguments.
    (_with(capacity_factor=0.0), "capacity_factor must be a number > 0"),
    (_with(eval_capacity_factor=-1.0), "eval_capacity_factor"),
    (_with(capacity=0), "capacity must be an integer >= 1"),
    (_with(group_size=0), "group_size must be an integer >= 1"),
    (_with(min_capacity=0), "min_capacity must be an integer >= 1"),
    (_with(engine="indices"), "engine must be an engine object"),
    (_with(experts=lambda r: layers.Experts(E + 1, M, H, rngs=r)),
     "experts has 5 experts but the router routes to 4"),
    (_with(router=lambda r: _NoExperts()), "has no integer `num_experts`"),
    # The engine refuses a router it cannot run (engine.check_router).
    (_with(router=lambda r: layers.ExpertChoiceRouter(M, E, rngs=r),
           engine=layers.DroplessEngine()), "token view"),
    (_with(router=lambda r: layers.ExpertChoiceRouter(M, E, rngs=r),
           engine=layers.PallasEngine()), "PallasEngine needs a router"),
    # Names in a config resolve through the one registry.
    (_config_error(router={"name": "switchy"}), "unknown router 'switchy'"),
    (_config_error(engine="fast"), "unknown engine 'fast'"),
    (_config_error(router={"name": "expert_choice"}, engine="dropless"),
     "token view"),
    # A causal model refuses routers that read later tokens.
    (_config_error(router={"name": "expert_choice"}, causal=True),
     "see the future"),
    (_config_error(router={"name": "token_choice", "k": 1,
                           "batch_prioritized": True}, causal=True),
     "see the future"),
])
def test_bad_constructor_args(make, match):
  with pytest.raises(ValueError, match=match):
    make(nnx.Rngs(0))


def test_causal_opt_in_and_bad_call_args():
  layer = _moe({"name": "expert_choice"}, causal=True, allow_non_causal=True)
  assert not layer.causal
  assert _moe(causal=True).causal
  layer = _moe()
  with pytest.raises(ValueError, match=r"x_BLM must have shape \[B, L, 8\]"):
    layer(jnp.zeros((4, M)))
  with pytest.raises(ValueError, match="padding_mask_BL must have shape"):
    layer(_x(), padding_mask_BL=jnp.ones((B, L + 1), bool))
  hashed = _moe({"name": "hash"})
  with pytest.raises(ValueError, match="HashRouter needs the token ids"):
    hashed(_x())
  with pytest.raises(ValueError, match="token_ids_BL must have shape"):
    hashed(_x(), token_ids_BL=jnp.zeros((B, L + 1), jnp.int32))


def test_soft_moe_layer():
  layer = SoftMoELayer(M, H, E, slots_per_expert=2, rngs=nnx.Rngs(0))
  x = _x()
  y, aux = layer(x)
  # Recompute by hand from soft_weights and a dense per-slot loop.
  x_GSM = x  # one group per sequence
  d, c = routing.soft_weights(x_GSM, layer.mu_MEP[...], layer.scale[...])
  w = layer.experts.weights()
  want = np.zeros((B, L, M), np.float32)
  for g in range(B):
    for e in range(E):
      for p in range(2):
        slot_in = jnp.einsum("S,SM->M", d[g, :, e, p], x_GSM[g])
        out = reference._one_expert(slot_in, w, e, "relu")
        want[g] += np.asarray(c[g, :, e, p][:, None] * out[None])
  np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(aux.metrics.expert_load_E.sum(), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="future"):
    SoftMoELayer(M, H, E, causal=True, rngs=nnx.Rngs(0))


_BRIDGE_CONFIG = {"router": {"name": "token_choice", "k": 2},
                  "experts": {"num_experts": E, "hidden_dim": H},
                  "group_size": 8}


def test_linen_model_uses_layer_through_bridge():
  class LinenNet(linen.Module):
    @linen.compact
    def __call__(self, x):
      moe = nnx.bridge.to_linen(layers.build_moe, _BRIDGE_CONFIG, model_dim=M)
      y, aux = moe(x)
      return linen.Dense(3)(y), aux

  net = LinenNet()
  x = _x()
  variables = net.init(jax.random.key(0), x)
  (out, aux) = net.apply(variables, x)
  assert out.shape == (B, L, 3)
  assert aux.losses["load_balance"].shape == ()
  grads = jax.grad(lambda v: jnp.sum(net.apply(v, x)[0] ** 2))(variables)
  assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
