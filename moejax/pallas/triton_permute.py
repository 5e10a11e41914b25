"""Row gather and weighted combine kernels for GPU (Pallas Triton).

Triton loads through an integer vector index as a gather, so each program
moves a [rows, columns] block in one vectorised load and one store.

* `gather`: out[r] = scale[r] * x[tok[r]] (zero where tok[r] is out of
  range). With `other`, it also returns the per-row partial dot products
  <x[tok[r]], other[r]> of each column block: unpermute's backward needs
  d_rows = w * d_y[token] and d_w = <d_y[token], rows>, which then cost one
  pass.
* `combine`: y[t] = sum_k w[t, k] * src[row[t, k]] (rows out of range add
  nothing), the weighted unpermute, accumulated in float32.

Callers (moejax.pallas.permute) pad rows and columns to block multiples.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton


def _gather_kernel(*refs, n_src, bt, bn, has_scale, has_other):
  refs = list(refs)
  tok_ref = refs.pop(0)
  scale_ref = refs.pop(0) if has_scale else None
  x_ref = refs.pop(0)
  other_ref = refs.pop(0) if has_other else None
  out_ref = refs.pop(0)
  dots_ref = refs.pop(0) if has_other else None
  rb, cb = pl.program_id(0), pl.program_id(1)
  rows = pl.ds(pl.multiple_of(rb * bt, bt), bt)
  cols = pl.ds(pl.multiple_of(cb * bn, bn), bn)
  tok = tok_ref[rows]
  valid = (tok < n_src)[:, None]
  g = x_ref[jnp.minimum(tok, n_src - 1), cols].astype(jnp.float32)
  g = jnp.where(valid, g, 0.0)
  out = g if scale_ref is None else g * scale_ref[rows].astype(
      jnp.float32)[:, None]
  out_ref[rows, cols] = out.astype(out_ref.dtype)
  if other_ref is not None:
    other = other_ref[rows, cols].astype(jnp.float32)
    dots_ref[cb, rows] = jnp.sum(g * other, axis=1)


def gather(x_NM, tok_R, scale_R=None, other_RM=None, *, bt, bn, out_dtype,
           interpret, num_warps=4):
  """Gathers (and scales) rows; optionally row dots with `other`.

  Args:
    x_NM: [N, M] source rows, M % bn == 0.
    tok_R: <int32>[R] source row of each output row (>= N: zero row);
      R % bt == 0.
    scale_R: optional <float32>[R] per-row factor.
    other_RM: optional [R, M]: also return dots <float32>[M // bn, R].
  Returns:
    out_RM (out_dtype), dots or None.
  """
  n, m = x_NM.shape
  r = tok_R.shape[0]
  has_scale, has_other = scale_R is not None, other_RM is not None
  args = [tok_R] + ([scale_R] if has_scale else []) + [x_NM] + (
      [other_RM] if has_other else [])
  out_shape = [jax.ShapeDtypeStruct((r, m), out_dtype)]
  if has_other:
    out_shape.append(jax.ShapeDtypeStruct((m // bn, r), jnp.float32))
  itemsize = jnp.dtype(x_NM.dtype).itemsize
  outs = pl.pallas_call(
      functools.partial(_gather_kernel, n_src=n, bt=bt, bn=bn,
                        has_scale=has_scale, has_other=has_other),
      out_shape=out_shape,
      grid=(r // bt, m // bn),
      compiler_params=pl_triton.CompilerParams(num_warps=num_warps,
                                               num_stages=1),
      cost_estimate=pl.CostEstimate(
          flops=0, transcendentals=0,
          bytes_accessed=r * m * (2 + has_other) * itemsize),
      interpret=interpret,
      name="moejax_gather_triton",
  )(*args)
  return outs[0], (outs[1] if has_other else None)


def _combine_kernel(row_ref, w_ref, src_ref, out_ref, *, n_rows, k, bt, bn):
  tb, cb = pl.program_id(0), pl.program_id(1)
  toks = pl.ds(pl.multiple_of(tb * bt, bt), bt)
  cols = pl.ds(pl.multiple_of(cb * bn, bn), bn)
  acc = jnp.zeros((bt, bn), jnp.float32)
  for kk in range(k):
    row = row_ref[toks, kk]
    w = w_ref[toks, kk].astype(jnp.float32)
    v = src_ref[jnp.minimum(row, n_rows - 1), cols].astype(jnp.float32)
    acc += jnp.where((row < n_rows)[:, None], w[:, None] * v, 0.0)
  out_ref[toks, cols] = acc.astype(out_ref.dtype)


def combine(src_RM, row_NK, w_NK, *, bt, bn, out_dtype, interpret,
            num_warps=4):
  """y[t] = sum_k w[t, k] * src[row[t, k]].

  Args:
    src_RM: [R, M], M % bn == 0.
    row_NK: <int32>[N, K] (>= R: nothing), N % bt == 0.
    w_NK: <float32>[N, K].
  Returns:
    [N, M] out_dtype.
  """
  r, m = src_RM.shape
  n, k = row_NK.shape
  itemsize = jnp.dtype(src_RM.dtype).itemsize
  return pl.pallas_call(
      functools.partial(_combine_kernel, n_rows=r, k=k, bt=bt, bn=bn),
      out_shape=jax.ShapeDtypeStruct((n, m), out_dtype),
      grid=(n // bt, m // bn),
      compiler_params=pl_triton.CompilerParams(num_warps=num_warps,
                                               num_stages=1),
      cost_estimate=pl.CostEstimate(
          flops=2 * n * k * m, transcendentals=0,
          bytes_accessed=n * m * (k + 1) * itemsize),
      interpret=interpret,
      name="moejax_combine_triton",
  )(row_NK, w_NK, src_RM)
