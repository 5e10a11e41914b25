"""Faults injected into real `experiments/train.py` processes with real orbax
checkpoints: SIGKILL at seeded random steps, SIGTERM, corrupted checkpoints,
a read-only checkpoint directory, a full disk, NaNs under both policies, a
changed model config and an invalid config.

The uninterrupted run (40 steps of the smoke LM on 2 virtual CPU devices,
checkpoints every 4 steps) is the reference: every interrupted or repaired
run must end with bitwise-equal parameters, optimizer state, RNG state and
data position. All processes share a persistent compilation cache, so only
the first one of each kind compiles.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from moejax.train import writers

import app_runs  # tests/reliability/app_runs.py

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
STEPS = 40
BASE = [
    "--config=experiments/configs/lm_stdlib.py:size=smoke",
    f"--config.num_train_steps={STEPS}", "--config.checkpoint_every=4",
    "--config.eval_every=0", "--config.eval_steps=1",
    "--config.num_cpu_devices=2", "--config.mesh.data=2",
]
KILL_SEED = 8
# Resuming the finished reference run for 8 more steps, with a new learning
# rate and logging interval: changes a resume allows.
LONGER = ["--config.num_train_steps=48", "--config.optimizer.learning_rate=0.001",
          "--config.log_every=2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  base = tmp_path_factory.mktemp("faults")
  return dict(os.environ, JAX_PLATFORMS="cpu",
              JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              MOEJAX_DATA_DIR=str(base / "data"))


class Run(app_runs.AppRun):
  """One experiments/train.py process (BASE flags), output in files."""

  def __init__(self, env, workdir, *flags, prefix=()):
    super().__init__(env, workdir, *flags, cmd=[
        *prefix, sys.executable, "-m", "experiments.train", *BASE])


def _train_records(workdir):
  return [r for r in writers.read_jsonl(os.path.join(workdir,
                                                     "metrics.jsonl"))
          if "train/loss" in r]


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir,
                                                        "checkpoints"))
                if n.isdigit())


def _state(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, f"{prefix}/{k}")
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from _flatten(v, f"{prefix}/{i}")
  else:
    yield prefix, np.asarray(tree)


def assert_same_run(reference, workdir, step=STEPS):
  """Bitwise-equal state and data position at `step`, same losses."""
  a = dict(_flatten(_state(reference, step)))
  b = dict(_flatten(_state(workdir, step)))
  assert a.keys() == b.keys() and len(a) > 10
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  data = lambda d: json.load(open(os.path.join(
      d, "checkpoints", str(step), "data", "process_0-of-1.json")))
  assert data(reference) == data(workdir)
  losses = lambda d: [(r["step"], r["train/loss"])
                      for r in _train_records(d)]
  assert losses(workdir) == losses(reference)


@pytest.fixture(scope="module")
def straight(env, tmp_path_factory):
  """The uninterrupted run: the reference every other run is held to."""
  workdir = tmp_path_factory.mktemp("straight") / "w"
  Run(env, workdir).ok()
  assert _steps(workdir) == [32, 36, 40]
  return str(workdir)


def _copy(straight, tmp_path, name="w"):
  dst = tmp_path / name
  shutil.copytree(straight, dst)
  for f in os.listdir(dst):  # keep the copy free of the original's logs
    if f.startswith(("summary", "tensorboard")):
      shutil.rmtree(dst / f, ignore_errors=True)
  return str(dst)


# ------------------------------------------------------------ kill, SIGTERM


def test_kills_and_a_preemption_at_random_steps_lose_nothing(
    env, straight, tmp_path):
  rng = random.Random(KILL_SEED)
  k1, k2, k3 = rng.randint(3, 12), rng.randint(17, 24), rng.randint(31, 36)
  workdir = str(tmp_path / "w")

  # 1. SIGKILL at a random step: the newest complete checkpoint survives.
  run = Run(env, workdir)
  seen = run.wait_for_step(k1)
  assert run.signal(signal.SIGKILL).rc == -signal.SIGKILL
  first = _steps(workdir)[-1] if _steps(workdir) else 0
  assert first <= seen + 2

  # 2. Restart; SIGTERM (preemption) at a later random step: a checkpoint
  # of the current step is written before a clean exit with status 143.
  run = Run(env, workdir)
  run.wait_for_step(k2)
  assert run.signal(signal.SIGTERM).rc == 143, run.stderr[-3000:]
  assert run.stdout.count("resumed from") == (1 if first else 0)
  if first:
    assert f"resumed from {workdir}/checkpoints/{first} (step {first}," in (
        run.stdout)
  message = run.stopped_line()
  preempted = int(message.split(" at step ")[1].split(":")[0])
  assert message == (
      f"preempted (SIGTERM) at step {preempted}: saved checkpoint "
      f"{workdir}/checkpoints/{preempted}. Run the same command to resume "
      f"from step {preempted}.")
  assert k2 <= preempted < k3 and _steps(workdir)[-1] == preempted
  assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints"))
              if "tmp" in n]

  # 3. Restart: continues from the preempted step; SIGKILL again.
  run = Run(env, workdir)
  run.wait_for_step(k3)
  assert run.signal(signal.SIGKILL).rc == -signal.SIGKILL
  assert f"resumed from {workdir}/checkpoints/{preempted} (step " \
         f"{preempted}," in run.stdout

  # 4. The same command once more finishes the run: bitwise equal to the
  # uninterrupted one.
  run = Run(env, workdir).ok()
  assert "resumed from" in run.stdout
  assert_same_run(straight, workdir)


# ------------------------------------------------------------ checkpoints


def _largest_array_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(
      step_dir, "state", "d")) for f in fs]
  return max(files, key=os.path.getsize)


def test_corrupt_newest_checkpoints_fall_back_with_warnings(
    env, straight, tmp_path):
  workdir = _copy(straight, tmp_path)
  ckpts = os.path.join(workdir, "checkpoints")
  path = _largest_array_file(os.path.join(ckpts, "40"))
  with open(path, "r+b") as f:  # truncated array data
    f.truncate(os.path.getsize(path) // 2)
  shutil.rmtree(os.path.join(ckpts, "36", "meta"))  # missing metadata
  # A save that a kill interrupted.
  shutil.copytree(os.path.join(ckpts, "32"),
                  os.path.join(ckpts, "44.orbax-checkpoint-tmp"))

  run = Run(env, workdir).ok()
  warnings = [l for l in run.stdout.splitlines() if l.startswith("WARNING")]
  assert len(warnings) == 2, run.stdout[-3000:]
  assert warnings[0].startswith("WARNING: skipped checkpoint step 40: does "
                                "not load: ")
  assert warnings[0].endswith(f"; moved it to {ckpts}/40.corrupt")
  assert warnings[1] == (
      f"WARNING: skipped checkpoint step 36: missing item(s) ['meta'] in "
      f"{ckpts}/36; moved it to {ckpts}/36.corrupt")
  assert f"resumed from {ckpts}/32 (step 32," in run.stdout
  assert sorted(os.listdir(ckpts)) == ["32", "36", "36.corrupt", "40",
                                       "40.corrupt"]
  assert_same_run(straight, workdir)


def _namespace_ok():
  try:
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True,
                          timeout=30).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


needs_mounts = pytest.mark.skipif(
    not _namespace_ok(), reason="needs `unshare -rm` (user and mount "
    "namespaces) for a read-only mount and a small tmpfs")


def _in_namespace(env, script, timeout=300):
  """Runs a shell script in its own user + mount namespace."""
  proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO,
                        env=env, capture_output=True, text=True,
                        timeout=timeout)
  return proc


def _train_cmd(workdir, *flags):
  args = [sys.executable, "-m", "experiments.train", *BASE,
          f"--workdir={workdir}", *flags]
  return " ".join(f"'{a}'" for a in args)


@needs_mounts
def test_read_only_checkpoint_directory_and_workdir(env, straight, tmp_path):
  workdir = _copy(straight, tmp_path)
  ckpts = os.path.join(workdir, "checkpoints")
  before = {s: _tree_bytes(os.path.join(ckpts, str(s)))
            for s in _steps(workdir)}
  out, err = tmp_path / "out", tmp_path / "err"
  # The checkpoints become read-only during the run: resume from 40 (the
  # changes of LONGER are safe), then the save of step 44 fails.
  script = (f"mount --bind {ckpts} {ckpts} && "
            f"mount -o remount,bind,ro {ckpts} && "
            f"{_train_cmd(workdir, *LONGER)} >{out} 2>{err}; echo rc=$?")
  proc = _in_namespace(env, script)
  assert "rc=1" in proc.stdout, proc.stderr + err.read_text()[-3000:]
  assert f"resumed from {ckpts}/40" in out.read_text()
  line = _stopped(err.read_text())
  assert line == (
      f"could not save checkpoint step 44 in {ckpts}: OSError: [Errno 30] "
      f"Read-only file system: '{ckpts}/44.orbax-checkpoint-tmp'. Nothing "
      f"partial is listed as a checkpoint; the newest complete checkpoint is "
      f"step 40 ({ckpts}/40), and the checkpoints there are intact. Make the "
      f"directory writable or free space, then run the same command to "
      f"resume.")
  assert _steps(workdir) == [32, 36, 40]
  assert {s: _tree_bytes(os.path.join(ckpts, str(s)))
          for s in _steps(workdir)} == before

  # The whole workdir read-only: refused at the start, nothing compiled.
  script = (f"mount --bind {workdir} {workdir} && "
            f"mount -o remount,bind,ro {workdir} && "
            f"{_train_cmd(workdir, *LONGER)} >{out} 2>{err}; echo rc=$?")
  proc = _in_namespace(env, script)
  assert "rc=1" in proc.stdout
  assert _stopped(err.read_text()).startswith(
      f"cannot write to the workdir {workdir}: OSError: [Errno 30] Read-only "
      f"file system")
  assert "mesh" not in out.read_text()  # stopped before building anything


_tree_bytes = app_runs.tree_bytes
_stopped = app_runs.stopped


@needs_mounts
def test_full_disk_during_a_save(env, straight, tmp_path):
  mount = tmp_path / "disk"
  mount.mkdir()
  workdir = mount / "w"
  out, err, listing = tmp_path / "out", tmp_path / "err", tmp_path / "ls"
  # A 4 MiB tmpfs holding a copy of the run, filled up but for 64 KiB: the
  # metrics fit, the next checkpoint (~230 KiB) does not.
  script = (
      f"mount -t tmpfs -o size=4m tmpfs {mount} && "
      f"cp -r {straight} {workdir} && "
      f"(dd if=/dev/zero of={mount}/filler bs=4k 2>/dev/null; true) && "
      f"truncate -s -64K {mount}/filler && "
      + _train_cmd(workdir, *LONGER)
      + f" >{out} 2>{err}; echo rc=$?; ls {workdir}/checkpoints >{listing}")
  proc = _in_namespace(env, script)
  assert "rc=1" in proc.stdout, proc.stderr + err.read_text()[-3000:]
  assert f"resumed from {workdir}/checkpoints/40" in out.read_text()
  ckpts = f"{workdir}/checkpoints"
  assert _stopped(err.read_text()) == (
      f"could not save checkpoint step 44 in {ckpts}: OSError: [Errno 28] "
      f"No space left on device. Nothing partial is listed as a checkpoint; "
      f"the newest complete checkpoint is step 40 ({ckpts}/40), and the "
      f"checkpoints there are intact. Make the directory writable or free "
      f"space, then run the same command to resume.")
  # The partial save is only a temporary directory, never a step.
  assert listing.read_text().split() == ["32", "36", "40",
                                         "44.orbax-checkpoint-tmp"]


# ------------------------------------------------------------ NaN policies


def test_nan_stops_by_default(env, tmp_path):
  workdir = str(tmp_path / "w")
  run = Run(env, workdir, "--config.num_train_steps=12",
            "--config.inject_nan_steps=6").wait()
  assert run.rc == 1
  assert run.stopped_line() == (
      f"step 6: loss is nan, grad_norm is nan; stopping (nan_policy='stop'). "
      f"Checkpoints so far are intact (latest: step 4 in {workdir}/"
      f"checkpoints). To skip such steps instead, set nan_policy='skip'.")
  assert _steps(workdir) == [4]
  assert [r["step"] for r in _train_records(workdir)] == [1, 2, 3, 4, 5]


def test_nan_skip_policy_counts_and_stops_after_too_many_in_a_row(
    env, tmp_path):
  workdir = str(tmp_path / "w")
  run = Run(env, workdir, "--config.num_train_steps=12",
            "--config.nan_policy=skip", "--config.max_consecutive_nan_skips=3",
            "--config.inject_nan_steps=3,6,7,9,10,11").wait()
  assert run.rc == 1
  skipped = [l for l in run.stdout.splitlines() if "update skipped" in l]
  assert skipped == [
      "step 3: loss is nan, grad_norm is nan; update skipped (1 in a row, 1 "
      "in all)",
      "step 6: loss is nan, grad_norm is nan; update skipped (1 in a row, 2 "
      "in all)",
      "step 7: loss is nan, grad_norm is nan; update skipped (2 in a row, 3 "
      "in all)",
      "step 9: loss is nan, grad_norm is nan; update skipped (1 in a row, 4 "
      "in all)",
      "step 10: loss is nan, grad_norm is nan; update skipped (2 in a row, 5 "
      "in all)"]
  assert run.stopped_line() == (
      f"step 11: loss is nan, grad_norm is nan; 3 steps in a row skipped "
      f"(max_consecutive_nan_skips=3, 6 skipped in all); stopping. "
      f"Checkpoints so far are intact (latest: step 8 in {workdir}/"
      f"checkpoints).")
  records = writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in records if r.get("train/skipped")] == [
      3, 6, 7, 9, 10]
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 4, 5, 8]
  # The skips are counted in the checkpoint, and its params are finite.
  assert _steps(workdir) == [4, 8]
  meta = json.load(open(os.path.join(workdir, "checkpoints", "8", "meta",
                                     "metadata")))
  assert (meta["nan_skips_total"], meta["nan_skips_in_a_row"]) == (3, 0)
  for key, value in _flatten(_state(workdir, 8)):
    if value.dtype.kind == "f":
      assert np.isfinite(value).all(), key


# ------------------------------------------------------------ configs


def test_changed_model_config_is_refused(env, straight):
  config_before = open(os.path.join(straight, "config.json")).read()
  run = Run(env, straight, "--config.model.model_dim=64",
            "--config.moe.experts.num_experts=8",
            "--config.optimizer.learning_rate=0.01").wait()
  assert run.rc == 2
  message = run.stopped_line()
  lines = run.stderr.split("training stopped: ")[1].splitlines()
  assert message == (f"refusing to resume from {straight}/checkpoints/40: "
                     f"the config changes 2 field(s) that define the model "
                     f"or its data:")
  assert lines[1:3] == [
      "  model.model_dim: 32 (checkpoint) -> 64 (now)",
      "  moe.experts.num_experts: 4 (checkpoint) -> 8 (now)"]
  assert "Run with the checkpointed values, or start a new --workdir" in (
      run.stderr)
  assert "mesh" not in run.stdout  # refused before anything was built
  assert open(os.path.join(straight, "config.json")).read() == config_before


def test_invalid_config_fails_before_anything_starts(env, tmp_path):
  workdir = tmp_path / "w"
  run = Run(env, workdir, "--config.moe.router.k=5",
            "--config.model.dtype=float31", "--config.batch_size=7").wait()
  assert run.rc == 2
  text = run.stderr.split("training stopped: ")[1]
  assert text.splitlines()[:4] == [
      "3 config errors:",
      "  config.model.dtype='float31': allowed: ['float32', 'bfloat16', "
      "'float16']",
      "  config.moe.router.k=5: k must be an integer with 1 <= k <= "
      "num_experts (4), got 5",
      "  config.batch_size=7: the batch is split over mesh axes ['data', "
      "'fsdp', 'expert'] of sizes [2, 1, 1]; allowed: a multiple of 2"]
  assert not workdir.exists()
  assert "Traceback" not in run.stderr
