"""Logical axis rules and sharded initialisation (8 CPU devices)."""

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from moejax.layers import Experts
from moejax.sharding import DEFAULT_RULES
from moejax.sharding import init_sharded
from moejax.sharding import logical_to_spec
from moejax.sharding import make_mesh
from moejax.sharding import make_rules
from moejax.sharding import shard_module
from moejax.sharding import state_specs

EMH = ("expert", "embed", "mlp")


def test_default_rules_full_mesh():
  mesh = make_mesh({"data": 1, "fsdp": 2, "expert": 2, "tensor": 2})
  assert logical_to_spec(EMH, mesh=mesh) == P("expert", "fsdp", "tensor")
  assert logical_to_spec(("batch", "length", None), mesh=mesh) == P(
      ("data", "fsdp", "expert"), None, None)


def test_missing_mesh_axes_dropped():
  mesh = make_mesh({"data": 2, "expert": 4})
  assert logical_to_spec(EMH, mesh=mesh) == P("expert", None, None)
  assert logical_to_spec(("batch",), mesh=mesh) == P(("data", "expert"))


def test_no_mesh_keeps_all_axes():
  assert logical_to_spec(EMH) == P("expert", "fsdp", "tensor")


def test_indivisible_dimension_uses_dividing_prefix():
  mesh = make_mesh({"data": 2, "expert": 4})
  # E=2 experts cannot split 4 ways: replicated along 'expert'.
  assert logical_to_spec(EMH, mesh=mesh, shape=(2, 8, 16)) == P(None, None,
                                                                 None)
  # batch 2 over (data=2, expert=4): only the 'data' prefix divides it.
  assert logical_to_spec(("batch",), mesh=mesh, shape=(2,)) == P("data")


def test_mesh_axis_used_once_per_array():
  rules = make_rules({"mlp": "expert"})
  mesh = make_mesh({"data": 2, "expert": 4})
  assert logical_to_spec(EMH, rules, mesh) == P("expert", None, None)


def test_override_and_validation():
  rules = make_rules({"embed": None, "batch": ["data"]})
  table = dict(rules)
  assert table["embed"] == () and table["batch"] == ("data",)
  assert table["mlp"] == ("tensor",)
  assert len(rules) == len(DEFAULT_RULES)
  with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
    make_rules({"hidden": "tensor"})
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    make_rules({"mlp": "model"})
  with pytest.raises(ValueError, match="repeats a mesh axis"):
    make_rules({"batch": ("data", "data")})
  with pytest.raises(ValueError, match="has no rule"):
    logical_to_spec(("nope",))
  with pytest.raises(ValueError, match="do not match shape"):
    logical_to_spec(EMH, shape=(2, 3))


def _ramp(key, shape, dtype):
  """A cheap deterministic initializer (random init compiles slowly on CPU)."""
  del key
  return jnp.arange(np.prod(shape), dtype=dtype).reshape(shape) * 1e-3


def _experts(e, h=16, init=None):
  return Experts(e, 8, h, activation="swiglu",
                 kernel_init=init or nnx.initializers.uniform(0.1),
                 rngs=nnx.Rngs(0))


@pytest.mark.parametrize("axes, e, shard_shape, check_values", [
    ({"data": 2, "expert": 4}, 8, (2, 8, 16), True),    # E/X = 2 per device
    ({"data": 1, "expert": 8}, 4, (4, 8, 16), False),   # E < X: replicated
    # experts over 'expert', M over 'fsdp', H over 'tensor':
    ({"fsdp": 2, "expert": 2, "tensor": 2}, 4, (2, 4, 8), False),
])
def test_init_sharded_placement(axes, e, shard_shape, check_values):
  mesh = make_mesh(axes)
  init = None if check_values else _ramp
  experts = init_sharded(lambda: _experts(e, init=init), mesh)
  for name in ("w_in_EMH", "w_gate_EMH"):
    w = getattr(experts, name).get_value()
    assert w.sharding.mesh == mesh
    assert {s.data.shape for s in w.addressable_shards} == {shard_shape}
  w_out = experts.w_out_EHM.get_value()
  assert {s.data.shape for s in w_out.addressable_shards} == {
      (shard_shape[0], shard_shape[2], shard_shape[1])}
  if check_values:  # the same numbers as an unsharded init
    reference = _experts(e)
    for name in ("w_in_EMH", "w_gate_EMH", "w_out_EHM"):
      np.testing.assert_allclose(
          np.asarray(getattr(experts, name).get_value()),
          np.asarray(getattr(reference, name)[...]), rtol=1e-6, atol=1e-7)
    # No parameter of the result is a full copy on every device.
    for leaf in jax.tree.leaves(nnx.state(experts)):
      assert not leaf.sharding.is_fully_replicated


def test_state_specs_from_abstract_module():
  mesh = make_mesh({"data": 2, "expert": 4})
  abstract = nnx.eval_shape(lambda: _experts(8))
  specs = state_specs(nnx.state(abstract), mesh=mesh)
  assert specs["w_in_EMH"].get_value() == P("expert", None, None)
  assert specs["w_out_EHM"].get_value() == P("expert", None, None)


def test_shard_module_moves_existing_state():
  mesh = make_mesh({"data": 2, "expert": 4})
  experts = shard_module(_experts(8), mesh)
  w = experts.w_in_EMH.get_value()
  assert w.addressable_shards[0].data.shape == (2, 8, 16)
  y = experts(jnp.ones((8, 3, 8)))
  assert y.shape == (8, 3, 8)
