"""experiments.sweep --launcher=slurm through submitit's LocalExecutor
(--slurm_cluster=local): the same job array as on a cluster, as real local
processes. A two-run smoke grid: one stops early (stop_after_steps) and
resumes in the second sweep, the finished one is skipped and not
submitted again, and the results hold both rows."""

import csv
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("submitit")

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from experiments import sweep  # noqa: E402  pylint: disable=g-import-not-at-top
from experiments import sweep_slurm  # noqa: E402  pylint: disable=g-import-not-at-top

LM = str(ROOT / "experiments" / "configs" / "lm_stdlib.py")
STEPS = 4


def _sweep(base, env, *flags):
  return subprocess.run(
      [sys.executable, "-m", "experiments.sweep", f"--config={LM}:size=smoke",
       f"--sweep_dir={base / 'sweep'}", "--nofile_grid",
       "--sweep.moe.capacity_factor=1.0,2.0",
       f"--config.num_train_steps={STEPS}", "--config.checkpoint_every=2",
       f"--config.eval_every={STEPS}", "--launcher=slurm",
       "--slurm_cluster=local", "--slurm_time_min=10", *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_slurm_launcher_submits_skips_resumes_and_reports(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             MOEJAX_DATA_DIR=str(tmp_path / "data"))
  sweep_dir = tmp_path / "sweep"
  low = sweep_dir / "moe.capacity_factor=1.0"
  high = sweep_dir / "moe.capacity_factor=2.0"

  # 1. Both runs as one array, stopped after step 2 (a clean early exit).
  first = _sweep(tmp_path, env, "--config.stop_after_steps=2")
  out = first.stdout + first.stderr
  assert first.returncode == 0, out[-4000:]
  assert out.count("[sweep] submitted ") == 2, out
  assert "stopped before its last step" in out, out
  # Each run's workdir names its job (on SLURM '<array id>_<task>'; the
  # local executor's job ids are process ids).
  job_ids = [(d / "slurm_job.txt").read_text().split() for d in (low, high)]
  assert all(len(j) == 1 for j in job_ids) and job_ids[0] != job_ids[1]
  assert (sweep_dir / "slurm").is_dir()
  rows = {r["run"]: r for r in sweep.read_csv(str(sweep_dir / "results.csv"))}
  assert {r["status"] for r in rows.values()} == {"stopped"}, rows

  # 2. The same command (no stop): both resume from step 2 and finish.
  second = _sweep(tmp_path, env)
  out = second.stdout + second.stderr
  assert second.returncode == 0, out[-4000:]
  for d in (low, high):
    log = (d / "train.log").read_text()
    assert "resumed from" in log and "(step 2," in log, log[-3000:]
    assert (sweep.read_summary(str(d)) or {}).get("step") == STEPS
  with open(sweep_dir / "results.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == [low.name, high.name]
  assert [r["status"] for r in rows] == ["finished", "finished"]
  assert all(float(r["eval_ce_loss"]) > 0 for r in rows)

  # 3. Again: nothing to do, nothing submitted.
  third = _sweep(tmp_path, env)
  out = third.stdout + third.stderr
  assert third.returncode == 0, out[-4000:]
  assert "submitted" not in out, out
  assert out.count("[sweep] skip ") == 2, out


def test_a_failing_run_is_reported_with_its_exit_status(tmp_path):
  """In-process array (cluster='debug') of one run whose training refuses
  its flags (status 2): the sweep reports 'failed (rc 2)'."""
  run = sweep.Run(name="bad", point={}, config_arg="",
                  workdir=str(tmp_path / "bad"),
                  argv=[f"--config={LM}:size=smoke", "--config.nope=1",
                        f"--workdir={tmp_path / 'bad'}"], total_steps=4)
  executor = sweep_slurm.make_executor(str(tmp_path), cluster="debug")
  lines = []
  status = sweep_slurm.run_sweep_slurm([run], executor, log=lines.append,
                                       poll_s=0.05)
  assert status == {"bad": "failed (rc 2)"}, lines
  log = (tmp_path / "bad" / "train.log").read_text()
  assert "training stopped: --config.nope=1" in log, log


@pytest.mark.slow
def test_sigterm_cancels_the_jobs_which_save_and_resume(tmp_path):
  """SIGTERM to the sweep cancels its array: the training gets SIGTERM,
  saves the step it reached and exits; the same command resumes it. Also
  when the sweep was started with SIGINT ignored."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             MOEJAX_DATA_DIR=str(tmp_path / "data"))
  sweep_dir = tmp_path / "sweep"
  cmd = [sys.executable, "-m", "experiments.sweep",
         f"--config={LM}:size=smoke", f"--sweep_dir={sweep_dir}",
         "--nofile_grid", "--sweep.seed=0", "--config.num_train_steps=5000",
         "--config.checkpoint_every=5000", "--config.eval_every=0",
         "--launcher=slurm", "--slurm_cluster=local"]
  # Started with SIGINT ignored, as `nohup ... &` from a script starts it
  # (submitit's local cancel is a SIGINT to the job's controller).
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          preexec_fn=lambda: signal.signal(
                              signal.SIGINT, signal.SIG_IGN))
  log = sweep_dir / "seed=0" / "train.log"
  deadline = time.monotonic() + 300
  while not (log.exists() and "/5000 [" in log.read_text()):
    assert proc.poll() is None, proc.stdout.read()
    assert time.monotonic() < deadline, "no training step in 300 s"
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0, out
  assert "cancelling 1 job(s)" in out and "interrupted" in out, out
  text = log.read_text()
  assert "training stopped:" in text and "SIGTERM" in text, text[-3000:]
  saved = sorted(p.name for p in (sweep_dir / "seed=0" / "checkpoints")
                 .iterdir() if p.name.isdigit())
  assert saved, text[-3000:]
  rows = sweep.read_csv(str(sweep_dir / "results.csv"))
  assert [r["status"] for r in rows] == ["interrupted"]
  # The same command resumes from the saved step (stopped again early).
  again = subprocess.run(cmd + ["--config.stop_after_steps=" + str(
      int(saved[-1]) + 1)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
  assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
  assert "[sweep] submitted seed=0" in again.stdout, again.stdout
  assert f"(step {saved[-1]}," in log.read_text().split("resumed from")[-1]
