"""The one registry (name -> class for routers, engines and MoE layer kinds)
and `build_moe(config)`, which turns a nested config into a layer.

A config is a dict (or ConfigDict):

  {"router":  {"name": "token_choice", "k": 2, "gating": "softmax", ...},
   "engine":  {"name": "indices"},                 # or dropless: tile, gmm
   "experts": {"num_experts": 8, "hidden_dim": 256, "activation": "swiglu"},
   "capacity_factor": 1.25, "eval_capacity_factor": 2.0, "group_size": None,
   "shared": {"num_experts": 1, "hidden_dim": 256},   # optional
   "residual": {"hidden_dim": 256, "mix": "sum"},     # optional
   "allow_non_causal": False,                          # for causal models
   "layers": {"5": {"experts": {"num_experts": 16}}}}  # per-layer overrides

A router or engine `name` is a registry key or a dotted path to a class
("my_pkg.routers.MyRouter"), so a user's class needs no edit to moejax. The
router is built as cls(model_dim=M, num_experts=E, rngs=rngs, **options),
the engine as cls(**options). Every option is passed to the class that owns
it, and an option no class takes is an error.
"""

import copy
import difflib
import importlib
import inspect

import jax.numpy as jnp

from moejax.layers import engines as engines_lib
from moejax.layers import experts as experts_lib
from moejax.layers import ffn as ffn_lib
from moejax.layers import moe as moe_lib
from moejax.layers import routers as routers_lib
from moejax.layers import soft_moe as soft_moe_lib

ROUTERS = {
    "token_choice": routers_lib.TokenChoiceRouter,
    "noisy_top_k": routers_lib.NoisyTopKRouter,
    "expert_choice": routers_lib.ExpertChoiceRouter,
    "hash": routers_lib.HashRouter,
    "balanced": routers_lib.BalancedRouter,
    "deepseek": routers_lib.DeepSeekRouter,
    "cosine": routers_lib.CosineRouter,
}
ENGINES = {
    "einsum": engines_lib.EinsumEngine,
    "indices": engines_lib.IndicesEngine,
    "dropless": engines_lib.DroplessEngine,
    "pallas": engines_lib.PallasEngine,
}
LAYERS = ("moe", "soft_moe")

# Top-level keys of an MoE config, and those of each part.
MOE_KEYS = ("layer", "router", "engine", "experts", "capacity_factor",
            "eval_capacity_factor", "capacity", "min_capacity",
            "capacity_multiple_of", "group_size", "pad_groups", "shared",
            "residual", "allow_non_causal", "layers")
SOFT_MOE_KEYS = ("layer", "experts", "slots_per_expert", "group_size",
                 "allow_non_causal", "layers")
EXPERTS_KEYS = ("num_experts", "hidden_dim", "activation")
SHARED_KEYS = ("num_experts", "hidden_dim")
RESIDUAL_KEYS = ("hidden_dim", "mix")

# Where each field of the old flat form (moejax <= stop 11) now lives.
MOVED = {
    "k": "moe.router.k", "gating": "moe.router.gating",
    "renormalize": "moe.router.renormalize",
    "batch_prioritized": "moe.router.batch_prioritized",
    "second_expert_policy": "moe.router.second_expert_policy",
    "jitter_eps": "moe.router.jitter_eps",
    "num_expert_groups": "moe.router.num_expert_groups",
    "topk_groups": "moe.router.topk_groups",
    "routed_scaling_factor": "moe.router.routed_scaling_factor",
    "bias_update_rate": "moe.router.bias_update_rate",
    "sinkhorn_iters": "moe.router.sinkhorn_iters", "hash_seed": "moe.router.seed",
    "dropless_tile": "moe.engine.tile", "gmm_impl": "moe.engine.gmm",
    "pallas_backend": "moe.engine.backend",
    "num_experts": "moe.experts.num_experts", "hidden_dim": "moe.experts.hidden_dim",
    "activation": "moe.experts.activation",
    "num_shared_experts": "moe.shared.num_experts",
    "shared_hidden_dim": "moe.shared.hidden_dim",
    "residual_hidden_dim": "moe.residual.hidden_dim",
    "residual_mix": "moe.residual.mix",
    "slots_per_expert": "moe.slots_per_expert with moe.layer='soft_moe'",
    "causal": "the model (it passes causal to build_moe)",
    "mesh": "the train config's mesh, or MoELayer(expert_parallel=...)",
    "expert_parallel": ("the train config's expert_parallel, or "
                        "MoELayer(expert_parallel=ExpertParallel(...))"),
    "token_axes": "ExpertParallel(token_axes=...)",
    "dropless_collective": "ExpertParallel(collective=...)",
    "dtype": "the model (dtype)", "param_dtype": "the model (param_dtype)",
}


class MoEConfigError(ValueError):
  """An invalid MoE config; `lines` holds one line per bad field, each
  'moe.<field>=<value>: <why>'."""

  def __init__(self, lines):
    self.lines = list(lines)
    super().__init__("\n".join(self.lines))


def _as_dict(config):
  if config is None:
    return None
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return copy.deepcopy(dict(config))


def resolve(name, registry, kind):
  """The class for a registry `name` or a dotted path 'pkg.module.Class'."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"{kind} name must be a string: one of "
                     f"{sorted(registry)} or a dotted path to a class, got "
                     f"{name!r}")
  if name in registry:
    return registry[name]
  if "." not in name:
    close = difflib.get_close_matches(name, list(registry), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown {kind} {name!r}{hint}; allowed: "
                     f"{sorted(registry)} or a dotted path 'pkg.module.Class'")
  module_name, _, attr = name.rpartition(".")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"{kind} {name!r}: cannot import module "
                     f"{module_name!r} ({e})") from None
  cls = getattr(module, attr, None)
  if cls is None:
    raise ValueError(f"{kind} {name!r}: module {module_name!r} has no "
                     f"{attr!r}")
  return cls


def _check_options(cls, options, fixed, field):
  """Raises for options `cls`'s constructor does not take."""
  # nnx.Module's metaclass hides the constructor behind (*args, **kwargs):
  # read __init__ itself (a dataclass's __init__ has its fields).
  params = dict(inspect.signature(cls.__init__).parameters)
  params.pop("self", None)
  if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return
  allowed = [n for n, p in params.items()
             if n not in fixed and p.kind != inspect.Parameter.VAR_POSITIONAL]
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"{cls.__name__} does not take {unknown}; its options: "
                     f"{sorted(allowed)}")


def _unknown_keys(config, allowed, prefix):
  lines = []
  for key in sorted(set(config) - set(allowed)):
    if prefix == "moe." and key in MOVED:
      lines.append(f"moe.{key}={config[key]!r}: moved to {MOVED[key]}")
    else:
      close = difflib.get_close_matches(key, list(allowed), n=1)
      hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
      lines.append(f"{prefix}{key}={config[key]!r}: unknown field{hint}; "
                   f"allowed: {sorted(allowed)}")
  return lines


def check_flat_form(config):
  """Raises MoEConfigError naming where each field of the old flat form
  moved (moe.router='deepseek' -> moe.router.name, moe.k -> moe.router.k,
  ...); returns None for a nested config."""
  lines = []
  for part in ("router", "engine"):
    if isinstance(config.get(part), str):
      lines.append(f"moe.{part}={config[part]!r}: moved to moe.{part}.name "
                   f"(moe.{part} is now a dict of the {part}'s options)")
  allowed = set(MOE_KEYS) | set(SOFT_MOE_KEYS)
  lines += [line for line in _unknown_keys(config, allowed, "moe.")
            if "moved to" in line]
  if lines:
    raise MoEConfigError(lines)


def config_for_layer(config, index):
  """The MoE config of block `index`: `config` with its `layers[str(index)]`
  overrides merged in (dicts merge key by key), without `layers`."""
  config = _as_dict(config)
  overrides = (config.pop("layers", None) or {})
  for key, value in overrides.items():
    if str(key) == str(index):
      _merge(config, _as_dict(value), f"moe.layers.{key}.")
  return config


def _merge(base, override, prefix):
  for key, value in override.items():
    if isinstance(value, dict) and isinstance(base.get(key), dict):
      _merge(base[key], value, f"{prefix}{key}.")
    else:
      base[key] = value


def check_layer_overrides(config, num_layers, moe_layers):
  """Raises MoEConfigError for `layers` keys that are not MoE block indices."""
  lines = []
  for key in (config.get("layers") or {}):
    try:
      index = int(key)
    except (TypeError, ValueError):
      index = None
    if index not in moe_layers:
      lines.append(f"moe.layers.{key}: not an MoE layer; the MoE layers of "
                   f"this {num_layers}-layer model are {list(moe_layers)}")
  if lines:
    raise MoEConfigError(lines)


def build_moe(config, *, model_dim, rngs, dtype=jnp.float32,
              param_dtype=jnp.float32, causal=False, expert_defaults=None,
              expert_parallel=None):
  """Builds an MoELayer (or SoftMoELayer, layer='soft_moe') from a config.

  Args:
    config: the nested dict above (a ConfigDict works too). Per-layer
      `layers` overrides are applied by the model (config_for_layer); here
      they are ignored.
    model_dim: M.
    rngs: nnx.Rngs.
    dtype, param_dtype: compute and parameter dtypes of the experts and
      dense branches (router math is float32).
    causal: the layer sits in a causal model: a non-causal router (expert
      choice, BASE, batch-prioritized, Soft MoE) raises unless the config
      sets allow_non_causal=True.
    expert_defaults: defaults for `experts` (a model passes its mlp width
      and activation), e.g. {'hidden_dim': 256, 'activation': 'swiglu'}.
    expert_parallel: a moejax.sharding.ExpertParallel, or None.
  Returns:
    MoELayer or SoftMoELayer.
  Raises:
    MoEConfigError: one line per invalid field ('moe.router.k=9: ...').
  """
  config = _as_dict(config)
  if config is None:
    raise MoEConfigError(["moe=None: an MoE config dict is needed"])
  config.pop("layers", None)
  check_flat_form(config)
  layer_kind = config.get("layer", "moe")
  if layer_kind not in LAYERS:
    raise MoEConfigError([f"moe.layer={layer_kind!r}: allowed: "
                          f"{list(LAYERS)}"])
  lines = _unknown_keys(config, MOE_KEYS if layer_kind == "moe"
                        else SOFT_MOE_KEYS, "moe.")
  experts_cfg = dict(expert_defaults or {})
  experts_cfg.update(_as_dict(config.get("experts")) or {})
  lines += _unknown_keys(experts_cfg, EXPERTS_KEYS, "moe.experts.")
  if "num_experts" not in experts_cfg:
    lines.append("moe.experts.num_experts: missing; the number of experts "
                 "E is needed")
  if lines:
    raise MoEConfigError(lines)
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  e = experts_cfg["num_experts"]
  allow_non_causal = bool(config.get("allow_non_causal", False))

  if layer_kind == "soft_moe":
    try:
      return soft_moe_lib.SoftMoELayer(
          model_dim, experts_cfg.get("hidden_dim"), e,
          slots_per_expert=config.get("slots_per_expert", 1),
          group_size=config.get("group_size"),
          activation=experts_cfg.get("activation", "relu"), causal=causal,
          allow_non_causal=allow_non_causal, rngs=rngs, **kw)
    except (ValueError, TypeError) as err:
      raise MoEConfigError([f"moe (soft_moe): {err}"]) from None

  def part(field, fn):
    try:
      return fn()
    except MoEConfigError as err:
      lines.extend(err.lines)
    except (ValueError, TypeError) as err:
      lines.append(f"moe.{field}: {err}" if field else f"moe: {err}")
    return None

  router_cfg = _as_dict(config.get("router")) or {"name": "token_choice"}
  engine_cfg = _as_dict(config.get("engine")) or {"name": "indices"}

  def make_router():
    opts = dict(router_cfg)
    cls = resolve(opts.pop("name", "token_choice"), ROUTERS, "router")
    _check_options(cls, opts, ("model_dim", "num_experts", "rngs", "self"),
                   "router")
    return cls(model_dim=model_dim, num_experts=e, rngs=rngs, **opts)

  def make_engine():
    opts = dict(engine_cfg)
    cls = resolve(opts.pop("name", "indices"), ENGINES, "engine")
    _check_options(cls, opts, ("self",), "engine")
    return cls(**opts)

  def make_experts():
    return experts_lib.Experts(
        e, model_dim, experts_cfg.get("hidden_dim"),
        activation=experts_cfg.get("activation", "relu"), rngs=rngs, **kw)

  def make_shared():
    shared = _as_dict(config.get("shared"))
    if not shared or not shared.get("num_experts", 0):
      return None
    bad = _unknown_keys(shared, SHARED_KEYS, "moe.shared.")
    if bad:
      raise MoEConfigError(bad)
    width = shared.get("hidden_dim") or experts_cfg.get("hidden_dim")
    routers_lib.check_int("shared.num_experts", shared["num_experts"], 0)
    return ffn_lib.DenseFFN(model_dim, shared["num_experts"] * width,
                            activation=experts_cfg.get("activation", "relu"),
                            rngs=rngs, **kw)

  def make_residual():
    residual = _as_dict(config.get("residual"))
    if not residual or not residual.get("hidden_dim"):
      return None
    bad = _unknown_keys(residual, RESIDUAL_KEYS, "moe.residual.")
    if bad:
      raise MoEConfigError(bad)
    return moe_lib.ResidualBranch(
        model_dim, residual["hidden_dim"], mix=residual.get("mix", "sum"),
        activation=experts_cfg.get("activation", "relu"), rngs=rngs, **kw)

  router = part("router", make_router)
  engine = part("engine", make_engine)
  experts = part("experts", make_experts)
  shared = part("shared", make_shared)
  residual = part("residual", make_residual)
  if lines:
    raise MoEConfigError(lines)
  layer_kw = {k: config[k] for k in (
      "capacity_factor", "eval_capacity_factor", "capacity", "min_capacity",
      "capacity_multiple_of", "group_size", "pad_groups") if k in config}
  layer = part("", lambda: moe_lib.MoELayer(
      router=router, experts=experts, engine=engine, shared=shared,
      residual=residual, expert_parallel=expert_parallel, **layer_kw))
  if lines:
    raise MoEConfigError(lines)
  if causal and not layer.causal and not allow_non_causal:
    raise MoEConfigError([
        f"moe.router={router_cfg!r}: {type(router).__name__} reads later "
        f"tokens of its group, so in a causal model a token would see the "
        f"future; allowed: a causal router (token choice without "
        f"batch_prioritized, hash, deepseek, noisy_top_k, cosine), or "
        f"moe.allow_non_causal=True to accept the leak knowingly"])
  return layer


def known_loss_names(layers=()):
  """Loss names an MoE layer can report: the layer's own, every registered
  router's `loss_names`, and those of the routers of `layers` (a user's
  router by dotted path declares its own)."""
  names = set(moe_lib.BASE_LOSSES)
  routers = list(ROUTERS.values()) + [getattr(l, "router", None)
                                      for l in layers]
  for router in routers:
    names.update(getattr(router, "loss_names", ()))
  return tuple(sorted(names))


def moe_layer_types():
  """The module classes that return (y, MoEAux)."""
  return (moe_lib.MoELayer, soft_moe_lib.SoftMoELayer)
