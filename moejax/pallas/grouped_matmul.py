"""Grouped matmul (GMM) with Pallas kernels, the contract of moejax.ops.gmm.

`gmm(lhs_RM, rhs_EMH, group_sizes_E, tile=...)`: rows come sorted by group,
every group starts on a multiple of `tile` (group sizes are tile-padded, as
the dropless layout makes them), rows past sum(group_sizes) come out zero.
Because a tile never straddles two groups, every row block of the kernels
belongs to one expert and nothing needs masking; groups whose real size is not
a multiple of the tile carry zero rows (that is what "tile-aligned layout"
means here; `moejax.pallas.ragged_dot` takes arbitrary sizes).

Backward (jax.custom_vjp): d_lhs = gmm(d_out, rhs^T) by the same kernel with
the weight block read transposed (no transposed copy of the weights), d_rhs =
tgmm(lhs, d_out): per group lhs^T @ d_out. Inputs of any float dtype,
float32 accumulation, outputs in the inputs' dtype.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from moejax.ops import gmm as xla_gmm
from moejax.pallas import backend as backend_lib
from moejax.pallas import mosaic_gmm
from moejax.pallas import triton_gmm

# Upper bounds on block sizes (rows, contraction, columns) per kernel family.
DEFAULT_BLOCKS = {"triton": (128, 64, 128), "mosaic": (512, 512, 512)}
# tgmm's blocks: (rows per step, K of the output block, N of the output block).
DEFAULT_TGMM_BLOCKS = {"triton": (128, 128, 128), "mosaic": (512, 512, 512)}


@dataclasses.dataclass(frozen=True)
class GmmConfig:
  """Static GMM settings (hashable: a custom_vjp non-diff argument)."""
  tile: int
  backend: backend_lib.Backend
  blocks: Optional[tuple] = None        # (block_m, block_k, block_n) caps
  tgmm_blocks: Optional[tuple] = None   # (block_m, block_k, block_n) caps
  group_m: int = 8                      # Triton L2 swizzle
  num_warps: Optional[int] = None       # Triton
  num_stages: Optional[int] = None      # Triton

  def caps(self, tgmm=False):
    kind = self.backend.kind
    if tgmm:
      return self.tgmm_blocks or DEFAULT_TGMM_BLOCKS[kind]
    return self.blocks or DEFAULT_BLOCKS[kind]


def _row_info(group_sizes_E, num_rows, bm):
  """<int32>[R // bm] expert of every row block, E where past the last group.

  Group sizes are multiples of bm (bm divides the tile), so each block lies
  in one group; blocks inside empty groups cannot occur.
  """
  ends_E = jnp.cumsum(group_sizes_E.astype(jnp.int32))
  starts_I = jnp.arange(num_rows // bm, dtype=jnp.int32) * bm
  expert_I = jnp.searchsorted(ends_E, starts_I, side="right")
  return jnp.minimum(expert_I, group_sizes_E.shape[0]).astype(jnp.int32)


def _triton_kwargs(cfg):
  kw = {}
  if cfg.num_warps:
    kw["num_warps"] = cfg.num_warps
  if cfg.num_stages:
    kw["num_stages"] = cfg.num_stages
  return kw


def gmm_forward(lhs_RK, rhs, group_sizes_E, cfg, *, transpose_rhs=False):
  """The kernel call behind gmm (no custom_vjp): pads, launches, slices."""
  kind = cfg.backend.kind
  dtype = jnp.result_type(lhs_RK.dtype, rhs.dtype)
  lhs_RK, rhs = lhs_RK.astype(dtype), rhs.astype(dtype)
  r, k = lhs_RK.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  cap_m, cap_k, cap_n = cfg.caps()
  bm = backend_lib.row_block(cfg.tile, cap_m, cfg.backend, dtype)
  bk, k_pad = backend_lib.pick_block(k, cap_k, kind)
  bn, n_pad = backend_lib.pick_block(n, cap_n, kind)
  lhs_RK = backend_lib.pad_axis(lhs_RK, 1, k_pad)
  k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
  rhs = backend_lib.pad_axis(backend_lib.pad_axis(rhs, k_axis, k_pad),
                             n_axis, n_pad)
  num_experts = rhs.shape[0]
  info_I = _row_info(group_sizes_E, r, bm)
  common = dict(num_experts=num_experts, transpose_rhs=transpose_rhs, bm=bm,
                bk=bk, bn=bn, out_dtype=dtype,
                interpret=cfg.backend.interpret)
  if kind == "triton":
    out = triton_gmm.gmm_fwd(lhs_RK, rhs, info_I, group_m=cfg.group_m,
                             **common, **_triton_kwargs(cfg))
  else:
    out = mosaic_gmm.gmm_fwd(lhs_RK, rhs, info_I, **common)
  return out[:, :n]


def tgmm_forward(lhs_RK, dout_RN, group_sizes_E, cfg, out_dtype=None):
  """d_rhs[e] = lhs[rows of e]^T @ dout[rows of e]: [E, K, N]."""
  kind = cfg.backend.kind
  dtype = jnp.result_type(lhs_RK.dtype, dout_RN.dtype)
  out_dtype = out_dtype or dtype
  lhs_RK, dout_RN = lhs_RK.astype(dtype), dout_RN.astype(dtype)
  r, k = lhs_RK.shape
  n = dout_RN.shape[1]
  num_experts = group_sizes_E.shape[0]
  cap_m, cap_k, cap_n = cfg.caps(tgmm=True)
  bm = backend_lib.row_block(cfg.tile, cap_m, cfg.backend, dtype)
  bk, k_pad = backend_lib.pick_block(k, cap_k, kind)
  bn, n_pad = backend_lib.pick_block(n, cap_n, kind)
  lhs_RK = backend_lib.pad_axis(lhs_RK, 1, k_pad)
  dout_RN = backend_lib.pad_axis(dout_RN, 1, n_pad)
  common = dict(num_experts=num_experts, bm=bm, bk=bk, bn=bn,
                out_dtype=out_dtype, interpret=cfg.backend.interpret)
  if kind == "triton":
    ends = jnp.cumsum(group_sizes_E.astype(jnp.int32))
    offsets_E1 = jnp.minimum(jnp.concatenate([jnp.zeros((1,), jnp.int32),
                                              ends]), r)
    out = triton_gmm.tgmm(lhs_RK, dout_RN, offsets_E1, **common,
                          **_triton_kwargs(cfg))
  else:
    info_I = _row_info(group_sizes_E, r, bm)
    out = mosaic_gmm.tgmm(lhs_RK, dout_RN, info_I, group_sizes_E, **common)
  return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs_RM, rhs_EMH, group_sizes_E, cfg):
  return gmm_forward(lhs_RM, rhs_EMH, group_sizes_E, cfg)


def _gmm_fwd(lhs_RM, rhs_EMH, group_sizes_E, cfg):
  out = gmm_forward(lhs_RM, rhs_EMH, group_sizes_E, cfg)
  return out, (lhs_RM, rhs_EMH, group_sizes_E)


def _gmm_bwd(cfg, res, dout_RH):
  lhs_RM, rhs_EMH, group_sizes_E = res
  dlhs_RM = gmm_forward(dout_RH, rhs_EMH, group_sizes_E, cfg,
                        transpose_rhs=True)
  drhs_EMH = tgmm_forward(lhs_RM, dout_RH, group_sizes_E, cfg,
                          out_dtype=rhs_EMH.dtype)
  return dlhs_RM.astype(lhs_RM.dtype), drhs_EMH.astype(rhs_EMH.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def make_config(tile, backend="auto", *, blocks=None, tgmm_blocks=None,
                group_m=8, num_warps=None, num_stages=None):
  """A GmmConfig from user-facing arguments (see `gmm`)."""
  return GmmConfig(tile=int(tile),
                   backend=backend_lib.resolve_backend(backend),
                   blocks=None if blocks is None else tuple(blocks),
                   tgmm_blocks=None if tgmm_blocks is None else tuple(
                       tgmm_blocks),
                   group_m=group_m, num_warps=num_warps,
                   num_stages=num_stages)


def gmm(lhs_RM, rhs_EMH, group_sizes_E, *, tile, backend="auto", blocks=None,
        tgmm_blocks=None, group_m=8, num_warps=None, num_stages=None):
  """Grouped matmul over tile-aligned groups, differentiable.

  Args:
    lhs_RM: <dtype>[R, M] rows sorted by group; R a multiple of `tile`.
    rhs_EMH: <dtype>[E, M, H] one matrix per group.
    group_sizes_E: <int32>[E] rows per group, each a multiple of `tile`, sum
      at most R (rows past the sum come out zero).
    tile: rows per tile (static). On GPU/TPU a multiple of 16 (128 is a good
      value); any size in interpret mode.
    backend: 'auto' (GPU -> 'triton', TPU -> 'mosaic', else 'xla': the XLA
      tile scan of moejax.ops.gmm), or one of moejax.pallas.BACKENDS.
    blocks: optional caps (block_m, block_k, block_n) for the forward and
      d_lhs kernels; tgmm_blocks the same for d_rhs.
    group_m, num_warps, num_stages: Triton tuning.
  Returns:
    <dtype>[R, H] (dtype = result type of lhs and rhs), float32 accumulation.
  """
  if lhs_RM.shape[0] % tile:
    raise ValueError(f"rows ({lhs_RM.shape[0]}) must be a multiple of tile "
                     f"({tile})")
  if lhs_RM.shape[1] != rhs_EMH.shape[1]:
    raise ValueError(f"lhs_RM is [R, {lhs_RM.shape[1]}] but rhs_EMH is "
                     f"{list(rhs_EMH.shape)}: M must match")
  if group_sizes_E.shape != (rhs_EMH.shape[0],):
    raise ValueError(f"group_sizes_E must have shape ({rhs_EMH.shape[0]},), "
                     f"got {group_sizes_E.shape}")
  cfg = make_config(tile, backend, blocks=blocks, tgmm_blocks=tgmm_blocks,
                    group_m=group_m, num_warps=num_warps,
                    num_stages=num_stages)
  if cfg.backend.kind == "xla":
    return xla_gmm.gmm(lhs_RM, rhs_EMH, group_sizes_E, tile=tile)
  return _gmm(lhs_RM, rhs_EMH, group_sizes_E.astype(jnp.int32), cfg)


def tgmm(lhs_RM, dout_RH, group_sizes_E, *, tile, backend="auto",
         tgmm_blocks=None, num_warps=None, num_stages=None):
  """Transposed grouped matmul: out[e] = lhs[rows of e]^T @ dout[rows of e].

  Args:
    lhs_RM: <dtype>[R, M]; dout_RH: <dtype>[R, H]; same layout as `gmm`.
    group_sizes_E: <int32>[E] tile-padded group sizes.
  Returns:
    <dtype>[E, M, H] (zeros for empty groups); not differentiable.
  """
  cfg = make_config(tile, backend, tgmm_blocks=tgmm_blocks,
                    num_warps=num_warps, num_stages=num_stages)
  if cfg.backend.kind == "xla":  # d_rhs of the XLA gmm: a linear map's vjp
    dtype = jnp.result_type(lhs_RM, dout_RH)
    rhs0 = jnp.zeros((group_sizes_E.shape[0], lhs_RM.shape[1],
                      dout_RH.shape[1]), dtype)
    _, vjp = jax.vjp(lambda w: xla_gmm.gmm(lhs_RM.astype(dtype), w,
                                           group_sizes_E, tile=tile), rhs0)
    return vjp(dout_RH.astype(dtype))[0]
  return tgmm_forward(lhs_RM, dout_RH, group_sizes_E.astype(jnp.int32), cfg)
