"""Stacked expert FFNs: parameters [E, M, H] and [E, H, M].

The math is a pure function (`expert_ffn`) over an [E, X, M] buffer, where X
is whatever per-expert row layout the engine uses (G*C slots for the capacity
engines); the dropless engine calls the same activation through grouped
matmuls (`activate`).

Biases (use_bias=True, GPT-OSS) reach every engine without any engine
knowing about them:

* b_in_EH and b_gate_EH are folded into the weights in homogeneous
  coordinates: the layer appends a constant-1 column to the expert input
  (`prepare_input`, [.., M] -> [.., M + 1]) and `weights()` appends the
  biases as row M of w_in / w_gate ([E, M + 1, H]) and a zero column to
  w_out ([E, H, M + 1]). Every engine (einsum, indices, dropless scan and
  ragged_dot, expert parallelism) then computes x W_in + b_in exactly;
  empty capacity slots hold a zero row, so their constant column is 0 too.
* b_out_EM is added from the plan (`finish`): each token gets
  sum_k weight_k * b_out[expert_k] over its kept assignments, the same
  weights the engine combined the expert outputs with.
The Pallas engine refuses experts with biases (its kernels tile M).
"""

import math

from flax import nnx
import jax.numpy as jnp

from moejax import notation as nt
from moejax.layers import params as params_lib
from moejax.ops import ffn as ffn_ops
from moejax.routing.validation import OptionError
from moejax.ops.ffn import ExpertWeights
from moejax.ops.ffn import expert_ffn


def _check_constant(name, value):
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value) and value > 0)
  if not ok:
    raise OptionError(name, value, f"{name} must be a finite number > 0, "
                      f"got {value!r}")


class Experts(nnx.Module):
  """E independent FFNs stored stacked.

  Args:
    num_experts, model_dim, hidden_dim: E, M, H.
    activation: one of moejax.ops.ffn.ACTIVATIONS; 'clamped_swiglu' is
      GPT-OSS's (moejax.ops.ffn.ClampedSwiGLU).
    use_bias: add b_in_EH (and b_gate_EH for gated activations) to the
      projections and b_out_EM to each expert's output (GPT-OSS).
    swiglu_alpha, swiglu_limit: the constants of 'clamped_swiglu' (None:
      GPT-OSS's 1.702 and 7.0); refused with any other activation.
    dtype, param_dtype, kernel_init, rngs: as usual.

  Parameters: w_in_EMH (and w_gate_EMH for gated activations) [E, M, H] with
  logical names (expert, embed, mlp); w_out_EHM [E, H, M] (expert, mlp,
  embed); with use_bias also b_in_EH (b_gate_EH) [E, H] (expert, mlp) and
  b_out_EM [E, M] (expert, embed), zero at init.
  """

  def __init__(self, num_experts, model_dim, hidden_dim, *,
               activation="relu", use_bias=False, swiglu_alpha=None,
               swiglu_limit=None, dtype=jnp.float32, param_dtype=jnp.float32,
               kernel_init=None, rngs):
    for name, value in (("num_experts", num_experts), ("model_dim", model_dim),
                        ("hidden_dim", hidden_dim)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(name, value,
                          f"{name} must be an integer >= 1, got {value!r}")
    params_lib.check_activation(activation)
    if not isinstance(use_bias, bool):
      raise OptionError("use_bias", use_bias, f"use_bias must be True or "
                        f"False, got {use_bias!r}")
    for name, value in (("swiglu_alpha", swiglu_alpha),
                        ("swiglu_limit", swiglu_limit)):
      if value is None:
        continue
      if activation != "clamped_swiglu":
        raise OptionError(name, value, f"{name} applies only to activation "
                          f"'clamped_swiglu', not {activation!r}")
      _check_constant(name, value)
    self.num_experts = num_experts
    self.model_dim = model_dim
    self.hidden_dim = hidden_dim
    self.activation = activation
    self.use_bias = use_bias
    defaults = ffn_ops.ClampedSwiGLU()
    self.swiglu_alpha = (defaults.alpha if swiglu_alpha is None
                         else float(swiglu_alpha))
    self.swiglu_limit = (defaults.limit if swiglu_limit is None
                         else float(swiglu_limit))
    self.dtype = dtype
    # Fan-in initialisation per expert: batch axis 0 is the expert axis.
    init = kernel_init or nnx.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
        batch_axis=(0,))
    e, m, h = num_experts, model_dim, hidden_dim
    gated = activation in params_lib.GATED_ACTIVATIONS
    self.w_in_EMH = params_lib.param(
        rngs, init, (e, m, h), (nt.EXPERT, nt.EMBED, nt.MLP), param_dtype)
    self.w_gate_EMH = (params_lib.param(
        rngs, init, (e, m, h), (nt.EXPERT, nt.EMBED, nt.MLP), param_dtype)
                       if gated else None)
    self.w_out_EHM = params_lib.param(
        rngs, init, (e, h, m), (nt.EXPERT, nt.MLP, nt.EMBED), param_dtype)
    zeros = nnx.initializers.zeros_init()
    bias = lambda shape, names: (params_lib.param(rngs, zeros, shape, names,
                                                  param_dtype)
                                 if use_bias else None)
    self.b_in_EH = bias((e, h), (nt.EXPERT, nt.MLP))
    self.b_gate_EH = bias((e, h), (nt.EXPERT, nt.MLP)) if gated else None
    self.b_out_EM = bias((e, m), (nt.EXPERT, nt.EMBED))

  @property
  def engine_activation(self):
    """What the engines get as `activation`: the name, or a ClampedSwiGLU
    with this module's constants (hashable either way)."""
    if self.activation == "clamped_swiglu":
      return ffn_ops.ClampedSwiGLU(self.swiglu_alpha, self.swiglu_limit)
    return self.activation

  def weights(self):
    """ExpertWeights (w_in_EMH, w_out_EHM, w_gate_EMH or None) in the compute
    dtype. With use_bias the input biases are row M of w_in / w_gate
    ([E, M + 1, H]) and w_out gets a zero column ([E, H, M + 1]): pair them
    with `prepare_input`."""
    cast = lambda p: None if p is None else p[...].astype(self.dtype)
    w_in, w_out, w_gate = (cast(self.w_in_EMH), cast(self.w_out_EHM),
                           cast(self.w_gate_EMH))
    if not self.use_bias:
      return ExpertWeights(w_in, w_out, w_gate)
    fold = lambda w_EMH, b_EH: jnp.concatenate(
        [w_EMH, cast(b_EH)[:, None, :]], axis=1)
    w_in = fold(w_in, self.b_in_EH)
    w_gate = None if w_gate is None else fold(w_gate, self.b_gate_EH)
    w_out = jnp.pad(w_out, ((0, 0), (0, 0), (0, 1)))
    return ExpertWeights(w_in, w_out, w_gate)

  def prepare_input(self, x_XM):
    """<any>[..., M] -> <dtype>[..., M] (or [..., M + 1] with use_bias: a
    constant-1 column that meets the bias rows of `weights()`)."""
    x_XM = x_XM.astype(self.dtype)
    if not self.use_bias:
      return x_XM
    ones = jnp.ones(x_XM.shape[:-1] + (1,), self.dtype)
    return jnp.concatenate([x_XM, ones], axis=-1)

  def finish(self, y_GSM, plan):
    """The engine's output -> the experts' output <dtype>[G, S, M]: drops the
    constant column and adds each token's weighted output biases
    sum_k weight_GSK * b_out_EM[expert_GSK] (from the plan's weights, so
    dropped and padded assignments add nothing)."""
    if not self.use_bias:
      return y_GSM
    y_GSM = y_GSM[..., :self.model_dim]
    b_out_EM = self.b_out_EM[...].astype(self.dtype)
    if plan.has_token_view:
      e = plan.num_experts
      w_GSK = jnp.where(plan.expert_GSK < e, plan.weight_GSK, 0.0)
      if plan.slot_GSK is not None:
        w_GSK = jnp.where(plan.kept_GSK(), w_GSK, 0.0)
      b_GSKM = jnp.take(b_out_EM, jnp.minimum(plan.expert_GSK, e - 1), axis=0)
      bias_GSM = jnp.einsum("GSK,GSKM->GSM", w_GSK.astype(self.dtype), b_GSKM)
    else:  # expert choice: only the slot view
      weight_GSE = jnp.sum(plan.combine_weights(), axis=-1)
      bias_GSM = jnp.einsum("GSE,EM->GSM", weight_GSE.astype(self.dtype),
                            b_out_EM)
    return y_GSM + bias_GSM

  def __call__(self, in_EXM):
    """<dtype>[E, X, M] -> <dtype>[E, X, M] (output biases included)."""
    w = self.weights()
    out_EXM = expert_ffn(self.prepare_input(in_EXM), w.w_in_EMH, w.w_out_EHM,
                         w.w_gate_EMH, activation=self.engine_activation)
    if not self.use_bias:
      return out_EXM
    return (out_EXM[..., :self.model_dim]
            + self.b_out_EM[...].astype(self.dtype)[:, None, :])
