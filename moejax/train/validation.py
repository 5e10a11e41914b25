"""Config checks that run before anything is built or compiled.

`validate_config(config)` looks at every field train_and_evaluate reads and
raises one `ConfigError` listing each invalid field as

    config.<field>=<value>: <why>; allowed: <what is allowed>

`check_resume_config(saved, config)` refuses to resume a run whose config
changes the model or the data it was trained on (see RESUME_LOCKED).
"""

import math
import numbers

import jax

from moejax.data import corpus
from moejax.data import digits
from moejax.layers import dispatch as dispatch_lib
from moejax.layers import moe as moe_lib
from moejax.layers import params as params_lib
from moejax.routing.token_choice import GATINGS
from moejax.sharding import mesh as mesh_lib
from moejax.sharding import rules as rules_lib
from moejax.train.errors import ConfigError
from moejax.train.errors import ResumeConfigError

TASKS = ("lm", "classification")
MODEL_NAMES = ("decoder_lm", "vit")
TASK_OF_MODEL = {"decoder_lm": "lm", "vit": "classification"}
DTYPES = ("float32", "bfloat16", "float16")
PRNG_IMPLS = ("", "rbg", "unsafe_rbg", "threefry2x32")
EXPERT_PARALLEL = ("", "shard_map", "gspmd")
NAN_POLICIES = ("stop", "skip")
ENGINES = (*dispatch_lib.ENGINES, "pallas")
# Routers whose token choice does not look at later tokens.
CAUSAL_ROUTERS = tuple(r for r in moe_lib.ROUTERS
                       if r not in moe_lib.NON_CAUSAL_ROUTERS)
# Model size fields: (name, minimum), checked when the model config has them.
MODEL_SIZES = {
    "decoder_lm": (("vocab_size", 1), ("model_dim", 1), ("num_layers", 1),
                   ("num_heads", 1), ("mlp_dim", 1), ("moe_every", 0)),
    "vit": (("image_size", 1), ("patch_size", 1), ("num_channels", 1),
            ("num_classes", 1), ("model_dim", 1), ("num_layers", 1),
            ("num_heads", 1), ("mlp_dim", 1), ("num_moe", 0)),
}
# Shapes of the embedded datasets the models must match.
DATA_VOCAB = {corpus.STDLIB_BYTES: corpus.VOCAB_SIZE}
DATA_IMAGES = {digits.SKLEARN_DIGITS: dict(image_size=8, num_channels=1,
                                           num_classes=digits.DIGITS_NUM_CLASSES)}

# Fields a resumed run must keep: they define the model's parameters and
# function, or the data stream whose saved position is restored. A field
# under a prefix counts (`model` covers `model.model_dim`).
RESUME_LOCKED = ("task", "model", "moe", "prng_impl", "data.dataset",
                 "data.train_split", "data.max_files",
                 "data.validation_fraction", "data.source_dir",
                 "data.text_key")


# ------------------------------------------------------------- helpers


class _Problems:
  """Collects `config.<field>=<value>: ...` lines."""

  def __init__(self):
    self.lines = []

  def add(self, field, value, allowed, why=None):
    text = f"config.{field}={value!r}: "
    if why:
      text += f"{why}; "
    self.lines.append(text + f"allowed: {allowed}")

  def integer(self, field, value, minimum=1, maximum=None, optional=False):
    """Checks an int field; True if it is valid."""
    if value is None and optional:
      return True
    ok = (isinstance(value, numbers.Integral) and not isinstance(value, bool)
          and value >= minimum and (maximum is None or value <= maximum))
    if not ok:
      allowed = (f"an integer in [{minimum}, {maximum}]" if maximum is not None
                 else f"an integer >= {minimum}")
      if optional:
        allowed += " or None"
      self.add(field, value, allowed)
    return ok

  def number(self, field, value, low=None, high=None, low_open=False,
             high_open=False, optional=False):
    """Checks a real number field against an interval; True if valid."""
    if value is None and optional:
      return True
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))
    if ok and low is not None:
      ok = value > low if low_open else value >= low
    if ok and high is not None:
      ok = value < high if high_open else value <= high
    if not ok:
      lo = "(" if low_open else "["
      hi = ")" if high_open else "]"
      allowed = (f"a number in {lo}{'-inf' if low is None else low}, "
                 f"{'inf' if high is None else high}{hi}")
      if optional:
        allowed += " or None"
      self.add(field, value, allowed)
    return ok

  def choice(self, field, value, allowed):
    ok = value in allowed
    if not ok:
      self.add(field, value, list(allowed))
    return ok


def _get(config, dotted, default=None):
  """config.a.b by dotted name, or default when a part is missing."""
  node = config
  for part in dotted.split("."):
    if node is None or not hasattr(node, "get"):
      return default
    if part not in node:
      return default
    node = node[part]
  return node


def has_moe_layers(config):
  """Whether config.model builds MoE (or Soft MoE) layers."""
  model = config.get("model")
  if model is None or "moe" not in config or config.moe is None:
    return False
  if model.get("moe_layers"):
    return True
  if model.get("name") == "decoder_lm":
    return bool(model.get("moe_every"))
  if model.get("name") == "vit":
    return bool(model.get("num_moe", 2))
  return False


# ------------------------------------------------------------- sections


def _check_loop(c, p):
  p.choice("task", c.get("task"), TASKS)
  p.integer("batch_size", c.get("batch_size"))
  p.integer("num_train_steps", c.get("num_train_steps"))
  p.integer("eval_batch_size", c.get("eval_batch_size"), optional=True)
  for name in ("eval_every", "eval_steps", "checkpoint_every",
               "stop_after_steps", "num_cpu_devices"):
    p.integer(name, c.get(name, 0), 0)
  p.integer("log_every", c.get("log_every", 1))
  p.integer("max_checkpoints_to_keep", c.get("max_checkpoints_to_keep", 1))
  p.integer("seed", c.get("seed"), 0)
  p.choice("prng_impl", c.get("prng_impl") or "", PRNG_IMPLS)
  p.choice("expert_parallel", c.get("expert_parallel") or "",
           EXPERT_PARALLEL)
  p.choice("nan_policy", c.get("nan_policy", "stop"), NAN_POLICIES)
  p.integer("max_consecutive_nan_skips", c.get("max_consecutive_nan_skips",
                                               1))
  try:
    parse_steps(c.get("inject_nan_steps", ""))
  except ValueError as e:
    p.add("inject_nan_steps", c.get("inject_nan_steps"),
          "comma-separated step numbers >= 1, e.g. '4,5'", why=str(e))
  if (c.get("task") == "lm" and _get(c, "data.eval_split")
      and c.get("eval_steps") == 0):
    p.add("eval_steps", 0, "an integer >= 1 for task 'lm'",
          why="the LM eval stream repeats, so it has no natural end")


def _check_optimizer(c, p):
  o = c.get("optimizer")
  if o is None:
    p.add("optimizer", None, "a ConfigDict of AdamW fields")
    return
  steps = c.get("num_train_steps")
  p.number("optimizer.learning_rate", o.get("learning_rate"), 0,
           low_open=True)
  if isinstance(steps, int):
    p.integer("optimizer.warmup_steps", o.get("warmup_steps"), 0,
              max(steps, 0))
  p.number("optimizer.end_learning_rate_fraction",
           o.get("end_learning_rate_fraction"), 0, 1)
  p.number("optimizer.weight_decay", o.get("weight_decay"), 0)
  p.number("optimizer.b1", o.get("b1"), 0, 1, high_open=True)
  p.number("optimizer.b2", o.get("b2"), 0, 1, high_open=True)
  p.number("optimizer.eps", o.get("eps"), 0, low_open=True)
  p.number("optimizer.grad_clip_norm", o.get("grad_clip_norm"), 0,
           optional=True)


def _check_aux_weights(c, p):
  weights = c.get("aux_loss_weights") or {}
  allowed = tuple(moe_lib.MoELosses.__dataclass_fields__)
  for name in weights:
    if name not in allowed:
      p.add(f"aux_loss_weights.{name}", weights[name],
            f"names {list(allowed)}", why="not an MoE aux loss")
    else:
      p.number(f"aux_loss_weights.{name}", weights[name], 0)


def _check_model(c, p):
  model = c.get("model")
  if model is None:
    p.add("model", None, f"a ConfigDict with name in {list(MODEL_NAMES)}")
    return
  name = model.get("name")
  if not p.choice("model.name", name, MODEL_NAMES):
    return
  task = c.get("task")
  if task in TASKS and TASK_OF_MODEL[name] != task:
    p.add("model.name", name, f"model '{_model_for(task)}' for task {task!r}",
          why=f"task is {task!r}")
  for field, minimum in MODEL_SIZES[name]:
    if field in model:
      p.integer(f"model.{field}", model[field], minimum)
  p.integer("model.head_dim", model.get("head_dim"), 1, optional=True)
  heads, width = model.get("num_heads"), model.get("model_dim")
  if (model.get("head_dim") is None and _pos_int(heads) and _pos_int(width)
      and width % heads):
    p.add("model.num_heads", heads, f"a divisor of model.model_dim={width}",
          why="heads split the model width")
  for field in ("dtype", "param_dtype"):
    if model.get(field) is not None:
      p.choice(f"model.{field}", model.get(field), DTYPES)
  if model.get("activation") is not None:
    p.choice("model.activation", model.get("activation"),
             params_lib.ACTIVATIONS)
  if name == "vit":
    size, patch = model.get("image_size"), model.get("patch_size")
    if _pos_int(size) and _pos_int(patch) and size % patch:
      p.add("model.patch_size", patch, f"a divisor of model.image_size="
            f"{size}", why="patches tile the image")


def _model_for(task):
  return next(m for m, t in TASK_OF_MODEL.items() if t == task)


def _pos_int(x):
  return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _check_data(c, p):
  d = c.get("data")
  if d is None:
    p.add("data", None, "a ConfigDict with dataset, train_split, ...")
    return
  model = c.get("model") or {}
  dataset = d.get("dataset")
  if c.get("task") == "lm":
    p.integer("data.seq_len", d.get("seq_len"), 1)
    vocab = DATA_VOCAB.get(dataset)
    v = model.get("vocab_size")
    if vocab and _pos_int(v) and v < vocab:
      p.add("model.vocab_size", v, f"an integer >= {vocab}",
            why=f"dataset {dataset!r} has token ids up to {vocab - 1}")
  if c.get("task") == "classification" and dataset in DATA_IMAGES:
    for field, want in DATA_IMAGES[dataset].items():
      got = model.get(field)
      if _pos_int(got) and got != want:
        p.add(f"model.{field}", got, want,
              why=f"dataset {dataset!r} has {field} {want}")


def _check_moe(c, p, causal):
  """MoE layer fields; `causal`: the model is a causal decoder."""
  m = c.moe
  soft = bool((c.get("model") or {}).get("soft_moe"))
  experts = m.get("num_experts")
  p.integer("moe.num_experts", experts, 1)
  p.integer("moe.hidden_dim", m.get("hidden_dim"), 1, optional=True)
  if soft:
    p.integer("moe.slots_per_expert", m.get("slots_per_expert", 1), 1)
    if causal:
      p.add("model.soft_moe", True, "False in a causal model (or a "
            "non-causal model such as 'vit')", why="Soft MoE mixes every "
            "token of a group into every slot, so a token would see future "
            "tokens")
    return
  router = m.get("router", "token_choice")
  engine = m.get("engine", "indices")
  k = m.get("k", 2)
  router_ok = p.choice("moe.router", router, moe_lib.ROUTERS)
  engine_ok = p.choice("moe.engine", engine, ENGINES)
  if _pos_int(experts):
    p.integer("moe.k", k, 1, experts)
  else:
    p.integer("moe.k", k, 1)
  p.number("moe.capacity_factor", m.get("capacity_factor", 1.0), 0,
           low_open=True)
  p.number("moe.eval_capacity_factor", m.get("eval_capacity_factor"), 0,
           low_open=True, optional=True)
  p.integer("moe.capacity", m.get("capacity"), 1, optional=True)
  p.integer("moe.min_capacity", m.get("min_capacity", 1), 1)
  p.integer("moe.group_size", m.get("group_size"), 1, optional=True)
  p.integer("moe.num_shared_experts", m.get("num_shared_experts", 0), 0)
  if m.get("activation") is not None:
    p.choice("moe.activation", m.get("activation"), params_lib.ACTIVATIONS)
  if m.get("gating") is not None:
    p.choice("moe.gating", m.get("gating"), GATINGS)
  if router_ok and engine_ok and router == "expert_choice" and engine in (
      "dropless", "pallas"):
    p.add("moe.engine", engine, "'einsum' or 'indices' with router "
          "'expert_choice'", why="expert choice fills fixed slots")
  if router == "balanced" and k != 1:
    p.add("moe.k", k, "1 with router 'balanced'",
          why="BASE routes each token to one expert")
  if causal and not m.get("allow_non_causal", False):
    if router_ok and router in moe_lib.NON_CAUSAL_ROUTERS:
      p.add("moe.router", router, f"{list(CAUSAL_ROUTERS)} in a causal "
            f"model (or moe.allow_non_causal=True)",
            why=f"model {c.model.name!r} is causal and router {router!r} "
            f"chooses tokens using the whole group, so a token would see "
            f"future tokens")
    if m.get("batch_prioritized"):
      p.add("moe.batch_prioritized", True, "False in a causal model (or "
            "moe.allow_non_causal=True)", why="batch-prioritized routing "
            "orders tokens by later tokens' scores")


def _check_mesh(c, p, num_devices, process_count):
  """Mesh sizes vs devices, experts vs the expert axis, batch vs the
  data-parallel size."""
  mesh = c.get("mesh")
  if mesh is None:
    p.add("mesh", None, "{axis: size} over data, fsdp, expert, tensor")
    return
  sizes = dict(mesh)
  try:
    names, resolved = mesh_lib.resolve_axis_sizes(sizes, num_devices)
  except ValueError as e:
    p.add("mesh", sizes, f"sizes whose product is the {num_devices} "
          f"devices (one may be -1)", why=str(e))
    return
  axes = dict(zip(names, resolved))
  try:
    rules = rules_lib.make_rules(dict(c.get("sharding_rules") or {}))
    batch_axes = [a for a in rules_lib.mesh_axes_for("batch", rules)
                  if a in axes]
  except ValueError as e:
    p.add("sharding_rules", c.get("sharding_rules"), "logical axis rules "
          "(moejax.sharding.make_rules)", why=str(e))
    return
  shards = math.prod(axes[a] for a in batch_axes)
  for field in ("batch_size", "eval_batch_size"):
    b = c.get(field)
    if _pos_int(b) and b % shards:
      p.add(field, b, f"a multiple of {shards}", why=f"the batch is split "
            f"over mesh axes {batch_axes} of sizes "
            f"{[axes[a] for a in batch_axes]}")
    elif _pos_int(b) and b % process_count:
      p.add(field, b, f"a multiple of {process_count}",
            why=f"{process_count} processes each load a share")
  ep = c.get("expert_parallel") or ""
  if not (ep and has_moe_layers(c)):
    return
  experts = c.moe.get("num_experts")
  x = axes.get(mesh_lib.EXPERT, 1)
  if _pos_int(experts) and x > 1 and experts % x and x % experts:
    p.add("moe.num_experts", experts, f"a multiple or a divisor of "
          f"mesh.expert={x}", why="expert parallelism splits the experts "
          "over the expert axis")
  engine = c.moe.get("engine", "indices")
  if ep == "gspmd" and engine in ("dropless", "pallas"):
    p.add("moe.engine", engine, "'einsum' or 'indices' with "
          "expert_parallel='gspmd' (or expert_parallel='shard_map')",
          why="the dropless engine has no GSPMD expert-parallel path")
  hidden = c.moe.get("hidden_dim")
  t = axes.get(mesh_lib.TENSOR, 1)
  if _pos_int(hidden) and hidden % t:
    p.add("moe.hidden_dim", hidden, f"a multiple of mesh.tensor={t}")


# ------------------------------------------------------------- entry points


def validate_config(config, *, num_devices=None, process_count=None):
  """Checks every field train_and_evaluate reads; builds nothing.

  Args:
    config: the run's ConfigDict.
    num_devices, process_count: what the mesh must cover; default
      jax.device_count() / jax.process_count() (no compilation).
  Raises:
    ConfigError: one line per invalid field, naming the field, its value
      and what is allowed.
  """
  p = _Problems()
  _check_loop(config, p)
  _check_optimizer(config, p)
  _check_aux_weights(config, p)
  _check_model(config, p)
  _check_data(config, p)
  if has_moe_layers(config):
    causal = (config.model.get("name") == "decoder_lm")
    _check_moe(config, p, causal)
  if num_devices is None:
    num_devices = jax.device_count()
  if process_count is None:
    process_count = jax.process_count()
  _check_mesh(config, p, num_devices, process_count)
  if p.lines:
    raise ConfigError(p.lines)


def parse_steps(text):
  """'4,5' -> (4, 5): the steps of config.inject_nan_steps."""
  if isinstance(text, (list, tuple)):
    parts = list(text)
  else:
    parts = [s.strip() for s in str(text or "").split(",") if s.strip()]
  steps = []
  for part in parts:
    try:
      step = int(part)
    except (TypeError, ValueError):
      raise ValueError(f"{part!r} is not an integer") from None
    if step < 1:
      raise ValueError(f"step {step} is not >= 1")
    steps.append(step)
  return tuple(sorted(set(steps)))


def _flatten(tree, prefix=""):
  """{'a.b': leaf} of a nested dict (ConfigDicts as dicts)."""
  if hasattr(tree, "to_dict"):
    tree = tree.to_dict()
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    if not tree and prefix:
      out[prefix[:-1]] = {}
    return out
  if isinstance(tree, list):
    tree = tuple(tree)
  return {prefix[:-1]: tree}


def _locked(field):
  return any(field == f or field.startswith(f + ".") for f in RESUME_LOCKED)


def config_differences(saved, config, *, include=None):
  """[(field, saved value, new value)] over RESUME_LOCKED fields.

  Values are compared as JSON would store them (tuples as lists, dtypes as
  names), so a config read back from a checkpoint compares equal to the
  one that wrote it. A field missing on one side shows as '<absent>'.
  include: optional predicate on the dotted field name, replacing the
  RESUME_LOCKED selection (experiments/sweep.py compares nearly all).
  """
  a, b = _flatten(saved), _flatten(config)
  include = include or _locked
  out = []
  for field in sorted(set(a) | set(b)):
    if not include(field):
      continue
    va, vb = a.get(field, "<absent>"), b.get(field, "<absent>")
    if _normal(va) != _normal(vb):
      out.append((field, va, vb))
  return out


def _normal(value):
  if isinstance(value, (list, tuple)):
    return [_normal(v) for v in value]
  if isinstance(value, (str, int, float, bool, dict)) or value is None:
    return value
  return str(value)


def check_resume_config(saved, config, where):
  """Raises ResumeConfigError if `config` changes a RESUME_LOCKED field of
  `saved` (the config of the checkpointed run, a dict).

  Args:
    saved: the checkpointed run's config (dict from config.json or a
      checkpoint's meta).
    config: the config of this invocation.
    where: the checkpoint directory (for the message).
  """
  diffs = config_differences(saved, config)
  if not diffs:
    return
  lines = [f"  {field}: {old!r} (checkpoint) -> {new!r} (now)"
           for field, old, new in diffs]
  message = (
      f"refusing to resume from {where}: the config changes "
      f"{len(diffs)} field(s) that define the model or its data:\n"
      + "\n".join(lines) + "\n"
      "Resuming would silently train a different model. Run with the "
      "checkpointed values, or start a new --workdir. Fields that may "
      "change on resume: optimizer.*, num_train_steps, batch_size, "
      "eval_*, log_every, checkpoint_every, nan_policy, mesh.*, ...")
  raise ResumeConfigError(message, diffs)
