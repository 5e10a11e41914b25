"""The open architecture: router modules, engine objects, the registry.

* A router defined here (not in moejax) runs with every engine (against the
  per-token reference loop, outputs and gradients), under shard_map expert
  parallelism (equal to unsharded) and by dotted path through build_moe.
* Each option the old flat layer overrode silently is now honoured or an
  error (DeepSeek softmax gating, BASE gating, batch_prioritized on routers
  without it), and a forward call changes no router state.
* The cosine router (X-MoE) on a hand-computed case.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import layers as L
from moejax import routing
from moejax.layers import reference
from moejax.sharding import ExpertParallel
from moejax.sharding import make_mesh

M, H, E, K = 8, 16, 4, 2
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}


class SharpenedRouter(nnx.Module):
  """A user's router, written against the contract only (no moejax base
  class): top-k over x W scaled by a learned sharpness exp(s), Mixtral-style
  softmax over the k chosen logits."""

  loss_names = ("sharpness",)

  def __init__(self, model_dim, num_experts, *, k=2, group_local=True, rngs):
    self.num_experts, self.k, self.causal = num_experts, k, True
    self.group_local = group_local
    self.w_ME = nnx.Param(jax.random.normal(rngs.params(),
                                            (model_dim, num_experts)))
    self.log_sharpness = nnx.Param(jnp.asarray(0.3, jnp.float32))

  def __call__(self, x_GSM, *, capacity, padding_mask_GS=None,
               token_ids_GS=None, deterministic=False):
    logits_GSE = jnp.einsum("GSM,ME->GSE", x_GSM.astype(jnp.float32),
                            self.w_ME[...]) * jnp.exp(self.log_sharpness[...])
    plan = routing.token_choice(logits_GSE, k=self.k, capacity=capacity,
                                padding_mask_GS=padding_mask_GS,
                                gating="topk_softmax")
    # A router's own loss, a mean over groups as the contract asks.
    sharp = jnp.mean(jnp.max(plan.probs_GSE, axis=-1))
    return L.RouterOutput(plan=plan, logits_GSE=logits_GSE,
                          losses={"sharpness": sharp})


PLUGIN_PATH = f"{SharpenedRouter.__module__}.SharpenedRouter"


def _x(shape=(4, 8, M), seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


def _layer(engine, router=None, **kw):
  rngs = nnx.Rngs(0)
  router = router or SharpenedRouter(M, E, k=K, rngs=rngs)
  return L.MoELayer(router=router,
                    experts=L.Experts(E, M, H, activation="swiglu",
                                      rngs=nnx.Rngs(1)),
                    engine=engine, capacity_factor=1.0, group_size=8, **kw)


def _loss_and_grads(layer, x):
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(y * jnp.cos(y)) + aux.losses["sharpness"], (y, aux)

  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (value, (y, aux)), grads = f.lower(params, x).compile(FAST_COMPILE)(
      params, x)
  return jax.tree.map(np.asarray, (value, y, aux, grads))


def _reference_loss_and_grads(layer, x, dropless):
  """The same loss with the per-token reference loop as the engine."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x):
    lyr = nnx.merge(graphdef, params, rest)
    x_GSM = x.reshape(-1, 8, M)
    capacity = lyr.layer_capacity(8, False)
    out = lyr.router(x_GSM, capacity=capacity)
    y = reference.reference_moe(out.plan, x_GSM, lyr.experts.weights(),
                                "swiglu", dropless=dropless).reshape(x.shape)
    return jnp.sum(y * jnp.cos(y)) + out.losses["sharpness"], y

  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (value, y), grads = f(params, x)
  return jax.tree.map(np.asarray, (value, y, grads))


ENGINES = [L.EinsumEngine(), L.IndicesEngine(), L.DroplessEngine(tile=4),
           L.PallasEngine(backend="triton_interpret", tile=8)]


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: type(e).__name__)
def test_plugin_router_runs_with_every_engine(engine):
  x = _x()
  layer = _layer(engine)
  value, y, aux, grads = _loss_and_grads(layer, x)
  ref_value, ref_y, ref_grads = _reference_loss_and_grads(
      layer, x, dropless=not engine.uses_capacity)
  np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(value, ref_value, rtol=2e-5, atol=2e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
  # The plugin's own loss reaches the aux next to the layer's.
  assert set(aux.losses) == {"load_balance", "z_loss", "sharpness"}
  # Its router parameters get gradient (through the combine weights).
  assert np.abs(grads[0]["router"]["log_sharpness"]).sum() > 0


@pytest.mark.parametrize("engine, mode, group_local", [
    (L.IndicesEngine(), "shard_map", True),
    (L.DroplessEngine(tile=4), "shard_map", False),
    (L.EinsumEngine(), "gspmd", True),
])
def test_plugin_router_under_expert_parallelism(engine, mode, group_local):
  """Equal to the unsharded layer on 8 devices (data 2 x expert 4), whether
  the router runs per device (group_local) or under GSPMD."""
  x = _x((8, 8, M), seed=1)   # 8 groups over 8 token shards
  router = SharpenedRouter(M, E, k=K, group_local=group_local,
                           rngs=nnx.Rngs(0))
  plain = _layer(engine, router=router)
  sharded = nnx.clone(plain)
  sharded.set_expert_parallel(
      ExpertParallel(make_mesh({"data": 2, "expert": 4}), mode))
  got, want = _loss_and_grads(sharded, x), _loss_and_grads(plain, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_plugin_router_by_dotted_path():
  layer = L.build_moe({"router": {"name": PLUGIN_PATH, "k": 1},
                       "engine": {"name": "dropless", "tile": 4},
                       "experts": {"num_experts": E, "hidden_dim": H}},
                      model_dim=M, rngs=nnx.Rngs(0), causal=True)
  assert isinstance(layer.router, SharpenedRouter) and layer.router.k == 1
  y, aux = layer(_x())
  assert y.shape == (4, 8, M) and "sharpness" in aux.losses
  with pytest.raises(ValueError, match=r"moe.router.gating='softmax': "
                     r"SharpenedRouter does not take option 'gating'"):
    L.build_moe({"router": {"name": PLUGIN_PATH, "gating": "softmax"},
                 "experts": {"num_experts": E, "hidden_dim": H}},
                model_dim=M, rngs=nnx.Rngs(0))


def test_plugin_router_by_dotted_path_in_a_training_run(tmp_path):
  """The smoke LM trains with the user's router named in its config (and
  its own loss weighted), through validation, the train step, checkpoints
  and eval, on 8 devices with expert parallelism (data 2 x expert 4)."""
  import json
  import os
  import sys
  import ml_collections
  from moejax.train import loop
  repo = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
  sys.path.insert(0, repo)
  from experiments.configs import lm_stdlib  # pylint: disable=g-import-not-at-top
  c = lm_stdlib.get_config("size=smoke")
  c.moe.router = ml_collections.ConfigDict({"name": PLUGIN_PATH, "k": 2})
  c.aux_loss_weights.sharpness = 1e-3
  c.mesh.data, c.mesh.expert = 2, 4
  c.expert_parallel = "shard_map"
  c.data.data_dir = str(tmp_path / "data")
  c.num_train_steps, c.checkpoint_every, c.eval_every = 4, 2, 4
  workdir = str(tmp_path / "run")
  loop.validate_config(c)
  summary = loop.train_and_evaluate(c, workdir)
  assert summary["step"] == 4 and np.isfinite(summary["eval_ce_loss"])
  records = [json.loads(line) for line in open(os.path.join(
      workdir, "metrics.jsonl"))]
  train = [r for r in records if "train/aux/sharpness" in r]
  assert len(train) == 4 and all(0 < r["train/aux/sharpness"] <= 1
                                 for r in train)
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["moe"]["router"]["name"] == PLUGIN_PATH


# --- options that used to be overridden silently ---------------------------


def test_deepseek_softmax_gating_is_honoured():
  """DeepSeek-V2: softmax scores, group-limited, no renormalisation; the old
  layer replaced softmax with sigmoid and forced renormalize=True."""
  router = L.DeepSeekRouter(M, 8, k=2, gating="softmax", renormalize=False,
                            num_expert_groups=4, topk_groups=2,
                            rngs=nnx.Rngs(0))
  x_GSM = _x((2, 8, M))
  out = router(x_GSM, capacity=None)
  logits_GSE = jnp.einsum("GSM,ME->GSE", x_GSM, router.w_router_ME[...])
  want = routing.aux_free_bias_route(
      logits_GSE, jnp.zeros(8), k=2, capacity=None, gating="softmax",
      num_expert_groups=4, topk_groups=2, renormalize=False)
  np.testing.assert_allclose(out.plan.probs_GSE,
                             jax.nn.softmax(logits_GSE, -1), rtol=1e-6)
  np.testing.assert_array_equal(out.plan.expert_GSK, want.expert_GSK)
  np.testing.assert_allclose(out.plan.weight_GSK, want.weight_GSK, rtol=1e-6)
  # Not renormalised: the two weights are softmax probabilities, sum < 1.
  assert float(jnp.max(jnp.sum(out.plan.weight_GSK, -1))) < 1.0


@pytest.mark.parametrize("gating", ["sigmoid", "softmax"])
def test_balanced_router_gating_reaches_it(gating):
  router = L.BalancedRouter(M, E, gating=gating, rngs=nnx.Rngs(0))
  x_GSM = _x((2, 8, M))
  out = router(x_GSM, capacity=None, deterministic=True)
  logits_GSE = router.logits(x_GSM)
  picked_GS = jnp.take_along_axis(logits_GSE, out.plan.expert_GSK, -1)[..., 0]
  gate_GS = (jax.nn.sigmoid(picked_GS) if gating == "sigmoid" else
             jnp.take_along_axis(jax.nn.softmax(logits_GSE, -1),
                                 out.plan.expert_GSK, -1)[..., 0])
  np.testing.assert_allclose(out.plan.weight_GSK[..., 0], gate_GS, rtol=1e-6)


def test_batch_prioritized_belongs_to_token_choice_only():
  """BPR is a token-choice option: other routers refuse it instead of
  carrying it into a causality check they ignore."""
  for name in ("hash", "deepseek", "expert_choice"):
    with pytest.raises(ValueError, match="does not take option "
                       "'batch_prioritized'"):
      L.build_moe({"router": {"name": name, "batch_prioritized": True},
                   "experts": {"num_experts": E, "hidden_dim": H}},
                  model_dim=M, rngs=nnx.Rngs(0))
  # Hash and DeepSeek stay causal; BPR token choice is not.
  for name, causal in (("hash", True), ("deepseek", True),
                       ("expert_choice", False), ("balanced", False)):
    k = {"k": 1} if name in ("hash",) else {}
    layer = L.build_moe({"router": {"name": name, **k},
                         "experts": {"num_experts": E, "hidden_dim": H},
                         "allow_non_causal": True},
                        model_dim=M, rngs=nnx.Rngs(0), causal=True)
    assert layer.causal is causal, name
  with pytest.raises(ValueError, match="moe.router.batch_prioritized=True: "
                     "TokenChoiceRouter reads later tokens"):
    L.build_moe({"router": {"name": "token_choice",
                            "batch_prioritized": True},
                 "experts": {"num_experts": E, "hidden_dim": H}},
                model_dim=M, rngs=nnx.Rngs(0), causal=True)


def test_forward_changes_no_state_and_update_is_explicit():
  """DeepSeek: a plain forward (deterministic defaults to False) leaves the
  bias alone; update_routers applies the load the call reported."""
  layer = _layer(L.DroplessEngine(tile=4), router=L.DeepSeekRouter(
      M, E, k=2, bias_update_rate=0.1, rngs=nnx.Rngs(0)))
  before = jax.tree.map(np.asarray, nnx.state(layer))
  _, aux = layer(_x())
  after = jax.tree.map(np.asarray, nnx.state(layer))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  load_E = np.asarray(aux.stats["load_E"])
  assert load_E.sum() == 4 * 8 * 2                     # (B*L) tokens x k
  L.update_routers(layer, aux)
  want = 0.1 * np.sign(load_E.mean() - load_E)
  np.testing.assert_allclose(np.asarray(layer.router.bias_E[...]), want)


def test_update_routers_under_jit_on_a_model():
  from moejax.models import DecoderLM
  model = DecoderLM(32, M, 2, 2, H, moe_every=1, moe={
      "router": {"name": "deepseek", "k": 2, "bias_update_rate": 0.5},
      "engine": {"name": "dropless", "tile": 4},
      "experts": {"num_experts": E}}, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, tokens):
    model = nnx.merge(graphdef, state)
    _, aux = model(tokens)
    L.update_routers(model, aux)
    return nnx.state(model), aux

  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 8)))
  new_state, aux = step(state, tokens)
  model = nnx.merge(graphdef, new_state)
  for i, block in enumerate(model.blocks):
    load_E = np.asarray(aux.stats["load_E"][i])
    np.testing.assert_allclose(np.asarray(block.ffn.router.bias_E[...]),
                               0.5 * np.sign(load_E.mean() - load_E))


# --- the cosine router -------------------------------------------------------


def test_cosine_router_hand_computed():
  # (G=1, S=2, M=2, E=2, D=2): W = I, experts e0 = (1, 0), e1 = (1, 1)/|.|,
  # tau = 0.5. Token 0 = (3, 0): cos = (1, 1/sqrt2); token 1 = (0, -2):
  # cos = (0, -1/sqrt2). Logits are cos / tau.
  router = L.CosineRouter(2, 2, k=1, routing_dim=2, init_temperature=0.5,
                          rngs=nnx.Rngs(0))
  router.w_proj_MD[...] = jnp.eye(2)
  router.expert_embed_ED[...] = jnp.array([[1.0, 0.0], [2.0, 2.0]])
  x_GSM = jnp.array([[[3.0, 0.0], [0.0, -2.0]]])
  r2 = 1 / np.sqrt(2)
  want_GSE = np.array([[[1.0, r2], [0.0, -r2]]]) / 0.5
  out = router(x_GSM, capacity=2)
  np.testing.assert_allclose(out.logits_GSE, want_GSE, rtol=1e-5)
  np.testing.assert_array_equal(out.plan.expert_GSK[..., 0], [[0, 0]])
  np.testing.assert_allclose(out.plan.weight_GSK[..., 0],
                             jax.nn.softmax(want_GSE, -1)[..., 0], rtol=1e-5)
  # Scale-invariant in the token (cosine), bounded by 1 / tau.
  out2 = router(x_GSM * 7.0, capacity=2)
  np.testing.assert_allclose(out2.logits_GSE, out.logits_GSE, rtol=1e-5)


def test_cosine_router_trains_in_a_layer():
  layer = L.build_moe({"router": {"name": "cosine", "k": 2,
                                  "routing_dim": 4},
                       "engine": {"name": "indices"},
                       "experts": {"num_experts": E, "hidden_dim": H}},
                      model_dim=M, rngs=nnx.Rngs(0), causal=True)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params):
    y, aux = nnx.merge(graphdef, params, rest)(_x())
    return jnp.mean(y ** 2) + aux.losses["load_balance"]

  grads = jax.grad(loss)(params)
  for name in ("w_proj_MD", "expert_embed_ED", "log_tau"):
    assert np.abs(np.asarray(grads["router"][name])).sum() > 0, name


# --- registry and layer arguments --------------------------------------------


def test_registry_errors_name_what_is_allowed():
  cfg = {"experts": {"num_experts": E, "hidden_dim": H}}
  with pytest.raises(ValueError, match=r"moe.router.name='token_chioce': "
                     r"unknown router 'token_chioce' \(did you mean "
                     r"'token_choice'\?\)"):
    L.build_moe({**cfg, "router": {"name": "token_chioce"}}, model_dim=M,
                rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="cannot import module 'no_such_pkg'"):
    L.build_moe({**cfg, "router": {"name": "no_such_pkg.Router"}},
                model_dim=M, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError) as err:
    L.build_moe({**cfg, "router": {"name": "token_choice", "k": 9},
                 "engine": {"name": "dropless", "tiel": 4}},
                model_dim=M, rngs=nnx.Rngs(0))
  lines = err.value.lines
  assert len(lines) == 2, lines
  assert lines[0].startswith("moe.router.k=9: k must be"), lines
  assert lines[1].startswith("moe.engine.tiel=4: DroplessEngine does not "
                             "take option 'tiel'"), lines


def test_flat_form_names_where_fields_moved():
  with pytest.raises(ValueError) as err:
    L.build_moe({"router": "deepseek", "k": 2, "num_experts": 8,
                 "dropless_tile": 64, "capacity_factor": 1.0},
                model_dim=M, rngs=nnx.Rngs(0))
  text = str(err.value)
  for want in ("moe.router='deepseek': moved to moe.router.name",
               "moe.k=2: moved to moe.router.k",
               "moe.num_experts=8: moved to moe.experts.num_experts",
               "moe.dropless_tile=64: moved to moe.engine.tile"):
    assert want in text, text


def test_layer_argument_errors():
  rngs = nnx.Rngs(0)
  router = L.TokenChoiceRouter(M, E, k=2, rngs=rngs)
  experts = L.Experts(E, M, H, rngs=rngs)
  with pytest.raises(ValueError, match="experts has 8 experts but the "
                     "router routes to 4"):
    L.MoELayer(router=router, experts=L.Experts(8, M, H, rngs=rngs),
               engine=L.IndicesEngine())
  with pytest.raises(ValueError, match="engine must be an engine object"):
    L.MoELayer(router=router, experts=experts, engine="indices")
  with pytest.raises(ValueError, match="capacity_factor must be a number > 0"):
    L.MoELayer(router=router, experts=experts, engine=L.IndicesEngine(),
               capacity_factor=0)
  with pytest.raises(ValueError, match="unknown gmm 'cublas'"):
    L.DroplessEngine(gmm="cublas")
  with pytest.raises(ValueError, match="unknown pallas backend 'cuda'"):
    L.PallasEngine(backend="cuda")


def test_weighted_sum_refuses_weights_that_do_nothing():
  losses = {"load_balance": jnp.array([1.0, 2.0]), "z_loss": jnp.array(0.5)}
  assert float(L.weighted_sum(losses, {"load_balance": 0.1, "z_loss": 1.0,
                                       "importance": 0.0})) == pytest.approx(
                                           0.8)
  with pytest.raises(ValueError, match=r"\['importance'\], which no MoE "
                     r"layer reports"):
    L.weighted_sum(losses, {"importance": 0.01})


def test_pyramid_stack_with_per_layer_overrides():
  """PR-MoE's pyramid: more experts in the last layer, through
  moe['layers'] overrides; the aux of unequal layers still stacks."""
  from moejax.models import DecoderLM
  from moejax.models import accounting
  model = DecoderLM(32, M, 3, 2, H, moe_every=1, moe={
      "router": {"name": "token_choice", "k": 1},
      "experts": {"num_experts": 2},
      "layers": {"2": {"experts": {"num_experts": 8},
                       "router": {"name": "deepseek", "k": 2}}}},
                    rngs=nnx.Rngs(0))
  assert [b.ffn.num_experts for b in model.blocks] == [2, 2, 8]
  assert isinstance(model.blocks[2].ffn.router, L.DeepSeekRouter)
  _, aux = model(jnp.zeros((2, 8), jnp.int32))
  assert aux.metrics.expert_load_E.shape == (3, 8)
  np.testing.assert_array_equal(aux.metrics.expert_load_E[:2, 2:], 0.0)
  np.testing.assert_array_equal(aux.losses["sequence_balance"][:2], 0.0)
  counts = accounting.count_params(model)
  per_expert = 3 * M * H                     # swiglu: w_in, w_gate, w_out
  assert counts["experts"] == (2 + 2 + 8) * per_expert
  assert counts["experts_active"] == (1 + 1 + 2) * per_expert
  with pytest.raises(ValueError, match=r"moe.layers.1=\{\}: not an MoE "
                     r"layer"):
    DecoderLM(32, M, 3, 2, H, moe_every=3, moe={
        "experts": {"num_experts": 2}, "layers": {"1": {}}},
              rngs=nnx.Rngs(0))
