"""Rotary position embeddings with the scaling variants of the HF configs.

'default' (RoFormer), 'linear' (position interpolation: frequencies / factor)
and 'yarn' (Peng et al. 2023: per-frequency blend of interpolation and
extrapolation, and an attention factor on cos/sin). Pairs are halves
(feature i with i + D/2, Llama layout) or interleaved (2i with 2i + 1,
DeepSeek's layout).
"""

import math

import jax.numpy as jnp
import numpy as np


def _yarn_mscale(factor, mscale=1.0):
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def frequencies(spec):
  """(inv_freq <float32 numpy>[D/2], attention_factor float) of a RopeSpec."""
  d = spec.dim
  if d % 2:
    raise ValueError(f"rotary embeddings need an even width, got {d}")
  pos_freqs = spec.theta ** (np.arange(0, d, 2, dtype=np.float32) / d)
  inv_freq = (1.0 / pos_freqs).astype(np.float32)
  if spec.kind == "default":
    return inv_freq, 1.0
  if spec.kind == "linear":
    return (inv_freq / spec.factor).astype(np.float32), 1.0
  # yarn
  factor = spec.factor
  attention_factor = spec.attention_factor
  if attention_factor is None:
    if spec.mscale and spec.mscale_all_dim:
      attention_factor = (_yarn_mscale(factor, spec.mscale)
                          / _yarn_mscale(factor, spec.mscale_all_dim))
    else:
      attention_factor = _yarn_mscale(factor)

  def correction_dim(rotations):
    return (d * math.log(spec.original_max_position /
                         (rotations * 2 * math.pi))) / (2 * math.log(
                             spec.theta))

  low, high = correction_dim(spec.beta_fast), correction_dim(spec.beta_slow)
  if spec.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, d - 1)
  if low == high:
    high += 0.001  # no zero-width ramp
  ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low),
                 0, 1)
  extrapolation = 1 - ramp
  inv_interp = 1.0 / (factor * pos_freqs)
  inv_freq = (inv_interp * (1 - extrapolation) + (1.0 / pos_freqs)
              * extrapolation)
  return inv_freq.astype(np.float32), float(attention_factor)


def apply_rotary(x_BLND, positions_BL, inv_freq, attention_factor=1.0, *,
                 interleaved=False):
  """Rotates queries or keys by their positions.

  Args:
    x_BLND: <float>[B, L, N, D] (N may be 1: MLA's shared rotary key).
    positions_BL: <int>[B, L].
    inv_freq: [D/2] inverse frequencies (`frequencies`).
    attention_factor: multiplies cos and sin (YaRN).
    interleaved: pairs (2i, 2i+1) instead of (i, i + D/2). The output is in
      the halves layout either way; q and k get the same permutation, so
      q . k is unchanged.
  Returns:
    x's dtype, [B, L, N, D]; math in float32.
  """
  angle_BLF = (positions_BL.astype(jnp.float32)[..., None]
               * jnp.asarray(inv_freq, jnp.float32))
  cos = (jnp.cos(angle_BLF) * attention_factor)[:, :, None, :]
  sin = (jnp.sin(angle_BLF) * attention_factor)[:, :, None, :]
  x = x_BLND.astype(jnp.float32)
  if interleaved:
    x1, x2 = x[..., 0::2], x[..., 1::2]
  else:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLND.dtype)
