"""Dynamic-k routing: a token takes a variable number of experts.

* top-p (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing
  in MoE Models"): experts in order of probability until their cumulative
  probability reaches p,

      P = softmax(x W_r);  sort P descending -> P_(1) >= P_(2) >= ...
      t* = min{ t : P_(1) + ... + P_(t) >= p };  take experts (1) .. (t*)

  (at most `max_k`); the weight of a taken expert is its probability.
* null experts (AdaMoE, Zeng et al. 2024): the router scores E real experts
  and N null experts (zero output, zero compute) and takes top-k of E + N;
  a null choice becomes "no assignment", so a token uses k - (#null) real
  experts.

Both return an ordinary RoutingPlan with K = max_k assignment columns: an
unused column is marked like padding (expert E, weight 0), which every
engine already skips (the dropless engine's layout sends it nowhere, the
capacity engines give it no slot). The number of real assignments per token
is the plan's k; `mean_experts_per_token` (and RoutingMetrics.mean_k)
reports it.
"""

import jax
import jax.numpy as jnp

from moejax.routing.token_choice import assign_slots
from moejax.routing import validation


def top_p_experts(probs_GSE, *, p, max_k):
  """Which of each token's top-`max_k` experts top-p routing takes.

  Args:
    probs_GSE: <float32>[G, S, E] router probabilities (rows sum to 1).
    p: cumulative-probability threshold in (0, 1].
    max_k: K, the most experts a token may take (1 <= K <= E).
  Returns:
    (expert_GSK <int32>[G, S, K] experts by descending probability,
     taken_GSK <bool>[G, S, K]: expert j is taken when the probability of the
     experts before it sums to less than p; the first is always taken).
  """
  top_GSK, expert_GSK = jax.lax.top_k(probs_GSE, max_k)
  before_GSK = jnp.cumsum(top_GSK, axis=-1) - top_GSK
  taken_GSK = before_GSK < p
  taken_GSK = taken_GSK.at[..., 0].set(True)
  return expert_GSK.astype(jnp.int32), taken_GSK


def top_p_routing(logits_GSE, *, p, capacity, max_k=None,
                  padding_mask_GS=None, renormalize=False):
  """Top-p (dynamic-k) token-choice routing (Huang et al. 2024).

  Args:
    logits_GSE: <float>[G, S, E] router logits (cast to float32).
    p: threshold in (0, 1]; p -> 0 gives top-1, p = 1 every expert (up to
      max_k).
    capacity: C slots per expert per group, or None (dropless).
    max_k: K columns of the plan (default E); slots are claimed
      choice-major as for top-k.
    padding_mask_GS: <bool>[G, S] or None.
    renormalize: divide the taken weights by their sum.
  Returns:
    RoutingPlan (K = max_k; untaken columns are expert E, weight 0).
  """
  validation.check_logits(logits_GSE)
  g, s, e = logits_GSE.shape
  max_k = e if max_k is None else max_k
  validation.check_k(max_k, e)
  if not (isinstance(p, (int, float)) and not isinstance(p, bool)
          and 0 < p <= 1):
    raise validation.OptionError("p", p, f"top-p threshold p must be in "
                                 f"(0, 1], got {p!r}")
  probs_GSE = jax.nn.softmax(logits_GSE.astype(jnp.float32), axis=-1)
  expert_GSK, taken_GSK = top_p_experts(probs_GSE, p=p, max_k=max_k)
  weight_GSK = jnp.where(taken_GSK, jnp.take_along_axis(
      probs_GSE, expert_GSK, axis=-1), 0.0)
  if renormalize:
    weight_GSK = weight_GSK / jnp.maximum(
        jnp.sum(weight_GSK, -1, keepdims=True), 1e-9)
  expert_GSK = jnp.where(taken_GSK, expert_GSK, e)
  return assign_slots(expert_GSK, weight_GSK, probs_GSE,
                         capacity=capacity, padding_mask_GS=padding_mask_GS)


def null_expert_routing(logits_GSX, *, num_experts, k, capacity,
                        padding_mask_GS=None, renormalize=True):
  """AdaMoE routing: top-k over E real and N = X - E null experts.

  Args:
    logits_GSX: <float>[G, S, E + N] logits, real experts first.
    num_experts: E, the real experts; the last N columns are null.
    k: choices per token over all E + N (1 <= k <= E + N).
    capacity: C per real expert, or None (dropless).
    padding_mask_GS: <bool>[G, S] or None.
    renormalize: weights = probabilities of the k choices divided by their
      sum (AdaMoE's top-k softmax; a null choice keeps its share, so a
      token that picks nulls gets a smaller total real weight).
  Returns:
    (plan, probs_GSX <float32>[G, S, E + N], choice_GSK <int32>[G, S, K]
     every choice over E + N, for the balance loss over all experts).
    The plan's probs_GSE are the real experts' probabilities renormalised
    to sum 1; a null choice is expert E (no assignment), weight 0.
  """
  validation.check_logits(logits_GSX)
  g, s, x = logits_GSX.shape
  e = num_experts
  validation.check_int("num_experts", e, 1)
  if e >= x:
    raise validation.OptionError("num_experts", e, f"logits have {x} columns; "
                                 f"need E={e} real plus at least one null")
  validation.check_k(k, x)
  probs_GSX = jax.nn.softmax(logits_GSX.astype(jnp.float32), axis=-1)
  top_GSK, choice_GSK = jax.lax.top_k(probs_GSX, k)
  weight_GSK = top_GSK
  if renormalize:
    weight_GSK = weight_GSK / jnp.maximum(
        jnp.sum(weight_GSK, -1, keepdims=True), 1e-9)
  real_GSK = choice_GSK < e
  expert_GSK = jnp.where(real_GSK, choice_GSK, e).astype(jnp.int32)
  weight_GSK = jnp.where(real_GSK, weight_GSK, 0.0)
  real_probs_GSE = probs_GSX[..., :e]
  real_probs_GSE = real_probs_GSE / jnp.maximum(
      jnp.sum(real_probs_GSE, -1, keepdims=True), 1e-9)
  plan = assign_slots(expert_GSK, weight_GSK, real_probs_GSE,
                         capacity=capacity, padding_mask_GS=padding_mask_GS)
  return plan, probs_GSX, choice_GSK.astype(jnp.int32)


def mean_experts_per_token(plan):
  """<float32>[] mean over real tokens of the assignments that reach an
  expert (token view: kept_GSK; for dynamic-k plans this is the mean k)."""
  kept_GSK = plan.kept_GSK()
  mask_GS = (jnp.ones(kept_GSK.shape[:2], jnp.bool_)
             if plan.padding_mask_GS is None else plan.padding_mask_GS)
  per_token_GS = jnp.sum(kept_GSK, -1).astype(jnp.float32)
  n = jnp.maximum(jnp.sum(mask_GS.astype(jnp.float32)), 1.0)
  return jnp.sum(jnp.where(mask_GS, per_token_GS, 0.0)) / n
