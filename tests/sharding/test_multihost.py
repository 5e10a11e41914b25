"""Two processes x 4 CPU devices = one 8-device mesh, equal to one process.

Launches `python -m experiments.multihost_check` twice (process ids 0
and 1, gloo CPU collectives, a free local port for the coordinator), which
trains an expert-parallel MoELayer for a few Adam steps on the global mesh
{'data': 2, 'expert': 4}; compares every output, gradient and parameter with
the same run in this (single, 8-device) process. Both children are killed if
they outlive the deadline.
"""

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moejax import sharding
from moejax.sharding import multihost
from experiments import multihost_check

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
DEADLINE_S = 110


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(tmp_path):
  port = _free_port()
  out = tmp_path / "multihost.npz"
  procs, logs = [], []
  for pid in range(2):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MOEJAX_", "JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               MOEJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               MOEJAX_NUM_PROCESSES="2", MOEJAX_PROCESS_ID=str(pid),
               MOEJAX_CPU_COLLECTIVES="gloo")
    log = open(tmp_path / f"process{pid}.log", "w")
    logs.append(log)
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "experiments.multihost_check", "--out",
         str(out), "--cpu-devices", "4"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs, logs, out


def _wait_or_kill(procs, deadline):
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    return False
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return True


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
  start = time.monotonic()
  procs, logs, out = _launch(tmp_path)
  try:
    # The single-process run, here, while the children compile.
    expect = multihost_check.run(sharding.make_mesh({"data": 2,
                                                     "expert": -1}))
    finished = _wait_or_kill(procs, start + DEADLINE_S)
  finally:
    for p in procs:  # our own children only
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  tails = "\n".join(
      f"--- process {i} ---\n" + (tmp_path / f"process{i}.log").read_text()[
          -3000:] for i in range(2))
  assert finished, f"multi-process run exceeded {DEADLINE_S}s\n{tails}"
  assert [p.returncode for p in procs] == [0, 0], tails
  got = dict(np.load(out))
  assert int(got.pop("num_processes")) == 2
  assert int(got.pop("num_devices")) == 8
  np.testing.assert_array_equal(got.pop("w_in_shard_shape"), [2, 8, 16])
  assert set(got) == set(expect) - {"w_in_shard_shape"}
  for name in got:
    np.testing.assert_allclose(got[name], expect[name], rtol=1e-5,
                               atol=1e-6, err_msg=name)
  assert time.monotonic() - start < 120


# --- initialize(): environment parsing (no processes started) ---------------


def test_initialize_single_process_is_noop():
  info = multihost.initialize(env={})
  assert info == multihost.ProcessInfo(0, 1, None, False)
  info = multihost.initialize(env={"MOEJAX_NUM_PROCESSES": "1"})
  assert not info.distributed
  assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("env, match", [
    ({"MOEJAX_COORDINATOR_ADDRESS": "h:1"}, "missing"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"},
     r"missing \['process id'\]"),
    ({"MOEJAX_NUM_PROCESSES": "two"}, "must be an integer"),
    ({"MOEJAX_NUM_PROCESSES": "0"}, ">= 1"),
    ({"MOEJAX_COORDINATOR_ADDRESS": "h:1", "MOEJAX_NUM_PROCESSES": "2",
      "MOEJAX_PROCESS_ID": "2"}, r"outside \[0, 2\)"),
    ({"MOEJAX_CPU_COLLECTIVES": "nccl"}, "unknown cpu_collectives"),
])
def test_initialize_errors(env, match):
  with pytest.raises(ValueError, match=match):
    multihost.initialize(env=env)
  assert not jax.distributed.is_initialized()
