"""Row gather and weighted combine kernels for TPU (Pallas Mosaic).

The source rows stay in HBM (memory_space ANY); each grid step reads its
block of row indices into SMEM, issues one row DMA per index into a VMEM
buffer, waits for them and then scales / masks / sums in VMEM while Mosaic
pipelines the output block back to HBM. Blocks span the full width M.

Same contracts as moejax.pallas.triton_permute (`gather`, `combine`), so the
wrappers in moejax.pallas.permute treat both families alike.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _smem_block(size):
  """Block i of an index array reshaped to [blocks, 1, size], in SMEM.

  (A rank-1 block would have to be a multiple of 1024 entries; as the last
  two dims of a rank-3 array, (1, size) is always a legal block.)
  """
  return pl.BlockSpec((None, 1, size), lambda i: (i, 0, 0),
                      memory_space=pltpu.SMEM)


def _copy_rows(src_hbm, idx_smem, sem, count, n_src, dst):
  """Starts `count` row DMAs src[idx[j]] -> dst(j), then waits for all."""

  def start(j, carry):
    src = jnp.minimum(idx_smem[0, j], n_src - 1)
    pltpu.make_async_copy(src_hbm.at[pl.ds(src, 1)], dst(j), sem).start()
    return carry

  def wait(j, carry):
    pltpu.make_async_copy(src_hbm.at[pl.ds(0, 1)], dst(0), sem).wait()
    return carry

  lax.fori_loop(0, count, start, 0)
  lax.fori_loop(0, count, wait, 0)


def _gather_kernel(*refs, n_src, bt, has_scale, has_other):
  refs = list(refs)
  tok_smem = refs.pop(0)
  tok_ref = refs.pop(0)
  scale_ref = refs.pop(0) if has_scale else None
  x_hbm = refs.pop(0)
  other_ref = refs.pop(0) if has_other else None
  out_ref = refs.pop(0)
  dots_ref = refs.pop(0) if has_other else None
  buf, sem = refs
  _copy_rows(x_hbm, tok_smem, sem, bt, n_src,
             lambda j: buf.at[pl.ds(j, 1)])
  valid = tok_ref[...] < n_src                       # [bt, 1]
  g = jnp.where(valid, buf[...].astype(jnp.float32), 0.0)
  out = g if scale_ref is None else g * scale_ref[...]
  out_ref[...] = out.astype(out_ref.dtype)
  if other_ref is not None:
    dots_ref[...] = jnp.sum(g * other_ref[...].astype(jnp.float32), axis=1,
                            keepdims=True)


def gather(x_NM, tok_R, scale_R=None, other_RM=None, *, bt, bn, out_dtype,
           interpret):
  """Same contract as triton_permute.gather (bn must equal M here)."""
  n, m = x_NM.shape
  if bn != m:
    raise ValueError(f"the mosaic gather uses full-width blocks; bn={bn}, "
                     f"M={m}")
  r = tok_R.shape[0]
  has_scale, has_other = scale_R is not None, other_RM is not None
  col = lambda i: (i, 0)
  in_specs = [_smem_block(bt), pl.BlockSpec((bt, 1), col)]
  args = [tok_R.reshape(r // bt, 1, bt), tok_R[:, None]]
  if has_scale:
    in_specs.append(pl.BlockSpec((bt, 1), col))
    args.append(scale_R.astype(jnp.float32)[:, None])
  in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
  args.append(x_NM)
  if has_other:
    in_specs.append(pl.BlockSpec((bt, m), col))
    args.append(other_RM)
  out_specs = [pl.BlockSpec((bt, m), col)]
  out_shape = [jax.ShapeDtypeStruct((r, m), out_dtype)]
  if has_other:
    out_specs.append(pl.BlockSpec((bt, 1), col))
    out_shape.append(jax.ShapeDtypeStruct((r, 1), jnp.float32))
  itemsize = jnp.dtype(x_NM.dtype).itemsize
  outs = pl.pallas_call(
      functools.partial(_gather_kernel, n_src=n, bt=bt, has_scale=has_scale,
                        has_other=has_other),
      out_shape=out_shape,
      grid=(r // bt,),
      in_specs=in_specs,
      out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((bt, m), x_NM.dtype),
                      pltpu.SemaphoreType.DMA],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel",)),
      cost_estimate=pl.CostEstimate(
          flops=0, transcendentals=0,
          bytes_accessed=r * m * (2 + has_other) * itemsize),
      interpret=interpret,
      name="moejax_gather_mosaic",
  )(*args)
  return outs[0], (outs[1][:, 0][None] if has_other else None)


def _combine_kernel(row_smem, row_ref, w_ref, src_hbm, out_ref, buf, sem, *,
                    n_rows, k, bt):
  _copy_rows(src_hbm, row_smem, sem, bt * k, n_rows,
             lambda j: buf.at[lax.rem(j, k), pl.ds(lax.div(j, k), 1)])
  rows, w = row_ref[...], w_ref[...]
  acc = jnp.zeros(out_ref.shape, jnp.float32)
  for kk in range(k):
    valid = rows[:, kk:kk + 1] < n_rows
    acc += jnp.where(valid, w[:, kk:kk + 1] * buf[kk].astype(jnp.float32),
                     0.0)
  out_ref[...] = acc.astype(out_ref.dtype)


def combine(src_RM, row_NK, w_NK, *, bt, bn, out_dtype, interpret):
  """Same contract as triton_permute.combine (bn must equal M here)."""
  r, m = src_RM.shape
  if bn != m:
    raise ValueError(f"the mosaic combine uses full-width blocks; bn={bn}, "
                     f"M={m}")
  n, k = row_NK.shape
  col = lambda i: (i, 0)
  itemsize = jnp.dtype(src_RM.dtype).itemsize
  return pl.pallas_call(
      functools.partial(_combine_kernel, n_rows=r, k=k, bt=bt),
      out_shape=jax.ShapeDtypeStruct((n, m), out_dtype),
      grid=(n // bt,),
      in_specs=[
          _smem_block(bt * k),
          pl.BlockSpec((bt, k), col),
          pl.BlockSpec((bt, k), col),
          pl.BlockSpec(memory_space=pl.ANY),
      ],
      out_specs=pl.BlockSpec((bt, m), col),
      scratch_shapes=[pltpu.VMEM((k, bt, m), src_RM.dtype),
                      pltpu.SemaphoreType.DMA],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel",)),
      cost_estimate=pl.CostEstimate(
          flops=2 * n * k * m, transcendentals=0,
          bytes_accessed=n * m * (k + 1) * itemsize),
      interpret=interpret,
      name="moejax_combine_mosaic",
  )(row_NK.reshape(n // bt, 1, bt * k), row_NK, w_NK.astype(jnp.float32),
    src_RM)
