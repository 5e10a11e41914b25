"""experiments/train.py end to end, in subprocesses on 8 virtual CPU devices.

One straight 6-step run of the smoke config (expert parallel: mesh data=2 x
expert=4, shard_map), then the same run stopped after 3 steps and started
again: the final checkpoints must be bitwise equal. A misspelt override must
fail at launch. The runs share a
persistent compilation cache, so only the first one compiles.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from moejax.train import writers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
SMOKE = [
    "--config=experiments/configs/lm_stdlib.py:size=smoke",
    "--config.num_cpu_devices=8", "--config.mesh.data=2",
    "--config.mesh.expert=4", "--config.expert_parallel=shard_map",
    # Overrides the test checks in config.json and in the loss:
    "--config.aux_loss_weights.z_loss=0.01",
    "--config.moe.capacity_factor=1.5",
]
STEPS = 6  # the smoke config's num_train_steps; checkpoints every 3


@pytest.fixture(scope="module")
def app_env(tmp_path_factory):
  base = tmp_path_factory.mktemp("train_app")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             MOEJAX_DATA_DIR=str(base / "data"))
  return base, env


def _run(app_env, *args):
  _, env = app_env
  return subprocess.run([sys.executable, "-m", "experiments.train", *args],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=400)


def _ok(proc):
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc




def _train_records(workdir):
  records = writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return [r for r in records if "train/loss" in r]


def _restore_state(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)


def test_smoke_run_then_exact_resume(app_env):
  # One test, so that pytest-xdist never runs the straight run twice.
  workdir = app_env[0] / "straight"
  proc = _ok(_run(app_env, *SMOKE, f"--workdir={workdir}"))
  _check_smoke_run(workdir, proc)
  _check_resume(workdir, app_env)


def _check_smoke_run(workdir, proc):
  out = proc.stdout
  assert "params: total" in out and "FLOPs/token" in out
  # On CPU the MFU's peak is a measured matmul rate, and the log says so.
  assert "TFLOP/s per device (measured float32 matmul rate)" in out
  assert "MFU (measured peak)" in out
  assert "=== summary" in out and "expert load" in out
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]

  config = json.loads((workdir / "config.json").read_text())
  assert config["moe"]["capacity_factor"] == 1.5
  assert config["aux_loss_weights"]["z_loss"] == 0.01

  train = _train_records(workdir)
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  first, last = train[0], train[-1]
  assert last["train/ce_loss"] < first["train/ce_loss"] - 0.3, (
      first["train/ce_loss"], last["train/ce_loss"])
  weights = config["aux_loss_weights"]
  # One aux/<name> metric per loss the layers report (token choice:
  # load_balance and z_loss); the other weights are 0.
  reported = sorted(k[len("train/aux/"):] for k in train[0]
                    if k.startswith("train/aux/"))
  assert reported == ["load_balance", "z_loss"]
  assert all(not w for name, w in weights.items() if name not in reported)
  for r in train:
    aux = sum(weights[name] * r[f"train/aux/{name}"] for name in reported)
    assert r["train/aux_loss"] == pytest.approx(aux, rel=1e-5)
    assert r["train/loss"] == pytest.approx(r["train/ce_loss"] + aux,
                                            rel=1e-6)
    assert r["train/aux/z_loss"] > 0 and r["train/aux/load_balance"] > 0
    for key in ("grad_norm", "learning_rate", "tokens_per_sec",
                "step_time", "tflops_per_sec", "mfu"):
      assert math.isfinite(r[f"train/{key}"])
    assert len(r["train/moe/layer1/expert_load"]) == 4
    assert sum(r["train/moe/layer1/expert_load"]) == pytest.approx(1.0)
    assert 0 <= r["train/moe/layer1/dropped_fraction"] <= 1
    assert r["train/moe/layer1/router_entropy"] > 0

  evals = [r for r in writers.read_jsonl(workdir / "metrics.jsonl")
           if "eval/loss" in r]
  assert [r["step"] for r in evals] == [3, 6]
  assert evals[-1]["eval/perplexity"] == pytest.approx(
      math.exp(evals[-1]["eval/ce_loss"]), rel=1e-5)

  scalars = writers.read_scalars(str(workdir / "tensorboard"))
  assert [s for s, _ in scalars["train/loss"]] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]],
                             [r["train/loss"] for r in train], rtol=1e-6)
  assert "train/moe/layer1/expert_load/3" in scalars
  assert [s for s, _ in scalars["eval/ce_loss"]] == [3, 6]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["step"] == STEPS
  assert summary["params_active"] < summary["params_total"]


def _check_resume(straight_dir, app_env):
  workdir = app_env[0] / "interrupted"
  first = _ok(_run(app_env, *SMOKE, f"--workdir={workdir}",
                   "--config.stop_after_steps=3"))
  assert "resumed from" not in first.stdout
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
  first_meta = json.loads(
      (workdir / "checkpoints" / "3" / "meta" / "metadata").read_text())
  second = _ok(_run(app_env, *SMOKE, f"--workdir={workdir}"))
  assert "resumed from" in second.stdout and "step 3" in second.stdout
  # Training time adds up over both invocations; compile time (each
  # invocation's first logged interval) is counted apart, twice here.
  summary = json.loads((workdir / "summary.json").read_text())
  assert first_meta["train_time_s"] > 0 and first_meta["compile_time_s"] > 0
  assert summary["train_time_s"] > first_meta["train_time_s"]
  assert summary["compile_time_s"] > first_meta["compile_time_s"]
  assert f"train time {summary['train_time_s']:.1f}s + " in second.stdout

  # Same parameters, optimizer state, RNG state and step, bit for bit.
  a, b = _restore_state(straight_dir, STEPS), _restore_state(workdir, STEPS)
  flat_a = dict(_flatten(a))
  flat_b = dict(_flatten(b))
  assert flat_a.keys() == flat_b.keys() and len(flat_a) > 10
  # The router's weights live in the router module of block 1's MoE layer.
  assert "/params/blocks/1/ffn/router/w_router_ME" in flat_a, sorted(flat_a)
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)
  # Same data position.
  data = lambda d: (d / "checkpoints" / str(STEPS) / "data" /
                    "process_0-of-1.json").read_text()
  assert json.loads(data(straight_dir)) == json.loads(data(workdir))
  # Same losses at every step (3 from the first leg, 3 after the resume).
  assert [r["train/loss"] for r in _train_records(workdir)] == [
      r["train/loss"] for r in _train_records(straight_dir)]


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, f"{prefix}/{k}")
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from _flatten(v, f"{prefix}/{i}")
  else:
    yield prefix, np.asarray(tree)


def test_misspelt_override_fails_at_launch(app_env, tmp_path):
  proc = _run(app_env, *SMOKE, "--config.moe.experts.num_expert=16",
              f"--workdir={tmp_path}")
  assert proc.returncode != 0
  assert "num_expert" in proc.stderr
  assert not os.listdir(tmp_path)  # nothing started
  # A field of the old flat moe config: where it moved, no traceback.
  proc = _run(app_env, *SMOKE, "--config.moe.k=1",
              "--config.moe.num_experts=8", "--config.moe.router=hash",
              f"--workdir={tmp_path}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.splitlines()[-4:] == [
      "training stopped: 3 config errors:",
      "  --config.moe.k=1: moved to --config.moe.router.k",
      "  --config.moe.num_experts=8: moved to "
      "--config.moe.experts.num_experts",
      "  --config.moe.router=hash: moved to --config.moe.router.name "
      "(moe.router is now a dict of the router's options)"]
  assert "Traceback" not in proc.stderr
  assert not os.listdir(tmp_path)
  # A nested override reaches the model: an invalid one is a config error
  # (exit status 2) naming the field.
  proc = _run(app_env, *SMOKE, "--config.moe.router.k=9",
              f"--workdir={tmp_path}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "config.moe.router.k=9: k must be an integer" in proc.stderr
  assert not os.listdir(tmp_path)
  proc = _run(app_env, "--config=experiments/configs/lm_stdlib.py:"
              "variant=sparse", f"--workdir={tmp_path}")
  assert proc.returncode != 0 and "variant" in proc.stderr
