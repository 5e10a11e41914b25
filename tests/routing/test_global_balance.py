"""Global-batch balance loss: counted over all groups, shards, micro-batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moejax import routing
from moejax.routing import global_balance as gb


def _batch(seed, g=8, s=6, e=4, k=2):
  logits = jax.random.normal(jax.random.key(seed), (g, s, e)) * 3
  probs = jax.nn.softmax(logits, -1)
  _, idx = jax.lax.top_k(probs, k)
  mask = jax.random.uniform(jax.random.key(seed + 1), (g, s)) > 0.2
  return probs, idx.astype(jnp.int32), mask


def test_hand_case_differs_from_per_group():
  # (G=2, S=2, E=2, K=1): group 0 all to expert 0, group 1 all to expert 1.
  probs = jnp.array([[[0.9, 0.1], [0.9, 0.1]], [[0.1, 0.9], [0.1, 0.9]]])
  idx = jnp.array([[[0], [0]], [[1], [1]]], jnp.int32)
  # per group: 2 * (1 * 0.9) = 1.8 each; global: f = (.5,.5), P = (.5,.5): 1.
  assert float(routing.load_balancing_loss(probs, idx)) == pytest.approx(1.8)
  assert float(gb.global_load_balancing_loss(probs, idx)) == pytest.approx(1.0)


def test_one_group_equals_per_group_loss():
  probs, idx, mask = _batch(0, g=1)
  np.testing.assert_allclose(
      gb.global_load_balancing_loss(probs, idx, mask),
      routing.load_balancing_loss(probs, idx, mask), rtol=1e-6)


def test_eight_devices_equal_one_device_whole_batch():
  probs, idx, mask = _batch(3, g=16)
  whole = gb.global_load_balancing_loss(probs, idx, mask)
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))

  def per_device(p, i, m):
    return gb.global_load_balancing_loss(p, i, m, axis_names=("data",))
  sharded = jax.shard_map(per_device, mesh=mesh,
                          in_specs=(P("data"), P("data"), P("data")),
                          out_specs=P())(probs, idx, mask)
  np.testing.assert_allclose(sharded, whole, rtol=1e-6)
  # The gradient wrt the probabilities is the same too.
  g_whole = jax.grad(lambda p: gb.global_load_balancing_loss(p, idx, mask))(
      probs)
  g_shard = jax.grad(lambda p: jax.shard_map(
      per_device, mesh=mesh, in_specs=(P("data"), P("data"), P("data")),
      out_specs=P())(p, idx, mask))(probs)
  np.testing.assert_allclose(g_shard, g_whole, rtol=1e-5, atol=1e-7)


def test_micro_batches_with_carry_equal_whole_batch():
  probs, idx, mask = _batch(5, g=6)
  whole = gb.global_load_balancing_loss(probs, idx, mask)
  carry = gb.GlobalBalanceCarry.zeros(4)
  for m in range(3):
    sl = slice(2 * m, 2 * m + 2)
    loss, carry = gb.global_load_balancing_loss(
        probs[sl], idx[sl], mask[sl], carry=carry, return_carry=True)
  # The last micro-batch's loss counts all three (Qwen's buffer).
  np.testing.assert_allclose(loss, whole, rtol=1e-6)


def test_layer_option_global(rngs_seed=0):
  from flax import nnx
  from moejax import layers as L
  cfg = {"router": {"name": "token_choice", "k": 2},
         "experts": {"num_experts": 4, "hidden_dim": 8},
         "group_size": 4, "balance_scope": "global"}
  layer = L.build_moe(cfg, model_dim=8, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8))
  _, aux = layer(x)
  out = layer.router(x.reshape(4, 4, 8), capacity=layer.layer_capacity(4, False))
  np.testing.assert_allclose(
      aux.losses["load_balance"],
      gb.global_load_balancing_loss(out.plan.probs_GSE, out.plan.expert_GSK),
      rtol=1e-6)
  with pytest.raises(L.MoEConfigError, match="balance_scope"):
    L.build_moe(dict(cfg, balance_scope="world"), model_dim=8,
                rngs=nnx.Rngs(0))
