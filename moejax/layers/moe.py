"""MoELayer: group -> router -> engine -> experts -> combine (+ shared experts).

The layer composes objects it is given: a router (moejax.layers.routers, or
any module with the router contract), stacked Experts, an engine
(moejax.layers.engines), and optionally shared experts, a residual branch
and expert parallelism (moejax.sharding.ExpertParallel). It owns only what
means something in every configuration: grouping and capacity. It returns
`(y, aux)` with an explicit MoEAux of losses, metrics and router stats;
nothing is hidden in global state, and a call changes no state.
"""

import logging
from typing import Any, Mapping, Optional

import flax.struct
from flax import nnx
import jax
import jax.numpy as jnp

from moejax import notation as nt
from moejax import routing
from moejax.layers import ffn as ffn_lib
from moejax.layers import params as params_lib
from moejax.layers.routers import check_int
from moejax.layers.routers import check_number
from moejax.routing.validation import OptionError
from moejax.routing import global_balance
from moejax.ops.ffn import ExpertWeights
from moejax.routing.plan import WEIGHTS_ON

# Losses every MoELayer reports (the router adds its own).
BASE_LOSSES = ("load_balance", "z_loss")
RESIDUAL_MIXES = ("sum", "learned")
# load_balance counted per group (Switch/GShard) or over the global batch
# (Qwen's global-batch balance; routing/global_balance.py).
BALANCE_SCOPES = {"group": routing.load_balancing_loss,
                  "global": global_balance.global_load_balancing_loss}


@flax.struct.dataclass
class MoEAux:
  """What an MoE layer reports besides its output.

  losses: {name: <float32>[] scalar}: load_balance (Switch/GShard), z_loss
    (ST-MoE), and whatever the router adds (its `loss_names`).
  metrics: routing.RoutingMetrics (expert load, drops, entropy, ...).
  stats: {name: array} the router's stats for `update_routers` ({} if none).
  A model stacks its layers' structs along a leading axis (stack_aux).
  """
  losses: Mapping[str, jax.Array]
  metrics: Any
  stats: Mapping[str, jax.Array] = flax.struct.field(default_factory=dict)


def weighted_sum(losses, weights):
  """sum_name weights[name] * losses[name], float32 (summed over any leading
  layer axis).

  A non-zero weight on a name the losses do not have raises ValueError (the
  weight would silently do nothing); a zero weight on one is ignored, so one
  weights dict serves models whose routers report different losses.
  """
  unknown = sorted(n for n, w in weights.items() if w and n not in losses)
  if unknown:
    raise ValueError(f"aux loss weights name {unknown}, which no MoE layer "
                     f"reports; reported: {sorted(losses)}")
  total = jnp.zeros((), jnp.float32)
  for name, w in weights.items():
    if w:
      total = total + w * jnp.sum(losses[name])
  return total


def group_tokens(x_BLM, group_size, padding_mask_BL=None, *, pad=True):
  """Flattens [B, L, M] tokens into G groups of S, padding the last group.

  Returns (x_GSM, mask_GS <bool> or None when nothing is padded, pad_count).
  """
  b, l, m = x_BLM.shape
  t = b * l
  g, pad_count = routing.num_groups_and_padding(t, group_size)
  x_TM = x_BLM.reshape(t, m)
  mask_T = None if padding_mask_BL is None else padding_mask_BL.reshape(t)
  if pad_count:
    if not pad:
      raise ValueError(
          f"group_size {group_size} does not divide the token count {t} "
          f"(batch {b} x length {l}) and pad_groups=False; use a group size "
          f"that divides {t} or set pad_groups=True")
    logging.warning("MoE: padding %d tokens to fill %d groups of %d (group "
                    "size does not divide %d tokens)", pad_count, g,
                    group_size, t)
    x_TM = jnp.pad(x_TM, ((0, pad_count), (0, 0)))
    real_T = jnp.arange(t + pad_count) < t
    mask_T = real_T if mask_T is None else jnp.pad(
        mask_T.astype(jnp.bool_), (0, pad_count)) & real_T
  mask_GS = None if mask_T is None else mask_T.reshape(g, group_size).astype(
      jnp.bool_)
  return x_TM.reshape(g, group_size, m), mask_GS, pad_count


class ResidualBranch(nnx.Module):
  """A dense FFN added to the MoE output (Residual-MoE / PR-MoE).

  mix 'sum': y = moe + dense. 'learned' (DeepSpeed-MoE's PR-MoE): per-token
  softmax coefficients a = softmax(x W_mix) over {moe, dense}, y = a0 * moe
  + a1 * dense. Parameters: the FFN's, and w_mix_M2 [M, 2] for 'learned'.
  """

  def __init__(self, model_dim, hidden_dim, *, mix="sum", activation="relu",
               dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    if mix not in RESIDUAL_MIXES:
      raise OptionError("mix", mix, f"unknown residual mix {mix!r}; "
                        f"allowed: {list(RESIDUAL_MIXES)}")
    self.mix = mix
    self.dtype = dtype
    self.ffn = ffn_lib.DenseFFN(model_dim, hidden_dim, activation=activation,
                                dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)
    self.w_mix_M2 = (params_lib.param(
        rngs, nnx.initializers.zeros_init(), (model_dim, 2),
        (nt.EMBED, None), jnp.float32) if mix == "learned" else None)

  def __call__(self, x_GSM, moe_GSM):
    """<dtype>[G, S, M] input and MoE output -> <dtype>[G, S, M]."""
    dense_GSM = self.ffn(x_GSM)
    if self.w_mix_M2 is None:
      return moe_GSM + dense_GSM
    mix_GS2 = jax.nn.softmax(jnp.einsum(
        "GSM,MZ->GSZ", x_GSM.astype(jnp.float32), self.w_mix_M2[...]))
    mix_GS2 = mix_GS2.astype(moe_GSM.dtype)
    return moe_GSM * mix_GS2[..., :1] + dense_GSM * mix_GS2[..., 1:]


class GatedShared(nnx.Module):
  """Shared experts scaled per token by a learned sigmoid gate (Qwen2-MoE's
  shared_expert_gate): y = sigmoid(x w_shared_gate_M1) * ffn(x).

  Parameters: the DenseFFN's (ffn.w_in_MH, ffn.w_gate_MH, ffn.w_out_HM) and
  w_shared_gate_M1 [M, 1] (embed, -), float32, zero at init (gate 0.5).
  """

  def __init__(self, model_dim, hidden_dim, *, activation="relu",
               dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    self.dtype = dtype
    self.ffn = ffn_lib.DenseFFN(model_dim, hidden_dim, activation=activation,
                                dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)
    self.w_shared_gate_M1 = params_lib.param(
        rngs, nnx.initializers.zeros_init(), (model_dim, 1),
        (nt.EMBED, None), jnp.float32)

  def __call__(self, x_GSM):
    """<dtype>[G, S, M] -> <dtype>[G, S, M]."""
    gate_GS1 = jax.nn.sigmoid(jnp.einsum(
        "GSM,MZ->GSZ", x_GSM.astype(jnp.float32), self.w_shared_gate_M1[...]))
    return self.ffn(x_GSM) * gate_GS1.astype(self.dtype)


class MoELayer(nnx.Module):
  """A sparse MoE FFN block composed of a router, experts and an engine.

  Example:
    layer = MoELayer(
        router=TokenChoiceRouter(512, 16, k=2, rngs=rngs),
        experts=Experts(16, 512, 1024, activation="swiglu", rngs=rngs),
        engine=IndicesEngine(), capacity_factor=1.25, group_size=1024)
    y_BLM, aux = layer(x_BLM, deterministic=True)

  Args:
    router: a router module (see moejax.layers.routers for the contract).
    experts: Experts (stacked E FFNs); its E must equal the router's.
    engine: an engine object (moejax.layers.engines). A dropless engine
      routes without capacity, so the capacity arguments do not apply.
    capacity_factor, eval_capacity_factor: training / evaluation capacity
      factors (eval defaults to the training one); the router's k is in the
      formula (router.capacity_for).
    capacity: explicit C per expert per group, overriding the factors.
    min_capacity, capacity_multiple_of: see routing.compute_capacity.
    group_size: S; None uses each sequence as one group (S = L).
    pad_groups: pad the last group (with a warning) when S does not divide
      B*L; False raises instead.
    shared: an always-on module x_GSM -> y_GSM added to the output
      (DeepSeekMoE's shared experts, e.g. a DenseFFN; GatedShared for
      Qwen2-MoE's sigmoid-gated one), or None.
    residual: a module (x_GSM, moe_GSM) -> y_GSM (ResidualBranch), or None.
    output_bias: add a learned bias b_out_M [M] to the routed experts'
      combined output, once per token whatever the routing (JetMoE's
      MoE bias; per-expert output biases are Experts(use_bias=True)).
    expert_parallel: a moejax.sharding.ExpertParallel, or None.
    balance_scope: 'group' (load_balance per group, averaged) or 'global'
      (f and P counted over every group of the batch; see
      routing/global_balance.py).

  A router with weights_on='input' (Llama-4) has its K = 1 weights applied
  to the expert input (routing.weights_on_input), with every engine.
  """

  def __init__(self, *, router, experts, engine, capacity_factor=1.0,
               eval_capacity_factor=None, capacity=None, min_capacity=1,
               capacity_multiple_of=1, group_size=None, pad_groups=True,
               shared=None, residual=None, output_bias=False,
               expert_parallel=None, balance_scope="group"):
    if balance_scope not in BALANCE_SCOPES:
      raise OptionError("balance_scope", balance_scope, f"allowed: "
                        f"{sorted(BALANCE_SCOPES)}")
    self.balance_scope = balance_scope
    for name in ("num_experts", "k"):
      if not isinstance(getattr(router, name, None), int):
        raise ValueError(f"router {type(router).__name__} has no integer "
                         f"`{name}`; a router declares num_experts, k and "
                         f"causal (see moejax.layers.routers)")
    if not callable(router):
      raise ValueError(f"router {type(router).__name__} is not callable")
    if not callable(engine) or not hasattr(engine, "uses_capacity"):
      raise ValueError(f"engine must be an engine object (e.g. "
                       f"IndicesEngine()), got {engine!r}")
    if getattr(experts, "num_experts", None) != router.num_experts:
      raise ValueError(
          f"experts has {getattr(experts, 'num_experts', None)} experts but "
          f"the router routes to {router.num_experts}")
    check = getattr(engine, "check_router", None)
    if check is not None:
      check(router)
    check = getattr(engine, "check_experts", None)
    if check is not None:
      check(experts)
    weights_on = getattr(router, "weights_on", "output")
    if weights_on not in WEIGHTS_ON:
      raise ValueError(f"router {type(router).__name__} has weights_on="
                       f"{weights_on!r}; allowed: "
                       f"{list(WEIGHTS_ON)}")
    if weights_on == "input" and router.k != 1:
      raise ValueError(f"router {type(router).__name__} puts its weights on "
                       f"the expert input, which needs k=1, got k={router.k}")
    if not isinstance(output_bias, bool):
      raise OptionError("output_bias", output_bias, f"output_bias must be "
                        f"True or False, got {output_bias!r}")
    check_number("capacity_factor", capacity_factor, 0, open_low=True)
    if eval_capacity_factor is not None:
      check_number("eval_capacity_factor", eval_capacity_factor, 0,
                   open_low=True)
    for name, value in (("capacity", capacity), ("group_size", group_size)):
      if value is not None:
        check_int(name, value, 1)
    check_int("min_capacity", min_capacity, 1)
    check_int("capacity_multiple_of", capacity_multiple_of, 1)
    self.router = router
    self.experts = experts
    self.engine = engine
    self.capacity_factor = capacity_factor
    self.eval_capacity_factor = eval_capacity_factor
    self.capacity = capacity
    self.min_capacity = min_capacity
    self.capacity_multiple_of = capacity_multiple_of
    self.group_size = group_size
    self.pad_groups = pad_groups
    self.shared = shared
    self.residual = residual
    self.b_out_M = (nnx.Param(
        jnp.zeros((experts.model_dim,), experts.w_out_EHM[...].dtype),
        out_sharding=(nt.EMBED,), eager_sharding=False)
                    if output_bias else None)
    self.deterministic = False
    self.expert_parallel = None
    self.set_expert_parallel(expert_parallel)

  @property
  def num_experts(self):
    return self.router.num_experts

  @property
  def model_dim(self):
    return self.experts.model_dim

  @property
  def causal(self):
    """Whether a token's output reads no later token (the router's)."""
    return bool(getattr(self.router, "causal", True))

  def set_expert_parallel(self, expert_parallel):
    """Turns expert parallelism on (an ExpertParallel) or off (None); raises
    ValueError for a layer it cannot run (see ExpertParallel.check)."""
    if expert_parallel is not None and not callable(
        getattr(expert_parallel, "check", None)):
      raise ValueError(f"expert_parallel must be a moejax.sharding."
                       f"ExpertParallel or None, got {expert_parallel!r}")
    if expert_parallel is not None:
      expert_parallel.check(num_experts=self.num_experts,
                            hidden_dim=self.experts.hidden_dim,
                            engine=self.engine)
    self.expert_parallel = expert_parallel

  def layer_capacity(self, group_size, deterministic):
    """C for this call (None for a dropless engine)."""
    if not self.engine.uses_capacity:
      return None
    if self.capacity is not None:
      return self.capacity
    cf = self.capacity_factor
    if deterministic and self.eval_capacity_factor is not None:
      cf = self.eval_capacity_factor
    capacity_for = getattr(self.router, "capacity_for", None)
    if capacity_for is None:
      return routing.compute_capacity(
          group_size, self.num_experts, k=self.router.k, capacity_factor=cf,
          min_capacity=self.min_capacity,
          multiple_of=self.capacity_multiple_of)
    return capacity_for(group_size, cf, min_capacity=self.min_capacity,
                        multiple_of=self.capacity_multiple_of)

  def __call__(self, x_BLM, *, padding_mask_BL=None, token_ids_BL=None,
               deterministic: Optional[bool] = None, no_drop=False):
    """Applies the layer.

    Args:
      x_BLM: <dtype>[B, L, M].
      padding_mask_BL: optional <bool>[B, L]; padded tokens take no slot and
        add nothing to losses or metrics (their output is 0 from the experts).
      token_ids_BL: <int32>[B, L], for routers that read token ids (hash).
      deterministic: evaluation mode (eval capacity factor, no noise or
        jitter); defaults to the module's `deterministic` attribute (set by
        `model.eval()` / `model.train()`).
      no_drop: decoding (moejax.inference): each sequence's tokens are one
        group whatever group_size says, with capacity for all of them, so a
        capacity engine drops nothing and a token's route does not depend
        on the other rows of the batch.
    Returns:
      (y_BLM <dtype>[B, L, M], MoEAux).
    """
    m = self.model_dim
    if getattr(x_BLM, "ndim", None) != 3 or x_BLM.shape[-1] != m:
      raise ValueError(f"x_BLM must have shape [B, L, {m}], got "
                       f"{getattr(x_BLM, 'shape', None)}")
    b, l, _ = x_BLM.shape
    for name, arr in (("padding_mask_BL", padding_mask_BL),
                      ("token_ids_BL", token_ids_BL)):
      if arr is not None and tuple(arr.shape) != (b, l):
        raise ValueError(f"{name} must have shape {(b, l)} [B, L], got "
                         f"{tuple(arr.shape)}")
    det = self.deterministic if deterministic is None else deterministic
    s = l if no_drop else (self.group_size or l)
    x_GSM, mask_GS, pad = group_tokens(x_BLM, s, padding_mask_BL,
                                       pad=self.pad_groups)
    g = x_GSM.shape[0]
    token_ids_GS = None if token_ids_BL is None else jnp.pad(
        token_ids_BL.reshape(-1), (0, pad)).reshape(g, s)
    capacity = self.layer_capacity(s, det)
    if no_drop and capacity is not None:
      capacity = s  # a token takes each expert at most once
    ep = self.expert_parallel
    route_kw = dict(capacity=capacity, padding_mask_GS=mask_GS,
                    token_ids_GS=token_ids_GS, deterministic=det)
    if ep is None:
      out = self.router(x_GSM, **route_kw)
    else:
      x_GSM = ep.constrain_groups(x_GSM, self.num_experts)
      out = ep.route(self.router, x_GSM, **route_kw)
    plan = out.plan
    if not isinstance(plan, routing.RoutingPlan):
      raise ValueError(f"router {type(self.router).__name__} returned a plan "
                       f"of type {type(plan).__name__}, not a RoutingPlan")

    x_GSM = x_GSM.astype(self.experts.dtype)
    xe_GSM, run_plan = x_GSM, plan
    if getattr(self.router, "weights_on", "output") == "input":
      xe_GSM, run_plan = routing.weights_on_input(plan, x_GSM)
    experts = self.experts
    # Experts with biases widen the input to [.., M + 1] (see
    # moejax.layers.experts); a plain experts module has no hooks.
    prepare = getattr(experts, "prepare_input", None)
    if prepare is not None:
      xe_GSM = prepare(xe_GSM)
    weights = ExpertWeights(*experts.weights())
    activation = getattr(experts, "engine_activation", experts.activation)
    if ep is None:
      y_GSM = self.engine(run_plan, xe_GSM, weights, activation)
    else:
      y_GSM = ep.run(self.engine, run_plan, xe_GSM, weights, activation)
    finish = getattr(experts, "finish", None)
    if finish is not None:
      y_GSM = finish(y_GSM, run_plan)
    if self.b_out_M is not None:
      y_GSM = y_GSM + self.b_out_M[...].astype(y_GSM.dtype)
    if self.shared is not None:
      y_GSM = y_GSM + self.shared(x_GSM).astype(y_GSM.dtype)
    if self.residual is not None:
      y_GSM = self.residual(x_GSM, y_GSM)
    y_BLM = y_GSM.reshape(g * s, m)[:b * l].reshape(b, l, m)

    base = routing.plan_losses(plan, out.logits_GSE)
    losses = {"load_balance": base.load_balance, "z_loss": base.z_loss}
    if self.balance_scope != "group" and plan.has_token_view:
      losses["load_balance"] = BALANCE_SCOPES[self.balance_scope](
          plan.probs_GSE, plan.expert_GSK, plan.padding_mask_GS)
    clash = sorted(set(losses) & set(out.losses))
    if clash:
      raise ValueError(f"router {type(self.router).__name__} returns losses "
                       f"{clash}, which the layer computes itself")
    losses.update(out.losses)
    return y_BLM, MoEAux(losses=losses, metrics=routing.routing_metrics(plan),
                         stats=dict(out.stats))


def update_routers(layers, aux):
  """Applies the state updates routers ask for after a step (DeepSeek's bias).

  A forward call never changes router state; call this with the aux the
  forward returned. `layers` is one MoELayer (aux unstacked), or a sequence
  of MoE layers in the order their aux was stacked, or a model with
  `blocks` (DecoderLM, ViTClassifier: its MoE layers in block order). Each
  router with an `update(stats)` method gets its layer's stats. Runs under
  jit or eagerly; changes the routers in place.
  """
  if aux is None:
    return
  if isinstance(layers, MoELayer):
    layers, stats_of = [layers], lambda i: aux.stats
  else:
    if hasattr(layers, "blocks"):
      layers = [blk.ffn for blk in layers.blocks if blk.is_moe]
    layers = list(layers)
    stats_of = lambda i: jax.tree.map(lambda a: a[i], aux.stats)
  for i, layer in enumerate(layers):
    update = getattr(getattr(layer, "router", None), "update", None)
    if update is not None:
      update(jax.tree.map(jax.lax.stop_gradient, stats_of(i)))
