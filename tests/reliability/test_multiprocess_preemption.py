"""SIGTERM to one process of a two-process run (jax.distributed, 2 x 2 CPU
devices, gloo): every process stops at the same step, saves that step
together and exits with 143; the same command resumes both from it.

A save is a collective, so a process that stopped on its own signal would
wait forever for the others (what happened before moejax used JAX's
preemption service, moejax.train.loop.PreemptionGuard).
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
LM = "experiments/configs/lm_stdlib.py:size=smoke"
# 2 validation documents of 8 files, so that each process gets one.
FLAGS = ["--config.num_cpu_devices=2", "--config.data.validation_fraction=0.25",
         "--config.checkpoint_every=1000", "--config.eval_every=1000",
         "--config.log_every=1"]
DEADLINE_S = 240


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(tmp_path, workdir, steps, tag, *extra):
  port = _free_port()
  procs = []
  for pid in range(2):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MOEJAX_", "JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               MOEJAX_DATA_DIR=str(tmp_path / "data"),
               MOEJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               MOEJAX_NUM_PROCESSES="2", MOEJAX_PROCESS_ID=str(pid),
               MOEJAX_CPU_COLLECTIVES="gloo")
    log = tmp_path / f"{tag}{pid}.log"
    with open(log, "w") as f:
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "experiments.train", f"--config={LM}",
           f"--workdir={workdir}", f"--config.num_train_steps={steps}",
           *FLAGS, *extra], cwd=REPO, env=env, stdout=f,
          stderr=subprocess.STDOUT))
  return procs, [tmp_path / f"{tag}{pid}.log" for pid in range(2)]


def _finish(procs, logs, deadline):
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
  tails = "\n".join(f"--- process {i} ---\n{t[-3000:]}"
                    for i, t in enumerate(texts))
  return [p.returncode for p in procs], texts, tails


def _steps_logged(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for line in f if '"train/loss"' in line)


def _make_data(tmp_path):
  """Builds the dataset once here, not in two processes at the same time."""
  sys.path.insert(0, REPO)
  from experiments.configs import lm_stdlib  # pylint: disable=g-import-not-at-top
  from moejax.train import loop  # pylint: disable=g-import-not-at-top
  config = lm_stdlib.get_config("size=smoke")
  config.data.validation_fraction = 0.25
  config.data.data_dir = str(tmp_path / "data")
  loop.make_datasets(config)


@pytest.mark.slow
def test_two_processes_keep_the_newest_checkpoints(tmp_path):
  # Saves at 2, 4, 6, 8, 10 with max_to_keep 3: process 0 deletes the old
  # steps once a newer save is complete, without a barrier; neither process
  # hangs and nothing half-deleted is left.
  _make_data(tmp_path)
  workdir = str(tmp_path / "run")
  start = time.monotonic()
  procs, logs = _launch(tmp_path, workdir, 10, "keep",
                        "--config.checkpoint_every=2",
                        "--config.max_checkpoints_to_keep=3")
  rcs, _, tails = _finish(procs, logs, start + DEADLINE_S)
  assert rcs == [0, 0], tails
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
      "10", "6", "8"], tails


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_one_saved_step(tmp_path):
  _make_data(tmp_path)
  workdir = str(tmp_path / "run")
  start = time.monotonic()
  procs, logs = _launch(tmp_path, workdir, 5000, "first")
  try:
    while _steps_logged(workdir) < 15:
      assert all(p.poll() is None for p in procs), "a process exited early"
      assert time.monotonic() - start < DEADLINE_S, "no training progress"
      time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)  # process 1 only, not the main one
  finally:
    rcs, texts, tails = _finish(procs, logs, start + DEADLINE_S)
  assert rcs == [143, 143], tails
  steps = [re.findall(r"preempted \(SIGTERM\) at step (\d+): saved "
                      r"checkpoint", t) for t in texts]
  assert steps[0] and steps[0] == steps[1], tails  # one agreed step
  step = int(steps[0][0])
  assert 15 <= step < 5000
  ckpts = sorted(int(n) for n in os.listdir(os.path.join(workdir,
                                                         "checkpoints"))
                 if n.isdigit())
  assert ckpts == [step], ckpts

  # The same command (a few more steps) resumes both processes from it.
  start = time.monotonic()
  procs, logs = _launch(tmp_path, workdir, step + 5, "second")
  rcs, texts, tails = _finish(procs, logs, start + DEADLINE_S)
  assert rcs == [0, 0], tails
  for text in texts:
    assert f"resumed from {workdir}/checkpoints/{step} (step {step}" in text, (
        tails)
  assert f"steps {step + 5}" in texts[0], tails
