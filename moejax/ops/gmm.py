"""Grouped matmul (GMM) on XLA: the dropless engine's expert computation.

`gmm(lhs_RM, rhs_EMH, group_sizes_E)` computes, for every expert e, the rows
of `lhs` that belong to group e times `rhs[e]`. Rows come sorted by group and
each group starts on a multiple of `tile` (the dropless engine lays them out
so); the rows of a group past its size are zero padding.

Why not jax.lax.ragged_dot: on XLA:CPU its generic lowering materialises a
dense [groups x rows] product (about 8x an equal-FLOP einsum at 8 groups).
Here each group's rows are contiguous and tile-aligned, so a loop over the
groups runs, inside each group, one [block, M] x [M, H] matmul per block of
rows (BLOCK_ROWS) and then one per remaining tile, with the group's weights
loop-invariant; rows past the last group are never touched. The backward
pass is the same loops with the weights transposed (d_lhs) and, per group,
the row blocks' lhs^T @ d_out summed into one [M, H] accumulator (d_rhs).
Per-tile loops with a weight copy per tile (the first version) ran ~15-20%
below a batched matmul of the same FLOPs on CPU. The Pallas kernels
(moejax.pallas) implement the same signature.

Two whole-FFN functions sit on top:

* `grouped_ffn`: act(x W_in [, x W_gate]) W_out over the same grouped rows,
  each row block going through the whole FFN at once and the backward in one
  pass per block (the dropless engine's XLA path; ~8% faster than three
  `gmm` calls on CPU);
* `batched_ffn`: the FFN over an [E, X, M] buffer (the capacity engines),
  the same einsums as moejax.ops.ffn.expert_ffn with a backward that
  keeps one [E, X, H] buffer less.

Numbers: experiments/benchmark.py, BENCHMARKS.md.
"""

import functools

import jax
import jax.numpy as jnp

from moejax.ops import ffn as ffn_lib


def tile_experts(group_sizes_E, num_rows, tile):
  """Expert of each row tile, and whether the tile holds any real row.

  Args:
    group_sizes_E: <int32>[E] rows of each group, each a multiple of `tile`.
    num_rows: R, total rows (a multiple of `tile`).
    tile: rows per tile.
  Returns:
    (expert_I <int32>[R // tile] clamped to [0, E-1], used_I <bool>[R // tile]).
  """
  num_tiles = num_rows // tile
  ends_E = jnp.cumsum(group_sizes_E)
  starts_I = jnp.arange(num_tiles, dtype=jnp.int32) * tile
  expert_I = jnp.searchsorted(ends_E, starts_I, side="right").astype(jnp.int32)
  used_I = starts_I < ends_E[-1]
  return jnp.minimum(expert_I, group_sizes_E.shape[0] - 1), used_I


# Rows per matmul inside one group's rows (a multiple of the tile). On CPU a
# [128, M] x [M, H] matmul per tile runs ~15% below a large matmul's rate;
# 512-row blocks close that gap while the layout keeps 128-row padding.
BLOCK_ROWS = 512


def _group_bounds(group_sizes_E, num_rows):
  """(start_E, end_E) row range of each group, clamped to [0, num_rows]."""
  ends_E = jnp.cumsum(group_sizes_E)
  starts_E = ends_E - group_sizes_E
  return jnp.minimum(starts_E, num_rows), jnp.minimum(ends_E, num_rows)


def _block_rows(num_rows, tile, block_rows):
  """Static rows per block: a multiple of `tile`, at most num_rows."""
  block = BLOCK_ROWS if block_rows is None else block_rows
  return max(tile, min(-(-block // tile) * tile, num_rows // tile * tile))


def _group_loop(start, end, sizes, body, carry):
  """carry = body(row, size, carry) over the rows [start, end).

  `sizes` are static row counts, largest first, each a multiple of the last:
  as many blocks of sizes[0] as fit, then of sizes[1], ..., and the rest in
  blocks of sizes[-1], the last of which may run past `end` (by less than
  sizes[-1] rows; the caller makes sure those rows are padding).
  """
  row = start
  for i, size in enumerate(sizes):
    last = i == len(sizes) - 1
    count = (end - row + (size - 1 if last else 0)) // size
    carry = jax.lax.fori_loop(
        0, count, lambda j, c, row=row, size=size: body(row + j * size, size,
                                                        c), carry)
    row = row + count * size
  return carry


def _loop_sizes(tile, block):
  """Block sizes for _group_loop: blocks of `block` rows, then tiles."""
  return (block, tile) if block != tile else (tile,)


def _gmm_fwd_impl(lhs_RM, rhs_EMH, group_sizes_E, tile, block):
  """out[rows of group e] = lhs[rows of group e] @ rhs[e]; other rows 0.

  Loops over the groups, and within a group over row blocks: each group's
  weights are read once per group (no per-tile weight copy), the output is
  updated in place, and nothing is computed for rows past the last group.
  """
  r = lhs_RM.shape[0]
  h = rhs_EMH.shape[2]
  out_dtype = jnp.result_type(lhs_RM.dtype, rhs_EMH.dtype)

  def body(row, size, carry):
    out_RH, w_MH = carry
    lhs_BM = jax.lax.dynamic_slice_in_dim(lhs_RM, row, size, axis=0)
    out_BH = jnp.einsum("BM,MH->BH", lhs_BM, w_MH,
                        preferred_element_type=jnp.float32).astype(out_dtype)
    return jax.lax.dynamic_update_slice_in_dim(out_RH, out_BH, row,
                                               axis=0), w_MH

  starts_E, ends_E = _group_bounds(group_sizes_E, r)

  def group_body(e, out_RH):
    # The group's weights enter the inner loops as a loop-invariant value.
    w_MH = jax.lax.dynamic_index_in_dim(rhs_EMH, e, axis=0, keepdims=False)
    return _group_loop(starts_E[e], ends_E[e], _loop_sizes(tile, block), body,
                       (out_RH, w_MH))[0]

  return jax.lax.fori_loop(0, rhs_EMH.shape[0], group_body,
                           jnp.zeros((r, h), out_dtype))


def _tgmm_impl(lhs_RM, dout_RH, group_sizes_E, tile, block):
  """d_rhs[e] = lhs[rows of group e]^T @ dout[rows of group e], float32."""
  r, m = lhs_RM.shape
  h = dout_RH.shape[1]
  starts_E, ends_E = _group_bounds(group_sizes_E, r)

  def body(row, size, acc_MH):
    lhs_BM = jax.lax.dynamic_slice_in_dim(lhs_RM, row, size, axis=0)
    dout_BH = jax.lax.dynamic_slice_in_dim(dout_RH, row, size, axis=0)
    return acc_MH + jnp.einsum("BM,BH->MH", lhs_BM, dout_BH,
                               preferred_element_type=jnp.float32)

  def group_body(e, acc_EMH):
    acc_MH = _group_loop(starts_E[e], ends_E[e], _loop_sizes(tile, block),
                         body, jnp.zeros((m, h), jnp.float32))
    return jax.lax.dynamic_update_index_in_dim(acc_EMH, acc_MH, e, axis=0)

  return jax.lax.fori_loop(0, group_sizes_E.shape[0], group_body,
                           jnp.zeros((group_sizes_E.shape[0], m, h),
                                     jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(lhs_RM, rhs_EMH, group_sizes_E, tile, block):
  return _gmm_fwd_impl(lhs_RM, rhs_EMH, group_sizes_E, tile, block)


def _gmm_fwd(lhs_RM, rhs_EMH, group_sizes_E, tile, block):
  out = _gmm_fwd_impl(lhs_RM, rhs_EMH, group_sizes_E, tile, block)
  return out, (lhs_RM, rhs_EMH, group_sizes_E)


def _gmm_bwd(tile, block, res, dout_RH):
  lhs_RM, rhs_EMH, group_sizes_E = res
  # d_lhs = dout @ rhs[e]^T per group: the same loops with rhs transposed.
  rhs_EHM = jnp.swapaxes(rhs_EMH, 1, 2)
  dlhs = _gmm_fwd_impl(dout_RH, rhs_EHM, group_sizes_E, tile, block)
  drhs = _tgmm_impl(lhs_RM, dout_RH, group_sizes_E, tile, block)
  return dlhs.astype(lhs_RM.dtype), drhs.astype(rhs_EMH.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs_RM, rhs_EMH, group_sizes_E, *, tile, block_rows=None):
  """Grouped matmul over tile-aligned groups.

  Args:
    lhs_RM: <dtype>[R, M] rows sorted by group; R a multiple of `tile`.
    rhs_EMH: <dtype>[E, M, H] one matrix per group.
    group_sizes_E: <int32>[E] rows per group, each a multiple of `tile`, sum
      at most R (rows past the sum are ignored and come out zero).
    tile: rows per tile (static).
    block_rows: rows per matmul within a group (rounded up to a multiple of
      the tile; the rest of a group runs tile by tile); default BLOCK_ROWS.
      Results do not depend on it.
  Returns:
    <dtype>[R, H], accumulated in float32.
  """
  if lhs_RM.shape[0] % tile:
    raise ValueError(f"rows ({lhs_RM.shape[0]}) must be a multiple of tile "
                     f"({tile})")
  block = _block_rows(lhs_RM.shape[0], tile, block_rows)
  return _gmm(lhs_RM, rhs_EMH, group_sizes_E.astype(jnp.int32), tile, block)


def ragged_dot_gmm(lhs_RM, rhs_EMH, group_sizes_E, *, tile):
  """The same contract through jax.lax.ragged_dot (good on GPU/TPU)."""
  del tile
  # Rows past sum(group_sizes) belong to no group; ragged_dot leaves them zero.
  return jax.lax.ragged_dot(lhs_RM, rhs_EMH, group_sizes_E.astype(jnp.int32))


# --- the whole expert FFN over grouped rows -----------------------------------


def _ffn_weights_at(weights, e):
  """Group e's (w_in [M,H], w_out [H,M], w_gate [M,H] or None)."""
  return tuple(None if w is None else jax.lax.dynamic_index_in_dim(
      w, e, axis=0, keepdims=False) for w in weights)


def _dot(a, b, contract, out_dtype):
  """a . b contracting a's axis contract[0] with b's contract[1] (f32 acc)."""
  out = jax.lax.dot_general(a, b, ((contract[0], contract[1]), ((), ())),
                            preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


def _grouped_ffn_impl(lhs_RM, w_in_EMH, w_out_EHM, w_gate_EMH, group_sizes_E,
                      tile, block, activation, save):
  """Forward: out rows of group e = act(lhs W_in[e] [, lhs W_gate[e]]) W_out[e].

  Returns (out_RM, pre_RH, gate_RH): the pre-activations are filled only
  when `save` (for the backward pass), else None.
  """
  r = lhs_RM.shape[0]
  h = w_in_EMH.shape[2]
  dtype = lhs_RM.dtype
  gated = w_gate_EMH is not None
  starts_E, ends_E = _group_bounds(group_sizes_E, r)
  sizes = _loop_sizes(tile, block)

  def body(row, size, carry):
    bufs, ws = carry
    w_in, w_out, w_gate = ws
    lhs_BM = jax.lax.dynamic_slice_in_dim(lhs_RM, row, size, axis=0)
    a_BH = _dot(lhs_BM, w_in, (1, 0), dtype)
    g_BH = _dot(lhs_BM, w_gate, (1, 0), dtype) if gated else None
    out_BM = _dot(ffn_lib.activate(a_BH, g_BH, activation), w_out, (1, 0),
                  dtype)
    put = lambda buf, blk: jax.lax.dynamic_update_slice_in_dim(buf, blk, row,
                                                               axis=0)
    new = [put(bufs[0], out_BM)]
    if save:
      new.append(put(bufs[1], a_BH))
      if gated:
        new.append(put(bufs[2], g_BH))
    return tuple(new), ws

  def group_body(e, bufs):
    ws = _ffn_weights_at((w_in_EMH, w_out_EHM, w_gate_EMH), e)
    return _group_loop(starts_E[e], ends_E[e], sizes, body, (bufs, ws))[0]

  bufs = [jnp.zeros((r, lhs_RM.shape[1]), dtype)]
  if save:
    bufs.append(jnp.zeros((r, h), dtype))
    if gated:
      bufs.append(jnp.zeros((r, h), dtype))
  bufs = jax.lax.fori_loop(0, group_sizes_E.shape[0], group_body, tuple(bufs))
  out = bufs[0]
  pre = bufs[1] if save else None
  gate = bufs[2] if save and gated else None
  return out, pre, gate


def _grouped_ffn_bwd_impl(lhs_RM, pre_RH, gate_RH, dout_RM, w_in_EMH,
                          w_out_EHM, w_gate_EMH, group_sizes_E, tile, block,
                          activation):
  """d_lhs and the weight gradients, one pass over each group's row blocks."""
  r, m = lhs_RM.shape
  e_count, _, h = w_in_EMH.shape
  dtype = lhs_RM.dtype
  gated = w_gate_EMH is not None
  starts_E, ends_E = _group_bounds(group_sizes_E, r)
  sizes = _loop_sizes(tile, block)

  def body(row, size, carry):
    d_lhs_RM, acc, ws = carry
    w_in_t, w_out_t, w_gate_t = ws   # transposed: [H, M], [M, H], [H, M]
    sl = lambda buf: jax.lax.dynamic_slice_in_dim(buf, row, size, axis=0)
    lhs_BM, dout_BM = sl(lhs_RM), sl(dout_RM)
    a_BH = sl(pre_RH)
    g_BH = sl(gate_RH) if gated else None
    if gated:
      h_BH, act_vjp = jax.vjp(
          lambda a, g: ffn_lib.activate(a, g, activation), a_BH, g_BH)
    else:
      h_BH, act_vjp = jax.vjp(
          lambda a: ffn_lib.activate(a, None, activation), a_BH)
    dh_BH = _dot(dout_BM, w_out_t, (1, 0), dtype)      # dout @ w_out^T
    d_pre = act_vjp(dh_BH)
    da_BH = d_pre[0]
    f32 = jnp.float32
    acc = list(acc)
    acc[0] = acc[0] + _dot(lhs_BM, da_BH, (0, 0), f32)  # d w_in  [M, H]
    acc[1] = acc[1] + _dot(h_BH, dout_BM, (0, 0), f32)  # d w_out [H, M]
    d_lhs = _dot(da_BH, w_in_t, (1, 0), f32)
    if gated:
      dg_BH = d_pre[1]
      acc[2] = acc[2] + _dot(lhs_BM, dg_BH, (0, 0), f32)
      d_lhs = d_lhs + _dot(dg_BH, w_gate_t, (1, 0), f32)
    d_lhs_RM = jax.lax.dynamic_update_slice_in_dim(
        d_lhs_RM, d_lhs.astype(dtype), row, axis=0)
    return d_lhs_RM, tuple(acc), ws

  def group_body(e, carry):
    d_lhs_RM, grads = carry
    # Transposed once per group, so that every block matmul below takes its
    # right operand row-major.
    ws = tuple(None if w is None else jnp.transpose(w) for w in
               _ffn_weights_at((w_in_EMH, w_out_EHM, w_gate_EMH), e))
    acc = [jnp.zeros((m, h), jnp.float32), jnp.zeros((h, m), jnp.float32)]
    if gated:
      acc.append(jnp.zeros((m, h), jnp.float32))
    d_lhs_RM, acc, _ = _group_loop(starts_E[e], ends_E[e], sizes, body,
                                   (d_lhs_RM, tuple(acc), ws))
    grads = tuple(jax.lax.dynamic_update_index_in_dim(g, a, e, axis=0)
                  for g, a in zip(grads, acc))
    return d_lhs_RM, grads

  grads = [jnp.zeros((e_count, m, h), jnp.float32),
           jnp.zeros((e_count, h, m), jnp.float32)]
  if gated:
    grads.append(jnp.zeros((e_count, m, h), jnp.float32))
  d_lhs_RM, grads = jax.lax.fori_loop(
      0, e_count, group_body, (jnp.zeros((r, m), dtype), tuple(grads)))
  return d_lhs_RM, grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _grouped_ffn(lhs_RM, w_in_EMH, w_out_EHM, w_gate_EMH, group_sizes_E, tile,
                 block, activation):
  return _grouped_ffn_impl(lhs_RM, w_in_EMH, w_out_EHM, w_gate_EMH,
                           group_sizes_E, tile, block, activation, False)[0]


def _grouped_ffn_fwd(lhs_RM, w_in_EMH, w_out_EHM, w_gate_EMH, group_sizes_E,
                     tile, block, activation):
  out, pre, gate = _grouped_ffn_impl(lhs_RM, w_in_EMH, w_out_EHM, w_gate_EMH,
                                     group_sizes_E, tile, block, activation,
                                     True)
  return out, (lhs_RM, pre, gate, w_in_EMH, w_out_EHM, w_gate_EMH,
               group_sizes_E)


def _grouped_ffn_bwd(tile, block, activation, res, dout_RM):
  lhs_RM, pre, gate, w_in_EMH, w_out_EHM, w_gate_EMH, group_sizes_E = res
  d_lhs, grads = _grouped_ffn_bwd_impl(
      lhs_RM, pre, gate, dout_RM.astype(lhs_RM.dtype), w_in_EMH, w_out_EHM,
      w_gate_EMH, group_sizes_E, tile, block, activation)
  d_w_gate = None if w_gate_EMH is None else grads[2].astype(w_gate_EMH.dtype)
  return (d_lhs, grads[0].astype(w_in_EMH.dtype),
          grads[1].astype(w_out_EHM.dtype), d_w_gate, None)


_grouped_ffn.defvjp(_grouped_ffn_fwd, _grouped_ffn_bwd)


def grouped_ffn(lhs_RM, w_in_EMH, w_out_EHM, w_gate_EMH, group_sizes_E, *,
                tile, activation, block_rows=None):
  """The expert FFN over grouped rows, fused: act(x W_in [, x W_gate]) W_out.

  Equals gmm(activate(gmm(x, W_in), gmm(x, W_gate)), W_out) with the same
  layout contract as `gmm`, but each row block goes through the whole FFN
  while it is in cache, and the backward is one pass per block (saving the
  pre-activations in the forward). On CPU this removes most of the copies
  of per-block matmuls (see BENCHMARKS.md).

  Args:
    lhs_RM: <dtype>[R, M] rows sorted by group, tile-aligned groups.
    w_in_EMH, w_out_EHM: [E, M, H], [E, H, M]; w_gate_EMH [E, M, H] or None.
    group_sizes_E: <int32>[E] multiples of `tile`, sum at most R.
    tile: static tile; activation: relu, gelu, swiglu or geglu.
    block_rows: rows per matmul within a group (default BLOCK_ROWS).
  Returns:
    <dtype>[R, M]; rows past the last group are 0.
  """
  if lhs_RM.shape[0] % tile:
    raise ValueError(f"rows ({lhs_RM.shape[0]}) must be a multiple of tile "
                     f"({tile})")
  block = _block_rows(lhs_RM.shape[0], tile, block_rows)
  dtype = lhs_RM.dtype
  cast = lambda w: None if w is None else w.astype(dtype)
  return _grouped_ffn(lhs_RM, cast(w_in_EMH), cast(w_out_EHM),
                      cast(w_gate_EMH), group_sizes_E.astype(jnp.int32), tile,
                      block, activation)


# --- the expert FFN over an [E, X, M] buffer (capacity engines) ---------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _batched_ffn(in_EXM, w_in_EMH, w_out_EHM, w_gate_EMH, activation):
  return _batched_ffn_fwd(in_EXM, w_in_EMH, w_out_EHM, w_gate_EMH,
                          activation)[0]


def _batched_ffn_fwd(in_EXM, w_in_EMH, w_out_EHM, w_gate_EMH, activation):
  a_EXH = jnp.einsum("EXM,EMH->EXH", in_EXM, w_in_EMH)
  g_EXH = (None if w_gate_EMH is None else
           jnp.einsum("EXM,EMH->EXH", in_EXM, w_gate_EMH))
  h_EXH = ffn_lib.activate(a_EXH, g_EXH, activation)
  out_EXM = jnp.einsum("EXH,EHM->EXM", h_EXH, w_out_EHM)
  # Only the pre-activations are kept; h is recomputed in the backward.
  return out_EXM, (in_EXM, a_EXH, g_EXH, w_in_EMH, w_out_EHM, w_gate_EMH)


def _batched_ffn_bwd(activation, res, dout_EXM):
  in_EXM, a_EXH, g_EXH, w_in_EMH, w_out_EHM, w_gate_EMH = res
  if g_EXH is None:
    h_EXH, act_vjp = jax.vjp(
        lambda a: ffn_lib.activate(a, None, activation), a_EXH)
  else:
    h_EXH, act_vjp = jax.vjp(
        lambda a, g: ffn_lib.activate(a, g, activation), a_EXH, g_EXH)
  dout_EXM = dout_EXM.astype(in_EXM.dtype)
  d_w_out = jnp.einsum("EXH,EXM->EHM", h_EXH, dout_EXM)
  # d_w_out first, so that h is dead before dh exists: at most two [E, X, H]
  # buffers live (pre-activation and dh) instead of three.
  d_w_out, dout_EXM = jax.lax.optimization_barrier((d_w_out, dout_EXM))
  d_pre = act_vjp(jnp.einsum("EXM,EHM->EXH", dout_EXM, w_out_EHM))
  d_in = jnp.einsum("EXH,EMH->EXM", d_pre[0], w_in_EMH)
  d_w_in = jnp.einsum("EXM,EXH->EMH", in_EXM, d_pre[0])
  d_w_gate = None
  if g_EXH is not None:
    d_in = d_in + jnp.einsum("EXH,EMH->EXM", d_pre[1], w_gate_EMH)
    d_w_gate = jnp.einsum("EXM,EXH->EMH", in_EXM,
                          d_pre[1]).astype(w_gate_EMH.dtype)
  return (d_in.astype(in_EXM.dtype), d_w_in.astype(w_in_EMH.dtype),
          d_w_out.astype(w_out_EHM.dtype), d_w_gate)


_batched_ffn.defvjp(_batched_ffn_fwd, _batched_ffn_bwd)


def batched_ffn(in_EXM, w_in_EMH, w_out_EHM, w_gate_EMH=None, *,
                activation="relu"):
  """moejax.ops.ffn.expert_ffn with a leaner backward.

  Same forward (the same einsums); the backward keeps the input and the
  pre-activations only and recomputes the activation, instead of keeping
  both pre- and post-activation [E, X, H] buffers as autodiff does: one
  [E, X, H] buffer less at the peak, for one elementwise pass more.
  """
  return _batched_ffn(in_EXM, w_in_EMH, w_out_EHM, w_gate_EMH, activation)
