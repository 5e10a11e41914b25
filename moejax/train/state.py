"""TrainState: model parameters, other model state, optimizer state, step.

The model is split once into a static nnx.GraphDef and plain pytrees:

    params       nnx.state(model, nnx.Param).to_pure_dict()
    model_state  every other nnx Variable (RNG streams of noisy/jittered
                 routers, DeepSeek router biases (router.bias_E), ...) as a
                 pure dict
    opt_state    tx.init(params)
    step         <int32>[] number of updates applied

so the train step is a pure function of arrays (jax.jit, donated) and the
checkpoint is an ordinary pytree. `nnx.merge(graphdef, params, model_state)`
gives the module back.
"""

from typing import Any, Callable

import flax.struct
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any


def make_train_mesh(axis_sizes, devices=None):
  """The training mesh: moejax.sharding.make_mesh over {axis: size} (one -1
  wildcard; axes of size 1 are kept so rules can name them). The one place
  the loop builds a mesh: swap it here."""
  return sharding_lib.make_mesh(dict(axis_sizes), devices=devices)


def batch_axes(mesh, rules=None):
  """Mesh axes the batch dimension is split over (the 'batch' rule)."""
  from moejax.sharding import rules as rules_lib  # pylint: disable=g-import-not-at-top
  return rules_lib.mesh_axes_for("batch", rules, mesh)


def create_train_state(model_factory: Callable[[], nnx.Module], tx, mesh,
                       *, rules=None, expert_parallel=None,
                       collective="auto"):
  """Builds the model sharded on `mesh` and its TrainState.

  Args:
    model_factory: () -> nnx.Module, deterministic (seeded nnx.Rngs inside).
    tx: optax.GradientTransformation.
    mesh: jax.sharding.Mesh (make_train_mesh).
    rules: logical axis rules (moejax.sharding.make_rules); None = defaults.
    expert_parallel: None, 'shard_map' or 'gspmd': gives every MoELayer an
      ExpertParallel(mesh, mode) (moejax.sharding.enable_expert_parallel; a
      static model attribute).
    collective: how dropless engines move rows under expert parallelism
      ('auto', 'ragged' or 'padded'; ExpertParallel's `collective`).
  Returns:
    (graphdef, TrainState, model): parameters created directly in their
    shards (moejax.sharding.init_sharded); the optimizer state follows the
    parameters' shardings. `model` is the built module (for describe()).
  """
  model = sharding_lib.init_sharded(model_factory, mesh, rules)
  if expert_parallel:
    sharding_lib.enable_expert_parallel(model, mesh, expert_parallel,
                                        collective=collective)
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  params = params.to_pure_dict()
  model_state = model_state.to_pure_dict()
  opt_state = jax.jit(tx.init)(params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     model_state=model_state, opt_state=opt_state)
  # Whatever is not laid out on the mesh yet (the step, optimizer counters,
  # RNG counts) is replicated over it.
  replicated = NamedSharding(mesh, P())
  state = jax.tree.map(
      lambda x: x if _is_on_mesh(x, mesh) else jax.device_put(x, replicated),
      state)
  return graphdef, state, model


def _is_on_mesh(x, mesh):
  sharding = getattr(x, "sharding", None)
  return isinstance(sharding, NamedSharding) and sharding.mesh == mesh


def state_shardings(state):
  """The sharding of every array of a (concrete) TrainState."""
  return jax.tree.map(lambda x: x.sharding, state)


# ------------------------------------------------------------- checkpoints


def _is_key(x):
  return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_checkpoint_tree(state: TrainState):
  """The TrainState as a dict of plain arrays for orbax (typed PRNG keys are
  stored as their uint32 key data)."""
  tree = dict(step=state.step, params=state.params,
              model_state=state.model_state, opt_state=state.opt_state)
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x,
                      tree)


def abstract_checkpoint_tree(state: TrainState):
  """jax.ShapeDtypeStructs (with shardings) of to_checkpoint_tree(state): the
  restore target, so arrays come back directly in their shards."""
  def abstract(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(abstract, to_checkpoint_tree(state))


def from_checkpoint_tree(tree, template: TrainState) -> TrainState:
  """Inverse of to_checkpoint_tree, with key types taken from `template`."""
  template_tree = dict(step=template.step, params=template.params,
                       model_state=template.model_state,
                       opt_state=template.opt_state)

  def restore(t, x):
    if _is_key(t):
      return jax.random.wrap_key_data(x, impl=jax.random.key_impl(t))
    return x
  out = jax.tree.map(restore, template_tree, tree)
  return TrainState(**out)


def tree_equal(a, b) -> bool:
  """True when two pytrees have the same structure and bitwise-equal arrays."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  if ta != tb:
    return False
  for x, y in zip(la, lb):
    if _is_key(x):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    if not np.array_equal(np.asarray(x), np.asarray(y)):
      return False
  return True
