"""The expert FFN math over stacked weights: pure functions of arrays.

Shared by the engines (moejax.layers), expert parallelism (moejax.sharding)
and the Pallas adapter; knows nothing of modules.
"""

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

ACTIVATIONS = ("relu", "gelu", "swiglu", "geglu", "clamped_swiglu")
GATED_ACTIVATIONS = ("swiglu", "geglu", "clamped_swiglu")


class ExpertWeights(NamedTuple):
  """Expert FFN weights: w_in_EMH [E,M,H], w_out_EHM [E,H,M], w_gate_EMH or None."""
  w_in_EMH: jax.Array
  w_out_EHM: jax.Array
  w_gate_EMH: Optional[jax.Array] = None


@dataclasses.dataclass(frozen=True)
class ClampedSwiGLU:
  """GPT-OSS's clamped SwiGLU, with the up projection h_in and gate h_gate:

      gate = min(h_gate, limit);  up = clip(h_in, -limit, limit)
      out  = (up + 1) * gate * sigmoid(alpha * gate)

  A frozen dataclass (hashable), so engines can pass it where they pass an
  activation name, also as a static argument of a custom_vjp.
  """
  alpha: float = 1.702
  limit: float = 7.0

  def __call__(self, h_in, h_gate):
    """[..., H] up and gate projections -> [..., H] in h_in's dtype."""
    gate = jnp.minimum(h_gate, self.limit)
    up = jnp.clip(h_in, -self.limit, self.limit)
    return (up + 1) * (gate * jax.nn.sigmoid(self.alpha * gate))


def activate(h_in, h_gate, activation):
  """Applies the FFN non-linearity.

  Args:
    h_in: [..., H] the input (up) projection.
    h_gate: [..., H] the gate projection for gated activations, else None.
    activation: one of ACTIVATIONS ('clamped_swiglu' with GPT-OSS's default
      alpha 1.702 and limit 7.0), or a ClampedSwiGLU with other constants.
  Returns:
    [..., H] in h_in's dtype.
  """
  if isinstance(activation, ClampedSwiGLU):
    return activation(h_in, h_gate)
  if activation == "relu":
    return jax.nn.relu(h_in)
  if activation == "gelu":
    return jax.nn.gelu(h_in)
  if activation == "swiglu":
    return jax.nn.silu(h_gate) * h_in
  if activation == "geglu":
    return jax.nn.gelu(h_gate) * h_in
  if activation == "clamped_swiglu":
    return ClampedSwiGLU()(h_in, h_gate)
  raise ValueError(f"unknown activation {activation!r}; allowed: "
                   f"{list(ACTIVATIONS)}")


def expert_ffn(in_EXM, w_in_EMH, w_out_EHM, w_gate_EMH=None, *,
               activation="relu"):
  """Runs every expert on its own rows.

  Args:
    in_EXM: <dtype>[E, X, M] rows of each expert.
    w_in_EMH: [E, M, H]; w_out_EHM: [E, H, M]; w_gate_EMH: [E, M, H] or None.
    activation: see `activate` (gated ones need w_gate_EMH).
  Returns:
    <dtype>[E, X, M].
  """
  h_EXH = jnp.einsum("EXM,EMH->EXH", in_EXM, w_in_EMH)
  g_EXH = (None if w_gate_EMH is None else
           jnp.einsum("EXM,EMH->EXH", in_EXM, w_gate_EMH))
  h_EXH = activate(h_EXH, g_EXH, activation)
  return jnp.einsum("EXH,EHM->EXM", h_EXH, w_out_EHM)
