"""Routing metrics: expert load, drops, router entropy, capacity, coverage.

`routing_metrics(plan)` handles the three kinds of plan:

* token choice (slot view and token view);
* expert choice (slot view only: a token may be picked by 0..E experts);
* dropless token choice (token view only, capacity None).

Fractions and means are over the whole batch (all G groups), counting only
real tokens; `effective_capacity_factor` is computed per group and averaged
over the groups that hold something. A token whose padding mask is 0 changes
no metric: appending padded tokens to a batch leaves every field unchanged.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from moejax.routing import losses as losses_lib
from moejax.routing import plan as plan_lib


@flax.struct.dataclass
class RoutingMetrics:
  """Routing statistics of one plan; a pytree of float32 arrays.

  Stack several layers' metrics with
  `jax.tree.map(lambda *x: jnp.stack(x), *metrics)` and average them with
  `jax.tree.map(lambda x: x.mean(0), stacked)`.

  Attributes:
    expert_load_E: <float32>[E] fraction of the kept token-assignments (slots
      actually filled) that went to each expert; sums to 1 when anything is
      kept, all zeros otherwise.
    dropped_fraction: <float32>[] fraction of the real token-assignments
      dropped for lack of capacity; 0 for dropless and expert-choice plans.
      Choices skipped by GShard's random second-expert policy are not
      assignments and count neither as dropped nor in the denominator.
    router_entropy: <float32>[] mean over real tokens of the entropy of
      probs_GSE, in nats (log E at most).
    max_over_mean_load: <float32>[] max_e load / mean_e load (= E *
      max(expert_load_E)); 1 is perfectly balanced, 0 if nothing is kept.
    effective_capacity_factor: <float32>[] per group, the largest per-expert
      demand (assignments chosen, dropped ones included) divided by the
      uniform share T*K/E, T the group's real tokens; averaged over groups
      with real tokens. It is the capacity_factor of `compute_capacity` (up to
      its rounding up) that would have dropped nothing. Expert choice has no
      K and drops nothing: its demand is its filled slots and its share is
      (filled slots)/E, so it is 1 when every expert fills the same number of
      slots.
    coverage_3: <float32>[3] fraction of real tokens processed by 0, 1 and 2
      or more experts (from the slot view when the plan has one, else from
      the token view); sums to 1 when there is a real token.
    mean_k: <float32>[] mean over real tokens of the experts that process
      the token (kept assignments; from the slot view when there is one).
      k for top-k without drops; the mean k of dynamic-k routers (top-p,
      null experts).
  """
  expert_load_E: jax.Array
  dropped_fraction: jax.Array
  router_entropy: jax.Array
  max_over_mean_load: jax.Array
  effective_capacity_factor: jax.Array
  coverage_3: jax.Array
  mean_k: jax.Array


def _safe_div(num, den):
  """num / den where den > 0, else 0 (float32)."""
  num = jnp.asarray(num, jnp.float32)
  den = jnp.asarray(den, jnp.float32)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _check_plan(plan):
  """Returns (probs_GSE float32, mask_GS bool) after checking the plan."""
  if not isinstance(plan, plan_lib.RoutingPlan):
    raise ValueError(f"plan must be a RoutingPlan, got {type(plan).__name__}")
  probs_GSE = losses_lib._check_float_GSE(plan.probs_GSE, "plan.probs_GSE")
  g, s, e = probs_GSE.shape
  if plan.num_experts != e:
    raise ValueError(f"plan.num_experts must equal the last axis of "
                     f"plan.probs_GSE ({e}), got {plan.num_experts!r}")
  if not (plan.has_slot_view or plan.has_token_view):
    raise ValueError("plan must have a slot view (token_GEC) or a token view "
                     "(expert_GSK); it has neither")
  if plan.has_slot_view:
    shape = tuple(np.shape(plan.token_GEC))
    if len(shape) != 3 or shape[:2] != (g, e):
      raise ValueError(f"plan.token_GEC must have shape [G, E, C] with "
                       f"[G, E] = {(g, e)}, got {shape}")
    if plan.capacity is not None and shape[2] != plan.capacity:
      raise ValueError(f"plan.token_GEC's last axis must equal plan.capacity "
                       f"({plan.capacity}), got shape {shape}")
  if plan.has_token_view:
    shape = tuple(np.shape(plan.expert_GSK))
    if len(shape) != 3 or shape[:2] != (g, s):
      raise ValueError(f"plan.expert_GSK must have shape [G, S, K] with "
                       f"[G, S] = {(g, s)}, got {shape}")
    if plan.slot_GSK is not None and tuple(np.shape(plan.slot_GSK)) != shape:
      raise ValueError(f"plan.slot_GSK must have expert_GSK's shape {shape}, "
                       f"got {tuple(np.shape(plan.slot_GSK))}")
  mask_GS = losses_lib._mask_GS(plan.padding_mask_GS, (g, s))
  return probs_GSE, mask_GS


def _slot_view_counts(token_GEC, mask_GS):
  """(kept_GE, per_token_GS): filled slots per expert; slots per real token."""
  g, s = mask_GS.shape
  token_GEC = token_GEC.astype(jnp.int32)
  in_range_GEC = (token_GEC >= 0) & (token_GEC < s)
  index_GEC = jnp.where(in_range_GEC, token_GEC, s)
  # Column S of the padded mask is False: empty slots hold no real token.
  mask_GX = jnp.concatenate([mask_GS, jnp.zeros((g, 1), jnp.bool_)], axis=1)
  g_idx = jnp.arange(g)[:, None, None]
  filled_GEC = mask_GX[g_idx, index_GEC]
  kept_GE = jnp.sum(filled_GEC, axis=-1).astype(jnp.float32)
  per_token_GX = jnp.zeros((g, s + 1), jnp.float32).at[g_idx, index_GEC].add(
      filled_GEC.astype(jnp.float32))
  return kept_GE, per_token_GX[:, :s]


def routing_metrics(plan):
  """Computes RoutingMetrics for a token-choice, expert-choice or dropless plan.

  Args:
    plan: a RoutingPlan with probs_GSE <float32>[G, S, E] and a slot view
      (token_GEC <int32>[G, E, C]), a token view (expert_GSK <int32>[G, S, K],
      slot_GSK <int32>[G, S, K] or None), or both.
  Returns:
    RoutingMetrics (float32 arrays; expert_load_E [E], coverage_3 [3], the
    rest scalars).
  """
  probs_GSE, mask_GS = _check_plan(plan)
  g, s, e = probs_GSE.shape
  tokens_G = jnp.sum(mask_GS, axis=-1).astype(jnp.float32)
  num_tokens = jnp.sum(tokens_G)

  # Kept assignments per expert and assignments per token: the slot view
  # when there is one (it is what the experts actually process).
  if plan.has_slot_view:
    kept_GE, per_token_GS = _slot_view_counts(plan.token_GEC, mask_GS)
  else:
    kept_GSK = plan.kept_GSK() & mask_GS[..., None]
    expert_GSK = jnp.where(kept_GSK, plan.expert_GSK, e).astype(jnp.int32)
    kept_GE = losses_lib._expert_counts(expert_GSK, e, mask_GS)
    per_token_GS = jnp.sum(kept_GSK, axis=-1).astype(jnp.float32)

  kept_E = jnp.sum(kept_GE, axis=0)
  total_kept = jnp.sum(kept_E)
  expert_load_E = _safe_div(kept_E, total_kept)
  max_over_mean_load = (e * jnp.max(expert_load_E)).astype(jnp.float32)

  if plan.has_token_view:
    expert_GSK = plan.expert_GSK.astype(jnp.int32)
    k = expert_GSK.shape[-1]
    real_GSK = (expert_GSK >= 0) & (expert_GSK < e) & mask_GS[..., None]
    demand_GE = losses_lib._expert_counts(expert_GSK, e, mask_GS)
    share_G = tokens_G * k / e
    if plan.slot_GSK is not None and plan.capacity is not None:
      dropped_GSK = real_GSK & (plan.slot_GSK >= plan.capacity)
      dropped_fraction = _safe_div(jnp.sum(dropped_GSK), jnp.sum(real_GSK))
    else:
      dropped_fraction = jnp.zeros((), jnp.float32)
  else:
    # Expert choice: nothing dropped; demand is what each expert took.
    demand_GE = kept_GE
    share_G = jnp.sum(kept_GE, axis=-1) / e
    dropped_fraction = jnp.zeros((), jnp.float32)
  has_share_G = share_G > 0
  ecf_G = _safe_div(jnp.max(demand_GE, axis=-1), share_G)
  effective_capacity_factor = _safe_div(
      jnp.sum(jnp.where(has_share_G, ecf_G, 0.0)), jnp.sum(has_share_G))

  probs_GSE = jnp.where(mask_GS[..., None], probs_GSE, 0.0)
  entropy_GS = jnp.sum(jax.scipy.special.entr(probs_GSE), axis=-1)
  router_entropy = _safe_div(jnp.sum(jnp.where(mask_GS, entropy_GS, 0.0)),
                             num_tokens)

  counts_3 = jnp.stack([
      jnp.sum(mask_GS & (per_token_GS == 0)),
      jnp.sum(mask_GS & (per_token_GS == 1)),
      jnp.sum(mask_GS & (per_token_GS >= 2)),
  ])
  coverage_3 = _safe_div(counts_3, num_tokens)

  return RoutingMetrics(
      expert_load_E=expert_load_E.astype(jnp.float32),
      dropped_fraction=jnp.asarray(dropped_fraction, jnp.float32),
      router_entropy=jnp.asarray(router_entropy, jnp.float32),
      max_over_mean_load=max_over_mean_load,
      effective_capacity_factor=jnp.asarray(effective_capacity_factor,
                                            jnp.float32),
      coverage_3=coverage_3.astype(jnp.float32),
      mean_k=_safe_div(jnp.sum(jnp.where(mask_GS, per_token_GS, 0.0)),
                       num_tokens).astype(jnp.float32))
