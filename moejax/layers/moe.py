"""MoELayer: group -> route -> dispatch -> experts -> combine (+ shared experts).

The layer is a thin NNX shell over pure functions: routers in moejax.routing
turn float32 logits into a RoutingPlan; an engine in moejax.layers.dispatch
runs the experts on it. It returns `(y, aux)` where aux is an explicit MoEAux
of losses and metrics; nothing is hidden in global state.
"""

import logging
from typing import Optional

import flax.struct
from flax import nnx
import jax
import jax.numpy as jnp

from moejax import notation as nt
from moejax import routing
from moejax.layers import dispatch as dispatch_lib
from moejax.layers import experts as experts_lib
from moejax.layers import ffn as ffn_lib
from moejax.layers import gmm as gmm_lib
from moejax.layers import params as params_lib
from moejax.routing import validation
from moejax.routing.token_choice import GATINGS
from moejax.routing.token_choice import SECOND_EXPERT_POLICIES

ROUTERS = ("token_choice", "expert_choice", "hash", "balanced", "deepseek",
           "noisy_top_k")
# Routers whose choice for one token depends on later tokens of the group.
NON_CAUSAL_ROUTERS = ("expert_choice", "balanced")
RESIDUAL_MIXES = ("sum", "learned")


@flax.struct.dataclass
class MoELosses:
  """Auxiliary losses of one MoE layer, float32 scalars (0 where unused).

  load_balance: Switch/GShard loss (weight it by ~1e-2).
  z_loss: ST-MoE router z-loss (~1e-3).
  importance, load: Shazeer 2017 CV^2 losses (noisy top-k only).
  sequence_balance: DeepSeek sequence-wise balance loss (group == sequence).
  """
  load_balance: jax.Array
  z_loss: jax.Array
  importance: jax.Array
  load: jax.Array
  sequence_balance: jax.Array

  @classmethod
  def zeros(cls):
    z = jnp.zeros((), jnp.float32)
    return cls(z, z, z, z, z)

  def weighted_sum(self, weights):
    """sum_name weights[name] * loss; unknown names raise ValueError."""
    names = set(self.__dataclass_fields__)
    unknown = set(weights) - names
    if unknown:
      raise ValueError(f"unknown aux loss names {sorted(unknown)}; allowed: "
                       f"{sorted(names)}")
    return sum((w * getattr(self, n) for n, w in weights.items() if w),
               jnp.zeros((), jnp.float32))


@flax.struct.dataclass
class MoEAux:
  """What an MoE layer reports besides its output: losses and metrics."""
  losses: MoELosses
  metrics: routing.RoutingMetrics


class RouterBias(nnx.Variable):
  """Selection-only expert bias (DeepSeek aux-loss-free balancing); not trained
  by gradients, updated by the layer from the observed load."""


def _check_int(name, value, minimum):
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_cf(name, value):
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
      value > 0):
    raise ValueError(f"{name} must be a number > 0, got {value!r}")


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


class MoELayer(nnx.Module):
  """A sparse MoE FFN block.

  Example:
    layer = MoELayer(model_dim=512, hidden_dim=1024, num_experts=16, k=2,
                     router='token_choice', engine='indices',
                     capacity_factor=1.0, group_size=1024, rngs=nnx.Rngs(0))
    y_BLM, aux = layer(x_BLM)

  Args:
    model_dim, hidden_dim, num_experts: M, H, E.
    k: experts per token (token-choice routers).
    router: one of ROUTERS.
    engine: 'einsum', 'indices' or 'dropless' (dropless ignores capacity);
      'pallas' is the dropless engine on the moejax.pallas kernels (permute,
      grouped matmul, unpermute); the layer then reports engine 'dropless'.
    capacity_factor, eval_capacity_factor: training / evaluation capacity
      factors (eval defaults to the training one); K is in the formula.
    capacity: explicit C per expert per group, overriding the factors.
    min_capacity, capacity_multiple_of: see routing.compute_capacity.
    group_size: S; None uses each sequence as one group (S = L).
    pad_groups: pad the last group (with a warning) when S does not divide
      B*L; False raises instead.
    activation: relu, gelu, swiglu, geglu.
    gating, renormalize, batch_prioritized, second_expert_policy: token-
      choice options (routing.token_choice).
    jitter_eps: Switch's multiplicative input jitter on the router input at
      training time (0 disables).
    num_expert_groups, topk_groups, routed_scaling_factor, bias_update_rate:
      DeepSeek router options.
    sinkhorn_iters: BASE/Sinkhorn iterations (router='balanced').
    hash_seed: hash router seed.
    num_shared_experts, shared_hidden_dim: DeepSeekMoE always-on experts
      (one dense FFN of width num_shared_experts * shared_hidden_dim).
    residual_hidden_dim: a dense FFN branch added to the MoE output
      (Residual-MoE); residual_mix 'sum' or 'learned' (per-token softmax
      mixing coefficients, as DeepSpeed-MoE's PR-MoE residual).
    causal: the layer sits in a causal decoder; routers that read later
      tokens (expert_choice, balanced at train time, batch_prioritized) raise
      unless allow_non_causal=True.
    dropless_tile, gmm_impl: dropless engine options ('scan',
      'ragged_dot', 'pallas'; or a gmm callable).
    pallas_backend: kernels for engine='pallas' / gmm_impl='pallas': 'auto'
      (GPU -> triton, TPU -> mosaic, CPU -> the XLA paths) or any of
      moejax.pallas.BACKENDS (e.g. 'triton_interpret' in tests).
    dtype, param_dtype: compute and parameter dtypes (router math is float32).
    mesh, expert_parallel: expert parallelism (moejax.sharding). Both None
      (default): the layer runs as written, on whatever devices its inputs
      are. Both given: `mesh` is a jax.sharding.Mesh with Auto axes (build it
      with moejax.sharding.make_mesh) and `expert_parallel` is 'shard_map'
      (jax.shard_map + all_to_all; any engine) or 'gspmd' (sharding
      constraints on the expert buffers; einsum and indices engines). Token
      groups are split over `token_axes`, experts over 'expert', H over
      'tensor'; each device routes its own groups. Results equal the
      unsharded layer's. See docs/sharding.md.
    token_axes: mesh axes the token groups are split over; default the
      mesh's data, fsdp and expert axes.
    dropless_collective: how the dropless engine moves rows under expert
      parallelism: 'auto' (ragged_all_to_all on GPU/TPU, padded all_to_all
      on CPU), 'ragged' or 'padded'.
    rngs: nnx.Rngs ('params' for init; 'router' stream for jitter/noise).
  """

  def __init__(self, model_dim, hidden_dim, num_experts, *, k=2,
               router="token_choice", engine="indices", capacity_factor=1.0,
               eval_capacity_factor=None, capacity=None, min_capacity=1,
               capacity_multiple_of=1, group_size=None, pad_groups=True,
               activation="relu", gating="softmax", renormalize=False,
               batch_prioritized=False, second_expert_policy="all",
               jitter_eps=0.0, num_expert_groups=1, topk_groups=1,
               routed_scaling_factor=1.0, bias_update_rate=1e-3,
               sinkhorn_iters=20, hash_seed=0, num_shared_experts=0,
               shared_hidden_dim=None, residual_hidden_dim=0,
               residual_mix="sum", causal=False, allow_non_causal=False,
               dropless_tile=128, gmm_impl="scan", pallas_backend="auto",
               dtype=jnp.float32,
               param_dtype=jnp.float32, mesh=None, expert_parallel=None,
               token_axes=None, dropless_collective="auto", rngs):
    _check_int("model_dim", model_dim, 1)
    _check_int("hidden_dim", hidden_dim, 1)
    _check_int("num_experts", num_experts, 1)
    validation.check_choice("router", router, ROUTERS)
    # engine='pallas' is the dropless engine with the moejax.pallas kernels.
    self.pallas_backend = pallas_backend if engine == "pallas" else None
    engine = "dropless" if engine == "pallas" else engine
    dispatch_lib.check_engine(engine)
    params_lib.check_activation(activation)
    validation.check_k(k, num_experts)
    _check_cf("capacity_factor", capacity_factor)
    _check_cf("eval_capacity_factor", eval_capacity_factor)
    if capacity is not None:
      _check_int("capacity", capacity, 1)
    if group_size is not None:
      _check_int("group_size", group_size, 1)
    _check_int("num_shared_experts", num_shared_experts, 0)
    _check_int("residual_hidden_dim", residual_hidden_dim, 0)
    validation.check_choice("residual_mix", residual_mix, RESIDUAL_MIXES)
    validation.check_choice("gating", gating, GATINGS)
    validation.check_choice("second_expert_policy", second_expert_policy,
                            SECOND_EXPERT_POLICIES)
    _check_int("dropless_tile", dropless_tile, 1)
    if not callable(gmm_impl):
      validation.check_choice("gmm_impl", gmm_impl,
                              (*dispatch_lib.GMM_IMPLS, "pallas"))
    if router == "expert_choice" and engine == "dropless":
      raise ValueError("engine 'dropless' needs a token-choice router; "
                       "router 'expert_choice' fills fixed slots: use engine "
                       "'einsum' or 'indices'")
    if router == "balanced" and k != 1:
      raise ValueError(f"router 'balanced' (BASE) routes each token to one "
                       f"expert; k must be 1, got {k}")
    if causal and not allow_non_causal:
      reason = None
      if router in NON_CAUSAL_ROUTERS:
        reason = f"router {router!r} chooses tokens using the whole group"
      elif batch_prioritized:
        reason = "batch_prioritized routing orders tokens by later tokens' scores"
      if reason:
        raise ValueError(
            f"{reason}, so in a causal layer a token's output would depend "
            f"on future tokens. Use a token-choice router, or pass "
            f"allow_non_causal=True to accept the leak knowingly.")

    self.model_dim, self.hidden_dim, self.num_experts = (
        model_dim, hidden_dim, num_experts)
    self.k = k
    self.router = router
    self.engine = engine
    self.capacity_factor = capacity_factor
    self.eval_capacity_factor = eval_capacity_factor
    self.capacity = capacity
    self.min_capacity = min_capacity
    self.capacity_multiple_of = capacity_multiple_of
    self.group_size = group_size
    self.pad_groups = pad_groups
    self.activation = activation
    self.gating = gating
    self.renormalize = renormalize
    self.batch_prioritized = batch_prioritized
    self.second_expert_policy = second_expert_policy
    self.jitter_eps = jitter_eps
    self.num_expert_groups = num_expert_groups
    self.topk_groups = topk_groups
    self.routed_scaling_factor = routed_scaling_factor
    self.bias_update_rate = bias_update_rate
    self.sinkhorn_iters = sinkhorn_iters
    self.hash_seed = hash_seed
    self.residual_mix = residual_mix
    self.dropless_tile = dropless_tile
    if self.pallas_backend is not None or gmm_impl == "pallas":
      from moejax import pallas  # lazy: pallas imports moejax.layers
      self.gmm_fn = pallas.make_gmm_fn(pallas.resolve_backend(pallas_backend))
    else:
      self.gmm_fn = gmm_impl if callable(gmm_impl) else (
          dispatch_lib.GMM_IMPLS[gmm_impl])
    self.dtype = dtype
    self.deterministic = False
    self.mesh = self.expert_parallel = self.token_axes = None
    self.dropless_collective = dropless_collective
    if mesh is not None or expert_parallel is not None:
      self.set_expert_parallel(mesh, expert_parallel, token_axes=token_axes,
                               dropless_collective=dropless_collective)

    e, m = num_experts, model_dim
    router_init = nnx.initializers.variance_scaling(
        0.1, "fan_in", "truncated_normal")
    self.w_router_ME = (None if router == "hash" else params_lib.param(
        rngs, router_init, (m, e), (nt.EMBED, nt.EXPERT), jnp.float32))
    self.w_noise_ME = (params_lib.param(
        rngs, nnx.initializers.zeros_init(), (m, e), (nt.EMBED, nt.EXPERT),
        jnp.float32) if router == "noisy_top_k" else None)
    self.router_bias_E = (RouterBias(jnp.zeros((e,), jnp.float32))
                          if router == "deepseek" else None)
    self.experts = experts_lib.Experts(
        e, m, hidden_dim, activation=activation, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    self.shared = (ffn_lib.DenseFFN(
        m, num_shared_experts * (shared_hidden_dim or hidden_dim),
        activation=activation, dtype=dtype, param_dtype=param_dtype,
        rngs=rngs) if num_shared_experts else None)
    self.residual = (ffn_lib.DenseFFN(
        m, residual_hidden_dim, activation=activation, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs) if residual_hidden_dim else None)
    self.w_mix_M2 = (params_lib.param(
        rngs, nnx.initializers.zeros_init(), (m, 2), (nt.EMBED, None),
        jnp.float32) if residual_hidden_dim and residual_mix == "learned"
                     else None)
    needs_rng = jitter_eps > 0 or router == "noisy_top_k" or (
        second_expert_policy == "random")
    self.rngs = rngs.fork() if needs_rng else None

  def set_expert_parallel(self, mesh, expert_parallel, *, token_axes=None,
                          dropless_collective="auto"):
    """Turns expert parallelism on (mesh and mode) or off (both None).

    See the class docstring for the arguments; raises ValueError for an
    impossible combination (e.g. E neither a multiple nor a divisor of the
    expert axis size, dropless with 'gspmd').
    """
    if (mesh is None) != (expert_parallel is None):
      raise ValueError("mesh and expert_parallel go together: give both (e.g. "
                       "expert_parallel='shard_map') or neither; got mesh="
                       f"{mesh!r}, expert_parallel={expert_parallel!r}")
    if mesh is not None:
      from moejax.sharding import expert_parallel as ep_lib  # no import cycle
      from moejax.sharding import ragged as ragged_lib
      ep_lib.check_engine_mode(self.engine, expert_parallel)
      ep_lib.expert_layout(mesh, self.num_experts, hidden_dim=self.hidden_dim,
                           token_axes=token_axes)
      ragged_lib.resolve_collective(dropless_collective,
                                    mesh.devices.flat[0].platform)
    self.mesh = mesh
    self.expert_parallel = expert_parallel
    self.token_axes = None if token_axes is None else tuple(token_axes)
    self.dropless_collective = dropless_collective

  def _expert_layout(self):
    """The moejax.sharding ExpertLayout, or None without expert parallelism."""
    if self.expert_parallel is None:
      return None
    from moejax.sharding import expert_parallel as ep_lib
    return ep_lib.expert_layout(self.mesh, self.num_experts,
                                hidden_dim=self.hidden_dim,
                                token_axes=self.token_axes)

  def _per_group(self, router_fn, layout):
    """router_fn, run on each device's own groups under expert parallelism."""
    if layout is None:
      return router_fn
    from moejax.sharding import expert_parallel as ep_lib
    return ep_lib.group_local(router_fn, layout)

  def layer_capacity(self, group_size, deterministic):
    """C for this call (None for the dropless engine)."""
    if self.engine == "dropless":
      return None
    if self.capacity is not None:
      return self.capacity
    cf = self.capacity_factor
    if deterministic and self.eval_capacity_factor is not None:
      cf = self.eval_capacity_factor
    k = 1 if self.router in ("expert_choice", "balanced") else self.k
    if self.router == "expert_choice":
      return routing.expert_choice_capacity(group_size, self.num_experts, cf)
    return routing.compute_capacity(
        group_size, self.num_experts, k=k, capacity_factor=cf,
        min_capacity=self.min_capacity, multiple_of=self.capacity_multiple_of)

  def _route(self, x_GSM, mask_GS, token_ids_GS, capacity, deterministic,
             layout=None):
    """Returns (plan, logits_GSE or None, extra losses dict)."""
    extra = {}
    local = lambda fn: self._per_group(fn, layout)
    if self.router == "hash":
      if token_ids_GS is None:
        raise ValueError("router 'hash' needs token_ids_BL (the token ids of "
                         "the input), got None")
      plan = local(routing.hash_routing)(token_ids_GS, self.num_experts,
                                  capacity=capacity, k=self.k,
                                  padding_mask_GS=mask_GS, seed=self.hash_seed)
      return plan, None, extra
    xr_GSM = x_GSM.astype(jnp.float32)
    if self.jitter_eps > 0 and not deterministic:
      xr_GSM = xr_GSM * jax.random.uniform(
          self.rngs.router(), xr_GSM.shape, jnp.float32,
          1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
    logits_GSE = jnp.einsum("GSM,ME->GSE", xr_GSM, self.w_router_ME[...])
    if self.router == "token_choice":
      rng = (self.rngs.router() if self.second_expert_policy == "random"
             else None)
      plan = local(routing.token_choice)(
          logits_GSE, k=self.k, capacity=capacity,
          batch_prioritized=self.batch_prioritized, padding_mask_GS=mask_GS,
          gating=self.gating, renormalize=self.renormalize,
          second_expert_policy=self.second_expert_policy, rng=rng,
          routed_scaling_factor=self.routed_scaling_factor)
    elif self.router == "expert_choice":
      plan = local(routing.expert_choice)(logits_GSE, capacity=capacity,
                                   padding_mask_GS=mask_GS)
    elif self.router == "balanced":
      plan = local(routing.balanced_assignment)(
          logits_GSE, capacity=capacity, train=not deterministic,
          num_iters=self.sinkhorn_iters, padding_mask_GS=mask_GS)
    elif self.router == "deepseek":
      plan = local(routing.aux_free_bias_route)(
          logits_GSE, self.router_bias_E[...], k=self.k, capacity=capacity,
          gating=self.gating if self.gating != "softmax" else "sigmoid",
          num_expert_groups=self.num_expert_groups,
          topk_groups=self.topk_groups,
          routed_scaling_factor=self.routed_scaling_factor,
          padding_mask_GS=mask_GS, renormalize=True)
      extra["sequence_balance"] = routing.sequence_balance_loss(
          plan.probs_GSE, plan.expert_GSK, mask_GS)
      if not deterministic:
        load_E = routing.expert_load_counts(plan)
        self.router_bias_E[...] = routing.update_bias(
            self.router_bias_E[...], load_E, rate=self.bias_update_rate)
    else:  # noisy_top_k
      noise_logits_GSE = jnp.einsum("GSM,ME->GSE", xr_GSM,
                                    self.w_noise_ME[...])
      rng = None if deterministic else self.rngs.router()
      plan = local(routing.noisy_top_k)(
          logits_GSE, noise_logits_GSE, k=self.k, capacity=capacity, rng=rng,
          train=not deterministic, padding_mask_GS=mask_GS)
      noisy_GSE, std_GSE = routing.noisy_logits(
          logits_GSE, noise_logits_GSE, rng, not deterministic)
      gates_GSE = routing.top_k_gates(noisy_GSE, self.k)
      extra["importance"] = routing.importance_loss(gates_GSE, mask_GS)
      if not deterministic:
        extra["load"] = routing.load_loss(routing.load_probability(
            logits_GSE, noisy_GSE, std_GSE, self.k), mask_GS)
    return plan, logits_GSE, extra

  def __call__(self, x_BLM, *, padding_mask_BL=None, token_ids_BL=None,
               deterministic: Optional[bool] = None):
    """Applies the layer.

    Args:
      x_BLM: <dtype>[B, L, M].
      padding_mask_BL: optional <bool>[B, L]; padded tokens take no slot and
        add nothing to losses or metrics (their output is 0 from the experts).
      token_ids_BL: <int32>[B, L], needed by the hash router.
      deterministic: evaluation mode (eval capacity factor, no noise/jitter,
        no bias update); defaults to the module's `deterministic` attribute
        (set by `model.eval()` / `model.train()`).
    Returns:
      (y_BLM <dtype>[B, L, M], MoEAux).
    """
    if getattr(x_BLM, "ndim", None) != 3 or x_BLM.shape[-1] != self.model_dim:
      raise ValueError(f"x_BLM must have shape [B, L, {self.model_dim}], got "
                       f"{getattr(x_BLM, 'shape', None)}")
    b, l, m = x_BLM.shape
    if padding_mask_BL is not None and tuple(padding_mask_BL.shape) != (b, l):
      raise ValueError(f"padding_mask_BL must have shape {(b, l)} [B, L], got "
                       f"{tuple(padding_mask_BL.shape)}")
    if token_ids_BL is not None and tuple(token_ids_BL.shape) != (b, l):
      raise ValueError(f"token_ids_BL must have shape {(b, l)} [B, L], got "
                       f"{tuple(token_ids_BL.shape)}")
    det = self.deterministic if deterministic is None else deterministic
    s = self.group_size or l
    x_GSM, mask_GS, pad = group_tokens(x_BLM, s, padding_mask_BL,
                                       pad=self.pad_groups)
    g = x_GSM.shape[0]
    token_ids_GS = None
    if token_ids_BL is not None:
      token_ids_GS = jnp.pad(token_ids_BL.reshape(-1), (0, pad)).reshape(g, s)
    capacity = self.layer_capacity(s, det)
    layout = self._expert_layout()
    if layout is not None:  # token groups split over the token axes
      from moejax.sharding import expert_parallel as ep_lib
      x_GSM = ep_lib.constrain_groups(x_GSM, layout)
    plan, logits_GSE, extra = self._route(x_GSM, mask_GS, token_ids_GS,
                                          capacity, det, layout)

    x_GSM = x_GSM.astype(self.dtype)
    weights = dispatch_lib.ExpertWeights(*self.experts.weights())
    kwargs = ({"tile": self.dropless_tile, "gmm_fn": self.gmm_fn}
              if self.engine == "dropless" else {})
    if layout is None and self.pallas_backend is not None:
      from moejax import pallas
      y_GSM = pallas.pallas_dropless_engine(
          plan, x_GSM, weights, self.activation, tile=self.dropless_tile,
          backend=self.pallas_backend)
    elif layout is None:
      y_GSM = dispatch_lib.run_engine(self.engine, plan, x_GSM, weights,
                                      self.activation, **kwargs)
    else:
      if self.engine == "dropless":
        kwargs["collective"] = self.dropless_collective
      y_GSM = ep_lib.run_engine_ep(
          self.engine, plan, x_GSM, weights, self.activation, mesh=self.mesh,
          mode=self.expert_parallel, token_axes=self.token_axes, **kwargs)
    if self.shared is not None:
      y_GSM = y_GSM + self.shared(x_GSM)
    if self.residual is not None:
      dense_GSM = self.residual(x_GSM)
      if self.w_mix_M2 is None:
        y_GSM = y_GSM + dense_GSM
      else:
        mix_GS2 = jax.nn.softmax(jnp.einsum(
            "GSM,MZ->GSZ", x_GSM.astype(jnp.float32), self.w_mix_M2[...]))
        mix_GS2 = mix_GS2.astype(self.dtype)
        y_GSM = y_GSM * mix_GS2[..., :1] + dense_GSM * mix_GS2[..., 1:]
    y_BLM = y_GSM.reshape(g * s, m)[:b * l].reshape(b, l, m)

    base = routing.plan_losses(plan, logits_GSE)
    losses = MoELosses.zeros().replace(load_balance=base.load_balance,
                                       z_loss=base.z_loss, **extra)
    return y_BLM, MoEAux(losses=losses, metrics=routing.routing_metrics(plan))
