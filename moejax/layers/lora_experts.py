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
(default: the DenseFFNs outside MoE layers, i.e. the dense FFNs of DecoderLM
and ViT blocks and the dense MLPs of a pretrained HFDecoder, not the shared
experts inside an MoE layer) is replaced in its parent by a LoRAExpertsFFN
around it. A selected module may itself be an MoE layer (x, **kw) -> (y,
aux), e.g. `select='moejax.layers.moe.MoELayer'` for an all-MoE pretrained
model such as OLMoE: the adapters then sit in parallel to the whole frozen
MoE layer and its aux passes through.

The wrapper keeps the frozen module under its attribute `shared` and says
so (`wraps = 'shared'`), so moejax.layers.build.unwrapped can put the base
modules back in place, e.g. to copy a pretrained checkpoint into a wrapped
model by the checkpoint's own paths (moejax/train/init_from.py).
"""

import importlib

from flax import nnx
import jax
import jax.numpy as jnp

from moejax import notation as nt
from moejax.layers import ffn as ffn_lib
from moejax.layers import params as params_lib
from moejax.layers import routers as routers_lib
from moejax.layers import transformer as tfm
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


def _check_options(num_experts, rank, k, alpha):
  validation.check_int("num_experts", num_experts, 1)
  validation.check_int("rank", rank, 1)
  if k is not None:
    validation.check_k(k, num_experts)
  routers_lib.check_number("alpha", alpha, 0, open_low=True)


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
  # The attribute holding the module this one stands in for (build.unwrapped).
  wraps = "shared"

  def __init__(self, base, model_dim, *, num_experts=4, rank=8, k=None,
               alpha=16.0, param_dtype=jnp.float32, rngs):
    _check_options(num_experts, rank, k, alpha)
    self.shared = base
    self.num_experts, self.rank = num_experts, rank
    self.scale = float(alpha) / rank
    self.router = LoRARouter(model_dim, num_experts, k, rngs)
    self.experts = LoRAAdapters(num_experts, model_dim, rank,
                                param_dtype=param_dtype, rngs=rngs)

  @property
  def base(self):
    return self.shared

  def __call__(self, x_XM, **kwargs):
    """<dtype>[..., M] -> <dtype>[..., M].

    `kwargs` go to the base; a base that returns (y, aux, ...) (an MoE
    layer) gives (y + adapters, aux, ...).
    """
    out = self.shared(x_XM, **kwargs)
    y_XM, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
    dt = y_XM.dtype
    g_XE = self.router(x_XM).astype(dt)
    h_XER = jnp.einsum("...M,EMR->...ER", x_XM.astype(dt),
                       self.experts.a_EMR[...].astype(dt))
    delta_XM = jnp.einsum("...ER,ERM,...E->...M", h_XER,
                          self.experts.b_ERM[...].astype(dt), g_XE)
    y_XM = y_XM + self.scale * delta_XM
    return y_XM if rest is None else (y_XM, *rest)


def _dense_ffns_outside_moe(model):
  """The default `select`: DenseFFNs not inside an MoE layer (a shared
  expert is part of its MoE layer, not a dense FFN of the model)."""
  moe_paths = [tuple(p) for p, node in nnx.iter_graph(model)
               if isinstance(node, nnx.Module) and tfm.is_moe_ffn(node)]

  def select(path, module):
    path = tuple(path)
    return isinstance(module, ffn_lib.DenseFFN) and not any(
        path[:len(p)] == p for p in moe_paths)
  return select


def _describe_select(select):
  return repr(select) if isinstance(select, str) else getattr(
      select, "__name__", repr(select))


def _class_filter(dotted):
  """(path, module) -> isinstance(module, the class at `dotted`)."""
  module_name, _, attr = dotted.rpartition(".")
  try:
    cls = getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError, ValueError):
    cls = None
  if not isinstance(cls, type):
    raise validation.OptionError("select", dotted, f"select={dotted!r} is "
                                 f"not an importable class path")
  return lambda path, module: isinstance(module, cls)


def apply_lora_experts(model, *, num_experts=4, rank=8, k=None, alpha=16.0,
                       select=None, model_dim=None, rngs):
  """Freezes `model` and wraps its FFNs in routed LoRA experts, in place.

  Args:
    model: any nnx.Module (DecoderLM, ViTClassifier, a pretrained HFDecoder
      from moejax.models.hf.from_pretrained).
    num_experts, rank, k, alpha: LoRAExpertsFFN's.
    select: (path, module) -> bool picking the modules to wrap, or dotted
      class paths (a list, or one string, comma-separated; from a config:
      'moejax.layers.moe.MoELayer' wraps whole MoE layers;
      'moejax.layers.ffn.DenseFFN,moejax.layers.moe.MoELayer' every
      block's FFN, dense or MoE); default the DenseFFNs outside MoE layers.
      Each must map [..., M] -> [..., M] (or -> (y, aux) like an MoE
      layer). A selected module inside another selected one is left to the
      outer wrapper.
    model_dim: M; default the module's `model_dim`, or the first axis of
      its `w_in_MH` (DenseFFN).
    rngs: nnx.Rngs for the adapters and routers.
  Returns:
    the model; its only nnx.Params are the adapters' and routers'.
  Raises:
    OptionError (a MoEConfigError on model.wrappers.lora_experts.<option>
    from a config): nothing selected, a select that is neither a callable
    nor a class path, or a selected module without a known width.
  """
  _check_options(num_experts, rank, k, alpha)
  if model_dim is not None:
    validation.check_int("model_dim", model_dim, 1)
  paths = select.split(",") if isinstance(select, str) else select
  if isinstance(paths, (list, tuple)) and paths and all(
      isinstance(s, str) for s in paths):
    filters = [_class_filter(s.strip()) for s in paths]
    chosen = lambda path, module: any(f(path, module) for f in filters)
  elif select is None:
    chosen = _dense_ffns_outside_moe(model)
  elif callable(select):
    chosen = select
  else:
    raise validation.OptionError("select", select, f"select={select!r}: "
                                 f"dotted class paths (comma-separated or a "
                                 f"list) or a function (path, module) -> "
                                 f"bool")
  chosen_paths = [tuple(path) for path, node in nnx.iter_graph(model)
                  if isinstance(node, nnx.Module) and path
                  and chosen(tuple(path), node)]
  # The outermost only (iter_graph lists children before their parents).
  targets = [p for p in chosen_paths if not any(
      len(q) < len(p) and p[:len(q)] == q for q in chosen_paths)]
  if not targets:
    raise validation.OptionError("select", select, (
        "no DenseFFN outside an MoE layer to wrap in LoRA experts; for an "
        "all-MoE model pass select='moejax.layers.moe.MoELayer'"
        if select is None else f"select={_describe_select(select)}: no "
        f"module of this {type(model).__name__} was selected for LoRA "
        f"experts"))
  widths = []
  for path in targets:
    base = _child(model, path)
    width = (model_dim or getattr(base, "model_dim", None)
             or getattr(getattr(base, "w_in_MH", None), "shape", (None,))[0])
    if not width:
      raise validation.OptionError("model_dim", model_dim, (
          f"{type(base).__name__} at {'/'.join(map(str, path))} has no "
          f"model_dim nor w_in_MH; pass model_dim"))
    widths.append(width)
  # Freeze only once the options and the selection are known to be good.
  freeze(model)
  for path, width in zip(targets, widths):
    wrapped = LoRAExpertsFFN(_child(model, path), width,
                             num_experts=num_experts, rank=rank, k=k,
                             alpha=alpha, rngs=rngs)
    parent, key = _child(model, path[:-1]), path[-1]
    if isinstance(key, int):
      parent[key] = wrapped
    else:
      setattr(parent, key, wrapped)
  return model


def _child(module, path):
  for key in path:
    module = module[key] if isinstance(key, int) else getattr(module, key)
  return module
