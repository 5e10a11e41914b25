"""Mixture-of-Depths (Raposo et al. 2024): a block that only the top-C tokens
of each sequence go through; the others pass around it on the residual.

A router scores every token, r_t = x_t . w_r (a scalar). At training time
each sequence's C = ceil(capacity_fraction * L) tokens with the highest r go
through the block, in their original order (so causal attention among them
stays causal, at their original positions), and

    x'_t = x_t + sigmoid(r_t) * (block(x~)_t - x_t)    for chosen t
    x'_t = x_t                                         otherwise

(block(x~) - x~ is the block's residual branch, attention + FFN over the
chosen tokens only; sigmoid(r) puts the router on the gradient path).
Choosing top-C of a sequence is expert choice with one expert: the chooser
is `routing.expert_choice` on logits (r_t, 0), whose expert-0 probability is
sigmoid(r_t), monotone in r.

Top-C reads the whole sequence, so it cannot decode. The causal predictor
(the paper's auxiliary router) is a small MLP on stop_gradient(x_t) trained
with binary cross entropy to predict whether top-C chose token t (loss
`mod_predictor`). In evaluation / decoding (deterministic=True) the block
runs the tokens with sigmoid(predictor) > 0.5 and never the top-C: the same
update, with attention restricted to predicted tokens (keys masked), so the
output at token t depends on tokens <= t only.

`apply_mod(model, every=..., ...)` wraps blocks of a model in place (module
traversal over `model.blocks`); DecoderLM's `wrappers={'mod': {...}}` does it
from a config.
"""

import math
from typing import Optional

from flax import nnx
import jax
import jax.numpy as jnp

from moejax import notation as nt
from moejax import routing
from moejax.layers import moe as moe_lib
from moejax.layers import params as params_lib
from moejax.routing import validation


def _check_fraction(value):
  if not (isinstance(value, (int, float)) and not isinstance(value, bool)
          and 0 < value <= 1):
    raise validation.OptionError(
        "capacity_fraction", value,
        f"capacity_fraction must be in (0, 1], got {value!r}")


class MoDBlock(nnx.Module):
  """A transformer block behind a Mixture-of-Depths router.

  Args:
    block: the wrapped block (TransformerBlock or anything with its call
      signature, returning (x, aux or None)).
    model_dim: M.
    capacity_fraction: C / L, the share of each sequence's tokens that go
      through the block at training time (the paper: 0.125).
    predictor_hidden: width of the causal predictor MLP.
    rngs: nnx.Rngs.
  Parameters: w_router_M [M] (float32); predictor w_pred_in_MH [M, H],
    w_pred_out_H [H] (float32); the block's.
  Losses added to the block's aux: mod_predictor (BCE of the predictor,
    training only; 0 in evaluation).
  """

  def __init__(self, block, model_dim, *, capacity_fraction=0.125,
               predictor_hidden=16, rngs):
    _check_fraction(capacity_fraction)
    validation.check_int("predictor_hidden", predictor_hidden, 1)
    self.block = block
    self.capacity_fraction = float(capacity_fraction)
    init = nnx.initializers.normal(0.1 * predictor_hidden ** -0.5)
    self.w_router_M = params_lib.param(rngs, nnx.initializers.normal(
        model_dim ** -0.5), (model_dim,), (nt.EMBED,), jnp.float32)
    self.w_pred_in_MH = params_lib.param(
        rngs, nnx.initializers.variance_scaling(1.0, "fan_in",
                                                "truncated_normal"),
        (model_dim, predictor_hidden), (nt.EMBED, None), jnp.float32)
    self.w_pred_out_H = params_lib.param(rngs, init, (predictor_hidden,),
                                         (None,), jnp.float32)
    self.deterministic = False

  # The block always returns an aux (its predictor loss), so models count
  # it among the MoE blocks (update_routers pairs blocks and aux by this).
  is_moe = True
  loss_names = ("mod_predictor",)

  @property
  def ffn(self):
    return self.block.ffn

  @property
  def attention(self):
    return self.block.attention

  def capacity(self, length):
    """C = ceil(capacity_fraction * L), at least 1."""
    return max(1, min(length, math.ceil(self.capacity_fraction * length)))

  def predictor_logits(self, x_BLM):
    """<float32>[B, L] the causal predictor on stop_gradient(x)."""
    x = jax.lax.stop_gradient(x_BLM).astype(jnp.float32)
    h = jax.nn.gelu(jnp.einsum("BLM,MH->BLH", x, self.w_pred_in_MH[...]))
    return jnp.einsum("BLH,H->BL", h, self.w_pred_out_H[...])

  def top_c(self, r_BL, padding_mask_BL=None):
    """The top-C chooser (expert choice with one expert).

    Returns (token_BC <int32>[B, C] chosen positions in increasing order, L
    marking an empty slot, chosen_BL <bool>[B, L])."""
    b, l = r_BL.shape
    logits_BL2 = jnp.stack([r_BL, jnp.zeros_like(r_BL)], -1)
    plan = routing.expert_choice(logits_BL2, capacity=self.capacity(l),
                                 padding_mask_GS=padding_mask_BL)
    token_BC = jnp.sort(plan.token_GEC[:, 0], axis=-1)   # empty (L) last
    chosen_BL = jnp.zeros((b, l + 1), jnp.bool_).at[
        jnp.arange(b)[:, None], token_BC].set(True)[:, :l]
    return token_BC, chosen_BL

  def __call__(self, x_BLM, *, padding_mask_BL=None, segment_ids_BL=None,
               positions_BL=None, token_ids_BL=None,
               deterministic: Optional[bool] = None):
    """As TransformerBlock: (<dtype>[B, L, M], aux) with mod_predictor added
    to the block's MoEAux (or a fresh MoEAux for a dense block)."""
    det = self.deterministic if deterministic is None else deterministic
    b, l, m = x_BLM.shape
    r_BL = jnp.einsum("BLM,M->BL", x_BLM.astype(jnp.float32),
                      self.w_router_M[...])
    gate_BL = jax.nn.sigmoid(r_BL)
    pred_BL = self.predictor_logits(x_BLM)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(l), (b, l))
    real_BL = (jnp.ones((b, l), jnp.bool_) if padding_mask_BL is None
               else padding_mask_BL.astype(jnp.bool_))
    if det:
      # Decoding: the causal predictor picks, per token.
      chosen_BL = (pred_BL > 0) & real_BL
      out_BLM, aux = self.block(
          x_BLM, padding_mask_BL=chosen_BL, segment_ids_BL=segment_ids_BL,
          positions_BL=positions_BL, token_ids_BL=token_ids_BL,
          deterministic=det)
      delta_BLM = (out_BLM.astype(jnp.float32) - x_BLM.astype(jnp.float32))
      upd_BLM = jnp.where(chosen_BL[..., None],
                          gate_BL[..., None] * delta_BLM, 0.0)
      y_BLM = (x_BLM.astype(jnp.float32) + upd_BLM).astype(out_BLM.dtype)
      pred_loss = jnp.zeros((), jnp.float32)
      chooser_r_BL = pred_BL
    else:
      token_BC, chosen_BL = self.top_c(r_BL, real_BL)
      valid_BC = token_BC < l
      safe_BC = jnp.where(valid_BC, token_BC, 0)
      take = lambda a: jnp.take_along_axis(a, safe_BC, axis=1)
      x_BCM = jnp.take_along_axis(x_BLM, safe_BC[..., None], axis=1)
      out_BCM, aux = self.block(
          x_BCM, padding_mask_BL=valid_BC,
          segment_ids_BL=None if segment_ids_BL is None else take(
              segment_ids_BL),
          positions_BL=take(positions_BL),
          token_ids_BL=None if token_ids_BL is None else take(token_ids_BL),
          deterministic=det)
      delta_BCM = out_BCM.astype(jnp.float32) - x_BCM.astype(jnp.float32)
      upd_BCM = jnp.where(valid_BC[..., None],
                          take(gate_BL)[..., None] * delta_BCM, 0.0)
      idx_BC = jnp.where(valid_BC, token_BC, l)      # l: dropped
      upd_BLM = jnp.zeros((b, l + 1, m), jnp.float32).at[
          jnp.arange(b)[:, None], idx_BC].add(upd_BCM)[:, :l]
      y_BLM = (x_BLM.astype(jnp.float32) + upd_BLM).astype(out_BCM.dtype)
      target_BL = jax.lax.stop_gradient(chosen_BL).astype(jnp.float32)
      bce_BL = (jnp.maximum(pred_BL, 0) - pred_BL * target_BL
                + jnp.log1p(jnp.exp(-jnp.abs(pred_BL))))
      pred_loss = (jnp.sum(jnp.where(real_BL, bce_BL, 0.0))
                   / jnp.maximum(jnp.sum(real_BL), 1)).astype(jnp.float32)
      chooser_r_BL = r_BL
    losses = {"mod_predictor": pred_loss}
    if aux is None:
      # A dense block: report the chooser as a one-expert routing.
      plan = routing.expert_choice(
          jnp.stack([chooser_r_BL, jnp.zeros_like(chooser_r_BL)], -1),
          capacity=self.capacity(l), padding_mask_GS=real_BL)
      metrics = routing.routing_metrics(plan)
      metrics = metrics.replace(mean_k=jnp.sum(
          chosen_BL.astype(jnp.float32)) / jnp.maximum(jnp.sum(real_BL), 1))
      aux = moe_lib.MoEAux(
          losses={"load_balance": jnp.zeros((), jnp.float32),
                  "z_loss": jnp.zeros((), jnp.float32), **losses},
          metrics=metrics, stats={})
    else:
      aux = aux.replace(losses={**aux.losses, **losses})
    return y_BLM, aux


def apply_mod(model, *, every=2, capacity_fraction=0.125,
              predictor_hidden=16, rngs):
  """Wraps blocks of `model` (anything with `blocks`, e.g. DecoderLM) in
  MoDBlock in place: block i when (i + 1) % every == 0 (the paper
  alternates MoD and full blocks). Returns the model."""
  validation.check_int("every", every, 1)
  for i, block in enumerate(model.blocks):
    if (i + 1) % every == 0 and not isinstance(block, MoDBlock):
      model.blocks[i] = MoDBlock(
          block, model.model_dim, capacity_fraction=capacity_fraction,
          predictor_hidden=predictor_hidden, rngs=rngs)
  return model
