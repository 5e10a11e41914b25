"""The dropless MoE engine on Pallas kernels (engine='pallas').

Same routing contract and results as moejax.layers.dispatch.dropless_engine:
sort every (token, choice) assignment by expert into tile-aligned groups,
run the expert FFN as grouped matmuls, combine back with the routing weights.
Here the sort is the `permute` kernel, the matmuls the Pallas `gmm`, and the
weighted combine the fused `unpermute` kernel, each with a custom_vjp whose
backward is again a gather (no scatter-add anywhere).

With backend 'auto' on CPU the XLA dropless engine runs instead: interpret
mode is for tests, not for speed.
"""

import functools
from typing import Optional


from moejax.layers import dispatch as dispatch_lib
from moejax.layers import experts as experts_lib
from moejax.pallas import backend as backend_lib
from moejax.pallas import grouped_matmul as gmm_lib
from moejax.pallas import permutation as permute_lib


def pallas_dropless_engine(plan, x_GSM, weights, activation, *, tile=128,
                           backend="auto", gmm_kwargs: Optional[dict] = None,
                           permute_kwargs: Optional[dict] = None):
  """Dropless MoE with Pallas permute -> GMM -> unpermute.

  Args:
    plan: a token-choice RoutingPlan (dropless or capacity: with capacity,
      dropped assignments have weight 0 and add nothing).
    x_GSM: <dtype>[G, S, M].
    weights: moejax.layers.dispatch.ExpertWeights.
    activation: relu, gelu, swiglu, geglu.
    tile: rows per tile of the grouped layout (a multiple of 16 on GPU/TPU).
    backend: see moejax.pallas.BACKENDS ('auto': GPU -> triton, TPU ->
      mosaic, else the XLA dropless engine).
    gmm_kwargs, permute_kwargs: tuning passed to gmm / permute / unpermute.
  Returns:
    <dtype>[G, S, M].
  """
  be = backend_lib.resolve_backend(backend)
  if be.kind == "xla":
    return dispatch_lib.dropless_engine(plan, x_GSM, weights, activation,
                                        tile=tile)
  layout = dispatch_lib.dropless_layout(plan, tile)
  g, s, m = x_GSM.shape
  k = plan.expert_GSK.shape[-1]
  row_NK = layout.row_N.reshape(g * s, k)
  perm_kw = dict(permute_kwargs or {})
  in_RM = permute_lib.permute(x_GSM.reshape(g * s, m), row_NK,
                              layout.assignment_R, backend=be, **perm_kw)
  gmm_call = functools.partial(gmm_lib.gmm,
                               group_sizes_E=layout.group_sizes_E, tile=tile,
                               backend=be, **(gmm_kwargs or {}))
  h_RH = gmm_call(in_RM, weights.w_in_EMH)
  gate_RH = None if weights.w_gate_EMH is None else gmm_call(
      in_RM, weights.w_gate_EMH)
  h_RH = experts_lib.activate(h_RH, gate_RH, activation)
  out_RM = gmm_call(h_RH, weights.w_out_EHM)
  y_NM = permute_lib.unpermute(out_RM, plan.weight_GSK.reshape(g * s, k),
                               row_NK, layout.assignment_R, backend=be,
                               **perm_kw)
  return y_NM.reshape(g, s, m).astype(x_GSM.dtype)


def make_gmm_fn(backend="auto", **gmm_kwargs):
  """A gmm(lhs, rhs, group_sizes_E, tile=) for dropless_engine's gmm_fn."""
  return functools.partial(gmm_lib.gmm, backend=backend, **gmm_kwargs)
