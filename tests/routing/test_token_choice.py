"""Token-choice routing: hand-computed cases, the loop oracle, invariants."""

import chex
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing
from moejax.layers import reference


def _logits(rows):
  return jnp.log(jnp.asarray(rows, jnp.float32))[None]  # probs -> logits


def test_choice_major_priority_and_overflow():
  # (G=1, S=3, E=2, K=2, C=2). Probabilities per token:
  #   t0 [.7, .3]  t1 [.6, .4]  t2 [.2, .8]
  # 1st choices: t0->e0 slot0, t1->e0 slot1, t2->e1 slot0.
  # 2nd choices: t0->e1 slot1, t1->e1 dropped (full), t2->e0 dropped (full).
  plan = routing.token_choice(_logits([[.7, .3], [.6, .4], [.2, .8]]), k=2,
                              capacity=2)
  np.testing.assert_array_equal(plan.expert_GSK[0], [[0, 1], [0, 1], [1, 0]])
  np.testing.assert_array_equal(plan.slot_GSK[0], [[0, 1], [1, 2], [0, 2]])
  np.testing.assert_allclose(plan.weight_GSK[0], [[.7, .3], [.6, 0], [.8, 0]],
                             rtol=1e-6)
  np.testing.assert_array_equal(plan.token_GEC[0], [[0, 1], [2, 0]])
  mask = np.asarray(plan.dispatch_mask()[0])  # [S, E, C]
  assert mask.sum() == 4
  assert mask[0, 0, 0] and mask[1, 0, 1] and mask[2, 1, 0] and mask[0, 1, 1]
  cw = np.asarray(plan.combine_weights()[0])
  np.testing.assert_allclose(cw[0, 1, 1], .3, rtol=1e-6)


def test_batch_prioritized_routing():
  # (G=1, S=3, E=2, K=1, C=1). All pick e0; top-1 probs .6, .9, .7.
  # Token order: t0 keeps the slot. BPR: t1 (0.9) keeps it.
  logits = _logits([[.6, .4], [.9, .1], [.7, .3]])
  plain = routing.token_choice(logits, k=1, capacity=1)
  bpr = routing.token_choice(logits, k=1, capacity=1, batch_prioritized=True)
  np.testing.assert_array_equal(plain.slot_GSK[0, :, 0], [0, 1, 1])
  np.testing.assert_array_equal(bpr.slot_GSK[0, :, 0], [1, 0, 1])
  np.testing.assert_allclose(bpr.weight_GSK[0, :, 0], [0, .9, 0], rtol=1e-6)


def test_padding_takes_no_slot():
  # (G=1, S=3, E=2, K=1, C=1). t0 is padding, so t1 gets e0's only slot.
  logits = _logits([[.9, .1], [.8, .2], [.3, .7]])
  plan = routing.token_choice(logits, k=1, capacity=1,
                              padding_mask_GS=jnp.array([[False, True, True]]))
  np.testing.assert_array_equal(plan.expert_GSK[0, :, 0], [2, 0, 1])
  np.testing.assert_array_equal(plan.slot_GSK[0, :, 0], [1, 0, 0])
  np.testing.assert_array_equal(plan.weight_GSK[0, :, 0] > 0, [0, 1, 1])


def test_ties_go_to_lower_expert_and_earlier_token():
  # (G=1, S=2, E=2, K=1, C=1). Equal logits: both pick e0; t0 wins the slot.
  plan = routing.token_choice(jnp.zeros((1, 2, 2)), k=1, capacity=1)
  np.testing.assert_array_equal(plan.expert_GSK[0, :, 0], [0, 0])
  np.testing.assert_array_equal(plan.slot_GSK[0, :, 0], [0, 1])


def test_explicit_capacity_and_dropless():
  logits = _logits([[.7, .3], [.6, .4], [.2, .8]])
  plan = routing.token_choice(logits, k=2, capacity=3)
  assert plan.capacity == 3 and plan.token_GEC.shape == (1, 2, 3)
  assert int((plan.slot_GSK < 3).sum()) == 6  # nothing dropped
  dropless = routing.token_choice(logits, k=2, capacity=None)
  assert dropless.is_dropless and dropless.token_GEC is None
  np.testing.assert_allclose(dropless.weight_GSK, plan.weight_GSK)


def test_gating_variants():
  # (G=1, S=1, E=3, K=2). logits [2, 1, 0].
  logits = jnp.array([[[2.0, 1.0, 0.0]]])
  p = np.exp([2, 1, 0]) / np.exp([2, 1, 0]).sum()
  plan = routing.token_choice(logits, k=2, capacity=1)
  np.testing.assert_allclose(plan.weight_GSK[0, 0], p[:2], rtol=1e-6)
  plan = routing.token_choice(logits, k=2, capacity=1, renormalize=True)
  np.testing.assert_allclose(plan.weight_GSK[0, 0], p[:2] / p[:2].sum(),
                             rtol=1e-6)
  plan = routing.token_choice(logits, k=2, capacity=1, gating="topk_softmax")
  q = np.exp([2, 1]) / np.exp([2, 1]).sum()
  np.testing.assert_allclose(plan.weight_GSK[0, 0], q, rtol=1e-6)
  plan = routing.token_choice(logits, k=2, capacity=1, gating="sigmoid",
                              routed_scaling_factor=2.0)
  sig = 1 / (1 + np.exp(-np.array([2.0, 1.0])))
  np.testing.assert_allclose(plan.weight_GSK[0, 0], 2 * sig, rtol=1e-6)


def test_selection_scores_select_but_do_not_weight():
  logits = jnp.array([[[2.0, 1.0, 0.0]]])
  sel = jnp.array([[[0.0, 0.0, 5.0]]])
  plan = routing.token_choice(logits, k=1, capacity=1,
                              selection_scores_GSE=sel)
  assert int(plan.expert_GSK[0, 0, 0]) == 2
  np.testing.assert_allclose(plan.weight_GSK[0, 0, 0],
                             jax.nn.softmax(logits)[0, 0, 2], rtol=1e-6)


def test_random_second_expert_policy():
  # A 2nd choice with weight << 1st is usually skipped; a skipped choice
  # takes no slot (expert sentinel E).
  logits = jnp.tile(jnp.array([[[8.0, 0.0, -8.0]]]), (1, 64, 1))
  plan = routing.token_choice(logits, k=2, capacity=64,
                              second_expert_policy="random",
                              rng=jax.random.key(0))
  skipped = np.asarray(plan.expert_GSK[0, :, 1] == 3)
  assert skipped.mean() > 0.9
  assert np.all(plan.weight_GSK[0, :, 1][skipped] == 0)
  assert np.all(plan.expert_GSK[0, :, 0] == 0)
  with pytest.raises(ValueError, match="rng"):
    routing.token_choice(logits, k=2, capacity=4,
                         second_expert_policy="random")


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0, capacity=1), "k must"),
    (dict(k=5, capacity=1), "k must"),
    (dict(k=1, capacity=0), "capacity"),
    (dict(k=1, capacity=1.5), "capacity"),
    (dict(k=1, capacity=1, gating="relu"), "gating"),
    (dict(k=1, capacity=1, second_expert_policy="x"), "second_expert_policy"),
    (dict(k=1, capacity=1, padding_mask_GS=jnp.ones((2, 2))), "padding_mask"),
])
def test_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    routing.token_choice(jnp.zeros((1, 3, 4)), **kwargs)


def test_bad_rank():
  with pytest.raises(ValueError, match="rank 3"):
    routing.token_choice(jnp.zeros((3, 4)), k=1, capacity=1)


class TokenChoiceVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_plan_shapes(self):
    route = self.variant(lambda l: routing.token_choice(l, k=2, capacity=3))
    plan = route(jnp.zeros((2, 5, 4)))
    chex.assert_shape(plan.token_GEC, (2, 4, 3))
    chex.assert_shape(plan.expert_GSK, (2, 5, 2))
    chex.assert_shape(plan.dispatch_mask(), (2, 5, 4, 3))
    chex.assert_type(plan.weight_GSK, jnp.float32)


@hypothesis.settings(max_examples=12)
@hypothesis.given(
    g=st.integers(1, 2), s=st.integers(1, 12), e=st.integers(1, 6),
    k=st.integers(1, 3), cap=st.integers(1, 6), bpr=st.booleans(),
    seed=st.integers(0, 2**16), pad=st.booleans())
def test_matches_loop_oracle_and_respects_capacity(g, s, e, k, cap, bpr, seed,
                                                   pad):
  k = min(k, e)
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(size=(g, s, e)), jnp.float32)
  mask = jnp.asarray(rng.random((g, s)) > 0.3) if pad else None
  route = jax.jit(routing.token_choice,
                  static_argnames=("k", "capacity", "batch_prioritized"))
  plan = route(logits, k=k, capacity=cap, padding_mask_GS=mask,
               batch_prioritized=bpr)
  prio = np.asarray(jnp.max(jax.nn.softmax(logits), -1)) if bpr else None
  want = reference.reference_token_choice_slots(
      plan.expert_GSK, cap, e, prio,
      None if mask is None else np.asarray(mask))
  np.testing.assert_array_equal(plan.slot_GSK, want)
  mask_GSEC = np.asarray(plan.dispatch_mask())
  assert mask_GSEC.sum(axis=1).max() <= 1          # one token per slot
  assert mask_GSEC.sum(axis=(1, 3)).max() <= cap   # capacity never exceeded
  dropped = ~np.asarray(plan.kept_GSK())
  assert np.all(np.asarray(plan.weight_GSK)[dropped] == 0)
  if mask is not None:  # padding takes nothing
    assert mask_GSEC[~np.asarray(mask)].sum() == 0
