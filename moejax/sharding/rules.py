"""Logical axis rules: logical names -> mesh axes, and parameter shardings.

moejax parameters carry logical axis names (moejax.notation: batch, length,
embed, mlp, expert, vocab, heads) as `out_sharding` metadata on their
nnx.Param (moejax.layers.params). A rule set maps each logical name to a mesh
axis, a tuple of mesh axes, or None (replicated):

    DEFAULT_RULES = (('batch', ('data', 'fsdp', 'expert')), ('length', None),
                     ('embed', 'fsdp'), ('mlp', 'tensor'),
                     ('expert', 'expert'), ('vocab', 'tensor'),
                     ('heads', 'tensor'))

so an expert weight w_in_EMH (expert, embed, mlp) is sharded
P('expert', 'fsdp', 'tensor'): experts split over 'expert', the model width
over 'fsdp' (FSDP: all-gathered before use), the hidden width over 'tensor'.
A config overrides single names: `make_rules({'embed': None})` turns FSDP
off for parameters.

Resolution is lenient in two documented ways, so one rule set serves every
mesh: mesh axes the mesh does not have are ignored, and a dimension that its
mesh axes do not divide is sharded over the longest prefix of them that does
(E=4 experts on an 8-way 'expert' axis are replicated along it; the
expert-parallel engines then give each expert to several devices). A mesh
axis already used by an earlier dimension of the same array is skipped.
"""

import functools
from typing import Callable, Mapping, Optional, Sequence, Tuple, Union

from flax import nnx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax import notation as nt
from moejax.sharding import mesh as mesh_lib

MeshAxes = Union[None, str, Tuple[str, ...]]
Rules = Tuple[Tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    (nt.BATCH, (mesh_lib.DATA, mesh_lib.FSDP, mesh_lib.EXPERT)),
    (nt.LENGTH, None),
    (nt.EMBED, mesh_lib.FSDP),
    (nt.MLP, mesh_lib.TENSOR),
    (nt.EXPERT, mesh_lib.EXPERT),
    (nt.VOCAB, mesh_lib.TENSOR),
    (nt.HEADS, mesh_lib.TENSOR),
)


def _mesh_axes_tuple(value, logical):
  if value is None:
    return ()
  if isinstance(value, str):
    value = (value,)
  value = tuple(value)
  for axis in value:
    if axis not in mesh_lib.MESH_AXES:
      raise ValueError(f"rule for {logical!r} names unknown mesh axis "
                       f"{axis!r}; allowed: {list(mesh_lib.MESH_AXES)}")
  if len(set(value)) != len(value):
    raise ValueError(f"rule for {logical!r} repeats a mesh axis: {value}")
  return value


def make_rules(overrides: Union[None, Mapping[str, MeshAxes],
                                Sequence[Tuple[str, MeshAxes]]] = None,
               base: Rules = DEFAULT_RULES) -> Rules:
  """A validated rule set: `base` with `overrides` replacing single names.

  Args:
    overrides: {logical name: mesh axis | tuple of mesh axes | None} or
      [(name, axes), ...] (an ml_collections ConfigDict works; lists are
      read as tuples).
    base: the rules to start from (DEFAULT_RULES).
  Returns:
    Rules: a tuple of (logical name, tuple of mesh axes) pairs.
  Raises:
    ValueError: unknown logical name or mesh axis, a repeated mesh axis.
  """
  rules = {}
  for name, value in base:
    rules[name] = value
  items = () if overrides is None else (
      overrides.items() if isinstance(overrides, Mapping) else overrides)
  for name, value in items:
    rules[name] = value
  out = []
  for name, value in rules.items():
    if name not in nt.LOGICAL_AXES:
      raise ValueError(f"unknown logical axis {name!r}; allowed: "
                       f"{list(nt.LOGICAL_AXES)}")
    out.append((name, _mesh_axes_tuple(value, name)))
  return tuple(out)


def _rules_dict(rules):
  rules = DEFAULT_RULES if rules is None else rules
  return {name: _mesh_axes_tuple(value, name) for name, value in rules}


def mesh_axes_for(logical: str, rules: Optional[Rules] = None,
                  mesh: Optional[Mesh] = None) -> Tuple[str, ...]:
  """The mesh axes a logical name maps to (those `mesh` has, if given)."""
  table = _rules_dict(rules)
  if logical not in table:
    raise ValueError(f"logical axis {logical!r} has no rule; rules cover "
                     f"{sorted(table)}")
  axes = table[logical]
  if mesh is not None:
    axes = mesh_lib.mesh_axes_of(mesh, axes)
  return axes


def logical_to_spec(names: Sequence[Optional[str]],
                    rules: Optional[Rules] = None,
                    mesh: Optional[Mesh] = None,
                    shape: Optional[Sequence[int]] = None) -> P:
  """PartitionSpec of an array whose dimensions have logical `names`.

  Args:
    names: one logical name (or None: replicated) per dimension.
    rules: Rules (default DEFAULT_RULES).
    mesh: if given, mesh axes it lacks are dropped.
    shape: if given (needs mesh), a dimension is sharded over the longest
      prefix of its mesh axes whose size product divides it.
  Returns:
    jax.sharding.PartitionSpec with one entry per dimension.
  Raises:
    ValueError: a name without a rule; shape of another length than names.
  """
  if shape is not None and len(shape) != len(names):
    raise ValueError(f"logical names {tuple(names)} do not match shape "
                     f"{tuple(shape)}")
  used = set()
  entries = []
  for dim, name in enumerate(names):
    if name is None:
      entries.append(None)
      continue
    axes = [a for a in mesh_axes_for(name, rules, mesh) if a not in used]
    if shape is not None and mesh is not None:
      while axes and shape[dim] % int(np.prod([mesh.shape[a] for a in axes])):
        axes.pop()
    used.update(axes)
    entries.append(None if not axes else (
        axes[0] if len(axes) == 1 else tuple(axes)))
  return P(*entries)


def _is_variable(x):
  return isinstance(x, nnx.Variable)


def variable_names(variable) -> Optional[Tuple[Optional[str], ...]]:
  """The logical names of an nnx.Variable (`out_sharding` metadata) or None."""
  names = variable.get_metadata().get("out_sharding")
  return tuple(names) if names else None


def variable_spec(variable, rules=None, mesh=None) -> P:
  """PartitionSpec of one nnx.Variable; P() (replicated) without names."""
  names = variable_names(variable)
  if names is None:
    return P()
  shape = getattr(variable.get_value() if hasattr(variable, "get_value")
                  else variable.value, "shape", None)
  return logical_to_spec(names, rules, mesh,
                         shape if mesh is not None else None)


def state_specs(tree, rules: Optional[Rules] = None,
                mesh: Optional[Mesh] = None):
  """PartitionSpecs for every Variable in an nnx State / module state tree.

  Args:
    tree: nnx.State (e.g. `nnx.state(module)` or the state of
      `nnx.eval_shape(factory)`); concrete or abstract values.
    rules, mesh: as in logical_to_spec.
  Returns:
    The same tree with each Variable's value replaced by its PartitionSpec.
  """
  def spec(v):
    return v.replace(variable_spec(v, rules, mesh)) if _is_variable(v) else P()
  return jax.tree.map(spec, tree, is_leaf=_is_variable)


def state_shardings(tree, mesh: Mesh, rules: Optional[Rules] = None):
  """NamedShardings for every Variable in an nnx State (see state_specs)."""
  def sharding(v):
    if not _is_variable(v):
      return NamedSharding(mesh, P())
    return v.replace(NamedSharding(mesh, variable_spec(v, rules, mesh)))
  return jax.tree.map(sharding, tree, is_leaf=_is_variable)


def module_shardings(module, mesh: Mesh, rules: Optional[Rules] = None):
  """NamedShardings of `nnx.state(module)` (concrete or abstract module)."""
  return state_shardings(nnx.state(module), mesh, rules)


def init_sharded(module_factory: Callable[[], nnx.Module], mesh: Mesh,
                 rules: Optional[Rules] = None) -> nnx.Module:
  """Builds a module with every parameter created directly in its shards.

  The factory is traced once abstractly (nnx.eval_shape) to read the
  parameters' logical names, then run under jax.jit with out_shardings from
  the rules, so each device only ever holds its own shard: no full replica
  is materialised on one device.

  Example:
    layer = init_sharded(lambda: build_moe(
        {"router": {"name": "token_choice", "k": 2},
         "experts": {"num_experts": 64, "hidden_dim": 1024}},
        model_dim=512, rngs=nnx.Rngs(0)), mesh)

  Args:
    module_factory: () -> nnx.Module, deterministic (seeded nnx.Rngs inside).
    mesh: the mesh.
    rules: Rules (default DEFAULT_RULES).
  Returns:
    The module with sharded parameters (jax.Arrays with NamedShardings).
  """
  abstract = nnx.eval_shape(module_factory)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    return nnx.state(module_factory())

  return nnx.merge(graphdef, init())


def shard_module(module: nnx.Module, mesh: Mesh,
                 rules: Optional[Rules] = None) -> nnx.Module:
  """Moves an existing module's state onto the mesh per the rules (in place).

  Use init_sharded for large models: this one starts from whatever
  placement the module has (typically one device).
  """
  state = nnx.state(module)
  sharded = jax.device_put(state, state_shardings(state, mesh, rules))
  nnx.update(module, sharded)
  return module
