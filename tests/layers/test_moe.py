"""MoELayer and SoftMoELayer: against the reference, options, errors, bridge."""

import logging

from flax import linen
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing
from moejax.layers import MoELayer
from moejax.layers import SoftMoELayer
from moejax.layers import moe as moe_lib
from moejax.layers import reference

B, L, M, H, E = 2, 8, 8, 16, 4


def _x(seed=0, shape=(B, L, M)):
  return jax.random.normal(jax.random.key(seed), shape)


def _layer_reference(layer, x_BLM, capacity):
  """The layer's output recomputed with the slow loop from its own params."""
  x_GSM, mask_GS, _ = moe_lib.group_tokens(x_BLM, layer.group_size or L, None)
  logits = jnp.einsum("GSM,ME->GSE", x_GSM, layer.w_router_ME[...])
  plan = routing.token_choice(logits, k=layer.k, capacity=capacity,
                              padding_mask_GS=mask_GS)
  y = reference.reference_moe(plan, x_GSM, layer.experts.weights(),
                              layer.activation)
  return y.reshape(-1, M)[:x_BLM.shape[0] * x_BLM.shape[1]].reshape(
      x_BLM.shape)


@pytest.mark.parametrize("engine", ["einsum", "indices", "dropless"])
def test_layer_matches_reference(engine):
  layer = MoELayer(M, H, E, k=2, engine=engine, group_size=8,
                   capacity_factor=1.0, dropless_tile=4, rngs=nnx.Rngs(0))
  x = _x()
  y, aux = nnx.jit(lambda m, x: m(x))(layer, x)
  cap = None if engine == "dropless" else routing.compute_capacity(8, E, k=2)
  np.testing.assert_allclose(y, _layer_reference(layer, x, cap), atol=1e-5,
                             rtol=1e-5)
  assert aux.metrics.expert_load_E.shape == (E,)
  np.testing.assert_allclose(aux.metrics.expert_load_E.sum(), 1.0, rtol=1e-5)
  if engine == "dropless":
    assert float(aux.metrics.dropped_fraction) == 0.0


def test_gradients_reach_router_and_experts():
  layer = MoELayer(M, H, E, k=2, group_size=8, rngs=nnx.Rngs(0))
  x = _x()

  def loss(model):
    y, aux = model(x)
    return jnp.mean(y ** 2) + 1e-2 * aux.losses.load_balance
  grads = nnx.grad(loss)(layer)
  assert float(jnp.abs(grads.w_router_ME[...]).sum()) > 0
  assert float(jnp.abs(grads.experts.w_in_EMH[...]).sum()) > 0


@pytest.mark.parametrize("router,engine,kwargs", [
    ("token_choice", "indices", dict(batch_prioritized=True, jitter_eps=0.1)),
    ("token_choice", "einsum", dict(gating="topk_softmax", k=2)),
    ("expert_choice", "indices", {}),
    ("hash", "dropless", {}),
    ("balanced", "indices", dict(k=1)),
    ("deepseek", "dropless", dict(num_shared_experts=1, num_expert_groups=2,
                                  topk_groups=1, k=2)),
    ("noisy_top_k", "einsum", {}),
])
def test_every_router_runs_and_reports(router, engine, kwargs):
  layer = MoELayer(M, H, E, router=router, engine=engine, group_size=8,
                   dropless_tile=4, rngs=nnx.Rngs(0), **kwargs)
  ids = jax.random.randint(jax.random.key(1), (B, L), 0, 256)
  y, aux = nnx.jit(lambda m, x, i: m(x, token_ids_BL=i))(layer, _x(), ids)
  assert y.shape == (B, L, M) and bool(jnp.all(jnp.isfinite(y)))
  leaves = jax.tree.leaves(aux)
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in leaves)
  if router == "noisy_top_k":
    assert float(aux.losses.importance) >= 0


def test_deepseek_bias_updates_only_in_training():
  # Capacity for every token, so the observed load equals the demand the
  # bias balances.
  layer = MoELayer(M, H, E, router="deepseek", k=1, group_size=8,
                   capacity_factor=4.0, bias_update_rate=0.1,
                   rngs=nnx.Rngs(0))
  call = nnx.jit(lambda m, x, det: m(x, deterministic=det),
                 static_argnames="det")
  call(layer, _x(), det=True)
  np.testing.assert_array_equal(layer.router_bias_E[...], 0.0)
  _, aux = call(layer, _x(), det=False)
  bias = np.asarray(layer.router_bias_E[...])
  load = np.asarray(aux.metrics.expert_load_E)
  # bias += rate * sign(mean load - load): overloaded experts go down.
  np.testing.assert_allclose(bias, 0.1 * np.sign(load.mean() - load),
                             atol=1e-6)
  assert np.any(bias != 0)


def test_eval_capacity_factor_and_explicit_capacity():
  layer = MoELayer(M, H, E, k=1, group_size=8, capacity_factor=1.0,
                   eval_capacity_factor=2.0, rngs=nnx.Rngs(0))
  assert layer.layer_capacity(8, deterministic=False) == 2
  assert layer.layer_capacity(8, deterministic=True) == 4
  layer = MoELayer(M, H, E, k=1, capacity=3, rngs=nnx.Rngs(0))
  assert layer.layer_capacity(8, deterministic=False) == 3


def test_padding_mask_and_group_padding(caplog):
  layer = MoELayer(M, H, E, k=2, group_size=5, engine="indices",
                   capacity_factor=2.0, rngs=nnx.Rngs(0))
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
  layer8 = MoELayer(M, H, E, k=2, group_size=8, rngs=nnx.Rngs(0))
  y_ref, aux_ref = layer8(x)
  y_pad, aux_pad = layer8(jnp.concatenate([x, _x(5, (1, L, M))]),
                          padding_mask_BL=mask)
  np.testing.assert_allclose(y_pad[:B], y_ref, atol=1e-6)
  np.testing.assert_allclose(aux_pad.losses.load_balance,
                             aux_ref.losses.load_balance, rtol=1e-6)
  with pytest.raises(ValueError, match="does not divide the token count 16"):
    MoELayer(M, H, E, group_size=5, pad_groups=False, rngs=nnx.Rngs(0))(x)


def test_shared_experts_and_residual_branch():
  base = MoELayer(M, H, E, group_size=8, rngs=nnx.Rngs(0))
  shared = MoELayer(M, H, E, group_size=8, num_shared_experts=2,
                    rngs=nnx.Rngs(0))
  assert shared.shared.w_in_MH.shape == (M, 2 * H)
  x = _x()
  y_shared, _ = shared(x)
  y_base, _ = base(x)
  np.testing.assert_allclose(y_shared - y_base, shared.shared(x), atol=1e-5)
  learned = MoELayer(M, H, E, group_size=8, residual_hidden_dim=H,
                     residual_mix="learned", rngs=nnx.Rngs(0))
  y, _ = learned(x)
  # Zero-initialised mixing logits: an even 50/50 mix.
  moe_only = MoELayer(M, H, E, group_size=8, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(
      y, 0.5 * moe_only(x)[0] + 0.5 * learned.residual(x), atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k must"), (dict(k=5), "k must"),
    (dict(num_experts=0), "num_experts"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity=0), "capacity"),
    (dict(router="switchy"), "unknown router 'switchy'"),
    (dict(engine="fast"), "unknown engine 'fast'"),
    (dict(activation="tanh"), "unknown activation 'tanh'"),
    (dict(router="expert_choice", engine="dropless"), "dropless"),
    (dict(router="expert_choice", causal=True), "future tokens"),
    (dict(batch_prioritized=True, causal=True), "future tokens"),
    (dict(gating="relu"), "gating"),
])
def test_bad_constructor_args(kwargs, match):
  args = dict(model_dim=M, hidden_dim=H, num_experts=E, rngs=nnx.Rngs(0))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    MoELayer(**args)


def test_causal_opt_in_and_bad_call_args():
  MoELayer(M, H, E, router="expert_choice", causal=True,
           allow_non_causal=True, rngs=nnx.Rngs(0))
  layer = MoELayer(M, H, E, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"x_BLM must have shape \[B, L, 8\]"):
    layer(jnp.zeros((4, M)))
  with pytest.raises(ValueError, match="padding_mask_BL must have shape"):
    layer(_x(), padding_mask_BL=jnp.ones((B, L + 1), bool))
  with pytest.raises(ValueError, match="needs token_ids_BL"):
    MoELayer(M, H, E, router="hash", rngs=nnx.Rngs(0))(_x())


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


def test_linen_model_uses_layer_through_bridge():
  class LinenNet(linen.Module):
    @linen.compact
    def __call__(self, x):
      moe = nnx.bridge.to_linen(MoELayer, M, H, E, k=2, group_size=8)
      y, aux = moe(x)
      return linen.Dense(3)(y), aux

  net = LinenNet()
  x = _x()
  variables = net.init(jax.random.key(0), x)
  (out, aux) = net.apply(variables, x)
  assert out.shape == (B, L, 3)
  assert aux.losses.load_balance.shape == ()
  grads = jax.grad(lambda v: jnp.sum(net.apply(v, x)[0] ** 2))(variables)
  assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
