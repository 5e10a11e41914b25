"""Issue 18, items 7, 9 and 10: group sizes checked for every batch the MoE
layers will see (training and evaluation, with expert parallelism), flag
errors that keep the exit-code promise (status 2, one line), and messages
that say what happened.

In process where a process adds nothing (validate_config, a compile
listener); real `experiments/train.py` processes for exit statuses, stdout
against stderr, and reruns of a workdir. All on the smoke LM config.
"""

import json
import os
import shutil
import subprocess
import sys

import ml_collections
import pytest

from moejax import train
from moejax.train import validation
from moejax.train import writers

import config_checks  # tests/reliability/config_checks.py

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
SMOKE = "--config=experiments/configs/lm_stdlib.py:size=smoke"


lm = config_checks.lm
_problems = config_checks.problems


def _one(config, field, *fragments, num_devices=1):
  return config_checks.one(config, field, *fragments,
                           num_devices=num_devices)


def _valid(config, num_devices=1):
  validation.validate_config(config, num_devices=num_devices, process_count=1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  base = tmp_path_factory.mktemp("messages")
  return dict(os.environ, JAX_PLATFORMS="cpu",
              JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              MOEJAX_DATA_DIR=str(base / "data"))


def _run(env, workdir, *flags):
  return subprocess.run(
      [sys.executable, "-m", "experiments.train", SMOKE,
       f"--workdir={workdir}", *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _stopped(proc):
  """The one `training stopped:` line, which must end stderr, and no
  traceback or absl FATAL."""
  lines = [l for l in proc.stderr.splitlines()
           if l.startswith("training stopped: ")]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert proc.stderr.rstrip().endswith(lines[0]), proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "FATAL" not in proc.stderr, (
      proc.stderr[-3000:])
  return lines[0][len("training stopped: "):]


# ------------------------------------------------ 7: group sizes vs batches


def test_group_size_must_divide_the_evaluation_tokens():
  # The case: 8 x 32 = 256 training tokens split into groups of 64,
  # but an eval batch of 3 x 32 = 96 tokens does not.
  c = lm()
  c.moe.group_size, c.moe.pad_groups, c.eval_batch_size = 64, False, 3
  _one(c, "moe.group_size", "=64", "96 tokens", "eval_batch_size 3",
       "pad_groups")
  c.eval_batch_size = 4  # 128 tokens: 2 groups
  _valid(c)
  c.data.eval_split = None  # no evaluation: only training batches count
  c.eval_batch_size = 3
  _valid(c)


def test_group_size_must_divide_the_training_tokens():
  c = lm()
  c.moe.group_size, c.moe.pad_groups = 96, False
  _one(c, "moe.group_size", "=96", "256 tokens", "batch_size 8",
       "pad_groups")
  c.moe.pad_groups = None  # the layer's default pads (with a warning)
  _valid(c)


def test_per_layer_group_size_is_named_where_it_is_set():
  c = lm()  # MoE at block 1
  c.moe.pad_groups = False
  c.moe.layers = ml_collections.ConfigDict({"1": {"group_size": 96}})
  _one(c, "moe.layers.1.group_size", "=96", "256 tokens")
  c = lm()
  c.moe.group_size = 96
  c.moe.layers = ml_collections.ConfigDict({"1": {"pad_groups": False}})
  _one(c, "moe.group_size", "=96", "256 tokens", "moe.layers.1.pad_groups")


def test_groups_must_split_over_the_token_devices_with_expert_parallelism():
  # lm_stdlib's default: 8 devices, mesh data=2 x expert=4, shard_map; 16 x
  # 128 = 2048 training tokens. Groups of 256: 8 groups, one per device, but
  # an eval batch of 8 x 128 = 1024 tokens makes only 4.
  c = lm("")
  c.moe.group_size, c.eval_batch_size = 256, 8
  _one(c, "moe.group_size", "=256", "1024 tokens", "4 groups",
       "8 devices", num_devices=8)
  c.moe.group_size = 128
  _valid(c, num_devices=8)
  # Padding (the default) makes ceil(2048 / 1000) = 3 groups: still uneven.
  c.moe.group_size = 1000
  _one(c, "moe.group_size", "=1000", "3 groups", num_devices=8)
  c.expert_parallel = ""  # without expert parallelism any count will do
  _valid(c, num_devices=8)


_compiles = config_checks.compiles


def test_group_size_error_comes_before_anything_compiles(tmp_path):
  # In process on 8 devices: 16 x 32 training tokens in groups of 512, an
  # eval batch of 8 x 32 = 256 tokens.
  c = lm()
  c.batch_size, c.eval_batch_size = 16, 8
  c.moe.group_size, c.moe.pad_groups = 512, False

  def run():
    with pytest.raises(train.ConfigError, match=r"config\.moe\.group_size="
                       r"512: .*256 tokens"):
      train.train_and_evaluate(c, str(tmp_path / "w"))
  assert not _compiles(run)
  assert not (tmp_path / "w").exists()


def test_group_size_error_exits_2_with_one_line(env, tmp_path):
  proc = _run(env, tmp_path / "w", "--config.moe.group_size=64",
              "--config.moe.pad_groups=False", "--config.eval_batch_size=3")
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = _stopped(proc)
  assert line.startswith("config.moe.group_size=64: "), line
  assert "96 tokens" in line
  assert not (tmp_path / "w").exists()


# ------------------------------------------------ 9: flag errors


@pytest.mark.parametrize("flag,fragments", [
    ("--config.batch_size=eight",
     ("--config.batch_size=eight: ", "an integer", "8")),
    ("--config.moe.capacity_facter=2",
     ("--config.moe.capacity_facter=2: ", "'capacity_facter'",
      "did you mean --config.moe.capacity_factor?")),
    ("--config.mo.capacity_factor=2",
     ("--config.mo.capacity_factor=2: ", "config has no field 'mo'",
      "did you mean --config.moe.capacity_factor?")),
    # The example: the field is two levels down.
    ("--config.moe.num_expert=8",
     ("--config.moe.num_expert=8: ", "config.moe has no field 'num_expert'",
      "did you mean --config.moe.experts.num_experts?")),
    ("--workdr=/tmp/x",
     ("--workdr=/tmp/x: unknown flag; did you mean --workdir?",)),
])
def test_flag_errors_exit_2_with_one_line(env, tmp_path, flag, fragments):
  proc = _run(env, tmp_path / "w", flag)
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = _stopped(proc)
  for fragment in fragments:
    assert fragment in line, (fragment, line)
  assert not (tmp_path / "w").exists()


def _run_config(env, workdir, config, *flags):
  return subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--config={config}",
       f"--workdir={workdir}", *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("config,hint", [
    ("experiments/configs/lm_stdlb.py",
     "did you mean --config=experiments/configs/lm_stdlib.py?"),
    ("experiments/configs/lm_stdlb.py:size=smoke",
     "did you mean --config=experiments/configs/lm_stdlib.py?"),
    ("no_such_dir/x.py", "pass a path to a config file (e.g. "
     "--config=experiments/configs/lm_stdlib.py)"),
])
def test_a_missing_config_file_is_named_with_a_hint(env, tmp_path, config,
                                                    hint):
  proc = _run_config(env, tmp_path / "w", config)
  assert proc.returncode == 2, proc.stderr[-3000:]
  path = config.split(":")[0]
  assert _stopped(proc) == (
      f"--config={config}: cannot load the config file {path!r} (no such "
      f"file); {hint}")
  assert "config_config" not in proc.stderr
  assert not (tmp_path / "w").exists()


def test_verbosity_asks_for_the_traceback(env, tmp_path):
  quiet = _run(env, tmp_path / "w", "--config.moe.num_expert=8")
  loud = _run(env, tmp_path / "w", "--config.moe.num_expert=8",
              "--verbosity=1")
  assert quiet.returncode == loud.returncode == 2
  assert "Traceback" not in quiet.stderr
  assert "Traceback (most recent call last)" in loud.stderr
  # The one line still ends stderr, the same with or without it.
  line = [l for l in quiet.stderr.splitlines() if l.startswith("training")]
  assert loud.stderr.rstrip().endswith(line[0])


# ------------------------------------------------ 10: messages


def test_infinite_numbers_are_refused_with_an_interval_that_excludes_them():
  c = lm()
  c.moe.capacity_factor = float("inf")
  _one(c, "moe.capacity_factor", "=inf", "finite")
  c = lm()
  c.moe.eval_capacity_factor = float("inf")
  _one(c, "moe.eval_capacity_factor", "=inf", "finite")
  c = lm()
  c.optimizer.learning_rate = float("inf")
  text = _one(c, "optimizer.learning_rate", "=inf", "a number in (0, inf)")
  assert "inf]" not in text


def test_unknown_dataset_is_reported_on_data_dataset():
  c = lm()  # smoke: data.max_files=8
  c.data.dataset = "stdlib_bytez"
  _one(c, "data.dataset", "'stdlib_bytez'", "did you mean 'stdlib_bytes'?",
       "'stdlib_bytes'", "TFDS")
  c.data.dataset = "sklearn_digits"
  _one(c, "data.dataset", "'sklearn_digits'", "image dataset")
  c.data.dataset, c.data.max_files = "tiny_shakespeare", None
  _valid(c)  # a registered TFDS text dataset


def test_nan_stop_before_any_checkpoint_says_there_is_none(env, tmp_path):
  workdir = tmp_path / "w"
  proc = _run(env, workdir, "--config.inject_nan_steps=2")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert _stopped(proc) == (
      f"step 2: loss is nan, grad_norm is nan; stopping (nan_policy='stop'). "
      f"No checkpoint has been saved yet (in {workdir}/checkpoints). To skip "
      f"such steps instead, set nan_policy='skip'.")


def test_finished_run_rerun_and_skip_warning(env, tmp_path):
  workdir = tmp_path / "w"
  first = _run(env, workdir)
  assert first.returncode == 0, first.stderr[-3000:]
  metrics = (workdir / "metrics.jsonl").read_bytes()
  evals = [r for r in writers.read_jsonl(workdir / "metrics.jsonl")
           if "eval/loss" in r]
  assert [r["step"] for r in evals] == [3, 6]

  # A rerun of the finished run says so and appends nothing.
  for _ in range(2):
    again = _run(env, workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished at step 6" in again.stdout, again.stdout
    assert (workdir / "metrics.jsonl").read_bytes() == metrics
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["eval_ce_loss"] == evals[-1]["eval/ce_loss"]
  assert summary["step"] == 6

  # A skipped checkpoint is reported once (not also as an absl warning).
  shutil.rmtree(workdir / "checkpoints" / "6" / "meta")
  fallback = _run(env, workdir)
  assert fallback.returncode == 0, fallback.stderr[-3000:]
  both = fallback.stdout + fallback.stderr
  assert both.count("skipped checkpoint step 6") == 1, both[-3000:]
  assert "resumed from" in fallback.stdout and "(step 3," in fallback.stdout
