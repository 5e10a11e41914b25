"""DeepSeek-style routing: auxiliary-loss-free bias balancing and
group-limited (node-limited) expert selection (DeepSeek-V2/V3).

* A per-expert bias b_E is added to the gate scores for *selection only*; the
  combine weights come from the unbiased scores. Between steps, outside the
  gradient, `update_bias` nudges b up for underloaded experts and down for
  overloaded ones (DeepSeek-V3 sec. 2.1.2).
* Group-limited routing splits the E experts into `num_expert_groups`
  contiguous groups of E / num_expert_groups experts, scores each group by
  the sum of its two highest (biased) selection scores (group_score
  'top2_sum', DeepSeek-V3; a group of one expert uses that one score) or by
  its highest score ('max', DeepSeek-V2's group_limited_greedy), keeps the
  experts of the `topk_groups` best groups, and selects the top-k experts
  among them.
"""

import jax
import jax.numpy as jnp

from moejax.routing import validation
from moejax.routing.token_choice import GATINGS
from moejax.routing.token_choice import token_choice


_check_int = validation.check_int
GROUP_SCORES = ("top2_sum", "max")


def _check_group_args(num_experts, num_expert_groups, topk_groups):
  _check_int("num_expert_groups", num_expert_groups, 1)
  if num_experts % num_expert_groups:
    raise validation.OptionError(
        "num_expert_groups", num_expert_groups,
        f"num_experts ({num_experts}) must be divisible by "
        f"num_expert_groups, got num_expert_groups={num_expert_groups}")
  _check_int("topk_groups", topk_groups, 1)
  if topk_groups > num_expert_groups:
    raise validation.OptionError(
        "topk_groups", topk_groups, f"topk_groups must be <= "
        f"num_expert_groups ({num_expert_groups}), got {topk_groups}")


def group_limited_scores(scores_GSE, *, num_expert_groups, topk_groups,
                         group_score="top2_sum"):
  """Masks experts outside each token's `topk_groups` best expert groups.

  Group score: 'top2_sum' = sum of the top-2 scores in the group (top-1 when
  a group has a single expert; DeepSeek-V3), 'max' = the group's highest
  score (DeepSeek-V2). Ties between groups go to the lower group index.

  Args:
    scores_GSE: <float>[G, S, E] selection scores (cast to float32).
    num_expert_groups: number of contiguous expert groups; must divide E.
    topk_groups: groups kept per token, 1 <= topk_groups <= num_expert_groups.
    group_score: 'top2_sum' or 'max'.
  Returns:
    <float32>[G, S, E]: the scores, -inf for experts of dropped groups.
  """
  validation.check_logits(scores_GSE, name="scores_GSE")
  g, s, e = scores_GSE.shape
  _check_group_args(e, num_expert_groups, topk_groups)
  validation.check_choice("group_score", group_score, GROUP_SCORES)
  scores_GSE = scores_GSE.astype(jnp.float32)
  if topk_groups == num_expert_groups:
    return scores_GSE
  n = num_expert_groups
  per_group = e // n
  scores_GSNX = scores_GSE.reshape(g, s, n, per_group)
  top = 2 if group_score == "top2_sum" else 1
  top_GSNX, _ = jax.lax.top_k(scores_GSNX, min(top, per_group))
  group_score_GSN = jnp.sum(top_GSNX, axis=-1)
  _, kept_group_GST = jax.lax.top_k(group_score_GSN, topk_groups)
  kept_GSN = jnp.any(
      kept_group_GST[..., None] == jnp.arange(n)[None, None, None, :],
      axis=-2)
  kept_GSE = jnp.repeat(kept_GSN, per_group, axis=-1)
  return jnp.where(kept_GSE, scores_GSE, -jnp.inf)


def aux_free_bias_route(logits_GSE, bias_E, *, k, capacity, gating="sigmoid",
                        num_expert_groups=1, topk_groups=1,
                        routed_scaling_factor=1.0, padding_mask_GS=None,
                        renormalize=True, group_score="top2_sum"):
  """Top-k routing with a selection-only bias and group-limited selection.

  Selection scores are gate(logits) + bias, where gate is sigmoid(logits)
  for 'sigmoid' (DeepSeek-V3), the softmax probability for 'softmax', or the
  logit itself for 'topk_softmax'; then group limiting (`num_expert_groups`
  > 1) keeps only the experts of each token's `topk_groups` best groups.
  Weights come from the unbiased gate of the selected experts (renormalised
  to sum to 1 over the k if `renormalize`, always for 'topk_softmax'), times
  `routed_scaling_factor`. The bias carries no gradient.

  Args:
    logits_GSE: <float>[G, S, E] router logits (cast to float32).
    bias_E: <float>[E] selection bias (cast to float32).
    k: experts per token; 1 <= k <= topk_groups * E / num_expert_groups.
    capacity: C (int >= 1), or None for a dropless plan (DeepSeek-V3 drops
      nothing).
    gating: 'sigmoid', 'softmax' or 'topk_softmax' (see token_choice).
    num_expert_groups: contiguous expert groups; must divide E. 1 = no limit.
    topk_groups: groups each token may use, 1 <= topk_groups <=
      num_expert_groups (ignored in effect when num_expert_groups == 1).
    routed_scaling_factor: multiplies the combine weights.
    padding_mask_GS: <bool>[G, S] or None; padded tokens take no slot.
    renormalize: divide the k weights by their sum.
    group_score: how a group is scored for group limiting, 'top2_sum' (V3)
      or 'max' (V2); see group_limited_scores.
  Returns:
    RoutingPlan; probs_GSE is `gate_probs(logits, gating)` (unbiased).
  """
  validation.check_logits(logits_GSE)
  g, s, e = logits_GSE.shape
  validation.check_k(k, e)
  validation.check_choice("gating", gating, GATINGS)
  _check_group_args(e, num_expert_groups, topk_groups)
  validation.check_choice("group_score", group_score, GROUP_SCORES)
  available = topk_groups * (e // num_expert_groups)
  if k > available:
    raise ValueError(f"k must be <= the experts in the kept groups "
                     f"(topk_groups * E / num_expert_groups = {available}), "
                     f"got k={k}")
  if getattr(bias_E, "shape", None) is None or tuple(bias_E.shape) != (e,):
    raise ValueError(f"bias_E must have shape ({e},) [E], got "
                     f"{getattr(bias_E, 'shape', None)}")

  logits_GSE = logits_GSE.astype(jnp.float32)
  bias_E = jax.lax.stop_gradient(bias_E.astype(jnp.float32))
  if gating == "sigmoid":
    gate_GSE = jax.nn.sigmoid(logits_GSE)
  elif gating == "softmax":
    gate_GSE = jax.nn.softmax(logits_GSE, axis=-1)
  else:
    gate_GSE = logits_GSE
  select_GSE = jax.lax.stop_gradient(gate_GSE) + bias_E
  if num_expert_groups > 1:
    select_GSE = group_limited_scores(select_GSE,
                                      num_expert_groups=num_expert_groups,
                                      topk_groups=topk_groups,
                                      group_score=group_score)
  return token_choice(
      logits_GSE, k=k, capacity=capacity, padding_mask_GS=padding_mask_GS,
      gating=gating, renormalize=renormalize,
      selection_scores_GSE=select_GSE,
      routed_scaling_factor=routed_scaling_factor)


def expert_load_counts(plan, *, include_dropped=True):
  """Per-expert load of a plan, summed over groups: <float32>[E].

  With a token view, counts the (non-padding) assignments to each expert;
  `include_dropped=True` counts assignments dropped for capacity too (the
  demand the bias should balance), False counts only kept ones. A plan with
  only a slot view (expert choice) counts its filled slots.

  Args:
    plan: RoutingPlan.
    include_dropped: see above.
  Returns:
    <float32>[E] assignment counts.
  """
  e = plan.num_experts
  if plan.has_token_view:
    if include_dropped:
      counted_GSK = plan.expert_GSK < e
    else:
      counted_GSK = plan.kept_GSK()
    onehot_GSKE = jax.nn.one_hot(plan.expert_GSK, e, dtype=jnp.float32)
    return jnp.einsum("GSKE,GSK->E", onehot_GSKE,
                      counted_GSK.astype(jnp.float32))
  filled_GEC = plan.token_GEC < plan.group_size
  return jnp.sum(filled_GEC, axis=(0, 2)).astype(jnp.float32)


def update_bias(bias_E, expert_load_E, *, rate):
  """Aux-loss-free bias update: b += rate * sign(mean(load) - load).

  Underloaded experts (load below the mean) get their bias raised by `rate`,
  overloaded ones lowered, experts at the mean are unchanged. Call it outside
  the gradient (the result is under stop_gradient).

  Args:
    bias_E: <float>[E] current bias.
    expert_load_E: <float>[E] load per expert, e.g.
      `expert_load_counts(plan)` (summed over the batch).
    rate: update speed gamma, a number >= 0 (DeepSeek-V3 uses 0.001).
  Returns:
    <float32>[E] the new bias.
  """
  if getattr(bias_E, "ndim", None) != 1:
    raise ValueError(f"bias_E must have rank 1 [E], got shape "
                     f"{getattr(bias_E, 'shape', None)}")
  if tuple(getattr(expert_load_E, "shape", ())) != tuple(bias_E.shape):
    raise ValueError(f"expert_load_E must have shape {tuple(bias_E.shape)} "
                     f"[E], got {getattr(expert_load_E, 'shape', None)}")
  if isinstance(rate, bool) or (isinstance(rate, (int, float)) and
                                not rate >= 0):
    raise ValueError(f"rate must be a number >= 0, got {rate!r}")
  load_E = jax.lax.stop_gradient(expert_load_E.astype(jnp.float32))
  new_bias_E = bias_E.astype(jnp.float32) + rate * jnp.sign(
      jnp.mean(load_E) - load_E)
  return jax.lax.stop_gradient(new_bias_E)
