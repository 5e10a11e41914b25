"""Grouped matmul (GMM) on XLA: the dropless engine's expert computation.

`gmm(lhs_RM, rhs_EMH, group_sizes_E)` computes, for every expert e, the rows
of `lhs` that belong to group e times `rhs[e]`. Rows come sorted by group and
each group starts on a multiple of `tile` (the dropless engine lays them out
so); the rows of a group past its size are zero padding.

Why not jax.lax.ragged_dot: on XLA:CPU its generic lowering materialises a
dense [groups x rows] product (about 8x an equal-FLOP einsum at 8 groups).
Here every tile of `tile` rows belongs to exactly one expert, so a scan over
tiles does one [tile, M] x [M, H] matmul each and skips the unused tiles; the
backward pass is the same scan with the weights transposed (d_lhs) and a
per-tile outer product accumulated into the expert's slice (d_rhs). The
Pallas kernels (moejax.pallas) implement the same signature.
"""

import functools

import jax
import jax.numpy as jnp


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


def _tile_scan(fn, carry, xs):
  return jax.lax.scan(fn, carry, xs)


def _gmm_fwd_impl(lhs_RM, rhs_EMH, expert_I, used_I, tile, transpose_rhs):
  r, m = lhs_RM.shape
  num_tiles = r // tile
  lhs_IBM = lhs_RM.reshape(num_tiles, tile, m)
  h = rhs_EMH.shape[1] if transpose_rhs else rhs_EMH.shape[2]
  out_dtype = jnp.result_type(lhs_RM.dtype, rhs_EMH.dtype)

  def body(_, xs):
    lhs_BM, e, used = xs
    w = rhs_EMH[e]
    def compute():
      if transpose_rhs:  # w is [H, M] here: lhs @ w.T
        return jnp.einsum("BM,HM->BH", lhs_BM, w,
                          preferred_element_type=jnp.float32).astype(out_dtype)
      return jnp.einsum("BM,MH->BH", lhs_BM, w,
                        preferred_element_type=jnp.float32).astype(out_dtype)
    out = jax.lax.cond(used, compute,
                       lambda: jnp.zeros((tile, h), out_dtype))
    return None, out

  _, out_IBH = _tile_scan(body, None, (lhs_IBM, expert_I, used_I))
  return out_IBH.reshape(r, h)


def _tgmm_impl(lhs_RM, dout_RH, expert_I, used_I, num_experts, tile):
  """d_rhs[e] = sum over tiles of expert e of lhs_tile^T @ dout_tile."""
  r, m = lhs_RM.shape
  h = dout_RH.shape[1]
  num_tiles = r // tile

  def body(acc_EMH, xs):
    lhs_BM, dout_BH, e, used = xs
    def add():
      upd = jnp.einsum("BM,BH->MH", lhs_BM, dout_BH,
                       preferred_element_type=jnp.float32)
      return acc_EMH.at[e].add(upd)
    return jax.lax.cond(used, add, lambda: acc_EMH), None

  acc, _ = _tile_scan(body, jnp.zeros((num_experts, m, h), jnp.float32),
                      (lhs_RM.reshape(num_tiles, tile, m),
                       dout_RH.reshape(num_tiles, tile, h), expert_I, used_I))
  return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs_RM, rhs_EMH, group_sizes_E, tile):
  expert_I, used_I = tile_experts(group_sizes_E, lhs_RM.shape[0], tile)
  return _gmm_fwd_impl(lhs_RM, rhs_EMH, expert_I, used_I, tile, False)


def _gmm_fwd(lhs_RM, rhs_EMH, group_sizes_E, tile):
  expert_I, used_I = tile_experts(group_sizes_E, lhs_RM.shape[0], tile)
  out = _gmm_fwd_impl(lhs_RM, rhs_EMH, expert_I, used_I, tile, False)
  return out, (lhs_RM, rhs_EMH, expert_I, used_I)


def _gmm_bwd(tile, res, dout_RH):
  lhs_RM, rhs_EMH, expert_I, used_I = res
  # d_lhs = dout @ rhs[e]^T per tile: the same scan with rhs transposed.
  rhs_EHM = jnp.swapaxes(rhs_EMH, 1, 2)
  dlhs = _gmm_fwd_impl(dout_RH, rhs_EHM, expert_I, used_I, tile, False)
  drhs = _tgmm_impl(lhs_RM, dout_RH, expert_I, used_I, rhs_EMH.shape[0], tile)
  return dlhs.astype(lhs_RM.dtype), drhs.astype(rhs_EMH.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs_RM, rhs_EMH, group_sizes_E, *, tile):
  """Grouped matmul over tile-aligned groups.

  Args:
    lhs_RM: <dtype>[R, M] rows sorted by group; R a multiple of `tile`.
    rhs_EMH: <dtype>[E, M, H] one matrix per group.
    group_sizes_E: <int32>[E] rows per group, each a multiple of `tile`, sum
      at most R (rows past the sum are ignored and come out zero).
    tile: rows per tile (static).
  Returns:
    <dtype>[R, H], accumulated in float32.
  """
  if lhs_RM.shape[0] % tile:
    raise ValueError(f"rows ({lhs_RM.shape[0]}) must be a multiple of tile "
                     f"({tile})")
  return _gmm(lhs_RM, rhs_EMH, group_sizes_E.astype(jnp.int32), tile)


def ragged_dot_gmm(lhs_RM, rhs_EMH, group_sizes_E, *, tile):
  """The same contract through jax.lax.ragged_dot (good on GPU/TPU)."""
  del tile
  # Rows past sum(group_sizes) belong to no group; ragged_dot leaves them zero.
  return jax.lax.ragged_dot(lhs_RM, rhs_EMH, group_sizes_E.astype(jnp.int32))
