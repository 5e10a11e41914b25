"""Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens.

Probabilities are a softmax over the E experts in float32, as for token
choice; then, within each group, expert e takes the C tokens with the highest
probability for e, and the combine weight of a slot is that probability. A
token may be picked by 0..E experts, so the plan has only the slot view
(`token_GEC`, `weight_GEC`; `expert_GSK` is None).

The router is non-causal: a token's fate depends on the whole group.
"""

import jax
import jax.numpy as jnp

from moejax.routing import capacity as capacity_lib
from moejax.routing import plan as plan_lib
from moejax.routing import validation


def expert_choice_capacity(group_size, num_experts, capacity_factor):
  """Slots per expert for expert choice: ceil(cf * S / E), capped at S.

  `capacity_factor` is the average number of experts per token (Zhou et al.
  use 2). The result is `compute_capacity(S, E, k=1, capacity_factor=cf)`,
  capped at S because an expert cannot take more than every token of its
  group (and `expert_choice` rejects capacity > S).

  Args:
    group_size: S (int >= 1).
    num_experts: E (int >= 1).
    capacity_factor: average experts per token, a finite number > 0.
  Returns:
    int capacity C with 1 <= C <= S.
  """
  cap = capacity_lib.compute_capacity(group_size, num_experts, k=1,
                                      capacity_factor=capacity_factor)
  return min(cap, group_size)


def expert_choice(logits_GSE, *, capacity, padding_mask_GS=None):
  """Expert-choice routing: every expert takes its top-`capacity` tokens.

  Ties between tokens go to the earlier token. Padded tokens are never
  chosen; when an expert has fewer than C real tokens to choose from, its
  remaining slots are empty (token index S, weight 0).

  Args:
    logits_GSE: <float>[G, S, E] router logits (cast to float32).
    capacity: C, slots per expert per group, an int with 1 <= C <= S.
      Capacity > S is a ValueError (use `expert_choice_capacity`, which caps
      at S), so the plan's slot axis always has the size asked for.
    padding_mask_GS: <bool>[G, S] True for real tokens, or None (all real).
  Returns:
    RoutingPlan with probs_GSE <float32>[G, S, E] (softmax over E), the slot
    view token_GEC <int32>[G, E, C] / weight_GEC <float32>[G, E, C], and no
    token view (expert_GSK, slot_GSK, weight_GSK are None).
  """
  validation.check_logits(logits_GSE)
  g, s, e = logits_GSE.shape
  validation.check_capacity(capacity)
  if capacity > s:
    raise ValueError(f"expert_choice capacity must be <= group size S={s} (an "
                     f"expert cannot take more than every token of its "
                     f"group), got capacity={capacity}")
  padding_mask_GS = validation.check_padding_mask(padding_mask_GS, (g, s))

  probs_GSE = jax.nn.softmax(logits_GSE.astype(jnp.float32), axis=-1)
  probs_GES = jnp.einsum("GSE->GES", probs_GSE)
  if padding_mask_GS is None:
    select_GES = probs_GES
  else:
    # Probabilities are >= 0, so -1 ranks every padded token below every
    # real one (including real tokens whose probability underflowed to 0).
    select_GES = jnp.where(padding_mask_GS[:, None, :], probs_GES, -1.0)
  _, token_GEC = jax.lax.top_k(jax.lax.stop_gradient(select_GES), capacity)
  token_GEC = token_GEC.astype(jnp.int32)
  weight_GEC = jnp.take_along_axis(probs_GES, token_GEC, axis=-1)
  if padding_mask_GS is not None:
    real_GEC = jnp.take_along_axis(
        jnp.broadcast_to(padding_mask_GS[:, None, :], (g, e, s)), token_GEC,
        axis=-1)
    token_GEC = jnp.where(real_GEC, token_GEC, s)
    weight_GEC = jnp.where(real_GEC, weight_GEC, 0.0)
  return plan_lib.RoutingPlan(
      probs_GSE=probs_GSE, token_GEC=token_GEC, weight_GEC=weight_GEC,
      padding_mask_GS=padding_mask_GS, num_experts=e, capacity=capacity)
