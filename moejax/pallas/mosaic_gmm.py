"""Grouped matmul kernels for TPU (Pallas Mosaic).

The expert of every row block is scalar-prefetched into SMEM so the BlockSpec
index maps can pick the weight block, and Mosaic's pipeline double-buffers the
HBM->VMEM copies. The grid's innermost axis is the reduction, accumulated in a
float32 VMEM scratch.

* `gmm_fwd`: grid (row blocks, N blocks, K blocks); row blocks past the last
  group skip the matmul and write zeros, and re-point their lhs/rhs index
  maps at the previous block so no copy is issued for them.
* `tgmm`: grid (K blocks, N blocks, row blocks) with the row blocks innermost:
  consecutive row blocks of one group revisit the same [bk, bn] output block,
  which stays in VMEM; it is zeroed when the group starts and written when it
  ends. Groups with no rows are never visited; the caller zeroes them.

Callers (moejax.pallas.gmm) pad every dimension to a block multiple.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_NT = (((1,), (0,)), ((), ()))
_TT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _gmm_kernel(info_ref, last_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *,
                num_experts, transpose_rhs):
  del last_ref
  i, kk = pl.program_id(0), pl.program_id(2)

  @pl.when(kk == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(info_ref[i] < num_experts)
  def _():
    acc_ref[...] += lax.dot_general(
        lhs_ref[...], rhs_ref[...], _TT if transpose_rhs else _NT,
        precision=_precision(lhs_ref.dtype),
        preferred_element_type=jnp.float32)

  @pl.when(kk == pl.num_programs(2) - 1)
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def gmm_fwd(lhs_RK, rhs, info_I, *, num_experts, transpose_rhs, bm, bk, bn,
            out_dtype, interpret):
  """Same contract as triton_gmm.gmm_fwd."""
  r, k = lhs_RK.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  used_I = info_I < num_experts
  # Index of the last used row block (0 if none): unused blocks re-point here.
  last_used = jnp.maximum(jnp.sum(used_I.astype(jnp.int32)) - 1, 0)[None]

  def row(i, kk, info, last):
    return jnp.where(info[i] < num_experts, i, last[0]), kk

  def weight(i, j, kk, info, last):
    ii = jnp.where(info[i] < num_experts, i, last[0])
    e = jnp.minimum(info[ii], num_experts - 1)
    return (e, j, kk) if transpose_rhs else (e, kk, j)

  rhs_block = (None, bn, bk) if transpose_rhs else (None, bk, bn)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(r // bm, n // bn, k // bk),
      in_specs=[
          pl.BlockSpec((bm, bk), lambda i, j, kk, info, last: row(
              i, kk, info, last)),
          pl.BlockSpec(rhs_block, weight),
      ],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk, info, last: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
  )
  itemsize = jnp.dtype(lhs_RK.dtype).itemsize
  return pl.pallas_call(
      functools.partial(_gmm_kernel, num_experts=num_experts,
                        transpose_rhs=transpose_rhs),
      out_shape=jax.ShapeDtypeStruct((r, n), out_dtype),
      grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=2 * r * k * n, transcendentals=0,
          bytes_accessed=(r * k * (n // bn) + (r // bm) * k * n) * itemsize
          + r * n * jnp.dtype(out_dtype).itemsize),
      interpret=interpret,
      name="moejax_gmm_mosaic",
  )(info_I, last_used, lhs_RK, rhs)


def _tgmm_kernel(info_ref, lhs_ref, dout_ref, out_ref, acc_ref, *,
                 num_experts):
  i, last = pl.program_id(2), pl.num_programs(2) - 1
  expert = lambda t: jnp.minimum(info_ref[t], num_experts - 1)
  e = expert(i)
  starts = jnp.logical_or(i == 0, expert(jnp.maximum(i - 1, 0)) != e)
  ends = jnp.logical_or(i == last, expert(jnp.minimum(i + 1, last)) != e)

  @pl.when(starts)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(info_ref[i] < num_experts)
  def _():
    acc_ref[...] += lax.dot_general(
        lhs_ref[...], dout_ref[...], _TN,
        precision=_precision(lhs_ref.dtype),
        preferred_element_type=jnp.float32)

  @pl.when(ends)
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs_RK, dout_RN, info_I, group_sizes_E, *, num_experts, bm, bk, bn,
         out_dtype, interpret):
  """Same contract as triton_gmm.tgmm, with row-block experts instead of
  offsets (info_I: expert of each row block, num_experts if unused)."""
  r, k = lhs_RK.shape
  n = dout_RN.shape[1]

  def out_map(kb, nb, i, info):
    return jnp.minimum(info[i], num_experts - 1), kb, nb

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(k // bk, n // bn, r // bm),
      in_specs=[
          pl.BlockSpec((bm, bk), lambda kb, nb, i, info: (i, kb)),
          pl.BlockSpec((bm, bn), lambda kb, nb, i, info: (i, nb)),
      ],
      out_specs=pl.BlockSpec((None, bk, bn), out_map),
      scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)],
  )
  itemsize = jnp.dtype(lhs_RK.dtype).itemsize
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, num_experts=num_experts),
      out_shape=jax.ShapeDtypeStruct((num_experts, k, n), out_dtype),
      grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=2 * r * k * n, transcendentals=0,
          bytes_accessed=(r * k * (n // bn) + r * n * (k // bk)) * itemsize
          + num_experts * k * n * jnp.dtype(out_dtype).itemsize),
      interpret=interpret,
      name="moejax_tgmm_mosaic",
  )(info_I, lhs_RK, dout_RN)
  # Groups without rows were never visited: their blocks hold whatever the
  # buffer held.
  return jnp.where((group_sizes_E > 0)[:, None, None], out,
                   jnp.zeros((), out.dtype))
