"""Pretrained HF families: moejax matches transformers' float32 logits on
tiny checkpoints that transformers wrote (tests/models/fixtures, built by
experiments/fixtures/make_hf_fixtures.py), saves them back bitwise, greedy
decoding matches transformers' generate, and bad checkpoints or configs are
refused by name."""

import functools
import json
import os
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from moejax.models import from_pretrained
from moejax.models import save_pretrained
from moejax.models import hf

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
DENSE = ("qwen3", "llama")  # upcycling sources (tests/models/test_upcycle.py)
FAMILIES = DENSE + ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3",
            "deepseek_v2", "deepseek_v2_lite", "gpt_oss", "granitemoe",
            "glm4_moe", "jetmoe")


@functools.cache
def load(name):
  return from_pretrained(os.path.join(FIXTURES, name))


def inputs(name):
  return np.load(os.path.join(FIXTURES, name, "inputs.npz"))


# One compiled forward per model structure (eager op-by-op is ~5x slower).
forward = nnx.jit(lambda model, ids_BL, mask_BL: model(
    ids_BL, padding_mask_BL=mask_BL))


def real_logits(model, name):
  d = inputs(name)
  logits_BLV, aux = forward(model, d["ids_BL"], d["mask_BL"])
  return np.asarray(logits_BLV), aux, d


def read_tensors(path):
  out = {}
  for fname in sorted(os.listdir(path)):
    if fname.endswith(".safetensors"):
      with safe_open(os.path.join(path, fname), "np") as f:
        out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(name):
  logits_BLV, aux, d = real_logits(load(name), name)
  mask_BL = d["mask_BL"]  # (B=2, L=8), row 1 right-padded after 4 tokens
  assert logits_BLV.shape == d["logits_BLV"].shape
  np.testing.assert_allclose(logits_BLV[mask_BL], d["logits_BLV"][mask_BL],
                             atol=1e-4, rtol=0)
  # Every MoE family has MoE layers; the dense ones (upcycling sources) none.
  assert (aux is None) == (name in DENSE)


def test_sharded_checkpoint_loads_same_weights():
  sharded = os.path.join(FIXTURES, "qwen3_moe_sharded")
  assert len([f for f in os.listdir(sharded)
              if f.endswith(".safetensors")]) == 2
  assert os.path.exists(os.path.join(sharded,
                                     "model.safetensors.index.json"))
  logits_BLV, _, d = real_logits(load("qwen3_moe_sharded"), "qwen3_moe")
  mask_BL = d["mask_BL"]
  np.testing.assert_allclose(logits_BLV[mask_BL], d["logits_BLV"][mask_BL],
                             atol=1e-4, rtol=0)


def test_dropping_a_perturbed_bias_changes_the_logits():
  """The fixtures' biases are not at their zero init, so the parity test
  would catch a loader that drops them (GPT-OSS: every bias kind)."""
  model = from_pretrained(os.path.join(FIXTURES, "gpt_oss"))
  base, _, d = real_logits(model, "gpt_oss")
  for path in ("blocks.0.attention.b_q_ND", "blocks.0.attention.sinks_N",
               "blocks.1.ffn.router.b_router_E", "blocks.1.ffn.experts.b_out_EM"):
    var = hf.load.variable_at(model, path)
    saved = var.value
    var.value = saved * 0
    changed, _, _ = real_logits(model, "gpt_oss")  # same structure: no retrace
    var.value = saved
    assert np.abs(changed - base)[d["mask_BL"]].max() > 1e-3, path


@pytest.mark.parametrize("name", FAMILIES)
def test_save_load_round_trip_is_bitwise(name, tmp_path):
  model = load(name)
  out = save_pretrained(model, str(tmp_path / name))
  # The saved tensors are transformers' own, bit for bit, under its names.
  original = read_tensors(os.path.join(FIXTURES, name))
  saved = read_tensors(out)
  assert sorted(saved) == sorted(original)
  for key, value in original.items():
    assert saved[key].dtype == value.dtype, key
    np.testing.assert_array_equal(saved[key], value, err_msg=key)
  reloaded = from_pretrained(out)
  a = jax.tree.leaves(nnx.state(model))
  b = jax.tree.leaves(nnx.state(reloaded))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["model_type"] == model.spec.model_type


def test_sharded_save_round_trip(tmp_path):
  model = load("qwen3_moe")
  out = save_pretrained(model, str(tmp_path / "q"), max_shard_bytes=100_000)
  shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert len(shards) > 2 and shards[0] == "model-00001-of-%05d.safetensors" % (
      len(shards))
  original = read_tensors(os.path.join(FIXTURES, "qwen3_moe"))
  saved = read_tensors(out)
  assert sorted(saved) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(saved[key], value, err_msg=key)
  # Saving again unsharded into the same directory leaves no stale index.
  save_pretrained(from_pretrained(out), out)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  for x, y in zip(jax.tree.leaves(nnx.state(model)),
                  jax.tree.leaves(nnx.state(from_pretrained(out)))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", ("deepseek_v3", "gpt_oss"))  # MLA; sinks+window
def test_greedy_decoding_matches_transformers_generate(name):
  """Full-sequence greedy decoding (no cache yet) gives transformers' ids:
  one right-padded [1, 14] buffer, so one compilation; causal attention and
  per-token routing keep the padding from reaching earlier positions."""
  model = load(name)
  d = inputs(name)
  want = d["generated_1N"]
  n = d["prompt_1L"].shape[1]
  ids = np.zeros_like(want)
  ids[:, :n] = d["prompt_1L"]
  for t in range(n, want.shape[1]):
    mask = np.arange(want.shape[1])[None] < t
    logits_BLV, _ = forward(model, ids, mask)
    ids[:, t] = np.argmax(np.asarray(logits_BLV)[:, t - 1], axis=-1)
  np.testing.assert_array_equal(ids, want)


def test_describe_names_params_experts_routing_and_attention():
  text = hf.describe(load("deepseek_v3"))
  assert "active per token" in text and "MLA" in text
  assert "DeepSeekRouter" in text and "8 x" in text
  assert len(text.splitlines()) <= 12


def test_jetmoe_describes_attention_experts():
  """JetMoE (M=64, 2 layers, attention: E=4, k=2, K=2, D=16): half of each
  layer's 4 x (64*32 + 32*64) expert query/output weights are inactive."""
  model = load("jetmoe")
  text = hf.describe(model)
  assert "MoA 4 experts top-2, 2 shared kv heads x 16, o bias" in text
  active = text.split("active per token ")[1].split(" ")[0]
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      nnx.state(model, nnx.Param)))
  # layers x (E - k) x per-expert weights: FFN gate+up [64, 2*16] and down
  # [16, 64]; attention query [64, 2*16] and output [2*16, 64].
  experts_inactive = 2 * 2 * (64 * 32 + 16 * 64)
  attention_inactive = 2 * 2 * (64 * 32 + 32 * 64)
  assert int(active.replace(",", "")) == (total - experts_inactive
                                          - attention_inactive)


# ---- refusals ---------------------------------------------------------------


def copy_fixture(tmp_path, name="mixtral", *, tensors=None, config=None):
  """A copy of a fixture with its tensors / config dict edited in place by
  the given functions."""
  dst = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), dst)
  if tensors is not None:
    t = read_tensors(dst)
    tensors(t)
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
  if config is not None:
    with open(dst / "config.json") as f:
      c = json.load(f)
    config(c)
    with open(dst / "config.json", "w") as f:
      json.dump(c, f)
  return str(dst)


Q = "model.layers.1.self_attn.q_proj.weight"


def test_missing_tensor_is_named(tmp_path):
  path = copy_fixture(tmp_path, tensors=lambda t: t.pop(Q))
  with pytest.raises(hf.CheckpointError, match=f"lacks tensor '{Q}'"):
    from_pretrained(path)


def test_unexpected_tensor_is_named(tmp_path):
  extra = "model.layers.0.mlp.extra.weight"
  path = copy_fixture(tmp_path, tensors=lambda t: t.update(
      {extra: np.zeros((2, 2), np.float32)}))
  with pytest.raises(hf.CheckpointError, match=f"unexpected tensor '{extra}'"):
    from_pretrained(path)


def test_deepseek_v3_mtp_layer_is_skipped_other_extras_refused(tmp_path):
  # The fixture's config has num_nextn_predict_layers=1 and 2 layers.
  mtp = "model.layers.2.eh_proj.weight"
  path = copy_fixture(tmp_path, "deepseek_v3", tensors=lambda t: t.update(
      {mtp: np.ones((64, 128), np.float32)}))
  assert hf.load.variable_at(from_pretrained(path), "embed_VM").shape == (
      128, 64)
  beyond = "model.layers.3.eh_proj.weight"
  path = copy_fixture(tmp_path / "b", "deepseek_v3", tensors=lambda t: t.update(
      {beyond: np.ones((64, 128), np.float32)}))
  with pytest.raises(hf.CheckpointError, match=beyond):
    from_pretrained(path)


def test_wrong_shape_is_named(tmp_path):
  path = copy_fixture(tmp_path, tensors=lambda t: t.update(
      {Q: np.zeros((60, 64), np.float32)}))
  with pytest.raises(hf.CheckpointError, match=f"'{Q}' has shape \\(60, 64\\)"):
    from_pretrained(path)


def test_wrong_shape_of_the_same_size_is_named(tmp_path):
  k = "model.layers.0.block_sparse_moe.experts.1.w2.weight"  # [M=64, H=16]
  path = copy_fixture(tmp_path, tensors=lambda t: t.update(
      {k: np.zeros((16, 64), np.float32)}))
  with pytest.raises(hf.CheckpointError, match="w2.weight"):
    from_pretrained(path)


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.update(model_type="llama4_text"), "model_type"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c.update(some_new_field=3), "some_new_field"),
    (lambda c: c["rope_parameters"].update(rope_type="dynamic"),
     "rope_type"),
    (lambda c: c.update(rope_parameters={"rope_type": "linear",
                                         "rope_theta": 1e4, "factor": 2.0,
                                         "low_freq_factor": 1.0}),
     "low_freq_factor"),
])
def test_unsupported_config_value_is_named(tmp_path, edit, field):
  path = copy_fixture(tmp_path, config=edit)
  with pytest.raises(hf.UnsupportedConfig, match=field):
    from_pretrained(path)


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(num_attention_heads=6),
     "num_attention_heads=6 must be num_key_value_heads x num_experts_per_tok"
     " = 4"),
    (lambda c: c.update(rope_parameters={"rope_type": "linear",
                                         "rope_theta": 1e4, "factor": 2.0}),
     "jetmoe attention supports only the default full-width RoPE, got "
     "'linear'"),
    (lambda c: c.update(activation_function="gelu"), "activation_function"),
])
def test_jetmoe_config_refusals_are_named(tmp_path, edit, words):
  path = copy_fixture(tmp_path, "jetmoe", config=edit)
  with pytest.raises(hf.UnsupportedConfig, match=words) as err:
    from_pretrained(path)
  assert "\n" not in str(err.value)


def test_unsupported_family_option_is_named(tmp_path):
  path = copy_fixture(tmp_path, "qwen3_moe",
                      config=lambda c: c.update(use_sliding_window=True))
  with pytest.raises(hf.UnsupportedConfig, match="use_sliding_window"):
    from_pretrained(path)
  path = copy_fixture(tmp_path / "v3", "deepseek_v3",
                      config=lambda c: c.update(topk_method="greedy"))
  with pytest.raises(hf.UnsupportedConfig, match="topk_method"):
    from_pretrained(path)


# ---- placement and dtype ----------------------------------------------------


def test_mesh_places_each_tensor_on_its_sharding():
  from moejax.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  mesh = make_mesh({"expert": 4, "tensor": 2})  # 8 virtual CPU devices
  model = from_pretrained(os.path.join(FIXTURES, "mixtral"), mesh=mesh)
  w = hf.load.variable_at(model, "blocks.0.ffn.experts.w_in_EMH").value
  assert w.sharding.spec[0] == "expert"            # [E=4, M, H] over experts
  assert w.sharding.spec[2] == "tensor"
  assert len(w.sharding.device_set) == 8
  logits_BLV, _, d = real_logits(model, "mixtral")
  mask_BL = d["mask_BL"]
  np.testing.assert_allclose(logits_BLV[mask_BL], d["logits_BLV"][mask_BL],
                             atol=1e-4, rtol=0)


def test_bfloat16_load_casts_weights_but_keeps_routers_float32():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  model = from_pretrained(os.path.join(FIXTURES, "gpt_oss"),
                          dtype=jnp.bfloat16)
  at = lambda p: hf.load.variable_at(model, p).value.dtype
  assert at("blocks.0.attention.w_q_MND") == jnp.bfloat16
  assert at("blocks.0.ffn.experts.w_in_EMH") == jnp.bfloat16
  assert at("blocks.0.ffn.router.w_router_ME") == jnp.float32
  assert at("blocks.0.attention.sinks_N") == jnp.float32
  logits_BLV, _, d = real_logits(model, "gpt_oss")
  mask_BL = d["mask_BL"]
  assert logits_BLV.dtype == np.float32
  # bfloat16 weights and activations: close to float32, not equal.
  err = np.abs(logits_BLV - d["logits_BLV"])[mask_BL]
  assert err.max() < 0.05 * np.abs(d["logits_BLV"][mask_BL]).max()  # ~1%


def test_loaded_model_is_differentiable():
  """Fine-tuning starts from here: every parameter gets a finite gradient
  (GPT-OSS: sinks path, biases, clamped SwiGLU, router bias)."""
  model = from_pretrained(os.path.join(FIXTURES, "gpt_oss"))
  d = inputs("gpt_oss")

  def loss(m):
    logits_BLV, _ = m(d["ids_BL"], padding_mask_BL=d["mask_BL"])
    return jnp.mean(jax.nn.log_softmax(logits_BLV)[..., 0])

  grads = nnx.jit(nnx.grad(loss))(model)  # compiled: eager is ~4x slower
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.isfinite(np.asarray(g)).all() for g in leaves)
  sinks = hf.load.variable_at(grads, "blocks.0.attention.sinks_N")
  assert np.abs(np.asarray(sinks.value)).max() > 0


@pytest.mark.parametrize("name", ("deepseek_v3", "mixtral"))
def test_transformers4_rope_fields_read_the_same(tmp_path, name):
  """Hub configs written by transformers 4 carry rope_theta + rope_scaling
  ({'type': 'yarn', ...}) instead of rope_parameters: same model."""
  def to_v4(c):
    rope = dict(c.pop("rope_parameters"))
    c["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    c["rope_scaling"] = None if kind == "default" else dict(rope, type=kind)
  path = copy_fixture(tmp_path, name, config=to_v4)
  assert from_pretrained(path).spec.rope == load(name).spec.rope
