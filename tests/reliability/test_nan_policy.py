"""The skip policy at the level of one jitted step, in process: a step whose
loss is NaN leaves parameters, optimizer and model state bit for bit as
they were, advances the step counter and reports skipped = 1."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.train import optim
from moejax.train import state as state_lib
from moejax.train import step as step_lib


class Bigram(nnx.Module):
  """logits = embed[token]: the smallest model the LM task can train (a
  real model only adds compile time here)."""

  def __init__(self, rngs):
    self.embed_VV = nnx.Param(jax.random.normal(rngs.params(), (16, 16)))

  def __call__(self, tokens_BL, deterministic=False):
    del deterministic
    return self.embed_VV[tokens_BL], None


def test_a_nan_step_is_skipped_exactly():
  def factory():
    return Bigram(nnx.Rngs(0))
  schedule = optim.make_schedule(learning_rate=1e-2, total_steps=10,
                                 warmup_steps=0)
  tx = optim.make_optimizer(schedule)
  mesh = state_lib.make_train_mesh({"data": 1},
                                   devices=jax.devices()[:1])
  graphdef, state, _ = state_lib.create_train_state(factory, tx, mesh)
  train_step = step_lib.make_train_step(
      graphdef, step_lib.LMTask(), tx, schedule, {}, donate=False,
      skip_nonfinite=True, inject_nan_steps=(2,))
  tokens = jnp.arange(2 * 9).reshape(2, 9) % 16
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  state1, m1 = train_step(state, batch)    # step 1: a normal update
  assert float(m1["skipped"]) == 0.0 and np.isfinite(float(m1["loss"]))
  assert not state_lib.tree_equal(state1.params, state.params)
  state2, m2 = train_step(state1, batch)   # step 2: NaN injected
  assert float(m2["skipped"]) == 1.0
  assert np.isnan(float(m2["loss"])) and np.isnan(float(m2["grad_norm"]))
  assert int(state2.step) == 2
  for part in ("params", "opt_state", "model_state"):
    assert state_lib.tree_equal(getattr(state2, part),
                                getattr(state1, part)), part
  state3, m3 = train_step(state2, batch)   # step 3: training goes on
  assert float(m3["skipped"]) == 0.0 and int(state3.step) == 3
  assert not state_lib.tree_equal(state3.params, state2.params)


def test_a_skipped_step_applies_no_router_update():
  # DeepSeek's bias moves after every step from the forward's expert load
  # (moejax.layers.update_routers); a skipped step must not move it.
  from moejax import models  # pylint: disable=g-import-not-at-top
  moe = {"router": {"name": "deepseek", "k": 2, "bias_update_rate": 0.1},
         "experts": {"num_experts": 4}, "capacity_factor": 2.0}

  def factory():
    return models.DecoderLM(16, 8, 1, 2, 16, moe_every=1, moe=moe,
                            rngs=nnx.Rngs(0))
  schedule = optim.make_schedule(learning_rate=1e-2, total_steps=10,
                                 warmup_steps=0)
  tx = optim.make_optimizer(schedule)
  mesh = state_lib.make_train_mesh({"data": 1},
                                   devices=jax.devices()[:1])
  graphdef, state, _ = state_lib.create_train_state(factory, tx, mesh)
  train_step = step_lib.make_train_step(
      graphdef, step_lib.LMTask(), tx, schedule, {"load_balance": 0.0},
      donate=False, skip_nonfinite=True, inject_nan_steps=(2,))
  tokens = jnp.arange(4 * 9).reshape(4, 9) % 16
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  bias = lambda s: np.asarray(
      s.model_state["blocks"][0]["ffn"]["router"]["bias_E"])

  state1, m1 = train_step(state, batch)
  assert float(m1["skipped"]) == 0.0
  assert np.any(bias(state1) != bias(state))   # a normal step moves it
  state2, m2 = train_step(state1, batch)       # NaN: skipped
  assert float(m2["skipped"]) == 1.0
  np.testing.assert_array_equal(bias(state2), bias(state1))
  assert state_lib.tree_equal(state2.model_state, state1.model_state)
