"""Pallas permute / unpermute in interpret mode: hand cases, and forward and
gradients against the XLA gathers on a real dropless layout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import pallas
from moejax import routing
from moejax.layers import dispatch

INTERPRET = ("triton_interpret", "mosaic_interpret")

# (N=3 tokens, K=2, R=6 rows): token 0 -> rows 0 and 3, token 1 -> row 4 and
# a dropped choice (row R=6), token 2 -> rows 1 and 5; row 2 is padding.
ROW_NK = np.array([[0, 3], [4, 6], [1, 5]], np.int32)
ASSIGNMENT_R = np.array([0, 4, 6, 1, 2, 5], np.int32)   # n*K + k, 6 = none
X_NM = np.array([[1., 2.], [3., 4.], [5., 6.]])
W_NK = np.array([[0.5, 0.25], [1.0, 0.0], [2.0, 1.0]])


@pytest.mark.parametrize("backend", INTERPRET)
def test_hand_case(backend):
  def fwd(x, out, w):
    perm = pallas.permute(x, ROW_NK, ASSIGNMENT_R, backend=backend)
    unperm = pallas.unpermute(out, w, ROW_NK, ASSIGNMENT_R, backend=backend)
    return perm, unperm
  out_RM = np.arange(12.).reshape(6, 2)   # row r = [2r, 2r+1]
  perm, unperm = jax.jit(fwd)(X_NM, out_RM, W_NK)
  np.testing.assert_array_equal(
      perm, [[1, 2], [5, 6], [0, 0], [1, 2], [3, 4], [5, 6]])
  # y0 = .5*row0 + .25*row3, y1 = 1*row4, y2 = 2*row1 + 1*row5.
  np.testing.assert_allclose(
      unperm, [[.5 * 0 + .25 * 6, .5 * 1 + .25 * 7], [8, 9],
               [2 * 2 + 10, 2 * 3 + 11]], atol=1e-6)


def _layout_case():
  # (G=2, S=5, M=6, E=3, K=2, tile=4) with one padded token per group.
  g, s, m, e, k = 2, 5, 6, 3, 2
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  logits = jax.random.normal(k1, (g, s, e))
  mask = jnp.ones((g, s), bool).at[:, -1].set(False)
  plan = routing.token_choice(logits, k=k, capacity=None, padding_mask_GS=mask)
  layout = dispatch.dropless_layout(plan, 4)
  r = layout.assignment_R.shape[0]
  row_NK = layout.row_N.reshape(g * s, k)
  x = jax.random.normal(k2, (g * s, m))
  out = jax.random.normal(k3, (r, m))
  return x, out, plan.weight_GSK.reshape(g * s, k), row_NK, layout


def _program(backend):
  def run(x, out, w, row_NK, assignment_R):
    def loss(x, out, w):
      p = pallas.permute(x, row_NK, assignment_R, backend=backend)
      u = pallas.unpermute(out, w, row_NK, assignment_R, backend=backend)
      return (jnp.sum(jnp.sin(p) * jnp.arange(p.shape[1]))
              + jnp.sum(jnp.cos(u) * jnp.arange(u.shape[1]))), (p, u)
    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, out, w)
  return jax.jit(run)


@pytest.mark.parametrize("backend", INTERPRET)
def test_matches_xla_with_gradients(backend):
  x, out, w, row_NK, layout = _layout_case()
  args = (x, out, w, row_NK, layout.assignment_R)
  grads, (p, u) = _program(backend)(*args)
  grads_ref, (p_ref, u_ref) = _program("xla")(*args)
  np.testing.assert_allclose(p, p_ref, atol=1e-6)
  np.testing.assert_allclose(u, u_ref, atol=1e-5, rtol=1e-5)
  for a, b in zip(grads, grads_ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  # Padded tokens: nothing in, nothing out, no gradient to their weights.
  pad = np.asarray(row_NK[4]) == layout.assignment_R.shape[0]
  assert pad.all() and not np.any(np.asarray(u[4]))
  assert not np.any(np.asarray(grads[2][4]))


def test_bfloat16_and_odd_widths():
  # (N=3, K=2, R=6, M=3): bf16 rows, a width that is no block multiple.
  x = jnp.asarray(np.arange(9.).reshape(3, 3), jnp.bfloat16)
  out = jnp.asarray(np.arange(18.).reshape(6, 3), jnp.bfloat16)
  run = jax.jit(functools.partial(_program("triton_interpret"),
                                  row_NK=ROW_NK, assignment_R=ASSIGNMENT_R))
  run_ref = jax.jit(functools.partial(_program("xla"), row_NK=ROW_NK,
                                      assignment_R=ASSIGNMENT_R))
  (gx, gout, gw), (p, u) = run(x, out, jnp.asarray(W_NK, jnp.float32))
  (gx_r, gout_r, gw_r), (p_r, u_r) = run_ref(
      x, out, jnp.asarray(W_NK, jnp.float32))
  assert p.dtype == u.dtype == gx.dtype == gout.dtype == jnp.bfloat16
  np.testing.assert_array_equal(p, p_r)
  for a, b in ((u, u_r), (gx, gx_r), (gout, gout_r), (gw, gw_r)):
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), rtol=2 ** -7,
                               atol=2e-2)
