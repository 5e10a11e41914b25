"""Engines: objects that run a RoutingPlan through the experts.

An engine is called as `engine(plan, x_GSM, weights, activation) -> y_GSM`
with the experts' ExpertWeights (compute dtype) and activation name. It owns
only its own options; MoELayer asks it two things:

  uses_capacity: bool   whether routers get a capacity (False: dropless)
  check_router(router)  raises ValueError when it cannot run that router's
                        plans (e.g. the dropless engines need a token view)
  check_experts(experts)  (optional) raises ValueError when it cannot run
                        that expert form (Pallas: expert biases)

Expert parallelism (moejax.sharding.ExpertParallel) runs an engine on a mesh
through one of two protocols, which every engine here implements:

  capacity engines:  dispatch(plan, x_GSM) -> (in_EGCM, ctx);
                     combine(plan, out_EGCM, ctx) -> y_GSM
  dropless engines:  tile (int) and gmm_fn() -> gmm(lhs_RM, rhs_EMH,
                     group_sizes_E, *, tile)

Engines are frozen dataclasses: hashable, so a layer holding one stays a
valid static part of its nnx graph. The pure functions behind them live in
moejax.layers.dispatch (einsum, indices, dropless) and moejax.pallas
(kernels); the Pallas adapter lives here, so kernels know nothing of layers.
"""

import dataclasses
import functools
from typing import Any, Callable, Union

from moejax.layers import dispatch as dispatch_lib
from moejax.ops import ffn as ffn_lib
from moejax.ops import gmm as gmm_lib
from moejax.routing.validation import OptionError
from moejax.routing.validation import check_int

GMM_IMPLS = {"scan": gmm_lib.gmm, "ragged_dot": gmm_lib.ragged_dot_gmm}


class Engine:
  """Base class (optional for a user's engine): the contract's defaults."""

  uses_capacity = True

  def check_router(self, router):
    del router


def _token_view_check(engine, router):
  if not getattr(router, "token_view", True):
    raise ValueError(
        f"{type(engine).__name__} needs a router whose plans give each "
        f"token's experts (a token view); {type(router).__name__} fills "
        f"fixed expert slots: use EinsumEngine or IndicesEngine")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EinsumEngine(Engine):
  """GShard's dense dispatch/combine through [G, S, E, C] masks.

  Simple and TPU-friendly; memory and FLOPs grow with S*E*C. Needs a
  capacity plan (any router)."""

  def dispatch(self, plan, x_GSM):
    """<dtype>[G, S, M] -> (<dtype>[E, G, C, M], None)."""
    return dispatch_lib.einsum_dispatch(plan, x_GSM), None

  def combine(self, plan, out_EGCM, ctx):
    """<dtype>[E, G, C, M] -> <dtype>[G, S, M]."""
    del ctx
    return dispatch_lib.einsum_combine(plan, out_EGCM)

  def __call__(self, plan, x_GSM, weights, activation):
    """plan, <dtype>[G, S, M], ExpertWeights, activation -> <dtype>[G, S, M]."""
    return _capacity_forward(self, plan, x_GSM, weights, activation)


@dataclasses.dataclass(frozen=True, kw_only=True)
class IndicesEngine(Engine):
  """Gathers tokens into [E, G*C, M] expert buffers and back: O(T*K*M) data
  movement, gather backwards (see moejax.layers.dispatch). Needs a capacity
  plan (any router)."""

  def dispatch(self, plan, x_GSM):
    """<dtype>[G, S, M] -> (<dtype>[E, G, C, M], SlotIndices)."""
    idx = dispatch_lib.slot_indices(plan)
    return dispatch_lib.indices_dispatch(plan, x_GSM, idx), idx

  def combine(self, plan, out_EGCM, ctx):
    """<dtype>[E, G, C, M] -> <dtype>[G, S, M]."""
    return dispatch_lib.indices_combine(plan, out_EGCM, ctx)

  def __call__(self, plan, x_GSM, weights, activation):
    """plan, <dtype>[G, S, M], ExpertWeights, activation -> <dtype>[G, S, M]."""
    return _capacity_forward(self, plan, x_GSM, weights, activation)


def _capacity_forward(engine, plan, x_GSM, weights, activation):
  if plan.is_dropless:
    raise ValueError(f"{type(engine).__name__} needs a capacity plan; got a "
                     f"dropless plan (capacity=None)")
  g, _, m = x_GSM.shape
  e, c = plan.num_experts, plan.capacity
  in_EGCM, ctx = engine.dispatch(plan, x_GSM)
  out_EXM = gmm_lib.batched_ffn(in_EGCM.reshape(e, g * c, m), *weights,
                                activation=activation)
  return engine.combine(plan, out_EXM.reshape(e, g, c, m), ctx)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DroplessEngine(Engine):
  """Dropless MoE: sort assignments by expert into tile-aligned groups, run
  the expert FFN as grouped matmuls, unsort. No capacity, nothing dropped.

  Args:
    tile: rows per tile of the grouped layout.
    gmm: 'scan' (the XLA path: the whole FFN per row block,
      moejax.ops.gmm.grouped_ffn), 'ragged_dot' (jax.lax.ragged_dot), or a
      callable gmm(lhs_RM, rhs_EMH, group_sizes_E, *, tile).
  """
  tile: int = 128
  gmm: Union[str, Callable[..., Any]] = "scan"

  uses_capacity = False

  def __post_init__(self):
    check_int("tile", self.tile, 1)
    if not callable(self.gmm) and self.gmm not in GMM_IMPLS:
      raise OptionError("gmm", self.gmm, f"unknown gmm {self.gmm!r}; allowed: "
                        f"{sorted(GMM_IMPLS)} or a gmm callable")

  def check_router(self, router):
    _token_view_check(self, router)

  def gmm_fn(self):
    """gmm(lhs_RM, rhs_EMH, group_sizes_E, *, tile) of this engine."""
    return self.gmm if callable(self.gmm) else GMM_IMPLS[self.gmm]

  def __call__(self, plan, x_GSM, weights, activation):
    """plan (token view), <dtype>[G, S, M], ExpertWeights, activation ->
    <dtype>[G, S, M]."""
    return dispatch_lib.dropless_engine(plan, x_GSM, weights, activation,
                                        tile=self.tile, gmm_fn=self.gmm_fn())


@dataclasses.dataclass(frozen=True, kw_only=True)
class PallasEngine(DroplessEngine):
  """The dropless engine on moejax.pallas kernels: permute -> grouped matmul
  -> fused weighted unpermute, each with a gather backward.

  Args:
    backend: 'auto' (GPU -> triton, TPU -> mosaic, otherwise the XLA
      dropless engine: interpret mode is for tests, not speed) or any of
      moejax.pallas.BACKENDS (e.g. 'triton_interpret').
    tile: rows per tile (a multiple of 16 on GPU/TPU).
  Under expert parallelism the Pallas grouped matmul runs between the
  ragged all-to-alls.
  """
  backend: str = "auto"
  gmm: Union[str, Callable[..., Any]] = "pallas"

  def __post_init__(self):
    from moejax import pallas  # kernels; imported only when used
    if self.backend not in pallas.BACKENDS:
      raise OptionError("backend", self.backend, f"unknown pallas backend "
                        f"{self.backend!r}; allowed: {list(pallas.BACKENDS)}")
    if self.gmm != "pallas":
      raise OptionError("gmm", self.gmm, "PallasEngine always uses the "
                        "Pallas grouped matmul; use DroplessEngine(gmm=...) "
                        "for another")
    check_int("tile", self.tile, 1)

  def check_experts(self, experts):
    """Refuses experts with biases: their [.., M + 1] homogeneous input
    (moejax.layers.experts) breaks the kernels' tiling of M."""
    if getattr(experts, "use_bias", False):
      raise ValueError("PallasEngine does not run experts with biases "
                       "(Experts(use_bias=True)): its kernels tile the model "
                       "width M, which the folded biases make M + 1; use "
                       "DroplessEngine, IndicesEngine or EinsumEngine")

  def _backend(self):
    from moejax import pallas
    return pallas.resolve_backend(self.backend)

  def gmm_fn(self):
    from moejax import pallas
    return functools.partial(pallas.gmm, backend=self._backend())

  def __call__(self, plan, x_GSM, weights, activation):
    """As DroplessEngine, on the Pallas permute / gmm / unpermute kernels."""
    be = self._backend()
    if be.kind == "xla":
      return dispatch_lib.dropless_engine(plan, x_GSM, weights, activation,
                                          tile=self.tile)
    return pallas_dropless_forward(plan, x_GSM, weights, activation,
                                   tile=self.tile, backend=be)


def pallas_dropless_forward(plan, x_GSM, weights, activation, *, tile=128,
                            backend="auto", gmm_kwargs=None,
                            permute_kwargs=None):
  """Dropless MoE with the Pallas permute -> gmm -> unpermute kernels.

  Args:
    plan: a token-choice RoutingPlan (dropless, or with capacity: dropped
      assignments have weight 0 and add nothing).
    x_GSM: <dtype>[G, S, M].
    weights: ExpertWeights; activation: relu, gelu, swiglu, geglu.
    tile: rows per tile; backend: a moejax.pallas backend (not 'xla').
    gmm_kwargs, permute_kwargs: tuning passed to the kernels.
  Returns:
    <dtype>[G, S, M].
  """
  from moejax import pallas
  be = pallas.resolve_backend(backend)
  layout = dispatch_lib.dropless_layout(plan, tile)
  g, s, m = x_GSM.shape
  k = plan.expert_GSK.shape[-1]
  row_NK = layout.row_N.reshape(g * s, k)
  perm_kw = dict(permute_kwargs or {})
  in_RM = pallas.permute(x_GSM.reshape(g * s, m), row_NK,
                         layout.assignment_R, backend=be, **perm_kw)
  gmm_call = functools.partial(pallas.gmm, group_sizes_E=layout.group_sizes_E,
                               tile=tile, backend=be, **(gmm_kwargs or {}))
  h_RH = gmm_call(in_RM, weights.w_in_EMH)
  gate_RH = None if weights.w_gate_EMH is None else gmm_call(
      in_RM, weights.w_gate_EMH)
  h_RH = ffn_lib.activate(h_RH, gate_RH, activation)
  out_RM = gmm_call(h_RH, weights.w_out_EHM)
  y_NM = pallas.unpermute(out_RM, plan.weight_GSK.reshape(g * s, k), row_NK,
                          layout.assignment_R, backend=be, **perm_kw)
  return y_NM.reshape(g, s, m).astype(x_GSM.dtype)
