"""MoELayer with expert_parallel=ExpertParallel(...): same outputs, aux and
gradients as the layer without it (8 CPU devices, float32)."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import layers
from moejax.sharding import ExpertParallel
from moejax.sharding import enable_expert_parallel
from moejax.sharding import make_mesh

M, H, E = 8, 16, 8
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}
RTOL = ATOL = 2e-5


def _layer(router=None, engine="indices", *, num_experts=E,
           activation="relu", expert_parallel=None, **kwargs):
  """An (M, H, E) layer from build_moe: `router` a dict (default top-2 token
  choice), `engine` a registry name (dropless with tile 8); kwargs are
  top-level config fields (group size 8, capacity factor 1 by default)."""
  config = {"router": router or {"name": "token_choice", "k": 2},
            "engine": ({"name": "dropless", "tile": 8} if engine == "dropless"
                       else {"name": engine}),
            "experts": {"num_experts": num_experts, "hidden_dim": H,
                        "activation": activation},
            "group_size": 8, "capacity_factor": 1.0}
  config.update(kwargs)
  return layers.build_moe(config, model_dim=M, rngs=nnx.Rngs(0),
                          expert_parallel=expert_parallel)


def _run(layer, x, mask):
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(model):
    y, aux = model(x, padding_mask_BL=mask)
    total = (jnp.sum(y * jnp.cos(y)) + sum(aux.losses.values()))
    return total, (y, aux)

  # The module is merged outside the gradient trace, so a router that draws
  # random numbers (noisy top-k) may advance its PRNG counter inside it.
  def value_and_grads(params, rest):
    model = nnx.merge(graphdef, params, rest)
    return nnx.value_and_grad(loss, has_aux=True)(model)

  f = jax.jit(value_and_grads)
  return jax.tree.map(np.asarray, f.lower(params, rest).compile(
      FAST_COMPILE)(params, rest))


def _inputs(with_mask):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 16, M)), jnp.float32)  # G = 8 groups
  mask = None
  if with_mask:
    mask = jnp.asarray(rng.random((4, 16)) > 0.2)
  return x, mask


@pytest.mark.parametrize("axes, layer_kwargs, mode, with_mask", [
    ({"data": 2, "expert": 4}, dict(engine="indices"), "shard_map", False),
    ({"data": 4, "expert": 2}, dict(engine="einsum",
                                    router={"name": "expert_choice"}),
     "gspmd", True),
    ({"data": 2, "expert": 2, "tensor": 2},
     dict(engine="dropless", activation="swiglu"), "shard_map", True),
    # A group-local router with extra losses and stats (DeepSeek: the
    # sequence balance loss, averaged, and load_E, summed over devices).
    ({"data": 2, "expert": 4}, dict(engine="einsum", router={
        "name": "deepseek", "k": 2, "num_expert_groups": 2,
        "topk_groups": 1}), "shard_map", True),
    # A router that is not group-local (whole-batch losses, a PRNG stream)
    # runs under GSPMD on the split groups.
    ({"data": 4, "expert": 2}, dict(engine="indices",
                                    router={"name": "noisy_top_k", "k": 2}),
     "shard_map", False),
])
def test_layer_matches_unsharded(axes, layer_kwargs, mode, with_mask):
  # One (M, H, E) for every case: the initialisers compile once.
  x, mask = _inputs(with_mask)
  reference = _layer(**layer_kwargs)
  sharded = nnx.clone(reference)
  sharded.set_expert_parallel(ExpertParallel(make_mesh(axes), mode))
  ref = _run(reference, x, mask)
  got = _run(sharded, x, mask)
  assert jax.tree.structure(ref) == jax.tree.structure(got)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)


def test_no_expert_parallel_is_the_plain_layer():
  layer = _layer()
  assert layer.expert_parallel is None
  mesh = make_mesh({"data": 2, "expert": 4})
  layer.set_expert_parallel(ExpertParallel(mesh))
  assert layer.expert_parallel.mesh is mesh
  layer.set_expert_parallel(None)
  assert layer.expert_parallel is None


def test_constructor_options_and_errors():
  mesh = make_mesh({"data": 2, "expert": 4})
  layer = _layer(engine="einsum",
                 expert_parallel=ExpertParallel(mesh, "gspmd"))
  assert layer.expert_parallel.mode == "gspmd"
  assert layer.expert_parallel.mesh is mesh
  # A mesh without a mode (or the reverse) was one error; now the mesh and
  # mode live together in ExpertParallel, and enable_expert_parallel checks.
  with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
    ExpertParallel(None, "shard_map")
  with pytest.raises(ValueError, match="mesh and mode go together"):
    enable_expert_parallel(layer, mesh, None)
  with pytest.raises(ValueError, match="mesh and mode go together"):
    enable_expert_parallel(layer, None, "shard_map")
  with pytest.raises(ValueError, match="no GSPMD expert-parallel path"):
    _layer(engine="dropless", expert_parallel=ExpertParallel(mesh, "gspmd"))
  with pytest.raises(ValueError, match="num_experts=6 does not fit"):
    _layer(num_experts=6, expert_parallel=ExpertParallel(mesh))
  with pytest.raises(ValueError, match="unknown dropless collective"):
    ExpertParallel(mesh, "shard_map", collective="nccl")
  # The same checks when turned on later.
  layer = _layer(engine="dropless")
  with pytest.raises(ValueError, match="no GSPMD expert-parallel path"):
    layer.set_expert_parallel(ExpertParallel(mesh, "gspmd"))
  assert layer.expert_parallel is None


def test_expert_parallel_must_be_an_expert_parallel():
  with pytest.raises(ValueError, match="expert_parallel must be"):
    _layer().set_expert_parallel("shard_map")


def test_group_count_error_at_call():
  mesh = make_mesh({"data": 2, "expert": 4})
  layer = _layer(expert_parallel=ExpertParallel(mesh, "shard_map"))
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
  assert model.a.expert_parallel.mesh is mesh
  assert model.b.expert_parallel == ExpertParallel(mesh, "shard_map")
  assert enable_expert_parallel(model, None, None) == 2
  assert model.a.expert_parallel is None and model.b.expert_parallel is None
