"""Dynamic k: top-p routing and null experts (routing/dynamic_k.py)."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing
from moejax.routing import dynamic_k
from moejax.routing.validation import OptionError


def _logits_of(probs):
  return jnp.log(jnp.asarray(probs, jnp.float32))[None]


def test_top_p_hand_case():
  # (G=1, S=3, E=4), p=0.5.
  probs = [[0.6, 0.2, 0.1, 0.1],     # 0.6 >= 0.5 after one: k=1
           [0.3, 0.35, 0.25, 0.1],   # 0.35, then 0.35+0.3=0.65: k=2
           [0.25, 0.25, 0.25, 0.25]]  # 0.25, 0.5: k=2
  plan = dynamic_k.top_p_routing(_logits_of(probs), p=0.5, capacity=None)
  e = np.asarray(plan.expert_GSK[0])               # [S=3, K=4]
  w = np.asarray(plan.weight_GSK[0])
  assert e.shape == (3, 4)
  np.testing.assert_array_equal(e[0], [0, 4, 4, 4])
  np.testing.assert_array_equal(e[1], [1, 0, 4, 4])
  np.testing.assert_array_equal(sorted(e[2][:2]), [0, 1])
  assert e[2][2] == e[2][3] == 4
  np.testing.assert_allclose(w[0], [0.6, 0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(w[1], [0.35, 0.3, 0, 0], atol=1e-6)
  np.testing.assert_allclose(float(dynamic_k.mean_experts_per_token(plan)),
                             5 / 3, rtol=1e-6)
  assert float(routing.routing_metrics(plan).mean_k) == pytest.approx(5 / 3)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(seed=st.integers(0, 2 ** 16), p=st.floats(0.05, 1.0))
def test_top_p_is_the_smallest_prefix_reaching_p(seed, p):
  logits = jax.random.normal(jax.random.key(seed), (2, 5, 6)) * 2
  plan = dynamic_k.top_p_routing(logits, p=p, capacity=None)
  probs = np.asarray(jax.nn.softmax(logits, -1))
  taken = np.asarray(plan.expert_GSK) < 6
  w = np.asarray(plan.weight_GSK)
  for g in range(2):
    for s in range(5):
      n = taken[g, s].sum()
      assert n >= 1 and taken[g, s, :n].all()       # a prefix
      top = np.sort(probs[g, s])[::-1]
      assert top[:n].sum() >= p - 1e-5 or n == 6      # reaches p
      assert top[:n - 1].sum() < p + 1e-5             # and no shorter one does
      np.testing.assert_allclose(w[g, s, :n], top[:n], rtol=1e-5)


def test_top_p_capacity_drops_and_bad_p():
  logits = jnp.zeros((1, 4, 2))                        # uniform: k=2 for p=.9
  plan = dynamic_k.top_p_routing(logits, p=0.9, capacity=2)
  m = routing.routing_metrics(plan)
  # 8 assignments for 2x2 slots: half dropped, every slot filled.
  assert float(m.dropped_fraction) == pytest.approx(0.5)
  assert float(m.mean_k) == pytest.approx(1.0)
  with pytest.raises(OptionError, match="p must be in"):
    dynamic_k.top_p_routing(logits, p=0.0, capacity=None)


def test_null_experts_hand_case():
  # (G=1, S=2, E=2 real + N=2 null), k=2.
  probs = [[0.4, 0.1, 0.3, 0.2],    # real 0 and null 2: one real expert
           [0.1, 0.2, 0.4, 0.3]]    # two nulls: no expert at all
  plan, probs_gsx, choice = dynamic_k.null_expert_routing(
      _logits_of(probs), num_experts=2, k=2, capacity=None)
  np.testing.assert_array_equal(np.asarray(choice[0]), [[0, 2], [2, 3]])
  np.testing.assert_array_equal(np.asarray(plan.expert_GSK[0]), [[0, 2], [2, 2]])
  np.testing.assert_allclose(np.asarray(plan.weight_GSK[0]),
                             [[0.4 / 0.7, 0], [0, 0]], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(plan.probs_GSE[0]),
                             [[0.8, 0.2], [1 / 3, 2 / 3]], rtol=1e-5)
  assert float(dynamic_k.mean_experts_per_token(plan)) == pytest.approx(0.5)
  assert probs_gsx.shape == (1, 2, 4)
