r"""`experiments.sweep --launcher=slurm`: the grid's unfinished runs as one
submitit job array, with the local launcher's skip, resume and results.

  python -m experiments.sweep --launcher=slurm --config=... --sweep_dir=... \
      [--slurm_partition=gpu] [--slurm_time_min=240] [--slurm_nodes=1] \
      [--slurm_gpus_per_node=8] [--slurm_cpus_per_task=16] \
      [--slurm_array_parallelism=8]

Each array task runs experiments/train.py for one run in a subprocess, with
its output appended to <workdir>/train.log as locally; submitit's own logs
(the job's stdout/stderr, the pickled call) go to <sweep_dir>/slurm/. A run
already finished is skipped and not submitted; any other resumes from its
newest checkpoint, so the same command continues a sweep whose jobs were
preempted, timed out or cancelled. The sweep waits for the array and writes
results.csv/results.md whenever a run ends, as the local launcher does.

With --slurm_nodes > 1 (or several tasks per node) every task of a run's job
starts its own training process and they join one multi-host run through
jax.distributed: MOEJAX_DISTRIBUTED=auto lets jax read the SLURM variables
(docs/sharding.md). Only task 0 writes train.log; task i writes
train.task<i>.log.

Ctrl-C or SIGTERM to the sweep cancels the array's jobs (the trainings get
SIGTERM, save a checkpoint and exit) and stops, like the local launcher.
`--slurm_cluster=local` runs the same array with submitit's LocalExecutor
on this machine (the tests use it); `debug` runs it in this process.
"""

import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_job(argv, workdir):
  """One array task: experiments/train.py `argv` in a subprocess; returns
  its exit status. Runs on the cluster node, inside the submitit job.

  SIGTERM or SIGINT to the job (scancel, a time limit, submitit's local
  cancel) is passed to the training once as SIGTERM: it saves and exits.
  """
  rank = int(os.environ.get("SLURM_PROCID", "0"))
  ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
  env = dict(os.environ)
  path = env.get("PYTHONPATH", "")
  if REPO not in path.split(os.pathsep):
    env["PYTHONPATH"] = REPO + (os.pathsep + path if path else "")
  if ntasks > 1:  # one process per task, joined through jax.distributed
    env.setdefault("MOEJAX_DISTRIBUTED", "auto")
  os.makedirs(workdir, exist_ok=True)
  name = "train.log" if rank == 0 else f"train.task{rank}.log"
  cmd = [sys.executable, "-m", "experiments.train", *argv]
  with open(os.path.join(workdir, name), "a") as logf:
    logf.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} job "
               f"{os.environ.get('SLURM_JOB_ID', os.getpid())} task {rank}/"
               f"{ntasks}: {' '.join(cmd[1:])}\n")
    logf.flush()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logf,
                            stderr=subprocess.STDOUT, start_new_session=True)
    sent = []

    def forward(signum, frame):
      del signum, frame
      if not sent and proc.poll() is None:
        sent.append(True)
        proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM,
                                                   signal.SIGINT)}
    try:
      return proc.wait()
    finally:
      for s, h in old.items():
        signal.signal(s, h)


def make_executor(sweep_dir, *, cluster="slurm", partition=None,
                  time_min=60, nodes=1, tasks_per_node=1, gpus_per_node=0,
                  cpus_per_task=None, mem_gb=None, array_parallelism=64,
                  name="moejax_sweep"):
  """A submitit AutoExecutor writing its logs to <sweep_dir>/slurm.

  cluster: 'slurm', 'local' (submitit's LocalExecutor: the same array as
    local processes) or 'debug' (in this process).
  """
  try:
    import submitit  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("--launcher=slurm needs submitit: pip install "
                      "'moejax[slurm]' (or pip install submitit)") from e
  executor = submitit.AutoExecutor(folder=os.path.join(sweep_dir, "slurm"),
                                   cluster=cluster)
  params = dict(name=name, timeout_min=int(time_min), nodes=int(nodes),
                tasks_per_node=int(tasks_per_node),
                slurm_array_parallelism=int(array_parallelism))
  if gpus_per_node:
    params["gpus_per_node"] = int(gpus_per_node)
  if cpus_per_task:
    params["cpus_per_task"] = int(cpus_per_task)
  if mem_gb:
    params["mem_gb"] = int(mem_gb)
  if partition:
    params["slurm_partition"] = partition
  executor.update_parameters(**params)
  return executor


def run_sweep_slurm(runs, executor, *, log=print, on_change=None,
                    poll_s=2.0, sweep=None):
  """Submits the unfinished runs as one job array and waits for it.

  Returns {run name: 'finished' | 'skipped' | 'stopped' | 'failed (rc N)'
  | 'failed (<job error>)' | 'not run'}, as experiments.sweep.run_sweep.
  SIGTERM/SIGINT cancel the jobs still running and raise
  `sweep.SweepInterrupted`.

  sweep: the experiments.sweep module the caller runs (its `__main__` when
    run as the app, whose SweepInterrupted the app catches); default: the
    imported one.
  """
  if sweep is None:
    from experiments import sweep  # pylint: disable=g-import-not-at-top,redefined-outer-name
  status, queue = {}, []
  for run in runs:
    if sweep.is_finished(run):
      status[run.name] = "skipped"
      log(f"[sweep] skip {run.name}: finished ({run.total_steps} steps)")
    else:
      status[run.name] = "not run"
      queue.append(run)
  if not queue:
    return status
  for run in queue:
    os.makedirs(run.workdir, exist_ok=True)
  # The array's tasks import experiments.* from this checkout.
  path = os.environ.get("PYTHONPATH", "")
  if REPO not in path.split(os.pathsep):
    os.environ["PYTHONPATH"] = REPO + (os.pathsep + path if path else "")
  stop = []

  def handler(signum, frame):
    del frame
    stop.append(signum)

  # Installed before submitting: a process started with SIGINT ignored
  # (`nohup ... &` from a script) passes SIG_IGN on to submitit's local
  # job controllers, which then ignore the SIGINT that cancels them; a
  # handled signal is reset to the default in a new program instead.
  old = {s: signal.signal(s, handler) for s in (signal.SIGTERM,
                                                 signal.SIGINT)}
  try:
    jobs = executor.map_array(train_job, [r.argv for r in queue],
                              [r.workdir for r in queue])
    for run, job in zip(queue, jobs):
      with open(os.path.join(run.workdir, "slurm_job.txt"), "a") as f:
        f.write(f"{job.job_id}\n")
      log(f"[sweep] submitted {run.name} as job {job.job_id}")
    pending = dict(zip([r.name for r in queue], zip(queue, jobs)))
    while pending and not stop:
      time.sleep(poll_s)
      for name, (run, job) in list(pending.items()):
        if not job.done():
          continue
        del pending[name]
        try:
          rc = job.result()
        except Exception as e:  # pylint: disable=broad-except
          status[name] = f"failed ({type(e).__name__})"
          log(f"[sweep] FAILED {name}: job {job.job_id}: "
              f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}")
        else:
          if rc == 0 and sweep.is_finished(run):
            status[name] = "finished"
            log(f"[sweep] done {name} (job {job.job_id})")
          elif rc == 0:
            status[name] = "stopped"
            log(f"[sweep] {name} stopped before its last step "
                f"(stop_after_steps); the same command continues it")
          else:
            status[name] = f"failed (rc {rc})"
            log(f"[sweep] FAILED {name} (rc {rc}); see "
                f"{os.path.join(run.workdir, 'train.log')}")
        if on_change:
          on_change(status)
    if stop:
      sig = signal.Signals(stop[0]).name
      log(f"[sweep] {sig}: cancelling {len(pending)} job(s); the same "
          f"command resumes them")
      for name, (run, job) in pending.items():
        status[name] = "interrupted"
        job.cancel(check=False)
      deadline = time.monotonic() + 120
      while (any(not job.done() for _, job in pending.values())
             and time.monotonic() < deadline):
        time.sleep(0.5)
      raise sweep.SweepInterrupted(status)
  finally:
    for s, h in old.items():
      signal.signal(s, h)
  return status
