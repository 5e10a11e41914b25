"""moejax layers inside Linen models through flax's nnx.bridge (docs/design.md,
"Using moejax from Linen"): the router rng stream, and DeepSeek's explicit
bias update."""

from flax import linen
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from moejax import layers
from moejax import routing

B, L, M, H, E = 2, 8, 8, 16, 4


def _x(seed=0):
  return jax.random.normal(jax.random.key(seed), (B, L, M))


def _config(router):
  return {"router": router, "experts": {"num_experts": E, "hidden_dim": H},
          "group_size": L}


class _Net(linen.Module):
  """A Linen model with one MoE layer, and the bias update as a method."""
  config: dict

  def setup(self):
    self.moe = nnx.bridge.to_linen(layers.build_moe, self.config,
                                   model_dim=M)

  def __call__(self, x):
    y, aux = self.moe(x)
    return y, aux

  def update_routers(self, aux):
    # nnx_method calls update_routers(<the NNX MoELayer>, aux).
    self.moe(aux, nnx_method=layers.update_routers)


def test_jitter_initialises_from_a_single_linen_key():
  """Linen's init(key) passes only the 'params' stream: the router draws
  its own stream from it (before: "No RngStream named 'router'")."""
  net = _Net(_config({"name": "token_choice", "k": 2, "jitter_eps": 0.5}))
  x = _x()
  variables = net.init(jax.random.key(0), x)
  # At apply, the 'router' stream is the caller's: a fresh key per step
  # gives fresh jitter; without one the bridge's default stream is used.
  y5, _ = net.apply(variables, x, rngs={"router": jax.random.key(5)})
  y5_again, _ = net.apply(variables, x, rngs={"router": jax.random.key(5)})
  y6, _ = net.apply(variables, x, rngs={"router": jax.random.key(6)})
  np.testing.assert_array_equal(y5, y5_again)
  assert not np.allclose(y5, y6)
  y_default, aux = net.apply(variables, x)
  assert y_default.shape == (B, L, M)
  assert aux.losses["load_balance"].shape == ()


def test_nnx_rngs_with_only_params_runs_the_random_policies():
  """The same fallback in NNX: an Rngs with neither 'router' nor
  'default' (GShard's random second expert draws from it)."""
  for router in ({"name": "token_choice", "k": 2, "jitter_eps": 0.1},
                 {"name": "token_choice", "k": 2,
                  "second_expert_policy": "random"},
                 {"name": "noisy_top_k", "k": 2}):
    layer = layers.build_moe(_config(router), model_dim=M,
                             rngs=nnx.Rngs(params=0))
    y, _ = layer(_x())
    assert y.shape == (B, L, M) and bool(jnp.isfinite(y).all()), router


def test_deepseek_bias_moves_only_on_the_explicit_update():
  rate = 0.1
  net = _Net(_config({"name": "deepseek", "k": 2,
                      "bias_update_rate": rate}))
  x = _x(1)
  variables = net.init(jax.random.key(0), x)
  bias0_E = variables["RouterBias"]["moe"]["router"]["bias_E"]
  np.testing.assert_array_equal(bias0_E, np.zeros(E))

  # A forward call leaves the bias alone, even with the collection mutable.
  (y, aux), changed = net.apply(variables, x, mutable=["RouterBias"])
  np.testing.assert_array_equal(
      changed["RouterBias"]["moe"]["router"]["bias_E"], bias0_E)
  load_E = aux.stats["load_E"]
  assert float(load_E.sum()) == B * L * 2  # every token's k=2 choices
  assert float(load_E.max()) > float(load_E.min())  # unbalanced to start

  # The explicit update: bias += rate * sign(mean load - load).
  _, updated = net.apply(variables, aux, method=_Net.update_routers,
                         mutable=["RouterBias"])
  bias1_E = updated["RouterBias"]["moe"]["router"]["bias_E"]
  np.testing.assert_allclose(
      bias1_E, routing.update_bias(bias0_E, load_E, rate=rate), rtol=1e-6)
  np.testing.assert_allclose(bias1_E, rate * np.sign(load_E.mean() - load_E),
                             rtol=1e-6)
  # The next forward routes with the new bias.
  new_variables = {**variables, **updated}
  y2, _ = net.apply(new_variables, x)
  assert y2.shape == y.shape
