"""EvoMoE's dense-to-sparse gate and StableMoE's two stages: the step
reaches the router through update()/set_step(), never a global."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import layers as L
from moejax import routing
from moejax.layers import dense_to_sparse as d2s

M, H, E = 8, 16, 4


def _layer(router_cfg):
  return L.build_moe({"router": router_cfg, "engine": {"name": "dropless",
                                                       "tile": 4},
                      "experts": {"num_experts": E, "hidden_dim": H}},
                     model_dim=M, rngs=nnx.Rngs(0))


def test_temperature_schedule_hand_values():
  # tau = 2 * (0.5 / 2)^(step / 4), floored at 0.5.
  taus = [float(d2s.annealed_temperature(s, start=2.0, end=0.5,
                                         anneal_steps=4)) for s in (0, 2, 4, 9)]
  np.testing.assert_allclose(taus, [2.0, 1.0, 0.5, 0.5], rtol=1e-6)


def test_evomoe_hand_case_dense_then_sparse():
  # (G=1, S=1, E=4): logits (2 ln 2, 0, 0, 0) through a router whose input
  # is 1 on one feature.
  r = d2s.DenseToSparseRouter(1, 4, k=1, start_temperature=2.0,
                              end_temperature=0.5, anneal_steps=4,
                              threshold=0.15, rngs=nnx.Rngs(0))
  r.w_router_ME[...] = jnp.array([[2 * np.log(2), 0, 0, 0]])
  x = jnp.ones((1, 1, 1))
  # step 0, tau 2: softmax(ln2, 0, 0, 0) = (2, 1, 1, 1) / 5: all >= 0.15.
  plan = r(x, capacity=None).plan
  assert sorted(np.asarray(plan.expert_GSK[0, 0]).tolist()) == [0, 1, 2, 3]
  np.testing.assert_allclose(sorted(np.asarray(plan.weight_GSK[0, 0])),
                             [0.2, 0.2, 0.2, 0.4], rtol=1e-5)
  # step 2, tau 1: softmax(2 ln2, 0,0,0) = (4,1,1,1)/7: 1/7 < 0.15: top-1.
  r.set_step(2)
  plan = r(x, capacity=None).plan
  np.testing.assert_array_equal(np.asarray(plan.expert_GSK[0, 0]),
                                [0, 4, 4, 4])
  np.testing.assert_allclose(float(plan.weight_GSK[0, 0, 0]), 4 / 7, rtol=1e-5)
  # step 4: sparse top-1 of the plain softmax: weight 4/7 as well.
  r.set_step(4)
  plan4 = r(x, capacity=None).plan
  np.testing.assert_array_equal(np.asarray(plan4.expert_GSK[0, 0]),
                                [0, 4, 4, 4])


def test_evomoe_sparse_phase_equals_top_k_and_mean_k_falls():
  layer = _layer({"name": "dense_to_sparse", "k": 2, "anneal_steps": 3,
                  "start_temperature": 5.0, "end_temperature": 0.5,
                  "threshold": 0.2})
  x = jax.random.normal(jax.random.key(0), (2, 8, M))
  ks = []
  for _ in range(4):
    y, aux = layer(x)
    ks.append(float(aux.metrics.mean_k))
    L.update_routers(layer, aux)          # the train step's hook
  assert int(layer.router.step[...]) == 4
  assert ks[0] == pytest.approx(4.0) and ks[-1] == pytest.approx(2.0)
  assert all(a >= b for a, b in zip(ks, ks[1:]))
  tc = _layer({"name": "token_choice", "k": 2})
  tc.router.w_router_ME[...] = layer.router.w_router_ME[...]
  tc.experts = layer.experts
  np.testing.assert_allclose(layer(x)[0], tc(x)[0], rtol=1e-6, atol=1e-6)
  # A forward call changes no state.
  assert int(layer.router.step[...]) == 4


def test_stablemoe_two_stages():
  v = 11
  layer = _layer({"name": "stable_moe", "vocab_size": v, "stage1_steps": 2,
                  "distill_dim": 4})
  r = layer.router
  x = jax.random.normal(jax.random.key(0), (2, 8, M))
  ids = jax.random.randint(jax.random.key(1), (2, 8), 0, v)
  # Stage 1: top-1 of x C^T, weight sigmoid; the distill loss trains only
  # the distilled router.
  y, aux = layer(x, token_ids_BL=ids)
  out = r(x, capacity=None, token_ids_GS=ids)
  s = np.asarray(jnp.einsum("GSM,EM->GSE", x, r.centroids_EM[...]))
  np.testing.assert_array_equal(np.asarray(out.plan.expert_GSK[..., 0]),
                                s.argmax(-1))
  np.testing.assert_allclose(np.asarray(out.plan.weight_GSK[..., 0]),
                             1 / (1 + np.exp(-s.max(-1))), rtol=1e-5)
  assert float(aux.losses["stable_distill"]) > 0
  grads = nnx.grad(lambda rt: rt(x, capacity=None, token_ids_GS=ids)
                   .losses["stable_distill"])(r)
  assert float(jnp.abs(grads["centroids_EM"][...]).sum()) == 0
  assert float(jnp.abs(grads["embed_VD"][...]).sum()) > 0
  # Two steps: the table freezes to the distilled router's argmax.
  L.update_routers(layer, aux)
  assert int(np.asarray(r.route_V[...]).sum()) == 0
  L.update_routers(layer, aux)
  table = np.asarray(r.distilled_logits(jnp.arange(v))).argmax(-1)
  np.testing.assert_array_equal(np.asarray(r.route_V[...]), table)
  # Stage 2: routing depends on the token id only, and stays frozen.
  out2 = r(x * -3.0, capacity=None, token_ids_GS=ids)
  np.testing.assert_array_equal(np.asarray(out2.plan.expert_GSK[..., 0]),
                                table[np.asarray(ids)])
  assert float(out2.losses["stable_distill"]) == 0
  r.embed_VD[...] = r.embed_VD[...] * -1
  L.update_routers(layer, aux)
  np.testing.assert_array_equal(np.asarray(r.route_V[...]), table)
