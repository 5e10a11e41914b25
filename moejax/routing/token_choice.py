"""Token-choice routing: each token picks its top-k experts.

Covers Switch (k=1), GShard (k=2, optional random second expert), any k, and
the gating variants of later models (Mixtral top-k-then-softmax, renormalised
top-k, DeepSeek-V3 sigmoid scores), Shazeer's noisy top-k, Switch input jitter
(applied by the layer to the router input) and batch-prioritized routing.

Slot priority (DESIGN.md): every token's 1st choice claims a slot before any
token's 2nd choice; within a choice, tokens go in order of position, or by
descending top-1 probability with BPR. An assignment past its expert's
capacity is dropped (weight 0, slot C).
"""

from typing import Optional

import jax
import jax.numpy as jnp

from moejax.routing import plan as plan_lib
from moejax.routing import validation

GATINGS = ("softmax", "topk_softmax", "sigmoid")
SECOND_EXPERT_POLICIES = ("all", "random")


def gate_probs(logits_GSE, gating="softmax"):
  """Router probabilities used for losses and metrics.

  Args:
    logits_GSE: <float>[G, S, E]; cast to float32.
    gating: 'softmax' / 'topk_softmax' (softmax over all E) or 'sigmoid'
      (sigmoid scores normalised to sum to 1, as DeepSeek-V3's balance loss).
  Returns:
    <float32>[G, S, E] rows summing to 1.
  """
  validation.check_choice("gating", gating, GATINGS)
  logits_GSE = logits_GSE.astype(jnp.float32)
  if gating == "sigmoid":
    scores = jax.nn.sigmoid(logits_GSE)
    return scores / jnp.sum(scores, axis=-1, keepdims=True)
  return jax.nn.softmax(logits_GSE, axis=-1)


def rank_within_expert(expert_GN, num_experts):
  """Position of each assignment among those sent to the same expert.

  Assignments are ranked in the order they appear along N (earlier first).
  Uses a sort rather than a [G, N, E] one-hot cumsum, so memory is O(G*N)
  whatever E is. The sort key packs (expert, position) into one int32
  (expert * N + n, unique, so an unstable single-array sort gives the stable
  order); on CPU that is ~4-5x faster than a stable argsort, which remains
  the fallback when (E + 1) * N does not fit in int32.

  Args:
    expert_GN: <int32>[G, N] expert of each assignment; values in [0, E]
      (E, the padding sentinel, is ranked too but never read).
    num_experts: E.
  Returns:
    <int32>[G, N] rank of each assignment within its expert.
  """
  g, n = expert_GN.shape
  if (num_experts + 1) * n < 2 ** 31:
    key_GN = (expert_GN.astype(jnp.int32) * n +
              jnp.arange(n, dtype=jnp.int32)[None, :])
    sorted_key_GN = jnp.sort(key_GN, axis=-1)
    order_GN = sorted_key_GN % n
    sorted_e_GN = sorted_key_GN // n
  else:
    order_GN = jnp.argsort(expert_GN, axis=-1, stable=True)
    sorted_e_GN = jnp.take_along_axis(expert_GN, order_GN, axis=-1)
  # First sorted position of each expert id = exclusive cumsum of counts.
  g_idx = jnp.arange(g)[:, None]
  counts_GX = jnp.zeros((g, num_experts + 1), jnp.int32).at[
      g_idx, expert_GN].add(1, mode="drop")
  start_GX = jnp.cumsum(counts_GX, axis=-1) - counts_GX
  rank_sorted_GN = (jnp.arange(n, dtype=jnp.int32)[None, :]
                    - jnp.take_along_axis(start_GX, sorted_e_GN, axis=-1))
  return jnp.zeros((g, n), jnp.int32).at[g_idx, order_GN].set(
      rank_sorted_GN.astype(jnp.int32), unique_indices=True)


def assign_slots(expert_GSK, weight_GSK, probs_GSE, *, capacity,
                 padding_mask_GS=None, token_priority_GS=None):
  """Builds a plan from chosen experts, claiming slots choice-major.

  Args:
    expert_GSK: <int32>[G, S, K] chosen experts, choice 0 first.
    weight_GSK: <float32>[G, S, K] combine weights.
    probs_GSE: <float32>[G, S, E] router probabilities (stored for losses).
    capacity: C (int >= 1), or None for a dropless plan (nothing dropped).
    padding_mask_GS: <bool>[G, S] or None; padded tokens take no slot.
    token_priority_GS: optional <float32>[G, S]; within a choice, tokens with
      higher priority claim slots first (BPR). None: token order.
  Returns:
    RoutingPlan with the token view, and the slot view unless dropless.
  """
  g, s, k = expert_GSK.shape
  e = probs_GSE.shape[-1]
  validation.check_capacity(capacity, allow_none=True)
  expert_GSK = expert_GSK.astype(jnp.int32)
  weight_GSK = weight_GSK.astype(jnp.float32)
  padding_mask_GS = validation.check_padding_mask(padding_mask_GS, (g, s))
  if padding_mask_GS is not None:
    expert_GSK = jnp.where(padding_mask_GS[..., None], expert_GSK, e)
    weight_GSK = jnp.where(padding_mask_GS[..., None], weight_GSK, 0.0)
  if capacity is None:
    return plan_lib.RoutingPlan(
        probs_GSE=probs_GSE, expert_GSK=expert_GSK, weight_GSK=weight_GSK,
        padding_mask_GS=padding_mask_GS, num_experts=e, capacity=None)

  if token_priority_GS is None:
    order_GS = None
    expert_in_order_GSK = expert_GSK
  else:
    # Stable descending sort: ties keep token order.
    order_GS = jnp.argsort(-token_priority_GS, axis=-1, stable=True)
    expert_in_order_GSK = jnp.take_along_axis(expert_GSK, order_GS[..., None],
                                              axis=1)
  # Choice-major flattening: [G, K, S] -> [G, K*S].
  expert_GN = jnp.swapaxes(expert_in_order_GSK, 1, 2).reshape(g, k * s)
  rank_GKS = rank_within_expert(expert_GN, e).reshape(g, k, s)
  rank_GSK = jnp.swapaxes(rank_GKS, 1, 2)
  if order_GS is not None:
    inverse_GS = jnp.argsort(order_GS, axis=-1)
    rank_GSK = jnp.take_along_axis(rank_GSK, inverse_GS[..., None], axis=1)
  kept_GSK = (rank_GSK < capacity) & (expert_GSK < e)
  slot_GSK = jnp.where(kept_GSK, rank_GSK, capacity).astype(jnp.int32)
  weight_GSK = jnp.where(kept_GSK, weight_GSK, 0.0)
  token_GEC, weight_GEC = plan_lib.slot_view_from_token_view(
      expert_GSK, slot_GSK, weight_GSK, e, capacity)
  return plan_lib.RoutingPlan(
      probs_GSE=probs_GSE, token_GEC=token_GEC, weight_GEC=weight_GEC,
      expert_GSK=expert_GSK, slot_GSK=slot_GSK, weight_GSK=weight_GSK,
      padding_mask_GS=padding_mask_GS, num_experts=e, capacity=capacity)


def token_choice(logits_GSE, *, k, capacity, batch_prioritized=False,
                 padding_mask_GS=None, gating="softmax", renormalize=False,
                 second_expert_policy="all", rng=None,
                 selection_scores_GSE=None, routed_scaling_factor=1.0):
  """Top-k token-choice routing.

  Args:
    logits_GSE: <float>[G, S, E] router logits (cast to float32).
    k: experts per token, 1 <= k <= E.
    capacity: slots per expert per group (int >= 1), or None for dropless.
    batch_prioritized: BPR (Riquelme et al. 2021): within each choice, tokens
      with a higher top-1 probability claim slots first.
    padding_mask_GS: <bool>[G, S] or None; padded tokens take no slot.
    gating: 'softmax' (softmax over all E, then top-k; the weight is the
      expert's probability), 'topk_softmax' (Mixtral: top-k logits, softmax
      over those k), 'sigmoid' (DeepSeek-V3: sigmoid scores, top-k).
    renormalize: divide the k weights by their sum (always true in effect for
      'topk_softmax').
    second_expert_policy: 'all' or 'random' (GShard: choices after the first
      are kept with probability min(1, 2 * w_j / (w_0 + w_j)); needs rng).
    rng: PRNG key for 'random'.
    selection_scores_GSE: optional <float32>[G, S, E] scores used only to
      *select* experts (noise, DeepSeek bias, group limits); the weights still
      come from the gating of `logits_GSE`. -inf excludes an expert.
    routed_scaling_factor: multiplies the combine weights (DeepSeek).
  Returns:
    RoutingPlan.
  """
  validation.check_logits(logits_GSE)
  g, s, e = logits_GSE.shape
  validation.check_k(k, e)
  validation.check_capacity(capacity, allow_none=True)
  validation.check_choice("gating", gating, GATINGS)
  validation.check_choice("second_expert_policy", second_expert_policy,
                          SECOND_EXPERT_POLICIES)
  if second_expert_policy == "random" and rng is None:
    raise ValueError("second_expert_policy='random' needs an rng key")
  padding_mask_GS = validation.check_padding_mask(padding_mask_GS, (g, s))
  if selection_scores_GSE is not None and selection_scores_GSE.shape != (g, s, e):
    raise ValueError(f"selection_scores_GSE must have shape {(g, s, e)}, got "
                     f"{selection_scores_GSE.shape}")

  logits_GSE = logits_GSE.astype(jnp.float32)
  probs_GSE = gate_probs(logits_GSE, gating)
  if gating == "sigmoid":
    scores_GSE = jax.nn.sigmoid(logits_GSE)
  elif gating == "softmax":
    scores_GSE = probs_GSE
  else:  # topk_softmax selects on logits.
    scores_GSE = logits_GSE
  select_GSE = scores_GSE if selection_scores_GSE is None else (
      selection_scores_GSE.astype(jnp.float32))
  _, expert_GSK = jax.lax.top_k(select_GSE, k)
  picked_GSK = jnp.take_along_axis(scores_GSE, expert_GSK, axis=-1)
  if gating == "topk_softmax":
    weight_GSK = jax.nn.softmax(picked_GSK, axis=-1)
  elif renormalize:
    weight_GSK = picked_GSK / jnp.maximum(
        jnp.sum(picked_GSK, axis=-1, keepdims=True), 1e-9)
  else:
    weight_GSK = picked_GSK
  weight_GSK = weight_GSK * routed_scaling_factor

  if second_expert_policy == "random" and k > 1:
    w0_GS1 = weight_GSK[..., :1]
    keep_prob_GSK = jnp.minimum(
        1.0, 2.0 * weight_GSK / jnp.maximum(w0_GS1 + weight_GSK, 1e-9))
    u_GSK = jax.random.uniform(rng, weight_GSK.shape)
    keep_GSK = (u_GSK < keep_prob_GSK).at[..., 0].set(True)
    # A skipped choice claims no slot: mark it like padding (expert E).
    expert_GSK = jnp.where(keep_GSK, expert_GSK, e)
    weight_GSK = jnp.where(keep_GSK, weight_GSK, 0.0)

  priority_GS = jnp.max(probs_GSE, axis=-1) if batch_prioritized else None
  return assign_slots(expert_GSK, weight_GSK, probs_GSE, capacity=capacity,
                      padding_mask_GS=padding_mask_GS,
                      token_priority_GS=priority_GS)
