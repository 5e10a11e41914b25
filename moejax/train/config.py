"""The fields train_and_evaluate reads, and helpers for config files.

A config file (experiments/configs/*.py) starts from `base_config()`, fills
in task, data, model and moe, and parses its `get_config(arg)` argument with
`parse_arg`. Nothing here reads flags.
"""

import inspect

import ml_collections
from ml_collections import config_dict

from moejax.layers import build as build_lib


def parse_arg(arg, **choices):
  """Parses get_config's arg: comma-separated `key=value` or bare values.

  `choices` maps each key to its allowed values, the first being the
  default. A bare value selects the key whose choices contain it:
  parse_arg('dense,size=smoke', variant=('moe', 'dense'),
  size=('small', 'smoke')) == {'variant': 'dense', 'size': 'smoke'}.

  Raises:
    ValueError: an unknown key or value, naming what is allowed.
  """
  out = {key: values[0] for key, values in choices.items()}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" in part:
      key, value = (s.strip() for s in part.split("=", 1))
      if key not in choices:
        raise ValueError(f"config arg {part!r}: unknown key {key!r}; allowed "
                         f"keys: {sorted(choices)}")
    else:
      value = part
      keys = [k for k, values in choices.items() if value in values]
      if not keys:
        allowed = {k: list(v) for k, v in choices.items()}
        raise ValueError(f"config arg {part!r} is not a value of any key: "
                         f"{allowed}")
      key = keys[0]
    if value not in choices[key]:
      raise ValueError(f"config arg {part!r}: {key} must be one of "
                       f"{list(choices[key])}, got {value!r}")
    out[key] = value
  return out


def base_config():
  """A ConfigDict with every field moejax.train reads besides the task's.

  A config file sets: task ('lm' or 'classification'); data (dataset,
  train_split, eval_split, ...: see moejax.train.loop.make_datasets); model
  (name: 'decoder_lm' or 'vit', then the model's constructor arguments);
  moe (the nested moejax.layers.build_moe config the model gets as `moe=`,
  usually made with `moe_config`; None values are left to the layer's
  defaults).
  """
  c = ml_collections.ConfigDict()
  c.task = "lm"
  c.seed = 0                # model init and data order
  # PRNG of the model's nnx.Rngs: 'rbg' compiles the sharded initialisation
  # several times faster than jax's default 'threefry2x32' on CPU (27 s vs
  # 6 s for a tiny MoE LM on a loaded 2-core machine); '' = jax's default.
  c.prng_impl = "rbg"
  c.num_train_steps = 100
  c.batch_size = 16         # global batch (examples per step)
  c.eval_batch_size = config_dict.placeholder(int)  # None: batch_size
  c.eval_every = 0          # steps between evals; 0: only at the end
  c.eval_steps = 8          # eval batches; 0: the whole (finite) eval split
  c.log_every = 1           # metrics fetched and written every N steps
  c.checkpoint_every = 100  # steps between checkpoints (and the last step)
  c.max_checkpoints_to_keep = 3
  c.async_checkpointing = True
  # Stop (with a checkpoint) after this many steps in one invocation; the
  # next invocation resumes. 0: run to num_train_steps.
  c.stop_after_steps = 0
  # NaN/Inf in the loss or the gradient norm: 'stop' (TrainingDivergedError
  # naming the step) or 'skip' (keep the previous parameters and optimizer
  # state, count the skip, and stop after max_consecutive_nan_skips skipped
  # steps in a row).
  c.nan_policy = "stop"
  c.max_consecutive_nan_skips = 3
  # Fault injection for tests: comma-separated steps (1-based) whose loss is
  # multiplied by NaN, e.g. '4,5'. '' = off.
  c.inject_nan_steps = ""
  # Scale (docs/training.md "Scale"). The model's own switches are
  # model.scan_layers (nnx.scan over identical blocks), model.remat ('none',
  # 'full', 'save_dots', 'save_moe_outputs', 'offload') and model.dtype /
  # model.param_dtype (bfloat16 compute over float32 master weights).
  # Gradient accumulation: each step's batch_size examples run as this
  # many micro-batches (one optimizer update); must divide batch_size.
  c.micro_batches = 1
  # Steps (1-based, comma-separated, e.g. '5,6') traced with jax.profiler
  # into workdir/profile/ (TensorBoard's profile tab or Perfetto). '' = off.
  c.profile_steps = ""
  # Peak dense TFLOP/s per device for the MFU in the log line; 0: the
  # backend's table (moejax.train.throughput), or on CPU a measured matmul
  # rate (the log says "measured").
  c.peak_tflops = 0.0
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=20, end_learning_rate_fraction=0.1,
      weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip_norm=1.0))
  # Weights of the MoE aux losses (names: moejax.layers.build.
  # known_loss_names()), summed over MoE layers and added to the task loss.
  # Every MoE layer reports load_balance and z_loss; a router adds its own
  # (noisy_top_k: importance, load; deepseek: sequence_balance). A non-zero
  # weight on a loss no layer of the model reports is a config error; a zero
  # weight is ignored.
  c.aux_loss_weights = ml_collections.ConfigDict(dict(
      load_balance=1e-2, z_loss=1e-3, importance=0.0, load=0.0,
      sequence_balance=0.0))
  # Mesh axis sizes (moejax.sharding.make_mesh; one may be -1).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1,
                                          tensor=1))
  c.expert_parallel = ""    # '' (off), 'shard_map' or 'gspmd'
  # Virtual CPU devices experiments/train.py asks jax for when it runs on
  # CPU (0: jax's default of one). Read before jax starts; not by the loop.
  c.num_cpu_devices = 0
  # Start a fresh run from existing weights (moejax/train/init_from.py):
  # path: a pretrained checkpoint directory or a training workdir ('' =
  # off); mode: 'copy' (same structure) or 'upcycle' (a dense source into
  # an MoE model; drop_ratio is Drop-Upcycling's r). A resume ignores it.
  c.init_from = ml_collections.ConfigDict(dict(path="", mode="copy",
                                               drop_ratio=0.0))
  # Which parameters train: 'all', 'router' (routers only) or 'non_experts'
  # (frozen experts); the rest get no gradient and no optimizer state.
  c.trainable = "all"
  c.baseline_workdir = ""   # a finished run whose summary is shown beside
                            # (relative to the current directory)
  return c


def sweep_flags(point, config_path):
  """One sweep point as experiments/train.py flags.

  A point is {'moe.router.k': 2, ...} (config fields) and optionally 'config_arg'
  (get_config's arg): sweep_flags({'config_arg': 'dense', 'seed': 1},
  'experiments/configs/lm_stdlib.py') == ['--config=experiments/configs/
  lm_stdlib.py:dense', '--config.seed=1'].
  """
  point = dict(point)
  arg = point.pop("config_arg", None)
  flags = [f"--config={config_path}" + (f":{arg}" if arg else "")]
  flags += [f"--config.{key}={value}" for key, value in point.items()]
  return flags


# Options of the registry's routers and engines that may stay unset.
_SKIPPED_OPTIONS = ("self", "model_dim", "num_experts", "rngs")


def _option_types(registry):
  """{option: type} of the keyword options (with a bool, int, float or str
  default) of every class in `registry` (moejax.layers.build.ROUTERS or
  ENGINES)."""
  out = {}
  for cls in registry.values():
    for name, p in inspect.signature(cls.__init__).parameters.items():
      if name in _SKIPPED_OPTIONS or p.kind in (p.VAR_POSITIONAL,
                                                p.VAR_KEYWORD):
        continue
      for typ in (bool, int, float, str):  # bool before int
        if isinstance(p.default, typ):
          out.setdefault(name, typ)
          break
  return out


def _with_placeholders(values, types):
  """A ConfigDict with every field of `types` (None placeholders of their
  type), then `values` set on it."""
  c = ml_collections.ConfigDict(
      {name: config_dict.placeholder(typ) for name, typ in types.items()})
  for key, value in dict(values or {}).items():
    c[key] = value
  return c


def moe_config(*, router, experts, engine=None, **fields):
  """The train config's `moe` field: a ConfigDict of build_moe's nested
  config in which every optional field exists as a None placeholder.

  So any router, engine, shared-expert or residual option can be set on
  the command line (`--config.moe.router.k=1`,
  `--config.moe.engine.name=dropless --config.moe.engine.tile=64`) and
  swept ('moe.experts.num_experts'), even when the config file leaves it
  unset. None leaves are dropped before the model gets the config
  (moejax.train.loop.moe_kwarg), so they mean "the layer's default"; an
  option the chosen router or engine does not take is a config error only
  when it is set.

  Args:
    router: {'name': ..., option: value}; the placeholders are the options
      of every router in moejax.layers.build.ROUTERS.
    experts: {'num_experts': E, 'hidden_dim': H, 'activation': ...}.
    engine: {'name': ..., option: value}; default {'name': 'indices'}.
    **fields: the other build_moe fields (capacity_factor,
      eval_capacity_factor, capacity, min_capacity, capacity_multiple_of,
      group_size, pad_groups, allow_non_causal; shared and residual as
      dicts; layers: per-layer overrides {'<i>': {...}}).
  Returns:
    ml_collections.ConfigDict.
  """
  c = ml_collections.ConfigDict()
  c.router = _with_placeholders(
      router, {"name": str, **_option_types(build_lib.ROUTERS)})
  c.engine = _with_placeholders(
      engine or {"name": "indices"},
      {"name": str, **_option_types(build_lib.ENGINES)})
  c.experts = _with_placeholders(
      experts, {"num_experts": int, "hidden_dim": int, "activation": str})
  for name, typ in (("capacity_factor", float),
                    ("eval_capacity_factor", float), ("capacity", int),
                    ("min_capacity", int), ("capacity_multiple_of", int),
                    ("group_size", int), ("pad_groups", bool),
                    ("allow_non_causal", bool)):
    c[name] = config_dict.placeholder(typ)
  c.shared = _with_placeholders(
      fields.pop("shared", None), {"num_experts": int, "hidden_dim": int})
  c.residual = _with_placeholders(
      fields.pop("residual", None), {"hidden_dim": int, "mix": str})
  for key, value in fields.items():
    c[key] = value
  return c


def soft_moe_config(*, experts, slots_per_expert=1, **fields):
  """The train config's `moe` field for Soft MoE layers (layer='soft_moe'):
  experts {'num_experts': E, 'hidden_dim': H, 'activation': ...},
  slots_per_expert P, and optionally group_size, allow_non_causal, layers.
  Unset fields are None placeholders (the layer's default)."""
  c = ml_collections.ConfigDict()
  c.layer = "soft_moe"
  c.experts = _with_placeholders(
      experts, {"num_experts": int, "hidden_dim": int, "activation": str})
  c.slots_per_expert = slots_per_expert
  c.group_size = config_dict.placeholder(int)
  c.allow_non_causal = config_dict.placeholder(bool)
  for key, value in fields.items():
    c[key] = value
  return c
