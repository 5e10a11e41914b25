"""The one registry (name -> class for routers, engines and MoE layer kinds)
and `build_moe(config)`, which turns a nested config into a layer.

A config is a dict (or ConfigDict):

  {"router":  {"name": "token_choice", "k": 2, "gating": "softmax", ...},
   "engine":  {"name": "indices"},                 # or dropless: tile, gmm
   "experts": {"num_experts": 8, "hidden_dim": 256, "activation": "swiglu",
               "use_bias": False},          # + swiglu_alpha/limit (clamped)
   "capacity_factor": 1.25, "eval_capacity_factor": 2.0, "group_size": None,
   "shared": {"num_experts": 1, "hidden_dim": 256,    # optional
              "gated": False},              # True: Qwen2-MoE's sigmoid gate
   "output_bias": False,                    # JetMoE's bias on the output
   "residual": {"hidden_dim": 256, "mix": "sum"},     # optional
   "allow_non_causal": False,                          # for causal models
   "layers": {"5": {"experts": {"num_experts": 16}}}}  # per-layer overrides

A router or engine `name` is a registry key or a dotted path to a class
("my_pkg.routers.MyRouter"), so a user's class needs no edit to moejax. The
router is built as cls(model_dim=M, num_experts=E, rngs=rngs, **options),
the engine as cls(**options). Every option is passed to the class that owns
it, and an option no class takes is an error.
"""

import contextlib
import copy
import difflib
import importlib
import inspect

from flax import nnx
import jax.numpy as jnp

from moejax.layers import attention_experts
from moejax.layers import dense_to_sparse
from moejax.layers import dynamic_routers
from moejax.layers import engines as engines_lib
from moejax.layers import experts as experts_lib
from moejax.layers import ffn as ffn_lib
from moejax.layers import lora_experts
from moejax.layers import merging
from moejax.layers import mod as mod_lib
from moejax.layers import moe as moe_lib
from moejax.layers import routers as routers_lib
from moejax.layers import soft_moe as soft_moe_lib
from moejax.routing.validation import OptionError

ROUTERS = {
    "token_choice": routers_lib.TokenChoiceRouter,
    "noisy_top_k": routers_lib.NoisyTopKRouter,
    "expert_choice": routers_lib.ExpertChoiceRouter,
    "hash": routers_lib.HashRouter,
    "balanced": routers_lib.BalancedRouter,
    "deepseek": routers_lib.DeepSeekRouter,
    "cosine": routers_lib.CosineRouter,
    "top_p": dynamic_routers.TopPRouter,
    "null_experts": dynamic_routers.NullExpertRouter,
    "dense_to_sparse": dense_to_sparse.DenseToSparseRouter,
    "stable_moe": dense_to_sparse.StableMoERouter,
}
ENGINES = {
    "einsum": engines_lib.EinsumEngine,
    "indices": engines_lib.IndicesEngine,
    "dropless": engines_lib.DroplessEngine,
    "pallas": engines_lib.PallasEngine,
}
# MoE layer kinds beyond moe/soft_moe: classes with from_config(config,
# experts_cfg, ...) and CONFIG_KEYS (the config keys that are not their own
# constructor options).
LAYER_CLASSES = {"smear": merging.SMEARLayer, "lory": merging.LoryLayer}
LAYERS = ("moe", "soft_moe") + tuple(LAYER_CLASSES)

# Model wrappers (DecoderLM(wrappers={name: options})): functions
# f(model, *, rngs, **options) that change a built model in place, applied
# in this order.
WRAPPERS = {"moa": attention_experts.apply_moa,
            "switchhead": attention_experts.apply_switchhead,
            "lora_experts": lora_experts.apply_lora_experts,
            "mod": mod_lib.apply_mod}

# Top-level keys of an MoE config, and those of each part.
MOE_KEYS = ("layer", "router", "engine", "experts", "capacity_factor",
            "eval_capacity_factor", "capacity", "min_capacity",
            "capacity_multiple_of", "group_size", "pad_groups", "shared",
            "residual", "output_bias", "allow_non_causal", "layers",
            "balance_scope")
SOFT_MOE_KEYS = ("layer", "experts", "slots_per_expert", "group_size",
                 "allow_non_causal", "layers")
EXPERTS_KEYS = ("num_experts", "hidden_dim", "activation", "use_bias",
                "swiglu_alpha", "swiglu_limit")
# The experts keys Soft MoE takes (its experts have no biases).
SOFT_MOE_EXPERTS_KEYS = ("num_experts", "hidden_dim", "activation")
SHARED_KEYS = ("num_experts", "hidden_dim", "gated")
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
  """An invalid MoE config, one entry per bad field.

  errors: [(field, value, why)], field dotted from 'moe' ('moe.router.k').
  lines: the same as 'moe.router.k=9: k must be ...'.
  """

  def __init__(self, errors):
    self.errors = []
    for e in errors:  # in order, each once
      if tuple(e) not in self.errors:
        self.errors.append(tuple(e))
    super().__init__("\n".join(self.lines))

  @property
  def lines(self):
    return [f"{field}={value!r}: {why}" for field, value, why in self.errors]

  def prefixed(self, old, new):
    """The same errors with field prefix `old` replaced by `new` where the
    field starts with it (a model names per-layer overrides so)."""
    return MoEConfigError(
        [(new + f[len(old):] if f == old or f.startswith(old + ".") else f,
          v, w) for f, v, w in self.errors])


def _as_dict(config):
  if config is None:
    return None
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return copy.deepcopy(dict(config))


def resolve(name, registry, kind):
  """The class for a registry `name` or a dotted path 'pkg.module.Class'.

  Raises OptionError('name', name, ...) naming what is allowed.
  """
  if not isinstance(name, str) or not name:
    raise OptionError("name", name, f"{kind} name must be a string: one of "
                      f"{sorted(registry)} or a dotted path to a class")
  if name in registry:
    return registry[name]
  if "." not in name:
    close = difflib.get_close_matches(name, list(registry), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise OptionError("name", name, f"unknown {kind} {name!r}{hint}; "
                      f"allowed: {sorted(registry)} or a dotted path "
                      f"'pkg.module.Class'")
  module_name, _, attr = name.rpartition(".")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise OptionError("name", name, f"{kind} {name!r}: cannot import module "
                      f"{module_name!r} ({e})") from None
  cls = getattr(module, attr, None)
  if cls is None:
    raise OptionError("name", name, f"{kind} {name!r}: module "
                      f"{module_name!r} has no {attr!r}")
  return cls


def constructor_options(cls, fixed=("self",)):
  """The keyword options `cls`'s constructor takes (minus `fixed`), or None
  when it takes **kwargs (anything goes)."""
  # nnx.Module's metaclass hides the constructor behind (*args, **kwargs):
  # read __init__ itself (a dataclass's __init__ has its fields).
  params = dict(inspect.signature(cls.__init__).parameters)
  if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return None
  return sorted(n for n, p in params.items()
                if n not in fixed and n != "self"
                and p.kind != inspect.Parameter.VAR_POSITIONAL)


def _untaken_options(cls, options, fixed, field):
  """[(field.option, value, why)] for options cls's constructor lacks."""
  allowed = constructor_options(cls, fixed)
  if allowed is None:
    return []
  return [(f"{field}.{name}", options[name],
           f"{cls.__name__} does not take option {name!r}; its options: "
           f"{allowed} (and 'name')")
          for name in sorted(set(options) - set(allowed))]


def _unknown_keys(config, allowed, prefix):
  """[(field, value, why)] for keys of `config` outside `allowed`."""
  errors = []
  for key in sorted(set(config) - set(allowed)):
    if prefix == "moe." and key in MOVED:
      errors.append((f"moe.{key}", config[key], f"moved to {MOVED[key]}"))
    else:
      close = difflib.get_close_matches(key, list(allowed), n=1)
      hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
      errors.append((f"{prefix}{key}", config[key],
                     f"unknown field{hint}; allowed: {sorted(allowed)}"))
  return errors


def check_flat_form(config):
  """Raises MoEConfigError naming where each field of the old flat form
  moved (moe.router='deepseek' -> moe.router.name, moe.k -> moe.router.k,
  ...); returns None for a nested config."""
  errors = []
  for part in ("router", "engine"):
    if isinstance(config.get(part), str):
      errors.append((f"moe.{part}", config[part], f"moved to "
                     f"moe.{part}.name (moe.{part} is now a dict of the "
                     f"{part}'s options)"))
  allowed = set(MOE_KEYS) | set(SOFT_MOE_KEYS)
  errors += [e for e in _unknown_keys(config, allowed, "moe.")
             if e[2].startswith("moved to")]
  if errors:
    raise MoEConfigError(errors)


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
      lines.append((f"moe.layers.{key}", config["layers"][key],
                    f"not an MoE layer; the MoE layers of this "
                    f"{num_layers}-layer model are {list(moe_layers)}"))
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
    MoEConfigError: one entry per invalid field ('moe.router.k=9: ...').
  """
  config = _as_dict(config)
  if config is None:
    raise MoEConfigError([("moe", None, "an MoE config dict is needed")])
  config.pop("layers", None)
  check_flat_form(config)
  layer_kind = config.get("layer", "moe")
  if layer_kind not in LAYERS:
    raise MoEConfigError([("moe.layer", layer_kind,
                           f"allowed: {list(LAYERS)}")])
  if layer_kind in LAYER_CLASSES:
    return _build_layer_class(
        LAYER_CLASSES[layer_kind], config, model_dim=model_dim, rngs=rngs,
        dtype=dtype, param_dtype=param_dtype, causal=causal,
        expert_defaults=expert_defaults)
  errors = _unknown_keys(config, MOE_KEYS if layer_kind == "moe"
                         else SOFT_MOE_KEYS, "moe.")
  experts_cfg = dict(expert_defaults or {})
  experts_cfg.update(_as_dict(config.get("experts")) or {})
  errors += _unknown_keys(experts_cfg, EXPERTS_KEYS if layer_kind == "moe"
                          else SOFT_MOE_EXPERTS_KEYS, "moe.experts.")
  if "num_experts" not in experts_cfg:
    errors.append(("moe.experts.num_experts", None,
                   "missing; the number of experts E is needed"))
  if errors:
    raise MoEConfigError(errors)
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  e = experts_cfg["num_experts"]
  allow_non_causal = bool(config.get("allow_non_causal", False))

  def part(field, value, fn, option_fields=None):
    """fn(), collecting its errors: an OptionError names its field
    (`option_fields` maps an option to a field other than field.option),
    any other ValueError is charged to `field` and `value`."""
    try:
      return fn()
    except MoEConfigError as err:
      errors.extend(err.errors)
    except OptionError as err:
      where = (option_fields or {}).get(err.option,
                                        f"{field}.{err.option}")
      errors.append((where, err.value, str(err)))
    except (ValueError, TypeError) as err:
      errors.append((field, value, str(err)))
    return None

  if layer_kind == "soft_moe":
    layer = part("moe", config, lambda: soft_moe_lib.SoftMoELayer(
        model_dim, experts_cfg.get("hidden_dim"), e,
        slots_per_expert=config.get("slots_per_expert", 1),
        group_size=config.get("group_size"),
        activation=experts_cfg.get("activation", "relu"), causal=causal,
        allow_non_causal=allow_non_causal, rngs=rngs, **kw),
                 {o: f"moe.experts.{o}" for o in EXPERTS_KEYS})
    if errors:
      raise MoEConfigError(errors)
    return layer

  router_cfg = _as_dict(config.get("router")) or {"name": "token_choice"}
  engine_cfg = _as_dict(config.get("engine")) or {"name": "indices"}

  def make_part(field, cfg, registry, default, fixed, **fixed_kw):
    opts = dict(cfg)
    cls = resolve(opts.pop("name", default), registry, field.split(".")[-1])
    untaken = _untaken_options(cls, opts, fixed, field)
    if untaken:
      raise MoEConfigError(untaken)
    return cls(**fixed_kw, **opts)

  router = part("moe.router", router_cfg, lambda: make_part(
      "moe.router", router_cfg, ROUTERS, "token_choice",
      ("model_dim", "num_experts", "rngs"), model_dim=model_dim,
      num_experts=e, rngs=rngs))
  engine = part("moe.engine", engine_cfg, lambda: make_part(
      "moe.engine", engine_cfg, ENGINES, "indices", ()))
  expert_opts = {k: experts_cfg[k] for k in EXPERTS_KEYS
                 if k in experts_cfg and k not in ("num_experts",
                                                   "hidden_dim")}
  experts = part("moe.experts", experts_cfg, lambda: experts_lib.Experts(
      e, model_dim, experts_cfg.get("hidden_dim"), rngs=rngs,
      **expert_opts, **kw))

  def dense_constants(part):
    """The dense branches run the experts' activation by name, so with
    GPT-OSS's default constants only: refuse others rather than ignore."""
    custom = [k for k in ("swiglu_alpha", "swiglu_limit")
              if experts_cfg.get(k) is not None]
    if custom:
      raise MoEConfigError([(f"moe.experts.{k}", experts_cfg[k], (
          f"moe.{part} runs the experts' activation with its default "
          f"constants only; drop moe.{part} or {k}")) for k in custom])

  def make_shared():
    shared = _as_dict(config.get("shared"))
    if not shared or not shared.get("num_experts", 0):
      return None
    bad = _unknown_keys(shared, SHARED_KEYS, "moe.shared.")
    if bad:
      raise MoEConfigError(bad)
    dense_constants("shared")
    routers_lib.check_int("num_experts", shared["num_experts"], 0)
    width = shared.get("hidden_dim") or experts_cfg.get("hidden_dim")
    routers_lib.check_int("hidden_dim", width, 1)
    gated = shared.get("gated", False)
    if not isinstance(gated, bool):
      raise OptionError("gated", gated, f"gated must be True or False, got "
                        f"{gated!r}")
    cls = moe_lib.GatedShared if gated else ffn_lib.DenseFFN
    return cls(model_dim, shared["num_experts"] * width,
               activation=experts_cfg.get("activation", "relu"), rngs=rngs,
               **kw)

  def make_residual():
    residual = _as_dict(config.get("residual"))
    if not residual or not residual.get("hidden_dim"):
      return None
    bad = _unknown_keys(residual, RESIDUAL_KEYS, "moe.residual.")
    if bad:
      raise MoEConfigError(bad)
    dense_constants("residual")
    return moe_lib.ResidualBranch(
        model_dim, residual["hidden_dim"], mix=residual.get("mix", "sum"),
        activation=experts_cfg.get("activation", "relu"), rngs=rngs, **kw)

  # The dense branches use the experts' activation.
  same_act = {"activation": "moe.experts.activation"}
  shared = part("moe.shared", config.get("shared"), make_shared, same_act)
  residual = part("moe.residual", config.get("residual"), make_residual,
                  same_act)
  if router is not None and engine is not None:
    check = getattr(engine, "check_router", None)
    if check is not None:
      part("moe.engine.name", engine_cfg.get("name", "indices"),
           lambda: check(router))
  if errors:
    raise MoEConfigError(errors)
  layer_kw = {k: config[k] for k in (
      "capacity_factor", "eval_capacity_factor", "capacity", "min_capacity",
      "capacity_multiple_of", "group_size", "pad_groups", "output_bias",
      "balance_scope") if k in config}
  layer = part("moe", config, lambda: moe_lib.MoELayer(
      router=router, experts=experts, engine=engine, shared=shared,
      residual=residual, expert_parallel=expert_parallel, **layer_kw))
  if errors:
    raise MoEConfigError(errors)
  if causal and not layer.causal and not allow_non_causal:
    field = ("moe.router.batch_prioritized"
             if router_cfg.get("batch_prioritized") else "moe.router.name")
    value = router_cfg.get(field.rsplit(".", 1)[-1], "token_choice")
    raise MoEConfigError([(field, value, (
        f"{type(router).__name__} reads later tokens of its group, so in a "
        f"causal model a token would see the future; allowed: a causal "
        f"router (token choice without batch_prioritized, hash, deepseek, "
        f"noisy_top_k, cosine), or moe.allow_non_causal=True to accept the "
        f"leak knowingly"))])
  return layer


def _build_layer_class(cls, config, *, model_dim, rngs, dtype, param_dtype,
                       causal, expert_defaults):
  """A LAYER_CLASSES layer from its config (errors as MoEConfigError)."""
  experts_cfg = dict(expert_defaults or {})
  experts_cfg.update(_as_dict(config.get("experts")) or {})
  errors = _unknown_keys(experts_cfg, EXPERTS_KEYS, "moe.experts.")
  if "num_experts" not in experts_cfg:
    errors.append(("moe.experts.num_experts", None,
                   "missing; the number of experts E is needed"))
  opts = {k: v for k, v in config.items() if k not in cls.CONFIG_KEYS}
  errors += _untaken_options(
      cls, opts, ("model_dim", "hidden_dim", "num_experts", "activation",
                  "dtype", "param_dtype", "rngs"), "moe")
  if errors:
    raise MoEConfigError(errors)
  try:
    layer = cls.from_config(config, experts_cfg, model_dim=model_dim,
                            rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                            causal=causal)
  except OptionError as err:
    raise MoEConfigError([(f"moe.{err.option}", err.value, str(err))]) from None
  except (ValueError, TypeError) as err:
    raise MoEConfigError([("moe", config.get("layer"), str(err))]) from None
  if causal and not layer.causal and not config.get("allow_non_causal"):
    raise MoEConfigError([("moe.layer", config.get("layer"), (
        f"{cls.__name__} reads later tokens of its group in this setting; "
        f"in a causal model use a causal option or set "
        f"moe.allow_non_causal=True"))])
  return layer


def apply_wrappers(model, wrappers, *, rngs):
  """Applies WRAPPERS to `model` in registry order: `wrappers` maps a name
  (or a dotted path to a function) to its options. Errors are a
  MoEConfigError on model.wrappers.<name>.<option>."""
  wrappers = _as_dict(wrappers) or {}
  names = [n for n in WRAPPERS if n in wrappers] + [
      n for n in wrappers if n not in WRAPPERS]
  for name in names:
    field = f"model.wrappers.{name}"
    try:
      fn = resolve(name, WRAPPERS, "wrapper")
      opts = _as_dict(wrappers[name]) or {}
      params = inspect.signature(fn).parameters
      bad = sorted(set(opts) - set(params) - {"rngs"})
      if bad and not any(p.kind == inspect.Parameter.VAR_KEYWORD
                         for p in params.values()):
        raise MoEConfigError([(f"{field}.{b}", opts[b], (
            f"{name} does not take option {b!r}; its options: "
            f"{sorted(set(params) - {'model', 'rngs'})}")) for b in bad])
      fn(model, rngs=rngs, **opts)
    except MoEConfigError:
      raise
    except OptionError as err:
      where = field if err.option == "name" else f"{field}.{err.option}"
      raise MoEConfigError([(where, err.value, str(err))]) from None
  return model


def wrapped_base(module):
  """The module a wrapper stands for, following `wraps` (LoRAExpertsFFN
  declares wraps = 'shared'), or `module` itself when it wraps nothing."""
  while getattr(module, "wraps", None):
    module = getattr(module, module.wraps)
  return module


@contextlib.contextmanager
def unwrapped(model):
  """Within the block, `model` has the structure it had before its wrappers:
  each module that declares `wraps = '<attribute>'` (LoRAExpertsFFN) is
  replaced in its parent by the module it holds there, and put back after.

  The modules are the same objects, so what is written to their variables
  inside (e.g. a checkpoint's weights copied by path) stays. The wrappers'
  own variables (adapters, routers) are absent inside.

  Yields:
    the list of (path, wrapper) replaced (empty: nothing wrapped).
  """
  def first_wrapper():
    for path, node in nnx.iter_graph(model):
      if (path and isinstance(node, nnx.Module)
          and getattr(node, "wraps", None)):
        return tuple(path), node
    return None

  def put(path, module):
    parent = model
    for key in path[:-1]:
      parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
      parent[path[-1]] = module
    else:
      setattr(parent, path[-1], module)

  # One at a time, re-reading the graph: a base may hold wrappers itself.
  done = []
  try:
    while (found := first_wrapper()) is not None:
      path, wrapper = found
      put(path, getattr(wrapper, wrapper.wraps))
      done.append(found)
    yield list(done)
  finally:
    for path, wrapper in reversed(done):
      put(path, wrapper)


def known_loss_names(layers=()):
  """Loss names an MoE layer can report: the layer's own, every registered
  router's `loss_names`, and those of the routers of `layers` (a user's
  router by dotted path declares its own)."""
  names = set(moe_lib.BASE_LOSSES) | {"mod_predictor"}
  routers = list(ROUTERS.values()) + [getattr(l, "router", None)
                                      for l in layers]
  for router in routers:
    names.update(getattr(router, "loss_names", ()))
  return tuple(sorted(names))


def moe_layer_types():
  """The module classes that return (y, MoEAux)."""
  return (moe_lib.MoELayer, soft_moe_lib.SoftMoELayer) + tuple(
      LAYER_CLASSES.values())
