"""Mixture-of-Depths: top-C at training time, the causal predictor when
decoding (moejax/layers/mod.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import layers as L
from moejax import models
from moejax.layers import mod as mod_lib

M = 8


def _block(moe=None):
  ffn = (L.DenseFFN(M, 16, rngs=nnx.Rngs(1)) if moe is None else
         L.build_moe(moe, model_dim=M, rngs=nnx.Rngs(1), causal=True))
  return L.TransformerBlock(M, 2, ffn=ffn, rngs=nnx.Rngs(2))


def test_top_c_hand_case():
  # (B=1, L=5, M=1): r = x (w_router = 1); C = ceil(0.4 * 5) = 2.
  blk = mod_lib.MoDBlock(_block(), M, capacity_fraction=0.4,
                         rngs=nnx.Rngs(0))
  r = jnp.array([[0.5, 3.0, -1.0, 2.0, 0.0]])
  token, chosen = blk.top_c(r)
  np.testing.assert_array_equal(np.asarray(token), [[1, 3]])  # in order
  np.testing.assert_array_equal(np.asarray(chosen), [[0, 1, 0, 1, 0]])


def test_training_routes_top_c_and_others_pass_unchanged():
  blk = mod_lib.MoDBlock(_block(), M, capacity_fraction=0.25, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 8, M))
  y, aux = blk(x, deterministic=False)
  r = jnp.einsum("blm,m->bl", x, blk.w_router_M[...])
  token, chosen = blk.top_c(r)
  chosen = np.asarray(chosen)
  assert chosen.sum(-1).tolist() == [2, 2]                  # C = 2 each
  np.testing.assert_array_equal(np.asarray(y)[~chosen], np.asarray(x)[~chosen])
  # Chosen tokens: x + sigmoid(r) * (block(x_chosen) - x) at their positions.
  for b in range(2):
    idx = np.asarray(token[b])
    out, _ = blk.block(x[b:b + 1, idx], positions_BL=jnp.asarray(idx)[None])
    want = x[b, idx] + jax.nn.sigmoid(r[b, idx])[:, None] * (out[0] - x[b, idx])
    np.testing.assert_allclose(y[b, idx], want, rtol=1e-5, atol=1e-5)
  assert float(aux.losses["mod_predictor"]) > 0
  assert float(aux.metrics.mean_k) == pytest.approx(0.25)
  # The router is on the gradient path; the predictor loss trains only the
  # predictor.
  g = nnx.grad(lambda m: jnp.sum(m(x, deterministic=False)[0] ** 2))(blk)
  assert float(jnp.abs(g["w_router_M"][...]).sum()) > 0
  g = nnx.grad(lambda m: m(x, deterministic=False)[1].losses[
      "mod_predictor"])(blk)
  assert float(jnp.abs(g["w_router_M"][...]).sum()) == 0
  assert float(jnp.abs(g["w_pred_in_MH"][...]).sum()) > 0


@pytest.mark.parametrize("moe", [None, {"router": {"name": "token_choice",
                                                   "k": 2},
                                        "engine": {"name": "dropless",
                                                   "tile": 4},
                                        "experts": {"num_experts": 4,
                                                    "hidden_dim": 8}}],
                         ids=["dense", "moe"])
def test_decode_mode_is_causal(moe):
  blk = mod_lib.MoDBlock(_block(moe), M, capacity_fraction=0.5,
                         rngs=nnx.Rngs(0))
  # A predictor that picks about half the tokens.
  blk.w_pred_out_H[...] = blk.w_pred_out_H[...] * 50
  x = jax.random.normal(jax.random.key(3), (1, 7, M))
  y, _ = blk(x, deterministic=True)
  picked = np.asarray(blk.predictor_logits(x) > 0)[0]
  assert 0 < picked.sum() < 7
  jac = jax.jacobian(lambda v: blk(v, deterministic=True)[0])(x)
  dep = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 5))      # [t_out, t_in]
  assert np.all(np.triu(dep, 1) == 0)
  # Changing the last token (even its routing) leaves earlier outputs alone
  # when decoding; in training mode top-C reads later tokens: a last token
  # with a large router score evicts an earlier one from the top-C.
  x2 = x.at[:, 6].add(20.0 * blk.w_router_M[...] /
                      jnp.linalg.norm(blk.w_router_M[...]))
  np.testing.assert_allclose(blk(x2, deterministic=True)[0][:, :6], y[:, :6],
                             rtol=1e-6, atol=1e-6)
  x3 = x.at[:, 6].add(-20.0 * blk.w_router_M[...] /
                      jnp.linalg.norm(blk.w_router_M[...]))
  assert not np.allclose(blk(x2, deterministic=False)[0][:, :6],
                         blk(x3, deterministic=False)[0][:, :6])


def test_decoder_wrapper_from_config():
  model = models.DecoderLM(32, M, 4, 2, 16, moe_every=2,
                           moe={"experts": {"num_experts": 4},
                                "engine": {"name": "dropless", "tile": 4}},
                           wrappers={"mod": {"every": 2,
                                             "capacity_fraction": 0.5}},
                           rngs=nnx.Rngs(0))
  assert [type(b).__name__ for b in model.blocks] == [
      "TransformerBlock", "MoDBlock"] * 2
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
  logits, aux = model(tokens)
  assert logits.shape == (2, 8, 32)
  assert aux.losses["mod_predictor"].shape == (2,)
  L.update_routers(model, aux)
