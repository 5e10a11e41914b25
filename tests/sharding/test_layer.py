"""MoELayer with mesh= / expert_parallel=: same outputs, aux and gradients
as the layer without them (8 CPU devices, float32)."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import MoELayer
from moejax.sharding import enable_expert_parallel
from moejax.sharding import make_mesh

M, H, E = 8, 16, 8
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}
RTOL = ATOL = 2e-5


def _layer(**kwargs):
  defaults = dict(k=2, group_size=8, dropless_tile=8, capacity_factor=1.0,
                  rngs=nnx.Rngs(0))
  defaults.update(kwargs)
  return MoELayer(M, H, defaults.pop("num_experts", E), **defaults)


def _run(layer, x, mask):
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params):
    y, aux = nnx.merge(graphdef, params, rest)(x, padding_mask_BL=mask)
    total = (jnp.sum(y * jnp.cos(y)) + aux.losses.load_balance
             + aux.losses.z_loss)
    return total, (y, aux)

  f = jax.jit(jax.value_and_grad(loss, has_aux=True))
  return jax.tree.map(np.asarray,
                      f.lower(params).compile(FAST_COMPILE)(params))


def _inputs(with_mask):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 16, M)), jnp.float32)  # G = 8 groups
  mask = None
  if with_mask:
    mask = jnp.asarray(rng.random((4, 16)) > 0.2)
  return x, mask


@pytest.mark.parametrize("axes, layer_kwargs, mode, with_mask", [
    ({"data": 2, "expert": 4}, dict(engine="indices"), "shard_map", False),
    ({"data": 4, "expert": 2}, dict(engine="einsum", router="expert_choice"),
     "gspmd", True),
    ({"data": 2, "expert": 2, "tensor": 2},
     dict(engine="dropless", activation="swiglu"), "shard_map", True),
])
def test_layer_matches_unsharded(axes, layer_kwargs, mode, with_mask):
  # One (M, H, E) for every case: the initialisers compile once.
  x, mask = _inputs(with_mask)
  reference = _layer(**layer_kwargs)
  sharded = nnx.clone(reference)
  sharded.set_expert_parallel(make_mesh(axes), mode)
  ref = _run(reference, x, mask)
  got = _run(sharded, x, mask)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)


def test_no_mesh_is_the_plain_layer():
  layer = _layer()
  assert layer.mesh is None and layer.expert_parallel is None
  assert layer._expert_layout() is None


def test_constructor_options_and_errors():
  mesh = make_mesh({"data": 2, "expert": 4})
  layer = _layer(mesh=mesh, expert_parallel="gspmd", engine="einsum")
  assert layer.expert_parallel == "gspmd" and layer.mesh is mesh
  with pytest.raises(ValueError, match="mesh and expert_parallel go together"):
    _layer(mesh=mesh)
  with pytest.raises(ValueError, match="mesh and expert_parallel go together"):
    _layer(expert_parallel="shard_map")
  with pytest.raises(ValueError, match="no GSPMD expert-parallel path"):
    _layer(mesh=mesh, expert_parallel="gspmd", engine="dropless")
  with pytest.raises(ValueError, match="num_experts=6 does not fit"):
    _layer(mesh=mesh, expert_parallel="shard_map", num_experts=6)
  with pytest.raises(ValueError, match="unknown dropless collective"):
    _layer(mesh=mesh, expert_parallel="shard_map", engine="dropless",
           dropless_collective="nccl")


def test_group_count_error_at_call():
  mesh = make_mesh({"data": 2, "expert": 4})
  layer = _layer(mesh=mesh, expert_parallel="shard_map")
  x = jnp.zeros((3, 16, M))   # 6 groups over 8 token shards
  with pytest.raises(ValueError, match="do not split evenly"):
    jax.eval_shape(lambda x: layer(x), x)


class _TwoLayers(nnx.Module):

  def __init__(self):
    self.a = _layer()
    self.b = _layer(engine="dropless")


def test_enable_expert_parallel_walks_the_model():
  model = _TwoLayers()
  mesh = make_mesh({"data": 2, "expert": 4})
  assert enable_expert_parallel(model, mesh, "shard_map") == 2
  assert model.a.mesh is mesh and model.b.expert_parallel == "shard_map"
  assert enable_expert_parallel(model, None, None) == 2
  assert model.a.mesh is None

