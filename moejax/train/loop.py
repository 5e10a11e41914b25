"""The training loop: `train_and_evaluate(config, workdir)`.

train_and_evaluate runs a moejax.train.trainer.Trainer (setup, restore,
train, evaluate, checkpoint, summary); this module holds what it is built
from: the config -> model/data/task builders, the PreemptionGuard, the
workdir checks and the metric helpers.

Reads an ml_collections ConfigDict (see experiments/configs/ for the fields)
passed in explicitly; no flags here. What one run writes into `workdir`:

    config.json          the full config
    checkpoints/<step>/  orbax checkpoints (state, data position, meta)
    metrics.jsonl        one JSON object per logged step (train) and per eval
    tensorboard/         TensorBoard event files (the same metrics)
    summary.json         the final numbers (also printed)

Starting again with the same workdir resumes from the newest checkpoint:
parameters, optimizer state, model RNG streams, step and the data iterator's
position are restored, so the run continues as if never stopped. What
happens on faults (SIGKILL, SIGTERM, corrupt checkpoints, full disks, NaNs,
invalid or changed configs) is in docs/reliability.md.
"""

import contextlib
import json
import os
import signal
import threading

from absl import logging

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from moejax import data as data_lib
from moejax import models
from moejax.data import tokenizer as tokenizer_lib
from moejax.train import checkpoint as ckpt_lib
from moejax.train import init_from as init_from_lib
from moejax.train import step as step_lib
from moejax.train import validation
from moejax.train import workdir as workdir_lib
from moejax.train import writers as writers_lib
from moejax.train.errors import ConfigError
from moejax.train.errors import DatasetError
from moejax.train.errors import TrainingError
from moejax.train.errors import WorkdirLockedError
from moejax.train.errors import WorkdirWriteError

# config.model.name -> constructor. 'pretrained' builds the architecture of
# a checkpoint directory's config.json (config.model.path); its weights come
# from config.init_from (moejax/train/init_from.py).
MODELS = {"decoder_lm": models.DecoderLM, "vit": models.ViTClassifier,
          "pretrained": models.hf.architecture}
TASKS = validation.TASKS
# Metrics checked every logged step (every step with nan_policy 'skip'); a
# non-finite value stops the run or skips the update.
FINITE_METRICS = ("loss", "grad_norm")


# ------------------------------------------------------------- builders


def _config_dict(value):
  return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def _drop_none(tree):
  """A nested dict without its None leaves, and without dicts left empty."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      value = _drop_none(value)
      if not value:
        continue
    if value is not None:
      out[key] = value
  return out


def moe_kwarg(config):
  """config.moe as the model's `moe=` argument (the nested build_moe
  config): None leaves (unset placeholders) are dropped, so they mean the
  layer's defaults. None when the config has no moe."""
  if "moe" not in config or config.moe is None:
    return None
  return _drop_none(_config_dict(config.moe))


def pretrained_path(config):
  """The checkpoint a 'pretrained' model is built from: model.path, else
  init_from.path."""
  return config.model.get("path") or (config.get("init_from") or {}).get(
      "path")


def data_tokenizer(config):
  """data.tokenizer, else a 'pretrained' model's checkpoint (its
  tokenizer.json), else None (bytes)."""
  if config.data.get("tokenizer"):
    return config.data.tokenizer
  if config.model.get("name") == "pretrained":
    return pretrained_path(config)
  return None


def model_kwargs(config, *, drop=()):
  """config.model (minus 'name' and the fields in `drop`, which are left to
  the constructor's defaults) as constructor kwargs; dtype names become jnp
  dtypes and config.moe becomes the `moe` kwarg (moe_kwarg)."""
  kwargs = {k: v for k, v in _config_dict(config.model).items()
            if k != "name" and k not in drop and v is not None}
  if config.model.get("name") == "pretrained" and "path" not in kwargs:
    kwargs["path"] = pretrained_path(config)
  for key in ("dtype", "param_dtype"):
    if key in kwargs:
      try:
        kwargs[key] = jnp.dtype(kwargs[key])
      except TypeError:
        raise ValueError(f"config.model.{key}={kwargs[key]!r} is not a dtype "
                         f"name (e.g. 'float32', 'bfloat16')") from None
  moe = moe_kwarg(config)
  if moe is not None:
    kwargs["moe"] = moe
  return kwargs


def model_factory(config):
  """() -> the model of config.model.name, seeded with config.seed (keys of
  config.prng_impl)."""
  name = config.model.name
  if name not in MODELS:
    raise ValueError(f"config.model.name={name!r}; allowed: {sorted(MODELS)}")
  cls = MODELS[name]
  kwargs = model_kwargs(config)
  seed = int(config.seed)
  impl = config.get("prng_impl") or None

  trainable = config.get("trainable") or "all"

  def factory():
    model = cls(**kwargs, rngs=nnx.Rngs(jax.random.key(seed, impl=impl)))
    init_from_lib.apply_trainable(model, trainable)
    return model
  return factory


def make_task(config, model):
  if config.task == "lm":
    return step_lib.LMTask()
  if config.task == "classification":
    return step_lib.ClassificationTask(
        tokens_per_example=int(getattr(model, "num_tokens", 1)))
  raise ValueError(f"config.task={config.task!r}; allowed: {list(TASKS)}")


def make_datasets(config):
  """(train IterDataset, eval IterDataset or None) for config.task."""
  d = config.data
  common = dict(dataset=d.dataset, data_dir=d.get("data_dir"),
                seed=int(config.seed))
  eval_bs = config.get("eval_batch_size") or config.batch_size
  if config.task == "lm":
    lm = dict(seq_len=d.seq_len, max_files=d.get("max_files"), **common)
    if d.get("source_dir"):
      lm["source_dir"] = d.source_dir
    if data_tokenizer(config):
      lm["tokenizer"] = tokenizer_lib.load_tokenizer(data_tokenizer(config))
    if d.get("validation_fraction") is not None:
      lm["validation_fraction"] = d.validation_fraction
    train = data_lib.make_lm_dataset(
        global_batch_size=config.batch_size, split=d.train_split,
        shuffle_buffer_size=d.get("shuffle_buffer_size", 1024), **lm)
    evals = (data_lib.make_lm_dataset(
        global_batch_size=eval_bs, split=d.eval_split, shuffle=False, **lm)
             if d.get("eval_split") else None)
  elif config.task == "classification":
    train = data_lib.make_image_dataset(
        global_batch_size=config.batch_size, split=d.train_split, **common)
    evals = (data_lib.make_image_dataset(
        global_batch_size=eval_bs, split=d.eval_split, shuffle=False,
        num_epochs=1, **common) if d.get("eval_split") else None)
  else:
    raise ValueError(f"config.task={config.task!r}; allowed: {list(TASKS)}")
  return train, evals


def validate_config(config, *, num_devices=None):
  """Checks every field before anything is built or compiled.

  Args:
    config: the run's ConfigDict.
    num_devices: the devices the mesh must cover; default: the devices the
      run will have (config.num_cpu_devices on CPU when set, which
      experiments/train.py asks JAX for, else jax.device_count()).
  Raises:
    ConfigError (a ValueError): one line per invalid field, naming the
      field, its value and what is allowed (moejax.train.validation).
  """
  if num_devices is None:
    num_devices = jax.device_count()
    if config.get("num_cpu_devices") and jax.default_backend() == "cpu":
      num_devices = int(config.num_cpu_devices)
  validation.validate_config(config, num_devices=num_devices)


def make_datasets_checked(config):
  """make_datasets, with the data's own refusals (seq_len longer than the
  split, an unknown dataset or split) as ConfigError. Builds no JAX code."""
  try:
    return make_datasets(config)
  except data_lib.DatasetFileError as e:  # a damaged file: not the config
    raise DatasetError(f"{e.problem}. Nothing was started. To rebuild it, "
                       f"run: {e.rebuild}") from e
  except ValueError as e:
    field = "data.seq_len" if "seq_len" in str(e) else "data"
    value = config.data.get("seq_len") if field == "data.seq_len" else (
        config.data.get("dataset"))
    raise ConfigError([f"config.{field}={value!r}: {e}"]) from e


class _DataPosition:
  """A data iterator's position, read before a `next()` that then failed.

  What Checkpointer.save reads from an iterator (`get_state()`; grain's
  handler takes JSON bytes from an object that is not a dataset iterator),
  without asking the failed iterator: its state may be half advanced.
  """

  def __init__(self, state):
    self._state = state

  def get_state(self):
    return json.dumps(self._state, indent=4).encode()


def _data_read_error(config, what, error, step, outcome):
  """The DatasetError for a failed read of the `what` ('training' or
  'evaluation') data: the read error, the damaged file (the dataset's files
  are checked against their manifest now), `outcome` (what became of the
  step reached) and what to do."""
  d = config.data
  when = f"after step {step}" if what == "training" else f"at step {step}"
  text = (f"reading the {what} data failed {when}: "
          f"{ckpt_lib.describe_error(error).rstrip('.')}; ")
  selection = dict(max_files=d.get("max_files"),
                   validation_fraction=d.get("validation_fraction")) if (
                       config.task == "lm") else {}
  problem = None
  try:
    problem = data_lib.check_dataset_files(
        d.dataset, data_dir=d.get("data_dir"), **selection)
  except ValueError:  # not built by moejax: no manifest to compare with
    text += (f"dataset {d.dataset!r} is not built by moejax, so no "
             f"checksums tell which of its files is damaged; ")
  except Exception as e:  # pylint: disable=broad-except
    text += f"its files could not be checked ({ckpt_lib.describe_error(e)}); "
  else:
    text += (f"{problem.problem}; " if problem else
             f"every file of dataset {d.dataset!r} still matches its "
             f"manifest, so no file was changed (check the disk and the file "
             f"system); ")
  text += f"{outcome}."
  if problem is not None:
    text += (f" After the rebuild, run the same command to resume. To "
             f"rebuild it, run: {problem.rebuild}")
  else:
    text += " Run the same command to resume once the data reads again."
  return DatasetError(text, step)


class PreemptionGuard:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a checkpoint at a step every
  process agrees on.

  One process: while active, SIGTERM or SIGINT sets `requested` instead of
  ending the process; the loop checks it between steps, saves and raises
  TrainingPreempted with that signal (exit status 143 or 130). A further
  SIGTERM is ignored (the save is under way). A further SIGINT, Ctrl-C
  pressed again, goes to the SIGINT handler that was there before the
  guard: Python's raises KeyboardInterrupt, experiments/train.py's ends the
  process at once with one line. A SIGINT that was ignored when the guard
  started (a background job of a shell) stays ignored. Only the main thread
  can install signal handlers; elsewhere this is a no-op.

  Several processes (jax.distributed): a save is a collective, so a process
  that stopped on its own signal would wait forever for the others. There
  JAX's preemption service (started by jax.distributed.initialize) takes
  the SIGTERM of any process, tells all of them, and
  multihost_utils.reached_preemption_sync_point(step) turns True at the
  same step everywhere; `poll(step)`, called after every step, asks it.
  No Python SIGTERM handler is installed then: it would replace JAX's. A
  SIGINT is handed to that service as a SIGTERM of this process, so a
  Ctrl-C (which a terminal sends to every process it started) stops all
  of them at one agreed step too; each reports the signal it received.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), *,
               multi_process=None):
    self.signals = signals
    self.multi_process = (jax.process_count() > 1 if multi_process is None
                          else multi_process)
    self.requested = None  # the signal number once one arrived (or agreed)
    self.received = None  # the first signal this process received itself
    self._previous = {}

  def _handle(self, signum, frame):
    if self.received is None:
      self.received = signum
      if self.multi_process:  # tell every process: JAX's SIGTERM handler
        os.kill(os.getpid(), signal.SIGTERM)
      else:
        self.requested = signum
    elif signum == signal.SIGINT:  # Ctrl-C again: stop at once
      previous = self._previous.get(signum)
      self.__exit__()
      if callable(previous):
        previous(signum, frame)
      raise KeyboardInterrupt

  def poll(self, step):
    """After step `step` (every step, in order, on every process): whether
    the run must stop and save here; sets `requested` if so."""
    if self.multi_process and self.requested is None:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.requested = self.received or signal.SIGTERM
      except RuntimeError as e:  # the preemption service is off
        logging.warning("%s; SIGTERM will end this run without a checkpoint "
                        "(jax_enable_preemption_service)", e)
        self.multi_process = False  # warn once; poll() is a no-op from now
    return self.requested is not None

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    for sig in self.signals:
      if self.multi_process and (sig != signal.SIGINT or
                                 not _preemption_service_on()):
        continue  # JAX's preemption service handles SIGTERM; see poll()
      previous = signal.getsignal(sig)
      if sig == signal.SIGINT and previous in (signal.SIG_IGN, None):
        continue  # ignored on purpose (or not Python's to restore)
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
    return False


def _preemption_service_on():
  """Whether JAX's preemption service (whose SIGTERM handler tells every
  process) runs: jax.distributed starts it in a multi-process run when
  jax_enable_preemption_service is on (public config, no private import).
  If it is off after all, poll() warns once and stops polling."""
  return jax.process_count() > 1 and bool(getattr(
      jax.config, "jax_enable_preemption_service", False))


def _unwritable(workdir, error):
  """The WorkdirWriteError of a workdir that cannot be written at start."""
  return WorkdirWriteError(
      f"cannot write to the workdir {workdir}: "
      f"{ckpt_lib.describe_error(error)}. Nothing was started. Make it "
      f"writable or free space (or choose another --workdir), then run "
      f"again.")


def _check_workdir(workdir):
  """Creates workdir; WorkdirWriteError if it cannot be written. The probe
  file is removed whether its write worked or not (a full disk creates the
  file, then fails to write it)."""
  probe = os.path.join(workdir, f".write_test.{os.getpid()}")
  try:
    os.makedirs(workdir, exist_ok=True)
    try:
      with open(probe, "w") as f:
        f.write("ok")
    finally:
      try:
        os.remove(probe)
      except OSError:
        pass  # never created (a read-only workdir): the write's error says
  except OSError as e:
    raise _unwritable(workdir, e) from e


def _claim_workdir(workdir, held, on_takeover):
  """Process 0 checks that `workdir` can be written and takes its lock
  (moejax.train.workdir: one run per workdir), which `held` (an ExitStack)
  keeps until the run ends. The processes of one multi-process run share
  its workdir, so only process 0 locks it, and every process raises when
  process 0 could not (none goes on alone, to wait in a collective).

  Raises:
    WorkdirWriteError: the workdir cannot be written; nothing was started.
    WorkdirLockedError: another run holds the workdir; nothing was started.
  """
  error = None
  if jax.process_index() == 0:
    try:
      _check_workdir(workdir)
      held.enter_context(workdir_lib.WorkdirLock(workdir).acquire(
          on_takeover=on_takeover))
    except TrainingError as e:
      error = e
    except OSError as e:  # the lock file could not be created or written
      error = _unwritable(workdir, e)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    code = (0 if error is None else
            1 if isinstance(error, WorkdirLockedError) else 2)
    code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
    if error is None and code == 1:
      error = WorkdirLockedError(
          f"the workdir {workdir} is in use by another run (process 0 found "
          f"it locked; see its message). Wait until that run ends or stop "
          f"it, or choose another --workdir.")
    elif error is None and code == 2:
      error = WorkdirWriteError(
          f"cannot write to the workdir {workdir} (process 0 could not; see "
          f"its message). Nothing was started.")
  if error is not None:
    raise error


def _workdir_error(workdir, error, ckpt):
  return WorkdirWriteError(
      f"could not write to the workdir {workdir}: "
      f"{ckpt_lib.describe_error(error)}. {ckpt.newest().capitalize()}. "
      f"Make the workdir writable or free space, then run the same command "
      f"to resume.")


def _close_outputs(ckpt, writer, workdir, quiet):
  """Closes the checkpointer (waiting for its saves) and the metric
  writers. quiet: another error is on its way; log these instead."""
  try:
    ckpt.close(quiet=quiet)
  finally:
    if writer is not None:
      try:
        writer.close()
      except OSError as e:
        if not quiet:
          raise _workdir_error(workdir, e, ckpt) from e
        logging.warning("closing the metric writers: %s",
                        ckpt_lib.describe_error(e))


def _check_resume_config(config, ckpt_dir):
  """ResumeConfigError if the newest checkpoint whose meta verifies (its
  checksum and its step; a corrupt newer step is skipped here and reported
  by restore_latest) was written with a config that defines a different
  model or data (validation.RESUME_LOCKED). Reads files only."""
  saved, step = ckpt_lib.read_saved_config(ckpt_dir)
  if saved is not None:
    validation.check_resume_config(saved, config,
                                   os.path.join(ckpt_dir, str(step)))


# ------------------------------------------------------------- metrics


def _eval_record(workdir, step):
  """The eval metrics ({'eval/...': value}) metrics.jsonl holds for `step`,
  or {} when it holds none."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  found = {}
  for record in writers_lib.read_jsonl(path):
    if record.get("step") == step and any(k.startswith("eval/")
                                          for k in record):
      found = {k: v for k, v in record.items() if k.startswith("eval/")}
  return found


def _flatten_metrics(metrics, moe_layer_ids, prefix):
  """Host metrics -> {name: float or list}; per-layer arrays get one entry
  per MoE layer, named by the layer's block index."""
  out = {}
  for name, value in metrics.items():
    value = np.asarray(value)
    if name.startswith("moe/"):
      metric = name[len("moe/"):]
      for i, layer in enumerate(moe_layer_ids):
        v = value[i]
        out[f"{prefix}moe/layer{layer}/{metric}"] = (
            [float(x) for x in v] if v.ndim else float(v))
    else:
      out[prefix + name] = float(value)
  return out


def _mean_or_none(values):
  return float(np.mean(values)) if values else None


def _layer_table(window, moe_layer_ids, prefix="train/"):
  """Per-layer rows averaged over `window` (a list of flat metric dicts)."""
  rows = []
  for layer in moe_layer_ids:
    base = f"{prefix}moe/layer{layer}/"
    loads = np.mean([m[base + "expert_load"] for m in window], axis=0)
    rows.append(dict(
        layer=int(layer), expert_load=[float(x) for x in loads],
        dropped_fraction=float(np.mean(
            [m[base + "dropped_fraction"] for m in window])),
        router_entropy=float(np.mean(
            [m[base + "router_entropy"] for m in window])),
        max_over_mean_load=float(np.mean(
            [m[base + "max_over_mean_load"] for m in window])),
        mean_k=_mean_or_none([m[base + "mean_k"] for m in window
                              if base + "mean_k" in m])))
  return rows


def format_summary(summary, baseline=None):
  """The end-of-run text: losses, perplexity/accuracy, the MoE table."""
  lines = [f"=== summary ({summary['workdir']}) ==="]
  compile_s = summary.get("compile_time_s")
  lines.append(f"steps {summary['step']}  tokens {summary['tokens_seen']:,}  "
               f"train time {summary['train_time_s']:.1f}s"
               + (f" + {compile_s:.1f}s compile" if compile_s else "")
               + f"  ({summary['tokens_per_sec']:.0f} tokens/s after "
               f"compile; all invocations of the run)")

  def numbers(s):
    parts = [f"train loss {s.get('train_ce_loss', float('nan')):.4f}"]
    if "eval_ce_loss" in s:
      parts.append(f"validation loss {s['eval_ce_loss']:.4f}")
    if "eval_perplexity" in s:
      parts.append(f"perplexity {s['eval_perplexity']:.3f}")
    if s.get("task") == "classification" and "eval_accuracy" in s:
      parts.append(f"accuracy {s['eval_accuracy']:.2%}")
    return "  ".join(parts)

  lines.append(numbers(summary))
  if baseline:
    lines.append(f"baseline ({baseline.get('workdir', '?')}, "
                 f"{baseline.get('step')} steps): {numbers(baseline)}")
  if summary.get("moe_layers"):
    lines.append("MoE layers (train, mean of the last "
                 f"{summary['window']} steps):")
    lines.append("  layer  dropped  entropy  max/mean  expert load (%)")
    for row in summary["moe_layers"]:
      load = " ".join(f"{100 * x:4.1f}" for x in row["expert_load"])
      lines.append(f"  {row['layer']:>5}  {row['dropped_fraction']:7.2%}  "
                   f"{row['router_entropy']:7.3f}  "
                   f"{row['max_over_mean_load']:8.2f}  {load}")
  return "\n".join(lines)


# ------------------------------------------------------------- the loop


def train_and_evaluate(config, workdir, *, stream=None, on_log=None):
  """Trains config's model on config's data, evaluating and checkpointing;
  resumes from workdir's newest checkpoint if there is one.

  Args:
    config: ml_collections.ConfigDict (see experiments/configs/lm_stdlib.py).
    workdir: output directory (created if needed).
    stream: where the progress bar and summary go (default sys.stdout).
    on_log: optional callable(step, flat train metrics), called after each
      logged step's metrics are written (e.g. to sample host memory:
      experiments/memory_growth.py).
  Returns:
    The summary dict (also written to workdir/summary.json).
  Raises (all moejax.train.errors.TrainingError, with messages for the user;
  docs/reliability.md shows each):
    ConfigError: invalid config, or (ResumeConfigError) a resume that would
      change the model or its data; raised before anything is compiled.
    TrainingDivergedError: loss or gradient norm not finite (nan_policy
      'stop'), or too many skipped steps in a row ('skip'); names the step.
      Checkpoints saved before that step stay intact.
    TrainingPreempted: SIGTERM, or SIGINT (Ctrl-C; `signum` says which); a
      checkpoint of the current step was written first.
    WorkdirWriteError: the workdir could not be written (not writable, disk
      full); CheckpointSaveError (a subclass) when a checkpoint could not.
    WorkdirLockedError: another run holds the workdir (one run per workdir:
      its lock is held until this function returns or raises).
    CheckpointRestoreError: checkpoints exist but none loads.
  """
  from moejax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  with contextlib.ExitStack() as held:  # the workdir's lock, for the run
    return trainer_lib.Trainer(config, workdir, stream=stream, on_log=on_log,
                               held=held).run()
