"""SoftMoELayer (Puigcerver et al. 2023): dense, non-causal, no drops."""

from typing import Optional

from flax import nnx
import jax.numpy as jnp

from moejax import notation as nt
from moejax import routing
from moejax.layers import experts as experts_lib
from moejax.layers import moe as moe_lib
from moejax.layers import params as params_lib
from moejax.layers.routers import check_int


def soft_moe_metrics(dispatch_GSEP, combine_GSEP, mask_GS):
  """RoutingMetrics of a Soft MoE call.

  expert_load_E: share of the total combine weight that each expert's slots
  receive; router_entropy: mean entropy of a token's combine distribution
  over the E*P slots; nothing is dropped and every real token is processed by
  every expert (coverage 2+).
  """
  g, s, e, p = combine_GSEP.shape
  real_GS = (jnp.ones((g, s), jnp.bool_) if mask_GS is None else mask_GS)
  real = real_GS.astype(jnp.float32)
  n_real = jnp.maximum(jnp.sum(real), 1.0)
  load_E = jnp.einsum("GSEP,GS->E", combine_GSEP, real)
  load_E = load_E / jnp.maximum(jnp.sum(load_E), 1e-9)
  c = combine_GSEP.reshape(g, s, e * p)
  ent_GS = -jnp.sum(jnp.where(c > 0, c * jnp.log(jnp.where(c > 0, c, 1.0)),
                              0.0), axis=-1)
  del dispatch_GSEP
  zero = jnp.zeros((), jnp.float32)
  return routing.RoutingMetrics(
      expert_load_E=load_E, dropped_fraction=zero,
      router_entropy=jnp.sum(ent_GS * real) / n_real,
      max_over_mean_load=e * jnp.max(load_E),
      effective_capacity_factor=jnp.ones((), jnp.float32),
      coverage_3=jnp.array([0.0, 0.0, 1.0], jnp.float32) if e > 1 else
      jnp.array([0.0, 1.0, 0.0], jnp.float32),
      mean_k=jnp.float32(e))  # every token reaches every expert's slots


class SoftMoELayer(nnx.Module):
  """Soft MoE: every slot is a convex mix of the group's tokens.

  Args:
    model_dim, hidden_dim, num_experts: M, H, E.
    slots_per_expert: P.
    group_size: S; None uses each sequence as one group.
    activation: relu, gelu, swiglu, geglu.
    causal: in a causal model Soft MoE leaks future tokens (each slot mixes
      the whole group), so causal=True raises unless allow_non_causal=True.
    dtype, param_dtype, rngs: as MoELayer.
  Parameters: mu_MEP [M, E, P] (embed, expert, -), scale [] (init 1.0), and
  the experts.
  """

  def __init__(self, model_dim, hidden_dim, num_experts, *, slots_per_expert=1,
               group_size=None, activation="relu", causal=False,
               allow_non_causal=False, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs):
    check_int("slots_per_expert", slots_per_expert, 1)
    if group_size is not None:
      check_int("group_size", group_size, 1)
    if causal and not allow_non_causal:
      raise ValueError(
          "Soft MoE mixes every token of a group into every slot, so in a "
          "causal layer outputs would depend on future tokens; use MoELayer "
          "with a token-choice router, or pass allow_non_causal=True.")
    self.causal = False
    self.group_size = group_size
    self.dtype = dtype
    self.model_dim = model_dim
    self.num_experts = num_experts
    self.slots_per_expert = slots_per_expert
    self.mu_MEP = params_lib.param(
        rngs, nnx.initializers.normal(model_dim ** -0.5),
        (model_dim, num_experts, slots_per_expert),
        (nt.EMBED, nt.EXPERT, None), jnp.float32)
    self.scale = nnx.Param(jnp.ones((), jnp.float32))
    self.experts = experts_lib.Experts(
        num_experts, model_dim, hidden_dim, activation=activation,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_BLM, *, padding_mask_BL=None,
               deterministic: Optional[bool] = None):
    """<dtype>[B, L, M] -> (<dtype>[B, L, M], MoEAux)."""
    del deterministic  # Soft MoE behaves the same in training and eval.
    if getattr(x_BLM, "ndim", None) != 3 or x_BLM.shape[-1] != self.model_dim:
      raise ValueError(f"x_BLM must have shape [B, L, {self.model_dim}], got "
                       f"{getattr(x_BLM, 'shape', None)}")
    b, l, m = x_BLM.shape
    s = self.group_size or l
    x_GSM, mask_GS, _ = moe_lib.group_tokens(x_BLM, s, padding_mask_BL)
    g = x_GSM.shape[0]
    e, p = self.num_experts, self.slots_per_expert
    dispatch_GSEP, combine_GSEP = routing.soft_weights(
        x_GSM, self.mu_MEP[...], self.scale[...], mask_GS)
    x_GSM = x_GSM.astype(self.dtype)
    in_EGPM = jnp.einsum("GSEP,GSM->EGPM", dispatch_GSEP.astype(self.dtype),
                         x_GSM)
    out_EXM = self.experts(in_EGPM.reshape(e, g * p, m))
    out_EGPM = out_EXM.reshape(e, g, p, m)
    y_GSM = jnp.einsum("GSEP,EGPM->GSM", combine_GSEP.astype(self.dtype),
                       out_EGPM)
    y_BLM = y_GSM.reshape(g * s, m)[:b * l].reshape(b, l, m)
    # Soft MoE has no router losses: every slot mixes every token.
    aux = moe_lib.MoEAux(
        losses={},
        metrics=soft_moe_metrics(dispatch_GSEP, combine_GSEP, mask_GS))
    return y_BLM, aux
