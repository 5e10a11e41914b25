"""Grouped matmul kernels for GPU (Pallas Triton).

Both kernels read whole arrays through unblocked refs and slice them with
`pl.ds` inside the kernel, so every loaded value has power-of-two shape while
the arrays themselves need not (Triton's rule), and the expert of a row block
can be read at run time (Triton has no scalar prefetch).

* `gmm_fwd`: one program per (row block, column block), visited in GROUP_M
  swizzled order so that programs running together share lhs and rhs tiles in
  L2; a loop over K accumulates in float32. Row blocks past the last group
  write zeros without loading anything.
* `tgmm`: one program per (expert, K block, N block) loops over the row
  blocks of its group: d_rhs[e] = lhs[rows of e]^T @ dout[rows of e]. An
  empty group loops zero times and writes zeros.

Callers (moejax.pallas.gmm) pad every dimension to a block multiple.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

_NT = (((1,), (0,)), ((), ()))   # [m, k] x [k, n]
_TT = (((1,), (1,)), ((), ()))   # [m, k] x [n, k]
_TN = (((0,), (0,)), ((), ()))   # [m, k]^T x [m, n]


def _precision(dtype):
  # float32 inputs: IEEE float32 products, as XLA at 'highest' (tests compare
  # against it); bfloat16: the tensor-core default.
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _swizzle(pid, grid_m, grid_n, group_m):
  """Program id -> (row block, column block), GROUP_M rows at a time."""
  per_group = group_m * grid_n
  group = pid // per_group
  first_m = group * group_m
  size_m = jnp.minimum(grid_m - first_m, group_m)
  local = pid % per_group
  return first_m + local % size_m, local // size_m


def _gmm_kernel(info_ref, lhs_ref, rhs_ref, out_ref, *, num_experts, bm, bk,
                bn, grid_m, grid_n, group_m, transpose_rhs):
  i, j = _swizzle(pl.program_id(0), grid_m, grid_n, group_m)
  e = info_ref[i]
  used = e < num_experts
  e = jnp.minimum(e, num_experts - 1)
  rows = pl.ds(pl.multiple_of(i * bm, bm), bm)
  cols = pl.ds(pl.multiple_of(j * bn, bn), bn)
  num_k = lhs_ref.shape[1] // bk
  precision = _precision(lhs_ref.dtype)

  def body(kk, acc):
    ks = pl.ds(pl.multiple_of(kk * bk, bk), bk)
    a = lhs_ref[rows, ks]
    if transpose_rhs:
      b, dims = rhs_ref[e, cols, ks], _TT
    else:
      b, dims = rhs_ref[e, ks, cols], _NT
    return acc + lax.dot_general(a, b, dims, precision=precision,
                                 preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, jnp.where(used, num_k, 0), body,
                      jnp.zeros((bm, bn), jnp.float32))
  out_ref[rows, cols] = acc.astype(out_ref.dtype)


def gmm_fwd(lhs_RK, rhs, info_I, *, num_experts, transpose_rhs, bm, bk, bn,
            out_dtype, interpret, group_m=8, num_warps=None, num_stages=None):
  """out[rows of block i] = lhs[rows] @ rhs[info[i]] (or rhs[info[i]]^T).

  Args:
    lhs_RK: [R, K], R % bm == 0, K % bk == 0.
    rhs: [E, K, N] ([E, N, K] when transpose_rhs), N % bn == 0.
    info_I: <int32>[R // bm] expert of each row block, num_experts if unused.
  Returns:
    [R, N] out_dtype.
  """
  r, k = lhs_RK.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  grid_m, grid_n = r // bm, n // bn
  kernel = functools.partial(
      _gmm_kernel, num_experts=num_experts, bm=bm, bk=bk, bn=bn,
      grid_m=grid_m, grid_n=grid_n, group_m=min(group_m, grid_m),
      transpose_rhs=transpose_rhs)
  itemsize = jnp.dtype(lhs_RK.dtype).itemsize
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((r, n), out_dtype),
      grid=(grid_m * grid_n,),
      compiler_params=pl_triton.CompilerParams(
          num_warps=num_warps or (8 if bm * bn >= 128 * 128 else 4),
          num_stages=num_stages or 3),
      cost_estimate=pl.CostEstimate(
          flops=2 * r * k * n, transcendentals=0,
          bytes_accessed=(r * k * grid_n + num_experts * k * n) * itemsize
          + r * n * jnp.dtype(out_dtype).itemsize),
      interpret=interpret,
      name="moejax_gmm_triton",
  )(info_I, lhs_RK, rhs)


def _tgmm_kernel(offsets_ref, lhs_ref, dout_ref, out_ref, *, bm, bk, bn):
  nb, kb, e = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  first = offsets_ref[e] // bm
  last = offsets_ref[e + 1] // bm
  ks = pl.ds(pl.multiple_of(kb * bk, bk), bk)
  ns = pl.ds(pl.multiple_of(nb * bn, bn), bn)
  precision = _precision(lhs_ref.dtype)

  def body(t, acc):
    rows = pl.ds(pl.multiple_of(t * bm, bm), bm)
    return acc + lax.dot_general(lhs_ref[rows, ks], dout_ref[rows, ns], _TN,
                                 precision=precision,
                                 preferred_element_type=jnp.float32)

  acc = lax.fori_loop(first, last, body, jnp.zeros((bk, bn), jnp.float32))
  out_ref[e, ks, ns] = acc.astype(out_ref.dtype)


def tgmm(lhs_RK, dout_RN, offsets_E1, *, num_experts, bm, bk, bn, out_dtype,
         interpret, num_warps=None, num_stages=None):
  """out[e] = lhs[rows of e]^T @ dout[rows of e], float32 accumulation.

  Args:
    lhs_RK: [R, K]; dout_RN: [R, N]; R % bm == 0, K % bk == 0, N % bn == 0.
    offsets_E1: <int32>[E + 1] first row of each group (multiples of bm) and
      the end of the last.
  Returns:
    [E, K, N] out_dtype; empty groups give zeros.
  """
  r, k = lhs_RK.shape
  n = dout_RN.shape[1]
  itemsize = jnp.dtype(lhs_RK.dtype).itemsize
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, bm=bm, bk=bk, bn=bn),
      out_shape=jax.ShapeDtypeStruct((num_experts, k, n), out_dtype),
      # Experts vary slowest so programs running together share rows in L2.
      grid=(n // bn, k // bk, num_experts),
      compiler_params=pl_triton.CompilerParams(
          num_warps=num_warps or (8 if bk * bn >= 128 * 128 else 4),
          num_stages=num_stages or 3),
      cost_estimate=pl.CostEstimate(
          flops=2 * r * k * n, transcendentals=0,
          bytes_accessed=(r * k * (n // bn) + r * n * (k // bk)) * itemsize
          + num_experts * k * n * jnp.dtype(out_dtype).itemsize),
      interpret=interpret,
      name="moejax_tgmm_triton",
  )(offsets_E1, lhs_RK, dout_RN)
