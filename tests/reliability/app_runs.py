"""Real `experiments/train.py` processes for the reliability tests (not a
test module): one run with its output in files (no pipe stalls), and the
helpers the tests read results with."""

import os
import subprocess
import time

from moejax.train import writers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def stopped(stderr):
  """The one 'training stopped: ...' line of `stderr`, without its prefix."""
  lines = [l for l in stderr.splitlines()
           if l.startswith("training stopped: ")]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0][len("training stopped: "):]


def tree_bytes(directory):
  """{relative path: bytes} of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      path = os.path.join(root, f)
      out[os.path.relpath(path, directory)] = open(path, "rb").read()
  return out


class AppRun:
  """One app process: `cmd` (the command up to its flags) + --workdir +
  `flags`; stdout and stderr go to <workdir>.out<n> / .err<n>."""

  def __init__(self, env, workdir, *flags, cmd):
    self.workdir = str(workdir)
    parent = os.path.dirname(self.workdir)
    os.makedirs(parent, exist_ok=True)
    n = len([f for f in os.listdir(parent)
             if f.startswith(os.path.basename(self.workdir) + ".out")])
    self.out_path = f"{self.workdir}.out{n}"
    self.err_path = f"{self.workdir}.err{n}"
    with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
      self.proc = subprocess.Popen(
          [*cmd, f"--workdir={self.workdir}", *flags], cwd=REPO, env=env,
          stdout=out, stderr=err)
    self.pid = self.proc.pid

  def wait(self, timeout=300):
    self.proc.wait(timeout=timeout)
    return self

  @property
  def rc(self):
    return self.proc.returncode

  @property
  def stdout(self):
    return open(self.out_path).read()

  @property
  def stderr(self):
    return open(self.err_path).read()

  def tails(self):
    return (f"rc={self.rc}\n--- stdout ---\n{self.stdout[-2000:]}\n"
            f"--- stderr ---\n{self.stderr[-4000:]}")

  def stopped_line(self):
    return stopped(self.stderr)

  def ok(self):
    self.wait()
    assert self.rc == 0, self.tails()
    return self

  def wait_for(self, predicate, what, timeout=300, every=0.01):
    """Polls `predicate` until true; fails if the process exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
      if self.proc.poll() is not None:
        raise AssertionError(f"exited before {what}:\n{self.tails()}")
      if predicate():
        return
      time.sleep(every)
    raise AssertionError(f"no {what} after {timeout} s")

  def wait_for_step(self, step, timeout=300):
    """Blocks until metrics.jsonl holds a record of `step` or later;
    returns the newest step logged."""
    path = os.path.join(self.workdir, "metrics.jsonl")

    def reached():
      if not os.path.exists(path):
        return False
      steps = [r.get("step", 0) for r in writers.read_jsonl(path)]
      return bool(steps) and max(steps) >= step
    self.wait_for(reached, f"step {step}", timeout)
    return max(r.get("step", 0) for r in writers.read_jsonl(path))

  def signal(self, sig):
    self.proc.send_signal(sig)
    return self.wait()

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
