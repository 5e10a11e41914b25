"""Tests for moejax.routing.losses: hand-computed cases and properties."""

import math

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing
from moejax.routing import losses

# Jitted entry points: one XLA compile per shape instead of one per primitive
# keeps the tests fast on a shared CPU (test_eager_matches_jit covers eager).
_lbl = jax.jit(routing.load_balancing_loss)
_sbl = jax.jit(routing.sequence_balance_loss,
               static_argnames=("sequence_length",))
_zl = jax.jit(routing.router_z_loss)
_il = jax.jit(routing.importance_loss)
_ll = jax.jit(routing.load_loss)
_token_choice = jax.jit(routing.token_choice,
                        static_argnames=("k", "capacity"))
_plan_losses = jax.jit(routing.plan_losses)
_assign = jax.jit(routing.assign_slots, static_argnames=("capacity",))


@jax.jit
def _all_losses(logits, probs, index, mask):
  return (routing.load_balancing_loss(probs, index, mask),
          routing.sequence_balance_loss(probs, index, mask),
          routing.router_z_loss(logits, mask),
          routing.importance_loss(probs, mask),
          routing.load_loss(probs, mask))

# (G=1, S=4, E=2, K=1)
PROBS_1_4_2 = np.array([[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]],
                       np.float32)
INDEX_1_4_1 = np.array([[[0], [0], [1], [0]]], np.int32)


def numpy_load_balancing_loss(probs, index, mask=None):
  """Straightforward loop version of the Switch loss, per group then mean."""
  g, s, e = probs.shape
  k = index.shape[-1]
  if mask is None:
    mask = np.ones((g, s), bool)
  group_losses = []
  for gi in range(g):
    t = int(mask[gi].sum())
    if t == 0:
      continue
    count = np.zeros(e)
    prob_sum = np.zeros(e)
    for si in range(s):
      if not mask[gi, si]:
        continue
      for ki in range(k):
        if 0 <= index[gi, si, ki] < e:
          count[index[gi, si, ki]] += 1
      prob_sum += probs[gi, si]
    f = count / (t * k)
    p = prob_sum / t
    group_losses.append(e * float(np.sum(f * p)))
  return float(np.mean(group_losses)) if group_losses else 0.0


def _random_routing(seed, g, s, e, k):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(g, s, e)).astype(np.float32)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  index = np.stack([rng.permutation(e)[:k] for _ in range(g * s)]).reshape(
      g, s, k).astype(np.int32)
  return logits, probs, index


# ------------------------------------------------------- hand-computed


def test_load_balancing_hand_case():
  # (G=1, S=4, E=2, K=1): f = [3/4, 1/4], P = [0.65, 0.35]
  # loss = 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
  loss = _lbl(PROBS_1_4_2, INDEX_1_4_1)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  np.testing.assert_allclose(loss, 1.15, rtol=1e-6)


def test_load_balancing_hand_case_padding():
  # (G=1, S=4, E=2, K=1), last token padded: T = 3, f = [2/3, 1/3],
  # P = [2/3, 1/3]; loss = 2 * (4/9 + 1/9) = 10/9.
  mask = np.array([[True, True, True, False]])
  loss = _lbl(PROBS_1_4_2, INDEX_1_4_1, mask)
  np.testing.assert_allclose(loss, 10 / 9, rtol=1e-6)


def test_load_balancing_hand_case_k2():
  # (G=1, S=2, E=3, K=2): counts = [1, 2, 1], f = counts / 4,
  # P = [0.3, 0.45, 0.25]; loss = 3 * (0.075 + 0.225 + 0.0625) = 1.0875.
  probs = np.array([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]], np.float32)
  index = np.array([[[0, 1], [1, 2]]], np.int32)
  np.testing.assert_allclose(_lbl(probs, index), 1.0875, rtol=1e-6)
  # (G=1, S=2, E=3, K=2) with the sentinel E=3 in place of token 0's second
  # choice: counts = [1, 1, 1] over the same T*K = 4; loss = 3 * 0.25 = 0.75.
  index = np.array([[[0, 3], [1, 2]]], np.int32)
  np.testing.assert_allclose(_lbl(probs, index), 0.75, rtol=1e-6)


def test_load_balancing_mean_over_groups():
  # (G=2, S=2, E=2, K=1): group 0 all on expert 0 with prob 1 -> loss 2;
  # group 1 uniform -> loss 1; mean 1.5.
  probs = np.array([[[1.0, 0.0], [1.0, 0.0]],
                    [[0.5, 0.5], [0.5, 0.5]]], np.float32)
  index = np.array([[[0], [0]], [[0], [1]]], np.int32)
  np.testing.assert_allclose(_lbl(probs, index), 1.5, rtol=1e-6)
  # A group with no real token is left out of the mean: 2.
  mask = np.array([[True, True], [False, False]])
  np.testing.assert_allclose(_lbl(probs, index, mask), 2.0, rtol=1e-6)
  # No real token at all: 0.
  np.testing.assert_allclose(_lbl(probs, index, np.zeros((2, 2), bool)), 0.0)


def test_load_balancing_gradient_flows_through_probs_only():
  # (G=1, S=4, E=2, K=1): d/dp[s, e] = E * f_e / T = 2 * f_e / 4.
  grad_fn = jax.jit(jax.grad(routing.load_balancing_loss))
  grad = grad_fn(jnp.asarray(PROBS_1_4_2), INDEX_1_4_1)
  expected = np.broadcast_to(np.array([0.75, 0.25]) * 2 / 4, (1, 4, 2))
  np.testing.assert_allclose(grad, expected, rtol=1e-6)


def test_sequence_balance_hand_case():
  # (G=1, S=4, E=2, K=1) split into two sequences of L=2:
  # seq 0: f = 2/(1*2) * [2, 0] = [2, 0], P = [0.85, 0.15] -> 1.7
  # seq 1: f = [1, 1], P = [0.45, 0.55] -> 1.0;   mean 1.35.
  np.testing.assert_allclose(
      _sbl(PROBS_1_4_2, INDEX_1_4_1, sequence_length=2), 1.35, rtol=1e-6)
  # One sequence per group: the same value as load_balancing_loss (1.15).
  np.testing.assert_allclose(
      _sbl(PROBS_1_4_2, INDEX_1_4_1), 1.15, rtol=1e-6)
  # Second sequence fully padded: only seq 0 counts.
  mask = np.array([[True, True, False, False]])
  np.testing.assert_allclose(
      _sbl(PROBS_1_4_2, INDEX_1_4_1, mask, sequence_length=2), 1.7,
      rtol=1e-6)


def test_router_z_loss_hand_case():
  # (G=1, S=2, E=2): lse([0, 0]) = ln 2, lse([0, ln 3]) = ln 4 = 2 ln 2;
  # mean of squares = (1 + 4) / 2 * (ln 2)^2.
  logits = np.array([[[0.0, 0.0], [0.0, math.log(3.0)]]], np.float32)
  ln2sq = math.log(2.0) ** 2
  np.testing.assert_allclose(_zl(logits), 2.5 * ln2sq, rtol=1e-6)
  np.testing.assert_allclose(_zl(logits, np.array([[True, False]])), ln2sq,
                             rtol=1e-6)


def test_router_z_loss_ignores_nonfinite_padding():
  # (G=1, S=2, E=2): a padded token holding NaN/inf changes neither the value
  # nor the gradient.
  logits = jnp.array([[[0.0, 0.0], [jnp.nan, jnp.inf]]], jnp.float32)
  mask = np.array([[True, False]])
  value_and_grad = jax.jit(jax.value_and_grad(routing.router_z_loss))
  value, grad = value_and_grad(logits, mask)
  np.testing.assert_allclose(value, math.log(2.0) ** 2, rtol=1e-6)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[0, 1], [0.0, 0.0])


def test_importance_loss_hand_case():
  # (G=1, S=2, E=2): importance = [1.0, 0.5], mean 0.75, population
  # variance 0.0625, CV^2 = 0.0625 / 0.5625 = 1/9.
  gates = np.array([[[0.75, 0.25], [0.25, 0.25]]], np.float32)
  np.testing.assert_allclose(_il(gates), 1 / 9, rtol=1e-5)
  # Padding the second token: importance = [0.75, 0.25], mean 0.5,
  # variance 0.0625, CV^2 = 0.25.
  np.testing.assert_allclose(_il(gates, np.array([[True, False]])), 0.25,
                             rtol=1e-5)


def test_importance_loss_sums_over_groups():
  # (G=2, S=1, E=2): importance over the batch = [1, 1] -> 0, although each
  # group alone is imbalanced.
  gates = np.array([[[1.0, 0.0]], [[0.0, 1.0]]], np.float32)
  np.testing.assert_allclose(_il(gates), 0.0, atol=1e-7)


def test_load_loss_hand_case():
  # (G=1, S=3, E=3): load = [1.5, 0.0, 0.0], mean 0.5, variance
  # (1 + 0.25 + 0.25) / 3 = 0.5, CV^2 = 2.
  load_probability = np.array(
      [[[1.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]], np.float32)
  np.testing.assert_allclose(_ll(load_probability), 2.0, rtol=1e-5)
  # One expert: CV^2 is 0.
  np.testing.assert_allclose(_ll(np.ones((1, 3, 1), np.float32)), 0.0,
                             atol=1e-7)


def test_plan_losses_token_choice():
  # (G=1, S=4, E=2, K=1, C=2): the plan's load balance is the function's.
  plan = _assign(INDEX_1_4_1, np.ones((1, 4, 1), np.float32), PROBS_1_4_2,
                 capacity=2)
  logits = np.zeros((1, 4, 2), np.float32)  # lse = ln 2 everywhere
  out = _plan_losses(plan, logits)
  assert isinstance(out, routing.RoutingLosses)
  np.testing.assert_allclose(out.load_balance, 1.15, rtol=1e-6)
  np.testing.assert_allclose(out.z_loss, math.log(2.0) ** 2, rtol=1e-6)
  # Without logits the z-loss is 0.
  np.testing.assert_allclose(_plan_losses(plan).z_loss, 0.0)


def test_plan_losses_expert_choice_and_padding():
  # (G=1, S=3, E=2, C=2) expert-choice-like plan (slot view only): load
  # balance 0 by construction; z-loss over the two real tokens only.
  probs = np.full((1, 3, 2), 0.5, np.float32)
  plan = routing.RoutingPlan(
      probs_GSE=probs, token_GEC=np.array([[[0, 1], [1, 3]]], np.int32),
      weight_GEC=np.full((1, 2, 2), 0.5, np.float32),
      padding_mask_GS=np.array([[True, True, False]]), num_experts=2,
      capacity=2)
  logits = np.array([[[0.0, 0.0], [0.0, math.log(3.0)], [50.0, 50.0]]],
                    np.float32)
  out = _plan_losses(plan, logits)
  np.testing.assert_allclose(out.load_balance, 0.0)
  np.testing.assert_allclose(out.z_loss, 2.5 * math.log(2.0) ** 2, rtol=1e-6)


def test_plan_losses_jit_and_stack():
  # (G=2, S=4, E=3, K=2, C=2)
  logits, _, _ = _random_routing(0, 2, 4, 3, 2)
  plan = _token_choice(logits, k=2, capacity=2)
  out = _plan_losses(plan, logits)
  np.testing.assert_allclose(out.load_balance,
                             _lbl(plan.probs_GSE, plan.expert_GSK), rtol=1e-6)
  np.testing.assert_allclose(out.z_loss, _zl(logits), rtol=1e-6)
  stacked = jax.tree.map(lambda *x: jnp.stack(x), out, out)
  assert stacked.load_balance.shape == (2,)


# ------------------------------------------------------------ errors


def test_errors_name_the_value():
  probs = np.full((1, 2, 2), 0.5, np.float32)
  index = np.zeros((1, 2, 1), np.int32)
  with pytest.raises(ValueError, match="probs_GSE must have rank 3"):
    routing.load_balancing_loss(probs[0], index)
  with pytest.raises(ValueError, match="expert_index_GSK must have shape"):
    routing.load_balancing_loss(probs, np.zeros((1, 3, 1), np.int32))
  with pytest.raises(ValueError, match="expert_index_GSK must have rank 3"):
    routing.load_balancing_loss(probs, np.zeros((1, 2), np.int32))
  with pytest.raises(ValueError, match="expert_index_GSK must be an integer"):
    routing.load_balancing_loss(probs, index.astype(np.float32))
  with pytest.raises(ValueError, match="padding_mask_GS must have shape"):
    routing.load_balancing_loss(probs, index, np.ones((2, 1), bool))
  with pytest.raises(ValueError, match="logits_GSE must have rank 3"):
    routing.router_z_loss(np.zeros((2, 2), np.float32))
  with pytest.raises(ValueError, match="gates_GSE must have rank 3"):
    routing.importance_loss(np.zeros((2,), np.float32))
  with pytest.raises(ValueError, match="load_probability_GSE"):
    routing.load_loss(np.zeros((1, 2, 2, 1), np.float32))
  with pytest.raises(ValueError, match="sequence_length"):
    routing.sequence_balance_loss(probs, index, sequence_length=3)
  with pytest.raises(ValueError, match="plan must be a RoutingPlan"):
    routing.plan_losses({"probs_GSE": probs})
  plan = routing.RoutingPlan(probs_GSE=probs, expert_GSK=index,
                             num_experts=2, capacity=None)
  with pytest.raises(ValueError, match="logits_GSE must have the plan's shape"):
    routing.plan_losses(plan, np.zeros((1, 2, 3), np.float32))
  with pytest.raises(ValueError, match="num_experts"):
    routing.expert_counts(index, 0)


def test_expert_counts_hand_case():
  # (G=1, S=3, E=2, K=2): sentinel 2 and -1 count for nothing, token 2 padded.
  index = np.array([[[0, 1], [1, 2], [0, -1]]], np.int32)
  counts = routing.expert_counts(index, 2, np.array([[True, True, False]]))
  np.testing.assert_array_equal(counts, [[1.0, 2.0]])


# -------------------------------------------------------- properties

# A few fixed (G, S, E, K) shapes and jitted functions keep compiles few: the
# properties draw the data, not the shapes.
SHAPES = st.sampled_from([(1, 4, 2, 1), (2, 5, 4, 3)])


@hypothesis.given(SHAPES, st.integers(0, 2**31 - 1))
def test_load_balancing_matches_numpy_loop(shape, seed):
  g, s, e, k = shape
  _, probs, index = _random_routing(seed, g, s, e, k)
  rng = np.random.default_rng(seed + 1)
  mask = rng.random((g, s)) < 0.7
  # Sprinkle sentinels (E) in some assignments.
  index = np.where(rng.random(index.shape) < 0.2, e, index).astype(np.int32)
  np.testing.assert_allclose(
      _lbl(probs, index, mask),
      numpy_load_balancing_loss(probs, index, mask), rtol=1e-5, atol=1e-6)


@hypothesis.given(st.sampled_from([(1, 1, 1, 1), (1, 2, 3, 2), (2, 2, 4, 3)]),
                  st.integers(0, 2**31 - 1))
def test_uniform_routing_gives_one(shape, seed):
  # Balanced choices (every expert gets exactly T*K/E assignments) give 1
  # whatever the probabilities; uniform probabilities give 1 whatever the
  # (real) choices.
  g, m, e, k = shape
  s = m * e
  _, probs, random_index = _random_routing(seed, g, s, e, k)
  s_idx = np.arange(s)[:, None]
  balanced = np.broadcast_to((s_idx + np.arange(k)[None, :]) % e,
                             (g, s, k)).astype(np.int32)
  uniform = np.full((g, s, e), 1.0 / e, np.float32)
  for fn in (_lbl, _sbl):
    np.testing.assert_allclose(fn(probs, balanced), 1.0, rtol=1e-6)
    np.testing.assert_allclose(fn(uniform, random_index), 1.0, rtol=1e-6)
    np.testing.assert_allclose(fn(uniform, balanced), 1.0, rtol=1e-6)
  np.testing.assert_allclose(_il(uniform), 0.0, atol=1e-6)
  np.testing.assert_allclose(_ll(uniform), 0.0, atol=1e-6)


@hypothesis.given(SHAPES, st.integers(0, 2**31 - 1))
def test_padding_invariance(shape, seed):
  # Appending padded tokens (holding garbage) changes no loss.
  g, s, e, k = shape
  pad = 2
  logits, probs, index = _random_routing(seed, g, s, e, k)
  rng = np.random.default_rng(seed + 2)
  mask = rng.random((g, s)) < 0.8
  garbage = rng.normal(size=(g, pad, e)).astype(np.float32) * 100
  logits_p = np.concatenate([logits, garbage], axis=1)
  probs_p = np.concatenate([probs, np.abs(garbage)], axis=1)
  index_p = np.concatenate(
      [index, rng.integers(0, e, (g, pad, k)).astype(np.int32)], axis=1)
  mask_p = np.concatenate([mask, np.zeros((g, pad), bool)], axis=1)
  for unpadded, padded in zip(
      _all_losses(logits, probs, index, mask),
      _all_losses(logits_p, probs_p, index_p, mask_p)):
    np.testing.assert_allclose(padded, unpadded, rtol=1e-5, atol=1e-6)
  # And a plan built with the padding mask gives the same plan losses.
  cap = max(1, s * k // e)
  plan = _token_choice(logits, k=k, capacity=cap, padding_mask_GS=mask)
  plan_p = _token_choice(logits_p, k=k, capacity=cap, padding_mask_GS=mask_p)
  out, out_p = _plan_losses(plan, logits), _plan_losses(plan_p, logits_p)
  np.testing.assert_allclose(out_p.load_balance, out.load_balance, rtol=1e-5)
  np.testing.assert_allclose(out_p.z_loss, out.z_loss, rtol=1e-5)


def test_eager_matches_jit():
  # (G=1, S=4, E=2, K=1): the un-jitted functions give the same values.
  mask = np.array([[True, True, True, False]])
  np.testing.assert_allclose(
      routing.load_balancing_loss(PROBS_1_4_2, INDEX_1_4_1, mask), 10 / 9,
      rtol=1e-6)
  np.testing.assert_allclose(routing.router_z_loss(PROBS_1_4_2, mask),
                             _zl(PROBS_1_4_2, mask), rtol=1e-6)


def test_losses_module_exports():
  for name in ("load_balancing_loss", "router_z_loss", "importance_loss",
               "load_loss", "sequence_balance_loss", "plan_losses",
               "RoutingLosses", "expert_counts"):
    assert getattr(routing, name) is getattr(losses, name)
