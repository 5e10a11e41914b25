"""Tests for moejax.routing.soft (Soft MoE weights)."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing
from moejax.routing import soft


def _numpy_soft_weights(x, mu, scale):
  x = x.astype(np.float64)
  mu = mu.astype(np.float64)
  xn = x / np.sqrt((x**2).sum(-1, keepdims=True) + 1e-6) * scale
  mun = mu / np.sqrt((mu**2).sum(0, keepdims=True) + 1e-6)
  logits = np.einsum("gsm,mep->gsep", xn, mun)
  d = np.exp(logits - logits.max(1, keepdims=True))
  d /= d.sum(1, keepdims=True)
  g, s, e, p = logits.shape
  flat = logits.reshape(g, s, e * p)
  c = np.exp(flat - flat.max(-1, keepdims=True))
  c /= c.sum(-1, keepdims=True)
  return d, c.reshape(g, s, e, p)


_jit_soft_weights = jax.jit(soft.soft_weights)


def test_hand_computed():
  # (G=1, S=2, M=2, E=2, P=1); x and mu are unit vectors, scale = ln 3, so
  # token 0 has logits [ln 3, 0] and token 1 has [0, ln 3] (up to the 1e-6).
  x = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
  mu = jnp.array([[[1.0], [0.0]], [[0.0], [1.0]]])  # [M=2, E=2, P=1]
  dispatch, combine = soft.soft_weights(x, mu, np.log(3.0))
  assert dispatch.shape == combine.shape == (1, 2, 2, 1)
  # Slot of expert 0: softmax over tokens of [ln 3, 0] = [3/4, 1/4].
  np.testing.assert_allclose(dispatch[0, :, 0, 0], [0.75, 0.25], atol=1e-5)
  np.testing.assert_allclose(dispatch[0, :, 1, 0], [0.25, 0.75], atol=1e-5)
  np.testing.assert_allclose(combine[0, 0, :, 0], [0.75, 0.25], atol=1e-5)
  np.testing.assert_allclose(combine[0, 1, :, 0], [0.25, 0.75], atol=1e-5)


@hypothesis.given(
    shape=st.sampled_from([(1, 3, 4, 2, 2), (2, 5, 3, 3, 1), (1, 1, 2, 1, 3)]),
    scale=st.floats(-4.0, 4.0), seed=st.integers(0, 2**31 - 1))
def test_matches_numpy_and_sums_to_one(shape, scale, seed):
  g, s, m, e, p = shape
  rs = np.random.RandomState(seed)
  x = rs.randn(g, s, m).astype(np.float32) * 3
  mu = rs.randn(m, e, p).astype(np.float32)
  dispatch, combine = _jit_soft_weights(jnp.asarray(x), jnp.asarray(mu),
                                        jnp.float32(scale))
  assert dispatch.dtype == combine.dtype == jnp.float32
  want_d, want_c = _numpy_soft_weights(x, mu, scale)
  np.testing.assert_allclose(dispatch, want_d, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(combine, want_c, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jnp.sum(dispatch, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.sum(combine, axis=(2, 3)), 1.0, rtol=1e-5)


def test_invariant_to_input_norm():
  # (G=1, S=4, M=3, E=2, P=2): L2 normalisation removes token and slot norms.
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.randn(1, 4, 3), jnp.float32)
  mu = jnp.asarray(rs.randn(3, 2, 2), jnp.float32)
  d1, c1 = soft.soft_weights(x, mu, 2.0)
  token_scale = jnp.array([10.0, 0.5, 3.0, 1.0])[None, :, None]
  d2, c2 = soft.soft_weights(x * token_scale, mu * 7.0, 2.0)
  np.testing.assert_allclose(d1, d2, rtol=1e-4)
  np.testing.assert_allclose(c1, c2, rtol=1e-4)
  # ... but the scale does matter.
  d3, _ = soft.soft_weights(x, mu, 0.5)
  assert not np.allclose(d1, d3, rtol=1e-3)


def test_padding():
  # (G=2, S=4, M=3, E=2, P=2); group 0 has tokens 1 and 3 padded, group 1
  # is all padding.
  rs = np.random.RandomState(1)
  x = jnp.asarray(rs.randn(2, 4, 3), jnp.float32)
  mu = jnp.asarray(rs.randn(3, 2, 2), jnp.float32)
  mask = jnp.array([[True, False, True, False], [False] * 4])
  dispatch, combine = _jit_soft_weights(x, mu, 1.5, padding_mask_GS=mask)
  assert np.isfinite(np.asarray(dispatch)).all()
  np.testing.assert_array_equal(dispatch[0, 1], 0.0)
  np.testing.assert_array_equal(dispatch[0, 3], 0.0)
  np.testing.assert_array_equal(dispatch[1], 0.0)
  np.testing.assert_array_equal(combine[0, 1], 0.0)
  np.testing.assert_array_equal(combine[1], 0.0)
  # Real tokens see the same weights as a group holding only them.
  d_real, c_real = _jit_soft_weights(x[:1, ::2], mu, 1.5)
  np.testing.assert_allclose(dispatch[:1, ::2], d_real, rtol=1e-6)
  np.testing.assert_allclose(combine[:1, ::2], c_real, rtol=1e-6)
  np.testing.assert_allclose(jnp.sum(dispatch[0], axis=0), 1.0, rtol=1e-6)


def test_gradients_finite_with_padding():
  # (G=2, S=3, M=2, E=1, P=2); group 1 all padding.
  rs = np.random.RandomState(2)
  x = jnp.asarray(rs.randn(2, 3, 2), jnp.float32)
  mu = jnp.asarray(rs.randn(2, 1, 2), jnp.float32)
  mask = jnp.array([[True, True, False], [False, False, False]])
  y_GSM = jnp.asarray(rs.randn(2, 3, 2), jnp.float32)

  def loss(x, mu, scale):
    d, c = soft.soft_weights(x, mu, scale, padding_mask_GS=mask)
    slots = jnp.einsum("GSEP,GSM->GEPM", d, x)
    out = jnp.einsum("GSEP,GEPM->GSM", c, slots)
    return jnp.sum(out * y_GSM)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, mu, jnp.float32(1.0))
  for gr in grads:
    assert np.isfinite(np.asarray(gr)).all()
  assert float(jnp.abs(grads[2])) > 0
  # Padded tokens do not influence anything.
  np.testing.assert_array_equal(grads[0][0, 2], 0.0)
  np.testing.assert_array_equal(grads[0][1], 0.0)


def test_bfloat16_inputs():
  # (G=1, S=3, M=4, E=2, P=1)
  rs = np.random.RandomState(3)
  x = jnp.asarray(rs.randn(1, 3, 4), jnp.bfloat16)
  mu = jnp.asarray(rs.randn(4, 2, 1), jnp.bfloat16)
  dispatch, combine = soft.soft_weights(x, mu, jnp.ones((), jnp.bfloat16))
  assert dispatch.dtype == combine.dtype == jnp.float32
  want_d, want_c = _numpy_soft_weights(np.asarray(x, np.float32),
                                       np.asarray(mu, np.float32), 1.0)
  np.testing.assert_allclose(dispatch, want_d, rtol=1e-5)
  np.testing.assert_allclose(combine, want_c, rtol=1e-5)


def test_exported_and_jittable():
  assert routing.soft_weights is soft.soft_weights
  x = jnp.ones((1, 2, 3))
  mu = jnp.ones((3, 2, 1))
  d, c = jax.jit(soft.soft_weights)(x, mu, jnp.float32(1.0))
  np.testing.assert_allclose(d, 0.5, rtol=1e-6)
  np.testing.assert_allclose(c, 0.5, rtol=1e-6)


@pytest.mark.parametrize("x_shape, mu_shape, scale, mask_shape, match", [
    ((2, 3), (3, 2, 1), 1.0, None, "x_GSM must have rank 3"),
    ((1, 2, 3), (3, 2), 1.0, None, "mu_MEP must have rank 3"),
    ((1, 2, 3), (4, 2, 1), 1.0, None, "M=3"),
    ((1, 2, 3), (3, 2, 1), np.ones(2), None, "scale must be a scalar"),
    ((1, 2, 3), (3, 2, 1), 1.0, (2, 2), "padding_mask_GS"),
])
def test_errors(x_shape, mu_shape, scale, mask_shape, match):
  mask = None if mask_shape is None else jnp.ones(mask_shape, bool)
  with pytest.raises(ValueError, match=match):
    soft.soft_weights(jnp.ones(x_shape), jnp.ones(mu_shape), scale,
                      padding_mask_GS=mask)
