"""Tests for moejax.routing.expert_choice."""

import functools
import importlib

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing

# `moejax.routing.expert_choice` is the function (re-exported by the
# package), so fetch the module itself.
ec = importlib.import_module("moejax.routing.expert_choice")


def _softmax(x):
  z = np.exp(x - x.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def test_hand_computed_choice():
  # (G=1, S=4, E=2, C=2)
  # p(expert 0) = sigmoid(l0 - l1): t0 .881, t1 .5, t2 .269, t3 .953.
  logits = jnp.array([[[2.0, 0.0], [0.0, 0.0], [0.0, 1.0], [3.0, 0.0]]])
  plan = ec.expert_choice(logits, capacity=2)
  np.testing.assert_array_equal(plan.token_GEC, [[[3, 0], [2, 1]]])
  p0 = 1 / (1 + np.exp(-np.array([2.0, 0.0, -1.0, 3.0])))
  np.testing.assert_allclose(
      plan.weight_GEC, [[[p0[3], p0[0]], [1 - p0[2], 1 - p0[1]]]], rtol=1e-6)
  assert plan.expert_GSK is None and plan.slot_GSK is None
  assert plan.weight_GSK is None
  assert plan.capacity == 2 and plan.num_experts == 2
  assert plan.token_GEC.dtype == jnp.int32
  assert plan.weight_GEC.dtype == jnp.float32
  np.testing.assert_allclose(plan.probs_GSE, _softmax(np.asarray(logits)),
                             rtol=1e-6)
  # Dense view: token 3 sits in slot 0 of expert 0, token 1 nowhere for e=0.
  mask = np.asarray(plan.dispatch_mask())
  assert mask.shape == (1, 4, 2, 2)
  assert mask[0, 3, 0, 0] and mask[0, 0, 0, 1] and mask[0, 2, 1, 0]
  assert mask.sum() == 4


def test_padding_never_chosen():
  # (G=1, S=4, E=2, C=2); token 3 (expert 0's favourite) is padding.
  logits = jnp.array([[[2.0, 0.0], [0.0, 0.0], [0.0, 1.0], [3.0, 0.0]]])
  mask = jnp.array([[True, True, True, False]])
  plan = ec.expert_choice(logits, capacity=2, padding_mask_GS=mask)
  np.testing.assert_array_equal(plan.token_GEC, [[[0, 1], [2, 1]]])
  assert plan.padding_mask_GS is not None


def test_capacity_above_real_tokens_leaves_empty_slots():
  # (G=1, S=4, E=2, C=3); only tokens 0 and 2 are real.
  logits = jnp.array([[[2.0, 0.0], [0.0, 0.0], [0.0, 1.0], [3.0, 0.0]]])
  mask = jnp.array([[True, False, True, False]])
  plan = ec.expert_choice(logits, capacity=3, padding_mask_GS=mask)
  # Expert 0: t0 (.881) > t2 (.269); expert 1: t2 (.731) > t0 (.119).
  np.testing.assert_array_equal(plan.token_GEC, [[[0, 2, 4], [2, 0, 4]]])
  assert float(plan.weight_GEC[0, 0, 2]) == 0.0
  assert float(plan.weight_GEC[0, 1, 2]) == 0.0
  assert np.asarray(plan.combine_weights())[0, [1, 3]].sum() == 0.0


def test_ties_go_to_earlier_token():
  # (G=1, S=3, E=2, C=1): all tokens equal.
  plan = ec.expert_choice(jnp.zeros((1, 3, 2)), capacity=1)
  np.testing.assert_array_equal(plan.token_GEC, [[[0], [0]]])


def test_all_padding_group_is_empty():
  # (G=2, S=3, E=2, C=2); group 1 is all padding.
  logits = jnp.arange(12, dtype=jnp.float32).reshape(2, 3, 2) / 5.0
  mask = jnp.array([[True, True, True], [False, False, False]])
  plan = ec.expert_choice(logits, capacity=2, padding_mask_GS=mask)
  np.testing.assert_array_equal(plan.token_GEC[1], [[3, 3], [3, 3]])
  np.testing.assert_array_equal(plan.weight_GEC[1], np.zeros((2, 2)))
  assert np.all(np.asarray(plan.token_GEC[0]) < 3)


@functools.lru_cache(maxsize=None)
def _jitted(capacity):
  return jax.jit(functools.partial(ec.expert_choice, capacity=capacity))


# A few shapes (each new shape compiles), edge cases included.
_SHAPES = [(1, 1, 1), (2, 5, 3), (1, 8, 4), (3, 6, 1)]


@hypothesis.given(shape=st.sampled_from(_SHAPES), data=st.data())
def test_fills_min_capacity_real_tokens(shape, data):
  g, s, e = shape
  c = data.draw(st.sampled_from(sorted({1, (s + 1) // 2, s})),
                label="capacity")
  seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
  rs = np.random.RandomState(seed)
  # Coarse logits make ties likely, which exercises tie-breaking.
  logits = rs.randint(-2, 3, size=(g, s, e)).astype(np.float32)
  mask = rs.rand(g, s) < 0.7
  plan = _jitted(c)(jnp.asarray(logits), padding_mask_GS=jnp.asarray(mask))
  token = np.asarray(plan.token_GEC)
  weight = np.asarray(plan.weight_GEC)
  probs = _softmax(logits)
  assert token.shape == (g, e, c)
  for gi in range(g):
    n_real = int(mask[gi].sum())
    for ei in range(e):
      filled = token[gi, ei][token[gi, ei] < s]
      # Exactly min(C, real tokens) slots, filled first, never over C.
      assert len(filled) == min(c, n_real)
      np.testing.assert_array_equal(token[gi, ei, :len(filled)], filled)
      assert len(set(filled.tolist())) == len(filled)
      assert mask[gi, filled].all()
      np.testing.assert_array_equal(weight[gi, ei, len(filled):], 0.0)
      np.testing.assert_allclose(weight[gi, ei, :len(filled)],
                                 probs[gi, filled, ei], rtol=1e-6)
      # Brute force: stable descending order of the real tokens' probs.
      real = np.flatnonzero(mask[gi])
      order = real[np.argsort(-probs[gi, real, ei], kind="stable")]
      np.testing.assert_array_equal(filled, order[:len(filled)])
  # The dense view agrees with the slot view.
  assert int(np.asarray(plan.dispatch_mask()).sum()) == int((token < s).sum())


def test_gradient_flows_to_selected_probabilities():
  # (G=1, S=4, E=2, C=2)
  logits = jnp.array([[[2.0, 0.0], [0.0, 0.0], [0.0, 1.0], [3.0, 0.0]]])

  def total_weight(lg):
    return jnp.sum(ec.expert_choice(lg, capacity=2).weight_GEC)

  grad = jax.grad(total_weight)(logits)
  # Selected: (t3,e0), (t0,e0), (t2,e1), (t1,e1); with E=2,
  # d p0 / d l0 = p0 (1 - p0) and d p1 / d l0 = -p0 (1 - p0).
  p0 = 1 / (1 + np.exp(-np.array([2.0, 0.0, -1.0, 3.0])))
  d = p0 * (1 - p0)
  expected_dl0 = np.array([d[0], -d[1], -d[2], d[3]])
  np.testing.assert_allclose(grad[0, :, 0], expected_dl0, rtol=1e-5)
  np.testing.assert_allclose(grad[0, :, 1], -expected_dl0, rtol=1e-5)


def test_bfloat16_logits_give_float32_plan():
  # (G=1, S=4, E=2, C=1)
  logits = jnp.array([[[2.0, 0.0], [0.0, 0.0], [0.0, 1.0], [3.0, 0.0]]],
                     jnp.bfloat16)
  plan = ec.expert_choice(logits, capacity=1)
  assert plan.probs_GSE.dtype == jnp.float32
  assert plan.weight_GEC.dtype == jnp.float32
  np.testing.assert_array_equal(plan.token_GEC, [[[3], [2]]])


def test_expert_choice_capacity():
  assert ec.expert_choice_capacity(8, 4, 2.0) == 4   # ceil(2 * 8 / 4)
  assert ec.expert_choice_capacity(10, 4, 1.0) == 3  # ceil(2.5)
  assert ec.expert_choice_capacity(4, 2, 4.0) == 4   # 8, capped at S
  with pytest.raises(ValueError, match="capacity_factor"):
    ec.expert_choice_capacity(8, 4, 0.0)


def test_exported():
  assert routing.expert_choice is ec.expert_choice
  assert routing.expert_choice_capacity is ec.expert_choice_capacity


@pytest.mark.parametrize("kwargs, match", [
    (dict(logits_GSE=jnp.zeros((4, 2)), capacity=1), "rank 3"),
    (dict(logits_GSE=jnp.zeros((1, 4, 2)), capacity=0), "capacity"),
    (dict(logits_GSE=jnp.zeros((1, 4, 2)), capacity=True), "capacity"),
    (dict(logits_GSE=jnp.zeros((1, 4, 2)), capacity=None), "capacity"),
    (dict(logits_GSE=jnp.zeros((1, 4, 2)), capacity=2.0), "capacity"),
    (dict(logits_GSE=jnp.zeros((1, 4, 2)), capacity=5), "S=4.*capacity=5"),
    (dict(logits_GSE=jnp.zeros((1, 4, 2)), capacity=2,
          padding_mask_GS=jnp.ones((1, 3), bool)), "padding_mask_GS"),
])
def test_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ec.expert_choice(**kwargs)


def test_errors_raise_at_trace_time():
  with pytest.raises(ValueError, match="capacity=9"):
    jax.jit(functools.partial(ec.expert_choice, capacity=9)).lower(
        jnp.zeros((1, 4, 2)))
