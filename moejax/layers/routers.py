"""Routers: small NNX modules, one per family, each owning its parameters and
only its own options, on top of the pure functions of moejax.routing.

The router contract (any nnx.Module that has these plugs into MoELayer, every
engine and expert parallelism; subclassing `Router` is optional):

  num_experts: int          E
  k: int                    assignments per token, used for capacity
  causal: bool              True when a token's routing reads no later token
  __call__(x_GSM, *, capacity, padding_mask_GS=None, token_ids_GS=None,
           deterministic=False) -> RouterOutput
      capacity is None when the engine is dropless (the plan is then dropless).

Optional hooks, each with the default `Router` gives:

  loss_names: tuple[str]    names of the extra losses it adds (for configs)
  token_view: bool = True   its plans give each token's experts (expert_GSK);
                            expert choice gives only each expert's tokens,
                            which the dropless engines cannot run
  group_local: bool = False it routes every group on its own and reads no
                            PRNG stream, so under expert parallelism it runs
                            on each device's own groups (shard_map) instead of
                            under GSPMD; its `losses` must then be means over
                            groups and its `stats` sums over groups
  capacity_for(group_size, capacity_factor, *, min_capacity, multiple_of)
                            slots per expert, default compute_capacity(k=k)
  update(stats) -> None     applies a state change from the `stats` a forward
                            call reported (DeepSeek's bias); see update_routers
  experts_per_token(capacity_factor)
                            routed experts an average token runs through
                            (parameter/FLOP accounting), default k
  weights_on: str = 'output'
                            where the plan's weights multiply: the expert
                            output, or 'input' (Llama-4: expert(w * x)); the
                            layer honours 'input' for K = 1 with every
                            engine (routing.weights_on_input)

A forward call never changes a router's parameters or state.
"""

import math
from typing import Mapping, Optional

import flax.struct
from flax import nnx
import jax
import jax.numpy as jnp

from moejax import notation as nt
from moejax import routing
from moejax.layers import params as params_lib
from moejax.routing import validation
from moejax.routing.balanced import BALANCED_GATINGS
from moejax.routing.bias import GROUP_SCORES
from moejax.routing.plan import WEIGHTS_ON
from moejax.routing.token_choice import GATINGS
from moejax.routing.token_choice import SECOND_EXPERT_POLICIES


@flax.struct.dataclass
class RouterOutput:
  """What a router returns.

  plan: the RoutingPlan over G groups.
  logits_GSE: <float32>[G, S, E] router logits (for the z-loss), or None for
    routers without logits (hash).
  losses: {name: <float32>[] scalar} extra losses the router adds (beside
    the layer's load_balance and z_loss), e.g. {'sequence_balance': ...}.
  stats: {name: array} what the router needs after the step to update its
    state (DeepSeek: {'load_E': <float32>[E] assignment counts}); {} if none.
  """
  plan: routing.RoutingPlan
  logits_GSE: Optional[jax.Array] = None
  losses: Mapping[str, jax.Array] = flax.struct.field(default_factory=dict)
  stats: Mapping[str, jax.Array] = flax.struct.field(default_factory=dict)


class RouterBias(nnx.Variable):
  """Selection-only expert bias (DeepSeek aux-loss-free balancing): not
  trained by gradients; `DeepSeekRouter.update` moves it from the load."""


check_int = validation.check_int
OptionError = validation.OptionError


def check_number(name, value, minimum, *, open_low=False):
  """Raises OptionError unless value is a finite real number > (or >=)
  minimum (inf would pass the construction and fail when traced, e.g. a
  capacity of inf slots)."""
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > minimum if open_low else value >= minimum))
  if not ok:
    op = ">" if open_low else ">="
    raise OptionError(name, value, f"{name} must be a number {op} "
                      f"{minimum} and finite, got {value!r}")


def router_weight(rngs, model_dim, num_experts):
  """The [M, E] float32 router matrix, (embed, expert), small fan-in init."""
  init = nnx.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
  return params_lib.param(rngs, init, (model_dim, num_experts),
                          (nt.EMBED, nt.EXPERT), jnp.float32)


def router_bias(rngs, num_experts, use_bias):
  """The learned [E] float32 logit bias b_router_E (expert), zero at init,
  or None when use_bias is False."""
  if not isinstance(use_bias, bool):
    raise OptionError("use_bias", use_bias, f"use_bias must be True or False, "
                      f"got {use_bias!r}")
  if not use_bias:
    return None
  return params_lib.param(rngs, nnx.initializers.zeros_init(),
                          (num_experts,), (nt.EXPERT,), jnp.float32)


class Router(nnx.Module):
  """Base of moejax's routers: the contract's defaults and argument checks."""

  loss_names = ()
  token_view = True
  group_local = False
  causal = True
  weights_on = "output"
  b_router_E = None

  def _init_common(self, model_dim, num_experts, k):
    check_int("model_dim", model_dim, 1)
    check_int("num_experts", num_experts, 1)
    validation.check_k(k, num_experts)
    self.model_dim = model_dim
    self.num_experts = num_experts
    self.k = k

  def capacity_for(self, group_size, capacity_factor, *, min_capacity=1,
                   multiple_of=1):
    """C = compute_capacity(S, E, k=self.k, capacity_factor, ...)."""
    return routing.compute_capacity(
        group_size, self.num_experts, k=self.k,
        capacity_factor=capacity_factor, min_capacity=min_capacity,
        multiple_of=multiple_of)

  def experts_per_token(self, capacity_factor):
    """Routed experts an average token runs through: k."""
    del capacity_factor
    return self.k

  def logits(self, x_GSM):
    """<float32>[G, S, E] = x (in float32) @ w_router_ME (+ b_router_E when
    the router has a learned bias)."""
    logits_GSE = jnp.einsum("GSM,ME->GSE", x_GSM.astype(jnp.float32),
                            self.w_router_ME[...])
    if self.b_router_E is not None:
      logits_GSE = logits_GSE + self.b_router_E[...]
    return logits_GSE


def router_rngs(rngs):
  """The router's own nnx.Rngs: `rngs.fork()`, whose 'router' stream falls
  back to 'default' as NNX does; with neither (a Linen `init(key)` through
  nnx.bridge passes only 'params'), a 'router' stream drawn from 'params'."""
  if "router" in rngs or "default" in rngs:
    return rngs.fork()
  return nnx.Rngs(router=rngs.params())


class TokenChoiceRouter(Router):
  """Top-k token choice (Switch k=1, GShard k=2, Mixtral, ...).

  Args:
    model_dim, num_experts: M, E.
    k: experts per token.
    gating: 'softmax' (weights are the experts' softmax probabilities),
      'topk_softmax' (Mixtral: softmax over the k chosen logits) or
      'sigmoid' (sigmoid scores).
    renormalize: divide the k weights by their sum.
    batch_prioritized: BPR (V-MoE): tokens with a higher top-1 probability
      claim slots first. Reads later tokens, so the router is not causal.
    second_expert_policy: 'all' or 'random' (GShard; draws from the 'router'
      PRNG stream at training time).
    jitter_eps: Switch's multiplicative jitter on the router input at
      training time, uniform in [1 - eps, 1 + eps] ('router' stream); 0: off.
    routed_scaling_factor: multiplies the combine weights.
    use_bias: a learned logit bias b_router_E (GPT-OSS): logits = x W + b,
      used for selection and weights alike.
    weights_on: 'output' (weight * expert(x), every family but Llama-4) or
      'input' (expert(weight * x), Llama-4; needs k=1).
    rngs: nnx.Rngs ('params'; 'router' when jitter or 'random' is used).
  Parameters: w_router_ME [M, E] float32; b_router_E [E] float32 with
  use_bias.

  The families: Mixtral gating 'topk_softmax' (or 'softmax' + renormalize);
  OLMoE / Qwen2-MoE 'softmax' (renormalize = norm_topk_prob); Qwen3-MoE
  'softmax' + renormalize; GPT-OSS / JetMoE / Granite-MoE 'topk_softmax'
  (GPT-OSS with use_bias); Llama-4 'sigmoid', k=1, weights_on='input'.
  """

  def __init__(self, model_dim, num_experts, *, k=2, gating="softmax",
               renormalize=False, batch_prioritized=False,
               second_expert_policy="all", jitter_eps=0.0,
               routed_scaling_factor=1.0, use_bias=False,
               weights_on="output", rngs):
    self._init_common(model_dim, num_experts, k)
    validation.check_choice("gating", gating, GATINGS)
    validation.check_choice("weights_on", weights_on, WEIGHTS_ON)
    if weights_on == "input" and k != 1:
      raise OptionError("k", k, f"weights_on='input' (the router weight "
                        f"scales the expert input, Llama-4) needs k=1, got "
                        f"k={k}")
    validation.check_choice("second_expert_policy", second_expert_policy,
                            SECOND_EXPERT_POLICIES)
    check_number("jitter_eps", jitter_eps, 0)
    check_number("routed_scaling_factor", routed_scaling_factor, 0,
                 open_low=True)
    self.gating = gating
    self.renormalize = bool(renormalize)
    self.batch_prioritized = bool(batch_prioritized)
    self.second_expert_policy = second_expert_policy
    self.jitter_eps = float(jitter_eps)
    self.routed_scaling_factor = routed_scaling_factor
    self.weights_on = weights_on
    self.causal = not self.batch_prioritized
    self.group_local = not (self.jitter_eps > 0 or
                            second_expert_policy == "random")
    self.w_router_ME = router_weight(rngs, model_dim, num_experts)
    self.b_router_E = router_bias(rngs, num_experts, use_bias)
    self.rngs = None if self.group_local else router_rngs(rngs)

  def __call__(self, x_GSM, *, capacity, padding_mask_GS=None,
               token_ids_GS=None, deterministic=False):
    """<float>[G, S, M] -> RouterOutput (see the module docstring)."""
    del token_ids_GS
    xr_GSM = x_GSM.astype(jnp.float32)
    if self.jitter_eps > 0 and not deterministic:
      xr_GSM = xr_GSM * jax.random.uniform(
          self.rngs.router(), xr_GSM.shape, jnp.float32,
          1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
    logits_GSE = self.logits(xr_GSM)
    # GShard's random policy draws in training and evaluation alike (as
    # mesh-tensorflow's defaults for moe_second_policy_{train,eval}).
    rng = (self.rngs.router() if self.second_expert_policy == "random"
           else None)
    plan = routing.token_choice(
        logits_GSE, k=self.k, capacity=capacity,
        batch_prioritized=self.batch_prioritized,
        padding_mask_GS=padding_mask_GS, gating=self.gating,
        renormalize=self.renormalize,
        second_expert_policy=self.second_expert_policy, rng=rng,
        routed_scaling_factor=self.routed_scaling_factor)
    return RouterOutput(plan=plan, logits_GSE=logits_GSE)


class NoisyTopKRouter(Router):
  """Shazeer et al. 2017 noisy top-k gating with its importance and load
  losses (CV^2 over the whole batch, so never group-local).

  Args: model_dim, num_experts, k, rngs ('params'; 'router' for the noise).
  Parameters: w_router_ME, w_noise_ME [M, E] float32 (w_noise starts at 0).
  Losses: importance (always), load (training only; 0 at evaluation).
  """

  loss_names = ("importance", "load")

  def __init__(self, model_dim, num_experts, *, k=2, rngs):
    self._init_common(model_dim, num_experts, k)
    self.w_router_ME = router_weight(rngs, model_dim, num_experts)
    self.w_noise_ME = params_lib.param(
        rngs, nnx.initializers.zeros_init(), (model_dim, num_experts),
        (nt.EMBED, nt.EXPERT), jnp.float32)
    self.rngs = router_rngs(rngs)

  def __call__(self, x_GSM, *, capacity, padding_mask_GS=None,
               token_ids_GS=None, deterministic=False):
    """<float>[G, S, M] -> RouterOutput with losses importance and load."""
    del token_ids_GS
    logits_GSE = self.logits(x_GSM)
    noise_logits_GSE = jnp.einsum("GSM,ME->GSE", x_GSM.astype(jnp.float32),
                                  self.w_noise_ME[...])
    train = not deterministic
    rng = self.rngs.router() if train else None
    plan = routing.noisy_top_k(logits_GSE, noise_logits_GSE, k=self.k,
                               capacity=capacity, rng=rng, train=train,
                               padding_mask_GS=padding_mask_GS)
    noisy_GSE, std_GSE = routing.noisy_logits(logits_GSE, noise_logits_GSE,
                                              rng, train)
    gates_GSE = routing.top_k_gates(noisy_GSE, self.k)
    losses = {"importance": routing.importance_loss(gates_GSE,
                                                    padding_mask_GS),
              "load": jnp.zeros((), jnp.float32)}
    if train:
      losses["load"] = routing.load_loss(routing.load_probability(
          logits_GSE, noisy_GSE, std_GSE, self.k), padding_mask_GS)
    return RouterOutput(plan=plan, logits_GSE=logits_GSE, losses=losses)


class ExpertChoiceRouter(Router):
  """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens of
  the group. Non-causal; plans have no token view (no dropless engine).

  The capacity factor is the average number of experts per token: C =
  ceil(cf * S / E), capped at S (routing.expert_choice_capacity).

  Args: model_dim, num_experts, rngs. Parameters: w_router_ME [M, E].
  """

  token_view = False
  group_local = True
  causal = False

  def __init__(self, model_dim, num_experts, *, rngs):
    self._init_common(model_dim, num_experts, 1)
    self.w_router_ME = router_weight(rngs, model_dim, num_experts)

  def capacity_for(self, group_size, capacity_factor, *, min_capacity=1,
                   multiple_of=1):
    """ceil(cf * S / E) capped at S (min_capacity/multiple_of do not apply:
    an expert cannot take more than the group's S tokens)."""
    del min_capacity, multiple_of
    return routing.expert_choice_capacity(group_size, self.num_experts,
                                          capacity_factor)

  def experts_per_token(self, capacity_factor):
    """cf on average (each expert takes cf * S / E tokens), at most E."""
    return min(float(capacity_factor), self.num_experts)

  def __call__(self, x_GSM, *, capacity, padding_mask_GS=None,
               token_ids_GS=None, deterministic=False):
    """<float>[G, S, M] -> RouterOutput (slot view only)."""
    del token_ids_GS, deterministic
    if capacity is None:
      raise ValueError("expert choice fills C slots per expert and needs a "
                       "capacity; got None (a dropless engine): use "
                       "EinsumEngine or IndicesEngine")
    logits_GSE = self.logits(x_GSM)
    plan = routing.expert_choice(logits_GSE, capacity=capacity,
                                 padding_mask_GS=padding_mask_GS)
    return RouterOutput(plan=plan, logits_GSE=logits_GSE)


class HashRouter(Router):
  """Hash layers (Roller et al. 2021): a fixed hash of the token id picks the
  experts. No parameters and no logits; needs token_ids_GS.

  Args: model_dim (unused; for a uniform constructor), num_experts, k, seed.
  """

  group_local = True

  def __init__(self, model_dim, num_experts, *, k=1, seed=0, rngs=None):
    del rngs
    self._init_common(model_dim, num_experts, k)
    check_int("seed", seed, 0)
    self.seed = seed

  def __call__(self, x_GSM, *, capacity, padding_mask_GS=None,
               token_ids_GS=None, deterministic=False):
    """token ids -> RouterOutput (logits None)."""
    del deterministic
    if token_ids_GS is None:
      raise ValueError("HashRouter needs the token ids (MoELayer's "
                       "token_ids_BL), got None")
    if tuple(token_ids_GS.shape) != tuple(x_GSM.shape[:2]):
      raise ValueError(f"token_ids_GS must have shape {x_GSM.shape[:2]} "
                       f"[G, S], got {tuple(token_ids_GS.shape)}")
    plan = routing.hash_routing(token_ids_GS, self.num_experts,
                                capacity=capacity, k=self.k,
                                padding_mask_GS=padding_mask_GS,
                                seed=self.seed)
    return RouterOutput(plan=plan, logits_GSE=None)


class BalancedRouter(Router):
  """BASE / S-BASE (Lewis et al. 2021; Clark et al. 2022): top-1 of the
  Sinkhorn-balanced assignment at training time, plain top-1 at evaluation.
  Balancing reads the whole group, so it is not causal.

  Args:
    model_dim, num_experts: M, E.
    gating: 'sigmoid' (BASE) or 'softmax': the combine weight of the chosen
      expert.
    sinkhorn_iters: Sinkhorn rounds at training time.
    rngs: nnx.Rngs.
  Parameters: w_router_ME [M, E].
  """

  group_local = True
  causal = False

  def __init__(self, model_dim, num_experts, *, gating="sigmoid",
               sinkhorn_iters=20, rngs):
    self._init_common(model_dim, num_experts, 1)
    validation.check_choice("gating", gating, BALANCED_GATINGS)
    check_int("sinkhorn_iters", sinkhorn_iters, 1)
    self.gating = gating
    self.sinkhorn_iters = sinkhorn_iters
    self.w_router_ME = router_weight(rngs, model_dim, num_experts)

  def __call__(self, x_GSM, *, capacity, padding_mask_GS=None,
               token_ids_GS=None, deterministic=False):
    """<float>[G, S, M] -> RouterOutput (K = 1)."""
    del token_ids_GS
    logits_GSE = self.logits(x_GSM)
    plan = routing.balanced_assignment(
        logits_GSE, capacity=capacity, train=not deterministic,
        num_iters=self.sinkhorn_iters, padding_mask_GS=padding_mask_GS,
        gating=self.gating)
    return RouterOutput(plan=plan, logits_GSE=logits_GSE)


class DeepSeekRouter(Router):
  """DeepSeek-V2/V3 routing: a selection-only bias (aux-loss-free balancing),
  group-limited top-k, routed scaling, and the sequence-wise balance loss.

  Args:
    model_dim, num_experts, k: M, E, K.
    gating: 'sigmoid' (V3), 'softmax' (V2) or 'topk_softmax'.
    renormalize: divide the k weights by their sum (V3: True; V2: False).
    num_expert_groups, topk_groups: group-limited routing (1 = no limit).
    group_score: a group's score for group limiting: 'top2_sum' (V3: sum
      of its two best biased scores) or 'max' (V2: its best score).
    routed_scaling_factor: multiplies the combine weights.
    bias_update_rate: gamma of `update` (V3: 1e-3).
    rngs: nnx.Rngs.
  Parameters: w_router_ME [M, E]; state bias_E [E] (RouterBias, float32).
  Losses: sequence_balance (group == sequence). Stats: load_E [E], the
  assignment counts (dropped ones included) that `update` balances.

  DeepSeek-V3: gating 'sigmoid', renormalize = norm_topk_prob, group_score
  'top2_sum', bias_E = e_score_correction_bias. DeepSeek-V2 / V2-Lite:
  gating 'softmax', renormalize False, group_score 'max' (topk_method
  'group_limited_greedy'; 'greedy' is num_expert_groups=1), bias_E zero.
  """

  loss_names = ("sequence_balance",)
  group_local = True

  def __init__(self, model_dim, num_experts, *, k=2, gating="sigmoid",
               renormalize=True, num_expert_groups=1, topk_groups=1,
               group_score="top2_sum", routed_scaling_factor=1.0,
               bias_update_rate=1e-3, rngs):
    self._init_common(model_dim, num_experts, k)
    validation.check_choice("gating", gating, GATINGS)
    validation.check_choice("group_score", group_score, GROUP_SCORES)
    routing.bias._check_group_args(num_experts, num_expert_groups,  # pylint: disable=protected-access
                                   topk_groups)
    available = topk_groups * (num_experts // num_expert_groups)
    if k > available:
      raise OptionError("k", k, f"k={k} is more than the experts of the kept "
                        f"groups (topk_groups * E / num_expert_groups = "
                        f"{available})")
    check_number("routed_scaling_factor", routed_scaling_factor, 0,
                 open_low=True)
    check_number("bias_update_rate", bias_update_rate, 0)
    self.gating = gating
    self.renormalize = bool(renormalize)
    self.num_expert_groups = num_expert_groups
    self.topk_groups = topk_groups
    self.group_score = group_score
    self.routed_scaling_factor = routed_scaling_factor
    self.bias_update_rate = bias_update_rate
    self.w_router_ME = router_weight(rngs, model_dim, num_experts)
    self.bias_E = RouterBias(jnp.zeros((num_experts,), jnp.float32))

  def __call__(self, x_GSM, *, capacity, padding_mask_GS=None,
               token_ids_GS=None, deterministic=False):
    """<float>[G, S, M] -> RouterOutput with sequence_balance and load_E."""
    del token_ids_GS, deterministic
    logits_GSE = self.logits(x_GSM)
    plan = routing.aux_free_bias_route(
        logits_GSE, self.bias_E[...], k=self.k, capacity=capacity,
        gating=self.gating, num_expert_groups=self.num_expert_groups,
        topk_groups=self.topk_groups, group_score=self.group_score,
        routed_scaling_factor=self.routed_scaling_factor,
        padding_mask_GS=padding_mask_GS, renormalize=self.renormalize)
    losses = {"sequence_balance": routing.sequence_balance_loss(
        plan.probs_GSE, plan.expert_GSK, padding_mask_GS)}
    stats = {"load_E": routing.expert_load_counts(plan)}
    return RouterOutput(plan=plan, logits_GSE=logits_GSE, losses=losses,
                        stats=stats)

  def update(self, stats):
    """bias += rate * sign(mean load - load), from a forward call's stats
    (RouterOutput.stats / MoEAux.stats: {'load_E': <float32>[E]})."""
    load_E = stats["load_E"][..., :self.num_experts]
    self.bias_E[...] = routing.update_bias(self.bias_E[...], load_E,
                                           rate=self.bias_update_rate)


class CosineRouter(Router):
  """X-MoE's cosine router (Chi et al. 2022, "On the Representation Collapse
  of Sparse Mixture of Experts").

  Tokens are projected to a low dimension, and both the projected token and
  the expert embeddings are L2-normalised, so routing scores are cosine
  similarities, sharpened by a learned temperature:

      s_GSE = cos(x_GSM W_MD, e_ED) / tau

  then top-k token choice with `gating` over s. Routing in a small space of
  unit vectors keeps the router from collapsing token representations onto
  the expert embeddings.

  Args:
    model_dim, num_experts, k: M, E, K.
    routing_dim: D of the projection (X-MoE: 16 for E=32 / 64 experts).
    init_temperature: tau at init (X-MoE: 0.07); tau = exp(log_tau), clipped
      to >= min_temperature so scores stay bounded.
    gating, renormalize: as TokenChoiceRouter.
    rngs: nnx.Rngs.
  Parameters: w_proj_MD [M, D], expert_embed_ED [E, D], log_tau [] (float32).
  """

  group_local = True

  def __init__(self, model_dim, num_experts, *, k=1, routing_dim=16,
               init_temperature=0.07, min_temperature=0.01,
               gating="softmax", renormalize=False, rngs):
    self._init_common(model_dim, num_experts, k)
    check_int("routing_dim", routing_dim, 1)
    check_number("init_temperature", init_temperature, 0, open_low=True)
    check_number("min_temperature", min_temperature, 0, open_low=True)
    validation.check_choice("gating", gating, GATINGS)
    self.gating, self.renormalize = gating, bool(renormalize)
    self.min_temperature = float(min_temperature)
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    self.w_proj_MD = params_lib.param(rngs, init, (model_dim, routing_dim),
                                      (nt.EMBED, None), jnp.float32)
    self.expert_embed_ED = params_lib.param(
        rngs, nnx.initializers.orthogonal(), (num_experts, routing_dim),
        (nt.EXPERT, None), jnp.float32)
    self.log_tau = nnx.Param(jnp.log(jnp.float32(init_temperature)))

  def logits(self, x_GSM):
    """<float32>[G, S, E] cosine scores over the temperature."""
    def unit(v):  # L2 normalisation over the last axis
      return v * jax.lax.rsqrt(jnp.sum(v * v, axis=-1, keepdims=True) + 1e-6)
    h_GSD = unit(jnp.einsum("GSM,MD->GSD", x_GSM.astype(jnp.float32),
                            self.w_proj_MD[...]))
    e_ED = unit(self.expert_embed_ED[...])
    tau = jnp.maximum(jnp.exp(self.log_tau[...]), self.min_temperature)
    return jnp.einsum("GSD,ED->GSE", h_GSD, e_ED) / tau

  def __call__(self, x_GSM, *, capacity, padding_mask_GS=None,
               token_ids_GS=None, deterministic=False):
    """<float>[G, S, M] -> RouterOutput."""
    del token_ids_GS, deterministic
    logits_GSE = self.logits(x_GSM)
    plan = routing.token_choice(logits_GSE, k=self.k, capacity=capacity,
                                padding_mask_GS=padding_mask_GS,
                                gating=self.gating,
                                renormalize=self.renormalize)
    return RouterOutput(plan=plan, logits_GSE=logits_GSE)
