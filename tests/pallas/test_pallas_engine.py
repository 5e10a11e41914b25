"""The pallas engine (interpret mode) against the reference and the other
engines, directly and through MoELayer(engine=PallasEngine(...))."""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import layers
from moejax import pallas
from moejax import routing
from moejax.layers import reference
from moejax.ops import ffn as ffn_lib

G, S, M, H, E, K = 2, 6, 5, 7, 3, 2


def _case(activation):
  ks = jax.random.split(jax.random.key(0), 5)
  w = ffn_lib.ExpertWeights(
      jax.random.normal(ks[0], (E, M, H)) / np.sqrt(M),
      jax.random.normal(ks[1], (E, H, M)) / np.sqrt(H),
      (jax.random.normal(ks[2], (E, M, H)) / np.sqrt(M)
       if activation in ("swiglu", "geglu") else None))
  x = jax.random.normal(ks[3], (G, S, M))
  w_router = jax.random.normal(ks[4], (M, E))
  return x, w, w_router


def _loss_fn(activation, engine_fn):
  mask = jnp.ones((G, S), bool).at[1, -2:].set(False)   # two padded tokens

  def loss(x, w, w_router):
    logits = jnp.einsum("GSM,ME->GSE", x, w_router)
    plan = routing.token_choice(logits, k=K, capacity=None,
                                padding_mask_GS=mask)
    y = engine_fn(plan, x, w, activation)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)) * jnp.arange(M)), y
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _pallas_engine(backend):
  return layers.PallasEngine(backend=backend, tile=4)


def test_engine_matches_reference_and_dropless():
  # (G=2, S=6, M=5, H=7, E=3, K=2, tile=4), two padded tokens. Forward
  # against the per-token reference; gradients (x, expert weights, router)
  # against the XLA dropless engine, itself checked against the reference's
  # gradients in tests/layers/test_engines.py and much faster to compile.
  # backend='auto' on CPU *is* that XLA engine.
  x, w, w_router = _case("relu")
  (_, y), grads = _loss_fn("relu", _pallas_engine("triton_interpret"))(
      x, w, w_router)
  (_, y_xla), grads_xla = _loss_fn("relu", _pallas_engine("auto"))(
      x, w, w_router)
  mask = jnp.ones((G, S), bool).at[1, -2:].set(False)
  plan = routing.token_choice(jnp.einsum("GSM,ME->GSE", x, w_router), k=K,
                              capacity=None, padding_mask_GS=mask)
  y_ref = reference.reference_moe(plan, x, w, "relu", dropless=True)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y_xla, y_ref, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_xla)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def _layer(engine):
  # Capacity S*K per expert: nothing is dropped, so capacity engines agree
  # with the dropless ones. Same seed, so the same parameters.
  rngs = nnx.Rngs(0)
  return layers.MoELayer(
      router=layers.TokenChoiceRouter(M, E, k=K, rngs=rngs),
      experts=layers.Experts(E, M, H, activation="geglu", rngs=rngs),
      engine=engine, group_size=S, capacity=S * K)


def _forward(layer, x):
  return nnx.jit(lambda m, x: m(x)[0])(layer, x)


def test_layer_pallas_engine_equals_other_engines():
  # Forward only: the gradients of the engine are checked above, and the
  # layer adds nothing differentiable around it that differs by engine.
  x = jax.random.normal(jax.random.key(1), (2, S, M))
  y = _forward(_layer(layers.PallasEngine(backend="triton_interpret",
                                          tile=4)), x)
  y_dropless = _forward(_layer(layers.DroplessEngine(tile=4)), x)
  np.testing.assert_allclose(y, y_dropless, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y, _forward(_layer(layers.IndicesEngine()), x),
                             atol=1e-5, rtol=1e-5)
  # A gmm callable: the dropless engine's XLA gathers with the Pallas GMM,
  # here the TPU kernels in interpret mode.
  pallas_gmm = functools.partial(pallas.gmm, backend="mosaic_interpret")
  y_gmm = _forward(_layer(layers.DroplessEngine(tile=4, gmm=pallas_gmm)), x)
  np.testing.assert_allclose(y_gmm, y_dropless, atol=1e-5, rtol=1e-5)
  # The registry name 'pallas' is the PallasEngine; its default backend on
  # CPU runs the XLA dropless engine (tested above through backend='auto').
  layer = layers.build_moe(
      {"router": {"name": "token_choice", "k": K},
       "engine": {"name": "pallas", "tile": 4},
       "experts": {"num_experts": E, "hidden_dim": H, "activation": "geglu"},
       "group_size": S}, model_dim=M, rngs=nnx.Rngs(0))
  assert layer.engine == layers.PallasEngine(backend="auto", tile=4)
  assert not layer.engine.uses_capacity
  assert layer.layer_capacity(S, deterministic=False) is None
  assert pallas.resolve_backend(layer.engine.backend).kind == "xla"
  np.testing.assert_allclose(_forward(layer, x), y_dropless, atol=1e-5,
                             rtol=1e-5)


def test_layer_rejects_bad_options():
  with pytest.raises(ValueError, match="unknown pallas backend 'cuda'"):
    layers.PallasEngine(backend="cuda")
  with pytest.raises(ValueError, match="always uses the Pallas grouped "
                     "matmul"):
    layers.PallasEngine(gmm="scan")
  with pytest.raises(ValueError, match="tile must be an integer >= 1"):
    layers.PallasEngine(tile=0)
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match="PallasEngine needs a router whose "
                     "plans give each token's experts"):
    layers.MoELayer(router=layers.ExpertChoiceRouter(M, E, rngs=rngs),
                    experts=layers.Experts(E, M, H, rngs=rngs),
                    engine=layers.PallasEngine())
