"""Dynamic-k routers (top-p, null experts) run on every engine: the layer
equals the per-token reference loop, and metrics report the mean k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import layers as L
from moejax.layers import reference

M, H, E = 8, 16, 4
ENGINES = [L.EinsumEngine(), L.IndicesEngine(), L.DroplessEngine(tile=4)]


def _layer(router_cfg, engine, cf=4.0):
  layer = L.build_moe({"router": router_cfg,
                       "experts": {"num_experts": E, "hidden_dim": H,
                                   "activation": "swiglu"},
                       "capacity_factor": cf, "group_size": 8},
                      model_dim=M, rngs=nnx.Rngs(0))
  layer.engine = engine
  return layer


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("router_cfg", [
    {"name": "top_p", "p": 0.6}, {"name": "null_experts", "num_null": 3,
                                   "k": 2}], ids=lambda c: c["name"])
def test_every_engine_matches_reference(router_cfg, engine):
  layer = _layer(router_cfg, engine)
  # Large router weights: sharp probabilities, so k varies over tokens.
  w = [v for v in (getattr(layer.router, "w_router_ME", None),
                   getattr(layer.router, "w_router_MX", None)) if v is not None][0]
  w[...] = w[...] * 30
  x = jax.random.normal(jax.random.key(1), (2, 8, M))
  y, aux = layer(x)
  out = layer.router(x.reshape(2, 8, M),
                     capacity=layer.layer_capacity(8, False))
  y_ref = reference.reference_moe(out.plan, x.reshape(2, 8, M),
                                  layer.experts.weights(), "swiglu",
                                  dropless=out.plan.capacity is None)
  np.testing.assert_allclose(y, y_ref.reshape(y.shape), rtol=1e-5, atol=1e-5)
  k = float(aux.metrics.mean_k)
  kept = np.asarray(out.plan.kept_GSK()).sum(-1)
  assert k == pytest.approx(kept.mean())
  assert len(set(kept.ravel().tolist())) > 1      # k really varies
  assert set(aux.losses) >= set(layer.router.loss_names)


def test_top_p_p_small_is_top1():
  layer = _layer({"name": "top_p", "p": 1e-6}, L.DroplessEngine(tile=4))
  tc = _layer({"name": "token_choice", "k": 1}, L.DroplessEngine(tile=4))
  tc.router.w_router_ME[...] = layer.router.w_router_ME[...]
  x = jax.random.normal(jax.random.key(2), (2, 8, M))
  np.testing.assert_allclose(layer(x)[0], tc(x)[0], rtol=1e-6, atol=1e-6)
  assert float(layer(x)[1].metrics.mean_k) == 1.0


@pytest.mark.parametrize("router_cfg", [
    {"name": "top_p", "p": 0.6}, {"name": "null_experts", "num_null": 3,
                                   "k": 2}], ids=lambda c: c["name"])
def test_dropless_under_expert_parallelism_equals_unsharded(router_cfg):
  """Variable k through the padded all_to_all of shard_map expert
  parallelism (8 devices: data 2 x expert 4; group-local routing)."""
  from moejax.sharding import ExpertParallel, make_mesh
  plain = _layer(router_cfg, L.DroplessEngine(tile=4))
  sharded = nnx.clone(plain)
  sharded.set_expert_parallel(
      ExpertParallel(make_mesh({"data": 2, "expert": 4}), "shard_map"))
  x = jax.random.normal(jax.random.key(4), (8, 8, M))
  y0, aux0 = plain(x)
  y1, aux1 = sharded(x)
  np.testing.assert_allclose(y1, y0, rtol=2e-5, atol=2e-5)
  for name in aux0.losses:
    np.testing.assert_allclose(aux1.losses[name], aux0.losses[name],
                               rtol=1e-5)
  np.testing.assert_allclose(aux1.metrics.mean_k, aux0.metrics.mean_k)
