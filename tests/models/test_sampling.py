"""Next-token choice (moejax.inference.sampling): hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.inference import sampling

# B=1, V=4: probabilities 0.5, 0.25, 0.125, 0.125 (logits = log p).
LOGITS_BV = jnp.log(jnp.array([[0.5, 0.25, 0.125, 0.125]]))


def test_top_k_keeps_the_k_largest():
  got = sampling.filter_logits(LOGITS_BV, top_k=2)
  np.testing.assert_array_equal(np.isfinite(got), [[True, True, False,
                                                    False]])


@pytest.mark.parametrize("p,kept", [
    (0.5, [True, False, False, False]),     # 0.5 reaches 0.5
    (0.6, [True, True, False, False]),      # 0.5 < 0.6: the 0.25 crosses it
    (0.8, [True, True, True, True]),        # 0.75 < 0.8; the tie at 0.125
])
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
  got = sampling.filter_logits(LOGITS_BV, top_p=p)
  # With p = 0.8 the first 0.125 crosses p; the second has 0.875 before it
  # in sorted order, so one of the two tied tokens goes.
  if p == 0.8:
    assert np.isfinite(got).sum() == 3
    assert np.isfinite(got)[0, :2].all()
  else:
    np.testing.assert_array_equal(np.isfinite(got)[0], kept)


def test_greedy_and_seeded_sampling():
  logits_BV = jnp.tile(LOGITS_BV, (512, 1))  # [512, 4]
  assert (sampling.next_token(logits_BV, None) == 0).all()
  key = jax.random.key(0)
  a = sampling.next_token(logits_BV, key, temperature=1.0)
  b = sampling.next_token(logits_BV, key, temperature=1.0)
  np.testing.assert_array_equal(a, b)
  freq = np.bincount(np.asarray(a), minlength=4) / 512
  np.testing.assert_allclose(freq, [0.5, 0.25, 0.125, 0.125], atol=0.07)
  # top_k=1 at any temperature is greedy.
  assert (sampling.next_token(logits_BV, key, temperature=2.0,
                              top_k=1) == 0).all()


def test_bad_values_are_named():
  with pytest.raises(ValueError, match="temperature must be a number >= 0"):
    sampling.check_sampling(-1.0, None, None, 4)
  with pytest.raises(ValueError, match=r"top_k must be None or an integer in "
                     r"\[1, 4\], got 9"):
    sampling.check_sampling(1.0, 9, None, 4)
  with pytest.raises(ValueError, match=r"top_p must be None or a number in "
                     r"\(0, 1\], got 0"):
    sampling.check_sampling(1.0, None, 0, 4)
