"""Tests for moejax.routing.hash (Hash Layers)."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing
from moejax.routing import hash as hash_lib


# One compiled router per static configuration (eager dispatch is slow).
_route = jax.jit(hash_lib.hash_routing,
                 static_argnames=("num_experts", "capacity", "k", "seed"))


def _py_mix32(x):
  """Pure-Python lowbias32 reference."""
  m = 0xFFFFFFFF
  x &= m
  x ^= x >> 16
  x = (x * 0x7FEB352D) & m
  x ^= x >> 15
  x = (x * 0x846CA68B) & m
  x ^= x >> 16
  return x


def test_mix32_matches_python_reference():
  xs = [0, 1, 2, 12345, 0x7FFFFFFF, 0xFFFFFFFF, 0xDEADBEEF]
  got = hash_lib.mix32(jnp.array(xs, jnp.uint32))
  assert got.dtype == jnp.uint32
  np.testing.assert_array_equal(np.asarray(got),
                                np.array([_py_mix32(x) for x in xs], np.uint32))


def test_hash_scores_match_python_reference():
  # (G=1, S=3, E=4): scores re-derived with Python integers.
  ids = [0, 7, 123456]
  e, seed = 4, 3
  got = np.asarray(hash_lib.hash_scores(jnp.array([ids], jnp.int32), e, seed))
  seed_key = _py_mix32(seed ^ 0x5BD1E995)
  for s, t in enumerate(ids):
    id_key = _py_mix32(t ^ seed_key)
    for ei in range(e):
      want = _py_mix32(id_key ^ (((ei + 1) * 0x9E3779B9) & 0xFFFFFFFF))
      assert int(got[0, s, ei]) == want


def test_same_id_same_experts_everywhere():
  # (G=3, S=4, E=6, K=2): id 11 appears at different groups and positions.
  ids = jnp.array([[11, 3, 11, 5], [2, 11, 9, 9], [11, 11, 11, 11]])
  plan = _route(ids, 6, capacity=None, k=2)
  experts = np.asarray(plan.expert_GSK)
  ref = experts[0, 0]
  for g, s in zip(*np.nonzero(np.asarray(ids) == 11)):
    np.testing.assert_array_equal(experts[g, s], ref)
  np.testing.assert_array_equal(experts[1, 2], experts[1, 3])


def test_deterministic_and_jit_equal():
  # (G=2, S=8, E=5, K=2, C=3)
  ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) * 37
  # A separately traced and compiled router.
  a = jax.jit(lambda i: hash_lib.hash_routing(i, 5, capacity=3, k=2))(ids)
  b = _route(ids, num_experts=5, capacity=3, k=2)
  c = _route(ids + 0, num_experts=5, capacity=3, k=2)
  for x in (b, c):
    np.testing.assert_array_equal(a.expert_GSK, x.expert_GSK)
    np.testing.assert_array_equal(a.slot_GSK, x.slot_GSK)
    np.testing.assert_array_equal(a.token_GEC, x.token_GEC)


def test_probs_only_stored_never_used_for_selection():
  # (G=1, S=6, E=4, K=1, C=6); selection must not depend on router probs.
  ids = jnp.array([[4, 8, 15, 16, 23, 42]])
  plain = _route(ids, 4, capacity=6)
  np.testing.assert_allclose(plain.probs_GSE, 0.25)
  probs = jax.nn.softmax(
      jnp.asarray(np.random.RandomState(0).randn(1, 6, 4) * 10), axis=-1)
  with_probs = _route(ids, 4, capacity=6, probs_GSE=probs)
  np.testing.assert_array_equal(plain.expert_GSK, with_probs.expert_GSK)
  np.testing.assert_array_equal(plain.weight_GSK, with_probs.weight_GSK)
  np.testing.assert_allclose(with_probs.probs_GSE, probs, rtol=1e-6)
  assert with_probs.probs_GSE.dtype == jnp.float32


def test_capacity_drops_later_tokens_and_weights_are_one():
  # (G=1, S=3, E=4, K=1, C=2): one id three times -> one expert, the third
  # occurrence is dropped whatever that expert is.
  plan = _route(jnp.array([[9, 9, 9]]), 4, capacity=2)
  e = int(plan.expert_GSK[0, 0, 0])
  np.testing.assert_array_equal(plan.expert_GSK[0, :, 0], [e, e, e])
  np.testing.assert_array_equal(plan.slot_GSK[0, :, 0], [0, 1, 2])
  np.testing.assert_array_equal(plan.weight_GSK[0, :, 0], [1.0, 1.0, 0.0])
  np.testing.assert_array_equal(plan.token_GEC[0, e], [0, 1])
  np.testing.assert_array_equal(plan.weight_GEC[0, e], [1.0, 1.0])


def test_padding_takes_no_slot():
  # (G=1, S=3, E=4, K=1, C=2); the first occurrence is padding.
  mask = jnp.array([[False, True, True]])
  plan = _route(jnp.array([[9, 9, 9]]), 4, capacity=2,
                               padding_mask_GS=mask)
  e = int(plan.expert_GSK[0, 1, 0])
  np.testing.assert_array_equal(plan.expert_GSK[0, :, 0], [4, e, e])
  np.testing.assert_array_equal(plan.slot_GSK[0, 1:, 0], [0, 1])
  np.testing.assert_array_equal(plan.weight_GSK[0, :, 0], [0.0, 1.0, 1.0])
  np.testing.assert_array_equal(plan.token_GEC[0, e], [1, 2])


@hypothesis.given(e=st.sampled_from([1, 3, 8]), data=st.data())
def test_k_distinct_experts(e, data):
  k = data.draw(st.sampled_from(sorted({1, 2 if e > 1 else 1, e})), label="k")
  seed = data.draw(st.integers(0, 1000), label="seed")
  ids = jnp.asarray(
      np.random.RandomState(seed).randint(-1000, 50000, size=(2, 16)),
      jnp.int32)
  experts = np.asarray(hash_lib.hash_experts(ids, e, k=k, seed=seed))
  assert experts.shape == (2, 16, k)
  assert ((experts >= 0) & (experts < e)).all()
  for row in experts.reshape(-1, k):
    assert len(set(row.tolist())) == k


def test_roughly_uniform_over_experts():
  # 4096 distinct ids over E=8: each expert expects 512 (std ~21).
  ids = jnp.arange(4096, dtype=jnp.int32).reshape(4, 1024)
  for k in (1, 3):
    experts = np.asarray(hash_lib.hash_experts(ids, 8, k=k))
    counts = np.bincount(experts.reshape(-1), minlength=8)
    assert counts.sum() == 4096 * k
    assert np.all(np.abs(counts - 512 * k) < 100 * k), counts
    # Choice j is itself uniform, not just the union.
    first = np.bincount(experts[..., 0].reshape(-1), minlength=8)
    assert np.all(np.abs(first - 512) < 100), first


def test_seeds_give_different_hashes():
  ids = jnp.arange(256, dtype=jnp.int32)[None, :]
  a = np.asarray(hash_lib.hash_experts(ids, 8, seed=0))
  b = np.asarray(hash_lib.hash_experts(ids, 8, seed=1))
  # Independent hashes agree on about 1/8 of the ids.
  assert 0.03 < np.mean(a == b) < 0.25


def test_exported():
  assert routing.hash_routing is hash_lib.hash_routing
  assert routing.hash_experts is hash_lib.hash_experts


@pytest.mark.parametrize("args, kwargs, match", [
    ((jnp.zeros((4,), jnp.int32), 4), dict(capacity=1), "rank 2"),
    ((jnp.zeros((1, 4), jnp.float32), 4), dict(capacity=1), "integer dtype"),
    ((jnp.zeros((1, 4), jnp.int32), 0), dict(capacity=1), "num_experts"),
    ((jnp.zeros((1, 4), jnp.int32), 4), dict(capacity=1, k=5), "k must"),
    ((jnp.zeros((1, 4), jnp.int32), 4), dict(capacity=1, k=0), "k must"),
    ((jnp.zeros((1, 4), jnp.int32), 4), dict(capacity=0), "capacity"),
    ((jnp.zeros((1, 4), jnp.int32), 4),
     dict(capacity=1, probs_GSE=jnp.ones((1, 4, 3))), "probs_GSE"),
    ((jnp.zeros((1, 4), jnp.int32), 4),
     dict(capacity=1, padding_mask_GS=jnp.ones((4,), bool)), "padding_mask"),
    ((jnp.zeros((1, 4), jnp.int32), 4), dict(capacity=1, seed=0.5), "seed"),
])
def test_errors(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    hash_lib.hash_routing(*args, **kwargs)
