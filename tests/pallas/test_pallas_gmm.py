"""Pallas grouped matmul in interpret mode against moejax.ops.gmm and
jax.lax.ragged_dot: forward and gradients, hand cases and hypothesis sizes.

Interpret mode is slow to compile, so every test keeps its shapes fixed and
varies only run-time values (group sizes), which reuses one compiled program.
"""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import pallas
from moejax.ops import gmm as xla_gmm
from moejax.pallas import backend as backend_lib

INTERPRET = ("triton_interpret", "mosaic_interpret")


def _loss(gmm_fn, lhs, rhs):
  # A non-linear read-out so every output element has its own cotangent.
  out = gmm_fn(lhs, rhs).astype(jnp.float32)
  return jnp.sum(jnp.sin(out) * jnp.arange(out.shape[1]))


def _value_and_grads(gmm_fn):
  return jax.jit(lambda lhs, rhs: (gmm_fn(lhs, rhs), jax.grad(
      functools.partial(_loss, gmm_fn), argnums=(0, 1))(lhs, rhs)))


def test_hand_case():
  # (R=4, M=2, H=1, E=3, tile=2): rows 0-1 -> expert 0, expert 1 empty,
  # rows 2-3 -> expert 2; expert weights are the column [e+1, 10(e+1)].
  lhs = jnp.array([[1., 0.], [0., 1.], [1., 1.], [2., 0.]])
  rhs = jnp.array([[[1.], [10.]], [[2.], [20.]], [[3.], [30.]]])
  sizes = jnp.array([2, 0, 2], jnp.int32)
  want = np.array([[1.], [10.], [33.], [6.]])
  for backend in INTERPRET:
    out = jax.jit(functools.partial(pallas.gmm, tile=2, backend=backend))(
        lhs, rhs, sizes)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", INTERPRET)
def test_matches_xla_gmm_and_ragged_dot_f32(backend):
  # (R=40, M=12, H=20, E=4, tile=4): an empty group, a group spanning several
  # tiles, 8 trailing rows past the groups; M and H are not block multiples.
  tile, r, m, h = 4, 40, 12, 20
  sizes = jnp.array([8, 0, 4, 20], jnp.int32)
  k1, k2 = jax.random.split(jax.random.key(0))
  lhs = jax.random.normal(k1, (r, m))
  rhs = jax.random.normal(k2, (4, m, h))
  fast = _value_and_grads(functools.partial(
      pallas.gmm, group_sizes_E=sizes, tile=tile, backend=backend))
  ref = _value_and_grads(functools.partial(xla_gmm.gmm, group_sizes_E=sizes,
                                           tile=tile))
  (out, grads), (out_ref, grads_ref) = fast(lhs, rhs), ref(lhs, rhs)
  np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out, jax.lax.ragged_dot(lhs, rhs, sizes),
                             atol=1e-5, rtol=1e-5)
  assert not np.any(np.asarray(out[32:])), "rows past the groups must be 0"
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-4)
  # The empty expert gets an exactly-zero gradient.
  assert not np.any(np.asarray(grads[1][1]))


def test_bfloat16_inputs_accumulate_in_float32(backend="triton_interpret"):
  # (R=32, M=64, H=16, E=2, tile=8): bf16 in, bf16 out, f32 accumulation:
  # the error is one bf16 rounding of the output, not M roundings.
  tile, r, m, h = 8, 32, 64, 16
  sizes = jnp.array([16, 16], jnp.int32)
  k1, k2 = jax.random.split(jax.random.key(1))
  lhs = jax.random.normal(k1, (r, m)).astype(jnp.bfloat16)
  rhs = jax.random.normal(k2, (2, m, h)).astype(jnp.bfloat16)
  fn = functools.partial(pallas.gmm, group_sizes_E=sizes, tile=tile,
                         backend=backend)
  out, (d_lhs, d_rhs) = jax.jit(lambda a, b: (fn(a, b), jax.grad(
      lambda a, b: fn(a, b).astype(jnp.float32).sum(), argnums=(0, 1))(
          a, b)))(lhs, rhs)
  assert out.dtype == d_lhs.dtype == d_rhs.dtype == jnp.bfloat16
  exact = jax.lax.ragged_dot(lhs.astype(jnp.float32), rhs.astype(jnp.float32),
                             sizes)
  np.testing.assert_allclose(out.astype(jnp.float32), exact,
                             rtol=2 ** -7, atol=1e-2)
  # d_rhs[e] of sum(out) = column sums of e's rows, broadcast over H.
  np.testing.assert_allclose(
      d_rhs[0].astype(jnp.float32),
      np.broadcast_to(np.asarray(lhs[:16], np.float32).sum(0)[:, None],
                      (m, h)), rtol=2 ** -7, atol=5e-2)


def _value_and_grads3(gmm_fn):
  def loss(lhs, rhs, sizes):
    out = gmm_fn(lhs, rhs, sizes).astype(jnp.float32)
    return jnp.sum(jnp.sin(out) * jnp.arange(out.shape[1]))
  return jax.jit(lambda lhs, rhs, sizes: (gmm_fn(lhs, rhs, sizes), jax.grad(
      loss, argnums=(0, 1))(lhs, rhs, sizes)))


@functools.lru_cache(maxsize=None)
def _ragged_programs(backend, tile):
  fast = _value_and_grads3(lambda a, b, s: pallas.ragged_dot(
      a, b, s, tile=tile, backend=backend))
  ref = _value_and_grads3(jax.lax.ragged_dot)
  return fast, ref


T_RAGGED, E_RAGGED, M_RAGGED, H_RAGGED, TILE_RAGGED = 13, 4, 5, 6, 4


def _fit(sizes, total):
  """Clips sizes left to right so that they sum to at most `total`."""
  out = []
  for s in sizes:
    out.append(min(s, total - sum(out)))
  return out


@hypothesis.settings(max_examples=12)
@hypothesis.given(st.lists(st.integers(0, T_RAGGED), min_size=E_RAGGED,
                           max_size=E_RAGGED).map(
                               lambda s: _fit(s, T_RAGGED)))
@hypothesis.example([0, 5, 0, 3])       # empty groups, 5 rows unused
@hypothesis.example([13, 0, 0, 0])      # one group takes everything
@hypothesis.example([0, 0, 0, 0])       # nothing routed
def test_ragged_dot_any_group_sizes(sizes):
  """Any sizes (empty groups, sizes not multiples of the tile, a sum short of
  T) give jax.lax.ragged_dot's values and gradients."""
  # (T=13, M=5, H=6, E=4, tile=4); only the sizes change between examples.
  fast, ref = _ragged_programs("triton_interpret", TILE_RAGGED)
  k1, k2 = jax.random.split(jax.random.key(2))
  lhs = jax.random.normal(k1, (T_RAGGED, M_RAGGED))
  rhs = jax.random.normal(k2, (E_RAGGED, M_RAGGED, H_RAGGED))
  s = jnp.array(sizes, jnp.int32)
  (out, grads), (out_ref, grads_ref) = fast(lhs, rhs, s), ref(lhs, rhs, s)
  np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-5)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-4)


@hypothesis.settings(max_examples=10)
@hypothesis.given(st.lists(st.integers(0, 9), min_size=3, max_size=3))
@hypothesis.example([0, 0, 0])          # no rows: every block unused
@hypothesis.example([9, 0, 1])          # empty middle group
@hypothesis.example([0, 0, 5])          # only the last group
def test_tile_aligned_sizes_from_ragged_ones(raw_sizes):
  """Raw sizes (any, incl. 0) rounded up to the tile, through the mosaic
  kernel's tgmm path (revisited output blocks, unvisited empty groups)."""
  # (R=36, M=6, H=7, E=3, tile=4): 36 rows hold the worst case 3 * 12.
  tile, r = 4, 36
  padded = jnp.array([-(-s // tile) * tile for s in raw_sizes], jnp.int32)
  fast, ref = _aligned_programs(tile)
  k1, k2 = jax.random.split(jax.random.key(3))
  # Zero the padding rows of every group, as the dropless layout does.
  real = np.zeros((r,), bool)
  start = 0
  for s, p in zip(raw_sizes, np.asarray(padded)):
    real[start:start + s] = True
    start += int(p)
  lhs = jax.random.normal(k1, (r, 6)) * real[:, None]
  rhs = jax.random.normal(k2, (3, 6, 7))
  (out, grads), (out_ref, grads_ref) = (fast(lhs, rhs, padded),
                                        ref(lhs, rhs, padded))
  np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-5)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-4)


@functools.lru_cache(maxsize=None)
def _aligned_programs(tile):
  fast = _value_and_grads3(lambda a, b, s: pallas.gmm(
      a, b, s, tile=tile, backend="mosaic_interpret"))
  ref = _value_and_grads3(lambda a, b, s: xla_gmm.gmm(a, b, s, tile=tile))
  return fast, ref


def test_tgmm_matches_per_group_products():
  # (R=12, M=3, H=2, E=3, tile=4): groups [4, 0, 8].
  sizes = jnp.array([4, 0, 8], jnp.int32)
  k1, k2 = jax.random.split(jax.random.key(4))
  lhs = jax.random.normal(k1, (12, 3))
  dout = jax.random.normal(k2, (12, 2))
  want = np.stack([lhs[:4].T @ dout[:4], np.zeros((3, 2)),
                   lhs[4:].T @ dout[4:]])
  # (The mosaic tgmm runs in every mosaic gradient test above.)
  for backend in ("triton_interpret", "xla"):
    got = jax.jit(functools.partial(pallas.tgmm, tile=4, backend=backend))(
        lhs, dout, sizes)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_auto_on_cpu_is_the_xla_path():
  assert backend_lib.resolve_backend("auto") == backend_lib.Backend("xla")
  sizes = jnp.array([4, 4], jnp.int32)
  lhs = jnp.arange(24.).reshape(8, 3)
  rhs = jnp.arange(12.).reshape(2, 3, 2)
  np.testing.assert_array_equal(
      pallas.gmm(lhs, rhs, sizes, tile=4),
      xla_gmm.gmm(lhs, rhs, sizes, tile=4))
  np.testing.assert_array_equal(
      pallas.ragged_dot(lhs, rhs, sizes),
      jax.lax.ragged_dot(lhs, rhs, sizes))


def test_errors():
  lhs, rhs = jnp.zeros((6, 3)), jnp.zeros((2, 3, 2))
  sizes = jnp.array([4, 0], jnp.int32)
  with pytest.raises(ValueError, match="multiple of tile"):
    pallas.gmm(lhs, rhs, sizes, tile=4, backend="triton_interpret")
  with pytest.raises(ValueError, match="unknown Pallas backend"):
    pallas.gmm(lhs[:4], rhs, sizes, tile=4, backend="cuda")
  with pytest.raises(ValueError, match="M must match"):
    pallas.gmm(jnp.zeros((4, 5)), rhs, sizes, tile=4,
               backend="triton_interpret")
  # Real (not interpreted) kernels check their hardware constraints before
  # lowering, so this fails the same way with or without a GPU.
  with pytest.raises(ValueError, match="multiple of 16"):
    pallas.gmm(lhs[:4], rhs, sizes, tile=4, backend="triton")


def test_block_rules():
  pick = backend_lib.pick_block
  assert pick(14336, 128, "triton") == (128, 14336)
  assert pick(7168, 1024, "triton") == (1024, 7168)
  assert pick(12, 128, "triton") == (16, 16)          # padded
  assert pick(200, 128, "triton") == (128, 256)       # 8 | 200: padded
  assert pick(768, 512, "mosaic") == (384, 768)
  assert pick(300, 512, "mosaic") == (300, 300)       # full dim
  assert pick(1000, 512, "mosaic") == (512, 1024)
