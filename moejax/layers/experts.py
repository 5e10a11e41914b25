"""Stacked expert FFNs: parameters [E, M, H] and [E, H, M].

The math is a pure function (`expert_ffn`) over an [E, X, M] buffer, where X
is whatever per-expert row layout the engine uses (G*C slots for the capacity
engines); the dropless engine calls the same activation through grouped
matmuls (`activate`).
"""

from flax import nnx
import jax.numpy as jnp

from moejax import notation as nt
from moejax.layers import params as params_lib
from moejax.routing.validation import OptionError
from moejax.ops.ffn import expert_ffn


class Experts(nnx.Module):
  """E independent FFNs stored stacked.

  Parameters: w_in_EMH (and w_gate_EMH for gated activations) [E, M, H] with
  logical names (expert, embed, mlp); w_out_EHM [E, H, M] (expert, mlp, embed).
  """

  def __init__(self, num_experts, model_dim, hidden_dim, *,
               activation="relu", dtype=jnp.float32, param_dtype=jnp.float32,
               kernel_init=None, rngs):
    for name, value in (("num_experts", num_experts), ("model_dim", model_dim),
                        ("hidden_dim", hidden_dim)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(name, value,
                          f"{name} must be an integer >= 1, got {value!r}")
    params_lib.check_activation(activation)
    self.num_experts = num_experts
    self.model_dim = model_dim
    self.hidden_dim = hidden_dim
    self.activation = activation
    self.dtype = dtype
    # Fan-in initialisation per expert: batch axis 0 is the expert axis.
    init = kernel_init or nnx.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
        batch_axis=(0,))
    e, m, h = num_experts, model_dim, hidden_dim
    self.w_in_EMH = params_lib.param(
        rngs, init, (e, m, h), (nt.EXPERT, nt.EMBED, nt.MLP), param_dtype)
    self.w_gate_EMH = (params_lib.param(
        rngs, init, (e, m, h), (nt.EXPERT, nt.EMBED, nt.MLP), param_dtype)
                       if activation in params_lib.GATED_ACTIVATIONS else None)
    self.w_out_EHM = params_lib.param(
        rngs, init, (e, h, m), (nt.EXPERT, nt.MLP, nt.EMBED), param_dtype)

  def weights(self):
    """(w_in_EMH, w_out_EHM, w_gate_EMH or None), cast to the compute dtype."""
    cast = lambda p: None if p is None else p[...].astype(self.dtype)
    return cast(self.w_in_EMH), cast(self.w_out_EHM), cast(self.w_gate_EMH)

  def __call__(self, in_EXM):
    """<dtype>[E, X, M] -> <dtype>[E, X, M]."""
    w_in, w_out, w_gate = self.weights()
    return expert_ffn(in_EXM.astype(self.dtype), w_in, w_out, w_gate,
                      activation=self.activation)
