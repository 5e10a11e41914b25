"""experiments/sweep.py and experiments/report.py.

In process: grid expansion, run names, and the errors of bad grids (before
anything runs). In subprocesses: a two-run smoke sweep that is interrupted
(SIGTERM) after the first run finished and the second saved a checkpoint,
then started again: the first run is skipped, the second resumes from its
checkpoint, and results.csv has both rows. report.py then draws its PNGs
from that sweep.
"""

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from experiments import sweep  # noqa: E402  pylint: disable=g-import-not-at-top

LM = str(ROOT / "experiments" / "configs" / "lm_stdlib.py")
STUDY = str(ROOT / "experiments" / "configs" / "router_study.py")


# ------------------------------------------------------------- in process


def test_parse_argv_takes_out_the_sweep_and_config_flags():
  rest, axes, fixed = sweep.parse_argv([
      "--sweep_dir=x", "--sweep.moe.router.k=1,2", "--config.seed=3",
      "--sweep.config_arg=dense;size=smoke,router=top1", "--parallel=2"])
  assert rest == ["--sweep_dir=x", "--parallel=2"]
  assert axes == {"moe.router.k": ["1", "2"],
                  "config_arg": ["dense", "size=smoke,router=top1"]}
  assert fixed == {"seed": "3"}


def test_grid_is_file_points_times_flag_axes():
  points = sweep.expand_points([{"config_arg": "a"}, {"x": 1}],
                               {"seed": [0, 1]})
  assert points == [{"config_arg": "a", "seed": 0},
                    {"config_arg": "a", "seed": 1},
                    {"x": 1, "seed": 0}, {"x": 1, "seed": 1}]
  assert sweep.expand_points(None, {}) == [{}]


def test_run_names_come_from_the_overrides():
  assert sweep.run_name({}) == "default"
  assert sweep.run_name({"config_arg": "dense,router=top1",
                         "moe.experts.num_experts": 16,
                         "moe.capacity_factor": 1.0,
                         "moe.router.renormalize": True}) == (
                             "dense+router=top1,moe.experts.num_experts=16,"
                             "moe.capacity_factor=1.0,"
                             "moe.router.renormalize=true")


def test_make_runs_types_the_values_and_builds_the_commands(tmp_path):
  runs = sweep.make_runs(
      f"{LM}:size=smoke", str(tmp_path), file_grid=False,
      axes={"moe.capacity_factor": ["1", "2.5"],
            "moe.router.renormalize": ["false"],
            "moe.engine.tile": ["64"]},  # an unset (None) option, typed
      fixed={"num_train_steps": "4"}, check=False)
  assert [r.name for r in runs] == [
      "moe.capacity_factor=1.0,moe.router.renormalize=false,"
      "moe.engine.tile=64",
      "moe.capacity_factor=2.5,moe.router.renormalize=false,"
      "moe.engine.tile=64"]
  assert runs[0].point == {"moe.capacity_factor": 1.0,
                           "moe.router.renormalize": False,
                           "moe.engine.tile": 64}
  assert runs[0].total_steps == 4
  assert runs[0].config["moe"]["engine"] == {
      "name": "indices", "tile": 64, "gmm": None, "backend": None}
  name = ("moe.capacity_factor=2.5,moe.router.renormalize=false,"
          "moe.engine.tile=64")
  assert runs[1].argv == [
      f"--config={LM}:size=smoke", "--config.num_train_steps=4",
      "--config.moe.capacity_factor=2.5",
      "--config.moe.router.renormalize=false", "--config.moe.engine.tile=64",
      f"--workdir={tmp_path}/{name}"]


@pytest.mark.parametrize("axes,fixed,match", [
    ({"moe.experts.num_expert": ["4"]}, {},
     r"unknown config field 'moe.experts.num_expert'"
     r".*moe.experts.num_experts"),
    ({"moe.k": ["1"]}, {}, r"unknown config field 'moe.k'"),  # flat form
    ({"moe.router.k": []}, {}, "empty value list"),
    ({"moe.router.k": ["1", "2.5"]}, {},
     r"moe.router.k='2.5': expected a value of type int"),
    ({"moe.router.renormalize": ["maybe"]}, {}, "type bool"),
    ({"moe.capacity_factor": ["big"]}, {}, "type float"),
    ({"moe": ["1"]}, {}, "is a ConfigDict"),
    ({"moe.router": ["top_k"]}, {}, "is a ConfigDict"),
    ({}, {"seed": "x"}, "type int"),
    ({"seed": ["1"]}, {"seed": "2"}, "also swept"),
    ({"config_arg": ["size=huge"]}, {}, r"get_config\('size=huge'\)"),
])
def test_bad_grids_fail_before_anything_runs(tmp_path, axes, fixed, match):
  with pytest.raises(sweep.GridError, match=match):
    sweep.make_runs(LM, str(tmp_path / "s"), file_grid=False, axes=axes,
                    fixed=fixed, check=False)
  assert not (tmp_path / "s").exists()


def test_bad_file_points_and_invalid_configs_fail(tmp_path):
  # The file grid crossed with a flag that the grid also sets.
  with pytest.raises(sweep.GridError, match="--nofile_grid"):
    sweep.make_runs(LM, str(tmp_path),
                    axes={"moe.experts.num_experts": ["2"]}, check=False)
  # A config that validate_config rejects, and a model that cannot build
  # (k > E and an option the router does not take: validate_config builds
  # the model abstractly and names the field).
  with pytest.raises(sweep.GridError, match="batch_size"):
    sweep.make_runs(f"{LM}:size=smoke", str(tmp_path), file_grid=False,
                    axes={"batch_size": ["0"]})
  with pytest.raises(sweep.GridError, match=(
      r"'moe.router.k': '5'.*config.moe.router.k=5: k must be an integer "
      r"with 1 <= k <= num_experts \(4\)")):
    sweep.make_runs(f"{LM}:size=smoke", str(tmp_path), file_grid=False,
                    axes={"moe.router.k": ["5"]})
  with pytest.raises(sweep.GridError, match=(
      r"config.moe.router.bias_update_rate=0.1: TokenChoiceRouter does not "
      r"take option 'bias_update_rate'")):
    sweep.make_runs(f"{LM}:size=smoke", str(tmp_path), file_grid=False,
                    axes={"moe.router.bias_update_rate": ["0.1"]})
  assert not os.listdir(tmp_path)


def test_runs_are_checked_against_the_devices_the_trainings_see(tmp_path):
  # The default config's mesh is data 2 x expert 4 = 8 devices.
  with pytest.raises(sweep.GridError, match=r"mesh.*6"):
    sweep.make_runs(LM, str(tmp_path), file_grid=False, check_models=False,
                    devices=(6, "gpu"))
  # On CPU the run asks for config.num_cpu_devices (8) itself.
  runs = sweep.make_runs(LM, str(tmp_path), file_grid=False,
                         check_models=False, devices=(1, "cpu"))
  assert len(runs) == 1
  count, backend = sweep.probe_devices()  # a subprocess, as main() asks
  assert backend == "cpu" and count >= 1


def test_existing_runs_with_another_config_are_found(tmp_path):
  runs = sweep.make_runs(f"{LM}:size=smoke", str(tmp_path), file_grid=False,
                         axes={"seed": ["0", "1"]}, check=False)
  assert sweep.changed_runs(runs) == []  # no workdirs yet
  for run in runs:
    os.makedirs(run.workdir)
    with open(os.path.join(run.workdir, "config.json"), "w") as f:
      json.dump(run.config, f)
  assert sweep.changed_runs(runs) == []  # what train.py wrote: the same
  # More steps or other logging: the same run, reused (it resumes).
  again = sweep.make_runs(f"{LM}:size=smoke", str(tmp_path), file_grid=False,
                          axes={"seed": ["0", "1"]}, check=False,
                          fixed={"num_train_steps": "999", "log_every": "3"})
  assert sweep.changed_runs(again) == []
  # Another learning rate: every run is flagged, naming the field.
  other = sweep.make_runs(f"{LM}:size=smoke", str(tmp_path), file_grid=False,
                          axes={"seed": ["0", "1"]}, check=False,
                          fixed={"optimizer.learning_rate": "0.5"})
  changed = sweep.changed_runs(other)
  assert [r.name for r, _ in changed] == ["seed=0", "seed=1"]
  field, old, new = changed[0][1][0]
  assert field == "optimizer.learning_rate" and new == 0.5 and old != 0.5


def test_prepare_data_builds_each_dataset_once_before_parallel_runs(
    tmp_path, monkeypatch):
  data_dir = tmp_path / "data"
  monkeypatch.setenv("MOEJAX_DATA_DIR", str(data_dir))
  runs = sweep.make_runs(f"{LM}:size=smoke", str(tmp_path / "s"),
                         file_grid=False, axes={"seed": ["0", "1", "2"]},
                         check=False)
  assert sweep.prepare_data(runs) == 1  # three seeds, one dataset
  built = [p for p in data_dir.rglob("dataset_info.json")]
  assert len(built) == 1, built


def test_the_router_study_grid_is_valid(tmp_path):
  # Every point's fields, types and model (shapes only), at the smoke size.
  runs = sweep.make_runs(f"{STUDY}:size=smoke", str(tmp_path))
  names = [r.name for r in runs]
  assert len(names) == len(set(names)) == 19
  assert "top2,moe.engine.name=dropless" in names and "vit_ec" in names
  assert "top1,moe.experts.num_experts=16" in names


_FAKE_TRAIN = """
import json, os, sys, time
workdir, steps, rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
time.sleep(0.3)
if rc == 0:
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump({"step": steps, "eval_ce_loss": 1.5, "moe_layers": [
        {"dropped_fraction": 0.1}, {"dropped_fraction": 0.3}]}, f)
print("fake run", workdir)
sys.exit(rc)
"""


def test_run_sweep_skips_finished_runs_and_reports_failures(tmp_path,
                                                            monkeypatch):
  # Fake trainings (no JAX): 'ok' runs write a summary, 'bad' exits 3.
  runs = [sweep.Run(name=n, point={"x": i}, config_arg="",
                    workdir=str(tmp_path / n), argv=[], total_steps=5)
          for i, n in enumerate(["done", "ok1", "bad", "ok2"])]
  os.makedirs(runs[0].workdir)
  with open(os.path.join(runs[0].workdir, "summary.json"), "w") as f:
    f.write('{"step": 5}')
  monkeypatch.setattr(sweep, "train_command", lambda run: [
      sys.executable, "-c", _FAKE_TRAIN, run.workdir, "5",
      "3" if run.name == "bad" else "0"])
  messages = []
  status = sweep.run_sweep(runs, str(tmp_path), parallel=2,
                           log=messages.append)
  assert status == {"done": "skipped", "ok1": "finished",
                    "bad": "failed (rc 3)", "ok2": "finished"}
  assert "fake run" in (tmp_path / "ok2" / "train.log").read_text()
  rows = sweep.write_results(runs, str(tmp_path), status)
  assert [r["status"] for r in rows] == ["finished", "finished",
                                         "failed (rc 3)", "finished"]
  assert rows[1]["dropped_fraction"] == pytest.approx(0.2)  # layer mean
  md = (tmp_path / "results.md").read_text()
  assert "Not finished: bad" in md


_SLOW_TRAIN = """
import os, signal, sys, time
def on_term(signum, frame):  # like train.py: a checkpoint takes a while
  time.sleep(1.5)
  sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
with open(os.path.join(sys.argv[1], "pid"), "w") as f:
  f.write(str(os.getpid()))
time.sleep(60)
"""


def test_run_sweep_signal_stops_every_training(tmp_path, monkeypatch):
  # Two trainings running, one queued; SIGTERM twice to the sweep (the
  # second while it waits for the trainings, which take 1.5 s to exit, as
  # train.py does while it saves): every training is stopped,
  # the statuses say which were interrupted, and nothing is left running.
  runs = [sweep.Run(name=n, point={}, config_arg="", workdir=str(tmp_path / n),
                    argv=[], total_steps=5) for n in ("a", "b", "c")]
  monkeypatch.setattr(sweep, "train_command", lambda run: [
      sys.executable, "-c", _SLOW_TRAIN, run.workdir])
  pid_files = [tmp_path / n / "pid" for n in ("a", "b")]

  def send_signals():
    deadline = time.monotonic() + 60
    while not all(p.exists() and p.read_text() for p in pid_files):
      if time.monotonic() > deadline:
        return
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGTERM)

  stray = []  # a signal that got past the sweep lands here, not in pytest
  before = signal.signal(signal.SIGTERM, lambda *a: stray.append(a[0]))
  try:
    threading.Thread(target=send_signals, daemon=True).start()
    with pytest.raises(sweep.SweepInterrupted) as info:
      sweep.run_sweep(runs, str(tmp_path), parallel=2, log=lambda m: None)
    handler_after = signal.getsignal(signal.SIGTERM)
  finally:
    restored = signal.signal(signal.SIGTERM, before)
  assert not stray, "the second SIGTERM was not absorbed by the sweep"
  assert handler_after is restored  # run_sweep put the handler back
  assert info.value.status == {"a": "interrupted", "b": "interrupted",
                               "c": "not run"}
  for p in pid_files:
    with pytest.raises(ProcessLookupError):
      os.kill(int(p.read_text()), 0)
  assert not (tmp_path / "c").exists()


def test_run_sweep_reports_a_clean_early_exit_as_stopped(tmp_path,
                                                         monkeypatch):
  # rc 0 without reaching the last step (config.stop_after_steps): not a
  # failure, and the next sweep continues the run.
  run = sweep.Run(name="early", point={}, config_arg="",
                  workdir=str(tmp_path / "early"), argv=[], total_steps=5)
  monkeypatch.setattr(sweep, "train_command", lambda run: [
      sys.executable, "-c", "import sys; sys.exit(0)"])
  assert sweep.run_sweep([run], str(tmp_path), log=lambda m: None) == {
      "early": "stopped"}


def test_markdown_table_formats_the_metrics():
  rows = [{"run": "a", "status": "finished", "moe.router.k": 1,
           "eval_ce_loss": 2.0, "dropped_fraction": 0.125,
           "tokens_per_sec": 1234.5}]
  table = sweep.markdown_table(rows)
  assert table.splitlines()[0] == (
      "| run | moe.router.k | val loss | dropped | tokens/s |")
  assert table.splitlines()[2] == "| a | 1 | 2.0000 | 12.5% | 1,234 |"


def _fake_workdir(path, moe):
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"task": "lm", "moe": moe}, f)


def test_report_reads_the_nested_moe_config(tmp_path):
  from experiments import report  # pylint: disable=g-import-not-at-top
  nested = {"router": {"name": "token_choice", "k": 1, "gating": None},
            "engine": {"name": "dropless", "tile": None},
            "experts": {"num_experts": 8, "hidden_dim": None},
            "capacity_factor": 1.25}
  _fake_workdir(str(tmp_path / "a"), nested)
  run = report.RunData("top1,moe.engine.name=dropless", str(tmp_path / "a"))
  assert run.engine == "dropless" and run.num_experts == 8
  assert run.moe("router.name") == "token_choice"
  assert run.moe("router.gating", "unset") == "unset"  # None: not set
  assert run.moe("capacity_factor") == 1.25
  assert report._router_label(run) == "top1"  # pylint: disable=protected-access
  soft = {"layer": "soft_moe", "experts": {"num_experts": 4},
          "slots_per_expert": 2}
  _fake_workdir(str(tmp_path / "s"), soft)
  run = report.RunData("vit_soft", str(tmp_path / "s"))
  assert run.engine is None
  assert report._num_choices(run) == 8  # pylint: disable=protected-access
  # A workdir written before the nested config (moe.engine was the name).
  _fake_workdir(str(tmp_path / "old"), {"engine": "pallas",
                                        "num_experts": 16})
  run = report.RunData("top2,moe.engine=pallas", str(tmp_path / "old"))
  assert run.engine == "pallas" and run.num_experts == 16
  assert report._router_label(run) == "top2"  # pylint: disable=protected-access


# ------------------------------------------------------------- end to end

STEPS = 120          # long enough that run 2 is still training when stopped
CKPT_EVERY = 10


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  base = tmp_path_factory.mktemp("sweep_app")
  return base, dict(os.environ, JAX_PLATFORMS="cpu",
                    JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    MOEJAX_DATA_DIR=str(base / "data"))


def _sweep_cmd(sweep_dir):
  return [sys.executable, "-m", "experiments.sweep",
          f"--config={LM}:size=smoke", f"--sweep_dir={sweep_dir}",
          "--nofile_grid", "--sweep.seed=0,1",
          f"--config.num_train_steps={STEPS}",
          f"--config.checkpoint_every={CKPT_EVERY}",
          f"--config.eval_every={STEPS}"]


def _wait_for(predicate, proc, timeout, what):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      out = proc.stdout.read() if proc.stdout else ""
      pytest.fail(f"sweep exited (rc {proc.returncode}) before {what}:\n"
                  f"{out[-3000:]}")
    time.sleep(0.05)
  proc.kill()
  pytest.fail(f"timed out waiting for {what}")


def _checkpoints(workdir):
  path = workdir / "checkpoints"
  if not path.is_dir():
    return []
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_interrupted_sweep_resumes_and_reports(env):
  base, environ = env
  sweep_dir = base / "sweep"
  first, second = sweep_dir / "seed=0", sweep_dir / "seed=1"

  # 1. Start the sweep; stop it (SIGTERM) once run 1 finished and run 2 has
  # saved a checkpoint.
  proc = subprocess.Popen(_sweep_cmd(sweep_dir), cwd=ROOT, env=environ,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  _wait_for(lambda: (sweep.read_summary(str(first)) or {}).get("step")
            == STEPS, proc, 240, "run 1 finished")
  _wait_for(lambda: bool(_checkpoints(second)), proc, 240,
            "run 2's first checkpoint")
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0, out
  assert "interrupted" in out, out
  assert (sweep.read_summary(str(second)) or {}).get("step", 0) < STEPS, (
      "run 2 finished before the interruption")
  first_summary_mtime = os.path.getmtime(first / "summary.json")
  rows = {r["run"]: r for r in sweep.read_csv(str(sweep_dir / "results.csv"))}
  assert rows["seed=0"]["status"] == "finished"
  assert rows["seed=1"]["status"] == "interrupted"

  # 2. The same command again: run 1 is skipped, run 2 resumes.
  proc = subprocess.run(_sweep_cmd(sweep_dir), cwd=ROOT, env=environ,
                        capture_output=True, text=True, timeout=300)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-4000:]
  assert "[sweep] skip seed=0" in out and "[sweep] resume seed=1" in out, out
  assert os.path.getmtime(first / "summary.json") == first_summary_mtime
  log = (second / "train.log").read_text()
  assert "resumed from" in log, log[-3000:]
  assert (sweep.read_summary(str(second)) or {}).get("step") == STEPS

  with open(sweep_dir / "results.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == ["seed=0", "seed=1"]
  assert [r["seed"] for r in rows] == ["0", "1"]
  for row in rows:
    assert row["status"] == "finished" and row["step"] == str(STEPS)
    for key in ("eval_ce_loss", "train_ce_loss", "dropped_fraction",
                "max_over_mean_load", "router_entropy", "tokens_per_sec"):
      assert float(row[key]) >= 0, (key, row)
  assert rows[0]["eval_ce_loss"] != rows[1]["eval_ce_loss"]  # two seeds
  md = (sweep_dir / "results.md").read_text()
  assert "| run | seed | step | val loss |" in md

  # 3. The report: PNGs from the sweep.
  out_dir = base / "report"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.report",
       f"--sweep_dir={sweep_dir}", f"--out_dir={out_dir}"],
      cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for name in ("loss_lm.png", "expert_load.png", "dropped_vs_cf.png",
               "router_entropy.png"):
    data = (out_dir / name).read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000, name
    assert len(data) < 200_000, name
  assert "seed=1" in (out_dir / "results.md").read_text()
