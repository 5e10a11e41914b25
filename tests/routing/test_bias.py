"""Tests for moejax.routing.bias (DeepSeek aux-free bias, group-limited)."""

import importlib
import itertools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing
from moejax.routing import bias as bias_lib

# The package re-exports the function under the module's name.
ec = importlib.import_module("moejax.routing.expert_choice")
tc = importlib.import_module("moejax.routing.token_choice")

_STATIC = ("k", "capacity", "gating", "num_expert_groups", "topk_groups",
           "routed_scaling_factor", "renormalize")
_route = jax.jit(bias_lib.aux_free_bias_route, static_argnames=_STATIC)
_token_choice = jax.jit(tc.token_choice, static_argnames=(
    "k", "capacity", "gating", "renormalize"))
_expert_choice = jax.jit(ec.expert_choice, static_argnames=("capacity",))


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def test_bias_changes_selection_not_weights():
  # (G=1, S=1, E=4, K=2, dropless)
  logits = jnp.array([[[2.0, 1.0, 0.0, -1.0]]])
  plain = _route(logits, jnp.zeros(4), k=2, capacity=None)
  biased = _route(logits, jnp.array([0.0, 0.0, 0.0, 3.0]), k=2, capacity=None)
  np.testing.assert_array_equal(plain.expert_GSK[0, 0], [0, 1])
  # Selection scores sigmoid + bias: [.88, .73, .5, .27 + 3] -> experts 3, 0.
  np.testing.assert_array_equal(biased.expert_GSK[0, 0], [3, 0])
  s = _sigmoid(np.array([2.0, 1.0, 0.0, -1.0]))
  np.testing.assert_allclose(plain.weight_GSK[0, 0],
                             [s[0] / (s[0] + s[1]), s[1] / (s[0] + s[1])],
                             rtol=1e-6)
  # The weights come from the unbiased sigmoids of the chosen experts.
  np.testing.assert_allclose(biased.weight_GSK[0, 0],
                             [s[3] / (s[3] + s[0]), s[0] / (s[3] + s[0])],
                             rtol=1e-6)
  # probs for losses do not see the bias either.
  np.testing.assert_allclose(plain.probs_GSE, biased.probs_GSE)
  # Unnormalised and scaled.
  raw = _route(logits, jnp.array([0.0, 0.0, 0.0, 3.0]), k=2, capacity=None,
               renormalize=False, routed_scaling_factor=2.5)
  np.testing.assert_allclose(raw.weight_GSK[0, 0], 2.5 * s[[3, 0]], rtol=1e-6)


def test_bias_has_no_gradient_and_weights_do():
  # (G=1, S=2, E=3, K=1, C=2)
  logits = jnp.array([[[1.0, 0.5, -1.0], [0.0, 2.0, 1.0]]])

  def total(lg, b):
    return jnp.sum(bias_lib.aux_free_bias_route(
        lg, b, k=1, capacity=2, renormalize=False).weight_GSK)

  g_logits, g_bias = jax.jit(jax.grad(total, argnums=(0, 1)))(
      logits, jnp.array([0.0, 0.0, 5.0]))
  np.testing.assert_array_equal(g_bias, 0.0)
  # Both tokens pick expert 2 (bias 5); d sigmoid(l) / dl at l = -1 and 1.
  d = lambda x: _sigmoid(x) * (1 - _sigmoid(x))  # noqa: E731
  np.testing.assert_allclose(g_logits, [[[0, 0, d(-1.0)], [0, 0, d(1.0)]]],
                             rtol=1e-5)


def test_zero_bias_one_group_equals_token_choice():
  # (G=2, S=5, E=4, K=2, C=3)
  logits = jnp.asarray(np.random.RandomState(0).randn(2, 5, 4), jnp.float32)
  a = _route(logits, jnp.zeros(4), k=2, capacity=3)
  b = _token_choice(logits, k=2, capacity=3, gating="sigmoid",
                     renormalize=True)
  np.testing.assert_array_equal(a.expert_GSK, b.expert_GSK)
  np.testing.assert_array_equal(a.slot_GSK, b.slot_GSK)
  np.testing.assert_allclose(a.weight_GSK, b.weight_GSK, rtol=1e-6)


def test_group_limited_hand_computed():
  # (G=1, S=1, E=6, K=2); 3 groups of 2: {0,1}, {2,3}, {4,5}. Scores
  # (sigmoid of logits, zero bias): expert 4 is the single best expert, but
  # group scores (top-2 sums) rank {2,3} and {0,1} above {4,5}.
  logits = jnp.array([[[1.0, 1.0, 1.5, 1.5, 4.0, -4.0]]])
  plan = _route(logits, jnp.zeros(6), k=2, capacity=None, num_expert_groups=3,
                topk_groups=1)
  np.testing.assert_array_equal(plan.expert_GSK[0, 0], [2, 3])
  plan = _route(logits, jnp.zeros(6), k=2, capacity=None, num_expert_groups=3,
                topk_groups=2)
  np.testing.assert_array_equal(plan.expert_GSK[0, 0], [2, 3])
  plan = _route(logits, jnp.zeros(6), k=3, capacity=None, num_expert_groups=3,
                topk_groups=2)
  np.testing.assert_array_equal(plan.expert_GSK[0, 0], [2, 3, 0])
  # Without group limits expert 4 wins.
  plan = _route(logits, jnp.zeros(6), k=2, capacity=None)
  np.testing.assert_array_equal(plan.expert_GSK[0, 0], [4, 2])


_GROUP_CONFIGS = [  # (E, num_expert_groups, topk_groups, k)
    (8, 4, 2, 2), (8, 4, 1, 2), (6, 3, 2, 3), (8, 8, 3, 2), (4, 2, 1, 1)]


@hypothesis.given(config=st.sampled_from(_GROUP_CONFIGS),
                  seed=st.integers(0, 2**31 - 1))
def test_group_limited_matches_brute_force(config, seed):
  e, n, t, k = config
  per = e // n
  rs = np.random.RandomState(seed)
  logits = rs.randn(2, 3, e).astype(np.float32) * 2
  bias = rs.randn(e).astype(np.float32)
  plan = _route(jnp.asarray(logits), jnp.asarray(bias), k=k, capacity=None,
                num_expert_groups=n, topk_groups=t)
  experts = np.asarray(plan.expert_GSK)
  sel = _sigmoid(logits.astype(np.float64)) + bias
  for gi, si in itertools.product(range(2), range(3)):
    row = sel[gi, si]
    group_score = [np.sum(np.sort(row[j * per:(j + 1) * per])[::-1][:2])
                   for j in range(n)]
    # Brute force: the t-subset of groups with the largest summed score.
    best = max(itertools.combinations(range(n), t),
               key=lambda c: sum(group_score[j] for j in c))
    allowed = [ei for ei in range(e) if ei // per in best]
    assert set(experts[gi, si]) <= set(allowed)
    want = sorted(allowed, key=lambda ei: -row[ei])[:k]
    np.testing.assert_array_equal(experts[gi, si], want)
    w = _sigmoid(logits[gi, si, want].astype(np.float64))
    np.testing.assert_allclose(plan.weight_GSK[gi, si], w / w.sum(),
                               rtol=1e-5)


def test_group_limited_scores_masks_with_minus_inf():
  # (G=1, S=1, E=4); 2 groups; group {2,3} wins.
  scores = jnp.array([[[0.1, 0.2, 0.3, 0.4]]])
  out = bias_lib.group_limited_scores(scores, num_expert_groups=2,
                                      topk_groups=1)
  np.testing.assert_array_equal(
      out, np.array([[[-np.inf, -np.inf, 0.3, 0.4]]], np.float32))


def test_update_bias_hand_computed():
  # E=4, mean load 4: overloaded expert 0 down, underloaded 1 and 3 up,
  # expert 2 (at the mean) unchanged.
  bias = jnp.array([0.5, 0.0, -0.5, 0.0])
  new = bias_lib.update_bias(bias, jnp.array([10.0, 2.0, 4.0, 0.0]), rate=0.1)
  np.testing.assert_allclose(new, [0.4, 0.1, -0.5, 0.1], rtol=1e-6)
  assert new.dtype == jnp.float32


def test_update_bias_loop_balances_skewed_router():
  # (G=4, S=16, E=4, K=1, dropless): the router favours expert 0; repeated
  # aux-free updates move the bias toward the underloaded experts until the
  # load evens out, without touching the logits.
  rs = np.random.RandomState(0)
  logits = jnp.asarray(rs.randn(4, 16, 4) * 0.5 + np.array([1.5, 0, 0, -0.5]),
                       jnp.float32)

  @jax.jit
  def step(b):
    plan = bias_lib.aux_free_bias_route(logits, b, k=1, capacity=None)
    load = bias_lib.expert_load_counts(plan)
    return bias_lib.update_bias(b, load, rate=0.02), load

  b = jnp.zeros(4)
  _, first_load = step(b)
  for _ in range(60):
    b, load = step(b)
  first_load, load = np.asarray(first_load), np.asarray(load)
  assert first_load.max() - first_load.min() > 30
  assert load.max() - load.min() < first_load.max() - first_load.min()
  assert load.max() <= 24   # S*G/E = 16
  b = np.asarray(b)
  assert b[0] < 0 < b[3]


def test_expert_load_counts():
  # (G=1, S=3, E=2, K=1, C=1): all three tokens pick expert 0; two drop.
  logits = jnp.array([[[3.0, 0.0], [2.0, 0.0], [1.0, 0.0]]])
  plan = _token_choice(logits, k=1, capacity=1)
  np.testing.assert_array_equal(bias_lib.expert_load_counts(plan), [3.0, 0.0])
  np.testing.assert_array_equal(
      bias_lib.expert_load_counts(plan, include_dropped=False), [1.0, 0.0])
  # Padding is never counted.
  plan = _token_choice(logits, k=1, capacity=1,
                       padding_mask_GS=jnp.array([[True, False, True]]))
  np.testing.assert_array_equal(bias_lib.expert_load_counts(plan), [2.0, 0.0])
  # Expert choice (slot view only): filled slots.
  # (G=1, S=3, E=2, C=2) with token 2 padded: each expert fills 2 slots.
  plan = _expert_choice(logits, capacity=2,
                        padding_mask_GS=jnp.array([[True, True, False]]))
  np.testing.assert_array_equal(bias_lib.expert_load_counts(plan), [2.0, 2.0])


def test_exported():
  assert routing.aux_free_bias_route is bias_lib.aux_free_bias_route
  assert routing.update_bias is bias_lib.update_bias
  assert routing.expert_load_counts is bias_lib.expert_load_counts


@pytest.mark.parametrize("kwargs, match", [
    (dict(logits_GSE=jnp.zeros((4, 6))), "rank 3"),
    (dict(k=0), "k must"),
    (dict(k=7), "k must"),
    (dict(capacity=0), "capacity"),
    (dict(gating="relu"), "gating"),
    (dict(num_expert_groups=4), "divisible by num_expert_groups.*4"),
    (dict(num_expert_groups=0), "num_expert_groups"),
    (dict(num_expert_groups=3, topk_groups=4), "topk_groups.*4"),
    (dict(num_expert_groups=3, topk_groups=0), "topk_groups"),
    (dict(num_expert_groups=3, topk_groups=1, k=3), "kept groups.*2.*k=3"),
    (dict(bias_E=jnp.zeros((5,))), "bias_E"),
    (dict(bias_E=jnp.zeros((1, 6))), "bias_E"),
    (dict(padding_mask_GS=jnp.ones((1, 3), bool)), "padding_mask_GS"),
])
def test_errors(kwargs, match):
  args = dict(logits_GSE=jnp.zeros((1, 4, 6)), bias_E=jnp.zeros(6), k=2,
              capacity=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    bias_lib.aux_free_bias_route(**args)


def test_update_bias_errors():
  with pytest.raises(ValueError, match="bias_E must have rank 1"):
    bias_lib.update_bias(jnp.zeros((2, 2)), jnp.zeros((2, 2)), rate=0.1)
  with pytest.raises(ValueError, match="expert_load_E"):
    bias_lib.update_bias(jnp.zeros(3), jnp.zeros(4), rate=0.1)
  with pytest.raises(ValueError, match="rate"):
    bias_lib.update_bias(jnp.zeros(3), jnp.zeros(3), rate=-0.1)
