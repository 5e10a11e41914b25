"""Tests for moejax.routing.balanced (BASE / S-BASE)."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing
from moejax.routing import balanced


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


_sinkhorn = jax.jit(balanced.sinkhorn, static_argnames=("num_iters",))
_route = jax.jit(balanced.balanced_assignment,
                 static_argnames=("capacity", "train", "num_iters", "gating"))


def test_sinkhorn_two_by_two_hand_computed():
  # (G=1, S=2, E=2): K = exp(scores) = [[9, 1], [1, 1]]. The doubly
  # stochastic scaling is [[p, 1-p], [1-p, p]] with (p / (1-p))^2 =
  # K00 K11 / (K01 K10) = 9, so p = 3/4.
  scores = jnp.array([[[2 * np.log(3.0), 0.0], [0.0, 0.0]]])
  plan = _sinkhorn(scores, num_iters=30)
  np.testing.assert_allclose(plan, [[[0.75, 0.25], [0.25, 0.75]]], atol=1e-5)


@hypothesis.given(seed=st.integers(0, 2**31 - 1), skew=st.floats(0.0, 4.0))
def test_sinkhorn_marginals(seed, skew):
  # (G=2, S=16, E=4)
  rs = np.random.RandomState(seed)
  scores = rs.randn(2, 16, 4) + skew * np.array([1.0, 0.0, 0.0, -1.0])
  plan = np.asarray(_sinkhorn(jnp.asarray(scores, jnp.float32), num_iters=60))
  assert (plan >= 0).all()
  # Ends on a column step: exact uniform expert marginals S/E ...
  np.testing.assert_allclose(plan.sum(1), 4.0, rtol=1e-4)
  # ... and every token carries (almost) mass 1.
  np.testing.assert_allclose(plan.sum(2), 1.0, atol=2e-3)


@hypothesis.given(seed=st.integers(0, 2**31 - 1))
def test_sinkhorn_ignores_row_and_column_offsets(seed):
  # (G=1, S=6, E=3): adding a constant per token or per expert to the
  # scores rescales rows/columns, which Sinkhorn undoes.
  rs = np.random.RandomState(seed)
  scores = rs.randn(1, 6, 3)
  shifted = scores + rs.randn(1, 6, 1) * 3 + rs.randn(1, 1, 3) * 3
  a = _sinkhorn(jnp.asarray(scores, jnp.float32), num_iters=60)
  b = _sinkhorn(jnp.asarray(shifted, jnp.float32), num_iters=60)
  np.testing.assert_allclose(a, b, atol=1e-3)


def test_sinkhorn_padding():
  # (G=2, S=4, E=2); group 0 has 2 real tokens, group 1 none.
  rs = np.random.RandomState(0)
  scores = jnp.asarray(rs.randn(2, 4, 2), jnp.float32)
  mask = jnp.array([[True, False, True, False], [False] * 4])
  plan = np.asarray(_sinkhorn(scores, num_iters=40, padding_mask_GS=mask))
  assert np.isfinite(plan).all()
  np.testing.assert_array_equal(plan[0, [1, 3]], 0.0)
  np.testing.assert_array_equal(plan[1], 0.0)
  # 2 real tokens over 2 experts: each column carries 1.
  np.testing.assert_allclose(plan[0].sum(0), 1.0, rtol=1e-5)
  np.testing.assert_allclose(plan[0].sum(1)[[0, 2]], 1.0, atol=1e-3)
  # Same as balancing the real tokens alone.
  alone = _sinkhorn(scores[:1, ::2], num_iters=40)
  np.testing.assert_allclose(plan[:1, ::2], alone, rtol=1e-5)


def test_train_balances_eval_does_not_hand_computed():
  # (G=1, S=2, E=2, C=1): both tokens prefer expert 0, token 1 more so
  # (margins 1 and 3). Balanced: [[p, 1-p], [1-p, p]] with
  # (p/(1-p))^2 = e^(2+0) / e^(1+3), p < 1/2: token 0 -> e1, token 1 -> e0.
  logits = jnp.array([[[2.0, 1.0], [3.0, 0.0]]])
  train = _route(logits, capacity=1, train=True)
  np.testing.assert_array_equal(train.expert_GSK[0, :, 0], [1, 0])
  np.testing.assert_array_equal(train.slot_GSK[0, :, 0], [0, 0])
  np.testing.assert_allclose(train.weight_GSK[0, :, 0],
                             _sigmoid(np.array([1.0, 3.0])), rtol=1e-6)
  # Eval: plain top-1; token 1 overflows expert 0 and is dropped.
  ev = _route(logits, capacity=1, train=False)
  np.testing.assert_array_equal(ev.expert_GSK[0, :, 0], [0, 0])
  np.testing.assert_array_equal(ev.slot_GSK[0, :, 0], [0, 1])
  np.testing.assert_allclose(ev.weight_GSK[0, :, 0], [_sigmoid(2.0), 0.0],
                             rtol=1e-6)
  # Softmax gating: the weight is the softmax probability.
  sm = _route(logits, capacity=1, train=True, gating="softmax")
  np.testing.assert_allclose(sm.weight_GSK[0, :, 0],
                             [_sigmoid(-1.0), _sigmoid(3.0)], rtol=1e-6)


def test_gradient_reaches_router_only_through_weight():
  # (G=1, S=2, E=2, C=1): d weight / d logits is sigmoid' at the chosen
  # expert and nothing flows through the Sinkhorn selection.
  logits = jnp.array([[[2.0, 1.0], [3.0, 0.0]]])
  grad = jax.jit(jax.grad(lambda lg: jnp.sum(
      balanced.balanced_assignment(lg, capacity=1, train=True).weight_GSK)))(
          logits)
  d = lambda x: _sigmoid(x) * (1 - _sigmoid(x))  # noqa: E731
  np.testing.assert_allclose(grad, [[[0.0, d(1.0)], [d(3.0), 0.0]]],
                             rtol=1e-5)


@hypothesis.given(seed=st.integers(0, 2**31 - 1))
def test_train_spreads_tokens_more_evenly_than_top1(seed):
  # (G=2, S=32, E=4, dropless): logits skewed toward expert 0.
  rs = np.random.RandomState(seed)
  logits = jnp.asarray(
      rs.randn(2, 32, 4) + np.array([2.5, 0.0, 0.0, -1.0]), jnp.float32)

  def load(plan):
    return np.stack([np.bincount(np.asarray(plan.expert_GSK[g, :, 0]),
                                 minlength=4) for g in range(2)])

  train_load = load(_route(logits, capacity=None, train=True))
  eval_load = load(_route(logits, capacity=None, train=False))
  # Top-1 of the entropic plan is only near-balanced (S/E = 8; over 200
  # seeds the train max load was 9..13 and eval's 27..32).
  assert train_load.max() < eval_load.max()
  assert train_load.max() <= 14
  assert train_load.min() >= 3


def test_padding_takes_no_slot():
  # (G=1, S=4, E=2, C=2); tokens 1 and 2 are padding.
  logits = jnp.array([[[2.0, 1.0], [9.0, 0.0], [9.0, 0.0], [3.0, 0.0]]])
  mask = jnp.array([[True, False, False, True]])
  plan = _route(logits, capacity=2, train=True, padding_mask_GS=mask)
  np.testing.assert_array_equal(plan.expert_GSK[0, :, 0], [1, 2, 2, 0])
  np.testing.assert_array_equal(plan.weight_GSK[0, [1, 2], 0], 0.0)


def test_exported():
  assert routing.sinkhorn is balanced.sinkhorn
  assert routing.balanced_assignment is balanced.balanced_assignment


@pytest.mark.parametrize("kwargs, match", [
    (dict(logits_GSE=jnp.zeros((4, 2))), "rank 3"),
    (dict(num_iters=0), "num_iters"),
    (dict(num_iters=2.5), "num_iters"),
    (dict(gating="topk_softmax"), "gating"),
    (dict(train=None), "train"),
    (dict(train=1), "train"),
    (dict(capacity=0), "capacity"),
    (dict(padding_mask_GS=jnp.ones((1, 3), bool)), "padding_mask_GS"),
])
def test_errors(kwargs, match):
  args = dict(logits_GSE=jnp.zeros((1, 4, 2)), capacity=2, train=True)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    balanced.balanced_assignment(**args)


def test_sinkhorn_errors():
  with pytest.raises(ValueError, match="scores_GSE must have rank 3"):
    balanced.sinkhorn(jnp.zeros((3, 2)), 5)
  with pytest.raises(ValueError, match="num_iters"):
    balanced.sinkhorn(jnp.zeros((1, 3, 2)), 0)
