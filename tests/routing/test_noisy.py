"""Tests for moejax.routing.noisy (Shazeer et al. 2017 noisy top-k)."""

import importlib
import math

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing
from moejax.routing import noisy

tc = importlib.import_module("moejax.routing.token_choice")

_noisy_top_k = jax.jit(noisy.noisy_top_k,
                       static_argnames=("k", "capacity", "train"))
_noisy_logits = jax.jit(noisy.noisy_logits, static_argnames=("train",))
_token_choice = jax.jit(tc.token_choice,
                        static_argnames=("k", "capacity", "gating"))
_load_probability = jax.jit(noisy.load_probability, static_argnames=("k",))


def _key(seed):
  # rbg keys compile far faster on CPU than the default threefry; the code
  # under test is agnostic to the key implementation.
  return jax.random.key(seed, impl="rbg")


def _phi(z):
  return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _softplus(x):
  return np.log1p(np.exp(x))


def test_noisy_logits_eval_is_clean():
  # (G=1, S=2, E=3)
  clean = jnp.array([[[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]])
  noise = jnp.array([[[0.0, 1.0, -1.0], [2.0, -3.0, 0.3]]])
  out, std = noisy.noisy_logits(clean, noise, None, False)
  np.testing.assert_array_equal(out, clean)
  np.testing.assert_allclose(std, _softplus(np.asarray(noise)), rtol=1e-6)
  assert out.dtype == std.dtype == jnp.float32


def test_noisy_logits_train_adds_scaled_standard_normal():
  # (G=4, S=256, E=8): (noisy - clean) / std should be N(0, 1).
  rs = np.random.RandomState(0)
  clean = jnp.asarray(rs.randn(4, 256, 8), jnp.float32)
  noise = jnp.asarray(rs.randn(4, 256, 8), jnp.float32)
  rng = _key(1)
  out, std = _noisy_logits(clean, noise, rng, True)
  z = np.asarray((out - clean) / std)
  assert abs(z.mean()) < 0.05
  assert abs(z.std() - 1.0) < 0.05
  # Same key, same noise; other key, other noise.
  again, _ = _noisy_logits(clean, noise, rng, True)
  np.testing.assert_array_equal(out, again)
  other, _ = _noisy_logits(clean, noise, _key(2), True)
  assert not np.allclose(out, other)


def test_hand_computed_top_k_softmax():
  # (G=1, S=1, E=3, K=2, dropless): keep logits [ln 3, 0], softmax ->
  # [3/4, 1/4].
  clean = jnp.array([[[np.log(3.0), 0.0, -5.0]]])
  plan = _noisy_top_k(clean, jnp.zeros_like(clean), k=2, capacity=None,
                      rng=None, train=False)
  np.testing.assert_array_equal(plan.expert_GSK[0, 0], [0, 1])
  np.testing.assert_allclose(plan.weight_GSK[0, 0], [0.75, 0.25], rtol=1e-6)
  np.testing.assert_allclose(noisy.top_k_gates(clean, 2)[0, 0],
                             [0.75, 0.25, 0.0], rtol=1e-6)
  # probs_GSE (for losses) is the softmax over all E.
  full = np.exp(np.asarray(clean[0, 0]))
  np.testing.assert_allclose(plan.probs_GSE[0, 0], full / full.sum(),
                             rtol=1e-6)


# Each k compiles twice; the two edge values keep the test fast.
@hypothesis.given(k=st.sampled_from([1, 4]), seed=st.integers(0, 2**31 - 1))
def test_eval_equals_plain_top_k(k, seed):
  # (G=2, S=6, E=4, dropless)
  rs = np.random.RandomState(seed)
  clean = jnp.asarray(rs.randn(2, 6, 4), jnp.float32)
  noise_logits = jnp.asarray(rs.randn(2, 6, 4) + 3.0, jnp.float32)
  mask = jnp.asarray(rs.rand(2, 6) < 0.8)
  got = _noisy_top_k(clean, noise_logits, k=k, capacity=None, rng=None,
                     train=False, padding_mask_GS=mask)
  want = _token_choice(clean, k=k, capacity=None, gating="topk_softmax",
                       padding_mask_GS=mask)
  np.testing.assert_array_equal(got.expert_GSK, want.expert_GSK)
  np.testing.assert_allclose(got.weight_GSK, want.weight_GSK, rtol=1e-6)
  np.testing.assert_allclose(got.probs_GSE, want.probs_GSE, rtol=1e-6)


def test_eval_equals_plain_top_k_with_capacity():
  # (G=2, S=6, E=4, K=2, C=3): slots and drops agree too.
  rs = np.random.RandomState(5)
  clean = jnp.asarray(rs.randn(2, 6, 4), jnp.float32)
  mask = jnp.asarray(rs.rand(2, 6) < 0.8)
  got = _noisy_top_k(clean, clean + 3.0, k=2, capacity=3, rng=None,
                     train=False, padding_mask_GS=mask)
  want = _token_choice(clean, k=2, capacity=3, gating="topk_softmax",
                       padding_mask_GS=mask)
  for name in ("expert_GSK", "slot_GSK", "token_GEC"):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
  np.testing.assert_allclose(got.weight_GSK, want.weight_GSK, rtol=1e-6)


def test_train_routes_on_noisy_logits():
  # (G=2, S=8, E=4, K=2, dropless): the plan is the top-k (softmax over
  # the kept k) of the same noise that noisy_logits draws with the same key.
  rs = np.random.RandomState(3)
  clean = jnp.asarray(rs.randn(2, 8, 4) * 0.1, jnp.float32)
  noise_logits = jnp.asarray(rs.randn(2, 8, 4) + 1.0, jnp.float32)
  rng = _key(7)
  got = _noisy_top_k(clean, noise_logits, k=2, capacity=None, rng=rng,
                     train=True)
  noisy_l, _ = _noisy_logits(clean, noise_logits, rng, True)
  noisy_l = np.asarray(noisy_l)
  want_e = np.argsort(-noisy_l, axis=-1, kind="stable")[..., :2]
  np.testing.assert_array_equal(got.expert_GSK, want_e)
  kept = np.take_along_axis(noisy_l, want_e, axis=-1)
  want_w = np.exp(kept) / np.exp(kept).sum(-1, keepdims=True)
  np.testing.assert_allclose(got.weight_GSK, want_w, rtol=1e-5)
  p = np.exp(noisy_l) / np.exp(noisy_l).sum(-1, keepdims=True)
  np.testing.assert_allclose(got.probs_GSE, p, rtol=1e-5)
  # The noise (std ~1.3 against logit spreads ~0.1) changes the routing.
  clean_e = np.argsort(-np.asarray(clean), axis=-1, kind="stable")[..., :2]
  assert not np.array_equal(want_e, clean_e)


def _numpy_load_probability(clean, noisy_l, std, k):
  out = np.zeros_like(clean, dtype=np.float64)
  for idx in np.ndindex(clean.shape[:-1]):
    for i in range(clean.shape[-1]):
      others = np.delete(noisy_l[idx], i)
      kth = np.sort(others)[::-1][k - 1]
      out[idx + (i,)] = _phi((clean[idx + (i,)] - kth) / std[idx + (i,)])
  return out


@hypothesis.given(k=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_load_probability_matches_numpy(k, seed):
  # (G=2, S=3, E=4)
  rs = np.random.RandomState(seed)
  clean = rs.randn(2, 3, 4).astype(np.float32)
  std = _softplus(rs.randn(2, 3, 4)).astype(np.float32)
  noisy_l = (clean + rs.randn(2, 3, 4) * std).astype(np.float32)
  got = _load_probability(jnp.asarray(clean), jnp.asarray(noisy_l),
                          jnp.asarray(std), k=k)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _numpy_load_probability(clean, noisy_l, std,
                                                          k),
                             rtol=1e-5, atol=1e-6)


def test_load_probability_is_resampling_probability():
  # (G=1, S=1, E=5, K=2): P(x, i) is the chance that expert i is in the top
  # k when only its own noise is redrawn; check by Monte Carlo.
  rs = np.random.RandomState(0)
  clean = np.array([0.3, -0.2, 0.1, 0.0, -0.5])
  std = np.array([0.5, 1.0, 0.2, 0.8, 1.5])
  noisy_l = clean + rs.randn(5) * std
  got = np.asarray(noisy.load_probability(
      jnp.asarray(clean[None, None], jnp.float32),
      jnp.asarray(noisy_l[None, None], jnp.float32),
      jnp.asarray(std[None, None], jnp.float32), 2))[0, 0]
  n = 20000
  for i in range(5):
    resampled = np.repeat(noisy_l[None], n, axis=0)
    resampled[:, i] = clean[i] + rs.randn(n) * std[i]
    in_top = (np.argsort(-resampled, axis=1)[:, :2] == i).any(axis=1)
    assert abs(in_top.mean() - got[i]) < 0.02, (i, in_top.mean(), got[i])


def test_load_probability_k_equals_e_and_gradients():
  # (G=1, S=2, E=3)
  rs = np.random.RandomState(4)
  clean = jnp.asarray(rs.randn(1, 2, 3), jnp.float32)
  noise_logits = jnp.asarray(rs.randn(1, 2, 3), jnp.float32)
  noisy_l, std = noisy.noisy_logits(clean, noise_logits, _key(0),
                                    True)
  np.testing.assert_array_equal(
      noisy.load_probability(clean, noisy_l, std, 3), 1.0)

  def load(c, nl):
    # The noise draw is held fixed; gradients reach both router matmuls.
    std = jax.nn.softplus(nl)
    return jnp.sum(noisy.load_probability(c, jax.lax.stop_gradient(noisy_l),
                                          std, 2))

  gc, gn = jax.jit(jax.grad(load, argnums=(0, 1)))(clean, noise_logits)
  assert np.isfinite(np.asarray(gc)).all() and np.isfinite(np.asarray(gn)).all()
  assert (np.asarray(gc) > 0).all()   # higher clean logit -> more load
  assert np.abs(np.asarray(gn)).sum() > 0


def test_exported():
  assert routing.noisy_top_k is noisy.noisy_top_k
  assert routing.noisy_logits is noisy.noisy_logits
  assert routing.load_probability is noisy.load_probability
  assert routing.top_k_gates is noisy.top_k_gates


_Z = jnp.zeros((1, 4, 3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(clean_logits_GSE=jnp.zeros((4, 3))), "rank 3"),
    (dict(noise_logits_GSE=jnp.zeros((1, 4, 2))), "noise_logits_GSE"),
    (dict(k=0), "k must"),
    (dict(k=4), "k must"),
    (dict(capacity=0), "capacity"),
    (dict(train="yes"), "train"),
    (dict(train=True, rng=None), "rng"),
    (dict(padding_mask_GS=jnp.ones((1, 5), bool)), "padding_mask_GS"),
])
def test_errors(kwargs, match):
  args = dict(clean_logits_GSE=_Z, noise_logits_GSE=_Z, k=2, capacity=2,
              rng=None, train=False)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    noisy.noisy_top_k(**args)


def test_load_probability_errors():
  with pytest.raises(ValueError, match="noise_std_GSE"):
    noisy.load_probability(_Z, _Z, jnp.zeros((1, 4, 2)), 1)
  with pytest.raises(ValueError, match="k must"):
    noisy.load_probability(_Z, _Z, _Z, 4)
  with pytest.raises(ValueError, match="k must"):
    noisy.top_k_gates(_Z, 0)
