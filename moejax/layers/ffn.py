"""A dense FFN block (shared experts, dense residual branch, dense baselines)."""

from flax import nnx
import jax.numpy as jnp

from moejax import notation as nt
from moejax.ops import ffn as ffn_ops
from moejax.layers import params as params_lib
from moejax.routing.validation import OptionError


class DenseFFN(nnx.Module):
  """y = act(x W_in [, x W_gate]) W_out. Parameters (embed, mlp), (mlp, embed)."""

  def __init__(self, model_dim, hidden_dim, *, activation="relu",
               dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    params_lib.check_activation(activation)
    for name, value in (("model_dim", model_dim), ("hidden_dim", hidden_dim)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(name, value,
                          f"{name} must be an integer >= 1, got {value!r}")
    self.activation = activation
    self.dtype = dtype
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    m, h = model_dim, hidden_dim
    self.w_in_MH = params_lib.param(rngs, init, (m, h), (nt.EMBED, nt.MLP),
                                    param_dtype)
    self.w_gate_MH = (params_lib.param(rngs, init, (m, h), (nt.EMBED, nt.MLP),
                                       param_dtype)
                      if activation in params_lib.GATED_ACTIVATIONS else None)
    self.w_out_HM = params_lib.param(rngs, init, (h, m), (nt.MLP, nt.EMBED),
                                     param_dtype)

  def __call__(self, x_XM):
    """<dtype>[..., M] -> <dtype>[..., M]."""
    x_XM = x_XM.astype(self.dtype)
    h = jnp.einsum("...M,MH->...H", x_XM, self.w_in_MH[...].astype(self.dtype))
    g = (None if self.w_gate_MH is None else jnp.einsum(
        "...M,MH->...H", x_XM, self.w_gate_MH[...].astype(self.dtype)))
    h = ffn_ops.activate(h, g, self.activation)
    return jnp.einsum("...H,HM->...M", h, self.w_out_HM[...].astype(self.dtype))
