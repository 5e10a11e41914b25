"""Dynamic-k routers: top-p (Huang et al. 2024) and null experts (AdaMoE).

Both give plans whose tokens take a variable number of experts (unused
columns of the K axis are "no assignment"); every engine runs them, and
RoutingMetrics.mean_k reports the mean k. With a capacity engine the
capacity is computed for `k` (the most a token can take), so nothing is
dropped that top-k with the same k would keep; a dropless engine sizes
itself by the real assignments.
"""

from flax import nnx
import jax.numpy as jnp

from moejax import notation as nt
from moejax.layers import params as params_lib
from moejax.layers import routers as routers_lib
from moejax.routing import dynamic_k
from moejax.routing import losses as losses_lib
from moejax.routing import validation


class TopPRouter(routers_lib.Router):
  """Top-p routing: experts by descending probability until their cumulative
  probability reaches p (Huang et al. 2024), at most k.

  Args:
    model_dim, num_experts: M, E.
    p: the threshold in (0, 1] (the paper: 0.4).
    k: the most experts a token takes (default E).
    renormalize: divide the taken weights by their sum.
    rngs: nnx.Rngs.
  Parameters: w_router_ME [M, E].
  Losses: dynamic_entropy, the mean router entropy over real tokens (the
    paper's dynamic loss: minimising it keeps top-p from spreading every
    token over many experts; weight it in the config).
  """

  loss_names = ("dynamic_entropy",)
  group_local = True

  def __init__(self, model_dim, num_experts, *, p=0.4, k=None,
               renormalize=False, rngs):
    k = num_experts if k is None else k
    self._init_common(model_dim, num_experts, k)
    if not (isinstance(p, (int, float)) and not isinstance(p, bool)
            and 0 < p <= 1):
      raise routers_lib.OptionError("p", p, f"p must be in (0, 1], got {p!r}")
    self.p = float(p)
    self.renormalize = bool(renormalize)
    self.w_router_ME = routers_lib.router_weight(rngs, model_dim, num_experts)

  def __call__(self, x_GSM, *, capacity, padding_mask_GS=None,
               token_ids_GS=None, deterministic=False):
    """<float>[G, S, M] -> RouterOutput (K = k columns, some unused)."""
    del token_ids_GS, deterministic
    logits_GSE = self.logits(x_GSM)
    plan = dynamic_k.top_p_routing(
        logits_GSE, p=self.p, capacity=capacity, max_k=self.k,
        padding_mask_GS=padding_mask_GS, renormalize=self.renormalize)
    probs_GSE = plan.probs_GSE
    mask_GS = (jnp.ones(probs_GSE.shape[:2], jnp.bool_)
               if padding_mask_GS is None else padding_mask_GS)
    ent_GS = -jnp.sum(probs_GSE * jnp.log(jnp.maximum(probs_GSE, 1e-20)), -1)
    # Mean over groups of per-group means (group-local contract).
    ent_G = jnp.sum(jnp.where(mask_GS, ent_GS, 0.0), -1) / jnp.maximum(
        jnp.sum(mask_GS, -1), 1)
    return routers_lib.RouterOutput(
        plan=plan, logits_GSE=logits_GSE,
        losses={"dynamic_entropy": jnp.mean(ent_G).astype(jnp.float32)})


class NullExpertRouter(routers_lib.Router):
  """AdaMoE (Zeng et al. 2024): top-k over E real and N null experts; a null
  expert computes nothing, so a token that picks j nulls runs k - j experts.

  Args:
    model_dim, num_experts: M, E (real experts).
    num_null: N null experts (AdaMoE uses about as many as real ones).
    k: choices per token over all E + N.
    renormalize: top-k weights divided by their sum (nulls included).
    rngs: nnx.Rngs.
  Parameters: w_router_MX [M, E + N].
  Losses: null_balance, the load-balancing loss over all E + N experts
    (AdaMoE balances real and null experts together; the layer's own
    load_balance covers the real ones only).
  """

  loss_names = ("null_balance",)
  group_local = True

  def __init__(self, model_dim, num_experts, *, num_null=None, k=2,
               renormalize=True, rngs):
    num_null = num_experts if num_null is None else num_null
    validation.check_int("num_null", num_null, 1)
    validation.check_k(k, num_experts + num_null)
    routers_lib.check_int("model_dim", model_dim, 1)
    routers_lib.check_int("num_experts", num_experts, 1)
    self.model_dim, self.num_experts = model_dim, num_experts
    # Capacity counts the real assignments a token can make: at most
    # min(k, E).
    self.k = min(k, num_experts)
    self.choices = k
    self.num_null = num_null
    self.renormalize = bool(renormalize)
    init = nnx.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
    self.w_router_MX = params_lib.param(
        rngs, init, (model_dim, num_experts + num_null), (nt.EMBED, None),
        jnp.float32)

  def __call__(self, x_GSM, *, capacity, padding_mask_GS=None,
               token_ids_GS=None, deterministic=False):
    """<float>[G, S, M] -> RouterOutput (null choices are no assignment)."""
    del token_ids_GS, deterministic
    logits_GSX = jnp.einsum("GSM,MX->GSX", x_GSM.astype(jnp.float32),
                            self.w_router_MX[...])
    plan, probs_GSX, choice_GSK = dynamic_k.null_expert_routing(
        logits_GSX, num_experts=self.num_experts, k=self.choices,
        capacity=capacity, padding_mask_GS=padding_mask_GS,
        renormalize=self.renormalize)
    if plan.expert_GSK.shape[-1] != self.k:
      # Keep K = self.k columns: real assignments number at most min(k, E);
      # sort real ones first (stable) and cut.
      order = jnp.argsort(plan.expert_GSK, axis=-1, stable=True)[..., :self.k]
      take = lambda a: None if a is None else jnp.take_along_axis(a, order, -1)
      plan = plan.replace(expert_GSK=take(plan.expert_GSK),
                          slot_GSK=take(plan.slot_GSK),
                          weight_GSK=take(plan.weight_GSK))
    null_balance = losses_lib.load_balancing_loss(probs_GSX, choice_GSK,
                                                  padding_mask_GS)
    # z-loss over all E + N logits is not what the layer computes from the
    # plan (it gets the real experts' logits).
    return routers_lib.RouterOutput(
        plan=plan, logits_GSE=logits_GSX[..., :self.num_experts],
        losses={"null_balance": null_balance})
