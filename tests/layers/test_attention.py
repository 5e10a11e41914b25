"""The attention core (moejax.layers.attention) against a plain softmax
reference, and its masks on hand-written cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import attention as att
from moejax.models.hf import rope as rope_lib
from moejax.models.hf.config import RopeSpec


def reference(q_BLND, k_BJKD, v_BJKF, mask_BLJ, scale, sinks_N=None):
  """Per-head loop in float64: softmax over masked logits (+ a sink)."""
  q, k, v = (np.asarray(t, np.float64) for t in (q_BLND, k_BJKD, v_BJKF))
  b, l, n, _ = q.shape
  kh = k.shape[2]
  out = np.zeros((b, l, n, v.shape[-1]))
  for h in range(n):
    g = h // (n // kh)
    logits = np.einsum("bld,bjd->blj", q[:, :, h], k[:, :, g]) * scale
    logits = np.where(np.asarray(mask_BLJ), logits, -np.inf)
    top = logits.max(-1, keepdims=True)
    if sinks_N is not None:
      top = np.maximum(top, float(sinks_N[h]))
    e = np.exp(logits - top)
    den = e.sum(-1, keepdims=True)
    if sinks_N is not None:
      den = den + np.exp(float(sinks_N[h]) - top)
    out[:, :, h] = np.einsum("blj,bjf->blf", e / den, v[:, :, g])
  return out


def inputs(f=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (2, 6, 4, 8))   # (B=2, L=6, N=4, D=8)
  k = jax.random.normal(ks[1], (2, 6, 2, 8))   # (K=2 key heads)
  v = jax.random.normal(ks[2], (2, 6, 2, f))
  return q, k, v


def test_mask_hand_case():
  # (B=1, L=4): causal, window 2, last key padded.
  pos = att.default_positions(1, 4)
  mask = att.attention_mask(pos, pos, sliding_window=2,
                            key_mask_BJ=jnp.array([[1, 1, 1, 0]], bool))
  want = np.array([[1, 0, 0, 0],
                   [1, 1, 0, 0],
                   [0, 1, 1, 0],
                   [0, 0, 1, 0]], bool)
  np.testing.assert_array_equal(np.asarray(mask[0]), want)


def test_fully_masked_query_reads_itself():
  # (B=1, L=3) left-padded: query 0 has no real key; it gets its own.
  pos = att.default_positions(1, 3)
  mask = att.attention_mask(pos, pos,
                            key_mask_BJ=jnp.array([[0, 1, 1]], bool))
  np.testing.assert_array_equal(np.asarray(mask[0]),
                                [[1, 0, 0], [0, 1, 0], [0, 1, 1]])


@pytest.mark.parametrize("f", [8, 5, 11])  # value width =, <, > D
@pytest.mark.parametrize("window", [None, 3])
def test_attend_matches_reference(f, window):
  q, k, v = inputs(f)
  pos = att.default_positions(2, 6)
  key_mask = jnp.array([[1] * 6, [1] * 4 + [0] * 2], bool)
  mask = att.attention_mask(pos, pos, key_mask_BJ=key_mask,
                            sliding_window=window)
  got = att.attend(q, k, v, mask, scale=0.3)
  assert got.shape == (2, 6, 4, f)
  np.testing.assert_allclose(np.asarray(got),
                             reference(q, k, v, mask, 0.3), atol=1e-5)


def test_sinks_match_reference_and_vanish_when_very_negative():
  q, k, v = inputs()
  pos = att.default_positions(2, 6)
  mask = att.attention_mask(pos, pos, sliding_window=4)
  sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
  got = att.attend(q, k, v, mask, sinks_N=sinks)
  np.testing.assert_allclose(np.asarray(got),
                             reference(q, k, v, mask, 8 ** -0.5, sinks),
                             atol=1e-5)
  # A sink absorbs probability: outputs shrink toward 0, never grow.
  plain = att.attend(q, k, v, mask)
  gone = att.attend(q, k, v, mask, sinks_N=jnp.full((4,), -1e9))
  np.testing.assert_allclose(np.asarray(gone), np.asarray(plain), atol=1e-5)


def test_interleaved_rope_is_halves_rope_on_paired_features():
  spec = RopeSpec(dim=8, theta=100.0)
  inv, _ = rope_lib.frequencies(spec)
  x = jax.random.normal(jax.random.key(1), (1, 5, 2, 8))
  pos = att.default_positions(1, 5)
  # Interleaved pairs (0,1),(2,3),... are halves pairs after this gather.
  halves_order = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])
  a = rope_lib.apply_rotary(x, pos, inv, interleaved=True)
  b = rope_lib.apply_rotary(x[..., halves_order], pos, inv)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_yarn_keeps_high_frequencies_and_interpolates_low_ones():
  spec = RopeSpec(dim=16, theta=10000.0, kind="yarn", factor=8.0,
                  original_max_position=64, truncate=False)
  inv, factor = rope_lib.frequencies(spec)
  base, _ = rope_lib.frequencies(RopeSpec(dim=16, theta=10000.0))
  assert inv[0] == pytest.approx(base[0])           # extrapolated
  assert inv[-1] == pytest.approx(base[-1] / 8.0)   # interpolated
  assert factor == pytest.approx(0.1 * np.log(8.0) + 1.0)
