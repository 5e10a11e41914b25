"""Metric writers: JSONL, TensorBoard event files, and a terminal progress bar.

Metrics arrive as a flat dict {name: float | list of floats}. JSONL keeps
lists (e.g. per-expert load); TensorBoard gets one scalar per list entry
(`moe/layer1/expert_load/3`).
"""

import json
import math
import os
import sys
import time

from moejax.train import tfevents


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
  """Scalars into a TensorBoard event file under `logdir` (no TensorFlow)."""

  def __init__(self, logdir):
    self._writer = tfevents.EventFileWriter(logdir)
    self.path = self._writer.path

  def session_start(self, step):
    self._writer.write_session_start(step)

  def write(self, step, metrics):
    scalars = {}
    for name, value in metrics.items():
      if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
          scalars[f"{name}/{i}"] = v
      else:
        scalars[name] = value
    self._writer.write_scalars(step, scalars)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


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


def _fmt_time(seconds):
  seconds = int(max(seconds, 0))
  return f"{seconds // 60}:{seconds % 60:02d}"


class ProgressBar:
  """One updating line on a terminal; a plain line every `every` steps when
  the output is not a terminal (logs, CI).

    bar = ProgressBar(total=400, initial=0)
    bar.update(step, {'loss': 2.3, 'tokens/s': 5120})
    bar.close()
  """

  def __init__(self, total, *, initial=0, stream=None, width=24, every=None,
               enabled=True):
    self.total = max(int(total), 1)
    self.initial = initial
    self.stream = stream or sys.stdout
    self.width = width
    self.enabled = enabled
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.every = every or max(self.total // 20, 1)
    self._start = time.monotonic()
    self._last_len = 0

  def _line(self, step, fields):
    frac = min(step / self.total, 1.0)
    filled = int(round(frac * self.width))
    bar = "#" * filled + "." * (self.width - filled)
    elapsed = time.monotonic() - self._start
    done = step - self.initial
    eta = elapsed / done * (self.total - step) if done > 0 else 0.0
    parts = [f"[{bar}] {step}/{self.total}"]
    parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
              for k, v in fields.items()]
    parts.append(f"{_fmt_time(elapsed)}<{_fmt_time(eta)}")
    return " | ".join(parts)

  def update(self, step, fields):
    if not self.enabled:
      return
    if self.tty:
      line = self._line(step, fields)
      pad = max(self._last_len - len(line), 0)
      self.stream.write("\r" + line + " " * pad)
      self._last_len = len(line)
      self.stream.flush()
    elif step % self.every == 0 or step == self.total:
      self.stream.write(self._line(step, fields) + "\n")
      self.stream.flush()

  def write(self, text):
    """Prints a message line without breaking the bar."""
    if not self.enabled:
      return
    if self.tty and self._last_len:
      self.stream.write("\r" + " " * self._last_len + "\r")
      self._last_len = 0
    self.stream.write(text + "\n")
    self.stream.flush()

  def close(self):
    if self.enabled and self.tty and self._last_len:
      self.stream.write("\n")
      self.stream.flush()
      self._last_len = 0
