"""Tests for moejax.routing.metrics: hand-computed cases and properties."""

import math

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing


# Jitted entry points: one XLA compile per plan structure instead of one per
# primitive, which keeps the tests fast on a shared CPU.
_metrics = jax.jit(routing.routing_metrics)
_assign = jax.jit(routing.assign_slots, static_argnames=("capacity",))
_token_choice = jax.jit(routing.token_choice,
                        static_argnames=("k", "capacity", "batch_prioritized"))


def assert_metrics(m, *, load, dropped, entropy, max_over_mean, ecf, coverage):
  np.testing.assert_allclose(m.expert_load_E, load, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(m.dropped_fraction, dropped, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(m.router_entropy, entropy, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(m.max_over_mean_load, max_over_mean, rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_allclose(m.effective_capacity_factor, ecf, rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_allclose(m.coverage_3, coverage, rtol=1e-6, atol=1e-7)


def slot_only_plan(token_GEC, probs_GSE, mask_GS=None):
  """An expert-choice-like plan: slot view only (no token view)."""
  token_GEC = np.asarray(token_GEC, np.int32)
  probs_GSE = np.asarray(probs_GSE, np.float32)
  g, s, e = probs_GSE.shape
  probs_X = np.concatenate([probs_GSE, np.zeros((g, 1, e), np.float32)], 1)
  weight_GEC = np.take_along_axis(
      np.swapaxes(probs_X, 1, 2), np.minimum(token_GEC, s), axis=2)
  return routing.RoutingPlan(
      probs_GSE=probs_GSE, token_GEC=token_GEC, weight_GEC=weight_GEC,
      padding_mask_GS=mask_GS, num_experts=e, capacity=token_GEC.shape[-1])


def numpy_expert_choice(probs, capacity, mask, num_slots_sentinel):
  """Each expert takes its top-C real tokens (ties: lower index first)."""
  g, s, e = probs.shape
  token = np.full((g, e, capacity), num_slots_sentinel, np.int32)
  for gi in range(g):
    for ei in range(e):
      real = [t for t in range(s) if mask[gi, t]]
      real.sort(key=lambda t: -probs[gi, t, ei])
      chosen = real[:capacity]
      token[gi, ei, :len(chosen)] = chosen
  return token


# ------------------------------------------------------- hand-computed


def test_token_choice_hand_case():
  # (G=1, S=4, E=2, K=1, C=2): choices [0, 0, 0, 1]; token 2 is expert 0's
  # third claim and is dropped.
  probs = np.array([[[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]],
                   np.float32)
  index = np.array([[[0], [0], [0], [1]]], np.int32)
  plan = _assign(index, np.ones((1, 4, 1), np.float32), probs,
                              capacity=2)
  m = _metrics(plan)
  assert isinstance(m, routing.RoutingMetrics)
  # kept [2, 1] -> load [2/3, 1/3]; 1 of 4 assignments dropped; entropy is
  # ln 2 for token 2 only; demand [3, 1] over share 4*1/2 = 2 -> 1.5.
  assert_metrics(m, load=[2 / 3, 1 / 3], dropped=0.25,
                 entropy=math.log(2.0) / 4, max_over_mean=4 / 3, ecf=1.5,
                 coverage=[0.25, 0.75, 0.0])
  for leaf in jax.tree.leaves(m):
    assert leaf.dtype == jnp.float32


def test_token_choice_k2_hand_case():
  # (G=1, S=3, E=3, K=2, C=1), uniform probs. Choice-major slot claims:
  # 1st choices t0->e0 (kept), t1->e0 (dropped), t2->e1 (kept); 2nd choices
  # t0->e1 (dropped), t1->e2 (kept), t2->e2 (dropped).
  probs = np.full((1, 3, 3), 1 / 3, np.float32)
  index = np.array([[[0, 1], [0, 2], [1, 2]]], np.int32)
  plan = _assign(index, np.ones((1, 3, 2), np.float32), probs,
                              capacity=1)
  # Demand [2, 2, 2] over share 3*2/3 = 2 -> 1: capacity factor 1 (C = 2)
  # would have dropped nothing, although C = 1 drops half.
  assert_metrics(_metrics(plan), load=[1 / 3] * 3,
                 dropped=0.5, entropy=math.log(3.0), max_over_mean=1.0,
                 ecf=1.0, coverage=[0.0, 1.0, 0.0])


def test_token_choice_skipped_choice_is_not_dropped():
  # (G=1, S=2, E=2, K=2, C=2): token 1's 2nd choice skipped (sentinel E=2,
  # as GShard's random policy marks it): 3 real assignments, none dropped.
  probs = np.full((1, 2, 2), 0.5, np.float32)
  index = np.array([[[0, 1], [1, 2]]], np.int32)
  plan = _assign(index, np.ones((1, 2, 2), np.float32), probs,
                              capacity=2)
  # kept [1, 2] -> load [1/3, 2/3]; demand [1, 2], share 2*2/2 = 2 -> 1.
  assert_metrics(_metrics(plan), load=[1 / 3, 2 / 3],
                 dropped=0.0, entropy=math.log(2.0), max_over_mean=4 / 3,
                 ecf=1.0, coverage=[0.0, 0.5, 0.5])


def test_expert_choice_hand_cases():
  probs = np.full((1, 3, 2), 0.5, np.float32)
  # (G=1, S=3, E=2, C=2): e0 takes t1, t2; e1 takes t1 and leaves a slot
  # empty (sentinel S=3). Filled [2, 1]; t0 by 0 experts, t1 by 2, t2 by 1.
  plan = slot_only_plan([[[1, 2], [1, 3]]], probs)
  assert not plan.has_token_view
  # demand = filled [2, 1], share 3/2 -> ecf 4/3.
  assert_metrics(_metrics(plan), load=[2 / 3, 1 / 3],
                 dropped=0.0, entropy=math.log(2.0), max_over_mean=4 / 3,
                 ecf=4 / 3, coverage=[1 / 3, 1 / 3, 1 / 3])
  # (G=1, S=3, E=2, C=2): all slots filled -> balanced, ecf 1.
  plan = slot_only_plan([[[0, 1], [1, 2]]], probs)
  assert_metrics(_metrics(plan), load=[0.5, 0.5],
                 dropped=0.0, entropy=math.log(2.0), max_over_mean=1.0,
                 ecf=1.0, coverage=[0.0, 2 / 3, 1 / 3])
  # (G=1, S=3, E=2, C=2), token 2 padded: coverage over 2 real tokens.
  plan = slot_only_plan([[[0, 1], [1, 3]]], probs,
                        np.array([[True, True, False]]))
  assert_metrics(_metrics(plan), load=[2 / 3, 1 / 3],
                 dropped=0.0, entropy=math.log(2.0), max_over_mean=4 / 3,
                 ecf=4 / 3, coverage=[0.0, 0.5, 0.5])


def test_dropless_hand_cases():
  # (G=1, S=3, E=2, K=2, dropless): every token on both experts.
  probs = np.array([[[0.5, 0.5], [1.0, 0.0], [0.5, 0.5]]], np.float32)
  index = np.array([[[0, 1], [0, 1], [1, 0]]], np.int32)
  plan = _assign(index, np.ones((1, 3, 2), np.float32), probs,
                              capacity=None)
  assert not plan.has_slot_view
  assert_metrics(_metrics(plan), load=[0.5, 0.5], dropped=0.0,
                 entropy=2 * math.log(2.0) / 3, max_over_mean=1.0, ecf=1.0,
                 coverage=[0.0, 0.0, 1.0])
  # (G=2, S=2, E=2, K=1, dropless): g0 sends both tokens to e0 (demand 2,
  # share 1 -> 2), g1 is balanced (-> 1): ecf = mean(2, 1) = 1.5.
  # Load over the batch: kept [3, 1] -> [3/4, 1/4].
  probs = np.full((2, 2, 2), 0.5, np.float32)
  index = np.array([[[0], [0]], [[0], [1]]], np.int32)
  plan = _assign(index, np.ones((2, 2, 1), np.float32), probs,
                              capacity=None)
  assert_metrics(_metrics(plan), load=[0.75, 0.25],
                 dropped=0.0, entropy=math.log(2.0), max_over_mean=1.5,
                 ecf=1.5, coverage=[0.0, 1.0, 0.0])
  # Same, group 1 fully padded: only g0 counts.
  plan = _assign(index, np.ones((2, 2, 1), np.float32), probs,
                              capacity=None,
                              padding_mask_GS=np.array([[True, True],
                                                        [False, False]]))
  assert_metrics(_metrics(plan), load=[1.0, 0.0],
                 dropped=0.0, entropy=math.log(2.0), max_over_mean=2.0,
                 ecf=2.0, coverage=[0.0, 1.0, 0.0])


def test_all_padding_gives_zeros():
  # (G=1, S=2, E=2, K=1, C=1), no real token: every field is 0.
  probs = np.full((1, 2, 2), 0.5, np.float32)
  plan = _assign(np.zeros((1, 2, 1), np.int32),
                              np.ones((1, 2, 1), np.float32), probs,
                              capacity=1,
                              padding_mask_GS=np.zeros((1, 2), bool))
  assert_metrics(_metrics(plan), load=[0.0, 0.0], dropped=0.0,
                 entropy=0.0, max_over_mean=0.0, ecf=0.0,
                 coverage=[0.0, 0.0, 0.0])


def test_padded_slots_in_slot_view_are_ignored():
  # (G=1, S=2, E=2, C=1): a slot-only plan that (against the contract) puts
  # padded token 1 in expert 1's slot: it counts for nothing.
  probs = np.full((1, 2, 2), 0.5, np.float32)
  plan = slot_only_plan([[[0], [1]]], probs, np.array([[True, False]]))
  m = _metrics(plan)
  np.testing.assert_allclose(m.expert_load_E, [1.0, 0.0])
  np.testing.assert_allclose(m.coverage_3, [0.0, 1.0, 0.0])


def test_metrics_pytree_stack_and_jit():
  # (G=1, S=4, E=2, K=1, C=2) and (G=1, S=3, E=2, C=2): stack two layers.
  probs = np.full((1, 4, 2), 0.5, np.float32)
  plan_a = _assign(np.array([[[0], [0], [0], [1]]], np.int32),
                                np.ones((1, 4, 1), np.float32), probs,
                                capacity=2)
  plan_b = slot_only_plan([[[0, 1], [1, 2]]], np.full((1, 3, 2), 0.5))
  ma, mb = _metrics(plan_a), _metrics(plan_b)
  stacked = jax.tree.map(lambda *x: jnp.stack(x), ma, mb)
  assert isinstance(stacked, routing.RoutingMetrics)
  assert stacked.expert_load_E.shape == (2, 2)
  assert stacked.coverage_3.shape == (2, 3)
  assert stacked.dropped_fraction.shape == (2,)
  mean = jax.tree.map(lambda x: x.mean(0), stacked)
  np.testing.assert_allclose(mean.dropped_fraction, 0.125)
  np.testing.assert_allclose(mean.expert_load_E, [7 / 12, 5 / 12], rtol=1e-6)


def test_errors_name_the_value():
  probs = np.full((1, 2, 2), 0.5, np.float32)
  with pytest.raises(ValueError, match="plan must be a RoutingPlan"):
    routing.routing_metrics(probs)
  with pytest.raises(ValueError, match="neither"):
    routing.routing_metrics(routing.RoutingPlan(probs_GSE=probs,
                                                num_experts=2))
  with pytest.raises(ValueError, match="plan.num_experts must equal"):
    routing.routing_metrics(routing.RoutingPlan(
        probs_GSE=probs, expert_GSK=np.zeros((1, 2, 1), np.int32)))
  with pytest.raises(ValueError, match="plan.probs_GSE must have rank 3"):
    routing.routing_metrics(routing.RoutingPlan(
        probs_GSE=probs[0], expert_GSK=np.zeros((1, 2, 1), np.int32),
        num_experts=2))
  with pytest.raises(ValueError, match="plan.expert_GSK must have shape"):
    routing.routing_metrics(routing.RoutingPlan(
        probs_GSE=probs, expert_GSK=np.zeros((1, 3, 1), np.int32),
        num_experts=2))
  with pytest.raises(ValueError, match="plan.token_GEC must have shape"):
    routing.routing_metrics(routing.RoutingPlan(
        probs_GSE=probs, token_GEC=np.zeros((1, 3, 1), np.int32),
        num_experts=2, capacity=1))
  with pytest.raises(ValueError, match="padding_mask_GS must have shape"):
    routing.routing_metrics(routing.RoutingPlan(
        probs_GSE=probs, expert_GSK=np.zeros((1, 2, 1), np.int32),
        padding_mask_GS=np.ones((2, 2), bool), num_experts=2))


# -------------------------------------------------------- properties

# Fixed (G, S, E, K) shapes and capacities keep compiles few: the
# properties draw the data, not the shapes.
SHAPES = st.sampled_from([(1, 4, 2, 1), (2, 5, 4, 2)])


def _logits_and_mask(seed, g, s, e, p_real=0.8):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(g, s, e)).astype(np.float32)
  mask = rng.random((g, s)) < p_real
  return logits, mask


def _plans(seed, shape):
  """A token-choice, a dropless and an expert-choice-like plan, with padding.

  The capacity is S*K/E (capacity factor 1), so token choice usually drops.
  """
  g, s, e, k = shape
  logits, mask = _logits_and_mask(seed, g, s, e)
  capacity = max(1, s * k // e)
  tc = _token_choice(logits, k=k, capacity=capacity, padding_mask_GS=mask)
  dl = _token_choice(logits, k=k, capacity=None, padding_mask_GS=mask)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  ec = slot_only_plan(numpy_expert_choice(probs, capacity, mask, s), probs,
                      mask)
  return logits, mask, capacity, (tc, dl, ec)


@hypothesis.given(SHAPES, st.integers(0, 2**31 - 1))
def test_fractions_sum_to_one(shape, seed):
  _, mask, _, plans = _plans(seed, shape)
  for plan in plans:
    m = _metrics(plan)
    if mask.any():
      np.testing.assert_allclose(jnp.sum(m.coverage_3), 1.0, rtol=1e-6)
      # Every plan kind keeps something when there is a real token (token
      # choice always keeps the first claim on each expert).
      np.testing.assert_allclose(jnp.sum(m.expert_load_E), 1.0, rtol=1e-6)
      assert m.max_over_mean_load >= 1.0 - 1e-6
      assert m.effective_capacity_factor >= 1.0 - 1e-6
    assert 0.0 <= m.dropped_fraction <= 1.0
    assert 0.0 <= m.router_entropy <= math.log(shape[2]) + 1e-6


@hypothesis.given(SHAPES, st.integers(0, 2**31 - 1))
def test_no_drops_when_capacity_covers_everything(shape, seed):
  g, s, e, k = shape
  logits, mask = _logits_and_mask(seed, g, s, e)
  m = _metrics(_token_choice(logits, k=k, capacity=s * k,
                             padding_mask_GS=mask))
  np.testing.assert_allclose(m.dropped_fraction, 0.0)


@hypothesis.settings(max_examples=10)
@hypothesis.given(st.integers(0, 2**31 - 1))
def test_effective_capacity_factor_is_the_capacity_that_drops_nothing(seed):
  # (G=1, S=5, E=4, K=2): max demand D = ecf * S*K/E; capacity D drops
  # nothing, D-1 drops something.
  s, e, k = 5, 4, 2
  logits, _ = _logits_and_mask(seed, 1, s, e)
  m = _metrics(_token_choice(logits, k=k, capacity=s * k))
  demand = float(m.effective_capacity_factor) * s * k / e
  assert abs(demand - round(demand)) < 1e-4
  demand = round(demand)
  m_fit = _metrics(_token_choice(logits, k=k, capacity=demand))
  np.testing.assert_allclose(m_fit.dropped_fraction, 0.0)
  if demand > 1:
    m_tight = _metrics(_token_choice(logits, k=k, capacity=demand - 1))
    assert m_tight.dropped_fraction > 0


@hypothesis.given(SHAPES, st.integers(0, 2**31 - 1))
def test_slot_view_and_token_view_agree(shape, seed):
  _, _, _, (tc, _, _) = _plans(seed, shape)
  token_only = tc.replace(token_GEC=None, weight_GEC=None)
  m, m_tokens = _metrics(tc), _metrics(token_only)
  for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(m_tokens)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@hypothesis.given(st.integers(0, 2**31 - 1))
def test_padding_invariance(seed):
  # (G=2, S=5, E=4, K=2): appending padded tokens (with garbage logits)
  # changes no metric, for all three plan kinds.
  shape = g, s, e, k = (2, 5, 4, 2)
  pad = 2
  logits, mask, capacity, plans = _plans(seed, shape)
  bpr = bool(seed % 2)
  if bpr:  # batch-prioritized: padded tokens must not steal priority.
    plans = (_token_choice(logits, k=k, capacity=capacity,
                           padding_mask_GS=mask, batch_prioritized=True),
             ) + plans[1:]
  rng = np.random.default_rng(seed + 1)
  logits_p = np.concatenate(
      [logits, 100 * rng.normal(size=(g, pad, e)).astype(np.float32)], 1)
  mask_p = np.concatenate([mask, np.zeros((g, pad), bool)], 1)
  tc_p = _token_choice(logits_p, k=k, capacity=capacity,
                       padding_mask_GS=mask_p, batch_prioritized=bpr)
  dl_p = _token_choice(logits_p, k=k, capacity=None, padding_mask_GS=mask_p)
  probs_p = np.asarray(jax.nn.softmax(logits_p, axis=-1))
  ec_p = slot_only_plan(numpy_expert_choice(probs_p, capacity, mask_p, s + pad),
                        probs_p, mask_p)
  for plan, plan_p in zip(plans, (tc_p, dl_p, ec_p)):
    m, m_p = _metrics(plan), _metrics(plan_p)
    for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(m_p)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
