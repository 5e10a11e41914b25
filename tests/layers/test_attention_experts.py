"""Attention experts: MoA and SwitchHead (moejax/layers/attention_experts.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import layers as L
from moejax import models
from moejax.layers import attention_experts as ae

M = 8


def test_moa_hand_case_one_token():
  # (B=1, L=1, M=1, E=2, D=1, k=1): one token attends only itself, so the
  # head output is v = x W_v; the gate picks expert 1 (logit 1 > 0), weight
  # renormalised to 1: y = v * W_o_1 = 2 * 3 * 5 = 30.
  moa = ae.MoAAttention(1, num_experts=2, k=1, head_dim=1,
                        rope_max_wavelength=None, rngs=nnx.Rngs(0))
  moa.w_gate_ME[...] = jnp.array([[0.0, 1.0]])
  moa.w_v_MD[...] = jnp.array([[3.0]])
  moa.w_o_EDM[...] = jnp.array([[[7.0]], [[5.0]]])
  np.testing.assert_allclose(moa(jnp.array([[[2.0]]]))[0, 0, 0], 30.0,
                             rtol=1e-6)


def test_switchhead_hand_case_one_token():
  # (B=1, L=1, M=1, N=1, E=2, D=1, k=1): gates sigmoid(x w): value gate
  # logits (0, 1 * x=1) -> expert 1, s = sigmoid(1); output gate logits
  # (2, 0) -> expert 0, s' = sigmoid(2).
  sh = ae.SwitchHeadAttention(1, num_heads=1, num_experts=2, k=1, head_dim=1,
                              rope_max_wavelength=None, rngs=nnx.Rngs(0))
  sh.w_sv_MNE[...] = jnp.array([[[0.0, 1.0]]])
  sh.w_so_MNE[...] = jnp.array([[[2.0, 0.0]]])
  sh.w_v_NEMD[...] = jnp.array([[[[4.0]], [[3.0]]]])
  sh.w_o_NEDM[...] = jnp.array([[[[5.0]], [[9.0]]]])
  sig = lambda z: 1 / (1 + np.exp(-z))
  want = 1.0 * 3.0 * sig(1.0) * 5.0 * sig(2.0)
  np.testing.assert_allclose(sh(jnp.array([[[1.0]]]))[0, 0, 0], want,
                             rtol=1e-5)


def test_moa_one_expert_is_single_head_attention():
  moa = ae.MoAAttention(M, num_experts=1, k=1, head_dim=4, rngs=nnx.Rngs(0))
  mha = L.MultiHeadAttention(M, 1, head_dim=4, rngs=nnx.Rngs(1))
  mha.w_q_MND[...] = moa.w_q_EMD[...][0][:, None]
  mha.w_k_MND[...] = moa.w_k_MD[...][:, None]
  mha.w_v_MND[...] = moa.w_v_MD[...][:, None]
  mha.w_o_NDM[...] = moa.w_o_EDM[...]
  x = jax.random.normal(jax.random.key(0), (2, 6, M))
  np.testing.assert_allclose(moa(x), mha(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: ae.MoAAttention(M, num_experts=4, k=2, head_dim=4,
                            rngs=nnx.Rngs(0)),
    lambda: ae.SwitchHeadAttention(M, num_heads=2, num_experts=3, k=2,
                                   head_dim=4, rngs=nnx.Rngs(0))],
    ids=["moa", "switchhead"])
def test_causal_and_unselected_experts_do_nothing(make):
  attn = make()
  x = jax.random.normal(jax.random.key(1), (1, 6, M))
  y = attn(x)
  jac = jax.jacobian(attn)(x)
  dep = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 5))
  assert np.all(np.triu(dep, 1) == 0)
  # Gradients reach only experts some token picked: zero for the rest.
  if isinstance(attn, ae.MoAAttention):
    g = attn.gates(x)
    unused = np.asarray(jnp.sum(g, (0, 1)) == 0)
    grad = nnx.grad(lambda a: jnp.sum(a(x) ** 2))(attn)
    o = np.abs(np.asarray(grad["w_o_EDM"][...])).sum((1, 2))
    assert np.all(o[unused] == 0) and np.all(o[~unused] > 0)
  assert y.shape == x.shape


@pytest.mark.parametrize("wrappers", [
    {"moa": {"num_experts": 4, "k": 2}},
    {"switchhead": {"num_experts": 3, "k": 2}}], ids=lambda w: list(w)[0])
def test_in_a_decoder_from_config(wrappers):
  model = models.DecoderLM(32, M, 2, 2, 16, wrappers=wrappers,
                           rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 32)
  logits, _ = model(tokens)
  assert logits.shape == (2, 6, 32)
  assert type(model.blocks[0].attention).__name__ in (
      "MoAAttention", "SwitchHeadAttention")
  with pytest.raises(L.MoEConfigError, match="model.wrappers"):
    models.DecoderLM(32, M, 2, 2, 16, wrappers={list(wrappers)[0]: {"kk": 1}},
                     rngs=nnx.Rngs(0))
