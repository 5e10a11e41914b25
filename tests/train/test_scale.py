"""Scale features, in process: scanned layers against unrolled ones, remat
policies, gradient accumulation against the full batch, bfloat16 compute
over float32 master weights, MFU arithmetic, and their config checks."""

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from moejax import models
from moejax import train
from moejax.models import common
from moejax.train import state as state_lib
from moejax.train import step as step_lib
from moejax.train import throughput
from moejax.train import validation

# A tiny MoE LM: V=13, M=8, N=2 heads, mlp 16, E=4 experts, top-2.
V, M, N, MLP = 13, 8, 2, 16
TOP2 = {"router": {"name": "token_choice", "k": 2},
        "experts": {"num_experts": 4}, "capacity_factor": 2.0}
WEIGHTS = {"load_balance": 0.5, "z_loss": 0.25}


def _lm(num_layers=4, moe_every=2, **kw):
  return models.DecoderLM(V, M, num_layers, N, MLP, moe_every=moe_every,
                          moe=TOP2, rngs=nnx.Rngs(jax.random.key(0)), **kw)


def _batch(b=8, l=8, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (b, l + 1), 0, V)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def _scanned_like(unrolled, **kw):
  """A scan_layers twin of `unrolled` holding the same parameters: block i
  of the unrolled model is repeat i // period of period block i % period."""
  scanned = _lm(num_layers=unrolled.num_layers, moe_every=unrolled.moe_every,
                scan_layers=True, **kw)
  period, repeats = scanned.scan_period, scanned.scan_repeats
  flat = dict(nnx.state(unrolled, nnx.Param).flat_state())
  target = nnx.state(scanned, nnx.Param)
  new = {}
  for path, var in target.flat_state():
    if path[0] != "blocks":
      new[path] = flat[path].get_value()
      continue
    j, rest = path[1], path[2:]
    new[path] = jnp.stack([flat[("blocks", r * period + j) + rest].get_value()
                           for r in range(repeats)])
  for path, var in target.flat_state():
    var.set_value(new[path])
  nnx.update(scanned, target)
  return scanned


@pytest.mark.parametrize("moe_every", [0, 2])
def test_scanned_layers_compute_what_unrolled_layers_compute(moe_every):
  unrolled = _lm(moe_every=moe_every)
  scanned = _scanned_like(unrolled)
  assert scanned.scan_period == max(moe_every, 1)
  # Stacked parameters: [repeats, ...] with a replicated (None) layer axis.
  q = scanned.blocks[0].attention.w_q_MND
  assert q.shape == (4 // scanned.scan_period, M, N, M // N)
  assert q.get_metadata()["out_sharding"][0] is None
  assert models.count_params(scanned) == models.count_params(unrolled)
  np.testing.assert_allclose(models.flops_per_token(scanned, 8),
                             models.flops_per_token(unrolled, 8))
  batch = _batch()

  def loss(model):
    loss, (_, aux, _, _) = train.compute_loss(
        train.LMTask(), model, batch, WEIGHTS if moe_every else {},
        deterministic=False)
    return loss, aux

  value_and_grad = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
  (l_u, aux_u), g_u = value_and_grad(unrolled)
  (l_s, aux_s), g_s = value_and_grad(scanned)
  np.testing.assert_allclose(l_s, l_u, rtol=1e-5)
  if moe_every:  # aux stacked per MoE layer in layer order, as stack_aux
    n_moe = len(unrolled.moe_layers)
    assert aux_s.metrics.expert_load_E.shape == (n_moe, 4)
    np.testing.assert_allclose(aux_s.metrics.expert_load_E,
                               aux_u.metrics.expert_load_E, atol=1e-6)
    np.testing.assert_allclose(aux_s.losses["load_balance"],
                               aux_u.losses["load_balance"], rtol=1e-5)
  else:
    assert aux_s is None and aux_u is None
  # The gradient of layer 3's query weights, wherever it is stored.
  period = scanned.scan_period
  np.testing.assert_allclose(
      g_s["blocks"][3 % period]["attention"]["w_q_MND"][...][3 // period],
      g_u["blocks"][3]["attention"]["w_q_MND"][...], rtol=1e-4, atol=1e-6)


def test_scan_refuses_stacks_that_do_not_repeat():
  with pytest.raises(ValueError, match="explicit moe_layers"):
    models.DecoderLM(V, M, 4, N, MLP, moe_layers=(1,), moe=TOP2,
                     scan_layers=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="multiple of 2"):
    _lm(num_layers=3, moe_every=2, scan_layers=True)
  with pytest.raises(ValueError, match=r"per-layer MoE overrides"):
    models.DecoderLM(V, M, 4, N, MLP, moe_every=2, scan_layers=True,
                     moe={**TOP2, "layers": {"3": {"capacity_factor": 1.0}}},
                     rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="update their state"):
    models.DecoderLM(V, M, 2, N, MLP, moe_every=1, scan_layers=True,
                     moe={**TOP2, "router": {"name": "deepseek", "k": 2}},
                     rngs=nnx.Rngs(0))


def test_remat_policies_give_the_gradient_of_no_remat():
  # Scanned, so remat runs inside nnx.scan (the harder case).
  batch = _batch(b=4)

  def grads(remat):
    model = _lm(scan_layers=True, remat=remat)

    def loss(model):
      return train.compute_loss(train.LMTask(), model, batch, WEIGHTS,
                                deterministic=False)[0]
    return jax.tree.leaves(nnx.jit(nnx.grad(loss))(model))

  reference = grads("none")
  for remat in ("full", "save_dots", "save_moe_outputs"):
    for a, b in zip(grads(remat), reference):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_save_moe_outputs_keeps_only_the_named_moe_outputs():
  # Under jax.checkpoint the saved residuals of save_moe_outputs are the
  # values named moe_output: one [B, L, M] per MoE block.
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=g-import-not-at-top
  model = _lm(moe_every=1, num_layers=2)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = _batch(b=2, l=4)["inputs"]

  def f(params):
    logits, _ = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(logits)

  policy = common.remat_policy("save_moe_outputs")
  saved = saved_residuals(jax.checkpoint(f, policy=policy), params)
  named = [s for s in saved if "moe_output" in str(s[1])]
  assert len(named) == 2 and all(s[0].shape == (2, 4, M) for s in named)


def _train_state(model, tx):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  state = state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params.to_pure_dict(),
      model_state=rest.to_pure_dict(), opt_state=None)
  return graphdef, state.replace(opt_state=tx.init(state.params))


@pytest.mark.parametrize("micro_batches", [4])
def test_accumulated_micro_batches_equal_the_full_batch(micro_batches):
  # SGD with learning rate 1: the parameter change is the gradient itself.
  # The batch has a mask, so micro-batches score different numbers of
  # positions: each is weighted by its share of the scored positions.
  tx = optax.sgd(1.0)
  schedule = lambda step: 1.0
  batch = _batch(b=8)
  batch["mask"] = (jnp.arange(8)[None, :] <
                   jnp.arange(3, 11)[:, None]).astype(jnp.int32)

  def run(k):
    graphdef, state = _train_state(_lm(moe_every=1, num_layers=2), tx)
    step = step_lib.make_train_step(graphdef, train.LMTask(), tx, schedule,
                                    WEIGHTS, donate=False, micro_batches=k)
    return state, *jax.device_get(step(state, batch))

  before, full_state, full = run(1)
  _, acc_state, acc = run(micro_batches)
  for name in ("loss", "ce_loss", "aux_loss", "accuracy", "grad_norm",
               "aux/load_balance", "aux/z_loss", "moe/expert_load"):
    np.testing.assert_allclose(acc[name], full[name], rtol=2e-5, atol=1e-6,
                               err_msg=name)
  assert full["aux_loss"] > 0  # the aux losses are part of what is compared
  grad_full = jax.tree.map(jnp.subtract, before.params, full_state.params)
  grad_acc = jax.tree.map(jnp.subtract, before.params, acc_state.params)
  for a, b in zip(jax.tree.leaves(grad_acc), jax.tree.leaves(grad_full)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_micro_batches_split_rows_k_apart():
  # [B=4] split into K=2: micro-batch 0 holds rows 0, 2; 1 holds rows 1, 3.
  out = step_lib.split_micro_batches({"x": jnp.arange(4)}, 2)
  np.testing.assert_array_equal(out["x"], [[0, 2], [1, 3]])
  with pytest.raises(ValueError, match="must divide"):
    step_lib.split_micro_batches({"x": jnp.arange(5)}, 2)


def test_bfloat16_compute_keeps_float32_weights_router_and_losses():
  model = _lm(moe_every=1, num_layers=2, dtype=jnp.bfloat16,
              param_dtype=jnp.float32)
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert leaf.dtype == jnp.float32  # master weights
  batch = _batch(b=2)
  x_BLM = jnp.take(model.embed_VM[...], batch["inputs"], 0).astype(
      jnp.bfloat16)
  block = model.blocks[0]
  y_BLM, aux = nnx.jit(lambda block, x: block(x))(block, x_BLM)
  assert y_BLM.dtype == jnp.bfloat16  # compute
  assert block.ffn.router.logits(x_BLM.reshape(2, 8, M)).dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in aux.losses.values())
  logits, _ = nnx.jit(lambda model, x: model(x))(model, batch["inputs"])
  assert logits.dtype == jnp.float32
  tx = optax.adamw(1e-3)
  graphdef, state = _train_state(model, tx)
  step = step_lib.make_train_step(graphdef, train.LMTask(), tx,
                                  lambda s: 1e-3, WEIGHTS, donate=False)
  new_state, metrics = step(state, batch)
  assert metrics["loss"].dtype == jnp.float32
  assert metrics["ce_loss"].dtype == jnp.float32
  for leaf in jax.tree.leaves(new_state.params):
    assert leaf.dtype == jnp.float32
  assert np.isfinite(float(metrics["loss"]))


def test_mfu_arithmetic_and_peaks():
  peak = throughput.Peak(100.0, "config")
  # 3 x 1e9 FLOPs/token x 1e4 tokens in 0.5 s = 60 TFLOP/s; 2 devices: 30%.
  tflops, mfu = throughput.step_rates(1e9, 10_000, 0.5, peak, 2)
  np.testing.assert_allclose([tflops, mfu], [60.0, 0.3])
  assert throughput.step_rates(1e9, 10, 0.0, peak, 1) == (0.0, 0.0)
  assert throughput.peak_tflops(12.5) == throughput.Peak(12.5, "config")
  cpu = throughput.peak_tflops()
  assert cpu.measured and cpu.tflops_per_device > 0


MOE = train.config.moe_config(router={"name": "token_choice", "k": 2},
                               experts={"num_experts": 4})


def _config(**changes):
  c = train.base_config()
  c.data = ml_collections.ConfigDict(dict(
      dataset="stdlib_bytes", seq_len=8, train_split="train",
      eval_split="validation"))
  c.model = ml_collections.ConfigDict(dict(
      name="decoder_lm", vocab_size=257, model_dim=8, num_layers=2,
      num_heads=2, mlp_dim=16, moe_every=0, scan_layers=False,
      remat="none"))
  c.batch_size = 8
  for key, value in changes.items():
    node = c
    *parents, last = key.split(".")
    for part in parents:
      node = node[part]
    node[last] = value
  return c


def _lines(config):
  try:
    validation.validate_config(config, num_devices=1)
  except train.ConfigError as e:
    return str(e).splitlines()
  return []


def test_scale_fields_are_validated_one_line_each():
  assert _lines(_config(micro_batches=2, profile_steps="2,3",
                        **{"model.scan_layers": True,
                           "model.remat": "save_moe_outputs"})) == []
  for change, start in (
      ({"micro_batches": 3}, "config.micro_batches=3: the batch is split"),
      ({"micro_batches": 0}, "config.micro_batches=0: allowed"),
      ({"profile_steps": "x"}, "config.profile_steps='x'"),
      ({"peak_tflops": -1.0}, "config.peak_tflops=-1.0"),
      ({"model.remat": "some"}, "config.model.remat='some': allowed"),
      ({"model.remat": "offload"}, "config.model.remat='offload': "
       "offloading saved activations to pinned host memory needs a GPU or "
       "TPU backend, and this one is cpu"),
      ({"model.num_layers": 3, "model.moe_every": 2, "moe": MOE,
        "model.scan_layers": True}, "config.model.scan_layers=True: "
       "scan_layers=True scans over periods of moe_every=2 blocks, so "
       "num_layers=3 must be a multiple of 2")):
    lines = _lines(_config(**change))
    assert len(lines) == 1 and lines[0].startswith(start), (change, lines)


def test_remat_may_change_on_resume_and_old_runs_resume():
  saved = _config().to_dict()
  del saved["model"]["scan_layers"]  # a run saved before the field existed
  validation.check_resume_config(saved, _config(**{"model.remat": "full"}),
                                 "ckpt")
  with pytest.raises(train.ResumeConfigError, match="model.scan_layers"):
    validation.check_resume_config(
        saved, _config(**{"model.scan_layers": True}), "ckpt")
