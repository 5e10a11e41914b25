"""MoE blocks of real model families against transformers, and the options
they need (router bias, score on the input, group scores, expert biases,
clamped SwiGLU, gated shared experts, output bias).

The fixtures (tests/layers/fixtures/<family>.npz) are transformers' own MoE
blocks with random weights, their input and their float32 output, written by
experiments/fixtures/make_block_fixtures.py (run by hand in a side venv).
Each test maps transformers' tensors into a layer built by build_moe from
the family's config and checks the output within 1e-5 with every engine that
can run it: dropless always, einsum / indices with capacity to spare.
"""

import json
import math
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import layers
from moejax import routing
from moejax.layers import build as build_lib
from moejax.layers import moe as moe_lib
from moejax.ops import ffn as ffn_ops
from moejax.routing.validation import OptionError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ENGINES = {
    "dropless": {"name": "dropless", "tile": 8},
    "dropless_ragged": {"name": "dropless", "tile": 8, "gmm": "ragged_dot"},
    "einsum": {"name": "einsum"},
    "indices": {"name": "indices"},
}


def _fixture(family):
  with np.load(os.path.join(FIXTURES, f"{family}.npz")) as data:
    arrays = {k: np.asarray(v) for k, v in data.items()}
  with open(os.path.join(FIXTURES, "blocks.json")) as f:
    fields = json.load(f)[family]["fields"]
  params = {k[2:]: v for k, v in arrays.items() if k.startswith("p/")}
  return arrays["x_BLM"], arrays["y_BLM"], params, fields


# --- transformers layouts -> moejax layouts ---------------------------------


def _split_concat_EXM(gate_up_E2HM):
  """[E, 2H, M] with gate rows first (Mixtral & co.) -> (gate, up) [E, M, H]."""
  h = gate_up_E2HM.shape[1] // 2
  t = lambda a: np.swapaxes(a, 1, 2)
  return t(gate_up_E2HM[:, :h]), t(gate_up_E2HM[:, h:])


def _experts_concat(p, prefix="experts."):
  gate, up = _split_concat_EXM(p[prefix + "gate_up_proj"])
  return {"experts.w_gate_EMH": gate, "experts.w_in_EMH": up,
          "experts.w_out_EHM": np.swapaxes(p[prefix + "down_proj"], 1, 2)}


def _dense(p, prefix, target):
  """nn.Linear gate/up/down ([out, in]) -> a DenseFFN's [in, out] weights."""
  return {f"{target}.w_gate_MH": p[prefix + "gate_proj.weight"].T,
          f"{target}.w_in_MH": p[prefix + "up_proj.weight"].T,
          f"{target}.w_out_HM": p[prefix + "down_proj.weight"].T}


def _family(family, fields, p):
  """(build_moe config without engine, {module path: array}) for a family."""
  f = fields
  e = f.get("num_local_experts") or f.get("num_experts") or f.get(
      "n_routed_experts")
  k = f.get("num_experts_per_tok", 1)   # Switch: top-1
  swiglu = lambda h, **kw: {"num_experts": e, "hidden_dim": h,
                            "activation": "swiglu", **kw}
  if family in ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "granitemoe"):
    h = f.get("moe_intermediate_size") or f["intermediate_size"]
    if family in ("mixtral", "granitemoe"):
      router = {"name": "token_choice", "k": k, "gating": "topk_softmax"}
    else:
      router = {"name": "token_choice", "k": k, "gating": "softmax",
                "renormalize": f["norm_topk_prob"]}
    gate = "router.weight" if family == "granitemoe" else "gate.weight"
    params = {"router.w_router_ME": p[gate].T, **_experts_concat(p)}
    config = {"router": router, "experts": swiglu(h)}
    if family == "qwen2_moe":
      config["shared"] = {"num_experts": 1, "gated": True,
                          "hidden_dim": f["shared_expert_intermediate_size"]}
      params.update(_dense(p, "shared_expert.", "shared.ffn"))
      params["shared.w_shared_gate_M1"] = p["shared_expert_gate.weight"].T
    return config, params
  if family in ("deepseek_v3", "deepseek_v2"):
    v3 = family == "deepseek_v3"
    router = {"name": "deepseek", "k": k,
              "gating": "sigmoid" if v3 else "softmax",
              "renormalize": f["norm_topk_prob"],
              "num_expert_groups": f["n_group"],
              "topk_groups": f["topk_group"],
              "group_score": "top2_sum" if v3 else "max",
              "routed_scaling_factor": f["routed_scaling_factor"]}
    h = f["moe_intermediate_size"]
    config = {"router": router, "experts": swiglu(h),
              "shared": {"num_experts": f["n_shared_experts"],
                         "hidden_dim": h}}
    params = {"router.w_router_ME": p["gate.weight"].T, **_experts_concat(p),
              **_dense(p, "shared_experts.", "shared")}
    if v3:
      params["router.bias_E"] = p["gate.e_score_correction_bias"]
    return config, params
  if family == "gpt_oss":
    gate_up, b = p["experts.gate_up_proj"], p["experts.gate_up_proj_bias"]
    config = {"router": {"name": "token_choice", "k": k,
                         "gating": "topk_softmax", "use_bias": True},
              "experts": swiglu(f["intermediate_size"],
                                activation="clamped_swiglu", use_bias=True,
                                swiglu_alpha=1.702,
                                swiglu_limit=f["swiglu_limit"])}
    # gate/up interleaved along the last axis: gate = 0, 2, ...; up = 1, 3, ...
    params = {"router.w_router_ME": p["router.weight"].T,
              "router.b_router_E": p["router.bias"],
              "experts.w_gate_EMH": gate_up[..., ::2],
              "experts.w_in_EMH": gate_up[..., 1::2],
              "experts.b_gate_EH": b[..., ::2], "experts.b_in_EH": b[..., 1::2],
              "experts.w_out_EHM": p["experts.down_proj"],
              "experts.b_out_EM": p["experts.down_proj_bias"]}
    return config, params
  if family == "llama4":
    gate_up = p["experts.gate_up_proj"]   # [E, M, 2H], gate half first
    h = gate_up.shape[-1] // 2
    config = {"router": {"name": "token_choice", "k": k, "gating": "sigmoid",
                         "weights_on": "input"},
              "experts": swiglu(h),
              "shared": {"num_experts": 1, "hidden_dim": f["intermediate_size"]}}
    params = {"router.w_router_ME": p["router.weight"].T,
              "experts.w_gate_EMH": gate_up[..., :h],
              "experts.w_in_EMH": gate_up[..., h:],
              "experts.w_out_EHM": p["experts.down_proj"],
              **_dense(p, "shared_expert.", "shared")}
    return config, params
  if family == "jetmoe":
    gate, up = _split_concat_EXM(p["input_linear.weight"])
    config = {"router": {"name": "token_choice", "k": k,
                         "gating": "topk_softmax"},
              "experts": swiglu(f["intermediate_size"]), "output_bias": True}
    params = {"router.w_router_ME": p["router.layer.weight"].T,
              "experts.w_gate_EMH": gate, "experts.w_in_EMH": up,
              "experts.w_out_EHM": np.swapaxes(p["output_linear.weight"], 1, 2),
              "b_out_M": p["bias"]}
    return config, params
  if family == "switch":
    stack = lambda name: np.stack([p[f"experts.expert_{i}.{name}.weight"].T
                                   for i in range(f["num_experts"])])
    config = {"router": {"name": "token_choice", "k": 1, "gating": "softmax"},
              "experts": {"num_experts": f["num_experts"],
                          "hidden_dim": f["d_ff"], "activation": "relu"}}
    params = {"router.w_router_ME": p["router.classifier.weight"].T,
              "experts.w_in_EMH": stack("wi"), "experts.w_out_EHM": stack("wo")}
    return config, params
  raise KeyError(family)


def _assign(module, params):
  """Sets each dotted path of `module` to its array (shapes must match)."""
  for path, value in params.items():
    *parents, name = path.split(".")
    owner = module
    for part in parents:
      owner = getattr(owner, part)
    var = getattr(owner, name)
    assert tuple(var[...].shape) == value.shape, (path, var[...].shape,
                                                  value.shape)
    var[...] = jnp.asarray(value, var[...].dtype)


@nnx.jit
def _run(layer, x_BLM, padding_mask_BL=None):
  """layer(x) as one compiled call (eager dispatch of the engines' loops is
  slower than compiling them)."""
  return layer(x_BLM, padding_mask_BL=padding_mask_BL, deterministic=True)


def _layer(family, engine, seq_len):
  x, y, p, fields = _fixture(family)
  config, params = _family(family, fields, p)
  config = dict(config, engine=dict(ENGINES[engine]), capacity=seq_len)
  layer = layers.build_moe(config, model_dim=x.shape[-1], rngs=nnx.Rngs(0))
  _assign(layer, params)
  return layer, x, y, params


FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3",
            "deepseek_v2", "gpt_oss", "llama4", "jetmoe", "granitemoe",
            "switch")


# ragged_dot is the dropless engine with another grouped matmul: checked on
# the families whose expert input differs (biases, scores on the input).
CASES = [(f, e) for f in FAMILIES for e in sorted(ENGINES)
         if e != "dropless_ragged" or f in ("mixtral", "gpt_oss", "llama4")]


@pytest.mark.parametrize("family, engine", CASES)
def test_block_matches_transformers(family, engine):
  """(B=2, L=6, M=16); capacity C = S = 6 drops nothing."""
  layer, x, y, _ = _layer(family, engine, seq_len=6)
  got, _ = _run(layer, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("engine", ["einsum", "indices"])
def test_switch_drops_like_transformers(engine):
  """Switch with expert_capacity 2 per sequence (S=6, E=4): the same tokens
  are dropped (token order within a sequence = moejax's group order)."""
  layer, x, _, _ = _layer("switch", engine, seq_len=2)
  y2 = np.load(os.path.join(FIXTURES, "switch.npz"))["y_capacity2_BLM"]
  got, aux = _run(layer, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), y2, rtol=1e-5, atol=1e-5)
  assert (np.abs(y2).sum(-1) == 0).any()     # the fixture does drop tokens
  assert float(aux.metrics.dropped_fraction) > 0


def test_fixtures_are_small_and_biases_nonzero():
  total = sum(os.path.getsize(os.path.join(FIXTURES, n))
              for n in os.listdir(FIXTURES))
  assert total < 1_000_000
  for family in FAMILIES:
    _, _, p, _ = _fixture(family)
    for name, value in p.items():  # nothing left at a zero init
      assert np.abs(value).max() > 0.01, (family, name)


@pytest.mark.parametrize("family", ["gpt_oss", "llama4"])
def test_gradients_agree_across_engines(family):
  """d sum(y^2) / d params: dropless (custom-vjp grouped FFN) = einsum."""
  grads = {}
  for engine in ("dropless", "einsum"):
    layer, x, _, _ = _layer(family, engine, seq_len=6)
    graphdef, state = nnx.split(layer, nnx.Param)

    def loss(state, graphdef=graphdef, x=x):
      y, _ = nnx.merge(graphdef, state)(jnp.asarray(x), deterministic=True)
      return jnp.sum(y * y)
    grads[engine] = jax.jit(jax.grad(loss))(state)
  flat_d = dict(nnx.to_flat_state(grads["dropless"]))
  flat_e = dict(nnx.to_flat_state(grads["einsum"]))
  assert flat_d.keys() == flat_e.keys()
  for key in flat_d:
    g_d, g_e = np.asarray(flat_d[key][...]), np.asarray(flat_e[key][...])
    np.testing.assert_allclose(g_d, g_e, rtol=1e-4, atol=1e-5, err_msg=key)
  if family == "gpt_oss":  # the folded biases get their own gradients
    for name in ("b_in_EH", "b_gate_EH", "b_out_EM"):
      assert np.abs(np.asarray(flat_d[("experts", name)][...])).max() > 0


def test_clamped_swiglu_hand_computed():
  """alpha=1, limit=1 on H=3: gate clamped above only, up both ways."""
  act = ffn_ops.ClampedSwiGLU(alpha=1.0, limit=1.0)
  up_H = jnp.array([3.0, 0.5, -4.0])
  gate_H = jnp.array([2.0, -1.0, 0.5])
  sig = lambda v: 1 / (1 + math.exp(-v))
  want = [(1 + 1) * 1 * sig(1),            # gate 2 -> 1, up 3 -> 1
          (0.5 + 1) * -1 * sig(-1),        # gate -1 kept (no lower clamp)
          (-1 + 1) * 0.5 * sig(0.5)]       # up -4 -> -1
  np.testing.assert_allclose(ffn_ops.activate(up_H, gate_H, act), want,
                             rtol=1e-6)
  # The name uses GPT-OSS's constants (1.702, 7.0).
  got = ffn_ops.activate(jnp.array([8.0]), jnp.array([8.0]), "clamped_swiglu")
  np.testing.assert_allclose(got, [(7 + 1) * 7 * sig(1.702 * 7)], rtol=1e-6)


def test_group_score_max_and_top2_sum_hand_computed():
  """(G=1, S=1, E=4), 2 groups of 2, one kept: scores [.75, 0, .5, .5]:
  max keeps group 0 (.75 > .5), top2_sum keeps group 1 (1.0 > .75)."""
  scores = jnp.array([[[0.75, 0.0, 0.5, 0.5]]])
  kw = dict(num_expert_groups=2, topk_groups=1)
  by_max = routing.group_limited_scores(scores, group_score="max", **kw)
  by_sum = routing.group_limited_scores(scores, **kw)
  inf = -np.inf
  np.testing.assert_array_equal(by_max[0, 0], [0.75, 0.0, inf, inf])
  np.testing.assert_array_equal(by_sum[0, 0], [inf, inf, 0.5, 0.5])


def _one_expert_layer(router, activation="relu", use_bias=False, **layer_kw):
  """E=1 (or the router's E), M=1, H=1 layers for hand computations."""
  return layers.MoELayer(
      router=router, experts=layers.Experts(
          router.num_experts, 1, 1, activation=activation, use_bias=use_bias,
          rngs=nnx.Rngs(0)),
      engine=layers.DroplessEngine(tile=2), **layer_kw)


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_expert_biases_hand_computed(engine):
  """(B=1, L=2, M=1, H=1, E=1, K=1): relu(x - 1) * 2 + 0.5 at x = 3, 0.5."""
  layer = layers.build_moe(
      {"router": {"name": "token_choice", "k": 1},
       "engine": ENGINES[engine], "capacity": 2,
       "experts": {"num_experts": 1, "hidden_dim": 1, "activation": "relu",
                   "use_bias": True}}, model_dim=1, rngs=nnx.Rngs(0))
  _assign(layer, {"experts.w_in_EMH": np.ones((1, 1, 1), np.float32),
                  "experts.b_in_EH": -np.ones((1, 1), np.float32),
                  "experts.w_out_EHM": np.full((1, 1, 1), 2.0, np.float32),
                  "experts.b_out_EM": np.full((1, 1), 0.5, np.float32)})
  y, _ = _run(layer, jnp.array([[[3.0], [0.5]]]))
  np.testing.assert_allclose(y[0, :, 0], [4.5, 0.5], rtol=1e-6)
  # The Experts module alone gives the same: [E=1, X=2, M=1].
  np.testing.assert_allclose(layer.experts(jnp.array([[[3.0], [0.5]]]))[0, :, 0],
                             [4.5, 0.5], rtol=1e-6)


def test_padded_tokens_get_no_expert_bias():
  """(B=1, L=2, M=1): the padded token's output is 0 despite b_out."""
  layer = _one_expert_layer(layers.TokenChoiceRouter(1, 1, k=1,
                                                     rngs=nnx.Rngs(0)),
                            use_bias=True)
  _assign(layer, {"experts.b_out_EM": np.full((1, 1), 0.5, np.float32)})
  y, _ = _run(layer, jnp.array([[[3.0], [1.0]]]),
              jnp.array([[True, False]]))
  assert float(y[0, 1, 0]) == 0.0 and float(y[0, 0, 0]) != 0.0


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_weights_on_input_hand_computed(engine):
  """(B=1, L=1, M=1, H=1, E=2, K=1), swiglu f(x) = silu(x) x, router
  w = 0 so both logits are 0 and sigmoid gives 0.5 (expert 0 on the tie):
  input: f(0.5 * 2) = silu(1); output would be 0.5 f(2) = silu(2)."""
  layer = layers.build_moe(
      {"router": {"name": "token_choice", "k": 1, "gating": "sigmoid",
                  "weights_on": "input"},
       "engine": ENGINES[engine], "capacity": 1,
       "experts": {"num_experts": 2, "hidden_dim": 1, "activation": "swiglu"}},
      model_dim=1, rngs=nnx.Rngs(0))
  ones = np.ones((2, 1, 1), np.float32)
  _assign(layer, {"router.w_router_ME": np.zeros((1, 2), np.float32),
                  "experts.w_in_EMH": ones, "experts.w_gate_EMH": ones,
                  "experts.w_out_EHM": ones})
  y, aux = _run(layer, jnp.array([[[2.0]]]))
  silu = lambda v: v / (1 + math.exp(-v))
  np.testing.assert_allclose(float(y[0, 0, 0]), silu(1.0), rtol=1e-6)
  layer.router.weights_on = "output"
  y_out, _ = _run(layer, jnp.array([[[2.0]]]))
  np.testing.assert_allclose(float(y_out[0, 0, 0]), silu(2.0), rtol=1e-6)
  assert float(aux.losses["load_balance"]) > 0


def test_router_bias_selects_and_weights():
  """(S=1, E=3, K=1), w = 0 and b = [0, 2, 1]: expert 1, weight
  softmax(b)[1]."""
  router = layers.TokenChoiceRouter(2, 3, k=1, use_bias=True,
                                    rngs=nnx.Rngs(0))
  router.w_router_ME[...] = jnp.zeros((2, 3))
  router.b_router_E[...] = jnp.array([0.0, 2.0, 1.0])
  out = router(jnp.ones((1, 1, 2)), capacity=None)
  assert int(out.plan.expert_GSK[0, 0, 0]) == 1
  want = math.exp(2) / (1 + math.exp(2) + math.exp(1))
  np.testing.assert_allclose(float(out.plan.weight_GSK[0, 0, 0]), want,
                             rtol=1e-6)
  assert layers.TokenChoiceRouter(2, 3, k=1, rngs=nnx.Rngs(0)).b_router_E is None


def test_gated_shared_and_output_bias_hand_computed():
  """(B=1, L=1, M=1), routed experts zeroed: y = b + sigmoid(x) relu(x)."""
  layer = layers.build_moe(
      {"router": {"name": "token_choice", "k": 1}, "engine": {"name": "dropless"},
       "experts": {"num_experts": 2, "hidden_dim": 1, "activation": "relu"},
       "shared": {"num_experts": 1, "hidden_dim": 1, "gated": True},
       "output_bias": True}, model_dim=1, rngs=nnx.Rngs(0))
  assert isinstance(layer.shared, moe_lib.GatedShared)
  one = np.ones((1, 1), np.float32)
  _assign(layer, {"experts.w_out_EHM": np.zeros((2, 1, 1), np.float32),
                  "shared.ffn.w_in_MH": one, "shared.ffn.w_out_HM": one,
                  "shared.w_shared_gate_M1": one,
                  "b_out_M": np.array([0.25], np.float32)})
  y, _ = _run(layer, jnp.array([[[2.0]]]))
  np.testing.assert_allclose(float(y[0, 0, 0]),
                             0.25 + 2.0 / (1 + math.exp(-2.0)), rtol=1e-6)


# --- errors -----------------------------------------------------------------


def _base(**overrides):
  config = {"router": {"name": "token_choice", "k": 2},
            "experts": {"num_experts": 4, "hidden_dim": 8,
                        "activation": "swiglu"}}
  for key, value in overrides.items():
    if isinstance(value, dict) and isinstance(config.get(key), dict):
      config[key] = dict(config[key], **value)
    else:
      config[key] = value
  return config


@pytest.mark.parametrize("overrides, field, words", [
    ({"router": {"weights_on": "middle"}}, "moe.router.weights_on",
     "allowed"),
    ({"router": {"weights_on": "input"}}, "moe.router.k", "needs k=1"),
    ({"router": {"use_bias": "yes"}}, "moe.router.use_bias", "True or False"),
    ({"router": {"name": "deepseek", "group_score": "top3"}},
     "moe.router.group_score", "top2_sum"),
    ({"experts": {"use_bias": 1}}, "moe.experts.use_bias", "True or False"),
    ({"experts": {"swiglu_alpha": 1.0}}, "moe.experts.swiglu_alpha",
     "only to activation 'clamped_swiglu'"),
    ({"experts": {"activation": "clamped_swiglu", "swiglu_limit": 0}},
     "moe.experts.swiglu_limit", "> 0"),
    ({"experts": {"activation": "clamped_swiglu",
                  "swiglu_limit": float("inf")}},
     "moe.experts.swiglu_limit", "finite"),
    ({"shared": {"num_experts": 1, "gated": "sigmoid"}}, "moe.shared.gated",
     "True or False"),
    ({"shared": {"num_experts": 1, "gate": True}}, "moe.shared.gate",
     "did you mean moe.shared.gated"),
    ({"output_bias": "zeros"}, "moe.output_bias", "must be True or False"),
    ({"experts": {"activation": "clamped_swiglu", "swiglu_limit": 3.0},
      "shared": {"num_experts": 1}}, "moe.experts.swiglu_limit",
     "moe.shared runs the experts' activation with its default constants"),
])
def test_bad_options_name_their_field(overrides, field, words):
  with pytest.raises(build_lib.MoEConfigError) as err:
    layers.build_moe(_base(**overrides), model_dim=8, rngs=nnx.Rngs(0))
  fields = [f for f, _, _ in err.value.errors]
  assert field in fields, err.value.lines
  assert words in str(err.value), str(err.value)


def test_pallas_refuses_expert_biases():
  with pytest.raises(build_lib.MoEConfigError, match="PallasEngine does not "
                     "run experts with biases"):
    layers.build_moe(_base(engine={"name": "pallas"},
                           experts={"use_bias": True}),
                     model_dim=8, rngs=nnx.Rngs(0))


def test_soft_moe_refuses_expert_biases():
  with pytest.raises(build_lib.MoEConfigError, match="moe.experts.use_bias"):
    layers.build_moe({"layer": "soft_moe", "experts": {
        "num_experts": 4, "hidden_dim": 8, "use_bias": True}},
                     model_dim=8, rngs=nnx.Rngs(0))


def test_layer_refuses_input_weights_with_k2_from_a_user_router():
  router = layers.TokenChoiceRouter(4, 4, k=2, rngs=nnx.Rngs(0))
  router.weights_on = "input"   # a user's router declaring it with k=2
  with pytest.raises(ValueError, match="needs k=1, got k=2"):
    layers.MoELayer(router=router, experts=layers.Experts(
        4, 4, 8, rngs=nnx.Rngs(0)), engine=layers.DroplessEngine())


def test_weights_on_input_refuses_a_k2_plan():
  plan = routing.token_choice(jnp.zeros((1, 2, 3)), k=2, capacity=None)
  with pytest.raises(ValueError, match="K = 1"):
    routing.weights_on_input(plan, jnp.zeros((1, 2, 4)))


def test_option_error_names_option():
  with pytest.raises(OptionError) as err:
    layers.Experts(2, 4, 8, activation="swiglu", swiglu_limit=3.0,
                   rngs=nnx.Rngs(0))
  assert err.value.option == "swiglu_limit"


@pytest.mark.parametrize("family, engine", [("gpt_oss", "dropless"),
                                            ("llama4", "indices")])
def test_block_under_expert_parallelism(family, engine):
  """Expert biases and input-side scores on a (data=2, expert=4) mesh of the
  8 virtual devices, shard_map: the fixture batch repeated to B=8 (G=8
  groups of S=6) still matches transformers."""
  from moejax.sharding import ExpertParallel  # pylint: disable=g-import-not-at-top
  from moejax.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  layer, x, y, _ = _layer(family, engine, seq_len=6)
  layer.set_expert_parallel(ExpertParallel(make_mesh({"data": 2,
                                                      "expert": 4})))
  got, _ = _run(layer, jnp.asarray(np.concatenate([x] * 4)))
  np.testing.assert_allclose(np.asarray(got), np.concatenate([y] * 4),
                             rtol=1e-5, atol=1e-5)


# --- JetMoE's attention block: MoAAttention ---------------------------------


def _jetmoe_attention():
  """(arrays, fields, tensors) of tests/layers/fixtures/jetmoe_attention.npz:
  B=2, L=7, M=32, E=4, k=2, K=2 kv heads, D=8, rope_theta 1000; row 1
  left-padded by 2, row 0's positions start at 3."""
  with np.load(os.path.join(FIXTURES, "jetmoe_attention.npz")) as data:
    arrays = {k: np.asarray(v) for k, v in data.items()}
  fields = json.loads(str(arrays["config_json"]))
  tensors = {k[2:]: v for k, v in arrays.items() if k.startswith("p/")}
  return arrays, fields, tensors


def test_jetmoe_attention_matches_transformers():
  """y_BLM [2, 7, 32] on the 12 unpadded tokens and the router logits
  [2, 7, 4] within 1e-5 of transformers' JetMoeAttention (measured: 2.5e-6
  on outputs of magnitude up to 8.9; logits 1e-6)."""
  from moejax.models.hf import jetmoe  # pylint: disable=g-import-not-at-top
  a, fields, tensors = _jetmoe_attention()
  attn = jetmoe.load_jetmoe_attention(fields, tensors)
  assert (attn.num_kv_heads, attn.k, attn.num_heads) == (2, 2, 8)
  real_BL = a["padding_mask_BL"]
  assert real_BL.sum() == 12
  y_BLM = nnx.jit(lambda m, x, p, pos: m(x, padding_mask_BL=p,
                                         positions_BL=pos))(
      attn, jnp.asarray(a["x_BLM"]), jnp.asarray(real_BL),
      jnp.asarray(a["positions_BL"]))
  np.testing.assert_allclose(np.asarray(y_BLM)[real_BL], a["y_BLM"][real_BL],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(attn.router_logits(jnp.asarray(a["x_BLM"])),
                             a["router_logits_BLE"], rtol=1e-5, atol=1e-5)
  # RoPE is relative: row 0 at positions 0..6 instead of 3..9 is the same;
  # its base is not: the default 10000 instead of the config's 1000 differs.
  x_BLM, pad_BL = jnp.asarray(a["x_BLM"]), jnp.asarray(real_BL)
  np.testing.assert_allclose(attn(x_BLM, padding_mask_BL=pad_BL)[0],
                             a["y_BLM"][0], rtol=1e-5, atol=1e-5)
  attn.rope_max_wavelength = 10_000.0
  y_BLM = attn(x_BLM, padding_mask_BL=pad_BL)
  assert np.abs(np.asarray(y_BLM)[0] - a["y_BLM"][0]).max() > 1e-3


def test_jetmoe_attention_mapping_round_trips_bitwise():
  """Every Entry's to_hf(to_jax(tensors)) is the checkpoint's tensors."""
  _, fields, tensors = _jetmoe_attention()
  from moejax.models.hf import mapping  # pylint: disable=g-import-not-at-top
  entries = mapping.jetmoe_attention("attn", "", 2, fields["kv_channels"])
  assert sorted(n for e in entries for n in e.hf_names) == sorted(tensors)
  for entry in entries:
    arrays = [tensors[n] for n in entry.hf_names]
    back = entry.to_hf(entry.to_jax(arrays))
    for want, got in zip(arrays, back):
      np.testing.assert_array_equal(got, want)


def test_jetmoe_attention_loader_names_bad_tensors_and_rope():
  from moejax.models.hf import jetmoe  # pylint: disable=g-import-not-at-top
  from moejax.models.hf import CheckpointError, UnsupportedConfig  # pylint: disable=g-import-not-at-top,g-multiple-import
  _, fields, tensors = _jetmoe_attention()
  short = {k: v for k, v in tensors.items() if k != "kv_proj.weight"}
  with pytest.raises(CheckpointError, match="lacks tensor 'kv_proj.weight'"):
    jetmoe.load_jetmoe_attention(fields, short)
  with pytest.raises(CheckpointError, match=r"'experts.input_linear.weight' "
                     r"has shape \(4, 16, 32\); this config needs \(4, 24, 32\)"):
    jetmoe.load_jetmoe_attention(dict(fields, num_key_value_heads=3),
                                 tensors)
  with pytest.raises(UnsupportedConfig, match="supports only the default "
                     "full-width RoPE, got 'linear' over 8 of 8 features"):
    jetmoe.load_jetmoe_attention(dict(fields, rope_parameters={
        "rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0}), tensors)
  loaded = jetmoe.load_jetmoe_attention(
      fields, {f"model.layers.0.self_attention.{k}": v
               for k, v in tensors.items()},
      prefix="model.layers.0.self_attention")
  np.testing.assert_array_equal(loaded.b_out_M[...], tensors["experts.bias"])
