"""Dispatch engines: move tokens to experts and back, following a RoutingPlan.

Three engines give the same numbers where their semantics meet:

* `einsum`: GShard's dense dispatch/combine through [G, S, E, C] masks
  ('GSEC,GSM->EGCM' and 'GSEC,EGCM->GSM'). Simple and TPU-friendly; memory
  and FLOPs grow with S*E*C.
* `indices`: gathers tokens into [E, G*C, M] expert buffers and gathers them
  back, O(T*K*M) data movement, never builds [G, S, E, C]. For token-choice
  plans both directions and both gradients are gathers (the backward of each
  gather is the gather through the inverse map the plan already holds), which
  avoids XLA's slow serial scatter on CPU; the combine is `combine_rows`, a
  fused weighted sum of gathers. Expert-choice plans combine with a
  scatter-add. The experts run as batched einsums (gmm.batched_ffn).
* `dropless`: sorts the token-expert assignments by expert into tile-aligned
  groups and runs the expert FFN over them: on XLA the fused per-block FFN
  (gmm.grouped_ffn), or three grouped matmuls of a given gmm_fn (Pallas,
  ragged_dot); no capacity, nothing dropped.

CPU timings against a FLOP-matched dense FFN: experiments/benchmark.py and
BENCHMARKS.md.

Each engine is split into dispatch and combine so that expert parallelism
(moejax.sharding) can put its all-to-all between them.
"""

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from moejax.layers import experts as experts_lib
from moejax.layers import gmm as gmm_lib
from moejax.routing.token_choice import rank_within_expert

ENGINES = ("einsum", "indices", "dropless")


class ExpertWeights(NamedTuple):
  """Expert FFN weights: w_in_EMH [E,M,H], w_out_EHM [E,H,M], w_gate_EMH or None."""
  w_in_EMH: jax.Array
  w_out_EHM: jax.Array
  w_gate_EMH: Optional[jax.Array] = None


def check_engine(engine):
  if engine not in ENGINES:
    raise ValueError(f"unknown engine {engine!r}; allowed: {list(ENGINES)}")


# --- gathers whose backward is a gather -----------------------------------


@jax.custom_vjp
def gather_rows(table_NM, idx_I, inv_NJ):
  """out[i] = table[idx[i]] (0 where idx[i] == N), with a gather backward.

  Args:
    table_NM: [N, M] rows.
    idx_I: <int32>[I] row of each output; N (out of range) gives zeros.
    inv_NJ: <int32>[N, J] the inverse map: the output positions that read row
      n (I where unused). Every idx[i] < N must appear exactly once in inv.
  Returns:
    [I, M]. Its cotangent w.r.t. table is sum_j d_out[inv[n, j]], a gather,
    instead of the scatter-add autodiff would emit.
  """
  return jnp.take(table_NM, idx_I, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(table_NM, idx_I, inv_NJ):
  return gather_rows(table_NM, idx_I, inv_NJ), (idx_I, inv_NJ)


def _gather_rows_bwd(res, d_out_IM):
  idx_I, inv_NJ = res
  # One take per column of the inverse map, summed (XLA fuses them into one
  # loop; a [N, J, M] take and a sum over J is ~1.4x slower on CPU).
  d_table_NM = jnp.take(d_out_IM, inv_NJ[:, 0], axis=0, mode="fill",
                        fill_value=0)
  for j in range(1, inv_NJ.shape[1]):
    d_table_NM = d_table_NM + jnp.take(d_out_IM, inv_NJ[:, j], axis=0,
                                       mode="fill", fill_value=0)
  return d_table_NM, None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


@jax.custom_vjp
def combine_rows(out_XM, weight_NK, row_NK, assignment_X):
  """y[n] = sum_k weight[n, k] * out[row[n, k]], with gather backwards.

  The weighted sum of each token's k expert rows, without materialising the
  picked rows [N, K, M] for an einsum (XLA:CPU runs 'GSK,GSKM->GSM' as N tiny
  batched matmuls) and without a scatter in the backward.

  Args:
    out_XM: <dtype>[X, M] expert output rows.
    weight_NK: <float32>[N, K] combine weights.
    row_NK: <int32>[N, K] row of each assignment; X (out of range) for none.
    assignment_X: <int32>[X] the inverse map: assignment n*K + k of each
      row, N*K where no assignment reads the row.
  Returns:
    <dtype>[N, M], summed in float32.
  """
  # One take per choice, summed: XLA fuses the k gathers into one loop.
  y_NM = 0.0
  for j in range(row_NK.shape[1]):
    y_NM = y_NM + weight_NK[:, j, None].astype(jnp.float32) * jnp.take(
        out_XM, row_NK[:, j], axis=0, mode="fill",
        fill_value=0).astype(jnp.float32)
  return jnp.asarray(y_NM).astype(out_XM.dtype)


def _combine_rows_fwd(out_XM, weight_NK, row_NK, assignment_X):
  return (combine_rows(out_XM, weight_NK, row_NK, assignment_X),
          (out_XM, weight_NK, row_NK, assignment_X))


def _combine_rows_bwd(res, dy_NM):
  out_XM, weight_NK, row_NK, assignment_X = res
  k = row_NK.shape[1]
  dy32_NM = dy_NM.astype(jnp.float32)
  # d_out[x] = weight of the assignment reading row x times its token's dy.
  w_X = jnp.take(weight_NK.reshape(-1).astype(jnp.float32), assignment_X,
                 mode="fill", fill_value=0)
  dy_XM = jnp.take(dy32_NM, assignment_X // k, axis=0, mode="fill",
                   fill_value=0)
  d_out_XM = (w_X[:, None] * dy_XM).astype(out_XM.dtype)
  # d_weight[n, j] = <dy[n], out[row[n, j]]>.
  d_w_NK = jnp.stack([jnp.sum(jnp.take(
      out_XM, row_NK[:, j], axis=0, mode="fill",
      fill_value=0).astype(jnp.float32) * dy32_NM, axis=-1)
                      for j in range(k)], axis=1)
  return d_out_XM, d_w_NK.astype(weight_NK.dtype), None, None


combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)


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


def capacity_engine(engine, plan, x_GSM, weights, activation):
  """einsum or indices engine end to end: dispatch, experts, combine."""
  g, s, m = x_GSM.shape
  e, c = plan.num_experts, plan.capacity
  if engine == "einsum":
    in_EGCM = einsum_dispatch(plan, x_GSM)
  else:
    idx = slot_indices(plan)
    in_EGCM = indices_dispatch(plan, x_GSM, idx)
  out_EXM = gmm_lib.batched_ffn(in_EGCM.reshape(e, g * c, m), *weights,
                                activation=activation)
  out_EGCM = out_EXM.reshape(e, g, c, m)
  if engine == "einsum":
    return einsum_combine(plan, out_EGCM)
  return indices_combine(plan, out_EGCM, idx)


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


def dropless_num_rows(num_assignments, num_experts, tile):
  """Static row bound R: every expert's rows rounded up to the tile."""
  return -(-(num_assignments + num_experts * (tile - 1)) // tile) * tile


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


GMM_IMPLS = {"scan": gmm_lib.gmm, "ragged_dot": gmm_lib.ragged_dot_gmm}


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
      None or moejax.layers.gmm.gmm: the XLA path, which runs the whole
      FFN per row block (moejax.layers.gmm.grouped_ffn); any other (Pallas,
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
    h_RH = experts_lib.activate(h_RH, gate_RH, activation)
    out_RM = gmm_call(h_RH, weights.w_out_EHM)
  y_NM = combine_rows(out_RM, plan.weight_GSK.reshape(g * s, k),
                      layout.row_N.reshape(g * s, k), layout.assignment_R)
  return y_NM.reshape(g, s, m)


def run_engine(engine, plan, x_GSM, weights, activation, **engine_kwargs):
  """Dispatch -> experts -> combine with the named engine.

  Args:
    engine: 'einsum', 'indices' or 'dropless'.
    plan: RoutingPlan (capacity plan for einsum/indices; token view for
      dropless).
    x_GSM: <dtype>[G, S, M].
    weights: ExpertWeights in the compute dtype.
    activation: relu, gelu, swiglu, geglu.
    **engine_kwargs: dropless options (tile, gmm_fn).
  Returns:
    <dtype>[G, S, M].
  """
  check_engine(engine)
  if engine == "dropless":
    return dropless_engine(plan, x_GSM, weights, activation, **engine_kwargs)
  return capacity_engine(engine, plan, x_GSM, weights, activation)
