"""Config validation, in process: every refusal names the field, the value
and what is allowed, and comes before anything is compiled. Also the
changed-config check of a resume (which fields may change)."""

import os

import ml_collections
import pytest

from moejax import train
from moejax.train import loop
from moejax.train import validation

import config_checks  # tests/reliability/config_checks.py

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


_config_module = config_checks.config_module
lm = config_checks.lm


def vit(arg="size=smoke"):
  return _config_module("vit_digits").get_config(arg)


_problems = config_checks.problems


def _router(config, **options):
  """Sets config.moe.router to exactly `options` (the rest unset)."""
  for key in config.moe.router:
    config.moe.router[key] = None
  for key, value in options.items():
    config.moe.router[key] = value
  return config


_one = config_checks.one


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
  c.moe.router.name = "top_k"
  _one(c, "moe.router.name", "'top_k'", "'token_choice'", "'expert_choice'")
  c = lm()
  c.moe.engine.name = "fast"
  _one(c, "moe.engine.name", "'fast'", "'indices'", "'dropless'",
       "'pallas'")


def test_k_against_the_number_of_experts():
  c = lm()
  c.moe.router.k = 5  # E = 4
  assert _one(c, "moe.router.k", "5") == (
      "config.moe.router.k=5: k must be an integer with 1 <= k <= "
      "num_experts (4), got 5")
  c = lm()
  c.moe.router.k = 0
  _one(c, "moe.router.k", "num_experts (4)")


def test_capacity_factors():
  c = lm()
  c.moe.capacity_factor = 0.0
  _one(c, "moe.capacity_factor", "0.0", "> 0")
  c = lm()
  c.moe.eval_capacity_factor = -1.0
  _one(c, "moe.eval_capacity_factor", "-1.0", "> 0")


def test_experts_against_the_expert_mesh_axis():
  c = lm("")  # 8 devices, mesh data=2 x expert=4, shard_map
  c.moe.experts.num_experts = 6
  _one(c, "moe.experts.num_experts", "6", "a multiple or a divisor of "
       "mesh.expert=4")
  c = lm("")
  c.moe.experts.num_experts = 2  # divides the axis: each expert on 2 devices
  validation.validate_config(c, num_devices=8, process_count=1)


def test_dropless_engine_with_gspmd_expert_parallelism():
  c = lm("")
  c.moe.engine.name = "dropless"
  validation.validate_config(c, num_devices=8, process_count=1)  # shard_map
  c.expert_parallel = "gspmd"
  _one(c, "moe.engine.name", "'dropless'", "no GSPMD expert-parallel path",
       "expert_parallel='shard_map'")


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
    ("model.num_layers", -1), ("model.mlp_dim", 0),
    ("moe.experts.num_experts", 0), ("moe.experts.hidden_dim", 0),
    ("data.seq_len", -1), ("eval_every", -1),
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
  c = _router(lm(), name="expert_choice")
  text = _one(c, "moe.router.name", "'expert_choice'", "causal",
              "see the future", "token choice", "allow_non_causal")
  assert "expert_choice" not in text.split("allowed:")[1]
  c = lm()
  c.moe.router.batch_prioritized = True
  _one(c, "moe.router.batch_prioritized", "True", "later tokens")
  c.moe.allow_non_causal = True  # accepted knowingly
  validation.validate_config(c, num_devices=8, process_count=1)
  # A ViT is not causal: expert choice is fine there.
  v = _router(vit(), name="expert_choice")
  validation.validate_config(v, num_devices=4, process_count=1)


def test_old_flat_moe_config_names_where_each_field_moved():
  c = lm()
  c.moe = ml_collections.ConfigDict(dict(  # lm_stdlib's moe before 13
      num_experts=4, k=2, router="token_choice", engine="dropless",
      capacity_factor=1.25, hidden_dim=64, jitter_eps=0.0,
      num_shared_experts=0, gating="softmax", renormalize=True,
      dropless_tile=64, hash_seed=3))
  problems = _problems(c)
  assert sorted(problems) == sorted([
      "config.moe.router='token_choice': moved to moe.router.name (moe."
      "router is now a dict of the router's options)",
      "config.moe.engine='dropless': moved to moe.engine.name (moe.engine "
      "is now a dict of the engine's options)",
      "config.moe.num_experts=4: moved to moe.experts.num_experts",
      "config.moe.k=2: moved to moe.router.k",
      "config.moe.hidden_dim=64: moved to moe.experts.hidden_dim",
      "config.moe.jitter_eps=0.0: moved to moe.router.jitter_eps",
      "config.moe.num_shared_experts=0: moved to moe.shared.num_experts",
      "config.moe.gating='softmax': moved to moe.router.gating",
      "config.moe.renormalize=True: moved to moe.router.renormalize",
      "config.moe.dropless_tile=64: moved to moe.engine.tile",
      "config.moe.hash_seed=3: moved to moe.router.seed",
  ]), problems


_compiles = config_checks.compiles


@pytest.mark.parametrize("arg,setting,field,fragments", [
    ("size=smoke", {"router.sinkhorn_iters": 5}, "moe.router.sinkhorn_iters",
     ("=5", "TokenChoiceRouter does not take option 'sinkhorn_iters'",
      "'renormalize'")),
    ("", {"router.k": 9}, "moe.router.k",
     ("=9", "1 <= k <= num_experts (8)")),
    ("size=smoke", {"router.name": "nope"}, "moe.router.name",
     ("'nope'", "unknown router", "'token_choice'", "dotted path")),
    ("size=smoke", {"router.gating": "soft"}, "moe.router.gating",
     ("'soft'", "'topk_softmax'")),
    ("size=smoke", {"engine.tiel": 64}, "moe.engine.tiel",
     ("=64", "IndicesEngine does not take option 'tiel'")),
    ("size=smoke", {"engine.name": "dropless", "engine.gmm": "fast"},
     "moe.engine.gmm", ("'fast'", "'ragged_dot'", "'scan'")),
    ("size=smoke", {"experts.activation": "relu6"},
     "moe.experts.activation", ("'relu6'", "'swiglu'")),
    ("size=smoke", {"residual.hidden_dim": 16, "residual.mix": "max"},
     "moe.residual.mix", ("'max'", "'learned'")),
    ("size=smoke", {"capacity_factr": 2.0}, "moe.capacity_factr",
     ("unknown field", "did you mean moe.capacity_factor")),
])
def test_a_bad_moe_option_is_one_line_before_any_compile(arg, setting, field,
                                                         fragments):
  c = lm(arg)
  for key, value in setting.items():
    node = c.moe
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value  # (unlocked: a typo can be added in process)
  compiled = _compiles(lambda: _one(c, field, *fragments))
  assert not compiled


def test_aux_loss_weight_names():
  c = lm()
  c.aux_loss_weights.load_balanse = 0.0  # a typo, even with weight 0
  _one(c, "aux_loss_weights.load_balanse", "not an MoE aux loss",
       "did you mean 'load_balance'", "'sequence_balance'")
  c = lm()
  c.aux_loss_weights.sequence_balance = 1e-4  # token choice reports none
  _one(c, "aux_loss_weights.sequence_balance", "no MoE layer of this model "
       "reports it", "['load_balance', 'z_loss']")
  _router(c, name="deepseek")  # it does
  validation.validate_config(c, num_devices=8, process_count=1)
  # Soft MoE reports no loss: the ViT config sets its weights to 0.
  v = vit("soft_moe,size=smoke")
  v.aux_loss_weights.load_balance = 1e-2
  _one(v, "aux_loss_weights.load_balance", "reported: []", num_devices=4)
  # A dense model has no aux loss: the weights do nothing, no error.
  validation.validate_config(lm("dense,size=smoke"), num_devices=8,
                             process_count=1)


def test_per_layer_override_of_a_layer_that_is_not_moe():
  c = lm()
  c.moe.layers = ml_collections.ConfigDict({"0": {"experts": {
      "num_experts": 8}}})
  _one(c, "moe.layers.0", "not an MoE layer", "[1]")
  c.moe.layers = ml_collections.ConfigDict({"1": {"experts": {
      "num_experts": 8}}})
  validation.validate_config(c, num_devices=8, process_count=1)
  # A bad value in an override is named where it is set.
  c.moe.layers = ml_collections.ConfigDict({"1": {"router": {"k": 9}}})
  _one(c, "moe.layers.1.router.k", "=9", "num_experts (4)")


def test_an_engine_that_cannot_run_the_router():
  c = _router(lm(), name="expert_choice")
  c.moe.allow_non_causal = True
  validation.validate_config(c, num_devices=8, process_count=1)
  c.moe.engine.name = "dropless"
  _one(c, "moe.engine.name", "'dropless'", "token view",
       "use EinsumEngine or IndicesEngine")


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
  _one(c, "optimizer.warmup_steps", "100", "[0, 5]")
  c = lm()
  c.optimizer.learning_rate = 0.0
  _one(c, "optimizer.learning_rate", "(0, inf)")  # inf itself is refused


def test_every_problem_is_listed_at_once():
  c = lm()
  c.moe.router.k = 9
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
  c = lm()
  c.moe.router.k = 7

  def run():
    with pytest.raises(train.ConfigError,
                       match=r"config\.moe\.router\.k=7"):
      train.train_and_evaluate(c, str(tmp_path / "w"))
  assert not _compiles(run)
  assert not (tmp_path / "w").exists()  # nothing was started


# ------------------------------------------------------------ resume config


def test_model_changes_are_listed():
  saved = lm().to_dict()
  c = lm()
  c.model.model_dim = 64
  c.moe.experts.num_experts = 8
  c.model.vocab_size = 300
  with pytest.raises(train.ResumeConfigError) as info:
    validation.check_resume_config(saved, c, "/w/checkpoints/6")
  e = info.value
  assert [d[0] for d in e.differences] == [
      "model.model_dim", "model.vocab_size", "moe.experts.num_experts"]
  text = str(e)
  assert text.startswith("refusing to resume from /w/checkpoints/6: the "
                         "config changes 3 field(s)")
  assert "  model.model_dim: 32 (checkpoint) -> 64 (now)" in text
  assert "  moe.experts.num_experts: 4 (checkpoint) -> 8 (now)" in text
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


def test_a_checkpoint_from_before_the_composed_layers_is_refused_clearly():
  """A workdir written with the flat moe config (before issue 13) keeps its
  checkpoints; resuming says why it cannot and what to do instead."""
  saved = lm().to_dict()
  saved["moe"] = dict(num_experts=4, k=2, router="token_choice",
                      engine="indices", capacity_factor=1.25, hidden_dim=64)
  with pytest.raises(train.ResumeConfigError) as info:
    validation.check_resume_config(saved, lm(), "/w/checkpoints/6")
  text = str(info.value)
  assert text.startswith("refusing to resume from /w/checkpoints/6: it was "
                         "written by moejax before MoE layers were composed")
  assert "blocks/<i>/ffn/router/w_router_ME" in text
  assert "74e7736" in text and "start a new --workdir" in text
  assert info.value.differences  # the fields still listed for callers
