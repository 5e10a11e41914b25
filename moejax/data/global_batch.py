"""Placing host batches on a mesh as global, batch-sharded jax.Arrays."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def batch_sharding(
    mesh: jax.sharding.Mesh,
    batch_axes: str | tuple[str, ...] = "data",
) -> jax.sharding.NamedSharding:
  """`NamedSharding(mesh, P(batch_axes))`: dim 0 split over `batch_axes`, rest replicated.

  Raises:
    ValueError: a batch axis that is not a mesh axis.
  """
  axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  unknown = [a for a in axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(
        f"batch_axes={batch_axes!r}: {unknown} not in the mesh axes "
        f"{mesh.axis_names}.")
  spec = axes[0] if len(axes) == 1 else axes
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(spec))


def make_global_batch(batch: Any, sharding: jax.sharding.NamedSharding) -> Any:
  """Turns this process's batch into global arrays sharded by `sharding`.

  Every leaf `<T>[B_local, ...]` becomes a `jax.Array` `<T>[B_local *
  process_count, ...]` (via `jax.make_array_from_process_local_data`), its
  dim 0 split over the sharding's batch axes. Every process calls this with
  its own shard of the same step (as `make_lm_dataset`/`make_image_dataset`
  yield it).

  Raises:
    ValueError: a leaf with no batch dim, or a local batch not divisible by
      the number of batch shards this process holds.
  """
  spec = sharding.spec
  batch_axes = spec[0] if len(spec) else None
  if batch_axes is None:
    shards = 1
  else:
    names = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
    shards = int(np.prod([sharding.mesh.shape[a] for a in names]))
  local_shards = max(1, shards // jax.process_count())

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError("make_global_batch needs leaves with a batch dim; got "
                       "a scalar.")
    if x.shape[0] % local_shards:
      raise ValueError(
          f"Local batch dim {x.shape[0]} is not divisible by the "
          f"{local_shards} batch shards this process holds (mesh "
          f"{dict(sharding.mesh.shape)}, spec {spec}).")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, batch)
