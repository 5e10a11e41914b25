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


class FrozenParam(nnx.Variable):
  """A parameter that does not train: the trainer differentiates and
  optimises nnx.Param only, so a FrozenParam gets no gradient and no
  optimizer state, but is saved and restored with the model."""


# The model's weights, trained or frozen (parameter counts, FLOPs).
WEIGHTS = (nnx.Param, FrozenParam)


def freeze(module, select=None):
  """Turns nnx.Params under `module` into FrozenParams, in place.

  Args:
    module: an nnx.Module.
    select: optional (path tuple, variable) -> bool; only Params it accepts
      are frozen (default: all). Paths are relative to `module`.
  Returns:
    The number of variables frozen. Metadata (logical sharding names) is
    kept.
  """
  found = []
  for path, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Module):
      for name, value in list(vars(node).items()):
        if isinstance(value, nnx.Param) and (
            select is None or select(tuple(path) + (name,), value)):
          found.append((node, name, value))
  for node, name, value in found:
    setattr(node, name, FrozenParam(value.get_value(),
                                    **value.get_metadata()))
  return len(found)
