"""Argument checks shared by the routers; they run at trace time (static shapes)."""

import jax.numpy as jnp


def check_logits(logits_GSE, name="logits_GSE"):
  if getattr(logits_GSE, "ndim", None) != 3:
    raise ValueError(f"{name} must have rank 3 [G, S, E], got shape "
                     f"{getattr(logits_GSE, 'shape', None)}")
  if logits_GSE.shape[-1] < 1:
    raise ValueError(f"num_experts (last axis of {name}) must be >= 1, got "
                     f"{logits_GSE.shape[-1]}")


def check_k(k, num_experts):
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
    raise ValueError(f"k must be an integer with 1 <= k <= num_experts "
                     f"({num_experts}), got {k!r}")


def check_capacity(capacity, allow_none=False):
  if capacity is None and allow_none:
    return
  if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
    allowed = "an integer >= 1" + (" or None (dropless)" if allow_none else "")
    raise ValueError(f"capacity must be {allowed}, got {capacity!r}")


def check_padding_mask(padding_mask_GS, group_shape):
  """Returns the mask as bool [G, S], or None."""
  if padding_mask_GS is None:
    return None
  if tuple(padding_mask_GS.shape) != tuple(group_shape):
    raise ValueError(f"padding_mask_GS must have shape {tuple(group_shape)} "
                     f"[G, S], got {tuple(padding_mask_GS.shape)}")
  return padding_mask_GS.astype(jnp.bool_)


def check_choice(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"unknown {name} {value!r}; allowed: {sorted(allowed)}")
