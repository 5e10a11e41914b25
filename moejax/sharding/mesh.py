"""Device meshes over moejax's four named axes: data, fsdp, expert, tensor.

`make_mesh({'data': -1, 'expert': 4})` builds a `jax.sharding.Mesh` over all
devices (all processes' devices after `moejax.sharding.initialize()`).

What each axis does (docs/sharding.md has the longer story):

* data:   splits the batch; parameters replicated; gradients all-reduced.
* fsdp:   splits the batch and the parameters' `embed` dimension; parameters
          are all-gathered before use and gradients reduce-scattered.
* expert: splits the experts (expert parallelism) and the batch; tokens reach
          their experts through all-to-all.
* tensor: splits the expert (and dense FFN) hidden dimension `mlp`; tokens are
          replicated along it and partial outputs are summed (psum).

Axis types: moejax builds meshes with `AxisType.Auto` on every axis by
default, on purpose. `jax.make_mesh` defaults to `Explicit` in this jax
("sharding in types"): every op on a sharded operand must then have an
unambiguous output sharding, which the dispatch engines' gathers, scatters
and custom-VJP gathers do not state. moejax instead states the sharding at the
few points that matter (the token groups, the expert buffers, the parameters)
and lets GSPMD propagate the rest, or takes manual control inside
`jax.shard_map`; Auto is the axis type for that style. Pass
`axis_types='explicit'` (or a per-axis dict) to opt in to Explicit axes for
your own code; the expert-parallel paths in moejax.sharding accept only Auto
axes for the axes they shard over.
"""

from typing import Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DATA = "data"
FSDP = "fsdp"
EXPERT = "expert"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, EXPERT, TENSOR)

_AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}

AxisSizes = Union[Mapping[str, int], Sequence[Tuple[str, int]]]


def _axis_type(value, name):
  if isinstance(value, AxisType):
    if value == AxisType.Manual:
      raise ValueError(f"axis {name!r}: AxisType.Manual is for shard_map "
                       "internals; use 'auto' or 'explicit'")
    return value
  if isinstance(value, str) and value.lower() in _AXIS_TYPES:
    return _AXIS_TYPES[value.lower()]
  raise ValueError(f"axis {name!r}: unknown axis type {value!r}; allowed: "
                   f"'auto', 'explicit' (or jax.sharding.AxisType.Auto/"
                   f"Explicit)")


def resolve_axis_sizes(axis_sizes: AxisSizes, num_devices: int):
  """Validates the axis sizes and fills the one -1 wildcard.

  Args:
    axis_sizes: {name: size} or [(name, size), ...] over names in MESH_AXES,
      in mesh order (outermost first); at most one size is -1.
    num_devices: the number of devices the mesh must cover.
  Returns:
    (names tuple, sizes tuple) with the wildcard filled in.
  Raises:
    ValueError: unknown or repeated name, a size that is not an integer >= 1
      (or the one -1), two wildcards, or sizes whose product is not
      num_devices (or does not divide it, with a wildcard).
  """
  items = list(axis_sizes.items()) if isinstance(axis_sizes, Mapping) else [
      tuple(item) for item in axis_sizes]
  if not items:
    raise ValueError("axis_sizes is empty; give at least one of "
                     f"{list(MESH_AXES)}, e.g. {{'data': -1}}")
  names, sizes = [], []
  for item in items:
    if len(item) != 2:
      raise ValueError(f"axis_sizes entries must be (name, size) pairs, got "
                       f"{item!r}")
    name, size = item
    if name not in MESH_AXES:
      raise ValueError(f"unknown mesh axis {name!r}; allowed: "
                       f"{list(MESH_AXES)}")
    if name in names:
      raise ValueError(f"mesh axis {name!r} given twice")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (
        size < 1 and size != -1):
      raise ValueError(f"mesh axis {name!r}: size must be an integer >= 1 or "
                       f"-1 (the one wildcard), got {size!r}")
    names.append(name)
    sizes.append(int(size))
  wild = [n for n, s in zip(names, sizes) if s == -1]
  if len(wild) > 1:
    raise ValueError(f"only one mesh axis may be -1, got {wild}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if wild:
    if num_devices % known:
      raise ValueError(
          f"mesh axes {dict(zip(names, sizes))}: the fixed sizes multiply to "
          f"{known}, which does not divide the {num_devices} devices, so "
          f"{wild[0]!r}=-1 cannot be filled")
    sizes[names.index(wild[0])] = num_devices // known
  elif known != num_devices:
    raise ValueError(
        f"mesh axes {dict(zip(names, sizes))} multiply to {known} devices but "
        f"there are {num_devices}; make the product {num_devices} or use -1 "
        f"for one axis")
  return tuple(names), tuple(sizes)


def make_mesh(axis_sizes: AxisSizes, devices: Optional[Sequence] = None,
              axis_types: Union[str, AxisType, Mapping[str, object]] = "auto"
              ) -> Mesh:
  """A mesh over named axes (any subset of data, fsdp, expert, tensor).

  Example:
    mesh = make_mesh({'data': -1, 'expert': 4})    # 8 devices -> (2, 4)

  Args:
    axis_sizes: {name: size} or [(name, size), ...], outermost axis first
      (the recommended order is data, fsdp, expert, tensor, so the axes that
      talk most are innermost: neighbouring devices); one size may be -1.
      An ml_collections ConfigDict works as a mapping.
    devices: the devices to use, default all of `jax.devices()` (every
      process's devices in a multi-process run). With devices=None the
      layout comes from `jax.make_mesh` (topology-aware on TPU/GPU);
      given devices are used in the order given.
    axis_types: 'auto' (default; see the module docstring for why),
      'explicit', a jax.sharding.AxisType, or {axis name: type} (axes not
      named are Auto).
  Returns:
    A jax.sharding.Mesh.
  Raises:
    ValueError: see resolve_axis_sizes; unknown axis type or a per-axis
      type for an axis not in the mesh.
  """
  device_list = None if devices is None else list(devices)
  num = len(jax.devices()) if device_list is None else len(device_list)
  names, sizes = resolve_axis_sizes(axis_sizes, num)
  if isinstance(axis_types, Mapping):
    extra = set(axis_types) - set(names)
    if extra:
      raise ValueError(f"axis_types names axes {sorted(extra)} that are not "
                       f"in the mesh {list(names)}")
    types = tuple(_axis_type(axis_types.get(n, "auto"), n) for n in names)
  else:
    types = tuple(_axis_type(axis_types, n) for n in names)
  if device_list is None:
    return jax.make_mesh(sizes, names, axis_types=types)
  return Mesh(np.asarray(device_list, dtype=object).reshape(sizes), names,
              axis_types=types)


def axis_size(mesh: Mesh, name: str) -> int:
  """The size of mesh axis `name`, 1 when the mesh has no such axis."""
  return int(mesh.shape[name]) if name in mesh.axis_names else 1


def mesh_axes_of(mesh: Mesh, names: Sequence[str]) -> Tuple[str, ...]:
  """The names among `names` that the mesh has, in the order given."""
  return tuple(n for n in names if n in mesh.axis_names)
