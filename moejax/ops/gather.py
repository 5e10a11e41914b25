"""Row gathers whose backward is again a gather (no scatter-add), and the
static row bound of the grouped (dropless) layout: pure functions of arrays,
shared by the engines, expert parallelism and the Pallas kernels' XLA paths.
"""

import jax
import jax.numpy as jnp



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


def dropless_num_rows(num_assignments, num_experts, tile):
  """Static row bound R: every expert's rows rounded up to the tile."""
  return -(-(num_assignments + num_experts * (tile - 1)) // tile) * tile
