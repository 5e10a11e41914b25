"""Multi-process setup over jax.distributed (several hosts, or processes).

`moejax.sharding.initialize()` is the one call to make at the top of a
program, before any other JAX call. It reads the process layout from its
arguments or the environment and starts JAX's distributed runtime; with one
process (nothing set) it does nothing, so the same script runs on a laptop
and on a cluster. After it, `jax.devices()` lists every process's devices and
`make_mesh` builds one global mesh over them.

Environment variables (the MOEJAX_ name wins over the JAX_ one):

  MOEJAX_COORDINATOR_ADDRESS / JAX_COORDINATOR_ADDRESS   host:port of process 0
  MOEJAX_NUM_PROCESSES       / JAX_NUM_PROCESSES         number of processes
  MOEJAX_PROCESS_ID          / JAX_PROCESS_ID            this process, 0..N-1
  MOEJAX_LOCAL_DEVICE_IDS    / JAX_LOCAL_DEVICE_IDS      e.g. "0,1" (optional)
  MOEJAX_DISTRIBUTED=auto    let jax detect the cluster (Cloud TPU pods,
                             SLURM, Open MPI) instead of the three above
  MOEJAX_CPU_COLLECTIVES     CPU cross-process collectives: gloo (default)
                             or mpi

A coordinator address, process count and process id must be given together
(or none, or MOEJAX_DISTRIBUTED=auto).
"""

import dataclasses
import logging
import os
from typing import Mapping, Optional, Sequence, Union

import jax

COORDINATOR_ENV = ("MOEJAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
NUM_PROCESSES_ENV = ("MOEJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES")
PROCESS_ID_ENV = ("MOEJAX_PROCESS_ID", "JAX_PROCESS_ID")
LOCAL_DEVICE_IDS_ENV = ("MOEJAX_LOCAL_DEVICE_IDS", "JAX_LOCAL_DEVICE_IDS")
AUTO_ENV = "MOEJAX_DISTRIBUTED"
CPU_COLLECTIVES_ENV = "MOEJAX_CPU_COLLECTIVES"
CPU_COLLECTIVES = ("gloo", "mpi")


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  """This process's place in the run.

  process_id, num_processes: from jax after initialisation (0, 1 alone).
  coordinator_address: the address used, or None.
  distributed: whether jax.distributed is running (False: single process).
  """
  process_id: int
  num_processes: int
  coordinator_address: Optional[str]
  distributed: bool


def _env(names, env):
  for name in names:
    value = env.get(name)
    if value not in (None, ""):
      return value
  return None


def _int(value, what, names):
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{what} must be an integer, got {value!r} (from the "
                     f"argument or {' / '.join(names)})") from None


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *,
               local_device_ids: Union[None, int, Sequence[int]] = None,
               auto: Optional[bool] = None,
               cpu_collectives: Optional[str] = None,
               num_cpu_devices: Optional[int] = None,
               initialization_timeout: int = 300,
               env: Optional[Mapping[str, str]] = None) -> ProcessInfo:
  """Starts jax.distributed for a multi-process run; a no-op for one process.

  Call it first thing, before any JAX computation or jax.devices().

  Args:
    coordinator_address: 'host:port' of process 0 (every process passes the
      same); default from the environment (module docstring).
    num_processes, process_id: the run's process count and this process's
      id; default from the environment.
    local_device_ids: restrict this process to these local devices.
    auto: True lets jax.distributed detect the cluster (TPU pod, SLURM, Open
      MPI); default MOEJAX_DISTRIBUTED=auto.
    cpu_collectives: 'gloo' (default) or 'mpi': how CPU devices of different
      processes talk (jax_cpu_collectives_implementation). Ignored by GPU and
      TPU.
    num_cpu_devices: set jax_num_cpu_devices (CPU devices per process), e.g.
      to emulate hosts on one machine.
    initialization_timeout: seconds to wait for all processes.
    env: the environment to read (default os.environ).
  Returns:
    ProcessInfo.
  Raises:
    ValueError: a partial layout (say an address without a process count),
      a non-integer count or id, an id outside [0, num_processes), an
      unknown cpu_collectives.
  """
  env = os.environ if env is None else env
  if jax.distributed.is_initialized():
    return ProcessInfo(jax.process_index(), jax.process_count(),
                       coordinator_address, True)
  address = coordinator_address or _env(COORDINATOR_ENV, env)
  nproc = num_processes if num_processes is not None else _env(
      NUM_PROCESSES_ENV, env)
  pid = process_id if process_id is not None else _env(PROCESS_ID_ENV, env)
  if local_device_ids is None:
    ids = _env(LOCAL_DEVICE_IDS_ENV, env)
    if ids is not None:
      local_device_ids = [int(i) for i in str(ids).split(",") if i.strip()]
  if auto is None:
    auto = str(env.get(AUTO_ENV, "")).lower() in ("auto", "1", "true")
  collectives = cpu_collectives or env.get(CPU_COLLECTIVES_ENV) or "gloo"
  if collectives not in CPU_COLLECTIVES:
    raise ValueError(f"unknown cpu_collectives {collectives!r}; allowed: "
                     f"{list(CPU_COLLECTIVES)}")
  if num_cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", int(num_cpu_devices))
  if nproc is not None:
    nproc = _int(nproc, "num_processes", NUM_PROCESSES_ENV)
    if nproc < 1:
      raise ValueError(f"num_processes must be >= 1, got {nproc}")
  if pid is not None:
    pid = _int(pid, "process_id", PROCESS_ID_ENV)
  given = {"coordinator address": address, "process count": nproc,
           "process id": pid}
  if not auto:
    if all(v is None for v in given.values()) or nproc == 1:
      return ProcessInfo(0, 1, None, False)
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise ValueError(
          f"multi-process setup is partial: missing {missing}. Set all of "
          f"{COORDINATOR_ENV[0]}, {NUM_PROCESSES_ENV[0]}, {PROCESS_ID_ENV[0]} "
          f"(or their JAX_ twins), or {AUTO_ENV}=auto on a cluster jax "
          f"detects")
    if not 0 <= pid < nproc:
      raise ValueError(f"process_id {pid} is outside [0, {nproc})")
  jax.config.update("jax_cpu_collectives_implementation", collectives)
  logging.info("moejax: jax.distributed.initialize(%s, %s, %s)", address,
               nproc, pid)
  jax.distributed.initialize(
      coordinator_address=address, num_processes=nproc, process_id=pid,
      local_device_ids=local_device_ids,
      initialization_timeout=initialization_timeout)
  return ProcessInfo(jax.process_index(), jax.process_count(), address, True)


def shutdown():
  """Stops jax.distributed if this process started it (safe to call twice)."""
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()
