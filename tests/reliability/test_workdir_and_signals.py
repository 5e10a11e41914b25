"""One run per workdir, Ctrl-C that saves, and a full disk at a resume
(issue 18, items 4 to 6), with real `experiments/train.py` processes of the
smoke config, real signals, real locks and a real full file system.

- A full disk when a run resumes (a small tmpfs in a user and mount
  namespace, filled up): one `training stopped:` line, exit status 1, and
  nothing left behind (no `metrics.jsonl.tmp`, no `.write_test.<pid>`).
- Two runs on one workdir: the second is refused with one line naming the
  holder (pid, host, since when) and exit status 75; the lock of a killed run
  is taken over with a message; every process of a multi-process run is
  refused together.
- SIGINT (Ctrl-C) saves the current step and exits with 130, like SIGTERM
  (143); a second Ctrl-C ends the run at once; Ctrl-C during start-up or the
  first compile ends it cleanly (no traceback, no segmentation fault).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from moejax.train import writers

import app_runs  # tests/reliability/app_runs.py

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
SMOKE = "--config=experiments/configs/lm_stdlib.py:size=smoke"
# A run that goes on until it is stopped (no saves or evals on the way).
LONG = ["--config.num_train_steps=100000", "--config.checkpoint_every=0",
        "--config.eval_every=0", "--config.log_every=1"]
HOST = socket.gethostname()
LOCK_NAME = "train.lock"  # moejax.train.workdir.LOCK_NAME
LOCKED = 75  # experiments/train.py's exit status for a workdir in use
# What experiments/train.py says when Ctrl-C ends it at once: a second
# Ctrl-C, or one before the training loop (start-up, building the model).
AT_ONCE = ("interrupted (SIGINT): stopped at once, without saving. "
           "Checkpoints already complete are intact (a partial save is never "
           "listed as one). Run the same command to resume.")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  base = tmp_path_factory.mktemp("workdir_signals")
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("MOEJAX_", "JAX_", "XLA_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             MOEJAX_DATA_DIR=str(base / "data"))
  return env


# The app as a user's terminal starts it: SIGINT at its default. A test run
# in the background of a non-interactive shell (nohup, `make test &`)
# inherits SIGINT ignored, which the app rightly keeps ignored; so the child
# resets it before exec'ing Python (a disposition set to SIG_DFL survives
# exec), without a preexec_fn in this multithreaded process.
APP = [sys.executable, "-c",
       "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
       "os.execv(sys.executable, [sys.executable] + sys.argv[1:])",
       "-m", "experiments.train"]


class Run(app_runs.AppRun):
  """One experiments/train.py process of the smoke config (SIGINT at its
  default, see APP); its output goes to files."""

  def __init__(self, env, workdir, *flags):
    super().__init__(env, workdir, *flags, cmd=[*APP, SMOKE])


_stopped = app_runs.stopped


def _clean(run):
  """No traceback, no crash of the interpreter."""
  for bad in ("Traceback", "Fatal Python error", "Segmentation fault"):
    assert bad not in run.stderr, run.tails()


def _steps(workdir):
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path) if n.isdigit())


def _train_steps(workdir):
  return [r["step"] for r in writers.read_jsonl(
      os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]


@pytest.fixture(autouse=True)
def _no_leftover_processes(request):
  """Kills what a failed test left running."""
  runs = []
  request.node.runs = runs
  yield
  for run in runs:
    run.kill()


def _start(request, env, workdir, *flags):
  run = Run(env, workdir, *flags)
  request.node.runs.append(run)
  return run


# ------------------------------------------------------------ item 4: disk


def _namespace_ok():
  try:
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True,
                          timeout=30).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


# The full disk is a real one: a tmpfs mounted in a user and mount namespace
# (`unshare -rm`), filled with a file, so writes fail with ENOSPC exactly as
# on a full disk; nothing outside the namespace sees the mount.
needs_mounts = pytest.mark.skipif(
    not _namespace_ok(), reason="needs `unshare -rm` (user and mount "
    "namespaces) for a small tmpfs")


def _train_cmd(workdir, *flags):
  args = [sys.executable, "-m", "experiments.train", SMOKE,
          f"--workdir={workdir}", *flags]
  return " ".join(f"'{a}'" for a in args)


def _in_namespace(env, script, timeout=300):
  return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO,
                        env=env, capture_output=True, text=True,
                        timeout=timeout)


RESUMABLE = ["--config.num_train_steps=30", "--config.checkpoint_every=5",
             "--config.eval_every=0", "--config.log_every=1"]


@pytest.fixture(scope="module")
def killed_run(env, tmp_path_factory):
  """A run of 30 steps whose last checkpoint (30) was never written, as
  when a kill comes during that save: it resumes from step 25 and drops
  the metrics of steps 26 to 30."""
  workdir = tmp_path_factory.mktemp("killed") / "w"
  Run(env, workdir, *RESUMABLE).ok()
  shutil.rmtree(workdir / "checkpoints" / "30")
  for name in os.listdir(workdir):
    if name.startswith(("summary", "tensorboard")):
      shutil.rmtree(workdir / name, ignore_errors=True)
  assert _steps(workdir) == [20, 25]
  return str(workdir)


# Writes every file under argv[1] (path: hex bytes) as JSON to argv[2].
_DUMP = """
import json, os, sys
out = {}
for root, _, files in os.walk(sys.argv[1]):
  for f in files:
    path = os.path.join(root, f)
    out[os.path.relpath(path, sys.argv[1])] = open(path, "rb").read().hex()
json.dump(out, open(sys.argv[2], "w"))
"""


@needs_mounts
def test_full_disk_at_resume_is_one_line_and_leaves_nothing_behind(
    env, killed_run, tmp_path):
  mount = tmp_path / "disk"
  mount.mkdir()
  workdir = mount / "w"
  ckpts = f"{workdir}/checkpoints"
  out, err, before, after = (tmp_path / n for n in ("out", "err", "before",
                                                     "after"))
  out2, err2 = tmp_path / "out2", tmp_path / "err2"
  (tmp_path / "dump.py").write_text(_DUMP)
  dump = f"{sys.executable} {tmp_path}/dump.py"
  # A copy of the killed run on a 4 MiB tmpfs, filled up but for 12 KiB:
  # config.json and the lock fit; rewriting metrics.jsonl (~18 KiB kept
  # of ~21 KiB) does not. Then the same command, with the space freed.
  script = (
      f"mount -t tmpfs -o size=4m tmpfs {mount} && "
      f"cp -r {killed_run} {workdir} && "
      f"{dump} {workdir} {before} && "
      f"(dd if=/dev/zero of={mount}/filler bs=4k 2>/dev/null; true) && "
      f"truncate -s -12K {mount}/filler && "
      f"{_train_cmd(workdir, *RESUMABLE)} >{out} 2>{err}; echo rc=$?; "
      f"{dump} {workdir} {after}; rm {mount}/filler; "
      f"{_train_cmd(workdir, *RESUMABLE)} >{out2} 2>{err2}; echo rc2=$?")
  proc = _in_namespace(env, script)
  stderr = err.read_text()
  assert "rc=1" in proc.stdout, proc.stdout + proc.stderr + stderr[-4000:]
  for bad in ("Traceback", "Fatal Python error"):
    assert bad not in stderr, stderr[-4000:]
  assert _stopped(stderr) == (
      f"could not write to the workdir {workdir}: OSError: [Errno 28] No "
      f"space left on device: '{workdir}/metrics.jsonl'. The newest complete "
      f"checkpoint is step 25 ({ckpts}/25). Make the workdir writable or "
      f"free space, then run the same command to resume.")
  # Nothing left behind, nothing changed: no temporary file, no write
  # probe; the metrics and the checkpoints as they were. (The lock file
  # stays, empty: it belongs to the workdir.)
  before = json.loads(before.read_text())
  after = json.loads(after.read_text())
  assert after.pop(LOCK_NAME, "") == ""
  before.pop(LOCK_NAME, None)
  assert sorted(after) == sorted(before)
  for name in before:
    if name != "config.json":  # rewritten, same content
      assert after[name] == before[name], name
  # With the space freed, the same command resumes from step 25.
  assert "rc2=0" in proc.stdout, err2.read_text()[-4000:]
  assert f"resumed from {ckpts}/25 (step 25," in out2.read_text()


@needs_mounts
def test_full_disk_write_check_leaves_no_probe(env, tmp_path):
  mount = tmp_path / "disk"
  mount.mkdir()
  workdir = mount / "w"
  out, err, listing = tmp_path / "out", tmp_path / "err", tmp_path / "ls"
  script = (
      f"mount -t tmpfs -o size=1m tmpfs {mount} && mkdir {workdir} && "
      f"(dd if=/dev/zero of={mount}/filler bs=4k 2>/dev/null; true) && "
      f"{_train_cmd(workdir, *RESUMABLE)} >{out} 2>{err}; echo rc=$?; "
      f"ls -A {workdir} >{listing}")
  proc = _in_namespace(env, script)
  stderr = err.read_text()
  assert "rc=1" in proc.stdout, proc.stdout + proc.stderr + stderr[-4000:]
  assert "Traceback" not in stderr
  assert listing.read_text().split() == []  # no .write_test.<pid>
  assert _stopped(stderr) == (
      f"cannot write to the workdir {workdir}: OSError: [Errno 28] No space "
      f"left on device. Nothing was started. Make it writable or free space "
      f"(or choose another --workdir), then run again.")


# ------------------------------------------------------------ item 5: lock


def _since_pattern():
  return r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def test_second_run_on_a_workdir_in_use_is_refused(env, tmp_path, request):
  workdir = str(tmp_path / "w")
  first = _start(request, env, workdir, *LONG)
  first.wait_for_step(3)
  config_before = open(os.path.join(workdir, "config.json")).read()

  second = _start(request, env, workdir, *LONG).wait(timeout=120)
  assert second.rc == LOCKED, second.tails()
  _clean(second)
  lock = os.path.join(workdir, LOCK_NAME)
  assert re.fullmatch(
      re.escape(f"the workdir {workdir} is in use by another run: pid "
                f"{first.pid} on host {HOST}, since ") + _since_pattern()
      + re.escape(f" (lock file {lock}). Wait until that run ends or stop "
                  f"it, or choose another --workdir."),
      second.stopped_line()), second.stopped_line()
  assert "mesh" not in second.stdout  # refused before anything was built
  assert open(os.path.join(workdir, "config.json")).read() == config_before

  # The first run goes on undisturbed, then is preempted as usual: its
  # metrics hold each step once, and the lock is released.
  step = first.wait_for_step(first.wait_for_step(3) + 3)
  first.proc.send_signal(signal.SIGTERM)
  assert first.wait().rc == 143, first.tails()
  steps = _train_steps(workdir)
  assert steps == list(range(1, len(steps) + 1)) and len(steps) >= step
  assert open(lock).read() == ""

  # Released: the same command resumes (no takeover message).
  saved = _steps(workdir)[-1]
  third = _start(request, env, workdir, *LONG[1:],
                 f"--config.num_train_steps={saved + 2}").ok()
  assert "taking over" not in third.stdout + third.stderr
  assert f"resumed from {workdir}/checkpoints/{saved}" in third.stdout


def test_lock_of_a_killed_run_is_taken_over_with_a_message(
    env, tmp_path, request):
  workdir = str(tmp_path / "w")
  killed = _start(request, env, workdir, *LONG)
  killed.wait_for_step(2)
  killed.proc.send_signal(signal.SIGKILL)
  killed.wait()
  lock = os.path.join(workdir, LOCK_NAME)
  record = json.load(open(lock))  # left behind by the kill
  assert (record["pid"], record["host"]) == (killed.pid, HOST)

  run = _start(request, env, workdir, "--config.num_train_steps=3").ok()
  warnings = [l for l in (run.stdout + run.stderr).splitlines()
              if "taking over" in l]
  assert len(warnings) == 1, run.tails()
  assert re.fullmatch(
      re.escape(f"WARNING: taking over the lock of the workdir {workdir} "
                f"from pid {killed.pid} on host {HOST} (since ")
      + _since_pattern()
      + re.escape("): that run ended without releasing it (killed?)"),
      warnings[0]), warnings[0]
  assert open(lock).read() == ""


def test_lock_in_process(tmp_path):
  """The lock itself: exclusive even within one process, a record of the
  holder, released by `release`, and a stale record taken over."""
  from moejax.train import errors  # pylint: disable=g-import-not-at-top
  from moejax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  assert workdir_lib.LOCK_NAME == LOCK_NAME
  workdir = str(tmp_path / "w")
  first = workdir_lib.WorkdirLock(workdir).acquire()
  try:
    record = json.load(open(os.path.join(workdir, LOCK_NAME)))
    assert (record["pid"], record["host"]) == (os.getpid(), HOST)
    with pytest.raises(errors.WorkdirLockedError) as e:
      workdir_lib.WorkdirLock(workdir).acquire()
    assert f"pid {os.getpid()} on host {HOST}, since " in str(e.value)
    assert e.value.holder["pid"] == os.getpid()
  finally:
    first.release()
  assert open(os.path.join(workdir, LOCK_NAME)).read() == ""

  # A record left by a process that is gone: taken over, with a message.
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  with open(os.path.join(workdir, LOCK_NAME), "w") as f:
    json.dump(dict(pid=gone.pid, host=HOST, since="2020-01-02 03:04:05"), f)
  messages = []
  with workdir_lib.WorkdirLock(workdir).acquire(on_takeover=messages.append):
    pass
  assert messages == [
      f"taking over the lock of the workdir {workdir} from pid {gone.pid} on "
      f"host {HOST} (since 2020-01-02 03:04:05): that run ended without "
      f"releasing it (killed?)"]

  # Where the file system has no flock, the record decides: a live pid on
  # this host holds the lock, a gone one does not, another host's cannot be
  # checked from here.
  assert workdir_lib.holder_alive(dict(pid=os.getpid(), host=HOST)) is True
  assert workdir_lib.holder_alive(dict(pid=gone.pid, host=HOST)) is False
  assert workdir_lib.holder_alive(dict(pid=1, host=HOST + "-other")) is None


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_two(env, tmp_path, workdir, tag, *flags):
  """A two-process run (jax.distributed, 2 x 2 CPU devices, gloo)."""
  port = _free_port()
  procs, logs = [], []
  for pid in range(2):
    penv = dict(env, MOEJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                MOEJAX_NUM_PROCESSES="2", MOEJAX_PROCESS_ID=str(pid),
                MOEJAX_CPU_COLLECTIVES="gloo")
    log = tmp_path / f"{tag}{pid}.log"
    with open(log, "w") as f:
      procs.append(subprocess.Popen(
          [*APP, SMOKE,
           f"--workdir={workdir}", "--config.num_cpu_devices=2",
           "--config.data.validation_fraction=0.25", *flags],
          cwd=REPO, env=penv, stdout=f, stderr=subprocess.STDOUT))
    logs.append(log)
  return procs, logs


def _wait_all(procs, logs, timeout):
  deadline = time.monotonic() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = [log.read_text() for log in logs]
  tails = "\n".join(f"--- process {i} (rc {p.returncode}) ---\n{t[-3000:]}"
                    for i, (p, t) in enumerate(zip(procs, texts)))
  return [p.returncode for p in procs], texts, tails


@pytest.fixture(scope="module")
def two_process_data(env):
  """The dataset of the two-process runs, built once here (not by two
  processes at the same time)."""
  sys.path.insert(0, REPO)
  from experiments.configs import lm_stdlib  # pylint: disable=g-import-not-at-top
  from moejax.train import loop  # pylint: disable=g-import-not-at-top
  config = lm_stdlib.get_config("size=smoke")
  config.data.validation_fraction = 0.25
  config.data.data_dir = env["MOEJAX_DATA_DIR"]
  loop.make_datasets(config)


def test_every_process_of_a_multi_process_run_is_refused(
    env, tmp_path, two_process_data):
  from moejax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "w")
  with workdir_lib.WorkdirLock(workdir).acquire():  # held by this process
    procs, logs = _launch_two(env, tmp_path, workdir, "locked",
                              "--config.num_train_steps=5")
    rcs, texts, tails = _wait_all(procs, logs, timeout=180)
  assert rcs == [LOCKED, LOCKED], tails
  lines = [_stopped(t) for t in texts]
  assert lines[0].startswith(
      f"the workdir {workdir} is in use by another run: pid {os.getpid()} "
      f"on host {HOST}, since "), tails
  assert lines[1] == (
      f"the workdir {workdir} is in use by another run (process 0 found it "
      f"locked; see its message). Wait until that run ends or stop it, or "
      f"choose another --workdir."), tails
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))


# ------------------------------------------------------------ item 6: Ctrl-C


def test_ctrl_c_saves_the_current_step_and_exits_130(env, tmp_path, request):
  workdir = str(tmp_path / "w")
  run = _start(request, env, workdir, *LONG)
  run.wait_for_step(4)
  run.proc.send_signal(signal.SIGINT)
  assert run.wait().rc == 130, run.tails()
  _clean(run)
  message = run.stopped_line()
  step = int(message.split(" at step ")[1].split(":")[0])
  assert message == (
      f"interrupted (SIGINT) at step {step}: saved checkpoint {workdir}/"
      f"checkpoints/{step}. Run the same command to resume from step "
      f"{step}.")
  assert _steps(workdir) == [step] and step >= 4
  assert _train_steps(workdir) == list(range(1, step + 1))
  assert open(os.path.join(workdir, LOCK_NAME)).read() == ""

  again = _start(request, env, workdir, *LONG[1:],
                 f"--config.num_train_steps={step + 2}").ok()
  assert f"resumed from {workdir}/checkpoints/{step} (step {step}," in (
      again.stdout)
  assert _train_steps(workdir) == list(range(1, step + 3))


def test_second_ctrl_c_exits_at_once(env, tmp_path, request):
  workdir = str(tmp_path / "w")
  run = _start(request, env, workdir, *LONG)
  run.wait_for_step(4)
  run.proc.send_signal(signal.SIGINT)  # starts the save of the current step
  ckpts = os.path.join(workdir, "checkpoints")
  # The second Ctrl-C while that save is being written (orbax writes a step
  # into a temporary directory, renamed when complete).
  run.wait_for(lambda: any("orbax-checkpoint-tmp" in n
                           for n in os.listdir(ckpts)), "the save",
               timeout=60, every=0.001)
  run.proc.send_signal(signal.SIGINT)
  start = time.monotonic()
  assert run.wait().rc == 130, run.tails()
  assert time.monotonic() - start < 5, run.tails()
  _clean(run)
  assert run.stopped_line() == AT_ONCE
  # Whatever the second Ctrl-C cut short, the next run starts cleanly.
  steps = _steps(workdir)
  again = _start(request, env, workdir, *LONG[1:],
                 "--config.num_train_steps=8").ok()
  if steps:
    assert f"resumed from {workdir}/checkpoints/{steps[-1]}" in again.stdout


@pytest.mark.parametrize("when", ["start-up", "first compile"])
def test_ctrl_c_before_the_first_step_exits_cleanly(
    env, tmp_path, request, when):
  workdir = str(tmp_path / "w")
  run = _start(request, env, workdir, *LONG)
  if when == "start-up":  # importing JAX, validating, building the data
    time.sleep(1.5)
  else:  # the model is built; the first train step is being compiled
    run.wait_for(lambda: "params: total" in run.stdout, "the model")
  run.proc.send_signal(signal.SIGINT)
  assert run.wait().rc == 130, run.tails()
  _clean(run)
  message = run.stopped_line()
  assert message.startswith("interrupted (SIGINT)"), message
  if " at step " in message:  # the first step completed: it was saved
    step = int(message.split(" at step ")[1].split(":")[0])
    assert _steps(workdir) == [step]
  else:
    assert message in (AT_ONCE, "interrupted (SIGINT) before step 1: "
                       "nothing new to save. Run the same command to "
                       "resume."), message


@pytest.mark.slow
def test_ctrl_c_to_a_multi_process_run_stops_all_at_one_saved_step(
    env, tmp_path, two_process_data):
  """A terminal's Ctrl-C reaches every process it started: each hands it
  to JAX's preemption service, so all save one agreed step together (a
  save is a collective) and exit with 130."""
  workdir = str(tmp_path / "w")
  procs, logs = _launch_two(env, tmp_path, workdir, "first", *LONG)
  start = time.monotonic()
  try:
    while len(_train_steps(workdir) if os.path.exists(
        os.path.join(workdir, "metrics.jsonl")) else []) < 5:
      assert all(p.poll() is None for p in procs), "a process exited early"
      assert time.monotonic() - start < 240, "no training progress"
      time.sleep(0.05)
    for p in procs:
      p.send_signal(signal.SIGINT)
  finally:
    rcs, texts, tails = _wait_all(procs, logs, timeout=240)
  assert rcs == [130, 130], tails
  steps = [re.findall(r"interrupted \(SIGINT\) at step (\d+): saved "
                      r"checkpoint", t) for t in texts]
  assert steps[0] and steps[0] == steps[1], tails
  assert _steps(workdir) == [int(steps[0][0])], tails
  for text in texts:
    assert "Traceback" not in text, tails
