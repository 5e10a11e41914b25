"""One run per workdir: an exclusive lock held for the run's lifetime.

    lock = WorkdirLock(workdir).acquire()   # WorkdirLockedError if in use
    ...
    lock.release()                          # or: with WorkdirLock(workdir):

The lock is an flock(2) on `<workdir>/train.lock`. The kernel drops it when
the holding process ends, however it ends (SIGKILL and the OOM killer
included), so a killed run never blocks the next one. While held, the file
records the holder as JSON: {"pid", "host", "since", "argv"}; a refused run
names it. A clean release empties the file; a record found on a lock that
is free is what a killed run left behind, and taking it over is reported
(`on_takeover`).

Where the file system has no flock (some network file systems refuse it),
the record alone decides: a holder on this host whose pid is alive, or one
on another host (which cannot be checked from here), holds the workdir.
"""

import errno
import fcntl
import json
import os
import socket
import sys
import time

from moejax.train.errors import WorkdirLockedError

LOCK_NAME = "train.lock"

# flock errors that mean "this file system has no flock", not "held".
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

_held = []  # the locks this process holds (release_all)


def holder_alive(record):
  """Whether the run a lock record names is still running: True or False
  for this host (by its pid), None for another host (it cannot be checked
  from here)."""
  if record.get("host") != socket.gethostname():
    return None
  try:
    os.kill(int(record["pid"]), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, KeyError, TypeError, ValueError):
    return True  # alive but not ours, or a record we cannot read: held
  return True


def describe_holder(record):
  """'pid 123 on host h, since 2025-01-02 03:04:05' ('an unknown run' when
  the record is missing or unreadable)."""
  if not record or "pid" not in record:
    return "an unknown run (its lock file names no holder)"
  return (f"pid {record.get('pid')} on host {record.get('host', '?')}, since "
          f"{record.get('since', '?')}")


def _read_record(fd):
  """The JSON record of the open lock file: None when empty, {} when it
  does not parse."""
  os.lseek(fd, 0, os.SEEK_SET)
  chunks = []
  while True:
    chunk = os.read(fd, 65536)
    if not chunk:
      break
    chunks.append(chunk)
  text = b"".join(chunks).decode("utf-8", "replace").strip()
  if not text:
    return None
  try:
    record = json.loads(text)
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


class WorkdirLock:
  """The exclusive lock of one workdir (see the module docstring).

  A context manager too: `with WorkdirLock(workdir): ...` acquires (unless
  already held) and releases.
  """

  def __init__(self, workdir):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self._fd = None

  @property
  def held(self):
    return self._fd is not None

  def acquire(self, on_takeover=None):
    """Takes the lock, creating the workdir if needed; returns self.

    Args:
      on_takeover: called with one line when the lock file holds the record
        of a run that ended without releasing it (killed), before this run
        replaces the record.
    Raises:
      WorkdirLockedError: another run holds the workdir; the message names
        it (pid, host, since when).
      OSError: the lock file could not be created or written.
    """
    if self._fd is not None:
      return self
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      flock = True
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        raise self._locked(self._holder_record(fd)) from None
      except OSError as e:
        if e.errno not in _NO_FLOCK:
          raise
        flock = False
      previous = _read_record(fd)
      if previous is not None:
        if not flock and holder_alive(previous) is not False:
          raise self._locked(previous, no_flock=True)
        if on_takeover is not None:
          who = (f"pid {previous.get('pid')} on host "
                 f"{previous.get('host', '?')} (since "
                 f"{previous.get('since', '?')})" if "pid" in previous
                 else "an unknown run (an unreadable record)")
          on_takeover(
              f"taking over the lock of the workdir {self.workdir} from "
              f"{who}: that run ended without releasing it (killed?)")
      record = dict(pid=os.getpid(), host=socket.gethostname(),
                    since=time.strftime("%Y-%m-%d %H:%M:%S"),
                    argv=list(sys.argv))
      data = (json.dumps(record) + "\n").encode()
      os.ftruncate(fd, 0)
      if os.pwrite(fd, data, 0) != len(data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
    except BaseException:
      os.close(fd)  # drops the flock too
      raise
    self._fd = fd
    _held.append(self)
    return self

  def _holder_record(self, fd):
    """The holder's record; waits a little for one that is being written
    (the holder takes the lock, then writes its record)."""
    for _ in range(20):
      record = _read_record(fd)
      if record:
        return record
      time.sleep(0.05)
    return record

  def _locked(self, record, no_flock=False):
    text = (f"the workdir {self.workdir} is in use by another run: "
            f"{describe_holder(record)} (lock file {self.path}). Wait until "
            f"that run ends or stop it, or choose another --workdir.")
    if no_flock:
      text += (f" (This file system does not support flock, so the lock is "
               f"only that record: if the run is gone, delete {self.path}.)")
    return WorkdirLockedError(text, record or {})

  def release(self):
    """Empties the record and drops the lock (a no-op if not held)."""
    fd, self._fd = self._fd, None
    if fd is None:
      return
    if self in _held:
      _held.remove(self)
    try:
      os.ftruncate(fd, 0)  # never needs space: works on a full disk too
    except OSError:
      pass  # e.g. remounted read-only: the record stays, the lock goes
    finally:
      os.close(fd)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
    return False


def release_all():
  """Releases every lock this process holds: for an exit that skips the
  normal unwinding (os._exit after a second Ctrl-C)."""
  for lock in list(_held):
    lock.release()
