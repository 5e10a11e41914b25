"""Parameter creation with logical sharding names.

Parameters carry logical axis names (moejax.notation) as `out_sharding`
metadata but are not sharded eagerly: moejax.sharding maps the names to mesh
axes and initialises directly into sharded arrays.
"""

from flax import nnx
import jax.numpy as jnp

from moejax.ops.ffn import ACTIVATIONS
from moejax.ops.ffn import GATED_ACTIVATIONS
from moejax.routing.validation import OptionError


def param(rngs, initializer, shape, names, dtype=jnp.float32):
  """An nnx.Param of `shape` with logical axis `names` as sharding metadata."""
  if len(names) != len(shape):
    raise ValueError(f"names {names} do not match shape {shape}")
  value = initializer(rngs.params(), shape, dtype)
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def check_activation(activation):
  if activation not in ACTIVATIONS:
    raise OptionError("activation", activation, f"unknown activation "
                      f"{activation!r}; allowed: {list(ACTIVATIONS)}")
