"""Argument checks shared by the routers; they run at trace time (static shapes)."""

import jax.numpy as jnp


class OptionError(ValueError):
  """A bad option value: a ValueError that also names the option and its
  value, so a config builder can point at the field (moe.router.k=9)."""

  def __init__(self, option, value, message):
    super().__init__(message)
    self.option = option
    self.value = value


def check_int(name, value, minimum):
  """Raises OptionError unless value is an int >= minimum (bools are not)."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise OptionError(name, value, f"{name} must be an integer >= {minimum}, "
                      f"got {value!r}")


def check_logits(logits_GSE, name="logits_GSE"):
  if getattr(logits_GSE, "ndim", None) != 3:
    raise ValueError(f"{name} must have rank 3 [G, S, E], got shape "
                     f"{getattr(logits_GSE, 'shape', None)}")
  if logits_GSE.shape[-1] < 1:
    raise ValueError(f"num_experts (last axis of {name}) must be >= 1, got "
                     f"{logits_GSE.shape[-1]}")


def check_k(k, num_experts):
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
    raise OptionError("k", k, f"k must be an integer with 1 <= k <= "
                      f"num_experts ({num_experts}), got {k!r}")


def check_capacity(capacity, allow_none=False):
  if capacity is None and allow_none:
    return
  if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
    allowed = "an integer >= 1" + (" or None (dropless)" if allow_none else "")
    raise OptionError("capacity", capacity,
                      f"capacity must be {allowed}, got {capacity!r}")


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
    raise OptionError(name, value, f"unknown {name} {value!r}; allowed: "
                      f"{sorted(allowed)}")
