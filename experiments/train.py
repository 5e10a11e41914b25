r"""Trains a model from an ml_collections config: the one training app.

  python -m experiments.train --config=experiments/configs/lm_stdlib.py \
      --workdir=workdirs/lm_stdlib [--config.moe.experts.num_experts=16 ...]

`--config=path:arg` passes `arg` to the file's get_config (e.g.
`lm_stdlib.py:dense`). The config is locked: `--config.<field>=value`
overrides an existing field; a misspelt field or a value of the wrong type
fails at launch (status 2, one line naming the closest field). Running again
with the same --workdir resumes from its newest checkpoint. See
docs/training.md.

Exit status: 0 when the run finished (or stopped at stop_after_steps); 1 when
training stopped with an error (diverged, a checkpoint could not be written
or read); 2 for an invalid config (before anything is compiled); 3 when a
dataset file is damaged or unreadable (the step reached is saved first); 75
when another run holds the workdir (nothing was started); 143 (= 128 +
SIGTERM) when SIGTERM preempted it after saving a checkpoint, 130 (= 128 +
SIGINT) for Ctrl-C (it saves the current step the same way; a second
Ctrl-C, or one before the training loop, stops at once): run the same
command to resume. Each prints `training stopped: <why>` on stderr,
without a traceback (docs/reliability.md).
"""

import os
import re
import signal
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# 128 + SIGTERM, what a shell reports for a process SIGTERM ended: a
# scheduler treats the preempted run as it would a killed one.
PREEMPTED_EXIT_STATUS = 143
# A dataset file is damaged or could not be read: a plain retry would
# likely fail the same way; the message names the file and the fix.
DATASET_EXIT_STATUS = 3
# Another run holds the workdir (nothing was started): sysexits.h's
# EX_TEMPFAIL, "try again later", once that run has ended.
LOCKED_EXIT_STATUS = 75
# 128 + SIGINT: Ctrl-C, whether it saved first or stopped at once.
INTERRUPTED_EXIT_STATUS = 130

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs",
                               "lm_stdlib.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", default=_DEFAULT_CONFIG,
    help_string="Config file (path[:arg]); fields override with "
    "--config.<field>=<value>.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory: checkpoints, metrics, config.json. "
    "Resumes from it if it holds checkpoints.", required=True)


def _setup_devices(num_cpu_devices):
  """Joins a multi-process run and sets virtual CPU devices, before JAX starts.

  `moejax.sharding.initialize` starts jax.distributed when the environment
  describes several processes (MOEJAX_COORDINATOR_ADDRESS,
  MOEJAX_NUM_PROCESSES, MOEJAX_PROCESS_ID, or MOEJAX_DISTRIBUTED=auto on a
  TPU slice / SLURM; docs/sharding.md) and does nothing for one process.
  """
  from moejax import sharding  # pylint: disable=g-import-not-at-top
  sharding.initialize(
      num_cpu_devices=int(num_cpu_devices) if num_cpu_devices else None)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  _setup_devices(config.get("num_cpu_devices", 0))
  from moejax import train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except train.TrainingError as e:
    if wants_traceback(sys.argv):
      traceback.print_exception(e)
    print(f"training stopped: {e}", file=sys.stderr, flush=True)
    sys.exit(exit_status(e))


def moved_moe_flags(argv):
  """Flags of the flat moe config moejax used before its nested one
  (`--config.moe.k=2`, `--config.moe.router=hash`): one line each naming
  where the field moved; [] when there is none.

  config_flags would refuse them with a bare AttributeError traceback. Pure
  Python until a flat flag is found (JAX must not start before
  _setup_devices).
  """
  flat = []
  for arg in argv:
    m = re.match(r"^--config\.moe\.(\w+)=(.*)$", arg)
    if m:
      flat.append(m.groups())
  if not flat:
    return []
  from moejax.layers import build  # pylint: disable=g-import-not-at-top
  lines = []
  for key, value in flat:
    if key in ("router", "engine"):
      lines.append(f"--config.moe.{key}={value}: moved to --config.moe."
                   f"{key}.name (moe.{key} is now a dict of the {key}'s "
                   f"options)")
    elif key in build.MOVED and key not in (build.MOE_KEYS +
                                            build.SOFT_MOE_KEYS):
      target = build.MOVED[key]
      if re.fullmatch(r"moe\.[\w.]+", target):
        target = f"--config.{target}"
      lines.append(f"--config.moe.{key}={value}: moved to {target}")
  return lines


def parse_flags(argv):
  """absl's flag parsing (app.run's flags_parser), with a refused flag as a
  config error: one `training stopped:` line and exit status 2.

  Without it, a value of the wrong type (`--config.batch_size=eight`) or an
  unknown flag ends in absl's `FATAL Flags parsing error` with status 1,
  and a misspelt config field (`--config.moe.capacity_facter=2`) in a
  KeyError traceback from ml_collections.
  """
  try:
    args = flags.FLAGS(argv)
    # ml_collections defers a config file it cannot open to the first use.
    flags.FLAGS["config"].value.get("task")
    return args
  except Exception as e:  # pylint: disable=broad-except
    from moejax.train import errors  # pylint: disable=g-import-not-at-top
    line = flag_error_line(argv, e)
    if wants_traceback(argv):
      traceback.print_exception(e)
    print(f"training stopped: {errors.ConfigError([line])}", file=sys.stderr,
          flush=True)
    sys.exit(2)


def wants_traceback(argv):
  """True when the command line asks for debug output (`--verbosity=1` or
  more, absl's DEBUG): errors then print their traceback before the one
  `training stopped:` line, which still ends stderr."""
  level = None
  for i, arg in enumerate(argv):
    m = re.match(r"^--?(?:verbosity|v)(?:=(.*))?$", arg)
    if m:
      level = m.group(1) if m.group(1) is not None else (
          argv[i + 1] if i + 1 < len(argv) else None)
  try:
    return level is not None and int(level) >= 1
  except ValueError:
    return False


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false",
          "string": "a string"}


def flag_error_line(argv, error):
  """One line for a command line that absl or ml_collections refused: the
  flag, why, and what is allowed (a close match for a misspelt field)."""
  if isinstance(error, (KeyError, AttributeError)):
    line = _unknown_field_line(argv)
    if line:
      return line
  text = str(error)
  if isinstance(error, OSError):
    return _config_file_line(_config_arg(argv), error)
  m = re.match(r"Unknown command line flag '([\w.-]+)'", text)
  if m:
    return _unknown_flag_line(argv, m.group(1))
  m = re.match(r"flag --(config\.[\w.]+)=(.*?): (.*)$", text, re.S)
  if m:
    name, value, why = m.groups()
    flag = flags.FLAGS[name] if name in flags.FLAGS else None
    kind = _KINDS.get(getattr(getattr(flag, "parser", None), "flag_type",
                              lambda: None)())
    if kind:
      default = getattr(flag, "default", None)
      like = (f", like the config file's {default!r}" if default is not None
              else "")
      return f"--{name}={value}: {value!r} is not {kind}; allowed: {kind}{like}"
  m = re.match(r"flag (--[\w.]+=.*?): (.*)$", text, re.S)
  if m:  # e.g. the config file itself raised: its last line says why
    return f"{m.group(1)}: {_last_line(m.group(2))}"
  if isinstance(error, flags.Error):
    return _last_line(text)
  return f"{type(error).__name__}: {_last_line(text)}{_where(error)}"


def _config_file_line(value, error):
  """--config=<value> names no file it can read: why, and the close match
  among the config files of that directory."""
  import difflib  # pylint: disable=g-import-not-at-top
  path = value.split(":", 1)[0]
  # (ml_collections raises a bare OSError whose text holds the errno.)
  missing = (isinstance(error, FileNotFoundError)
             or "No such file or directory" in str(error))
  why = "no such file" if missing else _last_line(str(error))
  directory = os.path.dirname(path) or "."
  try:
    files = sorted(f for f in os.listdir(directory) if f.endswith(".py")
                   and not f.startswith("_"))
  except OSError:
    files = []
  close = difflib.get_close_matches(os.path.basename(path), files, n=1)
  hint = (f"did you mean --config={os.path.join(directory, close[0])}?"
          if close else f"the config files in {directory}: {files}" if files
          else "pass a path to a config file (e.g. "
          f"--config={os.path.relpath(_DEFAULT_CONFIG)})")
  return f"--config={value}: cannot load the config file {path!r} ({why}); " + hint


def _unknown_flag_line(argv, name):
  """An unknown flag: the closest flag this app defines, if any."""
  import difflib  # pylint: disable=g-import-not-at-top
  arg = next((a for a in argv if re.match(rf"^--?(no)?{re.escape(name)}(=|$)",
                                          a)), f"--{name}")
  known = [n for n in flags.FLAGS if len(n) > 1 and not n.startswith("config.")]
  close = difflib.get_close_matches(name, known, n=1)
  if close:
    return f"{arg}: unknown flag; did you mean --{close[0]}?"
  return (f"{arg}: unknown flag; allowed: --config, --workdir, "
          "--config.<field>=<value> and absl's flags (--helpfull)")


def _last_line(text):
  lines = [l.strip() for l in str(text).splitlines() if l.strip()]
  return lines[-1] if lines else ""


def _where(error):
  """' (file:line)' where `error` was raised, for an error of the config
  file's own code (no traceback is printed)."""
  tb = error.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  if tb is None:
    return ""
  return f" ({tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})"


def _config_arg(argv):
  """The --config value of argv (path[:arg]), or the default."""
  value = _DEFAULT_CONFIG
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      value = arg.split("=", 1)[1]
    elif arg in ("--config", "-config") and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _unknown_field_line(argv):
  """The first `--config.<path>` of argv that names no field of the config
  file's config: one line with a close match; None if every path exists."""
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  try:
    # The --config flag's own parser (ml_collections' ConfigFileFlagParser):
    # the config file's config, without the overrides.
    config = flags.FLAGS["config"].parser.parse(_config_arg(argv))
  except Exception:  # pylint: disable=broad-except
    return None
  for arg in argv:
    m = re.match(r"^--?(?:no)?config\.([\w.]+)(?:=.*)?$", arg)
    if not m:
      continue
    parts = m.group(1).split(".")
    node = config
    for i, part in enumerate(parts):
      where = ".".join(["config", *parts[:i]])
      if not isinstance(node, config_dict.ConfigDict):
        return (f"{arg}: {where} is {type(node).__name__} {node!r}, not a "
                f"group of fields; allowed: --{where}=<value>")
      keys = list(node.keys())
      if part in keys:
        node = node[part]
        continue
      fixed = _closest_path(node, part, parts[i + 1:])
      if fixed is None:
        return (f"{arg}: {where} has no field {part!r}; allowed: its "
                f"fields {sorted(keys)}")
      return (f"{arg}: {where} has no field {part!r}; did you mean "
              f"--config.{'.'.join([*parts[:i], *fixed])}?")
  return None


def _closest_path(node, part, rest):
  """The path below `node` that a misspelt `part` (followed by `rest`) most
  likely meant, as a list of keys; None if nothing is close.

  A field of `node` itself (`mo` -> `moe`, keeping `rest` when it exists
  under it) or, for a leaf flag, a field deeper down whose own name is
  close (`moe.num_expert` -> `moe.experts.num_experts`): the closer name
  wins, a direct field on a tie.
  """
  import difflib  # pylint: disable=g-import-not-at-top
  keys = list(node.keys())
  ratio = lambda a: difflib.SequenceMatcher(None, part, a).ratio()
  best, best_ratio = None, 0.6  # difflib.get_close_matches' cutoff
  for key in keys:
    if ratio(key) >= best_ratio and (best is None or ratio(key) > best_ratio):
      best, best_ratio = [key], ratio(key)
  if best is not None and rest and _has_path(node[best[0]], rest):
    return best + list(rest)
  if not rest:
    for path in _leaf_paths(node):
      if len(path) > 1 and ratio(path[-1]) > best_ratio:
        best, best_ratio = path, ratio(path[-1])
  return best


def _leaf_paths(node, prefix=()):
  for key in node.keys():
    value = node[key]
    if hasattr(value, "keys"):
      yield from _leaf_paths(value, (*prefix, key))
    else:
      yield [*prefix, key]


def _has_path(node, parts):
  for part in parts:
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


def exit_status(error):
  """The process exit status for a moejax.train.TrainingError."""
  from moejax import train  # pylint: disable=g-import-not-at-top
  if isinstance(error, train.TrainingPreempted):
    return 128 + error.signum  # 143 (SIGTERM) or 130 (SIGINT)
  if isinstance(error, train.WorkdirLockedError):
    return LOCKED_EXIT_STATUS
  if isinstance(error, train.ConfigError):
    return 2
  if isinstance(error, train.DatasetError):
    return DATASET_EXIT_STATUS
  return 1


def stop_at_once(signum=None, frame=None):
  """The SIGINT handler of this app outside the training loop (start-up,
  building and compiling the model, restoring, the final eval and summary),
  and for Ctrl-C pressed again while the loop saves (the loop's
  PreemptionGuard hands a second SIGINT here): one line, then the process
  ends at once with status 130.

  It ends with os._exit, not an exception: a KeyboardInterrupt raised inside
  JAX's compile, or swallowed by a garbage-collection callback, either
  crashed the interpreter at exit (a segmentation fault) or was lost (the
  run went on). A partial checkpoint is never listed as one, and the
  workdir's lock is released here.
  """
  del signum, frame
  try:
    sys.stdout.flush()
  except Exception:  # pylint: disable=broad-except
    pass
  workdir_lock = sys.modules.get("moejax.train.workdir")
  if workdir_lock is not None:  # (imported only if a run had started)
    workdir_lock.release_all()
  print("training stopped: interrupted (SIGINT): stopped at once, without "
        "saving. Checkpoints already complete are intact (a partial save is "
        "never listed as one). Run the same command to resume.",
        file=sys.stderr, flush=True)
  os._exit(INTERRUPTED_EXIT_STATUS)  # pylint: disable=protected-access


if __name__ == "__main__":
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    # (A SIGINT ignored from the start, as for a shell's background job,
    # stays ignored.)
    signal.signal(signal.SIGINT, stop_at_once)
  _moved = moved_moe_flags(sys.argv[1:])
  if _moved:
    from moejax.train import errors  # pylint: disable=g-import-not-at-top
    print(f"training stopped: {errors.ConfigError(_moved)}", file=sys.stderr,
          flush=True)
    sys.exit(2)
  app.run(main, flags_parser=parse_flags)
