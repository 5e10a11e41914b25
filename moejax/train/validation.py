"""Config checks that run before anything is compiled.

`validate_config(config)` looks at every field train_and_evaluate reads and
raises one `ConfigError` listing each invalid field as

    config.<field>=<value>: <why>; allowed: <what is allowed>

The loop's own fields (steps, batch sizes, mesh, optimizer, ...) are checked
here. The model and its MoE layers are checked by building the model
abstractly (nnx.eval_shape: shapes only, no arrays, nothing compiled): the
layers' constructors own their rules (moejax.layers.build.build_moe raises
MoEConfigError, one line per bad field), and their errors are turned into
`config.moe.<field>=<value>: ...` lines here, so there is no second copy of
the rules to drift.

`check_resume_config(saved, config)` refuses to resume a run whose config
changes the model or the data it was trained on (see RESUME_LOCKED).
"""

import collections
import math
import os
import numbers
import re

from flax import nnx
import jax

from moejax import data as data_lib
from moejax import routing as routing_lib
from moejax.data import corpus
from moejax.data import digits
from moejax.layers import build as build_lib
from moejax.layers import moe as moe_lib
from moejax.layers import params as params_lib
from moejax.models import common as model_common
from moejax.sharding import expert_parallel as ep_lib
from moejax.sharding import mesh as mesh_lib
from moejax.sharding import rules as rules_lib
from moejax.train.errors import ConfigError
from moejax.train.errors import ResumeConfigError

TASKS = ("lm", "classification")
MODEL_NAMES = ("decoder_lm", "vit", "pretrained")
TASK_OF_MODEL = {"decoder_lm": "lm", "vit": "classification",
                 "pretrained": "lm"}
DTYPES = ("float32", "bfloat16", "float16")
PRNG_IMPLS = ("", "rbg", "unsafe_rbg", "threefry2x32")
EXPERT_PARALLEL = ("", "shard_map", "gspmd")
NAN_POLICIES = ("stop", "skip")
# Model size fields: (name, minimum), checked when the model config has them.
MODEL_SIZES = {
    "decoder_lm": (("vocab_size", 1), ("model_dim", 1), ("num_layers", 1),
                   ("num_heads", 1), ("mlp_dim", 1), ("moe_every", 0)),
    "vit": (("image_size", 1), ("patch_size", 1), ("num_channels", 1),
            ("num_classes", 1), ("model_dim", 1), ("num_layers", 1),
            ("num_heads", 1), ("mlp_dim", 1), ("num_moe", 0)),
    "pretrained": (),
}
# Shapes of the embedded datasets the models must match.
DATA_VOCAB = {corpus.STDLIB_BYTES: corpus.VOCAB_SIZE, "text_files": corpus.VOCAB_SIZE}
DATA_IMAGES = {digits.SKLEARN_DIGITS: dict(image_size=8, num_channels=1,
                                           num_classes=digits.DIGITS_NUM_CLASSES)}

# Fields a resumed run must keep: they define the model's parameters and
# function, or the data stream whose saved position is restored. A field
# under a prefix counts (`model` covers `model.model_dim`).
RESUME_LOCKED = ("task", "model", "moe", "prng_impl", "trainable",
                 "data.tokenizer", "data.dataset",
                 "data.train_split", "data.max_files",
                 "data.validation_fraction", "data.source_dir",
                 "data.text_key")
# Fields under RESUME_LOCKED that may change anyway: they change how the
# model computes, not its parameters (remat recomputes the same values).
RESUME_FREE = ("model.remat",)
# Fields added after runs were saved without them: their absence in a
# saved config means this value (so older runs still resume).
RESUME_DEFAULTS = {"model.scan_layers": False, "trainable": "all",
                   "data.tokenizer": ""}


# ------------------------------------------------------------- helpers


class _Problems:
  """Collects `config.<field>=<value>: ...` lines."""

  def __init__(self):
    self.lines = []
    self.fields = set()  # the fields named so far

  def add(self, field, value, allowed, why=None):
    text = f"config.{field}={value!r}: "
    if why:
      text += f"{why}; "
    self.line(field, text + f"allowed: {allowed}")

  def line(self, field, text):
    """Adds a ready line about `field` (once per field)."""
    if field in self.fields:
      return
    self.fields.add(field)
    self.lines.append(text)

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
      # Only finite numbers pass, so an unbounded side is open: (0, inf).
      lo = "(" if low_open or low is None else "["
      hi = ")" if high_open or high is None else "]"
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
  _check_scale(c, p)
  if (c.get("task") == "lm" and _get(c, "data.eval_split")
      and c.get("eval_steps") == 0):
    p.add("eval_steps", 0, "an integer >= 1 for task 'lm'",
          why="the LM eval stream repeats, so it has no natural end")


def _check_scale(c, p):
  """micro_batches, profile_steps, peak_tflops."""
  k = c.get("micro_batches", 1)
  if p.integer("micro_batches", k, 1):
    batch = c.get("batch_size")
    if _pos_int(batch) and batch % k:
      p.add("micro_batches", k, f"a divisor of batch_size={batch}",
            why="the batch is split into equal micro-batches")
  try:
    parse_steps(c.get("profile_steps", ""))
  except ValueError as e:
    p.add("profile_steps", c.get("profile_steps"),
          "comma-separated step numbers >= 1, e.g. '5,6'", why=str(e))
  p.number("peak_tflops", c.get("peak_tflops", 0.0), 0)


def _check_optimizer(c, p):
  o = c.get("optimizer")
  if o is None:
    p.add("optimizer", None, "a ConfigDict of AdamW fields")
    return
  steps = c.get("num_train_steps")
  p.number("optimizer.learning_rate", o.get("learning_rate"), 0,
           low_open=True)
  if isinstance(steps, int) and steps >= 1:
    # The cosine decay needs at least one step after the warmup.
    p.integer("optimizer.warmup_steps", o.get("warmup_steps"), 0, steps - 1)
  p.number("optimizer.end_learning_rate_fraction",
           o.get("end_learning_rate_fraction"), 0, 1)
  p.number("optimizer.weight_decay", o.get("weight_decay"), 0)
  p.number("optimizer.b1", o.get("b1"), 0, 1, high_open=True)
  p.number("optimizer.b2", o.get("b2"), 0, 1, high_open=True)
  p.number("optimizer.eps", o.get("eps"), 0, low_open=True)
  p.number("optimizer.grad_clip_norm", o.get("grad_clip_norm"), 0,
           optional=True)


def _check_aux_weights(c, p, moe_layers):
  """Names against every loss a layer can report (the registry's routers'
  and the built model's; a typo is an error even with weight 0); values >=
  0. Whether the model's layers report a name with a non-zero weight is
  checked on the built model (_check_reported)."""
  weights = c.get("aux_loss_weights") or {}
  allowed = build_lib.known_loss_names(moe_layers)
  for name in weights:
    if name not in allowed:
      close = [n for n in allowed if n.replace("_", "") == name.replace(
          "_", "")] or _close(name, allowed)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      p.add(f"aux_loss_weights.{name}", weights[name],
            f"names {list(allowed)}", why=f"not an MoE aux loss{hint}")
    else:
      p.number(f"aux_loss_weights.{name}", weights[name], 0)


def _close(name, allowed):
  import difflib  # pylint: disable=g-import-not-at-top
  return difflib.get_close_matches(name, list(allowed), n=1)


def _check_reported(c, p, moe_layers):
  """A non-zero weight on a loss none of the model's MoE layers reports
  (the train step would raise when traced)."""
  if not moe_layers:
    return  # no MoE layer: the aux loss is 0 whatever the weights
  reported = set()
  for layer in moe_layers:
    reported |= set(_reported_losses(layer))
  for name, weight in (c.get("aux_loss_weights") or {}).items():
    if (weight and name not in reported and isinstance(weight, numbers.Real)
        and name in build_lib.known_loss_names(moe_layers)):
      p.add(f"aux_loss_weights.{name}", weight, f"0.0, or a router that "
            f"reports {name!r}", why=f"no MoE layer of this model reports "
            f"it (reported: {sorted(reported)})")


def _reported_losses(layer):
  """The aux loss names an MoE layer reports: the layer's load_balance and
  z_loss plus its router's loss_names; Soft MoE reports none."""
  if not isinstance(layer, moe_lib.MoELayer):
    # Other layers and block wrappers (Lory, SMEAR, MoD) declare theirs.
    return tuple(getattr(layer, "loss_names", ()))
  return (*moe_lib.BASE_LOSSES, *getattr(layer.router, "loss_names", ()))


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
  _check_model_scale(model, name, p)
  if name == "pretrained":
    from moejax.train import loop  # pylint: disable=g-import-not-at-top
    field = "model.path" if model.get("path") else "init_from.path"
    _check_pretrained_path(p, field, loop.pretrained_path(c))
  if name == "vit":
    size, patch = model.get("image_size"), model.get("patch_size")
    if _pos_int(size) and _pos_int(patch) and size % patch:
      p.add("model.patch_size", patch, f"a divisor of model.image_size="
            f"{size}", why="patches tile the image")


def _check_pretrained_path(p, field, path):
  """A pretrained checkpoint directory (config.json + safetensors)."""
  from moejax.inference import checkpoints  # pylint: disable=g-import-not-at-top
  if not (isinstance(path, str) and path and os.path.isdir(path)
          and checkpoints.is_pretrained(path)):
    p.add(field, path, "a checkpoint directory with config.json and "
          "model.safetensors (or its index)")


def _check_init_from(c, p):
  """init_from (path, mode, drop_ratio), trainable and data.tokenizer."""
  from moejax.train import init_from as init_from_lib  # pylint: disable=g-import-not-at-top
  p.choice("trainable", c.get("trainable") or "all", init_from_lib.TRAINABLE)
  from moejax.train import loop  # pylint: disable=g-import-not-at-top
  tokenizer = loop.data_tokenizer(c) if c.get("data") else None
  if tokenizer and tokenizer != "bytes":
    from moejax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    try:
      tokenizer_lib.load_tokenizer(tokenizer)
    except (OSError, ValueError) as e:
      p.add("data.tokenizer", tokenizer, "a tokenizer.json, a checkpoint "
            "directory holding one, or 'bytes'", why=str(e))
  init = c.get("init_from")
  if not init or not init.get("path"):
    return
  p.choice("init_from.mode", init.get("mode"), init_from_lib.MODES)
  p.number("init_from.drop_ratio", init.get("drop_ratio", 0.0), 0.0, 1.0)
  path = init.get("path")
  if not (isinstance(path, str) and os.path.isdir(path)):
    p.add("init_from.path", path, "a pretrained checkpoint directory or a "
          "training workdir", why="no such directory")


def _check_model_scale(model, name, p):
  """model.remat and model.scan_layers (decoder_lm only)."""
  scan, remat = model.get("scan_layers"), model.get("remat")
  if name != "decoder_lm":
    for field, value, off in (("scan_layers", scan, False),
                              ("remat", remat, "none")):
      if value not in (None, off):
        p.add(f"model.{field}", value, f"{off!r} (unset)",
              why=f"model {name!r} has no {field} option; decoder_lm has")
    return
  if scan is not None and not isinstance(scan, bool):
    p.add("model.scan_layers", scan, "True or False")
  if remat is None:
    return
  if p.choice("model.remat", remat, model_common.REMAT_POLICIES) and (
      remat == "offload" and jax.default_backend() == "cpu"):
    p.add("model.remat", remat,
          f"one of {[r for r in model_common.REMAT_POLICIES if r != remat]}",
          why="offloading saved activations to pinned host memory needs a "
          "GPU or TPU backend, and this one is cpu")


def _model_for(task):
  return next(m for m, t in TASK_OF_MODEL.items() if t == task)


def _pos_int(x):
  return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _tfds_names(name=None):
  """Whether `name` is a registered TFDS dataset (True when TFDS cannot
  tell: the data code then reports it); without a name, the registered
  names (no community datasets, no network)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if name is None:
    try:
      return tfds.list_builders(with_community_datasets=False)
    except Exception:  # pylint: disable=broad-except
      return []
  try:
    tfds.builder_cls(name)
  except tfds.core.registered.DatasetNotFoundError:
    return False
  except Exception:  # pylint: disable=broad-except
    return True  # e.g. a builder whose module needs a missing package
  return True


def _check_dataset(task, dataset, p):
  """data.dataset: an embedded dataset of the task's kind, or a registered
  TFDS dataset. Checked here, so that an unknown name is not reported as
  whatever the data code happens to check first (it used to be a
  max_files problem)."""
  if task not in TASKS:
    return
  kinds = {"lm": ("text", data_lib.OWN_TEXT_DATASETS),
           "classification": ("image", data_lib.EMBEDDED_IMAGE_DATASETS)}
  kind, own = kinds[task]
  allowed = (f"{list(own)} (moejax's own) or the name of a registered TFDS "
             f"{kind} dataset")
  if not isinstance(dataset, str) or not dataset:
    p.add("data.dataset", dataset, allowed)
    return
  if dataset in own:
    return
  for other_task, (other_kind, names) in kinds.items():
    if other_task != task and dataset in names:
      p.add("data.dataset", dataset, allowed, why=f"an embedded "
            f"{other_kind} dataset, but task {task!r} reads {kind}")
      return
  name = dataset.split("/")[0]  # 'name/config:version'
  if ":" in name:
    name, rest = name.split(":", 1)
    if not re.fullmatch(r"[\d.*]+", rest):
      return  # 'namespace:name', a community dataset: left to TFDS
  if _tfds_names(name):
    return
  embedded = [*data_lib.EMBEDDED_TEXT_DATASETS,
              *data_lib.EMBEDDED_IMAGE_DATASETS]
  close = _close(dataset, embedded) or _close(dataset, _tfds_names())
  why = "unknown dataset" + (f" (did you mean {close[0]!r}?)" if close
                             else "")
  p.add("data.dataset", dataset, allowed, why=why)


def _check_data(c, p):
  d = c.get("data")
  if d is None:
    p.add("data", None, "a ConfigDict with dataset, train_split, ...")
    return
  model = c.get("model") or {}
  dataset = d.get("dataset")
  _check_dataset(c.get("task"), dataset, p)
  if c.get("task") == "lm":
    p.integer("data.seq_len", d.get("seq_len"), 1)
    if dataset == "text_files" and not (
        isinstance(d.get("source_dir"), str) and
        os.path.isdir(d.get("source_dir"))):
      p.add("data.source_dir", d.get("source_dir"), "a directory of text "
            "files", why="dataset 'text_files' reads source_dir")
    from moejax.train import loop  # pylint: disable=g-import-not-at-top
    # Bytes (257 ids) unless a tokenizer makes the ids.
    vocab = None if loop.data_tokenizer(c) else DATA_VOCAB.get(dataset)
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


# Model fields the model can be built without when they are invalid (the
# constructor's default stands in, the problem is already listed), so the
# MoE layers are still checked.
BUILD_WITHOUT = ("dtype", "param_dtype", "activation", "head_dim", "pool",
                 "norm", "remat", "scan_layers")


def _moe_dict(c):
  """config.moe as the model gets it (None leaves dropped), or None."""
  from moejax.train import loop  # pylint: disable=g-import-not-at-top
  return loop.moe_kwarg(c)


def _check_flat_form(c, p):
  """The old flat moe form (moe.router='x', moe.k=2, ...): one line per
  field naming where it moved. True when the config is in that form."""
  moe = _moe_dict(c)
  if not moe:
    return False
  try:
    build_lib.check_flat_form(moe)
  except build_lib.MoEConfigError as e:
    _add_moe_errors(p, e)
    return True
  return False


def build_abstract_model(c, p):
  """nnx.eval_shape of config.model (no arrays, nothing compiled), with the
  errors of the model's and the MoE layers' constructors as problems.
  Returns the abstract model, or None when it does not build."""
  from moejax.train import loop  # pylint: disable=g-import-not-at-top
  model = c.get("model")
  if model is None or model.get("name") not in loop.MODELS:
    return None
  drop = [f for f in BUILD_WITHOUT if f"model.{f}" in p.fields]
  try:
    kwargs = loop.model_kwargs(c, drop=drop)
  except ValueError:
    return None  # a dtype name: already listed
  cls = loop.MODELS[model.get("name")]
  model_problems = any(f.startswith("model.") for f in p.fields)
  try:
    return nnx.eval_shape(lambda: cls(**kwargs, rngs=nnx.Rngs(0)))
  except build_lib.MoEConfigError as e:
    _add_moe_errors(p, e)
  except (ValueError, TypeError, OSError) as e:
    # OSError: a pretrained model's config.json (its path is checked above).
    model_problems = model_problems or any(
        f.startswith("init_from.") for f in p.fields)
    if not model_problems:  # else most likely the problem already listed
      _add_model_line(p, str(e), c)
  return None


def _add_model_line(p, msg, c):
  """A model constructor's error, on the model field it names."""
  model = {k: v for k, v in _as_dict(c.model).items() if v is not None}
  keys = {f"model.{k}": v for k, v in model.items() if k != "name"}
  keys["moe"] = _moe_dict(c)
  field = _first_named(msg, keys)
  if field is None:
    field, msg = "model.name", f"the model does not build: {msg}"
  value = keys.get(field, model.get("name"))
  p.line(field, f"config.{field}={value!r}: {msg}")


def _as_dict(tree):
  return tree.to_dict() if hasattr(tree, "to_dict") else dict(tree or {})


def _first_named(msg, candidates):
  """The candidate field (dotted; its last part is searched as a word) that
  `msg` names first; ties go to the longer name. None if none is named."""
  best = None
  for field in candidates:
    name = field.rsplit(".", 1)[-1]
    m = re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", msg)
    if m and (best is None or (m.start(), -len(name)) < best[0]):
      best = ((m.start(), -len(name)), field)
  return None if best is None else best[1]


def _lookup(tree, dotted):
  """tree['a']['b'] for 'a.b', or None where a part is missing."""
  node = tree
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def _add_moe_errors(p, err):
  """An MoEConfigError's entries as config lines: the layers name each bad
  field themselves (moe.router.k, moe.layers.2.router.k, ...)."""
  for field, value, why in err.errors:
    p.line(field, f"config.{field}={value!r}: {why}")


def _check_mesh(c, p, num_devices, process_count):
  """Mesh sizes vs devices, batch vs the data-parallel size. Returns
  {axis: size}, or None when the mesh does not fit the devices."""
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
    return axes
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
  b, k = c.get("batch_size"), c.get("micro_batches", 1)
  if (_pos_int(b) and _pos_int(k) and k > 1 and not b % shards
      and not b % k and (b // k) % shards):
    p.add("micro_batches", k,
          f"a divisor of {b // shards} (batch_size / {shards})",
          why=f"each micro-batch of {b // k} examples is split over mesh "
          f"axes {batch_axes} of sizes {[axes[a] for a in batch_axes]}")
  return axes


def _check_expert_parallel(c, p, axes, moe_layers):
  """Each MoE layer of the built model against the mesh: E vs the expert
  axis, H vs the tensor axis, and its engine vs the mode (ExpertParallel's
  checks, without a mesh of real devices)."""
  mode = c.get("expert_parallel") or ""
  if not (mode in ep_lib.EP_MODES and axes and moe_layers):
    return  # off, or an unknown mode (already listed)
  moe = _moe_dict(c) or {}
  x = axes.get(mesh_lib.EXPERT, 1)
  t = axes.get(mesh_lib.TENSOR, 1)
  for layer in moe_layers:
    if not callable(getattr(layer, "set_expert_parallel", None)):
      continue  # Soft MoE: not expert-parallel
    e = layer.num_experts
    if x > 1 and e % x and x % e:
      p.add("moe.experts.num_experts", e, f"a multiple or a divisor of "
            f"mesh.expert={x}", why="expert parallelism splits the experts "
            "over the expert axis")
    h = layer.experts.hidden_dim
    if h % t:
      field = ("moe.experts.hidden_dim" if _lookup(moe, "experts.hidden_dim")
               else "model.mlp_dim")
      p.add(field, h, f"a multiple of mesh.tensor={t}",
            why="tensor parallelism splits each expert's hidden units")
    try:
      ep_lib.check_engine_mode(layer.engine, mode)
    except ValueError as e:
      p.add("moe.engine.name", _lookup(moe, "engine.name"),
            f"a capacity engine ('einsum' or 'indices') with "
            f"expert_parallel={mode!r}, or expert_parallel='shard_map'",
            why=str(e))


class _TokenShards(collections.namedtuple("_TokenShards",
                                          "num_token_shards token_axes")):
  """What expert_parallel.check_groups reads of an ExpertLayout, without a
  mesh of real devices."""


def _batches(c, model):
  """[(kind, batch field, batch size, tokens per example, what one example
  is)] of the batches the model's MoE layers see: the training batch and,
  when the run evaluates, the eval batch. Batch sizes are global: the
  layers group the tokens of the whole (jit-global) batch."""
  if c.get("task") == "lm":
    length, unit = _get(c, "data.seq_len"), "seq_len"
  else:
    length, unit = getattr(model, "num_tokens", None), "tokens per image"
  if not _pos_int(length):
    return []
  out = []
  if _pos_int(c.get("batch_size")):
    out.append(("training", "batch_size", c.batch_size, length, unit))
  if _get(c, "data.eval_split"):
    field = ("eval_batch_size" if c.get("eval_batch_size") is not None
             else "batch_size")
    if out and c.get(field) == out[0][2]:
      out[0] = ("training (and evaluation)", *out[0][1:])
    elif _pos_int(c.get(field)):
      out.append(("evaluation", field, c.get(field), length, unit))
  return out


def _check_groups(c, p, axes, model):
  """Each MoE layer's token groups against every batch it will see.

  MoELayer.__call__ cuts a batch's B*L tokens into groups of S = group_size
  (None: L, one sequence per group) with group_tokens, which pads the last
  group only when pad_groups (else raises); under expert parallelism
  (ExpertParallel.constrain_groups) the G groups must split evenly over the
  devices of the token axes (check_groups). B*L differs between training
  and evaluation (eval_batch_size), and moe.layers.<i> may override
  group_size and pad_groups, so every MoE block and every batch is checked
  here with the layer's own functions, instead of failing when the step is
  traced (an eval step only at the first evaluation)."""
  blocks = getattr(model, "blocks", None)
  batches = _batches(c, model)
  if blocks is None or not batches:
    return
  moe = _moe_dict(c) or {}
  mode = c.get("expert_parallel") or ""
  shards = None
  if mode in ep_lib.EP_MODES and axes:
    # ExpertParallel's default token axes: the mesh's data, fsdp, expert.
    token_axes = tuple(a for a in ep_lib.TOKEN_AXES if a in axes)
    shards = _TokenShards(math.prod(axes[a] for a in token_axes), token_axes)
  for index, block in enumerate(blocks):
    layer = block.ffn if block.is_moe else None
    if not isinstance(layer, moe_lib.MoELayer):
      continue  # dense, or Soft MoE (always pads; not expert-parallel)
    over = f"layers.{index}."
    gfield = ("moe." + over + "group_size"
              if _lookup(moe, over + "group_size") is not None
              else "moe.group_size")
    pfield = ("moe." + over + "pad_groups"
              if _lookup(moe, over + "pad_groups") is not None
              else "moe.pad_groups")
    if gfield in p.fields:
      continue
    size = layer.group_size
    unpadded, uneven = [], []
    for kind, bfield, b, length, unit in batches:
      tokens = b * length
      s = size or length
      g, pad = routing_lib.num_groups_and_padding(tokens, s)
      what = (f"the {kind} batch's {tokens} tokens ({bfield} {b} x {unit} "
              f"{length})")
      if pad and not layer.pad_groups:
        unpadded.append(f"{what} leave {tokens % s} over")
        continue
      if shards is not None and shards.num_token_shards > 1:
        try:
          ep_lib.check_groups(g, shards)
        except ValueError:
          uneven.append(f"{what} make {g} groups")
    if not (unpadded or uneven):
      continue
    if size is None and any(f in p.fields for _, f, _, _, _ in batches):
      continue  # groups of one sequence: the batch size's line says it
    tokens = sorted({b * length for _, _, b, length, _ in batches},
                    reverse=True)
    d = 1 if shards is None else shards.num_token_shards
    common = math.gcd(*tokens)
    # A divisor of gcd(tokens) / d splits every batch into a multiple of d
    # whole groups.
    hint = f"a divisor of {common // d}" if common % d == 0 else None
    if unpadded:
      why = (f"{pfield}=False, so every batch must split into whole groups "
             f"of {size}, but " + "; ".join(unpadded))
      allowed = f"{pfield}=True"
      if hint:
        allowed = (f"{hint} (it divides {' and '.join(map(str, tokens))} "
                   f"tokens" + (f" into a multiple of {d} groups" if d > 1
                                else "") + f"), or {allowed}")
    else:
      why = (f"expert_parallel={mode!r} splits the token groups over the "
             f"{d} devices of the token axes {list(shards.token_axes)}, but "
             + "; ".join(uneven))
      allowed = (f"a group size that makes a multiple of {d} groups of "
                 f"every batch" + (f", e.g. {hint}" if hint else ""))
    p.line(gfield, f"config.{gfield}={size!r}: {why}; allowed: {allowed}")


# ------------------------------------------------------------- entry points


def validate_config(config, *, num_devices=None, process_count=None):
  """Checks every field train_and_evaluate reads, before anything compiles.

  The loop's fields are checked directly; the model and its MoE layers by
  building the model with nnx.eval_shape (shapes only: fast, no arrays, no
  compilation), whose constructor errors become config lines.

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
  _check_model(config, p)
  _check_data(config, p)
  _check_init_from(config, p)
  model = None
  if not _check_flat_form(config, p):
    model = build_abstract_model(config, p)
  # A wrapped MoE layer (LoRA experts over it) reports what it reports.
  moe_layers = [] if model is None else [
      build_lib.wrapped_base(blk.ffn) for blk in getattr(model, "blocks", ())
      if blk.is_moe]
  _check_aux_weights(config, p, moe_layers)
  _check_reported(config, p, moe_layers + [
      blk for blk in getattr(model, "blocks", ()) if hasattr(blk, "loss_names")])
  if num_devices is None:
    num_devices = jax.device_count()
  if process_count is None:
    process_count = jax.process_count()
  axes = _check_mesh(config, p, num_devices, process_count)
  _check_expert_parallel(config, p, axes, moe_layers)
  _check_groups(config, p, axes, model)
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
  return field not in RESUME_FREE and any(
      field == f or field.startswith(f + ".") for f in RESUME_LOCKED)


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
    absent = RESUME_DEFAULTS.get(field, "<absent>")
    va, vb = a.get(field, absent), b.get(field, absent)
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
  saved_moe = (saved or {}).get("moe")
  if isinstance(saved_moe, dict):
    try:
      build_lib.check_flat_form(saved_moe)
    except build_lib.MoEConfigError:
      raise ResumeConfigError(
          f"refusing to resume from {where}: it was written by moejax before "
          f"MoE layers were composed of router, engine and experts objects "
          f"(its config.moe has the old flat form, moe.router="
          f"{saved_moe.get('router')!r}), and its parameters sit at the old "
          f"paths (blocks/<i>/ffn/w_router_ME, now blocks/<i>/ffn/router/"
          f"w_router_ME). The checkpoint is left as it is: resume it with a "
          f"moejax checkout from before the change (git commit 74e7736), or "
          f"start a new --workdir.", diffs) from None
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
