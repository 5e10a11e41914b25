"""Multi-host smoke check: an expert-parallel MoE trained a few steps.

Run the same command on every process of a run (with the environment of
moejax.sharding.multihost set); process 0 writes the results:

  MOEJAX_COORDINATOR_ADDRESS=host0:12345 MOEJAX_NUM_PROCESSES=2 \\
  MOEJAX_PROCESS_ID=0 python -m experiments.multihost_check --out r.npz

It builds one global mesh (default data=2,expert=-1; --mesh to change it,
e.g. --mesh data=1 on one device) over every process's devices, initialises
an MoELayer (moejax.layers.build_moe, with
expert_parallel=ExpertParallel(mesh, mode)) directly into sharded
parameters, and runs forward, backward and a few Adam steps. The results
(outputs, losses, gradients, final parameters, gathered to full arrays) must
equal a single-process run on the same number of devices; tests/sharding/
test_multihost.py launches 2 local processes x 4 CPU devices and checks that.
"""

import argparse
import sys

import numpy as np

# Problem size: tiny, so the check is about plumbing, not speed. The batch
# grows with the device count so every device has a group of tokens.
MODEL_DIM, HIDDEN_DIM, NUM_EXPERTS = 8, 16, 8
LENGTH = GROUP_SIZE = 8


def parse_mesh(text):
  """'data=2,expert=-1' -> [('data', 2), ('expert', -1)]."""
  axes = []
  for item in text.split(","):
    name, _, size = item.partition("=")
    axes.append((name.strip(), int(size)))
  return axes


def moe_config(engine="indices"):
  """The check layer's build_moe config: top-2 token choice over
  NUM_EXPERTS experts, `engine` a registry name (dropless: tile 8)."""
  from moejax.layers import ENGINES  # after jax is configured (main)
  return {"router": {"name": "token_choice", "k": 2},
          # Dropless engines (no capacity) get a tile that fits the test.
          "engine": ({"name": engine} if ENGINES[engine].uses_capacity
                     else {"name": engine, "tile": 8}),
          "experts": {"num_experts": NUM_EXPERTS, "hidden_dim": HIDDEN_DIM},
          "group_size": GROUP_SIZE, "capacity_factor": 1.5}


def run(mesh, *, engine="indices", expert_parallel="shard_map", steps=3,
        learning_rate=1e-2):
  """Trains the check model on `mesh`; returns {name: full numpy array}.

  Args:
    mesh: the global jax.sharding.Mesh (Auto axes).
    engine: an engine registry name (moejax.layers.ENGINES).
    expert_parallel: the ExpertParallel mode, 'shard_map' or 'gspmd'.
    steps, learning_rate: Adam steps.
  Every process must call it with the same arguments (it is SPMD).
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from moejax.layers import build_moe
  from moejax.sharding import expert_parallel as ep_lib
  from moejax.sharding import rules as rules_lib

  ep = ep_lib.ExpertParallel(mesh, expert_parallel)

  def factory():
    return build_moe(moe_config(engine), model_dim=MODEL_DIM,
                     rngs=nnx.Rngs(0), expert_parallel=ep)

  model = rules_lib.init_sharded(factory, mesh)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  batch = max(8, mesh.devices.size)
  rng = np.random.default_rng(0)
  x_np = rng.normal(size=(batch, LENGTH, MODEL_DIM)).astype(np.float32)
  t_np = rng.normal(size=(batch, LENGTH, MODEL_DIM)).astype(np.float32)
  layout = ep.layout(NUM_EXPERTS)
  batch_sharding = NamedSharding(mesh, P(tuple(
      a for a in layout.token_axes if a in mesh.axis_names) or None))

  shard_shape = model.experts.w_in_EMH.get_value()

  def global_array(a):  # each process supplies its own shards
    return jax.make_array_from_callback(a.shape, batch_sharding,
                                        lambda idx: a[idx])

  x, target = global_array(x_np), global_array(t_np)
  opt = optax.adam(learning_rate)

  def loss_fn(params, x, target):
    y, aux = nnx.merge(graphdef, params, rest)(x)
    loss = (jnp.mean(jnp.square(y - target))
            + 1e-2 * aux.losses["load_balance"])
    return loss, y

  opt_state = jax.jit(opt.init)(params)
  # Keep parameters and optimizer state where they started, so the step
  # compiles once (its outputs would otherwise get shardings of XLA's choice).
  replicated = NamedSharding(mesh, P())
  keep = jax.tree.map(lambda a: a.sharding if isinstance(
      a.sharding, NamedSharding) else replicated, (params, opt_state))

  @jax.jit
  def step(params, opt_state, x, target):
    (loss, y), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, x, target)
    updates, opt_state = opt.update(grads, opt_state, params)
    params, opt_state = jax.tree.map(
        jax.lax.with_sharding_constraint,
        (optax.apply_updates(params, updates), opt_state), keep)
    return params, opt_state, loss, y, grads

  losses = []
  first = None
  for i in range(steps):
    params, opt_state, loss, y, grads = step(params, opt_state, x, target)
    losses.append(loss)
    if i == 0:
      first = (y, grads)
  # One replicating jit brings everything to every process as full arrays.
  y0, grads, params, losses = jax.jit(
      lambda t: t, out_shardings=replicated)((*first, params, losses))
  out = {"y0": np.asarray(y0), "losses": np.asarray(jnp.stack(losses))}
  for prefix, tree in (("grad/", grads), ("param/", params)):
    for path, v in nnx.to_flat_state(tree):
      out[prefix + "/".join(map(str, path))] = np.asarray(v.get_value())
  # The expert weights stayed sharded over 'expert': [E / X, M, H] per device.
  out["w_in_shard_shape"] = np.asarray(
      shard_shape.addressable_shards[0].data.shape)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="results .npz (process 0)")
  parser.add_argument("--cpu-devices", type=int, default=None,
                      help="CPU devices per process (emulated hosts)")
  parser.add_argument("--engine", default="indices",
                      help="engine registry name: einsum, indices, dropless")
  parser.add_argument("--expert-parallel", default="shard_map",
                      help="ExpertParallel mode: shard_map or gspmd")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--mesh", default="data=2,expert=-1",
                      help="mesh axes, e.g. data=-1,expert=8")
  args = parser.parse_args(argv)

  from moejax import sharding
  info = sharding.initialize(num_cpu_devices=args.cpu_devices)
  import jax
  mesh = sharding.make_mesh(parse_mesh(args.mesh))
  results = run(mesh, engine=args.engine,
                expert_parallel=args.expert_parallel, steps=args.steps)
  if info.process_id == 0:
    results["num_processes"] = np.asarray(jax.process_count())
    results["num_devices"] = np.asarray(jax.device_count())
    np.savez(args.out, **results)
    print(f"moejax multihost_check: {jax.process_count()} processes, "
          f"{jax.device_count()} devices, mesh {dict(mesh.shape)}, losses "
          f"{results['losses'].tolist()} -> {args.out}")
  sharding.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
