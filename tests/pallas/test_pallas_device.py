"""The compiled kernels on a real GPU (Triton) or TPU (Mosaic).

Skipped unless JAX sees that device (tests/conftest.py). On a GPU machine:

  JAX_PLATFORMS=cuda,cpu python -m pytest -m gpu tests/pallas -q

Shapes are MoE-like but small (tile 128, bf16 and f32); references are the
XLA paths (jax.lax.ragged_dot, moejax.ops.gmm, the dropless engine) on the
same device.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import layers
from moejax import pallas
from moejax import routing
from moejax.layers import dispatch
from moejax.ops import gmm as xla_gmm

DEVICES = [pytest.param("triton", marks=pytest.mark.gpu, id="gpu"),
           pytest.param("mosaic", marks=pytest.mark.tpu, id="tpu")]
TILE = 128


def _aligned_case(dtype, e=8, m=512, h=768, seed=0):
  # Raw sizes with an empty group and sizes that are no tile multiple,
  # padded up; rows past the groups stay zero.
  raw = np.array([300, 0, 129, 1, 512, 77, 128, 250][:e])
  padded = -(-raw // TILE) * TILE
  r = int(padded.sum()) + 2 * TILE
  real = np.zeros((r,), bool)
  start = 0
  for s, p in zip(raw, padded):
    real[start:start + s] = True
    start += p
  k1, k2 = jax.random.split(jax.random.key(seed))
  lhs = (jax.random.normal(k1, (r, m)) * real[:, None]).astype(dtype)
  rhs = (jax.random.normal(k2, (e, m, h)) / np.sqrt(m)).astype(dtype)
  return lhs, rhs, jnp.asarray(padded, jnp.int32)


def _fwd_and_grads(fn):
  def loss(lhs, rhs):
    return jnp.sum(jnp.sin(fn(lhs, rhs).astype(jnp.float32)))
  return jax.jit(lambda a, b: (fn(a, b), jax.grad(loss, (0, 1))(a, b)))


def _close(a, b, tol):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  scale = max(1.0, float(np.abs(b).max()))
  np.testing.assert_allclose(a, b, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("backend", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 2e-2),
                                       (jnp.float32, 1e-4)])
def test_gmm_on_device(backend, dtype, tol):
  lhs, rhs, sizes = _aligned_case(dtype)
  out, grads = _fwd_and_grads(functools.partial(
      pallas.gmm, group_sizes_E=sizes, tile=TILE, backend=backend))(lhs, rhs)
  # Reference in float32 through XLA on the same device.
  ref_fn = functools.partial(xla_gmm.gmm, group_sizes_E=sizes, tile=TILE)
  out_ref, grads_ref = _fwd_and_grads(ref_fn)(lhs.astype(jnp.float32),
                                              rhs.astype(jnp.float32))
  assert out.dtype == dtype
  _close(out, out_ref, tol)
  for g, g_ref in zip(grads, grads_ref):
    assert g.dtype == dtype
    _close(g, g_ref, tol)


@pytest.mark.parametrize("backend", DEVICES)
def test_ragged_dot_on_device(backend):
  k1, k2 = jax.random.split(jax.random.key(1))
  lhs = jax.random.normal(k1, (1000, 256), jnp.float32)
  rhs = jax.random.normal(k2, (5, 256, 384), jnp.float32) / 16
  sizes = jnp.array([0, 333, 1, 400, 200], jnp.int32)   # 66 rows unused
  out = jax.jit(functools.partial(pallas.ragged_dot, tile=TILE,
                                  backend=backend))(lhs, rhs, sizes)
  _close(out, jax.lax.ragged_dot(lhs, rhs, sizes,
                                 precision=jax.lax.Precision.HIGHEST), 1e-4)


@pytest.mark.parametrize("backend", DEVICES)
def test_permute_unpermute_on_device(backend):
  g, s, m, e, k = 2, 512, 1024, 8, 2
  logits = jax.random.normal(jax.random.key(2), (g, s, e))
  plan = routing.token_choice(logits, k=k, capacity=None)
  layout = dispatch.dropless_layout(plan, TILE)
  row_NK = layout.row_N.reshape(g * s, k)
  w_NK = plan.weight_GSK.reshape(g * s, k)
  x = jax.random.normal(jax.random.key(3), (g * s, m), jnp.bfloat16)
  out = jax.random.normal(jax.random.key(4),
                          (layout.assignment_R.shape[0], m), jnp.bfloat16)

  def program(be):
    def loss(x, out, w):
      p = pallas.permute(x, row_NK, layout.assignment_R, backend=be)
      u = pallas.unpermute(out, w, row_NK, layout.assignment_R, backend=be)
      return (jnp.sum(jnp.sin(p.astype(jnp.float32)))
              + jnp.sum(jnp.cos(u.astype(jnp.float32)))), (p, u)
    return jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))
  grads, (p, u) = program(backend)(x, out, w_NK)
  grads_ref, (p_ref, u_ref) = program("xla")(x, out, w_NK)
  np.testing.assert_array_equal(np.asarray(p, np.float32),
                                np.asarray(p_ref, np.float32))
  _close(u, u_ref, 2e-2)
  for a, b in zip(grads, grads_ref):
    _close(a, b, 2e-2)


@pytest.mark.parametrize("backend", DEVICES)
def test_layer_pallas_engine_on_device(backend):
  engine = layers.PallasEngine(tile=TILE)   # backend 'auto' must pick it
  assert pallas.resolve_backend(engine.backend).name == backend

  def make(engine):  # same seed, so the same parameters
    rngs = nnx.Rngs(0)
    return layers.MoELayer(
        router=layers.TokenChoiceRouter(256, 8, k=2, rngs=rngs),
        experts=layers.Experts(8, 256, 512, activation="swiglu",
                               dtype=jnp.bfloat16, rngs=rngs),
        engine=engine, group_size=256)

  x = jax.random.normal(jax.random.key(5), (4, 256, 256), jnp.bfloat16)
  layer = make(engine)
  ref = make(layers.DroplessEngine(tile=TILE, gmm="ragged_dot"))

  def value_and_grads(model):
    def loss(m):
      return jnp.mean(m(x)[0].astype(jnp.float32) ** 2)
    return nnx.jit(nnx.value_and_grad(loss))(model)
  v, grads = value_and_grads(layer)
  v_ref, grads_ref = value_and_grads(ref)
  _close(v, v_ref, 2e-2)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    _close(a, b, 5e-2)
