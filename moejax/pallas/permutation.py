"""Permute / unpermute: tokens to the expert-sorted rows and back.

The layout is the dropless engine's (moejax.layers.dispatch.dropless_layout):
`row_NK[n, k]` is the row of token n's k-th assignment (R if it has none:
padding), `assignment_R[r]` the assignment n*K + k that row r holds (N*K for
a padding row). Two kernels do all four passes:

* permute:   in[r] = x[token(r)]                       (gather)
  backward:  d_x[n] = sum_k d_in[row[n, k]]             (combine, weights 1)
* unpermute: y[n] = sum_k w[n, k] * out[row[n, k]]      (combine, weighted:
             the weighting is fused, no [N, K, M] intermediate)
  backward:  d_out[r] = w(r) * d_y[token(r)] and d_w[n, k] = <d_y[n],
             out[row[n, k]]>, both from one gather pass that also returns
             the row dot products.

Every pass reads and writes each row once, in float32 arithmetic, in the
input's dtype, so HBM traffic is the minimum for a gather/scatter.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from moejax.ops import gather as gather_lib  # XLA gathers whose backward is a gather
from moejax.pallas import backend as backend_lib
from moejax.pallas import mosaic_permute
from moejax.pallas import triton_permute

# (rows per block, columns per block) caps; Mosaic always uses full width.
DEFAULT_BLOCKS = {"triton": (16, 512), "mosaic": (32, None)}


@dataclasses.dataclass(frozen=True)
class PermuteConfig:
  backend: backend_lib.Backend
  blocks: Optional[tuple] = None
  num_warps: Optional[int] = None


def make_config(backend="auto", *, blocks=None, num_warps=None):
  return PermuteConfig(backend_lib.resolve_backend(backend),
                       None if blocks is None else tuple(blocks), num_warps)


def _blocks(cfg, rows, cols):
  """(bt, rows_padded, bn, cols_padded) for this backend."""
  kind = cfg.backend.kind
  cap_t, cap_n = cfg.blocks or DEFAULT_BLOCKS[kind]
  if kind == "triton":
    bt, rows_p = backend_lib.pick_block(rows, cap_t, kind, minimum=1)
    bn, cols_p = backend_lib.pick_block(cols, cap_n, kind)
    return bt, rows_p, bn, cols_p
  # Mosaic: full-width blocks; rows a multiple of 16 or the whole array.
  if rows <= cap_t:
    return rows, rows, cols, cols
  bt = backend_lib.round_up(cap_t, 16)
  return bt, backend_lib.round_up(rows, bt), cols, cols


def _interpret(cfg):
  if not cfg.backend.interpret:
    return False
  # Mosaic's row DMAs and semaphores need the TPU interpreter.
  return pltpu.InterpretParams() if cfg.backend.kind == "mosaic" else True


def _module_kwargs(cfg):
  if cfg.backend.kind == "triton" and cfg.num_warps:
    return {"num_warps": cfg.num_warps}
  return {}


def gather_rows(x_NM, tok_R, cfg, scale_R=None, other_RM=None):
  """out[r] = scale[r] * x[tok[r]] (0 if tok[r] >= N) and optional dots.

  Returns (out_RM in x's dtype, dot_R <float32>[R] = <x[tok[r]], other[r]>
  or None).
  """
  n, m = x_NM.shape
  r = tok_R.shape[0]
  bt, r_pad, bn, m_pad = _blocks(cfg, r, m)
  pad = backend_lib.pad_axis
  tok = pad(tok_R.astype(jnp.int32), 0, r_pad, n)
  scale = None if scale_R is None else pad(scale_R.astype(jnp.float32), 0,
                                           r_pad)
  other = None if other_RM is None else pad(pad(other_RM, 0, r_pad), 1,
                                            m_pad)
  module = triton_permute if cfg.backend.kind == "triton" else mosaic_permute
  out, dots = module.gather(pad(x_NM, 1, m_pad), tok, scale, other, bt=bt,
                            bn=bn, out_dtype=x_NM.dtype,
                            interpret=_interpret(cfg), **_module_kwargs(cfg))
  dot_R = None if dots is None else jnp.sum(dots, axis=0)[:r]
  return out[:r, :m], dot_R


def combine_rows(src_RM, row_NK, w_NK, cfg):
  """y[n] = sum_k w[n, k] * src[row[n, k]] (rows >= R add nothing)."""
  r, m = src_RM.shape
  n = row_NK.shape[0]
  bt, n_pad, bn, m_pad = _blocks(cfg, n, m)
  pad = backend_lib.pad_axis
  module = triton_permute if cfg.backend.kind == "triton" else mosaic_permute
  out = module.combine(pad(src_RM, 1, m_pad),
                       pad(row_NK.astype(jnp.int32), 0, n_pad, r),
                       pad(w_NK.astype(jnp.float32), 0, n_pad), bt=bt, bn=bn,
                       out_dtype=src_RM.dtype, interpret=_interpret(cfg),
                       **_module_kwargs(cfg))
  return out[:n, :m]


def _tokens(assignment_R, num_tokens, k):
  return jnp.where(assignment_R < num_tokens * k, assignment_R // k,
                   num_tokens).astype(jnp.int32)


# --- permute ---------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _permute(x_NM, row_NK, token_R, cfg):
  return gather_rows(x_NM, token_R, cfg)[0]


def _permute_fwd(x_NM, row_NK, token_R, cfg):
  return _permute(x_NM, row_NK, token_R, cfg), (row_NK, token_R)


def _permute_bwd(cfg, res, d_in_RM):
  row_NK, _ = res
  ones = jnp.ones(row_NK.shape, jnp.float32)
  return combine_rows(d_in_RM, row_NK, ones, cfg), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def permute(x_NM, row_NK, assignment_R, *, backend="auto", blocks=None,
            num_warps=None):
  """Gathers each token's rows into the expert-sorted, tile-padded layout.

  Args:
    x_NM: <dtype>[N, M] tokens.
    row_NK: <int32>[N, K] row of each assignment (R if none).
    assignment_R: <int32>[R] assignment n*K + k of each row (N*K: padding).
    backend: see moejax.pallas.BACKENDS; 'xla' uses jnp.take.
    blocks, num_warps: tuning (rows, columns per block; Triton warps).
  Returns:
    <dtype>[R, M]; padding rows are zero. Differentiable w.r.t. x (the
    backward is a combine with unit weights: no scatter).
  """
  n, k = row_NK.shape
  token_R = _tokens(assignment_R, n, k)
  cfg = make_config(backend, blocks=blocks, num_warps=num_warps)
  if cfg.backend.kind == "xla":
    return gather_lib.gather_rows(x_NM, token_R, row_NK)
  return _permute(x_NM, row_NK.astype(jnp.int32), token_R, cfg)


# --- unpermute -------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _unpermute(out_RM, w_NK, row_NK, assignment_R, cfg):
  return combine_rows(out_RM, row_NK, w_NK, cfg)


def _unpermute_fwd(out_RM, w_NK, row_NK, assignment_R, cfg):
  y = _unpermute(out_RM, w_NK, row_NK, assignment_R, cfg)
  return y, (out_RM, w_NK, row_NK, assignment_R)


def _unpermute_bwd(cfg, res, d_y_NM):
  out_RM, w_NK, row_NK, assignment_R = res
  n, k = row_NK.shape
  token_R = _tokens(assignment_R, n, k)
  scale_R = jnp.take(w_NK.reshape(-1).astype(jnp.float32), assignment_R,
                     mode="fill", fill_value=0)
  d_out_RM, dot_R = gather_rows(d_y_NM.astype(out_RM.dtype), token_R, cfg,
                                scale_R=scale_R, other_RM=out_RM)
  d_w_NK = jnp.take(dot_R, row_NK, mode="fill", fill_value=0)
  return d_out_RM, d_w_NK.astype(w_NK.dtype), None, None


_unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


def unpermute(out_RM, weight_NK, row_NK, assignment_R, *, backend="auto",
              blocks=None, num_warps=None):
  """Weighted combine of each token's K expert rows, fused.

  Args:
    out_RM: <dtype>[R, M] expert outputs in the layout of `permute`.
    weight_NK: <float32>[N, K] combine weights (0 for dropped assignments).
    row_NK, assignment_R: the layout (see `permute`).
    backend, blocks, num_warps: as for `permute`.
  Returns:
    <dtype>[N, M], y[n] = sum_k weight[n, k] * out[row[n, k]], accumulated in
    float32. Differentiable w.r.t. out_RM and weight_NK.
  """
  cfg = make_config(backend, blocks=blocks, num_warps=num_warps)
  if cfg.backend.kind == "xla":
    n, k = row_NK.shape
    picked = gather_lib.gather_rows(out_RM, row_NK.reshape(-1),
                                  assignment_R[:, None])
    return jnp.einsum("NK,NKM->NM", weight_NK.astype(out_RM.dtype),
                      picked.reshape(n, k, -1))
  return _unpermute(out_RM, weight_NK, row_NK.astype(jnp.int32),
                    assignment_R.astype(jnp.int32), cfg)
