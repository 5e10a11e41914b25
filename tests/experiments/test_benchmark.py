"""Smoke test of experiments/benchmark.py: tiny sizes, no thresholds.

The harness runs in a subprocess: its absl flags then never meet another
app's flags in this process, and it sees one CPU device as a user would.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(tmp_path, *args):
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "experiments.benchmark", f"--output={out}",
         "--repeats=1", "--warmup=0", *args]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


def test_layer_and_train_smoke(tmp_path):
  result, stdout = _run(
      tmp_path, "--sweeps=reference,train", "--tokens=64", "--model_dim=8",
      "--hidden_dim=16", "--num_experts=4", "--group_size=32",
      "--dropless_tile=8", "--engines=einsum,indices,dropless,pallas",
      "--train_vocab=32", "--train_model_dim=8", "--train_layers=1",
      "--train_heads=2", "--train_mlp_dim=16", "--train_seq_len=8",
      "--train_batch=2", "--train_moe_every=1", "--train_experts=4",
      "--train_engines=indices")
  assert result["environment"]["backend"] == "cpu"
  recs = result["records"]
  ref = {(r["engine"], r["mode"]): r for r in recs
         if r["sweep"] == "reference"}
  # 'pallas' is skipped on CPU; the others run forward and forward+backward.
  assert set(ref) == {(e, m) for e in ("dense", "einsum", "indices",
                                       "dropless")
                      for m in ("fwd", "fwd_bwd")}
  for (engine, mode), r in ref.items():
    assert r["median_s"] > 0 and r["gflops"] > 0
    assert r["memory"]["peak_bytes"] > 0
    if engine != "dense":
      assert r["ratio"] > 0 and r["memory_ratio"] > 0
  # Active expert FLOPs of the reference point: 2 * T * k * M * H * 2.
  dense_fwd = ref[("dense", "fwd")]
  assert dense_fwd["gflops"] * dense_fwd["median_s"] * 1e9 == pytest.approx(
      2 * 64 * 2 * 8 * 16 * 2)
  train = {r["engine"]: r for r in recs if r["sweep"] == "train"}
  assert set(train) == {"dense", "indices"}
  assert train["indices"]["tokens_per_s_ratio"] > 0
  assert train["dense"]["config"]["dense_mlp_dim"] == 32  # k * H, every layer
  names = [t["target"] for t in result["targets"]]
  assert any("indices fwd+bwd" in n for n in names)
  assert any("train step" in n for n in names)
  assert "[reference]" in stdout and "Targets" in stdout


def test_evaluate_targets_from_records():
  sys.path.insert(0, str(ROOT))
  from experiments import benchmark  # pylint: disable=g-import-not-at-top

  def rec(sweep, engine, median, **config):
    cfg = dict(tokens=16384, num_experts=16, group_size=4096)
    cfg.update(config)
    r = {"sweep": sweep, "engine": engine, "mode": "fwd_bwd",
         "median_s": median, "config": cfg, "memory_ratio": 1.1,
         "temp_memory_ratio": 1.2}
    if engine != "dense":
      r["ratio"] = median
    return r

  records = [rec("reference", "dense", 1.0), rec("reference", "indices", 1.02),
             rec("reference", "dropless", 1.2),
             rec("reference", "einsum", 4.5),
             rec("group", "einsum", 1.8, group_size=1024)]
  records += [rec("T", "indices", 2.0 ** i, tokens=4096 * 2 ** i)
              for i in range(3)]
  records += [rec("E", "indices", t, num_experts=e)
              for e, t in ((8, 1.0), (16, 1.1), (32, 1.3))]
  records.append({"sweep": "train", "engine": "indices",
                  "tokens_per_s_ratio": 0.9})
  met = {t["target"].split(" (")[0].split(" <=")[0]: t["met"]
         for t in benchmark.evaluate_targets(records)}
  assert met["indices fwd+bwd"] is True
  assert met["dropless fwd+bwd"] is False
  assert met["indices linear in T"] is True
  assert met["indices flat in E 8..32"] is False   # 1.3 / 1.0 > 1.25
  assert met["MoE LM train step"] is True
  assert any(k.startswith("best engine") and v for k, v in met.items())


def _tiny_config(**overrides):
  sys.path.insert(0, str(ROOT))
  from experiments import benchmark  # pylint: disable=g-import-not-at-top
  cfg = benchmark.LayerConfig(
      tokens=64, model_dim=8, hidden_dim=16, num_experts=4, k=2,
      capacity_factor=1.0, group_size=32, dtype="float32",
      activation="swiglu", tile=8)
  return benchmark, benchmark.dataclasses.replace(cfg, **overrides)


def test_engines_come_from_the_registry():
  from moejax import layers as L  # pylint: disable=g-import-not-at-top
  from moejax.layers import build  # pylint: disable=g-import-not-at-top
  benchmark, cfg = _tiny_config()
  for name, cls in build.ENGINES.items():
    engine = benchmark.make_engine(cfg, name)
    assert type(engine) is cls, name  # pylint: disable=unidiomatic-typecheck
  # --dropless_tile reaches the engines that take a tile, 0 keeps theirs.
  assert benchmark.make_engine(cfg, "dropless") == L.DroplessEngine(tile=8)
  assert benchmark.make_engine(cfg, "pallas").tile == 8
  default = benchmark.make_engine(benchmark.dataclasses.replace(cfg, tile=0),
                                  "dropless")
  assert default == L.DroplessEngine()
  # A dotted path names an engine class too.
  assert isinstance(benchmark.make_engine(
      cfg, "moejax.layers.engines.IndicesEngine"), L.IndicesEngine)
  with pytest.raises(ValueError, match="did you mean 'indices'"):
    benchmark.make_engine(cfg, "indeces")
  assert benchmark.is_engine("pallas", L.DroplessEngine)
  assert not benchmark.is_engine("indices", L.DroplessEngine)

  layer = benchmark.moe_layer(cfg, "dropless")
  assert isinstance(layer.router, L.TokenChoiceRouter)
  assert layer.router.k == 2 and layer.experts.hidden_dim == 16
  assert layer.experts.activation == "swiglu"
  assert not layer.engine.uses_capacity
  assert layer.layer_capacity(cfg.group_size, False) is None
  layer = benchmark.moe_layer(cfg, "indices")
  assert layer.layer_capacity(cfg.group_size, False) == cfg.capacity


@pytest.mark.parametrize("engine", ["einsum", "indices", "dropless"])
def test_part_benches_run(engine):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  benchmark, cfg = _tiny_config()
  benches = benchmark.part_benches(cfg, engine)
  assert [b.name for b in benches] == ["router", "dispatch", "experts",
                                       "combine"]
  assert {b.mode for b in benches} == {"fwd_bwd"}
  # Only the experts part counts the active expert FLOPs.
  assert [b.flops for b in benches] == [0, 0, cfg.active_flops("fwd_bwd"), 0]
  for b in benches:
    value, grads = b.fn(*b.args)
    assert np.isfinite(float(value)) and float(value) != 0.0, b.name
    for g in jax.tree.leaves(grads):
      assert np.all(np.isfinite(np.asarray(g))), b.name


def test_unknown_engine_name_is_a_usage_error(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark",
       f"--output={tmp_path / 'bench.json'}", "--engines=indices,indeces"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "--engines: unknown engine 'indeces'" in proc.stderr
  assert "did you mean 'indices'" in proc.stderr
  assert not (tmp_path / "bench.json").exists()
