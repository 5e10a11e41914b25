"""Parameter-efficient experts: routed LoRA adapters over a frozen dense FFN
(MoLoRA, Zadouri et al. 2023; LoRAMoE, Dou et al. 2023).

    y = FFN_frozen(x) + (alpha / r) * sum_e g_e(x) * (x A_e) B_e
    g(x) = softmax(x W_g)            over all E (k=None: MoLoRA's soft merge)
         or its top-k, renormalised  (k given: LoRAMoE-style sparse routing)

A_e [M, r] starts random, B_e [r, M] at zero, so the model starts exactly as
the frozen one. The adapters sit in parallel to the whole FFN (x -> y of
width M), so they need nothing of the FFN's inside: the same function wraps
the project's DenseFFN and any pretrained model's MLP module.

Freezing is by variable type, not by an optimizer mask: `freeze(model)`
turns every nnx.Param of the model into a `FrozenParam` (an nnx.Variable
that is not a Param), so the trainer, which differentiates and optimises
`nnx.Param` only (moejax/train/state.py), has no gradient and no optimizer
state for them; the adapters and routers added afterwards are the only
Params. `apply_lora_experts(model, ...)` does both over module traversal
(nnx.iter_graph): every module that `select(path, module)` accepts
(default: DenseFFN instances, i.e. the dense FFNs of DecoderLM / ViT) is
replaced in its parent by a LoRAExpertsFFN around it.
"""

import importlib

from flax import nnx
import jax
import jax.numpy as jnp

from moejax import notation as nt
from moejax.layers import ffn as ffn_lib
from moejax.layers import params as params_lib
from moejax.layers import routers as routers_lib
from moejax.routing import validation


# The frozen base weights are moejax.layers.params.FrozenParam (no gradient,
# no optimizer state); re-exported here for the adapters' users.
FrozenParam = params_lib.FrozenParam
freeze = params_lib.freeze


class LoRARouter(nnx.Module):
  """The adapters' gate: w_router_ME [M, E] float32; k=None is soft."""

  def __init__(self, model_dim, num_experts, k, rngs):
    self.num_experts = num_experts
    self.k = num_experts if k is None else k
    self.w_router_ME = routers_lib.router_weight(rngs, model_dim, num_experts)

  def experts_per_token(self, capacity_factor):
    del capacity_factor
    return self.k

  def __call__(self, x_XM):
    """<float>[..., M] -> <float32>[..., E] gates (0 off the top-k)."""
    probs_XE = jax.nn.softmax(jnp.einsum(
        "...M,ME->...E", x_XM.astype(jnp.float32), self.w_router_ME[...]), -1)
    if self.k == self.num_experts:
      return probs_XE
    top_XK, idx_XK = jax.lax.top_k(probs_XE, self.k)
    mask_XE = jnp.any(jax.nn.one_hot(idx_XK, self.num_experts,
                                     dtype=jnp.bool_), -2)
    return jnp.where(mask_XE, probs_XE, 0.0) / jnp.sum(top_XK, -1,
                                                      keepdims=True)


class LoRAAdapters(nnx.Module):
  """E rank-r adapters: a_EMR [E, M, r] (random), b_ERM [E, r, M] (zero)."""

  def __init__(self, num_experts, model_dim, rank, *, param_dtype, rngs):
    self.num_experts = num_experts
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                             in_axis=1, out_axis=2)
    self.a_EMR = params_lib.param(rngs, init, (num_experts, model_dim, rank),
                                  (nt.EXPERT, nt.EMBED, None), param_dtype)
    self.b_ERM = params_lib.param(rngs, nnx.initializers.zeros_init(),
                                  (num_experts, rank, model_dim),
                                  (nt.EXPERT, None, nt.EMBED), param_dtype)


class LoRAExpertsFFN(nnx.Module):
  """A frozen FFN plus routed LoRA experts (module docstring).

  Args:
    base: the FFN module (x_XM -> y_XM); its parameters should be frozen
      (apply_lora_experts does it).
    model_dim: M.
    num_experts: E adapters.
    rank: r.
    k: experts per token (None: all, softmax-weighted).
    alpha: LoRA scale numerator (scale alpha / r).
    rngs: nnx.Rngs.
  The accounting helpers read it as an MoE-like layer: experts = the
  adapters, router, shared = the base FFN.
  """

  capacity_factor = 1.0
  residual = None

  def __init__(self, base, model_dim, *, num_experts=4, rank=8, k=None,
               alpha=16.0, param_dtype=jnp.float32, rngs):
    validation.check_int("num_experts", num_experts, 1)
    validation.check_int("rank", rank, 1)
    if k is not None:
      validation.check_k(k, num_experts)
    routers_lib.check_number("alpha", alpha, 0, open_low=True)
    self.shared = base
    self.num_experts, self.rank = num_experts, rank
    self.scale = float(alpha) / rank
    self.router = LoRARouter(model_dim, num_experts, k, rngs)
    self.experts = LoRAAdapters(num_experts, model_dim, rank,
                                param_dtype=param_dtype, rngs=rngs)

  @property
  def base(self):
    return self.shared

  def __call__(self, x_XM):
    """<dtype>[..., M] -> <dtype>[..., M]."""
    y_XM = self.shared(x_XM)
    dt = y_XM.dtype
    g_XE = self.router(x_XM).astype(dt)
    h_XER = jnp.einsum("...M,EMR->...ER", x_XM.astype(dt),
                       self.experts.a_EMR[...].astype(dt))
    delta_XM = jnp.einsum("...ER,ERM,...E->...M", h_XER,
                          self.experts.b_ERM[...].astype(dt), g_XE)
    return y_XM + self.scale * delta_XM


def _is_dense_ffn(path, module):
  del path
  return isinstance(module, ffn_lib.DenseFFN)


def _class_filter(dotted):
  """(path, module) -> isinstance(module, the class at `dotted`)."""
  module_name, _, attr = dotted.rpartition(".")
  try:
    cls = getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError, ValueError):
    raise validation.OptionError("select", dotted, f"select={dotted!r} is "
                                 f"not an importable class path") from None
  return lambda path, module: isinstance(module, cls)


def apply_lora_experts(model, *, num_experts=4, rank=8, k=None, alpha=16.0,
                       select=None, model_dim=None, rngs):
  """Freezes `model` and wraps its FFNs in routed LoRA experts, in place.

  Args:
    model: any nnx.Module (DecoderLM, ViTClassifier, a loaded pretrained
      model).
    num_experts, rank, k, alpha: LoRAExpertsFFN's.
    select: (path, module) -> bool picking the FFN modules to wrap, or a
      dotted class path (from a config: 'pkg.module.MLP'); default DenseFFN
      instances. Each must map [..., M] -> [..., M].
    model_dim: M; default the module's `model_dim`, or the first axis of
      its `w_in_MH` (DenseFFN).
    rngs: nnx.Rngs for the adapters and routers.
  Returns:
    the model; its only nnx.Params are the adapters' and routers'.
  """
  if isinstance(select, str):
    select = _class_filter(select)
  select = select or _is_dense_ffn
  freeze(model)
  targets = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and path and select(path, node):
      targets.append(path)
  if not targets:
    raise validation.OptionError("select", select, "no module of the model "
                                 "was selected for LoRA experts")
  for path in targets:
    parent = model
    for key in path[:-1]:
      parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    base = (parent[path[-1]] if isinstance(path[-1], int)
            else getattr(parent, path[-1]))
    width = (model_dim or getattr(base, "model_dim", None)
             or base.w_in_MH.shape[0])
    wrapped = LoRAExpertsFFN(base, width, num_experts=num_experts, rank=rank,
                             k=k, alpha=alpha, rngs=rngs)
    if isinstance(path[-1], int):
      parent[path[-1]] = wrapped
    else:
      setattr(parent, path[-1], wrapped)
  return model
