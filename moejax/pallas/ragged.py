"""`ragged_dot` with arbitrary group sizes, on the tile-aligned kernels.

jax.lax.ragged_dot(lhs, rhs, group_sizes) lets groups start anywhere. The GMM
kernels want every group on a tile boundary, so this moves each group's rows
to the next boundary (permute), multiplies (gmm) and moves them back
(unpermute with unit weights). The two extra passes are bandwidth-bound and
cost far less than the matmul at MoE sizes; the MoE engine itself never needs
them because its dispatch permute lays rows out tile-aligned in the first
place.
"""

import jax
import jax.numpy as jnp

from moejax.pallas import backend as backend_lib
from moejax.pallas import grouped_matmul as gmm_lib
from moejax.pallas import permutation as permute_lib


def aligned_num_rows(num_rows, num_groups, tile):
  """Static row bound R of the tile-aligned layout of num_rows rows."""
  return backend_lib.round_up(num_rows + num_groups * (tile - 1), tile)


def aligned_layout(group_sizes_E, num_rows, tile):
  """Where each row of a ragged layout goes in the tile-aligned one.

  Args:
    group_sizes_E: <int32>[E] rows of each group (any sizes, sum <= T).
    num_rows: T, rows of the ragged input.
    tile: alignment.
  Returns:
    (row_T1 <int32>[T, 1]: aligned row of each input row, R past the groups;
     assignment_R <int32>[R]: input row of each aligned row, T if padding;
     padded_E <int32>[E]: group sizes rounded up to the tile).
  """
  e = group_sizes_E.shape[0]
  sizes_E = group_sizes_E.astype(jnp.int32)
  r = aligned_num_rows(num_rows, e, tile)
  ends_E = jnp.cumsum(sizes_E)
  starts_E = ends_E - sizes_E
  padded_E = -(-sizes_E // tile) * tile
  aligned_starts_E = jnp.cumsum(padded_E) - padded_E
  t_T = jnp.arange(num_rows, dtype=jnp.int32)
  group_T = jnp.searchsorted(ends_E, t_T, side="right").astype(jnp.int32)
  g = jnp.minimum(group_T, e - 1)
  row_T = jnp.where(group_T < e, aligned_starts_E[g] + t_T - starts_E[g], r)
  assignment_R = jnp.full((r,), num_rows, jnp.int32).at[row_T].set(
      t_T, mode="drop", unique_indices=True)
  return row_T[:, None].astype(jnp.int32), assignment_R, padded_E


def ragged_dot(lhs_TM, rhs_EMH, group_sizes_E, *, tile=128, backend="auto",
               **gmm_kwargs):
  """Drop-in for jax.lax.ragged_dot(lhs, rhs, group_sizes), differentiable.

  Args:
    lhs_TM: <dtype>[T, M] rows sorted by group.
    rhs_EMH: <dtype>[E, M, H].
    group_sizes_E: <int32>[E], any sizes (0 allowed), sum <= T; rows past the
      sum come out zero.
    tile: alignment of the internal layout (see moejax.pallas.gmm).
    backend: see moejax.pallas.BACKENDS; 'xla' calls jax.lax.ragged_dot.
    **gmm_kwargs: tuning passed to moejax.pallas.gmm.
  Returns:
    <dtype>[T, H].
  """
  be = backend_lib.resolve_backend(backend)
  if be.kind == "xla":
    return jax.lax.ragged_dot(lhs_TM, rhs_EMH,
                              group_sizes_E.astype(jnp.int32))
  row_T1, assignment_R, padded_E = aligned_layout(group_sizes_E,
                                                  lhs_TM.shape[0], tile)
  rows_RM = permute_lib.permute(lhs_TM, row_T1, assignment_R, backend=be)
  out_RH = gmm_lib.gmm(rows_RM, rhs_EMH, padded_E, tile=tile, backend=be,
                       **gmm_kwargs)
  ones_T1 = jnp.ones(row_T1.shape, jnp.float32)
  return permute_lib.unpermute(out_RH, ones_T1, row_T1, assignment_R,
                               backend=be)
