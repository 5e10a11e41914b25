"""The errors a training run stops with, one class per kind of failure.

Every one derives from `TrainingError`, whose message is written for the
person running the job: what happened, at which step or in which config
field, and what to do. experiments/train.py prints `training stopped: <the
message>` for each and exits with status 1 (2 for a config error, 3 for a
damaged dataset file, 143 for a preemption). docs/reliability.md shows each
message.
"""


class TrainingError(Exception):
  """Base class: a run stopped for a reason the message explains."""


class ConfigError(TrainingError, ValueError):
  """The config is invalid; raised before anything is built or compiled.

  `problems` lists one line per invalid field: `config.<field>=<value>:
  <why>; allowed: <what>`.
  """

  def __init__(self, problems):
    self.problems = list(problems)
    if len(self.problems) == 1:
      text = self.problems[0]
    else:
      text = f"{len(self.problems)} config errors:\n" + "\n".join(
          f"  {p}" for p in self.problems)
    super().__init__(text)


class ResumeConfigError(ConfigError):
  """Resuming would change the model or its data; `differences` lists
  (field, checkpointed value, new value)."""

  def __init__(self, message, differences):
    super().__init__([message])
    self.differences = list(differences)


class TrainingDivergedError(TrainingError, FloatingPointError):
  """A loss or gradient became NaN or Inf (nan_policy 'stop', or too many
  skipped steps in a row with 'skip')."""


class TrainingPreempted(TrainingError):
  """SIGTERM (or SIGINT, Ctrl-C: `signum`) arrived: a checkpoint of `step`
  was saved and written; running the same command again continues from it.
  experiments/train.py exits with 128 + signum (143, or 130 for Ctrl-C)."""

  def __init__(self, message, step, signum=15):
    super().__init__(message)
    self.step = step
    self.signum = int(signum)


class WorkdirWriteError(TrainingError, OSError):
  """The workdir (metrics, config, checkpoints) could not be written: it is
  not writable, or the disk is full."""


class CheckpointSaveError(WorkdirWriteError):
  """A checkpoint could not be written (unwritable directory, full disk).
  Nothing partial is listed as a checkpoint; older ones are intact."""


class CheckpointRestoreError(TrainingError):
  """Checkpoints exist but none of them could be loaded and verified."""


class WorkdirLockedError(TrainingError):
  """Another run holds the workdir's lock (moejax.train.workdir); nothing
  was started. `holder`: its record (pid, host, since), {} if unknown.
  experiments/train.py exits with status 75."""

  def __init__(self, message, holder=None):
    super().__init__(message)
    self.holder = dict(holder or {})


class DatasetError(TrainingError):
  """A dataset file is damaged or could not be read (exit status 3).

  At the start (`step` None) nothing was started; mid-run the step reached
  (`step`) was saved first. The message names the file when it can be
  known and the command that rebuilds the dataset.
  """

  def __init__(self, message, step=None):
    super().__init__(message)
    self.step = step
