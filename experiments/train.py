r"""Trains a model from an ml_collections config: the one training app.

  python -m experiments.train --config=experiments/configs/lm_stdlib.py \
      --workdir=workdirs/lm_stdlib [--config.moe.experts.num_experts=16 ...]

`--config=path:arg` passes `arg` to the file's get_config (e.g.
`lm_stdlib.py:dense`). The config is locked: `--config.<field>=value`
overrides an existing field; a misspelt field fails at launch. Running again
with the same --workdir resumes from its newest checkpoint. See
docs/training.md.

Exit status: 0 when the run finished (or stopped at stop_after_steps); 1 when
training stopped with an error (diverged, a checkpoint could not be written
or read); 2 for an invalid config (before anything is compiled); 143 (=
128 + SIGTERM) when SIGTERM preempted it after saving a checkpoint: run the
same command to resume. Each prints `training stopped: <why>` on stderr,
without a traceback (docs/reliability.md).
"""

import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# 128 + SIGTERM, what a shell reports for a process SIGTERM ended: a
# scheduler treats the preempted run as it would a killed one.
PREEMPTED_EXIT_STATUS = 143

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


def exit_status(error):
  """The process exit status for a moejax.train.TrainingError."""
  from moejax import train  # pylint: disable=g-import-not-at-top
  if isinstance(error, train.TrainingPreempted):
    return PREEMPTED_EXIT_STATUS
  if isinstance(error, train.ConfigError):
    return 2
  return 1


if __name__ == "__main__":
  _moved = moved_moe_flags(sys.argv[1:])
  if _moved:
    from moejax.train import errors  # pylint: disable=g-import-not-at-top
    print(f"training stopped: {errors.ConfigError(_moved)}", file=sys.stderr,
          flush=True)
    sys.exit(2)
  app.run(main)
