"""Expert merging: SMEAR and Lory (moejax/layers/merging.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import layers as L
from moejax import models
from moejax.models import accounting

M, H, E = 4, 8, 3


def _set(layer, w_in, w_out, w_router):
  layer.experts.w_in_EMH[...] = jnp.asarray(w_in, jnp.float32)
  layer.experts.w_out_EHM[...] = jnp.asarray(w_out, jnp.float32)
  layer.router.w_router_ME[...] = jnp.asarray(w_router, jnp.float32)


def test_smear_hand_case():
  # (B=1, L=2, M=1, H=1, E=2), relu, one merge for the sequence.
  layer = L.build_moe({"layer": "smear", "experts": {"num_experts": 2,
                                                     "hidden_dim": 1}},
                      model_dim=1, rngs=nnx.Rngs(0))
  _set(layer, [[[1.0]], [[3.0]]], [[[2.0]], [[-1.0]]], [[np.log(3.0), 0.0]])
  x = jnp.array([[[1.0], [3.0]]])                 # mean token r = 2
  # logits (2 ln 3, 0): p = (9/10, 1/10); W_in = 0.9 + 0.3 = 1.2,
  # W_out = 1.8 - 0.1 = 1.7: y = relu(1.2 x) * 1.7 = 2.04 x.
  y, aux = layer(x)
  np.testing.assert_allclose(y[0, :, 0], [2.04, 6.12], rtol=1e-5)
  assert float(aux.metrics.mean_k) == 2.0
  assert float(aux.losses["load_balance"]) == pytest.approx(1.0)


def test_smear_merge_equals_explicit_weights_and_token_mode_is_causal():
  layer = L.build_moe({"layer": "smear", "granularity": "token",
                       "experts": {"num_experts": E, "hidden_dim": H,
                                   "activation": "swiglu"}},
                      model_dim=M, rngs=nnx.Rngs(0))
  assert layer.causal
  x = jax.random.normal(jax.random.key(0), (2, 5, M))
  y, _ = layer(x)
  p = jax.nn.softmax(jnp.einsum("blm,me->ble", x, layer.router.w_router_ME[...]))
  w_in, w_out, w_gate = layer.experts.weights()
  for bi, li in ((0, 0), (1, 3)):
    mi = lambda w: jnp.einsum("e,e...->...", p[bi, li], w)
    h = jax.nn.silu(x[bi, li] @ mi(w_gate)) * (x[bi, li] @ mi(w_in))
    np.testing.assert_allclose(y[bi, li], h @ mi(w_out), rtol=1e-5, atol=1e-6)
  with pytest.raises(L.MoEConfigError, match="granularity"):
    L.build_moe({"layer": "smear", "granularity": "word",
                 "experts": {"num_experts": E, "hidden_dim": H}},
                model_dim=M, rngs=nnx.Rngs(0))
  with pytest.raises(L.MoEConfigError, match="moe.layer"):
    L.build_moe({"layer": "smear", "experts": {"num_experts": E,
                                               "hidden_dim": H}},
                model_dim=M, rngs=nnx.Rngs(0), causal=True)


def test_lory_hand_case_segment_routed_on_previous():
  # (B=1, L=4, M=1, H=1, E=2, T=2): segment 0 uniform, segment 1 routed on
  # the mean of segment 0.
  layer = L.build_moe({"layer": "lory", "segment_len": 2,
                       "experts": {"num_experts": 2, "hidden_dim": 1}},
                      model_dim=1, rngs=nnx.Rngs(0))
  _set(layer, [[[1.0]], [[3.0]]], [[[1.0]], [[1.0]]], [[np.log(3.0), 0.0]])
  x = jnp.array([[[1.0], [1.0], [5.0], [-1.0]]])
  # segment 0: p = (.5, .5): W_in 2, y = relu(2x) = 2, 2.
  # segment 1: mean of segment 0 = 1, logits (ln 3, 0): p = (.75, .25),
  # W_in = 1.5: y = relu(1.5 x) = 7.5, 0.
  y, aux = layer(x)
  np.testing.assert_allclose(y[0, :, 0], [2.0, 2.0, 7.5, 0.0], rtol=1e-5)


def test_lory_is_causal():
  layer = L.build_moe({"layer": "lory", "segment_len": 3,
                       "experts": {"num_experts": E, "hidden_dim": H}},
                      model_dim=M, rngs=nnx.Rngs(0), causal=True)
  x = jax.random.normal(jax.random.key(0), (1, 10, M))
  jac = jax.jacobian(lambda v: layer(v)[0])(x)          # [1,10,M,1,10,M]
  dep = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 5))  # [t_out, t_in]
  assert np.all(np.triu(dep, 1) == 0)                   # no later token
  assert dep[5, 1] > 0                                  # previous segment


@pytest.mark.parametrize("moe", [
    {"layer": "smear", "granularity": "token"},
    {"layer": "lory", "segment_len": 4}], ids=lambda c: c["layer"])
def test_in_a_decoder(moe):
  moe = dict(moe, experts={"num_experts": 4})
  model = models.DecoderLM(32, 16, 2, 2, 32, moe_every=2, moe=moe,
                           rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
  logits, aux = model(tokens)
  assert logits.shape == (2, 8, 32)
  assert aux.losses["load_balance"].shape == (1,)
  counts = accounting.count_params(model)
  assert counts["num_moe_layers"] == 1
  assert accounting.flops_per_token(model, seq_len=8) > 0
