"""Soft MoE slot weights (Puigcerver et al. 2023).

No plan of slots and drops: every slot p of expert e receives a convex
combination of the group's tokens (dispatch, softmax over S for each slot),
and every token receives a convex combination of all E*P slot outputs
(combine, softmax over (E, P) jointly for each token). Non-causal.

The layer then computes, for orientation:

  in_GEPM  = einsum('GSEP,GSM->GEPM', dispatch_GSEP, x_GSM)
  out_GEPM = experts(in_GEPM)
  y_GSM    = einsum('GSEP,GEPM->GSM', combine_GSEP, out_GEPM)
"""

import jax
import jax.numpy as jnp

from moejax.routing import validation

# Added to the squared norm before rsqrt (DESIGN.md).
NORM_EPSILON = 1e-6


def l2_normalize(x, axis):
  """x * rsqrt(sum(x^2, axis) + 1e-6) in float32; same shape as x."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(
      jnp.sum(jnp.square(x), axis=axis, keepdims=True) + NORM_EPSILON)


def soft_weights(x_GSM, mu_MEP, scale, padding_mask_GS=None):
  """Soft MoE dispatch and combine weights.

  x and mu are L2-normalised over M (x * rsqrt(sum x^2 + 1e-6)), the
  normalised x is multiplied by the learned scalar `scale`, and
  logits_GSEP = einsum('GSM,MEP->GSEP', scale * x_n, mu_n), all in float32.

  Padding: a padded token gets dispatch weight 0 in every slot (the softmax
  over S runs over the real tokens only) and combine weight 0 in every slot,
  so it neither feeds nor reads the experts; its output is 0. A group with no
  real token has all-zero dispatch weights.

  Args:
    x_GSM: <float>[G, S, M] tokens (cast to float32).
    mu_MEP: <float>[M, E, P] slot parameters (cast to float32).
    scale: <float>[] scalar (a Python number or a 0-d/1-element array).
    padding_mask_GS: <bool>[G, S] True for real tokens, or None (all real).
  Returns:
    (dispatch_GSEP, combine_GSEP), both <float32>[G, S, E, P]:
    dispatch sums to 1 over S for each (g, e, p) with a real token;
    combine sums to 1 over (E, P) for each real token (0 for padding).
  """
  if getattr(x_GSM, "ndim", None) != 3:
    raise ValueError(f"x_GSM must have rank 3 [G, S, M], got shape "
                     f"{getattr(x_GSM, 'shape', None)}")
  if getattr(mu_MEP, "ndim", None) != 3:
    raise ValueError(f"mu_MEP must have rank 3 [M, E, P], got shape "
                     f"{getattr(mu_MEP, 'shape', None)}")
  g, s, m = x_GSM.shape
  if mu_MEP.shape[0] != m:
    raise ValueError(f"mu_MEP's first axis must equal x_GSM's model width "
                     f"M={m}, got mu_MEP shape {tuple(mu_MEP.shape)}")
  _, e, p = mu_MEP.shape
  scale = jnp.asarray(scale, jnp.float32)
  if scale.size != 1:
    raise ValueError(f"scale must be a scalar, got shape {scale.shape}")
  scale = scale.reshape(())
  padding_mask_GS = validation.check_padding_mask(padding_mask_GS, (g, s))

  x_n_GSM = l2_normalize(x_GSM, axis=-1) * scale
  mu_n_MEP = l2_normalize(mu_MEP, axis=0)
  logits_GSEP = jnp.einsum("GSM,MEP->GSEP", x_n_GSM, mu_n_MEP,
                           preferred_element_type=jnp.float32)

  if padding_mask_GS is None:
    dispatch_GSEP = jax.nn.softmax(logits_GSEP, axis=1)
  else:
    real_GS11 = padding_mask_GS[:, :, None, None]
    # A finite floor (not -inf) keeps an all-padded group free of NaNs: its
    # softmax is uniform and the mask below zeroes it.
    masked_GSEP = jnp.where(real_GS11, logits_GSEP,
                            jnp.finfo(jnp.float32).min)
    dispatch_GSEP = jnp.where(real_GS11, jax.nn.softmax(masked_GSEP, axis=1),
                              0.0)
  combine_GSX = jax.nn.softmax(logits_GSEP.reshape(g, s, e * p), axis=-1)
  combine_GSEP = combine_GSX.reshape(g, s, e, p)
  if padding_mask_GS is not None:
    combine_GSEP = jnp.where(padding_mask_GS[:, :, None, None], combine_GSEP,
                             0.0)
  return dispatch_GSEP, combine_GSEP
