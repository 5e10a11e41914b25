"""Dense-to-sparse routers whose behaviour follows the training step.

* EvoMoE's dense-to-sparse gate (Nie et al. 2021): a temperature annealed
  from dense mixing to sparse top-k,

      w = softmax((x W_r [+ gumbel]) / tau(step))
      tau(step) = max(tau_end, tau_start * (tau_end / tau_start)^(step / T))

  and a token runs every expert whose weight is >= `threshold` (its best
  always); once step >= T (`anneal_steps`) the gate is plain top-k softmax.
* StableMoE (Dai et al. 2022), two stages: in stage 1 (step < `stage1_steps`)
  a top-1 router over expert centroids, s = x C^T, weight sigmoid(s_e),
  learns the routing while a lightweight router (a word embedding of the
  token id and its own centroids, D << M) is distilled from it (cross
  entropy against stage 1's choice, `stable_distill`). At the step where
  stage 2 starts, the distilled router is frozen into a table token id ->
  expert (`route_V`, not a parameter, so no optimizer touches it); stage 2
  routes by that table, so a token's expert never changes again.

The step reaches the router through the router-state hook (no global):
`update(stats)` (called by the train step through `update_routers` after
every optimizer step) advances a `RouterStep` counter, and `set_step(n)`
sets it (a resumed run restores it with the model state). A forward call
changes nothing.
"""

from flax import nnx
import jax
import jax.numpy as jnp

from moejax import notation as nt
from moejax.layers import params as params_lib
from moejax.layers import routers as routers_lib
from moejax.routing import validation
from moejax.routing.token_choice import assign_slots


class RouterStep(nnx.Variable):
  """The router's count of optimizer steps (int32 scalar; not trained)."""


class FrozenRoute(nnx.Variable):
  """A frozen routing table (StableMoE stage 2; not trained)."""


def annealed_temperature(step, *, start, end, anneal_steps):
  """<float32>[] tau(step): start * (end / start)^(step / T), floored at end."""
  frac = jnp.minimum(jnp.asarray(step, jnp.float32) / anneal_steps, 1.0)
  return jnp.maximum(end, start * (end / start) ** frac).astype(jnp.float32)


class _StepRouter(routers_lib.Router):
  """A router with a step counter advanced by `update`."""

  def _init_step(self):
    self.step = RouterStep(jnp.zeros((), jnp.int32))

  def set_step(self, step):
    """Sets the step counter (e.g. to the trainer's step when resuming)."""
    self.step[...] = jnp.asarray(step, jnp.int32)

  def update(self, stats):
    """One optimizer step happened: step += 1."""
    del stats
    self.step[...] = self.step[...] + 1


class DenseToSparseRouter(_StepRouter):
  """EvoMoE's dense-to-sparse gate (module docstring).

  Args:
    model_dim, num_experts: M, E.
    k: experts per token once sparse (step >= anneal_steps).
    start_temperature, end_temperature: tau at step 0 and at anneal_steps
      (EvoMoE: 2.0 -> 0.3).
    anneal_steps: T, the steps of the dense-to-sparse phase.
    threshold: a token runs the experts whose weight is >= threshold during
      the annealing (at most max_k of them, its best always).
    max_k: the plan's K during annealing (default E); capacity engines size
      slots for it, so prefer the dropless engine.
    gumbel: add Gumbel noise to the logits at training time ('router'
      stream; the router is then not group-local).
    rngs: nnx.Rngs.
  Parameters: w_router_ME [M, E]; state step [] (RouterStep).
  """

  def __init__(self, model_dim, num_experts, *, k=1, start_temperature=2.0,
               end_temperature=0.3, anneal_steps=1000, threshold=0.1,
               max_k=None, gumbel=False, rngs):
    max_k = num_experts if max_k is None else max_k
    validation.check_k(max_k, num_experts)
    validation.check_k(k, max_k)
    self._init_common(model_dim, num_experts, max_k)
    self.final_k = k
    routers_lib.check_number("start_temperature", start_temperature, 0,
                             open_low=True)
    routers_lib.check_number("end_temperature", end_temperature, 0,
                             open_low=True)
    validation.check_int("anneal_steps", anneal_steps, 1)
    routers_lib.check_number("threshold", threshold, 0)
    self.start_temperature = float(start_temperature)
    self.end_temperature = float(end_temperature)
    self.anneal_steps = anneal_steps
    self.threshold = float(threshold)
    self.gumbel = bool(gumbel)
    self.group_local = not self.gumbel
    self.w_router_ME = routers_lib.router_weight(rngs, model_dim, num_experts)
    self.rngs = rngs.fork() if self.gumbel else None
    self._init_step()

  def experts_per_token(self, capacity_factor):
    """k: the sparse phase (the model trains there after annealing)."""
    del capacity_factor
    return self.final_k

  def temperature(self):
    """<float32>[] tau at the current step."""
    return annealed_temperature(self.step[...], start=self.start_temperature,
                                end=self.end_temperature,
                                anneal_steps=self.anneal_steps)

  def __call__(self, x_GSM, *, capacity, padding_mask_GS=None,
               token_ids_GS=None, deterministic=False):
    """<float>[G, S, M] -> RouterOutput (K = max_k columns)."""
    del token_ids_GS
    logits_GSE = self.logits(x_GSM)
    e = self.num_experts
    noisy_GSE = logits_GSE
    if self.gumbel and not deterministic:
      noisy_GSE = logits_GSE + jax.random.gumbel(self.rngs.router(),
                                                 logits_GSE.shape)
    # Annealing: threshold on the tempered softmax.
    w_GSE = jax.nn.softmax(noisy_GSE / self.temperature(), axis=-1)
    top_GSK, expert_GSK = jax.lax.top_k(w_GSE, self.k)
    taken_GSK = (top_GSK >= self.threshold).at[..., 0].set(True)
    # Sparse: top-k of the plain softmax (columns past k unused).
    probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
    sp_top_GSK, sp_expert_GSK = jax.lax.top_k(probs_GSE, self.k)
    sp_taken_GSK = jnp.arange(self.k) < self.final_k
    sparse = self.step[...] >= self.anneal_steps
    expert_GSK = jnp.where(sparse, sp_expert_GSK, expert_GSK)
    taken_GSK = jnp.where(sparse, sp_taken_GSK, taken_GSK)
    weight_GSK = jnp.where(taken_GSK, jnp.where(sparse, sp_top_GSK, top_GSK),
                           0.0)
    expert_GSK = jnp.where(taken_GSK, expert_GSK, e)
    plan = assign_slots(expert_GSK, weight_GSK, probs_GSE, capacity=capacity,
                        padding_mask_GS=padding_mask_GS)
    return routers_lib.RouterOutput(plan=plan, logits_GSE=logits_GSE)


class StableMoERouter(_StepRouter):
  """StableMoE's two-stage routing (module docstring).

  Args:
    model_dim, num_experts: M, E.
    vocab_size: V of the token ids the distilled router reads.
    distill_dim: D of the lightweight router (StableMoE: 50).
    stage1_steps: steps of stage 1; the table freezes at this step.
    rngs: nnx.Rngs.
  Parameters: centroids_EM [E, M] (stage-1 router), embed_VD [V, D] and
    centroids_ED [E, D] (the distilled router). State: step, route_V <int32>
    [V] (the frozen table; all 0 until stage 2).
  Losses: stable_distill (cross entropy of the distilled router against
    stage 1's top-1; 0 in stage 2; it trains only the distilled router).
  Needs token_ids_GS (the decoder passes its tokens).
  """

  loss_names = ("stable_distill",)
  group_local = True

  def __init__(self, model_dim, num_experts, *, vocab_size, distill_dim=16,
               stage1_steps=1000, rngs):
    self._init_common(model_dim, num_experts, 1)
    validation.check_int("vocab_size", vocab_size, 1)
    validation.check_int("distill_dim", distill_dim, 1)
    validation.check_int("stage1_steps", stage1_steps, 0)
    self.vocab_size, self.stage1_steps = vocab_size, stage1_steps
    init = nnx.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
    self.centroids_EM = params_lib.param(rngs, init, (num_experts, model_dim),
                                         (nt.EXPERT, nt.EMBED), jnp.float32)
    self.embed_VD = params_lib.param(rngs, nnx.initializers.normal(1.0),
                                     (vocab_size, distill_dim),
                                     (nt.VOCAB, None), jnp.float32)
    self.centroids_ED = params_lib.param(
        rngs, nnx.initializers.normal(distill_dim ** -0.5),
        (num_experts, distill_dim), (nt.EXPERT, None), jnp.float32)
    self.route_V = FrozenRoute(jnp.zeros((vocab_size,), jnp.int32))
    self._init_step()

  def distilled_logits(self, token_ids_XS):
    """<float32>[..., E] scores of the lightweight router."""
    emb = jnp.take(self.embed_VD[...], token_ids_XS, axis=0)
    return jnp.einsum("...D,ED->...E", emb, self.centroids_ED[...])

  def update(self, stats):
    """step += 1; at step == stage1_steps the distilled router is frozen
    into route_V (argmax over experts for every token id)."""
    super().update(stats)
    table_V = jnp.argmax(self.distilled_logits(jnp.arange(self.vocab_size)),
                         -1).astype(jnp.int32)
    freeze = self.step[...] == self.stage1_steps
    self.route_V[...] = jnp.where(freeze, table_V, self.route_V[...])

  def __call__(self, x_GSM, *, capacity, padding_mask_GS=None,
               token_ids_GS=None, deterministic=False):
    """<float>[G, S, M] and token ids -> RouterOutput (top-1)."""
    del deterministic
    if token_ids_GS is None:
      raise ValueError("StableMoERouter needs the token ids (MoELayer's "
                       "token_ids_BL), got None")
    logits_GSE = jnp.einsum("GSM,EM->GSE", x_GSM.astype(jnp.float32),
                            self.centroids_EM[...])
    stage2 = self.step[...] >= self.stage1_steps
    learned_GS = jnp.argmax(logits_GSE, -1).astype(jnp.int32)
    frozen_GS = jnp.take(self.route_V[...], token_ids_GS, axis=0)
    expert_GS = jnp.where(stage2, frozen_GS, learned_GS)
    weight_GS = jax.nn.sigmoid(jnp.take_along_axis(
        logits_GSE, expert_GS[..., None], -1)[..., 0])
    probs_GSE = jax.nn.softmax(logits_GSE, -1)
    plan = assign_slots(expert_GS[..., None], weight_GS[..., None], probs_GSE,
                        capacity=capacity, padding_mask_GS=padding_mask_GS)
    # Distillation reads only the token ids and stage 1's choice.
    d_logits_GSE = self.distilled_logits(token_ids_GS)
    ce_GS = -jnp.take_along_axis(jax.nn.log_softmax(d_logits_GSE, -1),
                                 jax.lax.stop_gradient(learned_GS)[..., None],
                                 -1)[..., 0]
    mask_GS = (jnp.ones(ce_GS.shape, jnp.bool_) if padding_mask_GS is None
               else padding_mask_GS)
    ce_G = jnp.sum(jnp.where(mask_GS, ce_GS, 0.0), -1) / jnp.maximum(
        jnp.sum(mask_GS, -1), 1)
    distill = jnp.where(stage2, 0.0, jnp.mean(ce_G)).astype(jnp.float32)
    return routers_lib.RouterOutput(plan=plan, logits_GSE=logits_GSE,
                                    losses={"stable_distill": distill})
