"""The expert FFN math over stacked weights: pure functions of arrays.

Shared by the engines (moejax.layers), expert parallelism (moejax.sharding)
and the Pallas adapter; knows nothing of modules.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

ACTIVATIONS = ("relu", "gelu", "swiglu", "geglu")
GATED_ACTIVATIONS = ("swiglu", "geglu")


class ExpertWeights(NamedTuple):
  """Expert FFN weights: w_in_EMH [E,M,H], w_out_EHM [E,H,M], w_gate_EMH or None."""
  w_in_EMH: jax.Array
  w_out_EHM: jax.Array
  w_gate_EMH: Optional[jax.Array] = None


def activate(h_in, h_gate, activation):
  """Applies the FFN non-linearity.

  Args:
    h_in: [..., H] the input projection.
    h_gate: [..., H] the gate projection for 'swiglu'/'geglu', else None.
    activation: one of relu, gelu, swiglu, geglu.
  Returns:
    [..., H] in h_in's dtype.
  """
  if activation == "relu":
    return jax.nn.relu(h_in)
  if activation == "gelu":
    return jax.nn.gelu(h_in)
  if activation == "swiglu":
    return jax.nn.silu(h_gate) * h_in
  if activation == "geglu":
    return jax.nn.gelu(h_gate) * h_in
  raise ValueError(f"unknown activation {activation!r}; allowed: "
                   f"{list(ACTIVATIONS)}")


def expert_ffn(in_EXM, w_in_EMH, w_out_EHM, w_gate_EMH=None, *,
               activation="relu"):
  """Runs every expert on its own rows.

  Args:
    in_EXM: <dtype>[E, X, M] rows of each expert.
    w_in_EMH: [E, M, H]; w_out_EHM: [E, H, M]; w_gate_EMH: [E, M, H] or None.
    activation: relu, gelu, swiglu or geglu (the last two need w_gate_EMH).
  Returns:
    <dtype>[E, X, M].
  """
  h_EXH = jnp.einsum("EXM,EMH->EXH", in_EXM, w_in_EMH)
  g_EXH = (None if w_gate_EMH is None else
           jnp.einsum("EXM,EMH->EXH", in_EXM, w_gate_EMH))
  h_EXH = activate(h_EXH, g_EXH, activation)
  return jnp.einsum("EXH,EHM->EXM", h_EXH, w_out_EHM)
