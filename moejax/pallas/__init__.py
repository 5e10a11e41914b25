"""Pallas kernels for the MoE hot path: grouped matmul and permute/unpermute.

Kernels only: the engine that runs a routing plan on them is
moejax.layers.PallasEngine; nothing here imports moejax.layers.

Public API (all differentiable through jax.custom_vjp):

  gmm(lhs_RM, rhs_EMH, group_sizes_E, *, tile, backend='auto')   # tile-aligned groups
  tgmm(lhs_RM, dout_RH, group_sizes_E, *, tile, backend='auto')  # per-group lhs^T @ dout
  ragged_dot(lhs_TM, rhs_EMH, group_sizes_E, *, tile=128, backend='auto')  # any group sizes
  permute(x_NM, row_NK, assignment_R, *, backend='auto')          # tokens -> expert rows
  unpermute(out_RM, weight_NK, row_NK, assignment_R, *, backend='auto')  # weighted combine

Backends (see backend.py and docs/pallas.md): 'auto' picks 'triton' on GPU,
'mosaic' on TPU and 'xla' (the XLA paths of moejax.ops) elsewhere;
'triton_interpret' / 'mosaic_interpret' run the kernels in the Pallas
interpreter on any platform (tests).
"""

from moejax.pallas.backend import BACKENDS
from moejax.pallas.backend import Backend
from moejax.pallas.backend import resolve_backend
from moejax.pallas.grouped_matmul import gmm
from moejax.pallas.grouped_matmul import tgmm
from moejax.pallas.permutation import permute
from moejax.pallas.permutation import unpermute
from moejax.pallas.ragged import aligned_layout
from moejax.pallas.ragged import ragged_dot
