"""The engines' pure functions: move tokens to experts and back, following a
RoutingPlan. The engine objects (moejax.layers.engines) call these.

Three strategies give the same numbers where their semantics meet:

* einsum: GShard's dense dispatch/combine through [G, S, E, C] masks
  ('GSEC,GSM->EGCM' and 'GSEC,EGCM->GSM'). Simple and TPU-friendly; memory
  and FLOPs grow with S*E*C.
* indices: gathers tokens into [E, G*C, M] expert buffers and gathers them
  back, O(T*K*M) data movement, never builds [G, S, E, C]. For token-choice
  plans both directions and both gradients are gathers (the backward of each
  gather is the gather through the inverse map the plan already holds), which
  avoids XLA's slow serial scatter on CPU; the combine is `combine_rows`, a
  fused weighted sum of gathers. Expert-choice plans combine with a
  scatter-add. The experts run as batched einsums (ops.gmm.batched_ffn).
* dropless: sorts the token-expert assignments by expert into tile-aligned
  groups and runs the expert FFN over them: on XLA the fused per-block FFN
  (ops.gmm.grouped_ffn), or three grouped matmuls of a given gmm_fn (Pallas,
  ragged_dot); no capacity, nothing dropped.

CPU timings against a FLOP-matched dense FFN: experiments/benchmark.py and
BENCHMARKS.md. Dispatch and combine are separate functions so that expert
parallelism (moejax.sharding) can put its all-to-all between them.
"""

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from moejax.ops import ffn as ffn_lib
from moejax.ops import gmm as gmm_lib
from moejax.ops.gather import combine_rows
from moejax.ops.gather import dropless_num_rows
from moejax.ops.gather import gather_rows
from moejax.routing.token_choice import rank_within_expert


# --- einsum engine ----------------------------------------------------------


def einsum_dispatch(plan, x_GSM):
  """<dtype>[G, S, M] -> <dtype>[E, G, C, M] through the dense mask."""
  mask_GSEC = plan.dispatch_mask().astype(x_GSM.dtype)
  return jnp.einsum("GSEC,GSM->EGCM", mask_GSEC, x_GSM)


def einsum_combine(plan, out_EGCM):
  """<dtype>[E, G, C, M] -> <dtype>[G, S, M] through combine weights."""
  combine_GSEC = plan.combine_weights().astype(out_EGCM.dtype)
  return jnp.einsum("GSEC,EGCM->GSM", combine_GSEC, out_EGCM)


# --- indices engine ---------------------------------------------------------


class SlotIndices(NamedTuple):
  """Flat index maps between tokens [G*S] and expert slots [E*G*C].

  token_X: <int32>[E*G*C] token (g*S + s) of each slot, G*S if empty.
  weight_X: <float32>[E*G*C] combine weight of each slot.
  slot_N: <int32>[G*S*K] slot (e*G*C + g*C + c) of each assignment, E*G*C
    if dropped; None for expert-choice plans.
  assignment_X: <int32>[E*G*C] assignment (g*S*K + s*K + k) of each slot,
    G*S*K if empty; None for expert-choice plans.
  """
  token_X: jax.Array
  weight_X: jax.Array
  slot_N: Optional[jax.Array]
  assignment_X: Optional[jax.Array]


def slot_indices(plan):
  """Builds the flat index maps of a capacity plan (EGC slot order)."""
  if plan.is_dropless:
    raise ValueError("the einsum/indices engines need a capacity plan; got a "
                     "dropless plan (capacity=None)")
  g, s, e, c = plan.num_groups, plan.group_size, plan.num_experts, plan.capacity
  num_slots = e * g * c
  if plan.has_token_view and plan.slot_GSK is not None:
    k = plan.expert_GSK.shape[-1]
    g_GSK = jnp.arange(g, dtype=jnp.int32)[:, None, None]
    slot_N = jnp.where(plan.kept_GSK(),
                       plan.expert_GSK * (g * c) + g_GSK * c + plan.slot_GSK,
                       num_slots).reshape(-1)
    assignment_X = jnp.full((num_slots,), g * s * k, jnp.int32).at[slot_N].set(
        jnp.arange(g * s * k, dtype=jnp.int32), mode="drop",
        unique_indices=True)
    token_X = jnp.where(assignment_X < g * s * k, assignment_X // k, g * s)
    weight_X = jnp.take(plan.weight_GSK.reshape(-1), assignment_X, mode="fill",
                        fill_value=0)
    return SlotIndices(token_X, weight_X, slot_N, assignment_X)
  # Expert choice: only the slot view.
  g_GEC = jnp.arange(g, dtype=jnp.int32)[:, None, None]
  token_GEC = jnp.where(plan.token_GEC < s, g_GEC * s + plan.token_GEC, g * s)
  token_X = jnp.swapaxes(token_GEC, 0, 1).reshape(-1)
  weight_X = jnp.swapaxes(plan.weight_GEC, 0, 1).reshape(-1)
  return SlotIndices(token_X, weight_X, None, None)


def indices_dispatch(plan, x_GSM, idx=None):
  """<dtype>[G, S, M] -> <dtype>[E, G, C, M] by gathering rows."""
  idx = slot_indices(plan) if idx is None else idx
  g, s, m = x_GSM.shape
  e, c = plan.num_experts, plan.capacity
  x_NM = x_GSM.reshape(g * s, m)
  if idx.slot_N is not None:
    k = idx.slot_N.shape[0] // (g * s)
    in_XM = gather_rows(x_NM, idx.token_X, idx.slot_N.reshape(g * s, k))
  else:
    in_XM = jnp.take(x_NM, idx.token_X, axis=0, mode="fill", fill_value=0)
  return in_XM.reshape(e, g, c, m)


def indices_combine(plan, out_EGCM, idx=None):
  """<dtype>[E, G, C, M] -> <dtype>[G, S, M], weighted by the plan."""
  idx = slot_indices(plan) if idx is None else idx
  e, g, c, m = out_EGCM.shape
  s = plan.group_size
  out_XM = out_EGCM.reshape(e * g * c, m)
  if idx.slot_N is not None:
    k = idx.slot_N.shape[0] // (g * s)
    y_NM = combine_rows(out_XM, plan.weight_GSK.reshape(g * s, k),
                        idx.slot_N.reshape(g * s, k), idx.assignment_X)
    return y_NM.reshape(g, s, m)
  weighted_XM = out_XM * idx.weight_X[:, None].astype(out_XM.dtype)
  y_NM = jnp.zeros((g * s, m), out_EGCM.dtype).at[idx.token_X].add(
      weighted_XM, mode="drop")
  return y_NM.reshape(g, s, m)


# --- dropless engine -------------------------------------------------------


class DroplessLayout(NamedTuple):
  """Where each assignment sits in the expert-sorted, tile-aligned rows.

  row_N: <int32>[G*S*K] row of each assignment, R if padding.
  assignment_R: <int32>[R] assignment of each row, G*S*K if a padding row.
  group_sizes_E: <int32>[E] rows of each expert rounded up to the tile.
  counts_E: <int32>[E] assignments of each expert (its rows that hold data).
  """
  row_N: jax.Array
  assignment_R: jax.Array
  group_sizes_E: jax.Array
  counts_E: Optional[jax.Array] = None


def dropless_layout(plan, tile):
  """Sorts the plan's assignments by expert into tile-aligned groups."""
  if not plan.has_token_view:
    raise ValueError("the dropless engine needs a token-choice plan (token "
                     "view); expert-choice plans use 'einsum' or 'indices'")
  e = plan.num_experts
  expert_N = plan.expert_GSK.reshape(1, -1)
  n = expert_N.shape[1]
  r = dropless_num_rows(n, e, tile)
  rank_N = rank_within_expert(expert_N, e)[0]
  expert_N = expert_N[0]
  sizes_E = jnp.zeros((e,), jnp.int32).at[expert_N].add(1, mode="drop")
  padded_E = -(-sizes_E // tile) * tile
  start_E = jnp.cumsum(padded_E) - padded_E
  row_N = jnp.where(expert_N < e,
                    jnp.take(start_E, expert_N, mode="fill", fill_value=0)
                    + rank_N, r).astype(jnp.int32)
  assignment_R = jnp.full((r,), n, jnp.int32).at[row_N].set(
      jnp.arange(n, dtype=jnp.int32), mode="drop", unique_indices=True)
  return DroplessLayout(row_N, assignment_R, padded_E, sizes_E)


def dropless_engine(plan, x_GSM, weights, activation, *, tile=128,
                    gmm_fn: Optional[Callable] = None):
  """Dropless MoE: sort, grouped matmuls, unsort.

  Args:
    plan: a token-choice plan, normally dropless (capacity=None). Slots are
      ignored; a capacity plan's dropped assignments carry weight 0 and so
      add nothing.
    x_GSM: <dtype>[G, S, M].
    weights: ExpertWeights.
    activation: relu, gelu, swiglu, geglu.
    tile: rows per tile of the grouped matmul.
    gmm_fn: gmm(lhs_RM, rhs_EMH, group_sizes_E, tile=) implementation;
      None or moejax.ops.gmm.gmm: the XLA path, which runs the whole
      FFN per row block (moejax.ops.gmm.grouped_ffn); any other (Pallas,
      ragged_dot) runs three grouped matmuls.
  Returns:
    <dtype>[G, S, M].
  """
  layout = dropless_layout(plan, tile)
  g, s, m = x_GSM.shape
  k = plan.expert_GSK.shape[-1]
  token_R = jnp.where(layout.assignment_R < g * s * k,
                      layout.assignment_R // k, g * s)
  in_RM = gather_rows(x_GSM.reshape(g * s, m), token_R,
                      layout.row_N.reshape(g * s, k))
  if gmm_fn is None or gmm_fn is gmm_lib.gmm:
    # The XLA path: the whole FFN per row block (gmm_lib.grouped_ffn).
    out_RM = gmm_lib.grouped_ffn(
        in_RM, weights.w_in_EMH, weights.w_out_EHM, weights.w_gate_EMH,
        layout.group_sizes_E, tile=tile, activation=activation)
  else:
    gmm_call = functools.partial(gmm_fn, group_sizes_E=layout.group_sizes_E,
                                 tile=tile)
    h_RH = gmm_call(in_RM, weights.w_in_EMH)
    gate_RH = None if weights.w_gate_EMH is None else gmm_call(
        in_RM, weights.w_gate_EMH)
    h_RH = ffn_lib.activate(h_RH, gate_RH, activation)
    out_RM = gmm_call(h_RH, weights.w_out_EHM)
  y_NM = combine_rows(out_RM, plan.weight_GSK.reshape(g * s, k),
                      layout.row_N.reshape(g * s, k), layout.assignment_R)
  return y_NM.reshape(g, s, m)
