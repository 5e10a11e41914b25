"""Config validation, in process: every refusal names the field, the value
and what is allowed, and comes before anything is compiled. Also the
changed-config check of a resume (which fields may change)."""

import importlib.util
import os

import jax
import pytest

from moejax import train
from moejax.train import loop
from moejax.train import validation

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _config_module(name):
  path = os.path.join(REPO, "experiments", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def lm(arg="size=smoke"):
  return _config_module("lm_stdlib").get_config(arg)


def vit(arg="size=smoke"):
  return _config_module("vit_digits").get_config(arg)


def _problems(config, num_devices=8):
  with pytest.raises(train.ConfigError) as info:
    validation.validate_config(config, num_devices=num_devices,
                               process_count=1)
  return info.value.problems


def _one(config, field, *fragments, num_devices=8):
  """Exactly one problem, about `field`, containing every fragment."""
  problems = _problems(config, num_devices)
  assert len(problems) == 1, problems
  text = problems[0]
  assert text.startswith(f"config.{field}="), text
  for fragment in fragments:
    assert fragment in text, (fragment, text)
  return text


@pytest.mark.parametrize("arg", ["size=smoke", "", "dense", "router=top1",
                                 "dense,size=base"])
def test_shipped_lm_configs_are_valid(arg):
  config = lm(arg)
  validation.validate_config(config, num_devices=8, process_count=1)


@pytest.mark.parametrize("arg", ["size=smoke", "", "soft_moe", "dense"])
def test_shipped_vit_configs_are_valid(arg):
  validation.validate_config(vit(arg), num_devices=4, process_count=1)


def test_router_and_engine_names():
  c = lm()
  c.moe.router = "top_k"
  _one(c, "moe.router", "'top_k'", "'token_choice'", "'expert_choice'")
  c = lm()
  c.moe.engine = "fast"
  _one(c, "moe.engine", "'fast'", "'indices'", "'dropless'", "'pallas'")


def test_k_against_the_number_of_experts():
  c = lm()
  c.moe.k = 5  # E = 4
  assert _one(c, "moe.k", "5") == (
      "config.moe.k=5: allowed: an integer in [1, 4]")
  c = lm()
  c.moe.k = 0
  _one(c, "moe.k", "[1, 4]")


def test_capacity_factors():
  c = lm()
  c.moe.capacity_factor = 0.0
  _one(c, "moe.capacity_factor", "0.0", "(0, inf]")
  c = lm()
  c.moe.eval_capacity_factor = -1.0
  _one(c, "moe.eval_capacity_factor", "-1.0", "or None")


def test_experts_against_the_expert_mesh_axis():
  c = lm("")  # 8 devices, mesh data=2 x expert=4, shard_map
  c.moe.num_experts = 6
  _one(c, "moe.num_experts", "6", "a multiple or a divisor of "
       "mesh.expert=4")
  c = lm("")
  c.moe.num_experts = 2  # divides the axis: each expert on 2 devices
  validation.validate_config(c, num_devices=8, process_count=1)


def test_mesh_against_the_devices():
  c = lm("")
  c.mesh.expert = 3
  _one(c, "mesh", "8 devices")


def test_batch_size_against_the_data_parallel_size():
  c = lm("")  # batch over data x expert = 8 devices
  c.batch_size = 12
  _one(c, "batch_size", "12", "a multiple of 8",
       "['data', 'fsdp', 'expert'] of sizes [2, 1, 4]")
  c = lm("")
  c.eval_batch_size = 4
  _one(c, "eval_batch_size", "a multiple of 8")


def test_sequence_length_and_vocabulary_against_the_data():
  c = lm()
  c.data.seq_len = 0
  _one(c, "data.seq_len", "an integer >= 1")
  c = lm()
  c.model.vocab_size = 100
  _one(c, "model.vocab_size", "100", "an integer >= 257",
       "token ids up to 256")


def test_sequence_longer_than_the_data_is_refused_before_compiling(
    tmp_path, monkeypatch):
  monkeypatch.setenv("MOEJAX_DATA_DIR", str(tmp_path / "data"))
  c = lm()
  c.data.max_files = 2
  c.data.seq_len = 10_000_000
  with pytest.raises(train.ConfigError) as info:
    loop.make_datasets_checked(c)
  text = str(info.value)
  assert text.startswith("config.data.seq_len=10000000: ")
  assert "larger than the data" in text and "Use seq_len <=" in text


def test_dtype_names():
  c = lm()
  c.model.dtype = "float31"
  _one(c, "model.dtype", "'float31'", "['float32', 'bfloat16', 'float16']")
  c = lm()
  c.model.param_dtype = "int8"
  _one(c, "model.param_dtype", "'int8'")


@pytest.mark.parametrize("field,value", [
    ("batch_size", 0), ("num_train_steps", -5), ("model.model_dim", 0),
    ("model.num_layers", -1), ("model.mlp_dim", 0), ("moe.num_experts", 0),
    ("moe.hidden_dim", 0), ("data.seq_len", -1), ("eval_every", -1),
    ("log_every", 0), ("max_checkpoints_to_keep", 0),
    ("model.vocab_size", 0),
])
def test_negative_or_zero_sizes(field, value):
  c = lm()
  node = c
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  problems = _problems(c)
  mine = [p for p in problems if p.startswith(f"config.{field}={value!r}")]
  assert mine and "an integer >=" in mine[0], problems


def test_causal_model_with_a_non_causal_router():
  c = lm()
  c.moe.router = "expert_choice"
  text = _one(c, "moe.router", "'expert_choice'", "causal",
              "future tokens", "'token_choice'", "allow_non_causal")
  assert "'expert_choice'" not in text.split("allowed:")[1]
  c = lm()
  c.moe.batch_prioritized = True
  _one(c, "moe.batch_prioritized", "True", "later tokens")
  # A ViT is not causal: expert choice is fine there.
  v = vit()
  v.moe.router = "expert_choice"
  v.moe.batch_prioritized = False
  validation.validate_config(v, num_devices=4, process_count=1)


def test_loop_fields():
  c = lm()
  c.nan_policy = "ignore"
  _one(c, "nan_policy", "'ignore'", "['stop', 'skip']")
  c = lm()
  c.prng_impl = "mt19937"
  _one(c, "prng_impl", "'mt19937'", "'rbg'")
  c = lm()
  c.expert_parallel = "all_to_all"
  _one(c, "expert_parallel", "['', 'shard_map', 'gspmd']")
  c = lm()
  c.inject_nan_steps = "3,x"
  _one(c, "inject_nan_steps", "'x' is not an integer")
  c = lm()
  c.optimizer.warmup_steps = 100  # 6 steps
  _one(c, "optimizer.warmup_steps", "100", "[0, 6]")
  c = lm()
  c.optimizer.learning_rate = 0.0
  _one(c, "optimizer.learning_rate", "(0, inf]")


def test_every_problem_is_listed_at_once():
  c = lm()
  c.moe.k = 9
  c.model.dtype = "float8"
  c.batch_size = -1
  problems = _problems(c)
  assert len(problems) == 3
  text = str(train.ConfigError(problems))
  assert text.startswith("3 config errors:\n  config.")


def test_default_device_count_follows_num_cpu_devices():
  # lm_stdlib's default asks train.py for 8 CPU devices; validated outside
  # train.py (e.g. by the sweep), the mesh is checked against those 8.
  c = lm("")
  loop.validate_config(c)
  c.mesh.expert = 16
  with pytest.raises(train.ConfigError, match="config.mesh="):
    loop.validate_config(c)


def test_a_config_error_comes_before_any_compilation(tmp_path):
  compiled = []

  def listen(event, duration, **kwargs):
    del duration, kwargs
    if "compile" in event:
      compiled.append(event)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    c = lm()
    c.moe.k = 7
    with pytest.raises(train.ConfigError, match=r"config\.moe\.k=7"):
      train.train_and_evaluate(c, str(tmp_path / "w"))
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert not compiled
  assert not (tmp_path / "w").exists()  # nothing was started


# ------------------------------------------------------------ resume config


def test_model_changes_are_listed():
  saved = lm().to_dict()
  c = lm()
  c.model.model_dim = 64
  c.moe.num_experts = 8
  c.model.vocab_size = 300
  with pytest.raises(train.ResumeConfigError) as info:
    validation.check_resume_config(saved, c, "/w/checkpoints/6")
  e = info.value
  assert [d[0] for d in e.differences] == [
      "model.model_dim", "model.vocab_size", "moe.num_experts"]
  text = str(e)
  assert text.startswith("refusing to resume from /w/checkpoints/6: the "
                         "config changes 3 field(s)")
  assert "  model.model_dim: 32 (checkpoint) -> 64 (now)" in text
  assert "  moe.num_experts: 4 (checkpoint) -> 8 (now)" in text
  assert isinstance(e, train.ConfigError)


def test_safe_changes_are_allowed():
  saved = lm().to_dict()
  c = lm()
  c.optimizer.learning_rate = 1e-4
  c.num_train_steps = 600
  c.log_every = 10
  c.eval_every = 7
  c.checkpoint_every = 5
  c.nan_policy = "skip"
  c.batch_size = 16
  c.mesh.data = 1
  validation.check_resume_config(saved, c, "/w")


def test_data_identity_changes_are_refused():
  saved = lm().to_dict()
  c = lm()
  c.data.max_files = 9
  c.prng_impl = ""
  with pytest.raises(train.ResumeConfigError) as info:
    validation.check_resume_config(saved, c, "/w")
  assert [d[0] for d in info.value.differences] == ["data.max_files",
                                                    "prng_impl"]


def test_json_round_trip_compares_equal():
  import json  # pylint: disable=g-import-not-at-top
  c = lm()
  saved = json.loads(json.dumps(c.to_dict(), default=str))
  validation.check_resume_config(saved, c, "/w")
