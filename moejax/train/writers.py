"""Metric writers: JSONL, TensorBoard event files (tensorboardX), and a
progress bar (tqdm).

Metrics arrive as a flat dict {name: float | list of floats}. JSONL keeps
lists (e.g. per-expert load); TensorBoard gets one scalar per list entry
(`moe/layer1/expert_load/3`) and a histogram per layer's expert load.
"""

import json
import math
import os
import sys
import time

from tensorboardX import event_file_writer
from tensorboardX import summary as summary_lib
from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2
import tqdm


def _jsonable(value):
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  value = float(value)
  # JSON has no NaN/Inf; strings keep the line parseable by any reader.
  return value if math.isfinite(value) else str(value)


class JsonlWriter:
  """Appends one JSON object per call to `path`: {"step": s, name: value}.

  On resume, `truncate_after(step)` first drops records of steps after the
  restored checkpoint (they are about to be redone), so the file reads as one
  uninterrupted run.
  """

  def __init__(self, path):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._file = None

  def truncate_after(self, step):
    """Drops the records of steps after `step` and the lines a kill cut
    short. The file is rewritten (through `<path>.tmp` and a rename) only
    when something changes.

    Raises:
      OSError: naming this file, when it could not be rewritten (a full
        disk); the file is then as it was and the temporary file is gone.
    """
    if not os.path.exists(self.path):
      return
    kept, changed = [], False
    with open(self.path) as f:
      for line in f:
        try:
          keep = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
          keep = False  # a line cut short by a kill
        if keep and not line.endswith("\n"):
          line += "\n"  # complete, but the next record must not join it
          changed = True
        if keep:
          kept.append(line)
        else:
          changed = True
    if not changed:
      return
    tmp = self.path + ".tmp"
    try:
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    except OSError as e:
      try:
        os.remove(tmp)
      except OSError:
        pass
      raise OSError(e.errno, e.strerror, self.path) from e

  def write(self, step, metrics):
    if self._file is None:
      self._file = open(self.path, "a")
    record = {"step": int(step)}
    record.update({k: _jsonable(v) for k, v in metrics.items()})
    self._file.write(json.dumps(record) + "\n")

  def flush(self):
    if self._file is not None:
      self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None


def read_jsonl(path):
  """The records of a JSONL metrics file (lines that do not parse skipped)."""
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except ValueError:
        continue
  return out


class TensorBoardWriter:
  """Metrics into a TensorBoard event file under `logdir` (tensorboardX).

  Scalars keep their names; a list becomes one scalar per entry
  (`train/moe/layer1/expert_load/3`), and a per-layer `.../expert_load` list
  is also written as a histogram over the expert index (bucket e holds
  expert e's share of the routed tokens), so TensorBoard's histogram tab
  shows how the load of each MoE layer moves during training.

  Writes are synchronous (tensorboardX's record writer, no queue thread):
  a failing disk raises OSError here, in the caller, like the JSONL writer.
  Each instance creates its own file, so a resumed run never appends to a
  file another process may still hold.
  """

  _count = 0

  def __init__(self, logdir):
    os.makedirs(logdir, exist_ok=True)
    TensorBoardWriter._count += 1
    # tensorboardX names the file events.out.tfevents.<time>.<host><suffix>,
    # <time> in whole seconds, and TensorBoard reads the files in name
    # order: a nanosecond clock first in the suffix keeps two files of the
    # same second in creation order (a resumed run's START must come last).
    self._writer = event_file_writer.EventsWriter(
        os.path.join(logdir, "events"),
        f".{time.time_ns():020d}.{os.getpid()}.{TensorBoardWriter._count}")
    self.path = self._writer._file_name  # pylint: disable=protected-access
    self._writer.flush()

  def _event(self, step, **fields):
    self._writer.write_event(
        event_pb2.Event(wall_time=time.time(), step=int(step), **fields))

  def session_start(self, step):
    """SessionLog START at `step`: TensorBoard then hides this directory's
    older events with step >= `step` (the steps a resumed run redoes)."""
    self._event(step, session_log=event_pb2.SessionLog(
        status=event_pb2.SessionLog.START))

  def write(self, step, metrics):
    """One event at `step` with every metric ({name: float | list})."""
    values = []
    for name, value in metrics.items():
      if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
          values += summary_lib.scalar(f"{name}/{i}", float(v)).value
        if name.endswith("/expert_load") and value:
          values += _load_histogram(name, value).value
      else:
        values += summary_lib.scalar(name, float(value)).value
    if values:
      self._event(step, summary=summary_pb2.Summary(value=values))

  def write_config(self, config, step=0):
    """The run's config: its JSON as text (`config`) and its leaves as
    hyperparameters (HParams tab), at `step`.

    Args:
      config: a dict or an ml_collections ConfigDict (nested).
    """
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text = json.dumps(config, indent=2, sort_keys=True, default=str)
    # Indented four spaces: TensorBoard renders the text as a code block.
    self._event(step, summary=summary_lib.text(
        "config", "\n".join("    " + line for line in text.splitlines())))
    hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
               for k, v in _flatten(config).items()}
    metrics = {"train/loss": 0.0, "eval/loss": 0.0}  # names only
    for summary in summary_lib.hparams(hparams, metrics):
      self._event(step, summary=summary)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def _flatten(tree, prefix=""):
  """{'a': {'b': 1}} -> {'a.b': 1}; None leaves dropped."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, name + "."))
    elif value is not None:
      out[name] = value
  return out


def _load_histogram(name, load_E):
  """A histogram Summary of expert indices weighted by their load [E]:
  bucket e spans (e - 0.5, e + 0.5] and counts load_E[e]."""
  load_E = [float(v) for v in load_E]
  used = [e for e, v in enumerate(load_E) if v > 0] or [0]
  return summary_lib.histogram_raw(
      name, min=float(used[0]), max=float(used[-1]), num=sum(load_E),
      sum=sum(e * v for e, v in enumerate(load_E)),
      sum_squares=sum(e * e * v for e, v in enumerate(load_E)),
      bucket_limits=[e + 0.5 for e in range(len(load_E))],
      bucket_counts=load_E)


def read_scalars(logdir):
  """{tag: [(step, value), ...]} of the event files under `logdir`, read by
  TensorBoard's own EventAccumulator (so a resumed run's SessionLog START
  hides the steps it redid). Needs `tensorboard` (the test extra)."""
  try:
    from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading event files needs tensorboard: pip install "
                      "'moejax[test]' (or pip install tensorboard)") from e
  acc = event_accumulator.EventAccumulator(
      logdir, size_guidance={event_accumulator.SCALARS: 0,
                             event_accumulator.HISTOGRAMS: 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
          for tag in acc.Tags()["scalars"]}


class MultiWriter:
  """Forwards every call to several writers."""

  def __init__(self, writers):
    self.writers = list(writers)

  def write(self, step, metrics):
    for w in self.writers:
      w.write(step, metrics)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


class _Tqdm(tqdm.tqdm):
  """tqdm whose rate (and so ETA) is ours when set: measured from the
  first step, not since construction (which includes compiling)."""

  rate_override = None

  @property
  def format_dict(self):
    d = super().format_dict
    if self.rate_override:
      d["rate"] = self.rate_override
    return d


class ProgressBar:
  """Training progress through tqdm: one updating bar on a terminal; on
  anything else (a log file, CI) a plain line every `every` steps, with no
  carriage returns or escape codes.

    bar = ProgressBar(total=400, initial=0)
    bar.update(step, {'loss': 2.3, 'tokens/s': 5120})
    bar.write('eval @ 100: ...')   # a message line that keeps the bar intact
    bar.close()

  The rate and ETA count from the first `update` on, so the compile time
  spent before the first step's report does not inflate the ETA.
  `width` is the bar's width in characters.
  """

  def __init__(self, total, *, initial=0, stream=None, width=24, every=None,
               enabled=True):
    self.total = max(int(total), 1)
    self.initial = int(initial)
    self.stream = stream or sys.stdout
    self.width = width
    self.enabled = enabled
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.every = every or max(self.total // 20, 1)
    self._start = time.monotonic()
    self._first = None  # (time, step) of the first update
    self._drawn = -math.inf  # when the terminal bar was last drawn
    self._bar = None
    self._format = ("{l_bar}{bar:%d}| {n_fmt}/{total_fmt} "
                    "[{elapsed}<{remaining}{postfix}]" % width)
    if enabled and self.tty:
      self._bar = _Tqdm(
          total=self.total, initial=self.initial, file=self.stream,
          unit="step", leave=True, mininterval=0.2, bar_format=self._format)

  def _fields(self, fields):
    return " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in fields.items())

  def _rate(self, step, now):
    """Steps per second since the first update (None before two)."""
    if self._first is None:
      self._first = (now, step)
      return None
    t0, s0 = self._first
    return (step - s0) / (now - t0) if step > s0 and now > t0 else None

  def update(self, step, fields):
    """Shows `step` of `total` with `fields` ({name: value})."""
    if not self.enabled:
      return
    now = time.monotonic()
    rate = self._rate(step, now)
    if self._bar is not None:
      self._bar.n = step
      self._bar.rate_override = rate
      self._bar.set_postfix_str(self._fields(fields), refresh=False)
      if now - self._drawn >= 0.1 or step >= self.total:
        self._drawn = now  # a terminal redraw at most every 0.1 s
        self._bar.refresh()
    elif step % self.every == 0 or step == self.total:
      line = tqdm.tqdm.format_meter(
          step, self.total, now - self._start, ascii=".#", unit="step",
          rate=rate, initial=self.initial, postfix=self._fields(fields),
          bar_format=self._format)
      self.stream.write(line + "\n")
      self.stream.flush()

  def write(self, text):
    """Prints a message line without breaking the bar."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=self.stream)
    else:
      self.stream.write(text + "\n")
      self.stream.flush()

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None
