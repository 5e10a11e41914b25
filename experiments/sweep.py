r"""Runs a grid of experiments/train.py runs: one command, resumable.

  python -m experiments.sweep --config=experiments/configs/router_study.py \
      --sweep_dir=workdirs/router_study [--parallel=2] \
      [--sweep.seed=0,1,2] [--config.num_train_steps=500] [--nofile_grid]

The grid is the config file's `sweep()` points (unless --nofile_grid) crossed
with every `--sweep.<field>=v1,v2,...` flag (their cartesian product). A point
is a dict of config-field overrides plus an optional `config_arg`, which is
appended to the arg of --config (`path:arg`); later keys win, so
`--config=lm_stdlib.py:size=smoke` runs the file's grid at the smoke size.
`--config.<field>=value` sets a field in every run. The values of
`--sweep.config_arg` are separated by ';' (config args contain commas).

Each run gets its own workdir under --sweep_dir, named after its overrides
(e.g. `top1,moe.capacity_factor=1.25`), and its own train.log. Runs go one
at a time, or --parallel=N at a time as separate processes. A run whose
summary.json reports num_train_steps steps is finished and is skipped; any
other run is started with the same command, and experiments/train.py resumes
it from its newest checkpoint. So an interrupted sweep (Ctrl-C, SIGTERM: the
running trainings get SIGTERM too) continues where it stopped when the same
command is given again.

Before anything runs every point is checked: its fields must exist (the
config is locked), a value must have the field's type
(`--sweep.moe.router.k=1,2.5` fails: k is an int), a value list must not be
empty, and the run's config must pass moejax.train.validate_config, which
builds its model (shapes only).

At the end, and again whenever a run finishes, the sweep writes:

  <sweep_dir>/sweep.json   the points, their workdirs and commands
  <sweep_dir>/results.csv  one row per run: the overrides, then the final
                           metrics from each run's summary.json
  <sweep_dir>/results.md   the same as a markdown table

`--launcher=slurm` submits the unfinished runs as one submitit job array
instead, with the same skip, resume and results (experiments/sweep_slurm.py).

`--collect_only` only rewrites the results; `--dry_run` prints the commands.
experiments/report.py draws the figures. See docs/training.md.
"""

import csv
import dataclasses
import difflib
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEP_PREFIX = "--sweep."
CONFIG_PREFIX = "--config."
CONFIG_ARG = "config_arg"
CONFIG_ARG_SEP = ";"
# summary.json numbers copied into the results, in this order.
SUMMARY_COLUMNS = (
    "step", "eval_ce_loss", "eval_perplexity", "eval_accuracy",
    "train_ce_loss", "dropped_fraction", "max_over_mean_load",
    "router_entropy", "mean_k", "tokens_per_sec", "train_time_s",
    "params_total", "params_active", "flops_per_token")
# Per-MoE-layer summary numbers; the results hold their mean over layers.
LAYER_COLUMNS = ("dropped_fraction", "max_over_mean_load", "router_entropy",
                 "mean_k")


class GridError(ValueError):
  """A sweep grid that cannot run: unknown field, bad value, empty list."""


@dataclasses.dataclass
class Run:
  name: str            # the workdir's base name
  point: dict          # {field: typed value} plus optional 'config_arg'
  config_arg: str      # the full get_config arg (the --config one + point's)
  workdir: str
  argv: list           # experiments/train.py flags
  total_steps: int
  config: dict = None  # the run's full config (as config.json stores it)


# ------------------------------------------------------------- config files


def load_config_module(path):
  """Imports a config file (a .py with get_config and optionally sweep)."""
  if not os.path.exists(path):
    raise GridError(f"config file {path!r} does not exist")
  name = "sweep_config_" + re.sub(r"\W", "_", os.path.basename(path))
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise GridError(f"{path} has no get_config(arg)")
  return module


def split_config_flag(value):
  """'path:arg' -> (path, arg); 'path' -> (path, '')."""
  path, _, arg = value.partition(":")
  return path, arg


def join_args(*args):
  """Comma-joins the non-empty get_config args ('size=smoke', 'top1')."""
  return ",".join(a for a in args if a)


def _fields(config, prefix=""):
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out += _fields(value, prefix + key + ".")
  return out


def _parent_and_leaf(config, key):
  *parents, leaf = key.split(".")
  target = config
  for i, part in enumerate(parents):
    if part not in target or not isinstance(target[part],
                                            ml_collections.ConfigDict):
      raise KeyError(".".join(parents[:i + 1]))
    target = target[part]
  if leaf not in target:
    raise KeyError(key)
  return target, leaf


def field_type(config, key):
  """The type of config field `key` (dotted); GridError if it is unknown."""
  try:
    parent, leaf = _parent_and_leaf(config, key)
  except KeyError:
    fields = _fields(config)
    close = difflib.get_close_matches(key, fields, n=3)
    hint = f"; did you mean {close}?" if close else ""
    raise GridError(f"unknown config field {key!r}{hint}") from None
  if isinstance(parent[leaf], ml_collections.ConfigDict):
    raise GridError(f"config field {key!r} is a ConfigDict; sweep its "
                    f"fields ({key}.<name>) instead")
  return parent.get_type(leaf)


_TRUE = ("true", "1", "yes", "t", "y")
_FALSE = ("false", "0", "no", "f", "n")


def coerce(key, value, typ):
  """value (a python value or a flag string) as a field of type `typ`.

  Raises GridError naming the field, the value and the type.
  """
  def bad():
    return GridError(f"{key}={value!r}: expected a value of type "
                     f"{typ.__name__}")
  if value is None:
    raise GridError(f"{key}=None: None cannot be passed as a train.py flag")
  if typ is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
      return value.lower() in _TRUE
    raise bad()
  if typ is int:
    if isinstance(value, bool):
      raise bad()
    if isinstance(value, int):
      return value
    if isinstance(value, str):
      try:
        return int(value)
      except ValueError:
        raise bad() from None
    raise bad()
  if typ is float:
    if isinstance(value, bool):
      raise bad()
    if isinstance(value, (int, float)):
      return float(value)
    if isinstance(value, str):
      try:
        return float(value)
      except ValueError:
        raise bad() from None
    raise bad()
  if typ is str:
    if isinstance(value, str):
      return value
    raise bad()
  raise GridError(f"{key}: sweeping a field of type {typ.__name__} is not "
                  f"supported (only bool, int, float and str)")


def flag_value(value):
  """A typed value as experiments/train.py (config_flags) parses it."""
  if isinstance(value, bool):
    return "true" if value else "false"
  return repr(value) if isinstance(value, float) else str(value)


def apply_overrides(config, overrides):
  """Sets typed overrides on a (locked) config, in place."""
  for key, value in overrides.items():
    parent, leaf = _parent_and_leaf(config, key)
    parent[leaf] = value


# ------------------------------------------------------------- the grid


def parse_argv(argv):
  """Takes --sweep.<field>=... and --config.<field>=... out of argv.

  Returns (the other args, {field: [value strings]}, {field: value string});
  absl parses the other args. Raises GridError for a malformed one.
  """
  rest, axes, fixed = [], {}, {}
  for arg in argv:
    prefix = next((p for p in (SWEEP_PREFIX, CONFIG_PREFIX)
                   if arg.startswith(p)), None)
    if prefix is None:
      rest.append(arg)
      continue
    key, eq, value = arg[len(prefix):].partition("=")
    out = axes if prefix == SWEEP_PREFIX else fixed
    if not eq or not key:
      raise GridError(f"{arg!r}: write {prefix}<field>=<value>"
                      + ("s (comma-separated)" if out is axes else ""))
    if key in out:
      raise GridError(f"{prefix}{key} is given twice")
    if out is fixed:
      fixed[key] = value
      continue
    sep = CONFIG_ARG_SEP if key == CONFIG_ARG else ","
    values = [v.strip() for v in value.split(sep)] if value.strip() else []
    if key != CONFIG_ARG and any(not v for v in values):
      raise GridError(f"{arg!r} has an empty value")
    axes[key] = values
  return rest, axes, fixed


def expand_points(file_points, axes):
  """file_points (or [{}]) x the cartesian product of the flag axes."""
  for key, values in axes.items():
    if not values:
      raise GridError(f"--sweep.{key} has an empty value list")
  base = list(file_points) if file_points is not None else [{}]
  if not base:
    raise GridError("the config file's sweep() returned no points")
  points = []
  keys = list(axes)
  for point in base:
    if not isinstance(point, dict):
      raise GridError(f"a sweep() point must be a dict, got {point!r}")
    clash = sorted(set(point) & set(keys))
    if clash:
      raise GridError(f"--sweep.{clash[0]} also appears in the config file's "
                      f"sweep() point {point}; pass --nofile_grid to sweep "
                      f"only the flags")
    for combo in itertools.product(*(axes[k] for k in keys)):
      points.append({**point, **dict(zip(keys, combo))})
  return points


def _slug(text):
  return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)


def run_name(point):
  """The workdir name: config_arg (commas as '+'), then field=value parts.

  {'config_arg': 'dense,router=top1', 'moe.experts.num_experts': 16} ->
  'dense+router=top1,moe.experts.num_experts=16'; {} -> 'default'.
  """
  parts = []
  if point.get(CONFIG_ARG):
    parts.append(_slug(point[CONFIG_ARG].replace(",", "+")))
  parts += [_slug(f"{k}={flag_value(v)}") for k, v in point.items()
            if k != CONFIG_ARG]
  name = ",".join(parts) or "default"
  if len(name) > 150:
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    name = name[:139] + "-" + digest
  return name


def build_config(module, config_arg, overrides):
  """get_config(config_arg), locked, with the typed overrides set."""
  try:
    config = module.get_config(config_arg or None)
  except ValueError as e:
    raise GridError(f"get_config({config_arg!r}): {e}") from None
  config.lock()
  apply_overrides(config, overrides)
  return config


_DEVICE_PROBE = "import jax; print(jax.device_count(), jax.default_backend())"


def probe_devices():
  """(device count, backend name) that a training started by this sweep sees.

  Asked of a short-lived subprocess with the trainings' environment, so
  that the sweep process itself never opens the accelerator: on a TPU that
  would hold the chip for the whole sweep and no training could start; on a
  GPU it would take most of the memory the trainings need.
  """
  proc = subprocess.run([sys.executable, "-c", _DEVICE_PROBE], env=_env(),
                        capture_output=True, text=True, timeout=600)
  words = proc.stdout.split()
  if proc.returncode or len(words) < 2:
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise GridError(f"could not count the devices a run would see: {tail}")
  return int(words[-2]), words[-1]


def _run_devices(config, devices):
  """The devices a run's mesh must cover: config.num_cpu_devices on CPU when
  set (experiments/train.py asks JAX for that many), else the count."""
  count, backend = devices
  if backend == "cpu" and config.get("num_cpu_devices"):
    return int(config.num_cpu_devices)
  return count


def make_runs(config_flag, sweep_dir, *, file_grid=True, axes=None,
              fixed=None, check=True, check_models=True, devices=None):
  """The runs of a sweep, every point checked before anything runs.

  Args:
    config_flag: 'path[:arg]'.
    sweep_dir: the runs' parent directory.
    file_grid: use the file's sweep() (if it has one).
    axes: {field: [values]} from --sweep.* (strings or typed values).
    fixed: {field: value} from --config.*, set in every run.
    check: run moejax.train.validate_config on each run's config.
    check_models: also build each distinct model with nnx.eval_shape.
    devices: (count, backend) the trainings will see (probe_devices());
      None: this process's JAX devices.
  Returns:
    A list of Run.
  Raises:
    GridError: an unknown field, an empty list, a wrongly typed value, a
      config that get_config or validate_config rejects, duplicate points.
  """
  path, base_arg = split_config_flag(config_flag)
  module = load_config_module(path)
  axes = dict(axes or {})
  fixed = dict(fixed or {})
  file_points = None
  if file_grid and hasattr(module, "sweep"):
    file_points = module.sweep()  # else: one run, crossed with the axes
  points = expand_points(file_points, axes)
  clash = sorted(set(fixed) & {k for p in points for k in p})
  if clash:
    raise GridError(f"--config.{clash[0]} is also swept; give it once")

  runs, names, built = [], {}, set()
  for point in points:
    arg = join_args(base_arg, point.get(CONFIG_ARG, ""))
    config = build_config(module, arg, {})
    typed_point = {}
    if point.get(CONFIG_ARG):
      typed_point[CONFIG_ARG] = point[CONFIG_ARG]
    where = f"point {point}" if point else "the config"
    try:
      for key, value in point.items():
        if key == CONFIG_ARG:
          continue
        typed_point[key] = coerce(key, value, field_type(config, key))
      typed_fixed = {k: coerce(k, v, field_type(config, k))
                     for k, v in fixed.items()}
    except GridError as e:
      raise GridError(f"{where}: {e}") from None
    try:
      apply_overrides(config, {**typed_fixed, **{
          k: v for k, v in typed_point.items() if k != CONFIG_ARG}})
    except (TypeError, ValueError, AttributeError) as e:
      raise GridError(f"{where}: {e}") from None
    if check:
      from moejax.train import loop  # pylint: disable=g-import-not-at-top
      try:
        loop.validate_config(config, num_devices=(
            None if devices is None else _run_devices(config, devices)))
      except ValueError as e:
        raise GridError(f"{where}: {e}") from None
      model_key = json.dumps(
          {"model": config.model.to_dict(),
           "moe": config.moe.to_dict() if "moe" in config else None},
          sort_keys=True, default=str)
      if check_models and model_key not in built:
        built.add(model_key)
        from flax import nnx  # pylint: disable=g-import-not-at-top
        try:
          nnx.eval_shape(loop.model_factory(config))
        except (TypeError, ValueError) as e:
          raise GridError(f"{where}: the model does not build: {e}") from None
    name = run_name(typed_point)
    if name in names:
      raise GridError(f"points {names[name]} and {point} give the same run "
                      f"{name!r}")
    names[name] = point
    workdir = os.path.join(sweep_dir, name)
    run_point = dict(typed_point)
    run_point.pop(CONFIG_ARG, None)
    if arg:
      run_point[CONFIG_ARG] = arg
    argv = [f"--config={path}" + (f":{arg}" if arg else "")]
    argv += [f"--config.{k}={flag_value(v)}"
             for k, v in {**typed_fixed, **typed_point}.items()
             if k != CONFIG_ARG]
    argv.append(f"--workdir={workdir}")
    runs.append(Run(name=name, point=typed_point, config_arg=arg,
                    workdir=workdir, argv=argv,
                    total_steps=int(config.num_train_steps),
                    config=json.loads(json.dumps(config.to_dict(),
                                                 default=str))))
  return runs


# Fields whose change does not change what a run computes: a run that
# exists with other values of these is reused (more steps: it resumes).
REUSE_IGNORED = ("num_train_steps", "stop_after_steps", "log_every",
                 "checkpoint_every", "max_checkpoints_to_keep",
                 "async_checkpointing")


def changed_runs(runs):
  """[(run, [(field, old, new)])] for runs whose workdir already holds a
  config.json that differs from the run's config (outside REUSE_IGNORED).

  Skipping such a finished run, or resuming an unfinished one, would mix
  results of two different configs in one table.
  """
  from moejax.train import validation  # pylint: disable=g-import-not-at-top
  out = []
  for run in runs:
    path = os.path.join(run.workdir, "config.json")
    if run.config is None or not os.path.exists(path):
      continue
    try:
      with open(path) as f:
        saved = json.load(f)
    except (OSError, ValueError):
      continue  # an unreadable config.json: train.py rewrites it
    diffs = validation.config_differences(
        saved, run.config, include=lambda f: f not in REUSE_IGNORED)
    if diffs:
      out.append((run, diffs))
  return out


# ------------------------------------------------------------- running


def read_json(path):
  """The JSON in `path`, or None if it is missing or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def read_summary(workdir):
  """workdir/summary.json as a dict, or None if missing or unreadable."""
  return read_json(os.path.join(workdir, "summary.json"))


def is_finished(run):
  """Whether the run's summary reports its last step (num_train_steps)."""
  summary = read_summary(run.workdir)
  return bool(summary) and int(summary.get("step", 0)) >= run.total_steps


def train_command(run):
  """The argv that trains `run` (experiments/train.py in a subprocess)."""
  return [sys.executable, "-m", "experiments.train", *run.argv]


def _env():
  env = dict(os.environ)
  path = env.get("PYTHONPATH", "")
  if REPO not in path.split(os.pathsep):
    env["PYTHONPATH"] = REPO + (os.pathsep + path if path else "")
  return env


class SweepInterrupted(KeyboardInterrupt):
  """SIGTERM/SIGINT stopped the sweep; `status` holds each run's status at
  that point (the running ones as 'interrupted')."""

  def __init__(self, status):
    super().__init__()
    self.status = status


def run_sweep(runs, sweep_dir, *, parallel=1, keep_going=True,
              log=print, on_change=None):
  """Runs the unfinished runs, `parallel` at a time, as subprocesses.

  Each run appends its stdout and stderr to <workdir>/train.log. SIGTERM or
  SIGINT to this process sends SIGTERM to the running trainings (which save
  a checkpoint and exit), waits for them (further signals are absorbed
  meanwhile), and raises SweepInterrupted; the next sweep resumes them. On any
  other exception the running trainings are stopped the same way, so no
  training outlives the sweep.

  Returns {run name: 'finished' | 'skipped' | 'stopped' | 'failed (rc N)' |
  'not run'}; 'stopped' is a run that exited cleanly before its last step
  (config.stop_after_steps), which the next sweep continues.
  """
  del sweep_dir  # the runs carry their workdirs
  status = {}
  queue = []
  for run in runs:
    if is_finished(run):
      status[run.name] = "skipped"
      log(f"[sweep] skip {run.name}: finished ({run.total_steps} steps)")
    else:
      status[run.name] = "not run"
      queue.append(run)
  running = {}  # name -> (Popen, log file, start time, run)
  env = _env()
  stop = []

  def handler(signum, frame):
    del frame
    stop.append(signum)  # acted on between polls, never mid-bookkeeping

  old = {s: signal.signal(s, handler) for s in (signal.SIGTERM,
                                                 signal.SIGINT)}
  failed = False
  try:
    while (queue or running) and not stop:
      while (queue and len(running) < parallel and not stop and
             not (failed and not keep_going)):
        run = queue.pop(0)
        _start(run, env, running, log)
      if failed and not keep_going and not running:
        break
      time.sleep(0.2)
      for name, (proc, logf, start, run) in list(running.items()):
        rc = proc.poll()
        if rc is None:
          continue
        logf.close()
        del running[name]
        took = time.monotonic() - start
        if rc == 0 and is_finished(run):
          status[name] = "finished"
          log(f"[sweep] done {name} in {took:.0f}s")
        elif rc == 0:
          status[name] = "stopped"
          log(f"[sweep] {name} stopped before its last step after "
              f"{took:.0f}s (stop_after_steps); the same command continues "
              f"it")
        else:
          status[name] = f"failed (rc {rc})"
          failed = True
          log(f"[sweep] FAILED {name} (rc {rc}) after {took:.0f}s; see "
              f"{os.path.join(run.workdir, 'train.log')}")
        if on_change:
          on_change(status)
    if stop:
      sig = signal.Signals(stop[0]).name
      log(f"[sweep] {sig}: stopping {len(running)} running run(s); the same "
          f"command resumes them")
      for name in running:
        status[name] = "interrupted"
      raise SweepInterrupted(status)
  finally:
    if running:
      # Still under `handler`, which only records: a further signal cannot
      # cut this wait short and leave trainings running unwatched.
      _stop_all(running)
    for s, h in old.items():
      signal.signal(s, h)
  return status


def prepare_data(runs):
  """Builds each distinct dataset that the unfinished runs read, once, here.

  Runs started together (--parallel) would otherwise each find the TFDS
  dataset missing and build it into the same data_dir at the same time,
  which TFDS does not guard against. Returns the number of distinct data
  configs prepared.

  Raises:
    moejax.train.ConfigError: a run's data config is refused.
  """
  from moejax.train import loop  # pylint: disable=g-import-not-at-top
  seen = set()
  for run in runs:
    if run.config is None or is_finished(run):
      continue
    key = json.dumps([run.config.get("task"), run.config.get("data")],
                     sort_keys=True)
    if key not in seen:
      seen.add(key)
      loop.make_datasets_checked(ml_collections.ConfigDict(run.config))
  return len(seen)


def _start(run, env, running, log):
  """Starts one run's training process; adds it to `running`."""
  os.makedirs(run.workdir, exist_ok=True)
  cmd = train_command(run)
  with open(os.path.join(run.workdir, "command.txt"), "w") as f:
    f.write(shlex.join(cmd[1:]) + "\n")
  resume = os.path.isdir(os.path.join(run.workdir, "checkpoints"))
  log(f"[sweep] {'resume' if resume else 'start'} {run.name}")
  logf = open(os.path.join(run.workdir, "train.log"), "a")
  try:
    logf.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} "
               f"{shlex.join(cmd[1:])}\n")
    logf.flush()
    # Its own session: a Ctrl-C in the terminal reaches only the sweep,
    # which then stops the runs with SIGTERM (a checkpoint, then exit).
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
  except BaseException:
    logf.close()
    raise
  running[run.name] = (proc, logf, time.monotonic(), run)


def _stop_all(running, timeout=120):
  """SIGTERM to every running training; waits up to `timeout` s in all,
  then kills what is left."""
  for proc, _, _, _ in running.values():
    if proc.poll() is None:
      proc.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + timeout
  for proc, logf, _, _ in running.values():
    try:
      proc.wait(max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    logf.close()
  running.clear()


# ------------------------------------------------------------- results


def layer_mean(summary, key):
  """The mean of `key` over a summary's per-MoE-layer entries (None values
  and missing layers skipped); None when there is none."""
  layers = (summary or {}).get("moe_layers") or []
  values = [float(l[key]) for l in layers if l.get(key) is not None]
  return sum(values) / len(values) if values else None


def result_row(run, status=None):
  """One results row: run, status, the overrides, the summary numbers."""
  summary = read_summary(run.workdir) or {}
  row = {"run": run.name}
  if status is None:
    status = ("finished" if is_finished(run) else
              "unfinished" if summary else "not run")
  row["status"] = status
  for key, value in run.point.items():
    row[key] = value
  for key in SUMMARY_COLUMNS:
    if key in LAYER_COLUMNS:
      row[key] = layer_mean(summary, key)
    else:
      row[key] = summary.get(key)
  return row


def columns_of(rows):
  """run, status, then override columns in first-seen order, then metrics."""
  cols = ["run", "status"]
  for row in rows:
    for key in row:
      if key not in cols and key not in SUMMARY_COLUMNS:
        cols.append(key)
  metrics = [c for c in SUMMARY_COLUMNS if any(r.get(c) is not None
                                               for r in rows)]
  return cols + metrics


def write_csv(rows, path):
  """Writes result rows to `path` (atomically), columns as columns_of."""
  cols = columns_of(rows)
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for row in rows:
      w.writerow({c: "" if row.get(c) is None else row[c] for c in cols})
  os.replace(tmp, path)


def read_csv(path):
  """The rows of a results.csv as dicts of strings."""
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


HEADERS = {
    "eval_ce_loss": "val loss", "eval_perplexity": "val ppl",
    "eval_accuracy": "val acc", "train_ce_loss": "train loss",
    "dropped_fraction": "dropped", "max_over_mean_load": "max/mean load",
    "router_entropy": "router entropy", "mean_k": "mean k",
    "tokens_per_sec": "tokens/s",
    "train_time_s": "train s", "params_total": "params",
    "params_active": "active params", "flops_per_token": "FLOPs/token",
    CONFIG_ARG: "config arg",
}


def format_value(key, value):
  """A result value as the markdown table shows it ('' for None)."""
  if value is None or value == "":
    return ""
  try:
    x = float(value)
  except (TypeError, ValueError):
    return str(value)
  if key in ("dropped_fraction", "eval_accuracy"):
    return f"{100 * x:.1f}%"
  if key in ("tokens_per_sec", "train_time_s", "params_total",
             "params_active", "flops_per_token", "step"):
    return f"{x:,.0f}" if math.isfinite(x) else str(value)
  if key in ("eval_ce_loss", "train_ce_loss", "router_entropy"):
    return f"{x:.4f}"
  if key in SUMMARY_COLUMNS:
    return f"{x:.3f}"
  return str(value)


def markdown_table(rows, columns=None, drop=("status",)):
  """rows (dicts) as a markdown table; `columns` picks and orders them."""
  if columns is None:
    columns = [c for c in columns_of(rows) if c not in drop]
  lines = ["| " + " | ".join(HEADERS.get(c, c) for c in columns) + " |",
           "| " + " | ".join("---" for _ in columns) + " |"]
  for row in rows:
    lines.append("| " + " | ".join(
        format_value(c, row.get(c)) for c in columns) + " |")
  return "\n".join(lines) + "\n"


def write_results(runs, sweep_dir, status=None):
  """Writes results.csv and results.md for `runs`; returns the rows.

  `status` ({name: ...} from run_sweep) marks failed, interrupted and
  stopped runs; every other run's status comes from its summary.json.
  """
  rows = []
  for run in runs:
    s = (status or {}).get(run.name, "")
    kept = s.startswith("failed") or s in ("interrupted", "stopped")
    rows.append(result_row(run, s if kept else None))
  os.makedirs(sweep_dir, exist_ok=True)
  write_csv(rows, os.path.join(sweep_dir, "results.csv"))
  md = markdown_table(rows)
  not_done = [r["run"] for r in rows if r["status"] != "finished"]
  if not_done:
    md += f"\nNot finished: {', '.join(not_done)}\n"
  with open(os.path.join(sweep_dir, "results.md"), "w") as f:
    f.write(md)
  return rows


def write_manifest(runs, sweep_dir, config_flag):
  """sweep_dir/sweep.json: the config flag and every run's point, workdir
  and command."""
  os.makedirs(sweep_dir, exist_ok=True)
  manifest = dict(config=config_flag, runs=[
      dict(name=r.name, point=r.point, config_arg=r.config_arg,
           workdir=r.workdir, total_steps=r.total_steps,
           command=shlex.join(["python", "-m", "experiments.train",
                               *r.argv]))
      for r in runs])
  tmp = os.path.join(sweep_dir, "sweep.json.tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(sweep_dir, "sweep.json"))


# ------------------------------------------------------------- the app


_PARSED = {}


def _flags_parser(argv):
  try:
    rest, axes, fixed = parse_argv(argv[1:])
  except GridError as e:
    rest, axes, fixed = [a for a in argv[1:] if not a.startswith(
        (SWEEP_PREFIX, CONFIG_PREFIX))], {}, {}
    _PARSED["error"] = str(e)
  _PARSED.update(axes=axes, fixed=fixed)
  return flags.FLAGS([argv[0], *rest])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if "error" in _PARSED:
    sys.exit(f"sweep: bad grid: {_PARSED['error']}")
  sweep_dir = _SWEEP_DIR.value
  try:
    devices = probe_devices()
    # From here on this process uses JAX (config checks, model shapes) on
    # the CPU only; the trainings, its subprocesses, get the accelerator.
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_platforms", "cpu")
    runs = make_runs(_CONFIG.value, sweep_dir, file_grid=_FILE_GRID.value,
                     axes=_PARSED.get("axes"), fixed=_PARSED.get("fixed"),
                     check_models=_CHECK_MODELS.value, devices=devices)
  except GridError as e:
    sys.exit(f"sweep: bad grid: {e}")
  changed = changed_runs(runs)
  if changed:
    lines = []
    for run, diffs in changed:
      lines.append(f"  {run.workdir}:")
      lines += [f"    {f}: {old!r} (there) -> {new!r} (now)"
                for f, old, new in diffs[:5]]
      if len(diffs) > 5:
        lines.append(f"    ... and {len(diffs) - 5} more")
    sys.exit(f"sweep: {len(changed)} run(s) already exist with a different "
             f"config; reusing them would mix two configs in one table:\n"
             + "\n".join(lines) + "\nUse a new --sweep_dir, or remove "
             "those workdirs to run them again.")
  print(f"[sweep] {len(runs)} run(s) in {sweep_dir}", flush=True)
  if _DRY_RUN.value:
    for run in runs:
      state = "finished" if is_finished(run) else "to run"
      print(f"{run.name} ({state}):\n  "
            + shlex.join(["python", "-m", "experiments.train", *run.argv]))
    return
  write_manifest(runs, sweep_dir, _CONFIG.value)
  if _COLLECT_ONLY.value:
    write_results(runs, sweep_dir)
    with open(os.path.join(sweep_dir, "results.md")) as f:
      print(f.read())
    return
  log = lambda msg: print(msg, flush=True)
  start = time.monotonic()
  slurm = _LAUNCHER.value == "slurm"
  if _PARALLEL.value > 1 or slurm:
    from moejax.train import errors  # pylint: disable=g-import-not-at-top
    try:
      prepare_data(runs)
    except errors.ConfigError as e:
      sys.exit(f"sweep: bad grid: {e}")
    except errors.DatasetError as e:  # a damaged dataset file: names it
      sys.exit(f"sweep: {e}")
  on_change = lambda s: write_results(runs, sweep_dir, s)
  try:
    if slurm:
      from experiments import sweep_slurm  # pylint: disable=g-import-not-at-top
      executor = sweep_slurm.make_executor(
          sweep_dir, cluster=_SLURM_CLUSTER.value,
          partition=_SLURM_PARTITION.value, time_min=_SLURM_TIME_MIN.value,
          nodes=_SLURM_NODES.value, tasks_per_node=_SLURM_TASKS_PER_NODE.value,
          gpus_per_node=_SLURM_GPUS_PER_NODE.value,
          cpus_per_task=_SLURM_CPUS_PER_TASK.value,
          mem_gb=_SLURM_MEM_GB.value,
          array_parallelism=_SLURM_ARRAY_PARALLELISM.value)
      status = sweep_slurm.run_sweep_slurm(runs, executor, log=log,
                                           on_change=on_change,
                                           sweep=sys.modules[__name__])
    else:
      status = run_sweep(runs, sweep_dir, parallel=_PARALLEL.value,
                         keep_going=_KEEP_GOING.value, log=log,
                         on_change=on_change)
  except SweepInterrupted as e:
    write_results(runs, sweep_dir, e.status)
    sys.exit("[sweep] interrupted; run the same command to resume")
  write_results(runs, sweep_dir, status)
  with open(os.path.join(sweep_dir, "results.md")) as f:
    print(f.read(), flush=True)
  print(f"[sweep] {time.monotonic() - start:.0f}s; results in "
        f"{os.path.join(sweep_dir, 'results.csv')}", flush=True)
  failed = [n for n, s in status.items() if s.startswith("failed")]
  if failed:
    sys.exit(f"[sweep] {len(failed)} run(s) failed: {', '.join(failed)}")


def define_flags():
  """Defines the app's flags (only when run as the app: experiments/report.py
  imports this module for its table helpers)."""
  global _CONFIG, _SWEEP_DIR, _PARALLEL, _FILE_GRID, _DRY_RUN
  global _COLLECT_ONLY, _CHECK_MODELS, _KEEP_GOING, _LAUNCHER
  global _SLURM_CLUSTER, _SLURM_PARTITION, _SLURM_TIME_MIN, _SLURM_NODES
  global _SLURM_TASKS_PER_NODE, _SLURM_GPUS_PER_NODE, _SLURM_CPUS_PER_TASK
  global _SLURM_MEM_GB, _SLURM_ARRAY_PARALLELISM
  _CONFIG = flags.DEFINE_string(
      "config", None, "Config file, path[:arg] (as experiments/train.py).",
      required=True)
  _SWEEP_DIR = flags.DEFINE_string(
      "sweep_dir", None, "Directory of the run workdirs and the results.",
      required=True)
  _PARALLEL = flags.DEFINE_integer(
      "parallel", 1, "Runs at a time, each its own process.", lower_bound=1)
  _FILE_GRID = flags.DEFINE_boolean(
      "file_grid", True, "Use the config file's sweep() points (crossed with "
      "the --sweep.* flags). --nofile_grid: only the --sweep.* flags.")
  _DRY_RUN = flags.DEFINE_boolean(
      "dry_run", False, "Check the grid and print the commands; run nothing.")
  _COLLECT_ONLY = flags.DEFINE_boolean(
      "collect_only", False, "Only (re)write results.csv and results.md.")
  _CHECK_MODELS = flags.DEFINE_boolean(
      "check_models", True, "Build every run's model (shapes only) before "
      "anything runs.")
  _KEEP_GOING = flags.DEFINE_boolean(
      "keep_going", True, "Go on with the other runs when one fails (the sweep "
      "still exits with status 1).")
  _LAUNCHER = flags.DEFINE_enum(
      "launcher", "local", ["local", "slurm"], "local: subprocesses here "
      "(--parallel at a time); slurm: one submitit job array "
      "(experiments/sweep_slurm.py; needs moejax[slurm]).")
  _SLURM_CLUSTER = flags.DEFINE_enum(
      "slurm_cluster", "slurm", ["slurm", "local", "debug"],
      "submitit backend of --launcher=slurm: slurm, or local/debug to run "
      "the same array on this machine.")
  _SLURM_PARTITION = flags.DEFINE_string("slurm_partition", None,
                                         "SLURM partition.")
  _SLURM_TIME_MIN = flags.DEFINE_integer(
      "slurm_time_min", 60, "Time limit of each job, in minutes; a job that "
      "reaches it saves (SIGTERM) and the same command resumes it.",
      lower_bound=1)
  _SLURM_NODES = flags.DEFINE_integer(
      "slurm_nodes", 1, "Nodes per run (>1: a multi-host run through "
      "jax.distributed).", lower_bound=1)
  _SLURM_TASKS_PER_NODE = flags.DEFINE_integer(
      "slurm_tasks_per_node", 1, "Training processes per node.",
      lower_bound=1)
  _SLURM_GPUS_PER_NODE = flags.DEFINE_integer(
      "slurm_gpus_per_node", 0, "GPUs per node (0: none requested).",
      lower_bound=0)
  _SLURM_CPUS_PER_TASK = flags.DEFINE_integer(
      "slurm_cpus_per_task", None, "CPUs per task.", lower_bound=1)
  _SLURM_MEM_GB = flags.DEFINE_integer("slurm_mem_gb", None,
                                       "Memory per node, GB.", lower_bound=1)
  _SLURM_ARRAY_PARALLELISM = flags.DEFINE_integer(
      "slurm_array_parallelism", 64, "Array tasks running at once.",
      lower_bound=1)


def run_main():
  define_flags()
  app.run(main, flags_parser=_flags_parser)


if __name__ == "__main__":
  run_main()
