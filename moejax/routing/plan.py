"""RoutingPlan: the one contract between routers and dispatch engines.

A plan says, for every group g, which token fills which slot of which expert
and with what combine weight. It has two views of the same assignment:

* the slot view (`token_GEC`, `weight_GEC`): slot c of expert e in group g
  holds token `token_GEC[g, e, c]` (the sentinel S when the slot is empty);
* the token view (`expert_GSK`, `slot_GSK`, `weight_GSK`): the k-th
  assignment of token s goes to expert `expert_GSK[g, s, k]` (the sentinel E
  when the token is padding) at slot `slot_GSK[g, s, k]` (the sentinel C when
  the assignment was dropped for lack of capacity).

Token-choice routers fill both views; expert choice fills only the slot view
(a token may be picked by 0..E experts); a dropless plan (capacity None) fills
only the token view. Engines pick the view they need: `indices` gathers with
the slot view and combines with the token view, so both directions of the
layer (and of its gradient) are gathers; `dropless` sorts the token view.
"""

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class RoutingPlan:
  """A routing decision for G groups of S tokens over E experts.

  Attributes:
    probs_GSE: <float32>[G, S, E] router probabilities (for losses/metrics).
    token_GEC: <int32>[G, E, C] token filling each slot; S marks empty. None
      for dropless plans.
    weight_GEC: <float32>[G, E, C] combine weight of each slot; 0 if empty.
    expert_GSK: <int32>[G, S, K] expert of each assignment; E marks no
      assignment (padding, or a choice skipped by the random policy).
      None for expert-choice plans.
    slot_GSK: <int32>[G, S, K] slot of each assignment; C marks dropped. None
      for dropless and expert-choice plans.
    weight_GSK: <float32>[G, S, K] combine weight; 0 if dropped or padding.
    padding_mask_GS: <bool>[G, S] True for real tokens, or None (all real).
    num_experts: E (static).
    capacity: C (static), or None for a dropless plan.
  """
  probs_GSE: jax.Array
  token_GEC: Optional[jax.Array] = None
  weight_GEC: Optional[jax.Array] = None
  expert_GSK: Optional[jax.Array] = None
  slot_GSK: Optional[jax.Array] = None
  weight_GSK: Optional[jax.Array] = None
  padding_mask_GS: Optional[jax.Array] = None
  num_experts: int = flax.struct.field(pytree_node=False, default=0)
  capacity: Optional[int] = flax.struct.field(pytree_node=False, default=None)

  @property
  def num_groups(self) -> int:
    return self.probs_GSE.shape[0]

  @property
  def group_size(self) -> int:
    return self.probs_GSE.shape[1]

  @property
  def has_slot_view(self) -> bool:
    return self.token_GEC is not None

  @property
  def has_token_view(self) -> bool:
    return self.expert_GSK is not None

  @property
  def is_dropless(self) -> bool:
    return self.capacity is None

  def kept_GSK(self) -> jax.Array:
    """<bool>[G, S, K]: assignments that reach an expert (token view only)."""
    if not self.has_token_view:
      raise ValueError("kept_GSK needs a token view; this plan has none "
                       "(expert choice).")
    kept = self.expert_GSK < self.num_experts
    if self.slot_GSK is not None:
      kept &= self.slot_GSK < self.capacity
    return kept

  def dispatch_mask(self) -> jax.Array:
    """<bool>[G, S, E, C]: token s of group g occupies slot c of expert e.

    A dense view for the einsum engine and for tests; O(G*S*E*C) memory.
    """
    if self.is_dropless:
      raise ValueError("a dropless plan (capacity=None) has no [G,S,E,C] view")
    s = self.group_size
    # one_hot of the sentinel S is all-zero, so empty slots vanish.
    return jnp.einsum("GECS->GSEC",
                      jax.nn.one_hot(self.token_GEC, s, dtype=jnp.bool_))

  def combine_weights(self) -> jax.Array:
    """<float32>[G, S, E, C]: combine weight of token s in slot c of expert e."""
    mask = self.dispatch_mask()
    return jnp.where(mask, self.weight_GEC[:, None, :, :], 0.0).astype(
        jnp.float32)


def slot_view_from_token_view(expert_GSK, slot_GSK, weight_GSK, num_experts,
                              capacity):
  """Scatters a token view into the slot view.

  Args:
    expert_GSK: <int32>[G, S, K], E marks padding.
    slot_GSK: <int32>[G, S, K], C marks dropped.
    weight_GSK: <float32>[G, S, K].
    num_experts: E.
    capacity: C.
  Returns:
    (token_GEC <int32>[G, E, C] with S marking empty, weight_GEC <float32>).
  """
  g, s, k = expert_GSK.shape
  e, c = num_experts, capacity
  kept = (expert_GSK < e) & (slot_GSK < c)
  # Flat slot index in [0, E*C); everything not kept goes to a dump slot E*C.
  flat_GSK = jnp.where(kept, expert_GSK * c + slot_GSK, e * c)
  token_GSK = jnp.broadcast_to(
      jnp.arange(s, dtype=jnp.int32)[None, :, None], (g, s, k))
  g_idx = jnp.arange(g)[:, None, None]
  token_GX = jnp.full((g, e * c + 1), s, jnp.int32).at[g_idx, flat_GSK].set(
      token_GSK, mode="drop", unique_indices=False)
  weight_GX = jnp.zeros((g, e * c + 1), jnp.float32).at[g_idx, flat_GSK].set(
      weight_GSK.astype(jnp.float32), mode="drop")
  token_GEC = token_GX[:, :e * c].reshape(g, e, c)
  weight_GEC = weight_GX[:, :e * c].reshape(g, e, c)
  return token_GEC, weight_GEC


# Where a plan's router weights multiply: the expert output (every family but
# Llama-4) or the expert input (Llama-4: expert(weight * x)).
WEIGHTS_ON = ("output", "input")


def weights_on_input(plan, x_GSM):
  """Moves a one-choice plan's weights from the expert output to its input.

  Llama-4 runs each expert on weight * x and sums the outputs unweighted.
  With K = 1 that is the same as scaling each token's input by its one
  weight and combining with weight 1 for a kept assignment (0 for dropped
  or padded), which every engine (and expert parallelism) runs unchanged.

  Args:
    plan: a token-view RoutingPlan with K = 1 (capacity or dropless).
    x_GSM: <dtype>[G, S, M] the expert input.
  Returns:
    (<dtype>[G, S, M] x scaled by each token's weight, the plan with its
    kept weights set to 1).
  """
  if not plan.has_token_view or plan.expert_GSK.shape[-1] != 1:
    shape = None if plan.expert_GSK is None else plan.expert_GSK.shape
    raise ValueError(f"router weights on the expert input need a token-view "
                     f"plan with K = 1 (one expert per token), got expert_GSK "
                     f"of shape {shape}")
  e = plan.num_experts
  kept_GSK = plan.expert_GSK < e
  if plan.slot_GSK is not None:
    kept_GSK &= plan.slot_GSK < plan.capacity
  scale_GS1 = jnp.where(kept_GSK, plan.weight_GSK, 0.0)
  x_GSM = x_GSM * scale_GS1.astype(x_GSM.dtype)
  unit = dict(weight_GSK=kept_GSK.astype(jnp.float32))
  if plan.weight_GEC is not None:
    unit["weight_GEC"] = (plan.token_GEC < plan.group_size).astype(
        jnp.float32)
  return x_GSM, plan.replace(**unit)
