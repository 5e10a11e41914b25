"""Slow, obviously correct oracles that every fast path is tested against.

`reference_moe` loops over every (token, choice) or (expert, slot) of a plan
and runs that one expert on that one token. `reference_token_choice_slots`
re-derives slot assignment with plain Python loops in the priority order that
DESIGN.md states. Only for tiny shapes in tests.
"""

import jax.numpy as jnp
import numpy as np

from moejax.ops import ffn as ffn_lib


def _one_expert(x_M, weights, e, activation):
  w_in, w_out, w_gate = weights
  h = x_M @ w_in[e]
  g = None if w_gate is None else x_M @ w_gate[e]
  return ffn_lib.activate(h, g, activation) @ w_out[e]


def reference_moe(plan, x_GSM, weights, activation, *, dropless=False):
  """y[g, s] = sum over the token's kept assignments of weight * expert(x).

  A plain loop over every (group, token, choice) of a token-choice plan, or
  every (group, expert, slot) of an expert-choice plan, running one expert on
  one token at a time. Indices may be traced, so it also runs under jit.

  Args:
    plan: RoutingPlan (any kind).
    x_GSM: [G, S, M].
    weights: ExpertWeights or (w_in_EMH, w_out_EHM, w_gate_EMH or None).
    activation: relu, gelu, swiglu, geglu.
    dropless: ignore capacity (use every non-padding assignment).
  Returns:
    [G, S, M], differentiable w.r.t. x, weights and the plan's weights.
  """
  g_count, s_count, _ = x_GSM.shape
  e_count = plan.num_experts
  rows = []
  for g in range(g_count):
    if plan.has_token_view and (plan.slot_GSK is not None or dropless
                                or plan.is_dropless):
      row = []
      for s in range(s_count):
        y = jnp.zeros_like(x_GSM[g, s])
        for k in range(plan.expert_GSK.shape[-1]):
          e = plan.expert_GSK[g, s, k]
          used = e < e_count  # not padding
          if not dropless and plan.slot_GSK is not None:
            used &= plan.slot_GSK[g, s, k] < plan.capacity  # not dropped
          out = _one_expert(x_GSM[g, s], weights,
                            jnp.minimum(e, e_count - 1), activation)
          y = y + jnp.where(used, plan.weight_GSK[g, s, k], 0.0) * out
        row.append(y)
      rows.append(jnp.stack(row))
    else:  # slot view only (expert choice)
      y_SM = jnp.zeros_like(x_GSM[g])
      for e in range(e_count):
        for c in range(plan.capacity):
          s = plan.token_GEC[g, e, c]
          filled = s < s_count
          s_safe = jnp.minimum(s, s_count - 1)
          out = _one_expert(x_GSM[g, s_safe], weights, e, activation)
          y_SM = y_SM.at[s_safe].add(
              jnp.where(filled, plan.weight_GEC[g, e, c], 0.0) * out)
      rows.append(y_SM)
  return jnp.stack(rows)


def reference_dense_ffn(x_TM, w_in_MH, w_out_HM, w_gate_MH=None,
                        activation="relu"):
  """A plain FFN: [T, M] -> [T, M]."""
  h = x_TM @ w_in_MH
  g = None if w_gate_MH is None else x_TM @ w_gate_MH
  return ffn_lib.activate(h, g, activation) @ w_out_HM


def reference_token_choice_slots(expert_GSK, capacity, num_experts,
                                 priority_GS=None, padding_mask_GS=None):
  """Slot of every assignment by explicit loops; `capacity` marks dropped.

  Choice-major: all 1st choices (in token order, or by descending priority,
  ties by token order) claim slots before any 2nd choice.
  """
  expert_GSK = np.asarray(expert_GSK)
  g_count, s_count, k_count = expert_GSK.shape
  slot = np.full(expert_GSK.shape, capacity, np.int32)
  for g in range(g_count):
    if priority_GS is None:
      order = list(range(s_count))
    else:
      pr = np.asarray(priority_GS[g])
      order = sorted(range(s_count), key=lambda s: (-pr[s], s))
    used = [0] * num_experts
    for k in range(k_count):
      for s in order:
        if padding_mask_GS is not None and not padding_mask_GS[g][s]:
          continue
        e = int(expert_GSK[g, s, k])
        if e >= num_experts:
          continue
        if used[e] < capacity:
          slot[g, s, k] = used[e]
        used[e] += 1
  return slot
