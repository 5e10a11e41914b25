"""Expert parallelism: experts split over the 'expert' mesh axis.

Token groups G are split over the token axes (by default the mesh's data,
fsdp and expert axes); experts are split over 'expert'; the expert hidden
width H over 'tensor'. Routing is per group, so each device routes its own
groups and the plan is exactly the single-device plan. Tokens then travel to
the devices that hold their experts and back:

* mode='shard_map' (explicit; einsum, indices and dropless engines): inside
  jax.shard_map each device dispatches its groups into [E, G_loc, C, M],
  jax.lax.all_to_all over 'expert' turns that into [E_loc, G_loc*X, C, M]
  (its own experts, everyone's tokens), runs its experts (psum over 'tensor'
  after the second matmul when H is split), and all_to_all brings the
  results back for the local combine. The dropless engine sends exactly the
  routed rows with jax.lax.ragged_all_to_all on GPU/TPU and, because XLA:CPU
  does not implement it, with a padded all_to_all on CPU (moejax.sharding.
  ragged), same results.
* mode='gspmd' (einsum and indices engines): sharding constraints on the
  [E, G*C, M] expert buffer, from G split over the token axes to E split over
  'expert', which XLA's SPMD partitioner lowers to an all-to-all (the tests
  check the compiled HLO for all-to-all and for the absence of an
  all-gather of the expert weights).

E versus the expert axis size X: E a multiple of X puts E/X experts on each
device. E dividing X (E < X) replicates each expert on X/E devices: the
'expert' axis is viewed as ('expert_replica', 'expert') of sizes (X/E, E)
over the same devices in the same order; tokens are split over both and
exchanged over 'expert' only, so replica j of every expert serves the tokens
of the E devices with replica index j. Any other (E, X) raises ValueError.
"""

import dataclasses
import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from moejax.ops import ffn as ffn_lib
from moejax.ops import gather as gather_lib
from moejax.routing.token_choice import rank_within_expert
from moejax.sharding import mesh as mesh_lib
from moejax.sharding import ragged as ragged_lib

EP_MODES = ("shard_map", "gspmd")
EXPERT_REPLICA = "expert_replica"
TOKEN_AXES = (mesh_lib.DATA, mesh_lib.FSDP, mesh_lib.EXPERT)


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
  """Where tokens, experts and hidden units live for one (mesh, E).

  Attributes:
    mesh: the mesh the expert-parallel code runs on: the given one, or (when
      E < X) the same devices with 'expert' split into ('expert_replica',
      'expert').
    token_axes: mesh axes (of `mesh`) the token groups G are split over.
    expert_axis: 'expert', or None when the mesh has no expert axis of size
      > 1.
    expert_shards: X' = devices along expert_axis (min(E, X)).
    experts_per_shard: E / X'.
    replicas: X / X' (devices holding each expert's weights along 'expert').
    tensor_axis: 'tensor', or None when the mesh has none of size > 1.
    tensor_size: devices along tensor_axis.
  """
  mesh: Mesh
  token_axes: Tuple[str, ...]
  expert_axis: Optional[str]
  expert_shards: int
  experts_per_shard: int
  replicas: int
  tensor_axis: Optional[str]
  tensor_size: int

  @property
  def num_token_shards(self) -> int:
    return int(np.prod([self.mesh.shape[a] for a in self.token_axes]))

  def sharding(self, spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  @property
  def tokens_spec(self) -> P:
    """P(token_axes) on the leading (group) dimension."""
    return P(self.token_axes or None)

  def weight_specs(self, weights) -> ffn_lib.ExpertWeights:
    """Specs of ExpertWeights: E over expert_axis, H over tensor_axis."""
    e, t = self.expert_axis, self.tensor_axis
    emh = P(e, None, t)
    return ffn_lib.ExpertWeights(
        emh, P(e, t, None), None if weights.w_gate_EMH is None else emh)


def check_mode(mode):
  if mode not in EP_MODES:
    raise ValueError(f"unknown expert_parallel mode {mode!r}; allowed: "
                     f"{list(EP_MODES)}")


def is_capacity_engine(engine):
  """Whether `engine` runs through slots: uses_capacity and the dispatch /
  combine protocol (moejax.layers.engines)."""
  return bool(getattr(engine, "uses_capacity", True))


def check_engine_mode(engine, mode):
  """Raises for an engine/mode pair that has no expert-parallel path."""
  check_mode(mode)
  name = type(engine).__name__
  if is_capacity_engine(engine):
    if not (callable(getattr(engine, "dispatch", None))
            and callable(getattr(engine, "combine", None))):
      raise ValueError(
          f"engine {name} has no expert-parallel path: a capacity engine "
          f"needs dispatch(plan, x_GSM) -> (in_EGCM, ctx) and "
          f"combine(plan, out_EGCM, ctx) -> y_GSM")
    return
  if not (isinstance(getattr(engine, "tile", None), int)
          and callable(getattr(engine, "gmm_fn", None))):
    raise ValueError(
        f"engine {name} has no expert-parallel path: a dropless engine "
        f"needs `tile` (int) and gmm_fn() -> gmm(lhs_RM, rhs_EMH, "
        f"group_sizes_E, *, tile)")
  if mode == "gspmd":
    raise ValueError(
        f"engine {name} (dropless) has no GSPMD expert-parallel path (its "
        f"expert-sorted rows have data-dependent sizes, which sharding "
        f"constraints cannot express); use mode='shard_map', which sends "
        f"the rows with ragged_all_to_all (padded all_to_all on CPU)")


def expert_layout(mesh: Mesh, num_experts: int, *,
                  hidden_dim: Optional[int] = None,
                  token_axes: Optional[Sequence[str]] = None) -> ExpertLayout:
  """Validates a mesh for E experts and lays experts and tokens out on it.

  Args:
    mesh: a jax.sharding.Mesh over (a subset of) data, fsdp, expert, tensor,
      with Auto axis types on the axes used here.
    num_experts: E.
    hidden_dim: H, checked to be divisible by the tensor axis size.
    token_axes: mesh axes to split token groups over; default the mesh's
      data, fsdp and expert axes, in mesh order. Must include 'expert' when
      the mesh has an expert axis of size > 1, and never 'tensor'.
  Returns:
    ExpertLayout.
  Raises:
    ValueError: E neither a multiple nor a divisor of the expert axis size;
      H not divisible by the tensor axis size; bad token axes; non-Auto axes.
  """
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh, got "
                     f"{type(mesh).__name__}")
  if isinstance(num_experts, bool) or not isinstance(num_experts, int) or (
      num_experts < 1):
    raise ValueError(f"num_experts must be an integer >= 1, got "
                     f"{num_experts!r}")
  names = tuple(mesh.axis_names)
  if token_axes is None:
    token_axes = mesh_lib.mesh_axes_of(mesh, TOKEN_AXES)
  token_axes = tuple(token_axes)
  for a in token_axes:
    if a not in names:
      raise ValueError(f"token axis {a!r} is not a mesh axis; mesh axes: "
                       f"{list(names)}")
  if len(set(token_axes)) != len(token_axes):
    raise ValueError(f"token_axes repeats an axis: {token_axes}")
  if mesh_lib.TENSOR in token_axes:
    raise ValueError("token_axes must not include 'tensor': tokens are "
                     "replicated along the tensor axis, which splits H")
  x = mesh_lib.axis_size(mesh, mesh_lib.EXPERT)
  t = mesh_lib.axis_size(mesh, mesh_lib.TENSOR)
  used = set(token_axes) | ({mesh_lib.EXPERT} if x > 1 else set()) | (
      {mesh_lib.TENSOR} if t > 1 else set())
  types = dict(zip(names, getattr(mesh, "axis_types", (AxisType.Auto,) *
                                  len(names))))
  explicit = sorted(a for a in used if types.get(a) != AxisType.Auto)
  if explicit:
    raise ValueError(
        f"mesh axes {explicit} are not AxisType.Auto; moejax's expert "
        f"parallelism states shardings at the communication points and lets "
        f"GSPMD propagate the rest: build the mesh with "
        f"moejax.sharding.make_mesh(..., axis_types='auto')")
  if x > 1 and mesh_lib.EXPERT not in token_axes:
    raise ValueError(
        f"token_axes {token_axes} must include 'expert' (size {x}): the "
        f"expert axis splits the tokens too, and all-to-all exchanges them")
  e = num_experts
  if x > 1 and e % x and x % e:
    raise ValueError(
        f"num_experts={e} does not fit the expert axis of size {x}: E must "
        f"be a multiple of it (E/{x} experts per device) or divide it (each "
        f"expert replicated on {x}/E devices); choose e.g. E="
        f"{x} or {2 * x}, or an expert axis of size dividing {e}")
  if hidden_dim is not None and hidden_dim % t:
    raise ValueError(f"hidden_dim={hidden_dim} is not divisible by the "
                     f"tensor axis size {t}")
  layout_mesh = mesh
  shards, replicas = (min(e, x), max(1, x // e)) if x > 1 else (1, 1)
  if replicas > 1:
    # View 'expert' (X devices) as ('expert_replica', 'expert') = (X/E, E),
    # replica-major, so the token order over ('expert_replica', 'expert')
    # is the order over the original 'expert' axis and 'expert' stays the
    # minor-most token axis (a clean all-to-all for GSPMD both ways).
    pos = names.index(mesh_lib.EXPERT)
    shape = tuple(mesh.devices.shape)
    new_shape = shape[:pos] + (replicas, shards) + shape[pos + 1:]
    new_names = names[:pos] + (EXPERT_REPLICA, mesh_lib.EXPERT) + names[
        pos + 1:]
    new_types = tuple(types[n] for n in names[:pos]) + (
        AxisType.Auto, AxisType.Auto) + tuple(types[n] for n in names[pos + 1:])
    layout_mesh = Mesh(mesh.devices.reshape(new_shape), new_names,
                       axis_types=new_types)
    i = token_axes.index(mesh_lib.EXPERT)
    token_axes = token_axes[:i] + (EXPERT_REPLICA,) + token_axes[i:]
  return ExpertLayout(
      mesh=layout_mesh, token_axes=token_axes,
      expert_axis=mesh_lib.EXPERT if x > 1 else None, expert_shards=shards,
      experts_per_shard=e // shards, replicas=replicas,
      tensor_axis=mesh_lib.TENSOR if t > 1 else None, tensor_size=t)


def check_groups(num_groups: int, layout: ExpertLayout):
  """Raises unless the G token groups split evenly over the token shards."""
  d = layout.num_token_shards
  if num_groups % d:
    raise ValueError(
        f"{num_groups} token groups do not split evenly over the {d} devices "
        f"of the token axes {layout.token_axes}: make batch*length/group_size "
        f"a multiple of {d}")


def constrain_groups(x_G, layout: ExpertLayout):
  """Sharding constraint: leading group dimension over the token axes."""
  check_groups(x_G.shape[0], layout)
  return jax.lax.with_sharding_constraint(
      x_G, layout.sharding(layout.tokens_spec))


def group_local(fn, layout: ExpertLayout, *, grouped: Sequence[str]):
  """Wraps a per-group function so each device runs it on its own groups.

  Routers are per group (DESIGN.md), so running one under jax.shard_map on
  each device's groups gives exactly the plan of the global call, without
  the all-gathers XLA's partitioner inserts around top_k and the routers'
  scatters.

  Args:
    fn: called with keyword arguments only; returns a pytree whose array
      leaves all lead with the group axis G (a RoutingPlan).
    layout: the ExpertLayout.
    grouped: the names of the keyword arguments whose leading axis is G
      (split over the token axes; None values pass through). Every other
      array argument is replicated; non-arrays are static.
  Returns:
    wrapped(**kwargs), equal to fn(**kwargs).
  """
  grouped = frozenset(grouped)

  @functools.wraps(fn)
  def wrapped(**kwargs):
    arrays, static, specs = {}, {}, {}
    for name, value in kwargs.items():
      if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) > 0:
        arrays[name] = value
        if name in grouped:
          check_groups(value.shape[0], layout)
          specs[name] = layout.tokens_spec
        else:
          specs[name] = P()
      else:
        static[name] = value

    def body(local):
      return fn(**local, **static)

    return jax.shard_map(body, mesh=layout.mesh, in_specs=(specs,),
                         out_specs=layout.tokens_spec, check_vma=False)(arrays)

  return wrapped


# --- collectives over the expert / tensor axes ------------------------------


def _all_to_all(x, layout, split_axis, concat_axis):
  if layout.expert_axis is None:
    return x
  return jax.lax.all_to_all(x, layout.expert_axis, split_axis, concat_axis,
                            tiled=True)


def _psum_tensor(x, layout):
  if layout.tensor_axis is None:
    return x
  return jax.lax.psum(x, layout.tensor_axis)


# --- capacity engines (einsum, indices) --------------------------------------


def _dispatch(engine, plan, x_GSM):
  return engine.dispatch(plan, x_GSM)


def _combine(engine, plan, out_EGCM, ctx):
  return engine.combine(plan, out_EGCM, ctx)


def _capacity_shard_map_body(engine, activation, layout, plan, x_GSM,
                             weights):
  """One device: its G_loc groups in, all_to_all, its experts, back."""
  in_EGCM, idx = _dispatch(engine, plan, x_GSM)
  in_EGCM = _all_to_all(in_EGCM, layout, 0, 1)   # -> [E_loc, X*G_loc, C, M]
  e_loc, gx, c, m = in_EGCM.shape
  out_EXM = ffn_lib.expert_ffn(in_EGCM.reshape(e_loc, gx * c, m),
                                   *weights, activation=activation)
  out_EXM = _psum_tensor(out_EXM, layout)        # sum over H shards
  out_EGCM = _all_to_all(out_EXM.reshape(e_loc, gx, c, m), layout, 1, 0)
  return _combine(engine, plan, out_EGCM, idx)   # [E, G_loc, C, M] -> GSM


def _one_group(tree):
  return jax.tree.map(lambda a: a[None], tree)


def _dispatch_per_group(engine, plan, x_GSM):
  """_dispatch vmapped over groups: [E, G, C, M] and per-group indices.

  The engines index slots by flat positions over all groups (e*G*C + g*C +
  c), which XLA's SPMD partitioner cannot split along G; vmapped over G the
  gathers and scatters get G as a batch dimension, which it can.
  """
  def one(plan_g, x_SM):
    in_E1CM, idx = _dispatch(engine, _one_group(plan_g), x_SM[None])
    return in_E1CM[:, 0], idx
  return jax.vmap(one, in_axes=(0, 0), out_axes=(1, 0))(plan, x_GSM)


def _combine_per_group(engine, plan, out_EGCM, idx):
  def one(plan_g, out_ECM, idx_g):
    return _combine(engine, _one_group(plan_g), out_ECM[:, None], idx_g)[0]
  return jax.vmap(one, in_axes=(0, 1, 0))(plan, out_EGCM, idx)


def _capacity_gspmd(engine, plan, x_GSM, weights, activation, layout):
  """GSPMD: constraints on the [E, G*C, M] buffer make the all-to-alls."""
  x_GSM = constrain_groups(x_GSM, layout)
  rest = tuple(a for a in layout.token_axes if a != layout.expert_axis)
  buffer_spec = P(layout.expert_axis, rest or None, None)
  tokens_spec = P(None, layout.token_axes or None, None)
  in_EGCM, idx = _dispatch_per_group(engine, plan, x_GSM)
  e, g, c, m = in_EGCM.shape
  in_EXM = jax.lax.with_sharding_constraint(
      in_EGCM.reshape(e, g * c, m), layout.sharding(tokens_spec))
  in_EXM = jax.lax.with_sharding_constraint(
      in_EXM, layout.sharding(buffer_spec))     # all-to-all to the experts
  weights = jax.tree.map(
      lambda w, s: jax.lax.with_sharding_constraint(w, layout.sharding(s)),
      weights, layout.weight_specs(weights))
  out_EXM = ffn_lib.expert_ffn(in_EXM, *weights, activation=activation)
  out_EXM = jax.lax.with_sharding_constraint(out_EXM,
                                             layout.sharding(buffer_spec))
  out_EXM = jax.lax.with_sharding_constraint(
      out_EXM, layout.sharding(tokens_spec))    # all-to-all back
  return _combine_per_group(engine, plan, out_EXM.reshape(e, g, c, m), idx)


# --- dropless engine --------------------------------------------------------


class _Counts:
  """Row counts of every (source device, expert) pair and the offsets
  derived from them (all static-shape int32 arithmetic)."""

  def __init__(self, sizes_all_XE, me, e_loc, tile):
    x, e = sizes_all_XE.shape
    s3_XYJ = sizes_all_XE.reshape(x, x, e_loc)        # [src, dst, local e]
    total_YJ = s3_XYJ.sum(axis=0)
    padded_YJ = -(-total_YJ // tile) * tile           # tile-aligned groups
    base_YJ = jnp.cumsum(padded_YJ, axis=1) - padded_YJ
    within_XYJ = jnp.cumsum(s3_XYJ, axis=0) - s3_XYJ
    # Row of (src, dst, j) in dst's receive buffer: expert-major, then src.
    recv_off_XYJ = base_YJ[None] + within_XYJ
    # Row of (src, dst, j) in src's expert-sorted send buffer.
    send_off_XE = jnp.cumsum(sizes_all_XE, axis=1) - sizes_all_XE
    self.group_sizes_J = padded_YJ[me]
    # Slices this device sends (one per global expert = (dst, j)):
    self.send_sizes = sizes_all_XE[me]
    self.input_offsets = send_off_XE[me]
    self.output_offsets = recv_off_XYJ[me].reshape(e)
    # Slices this device receives (one per (src, j)):
    self.recv_sizes = s3_XYJ[:, me, :].reshape(e)
    self.recv_offsets = recv_off_XYJ[:, me, :].reshape(e)
    self.back_offsets = send_off_XE.reshape(x, x, e_loc)[:, me, :].reshape(e)


def _dropless_shard_map_body(activation, layout, tile, gmm_fn, collective,
                             plan, x_GSM, weights):
  """One device: sort its assignments by expert, ragged all-to-all them to
  the experts' devices (landing grouped by local expert, tile-aligned),
  grouped matmuls, ragged all-to-all back, unsort and combine."""
  g, s, m = x_GSM.shape
  k = plan.expert_GSK.shape[-1]
  n = g * s * k
  e = plan.num_experts
  x_shards, e_loc = layout.expert_shards, layout.experts_per_shard
  expert_N = plan.expert_GSK.reshape(-1)
  # Expert-sorted send buffer (no tile padding): assignment -> row.
  rank_N = rank_within_expert(expert_N[None], e)[0]
  sizes_E = jnp.zeros((e,), jnp.int32).at[expert_N].add(1, mode="drop")
  start_E = jnp.cumsum(sizes_E) - sizes_E
  row_N = jnp.where(expert_N < e, jnp.take(start_E, expert_N, mode="fill",
                                           fill_value=0) + rank_N,
                    n).astype(jnp.int32)
  assignment_R = jnp.full((n,), n, jnp.int32).at[row_N].set(
      jnp.arange(n, dtype=jnp.int32), mode="drop", unique_indices=True)
  token_R = jnp.where(assignment_R < n, assignment_R // k, g * s)
  send_RM = gather_lib.gather_rows(x_GSM.reshape(g * s, m), token_R,
                                     row_N.reshape(g * s, k))
  if layout.expert_axis is None:
    sizes_all_XE, me = sizes_E[None], 0
  else:
    sizes_all_XE = jax.lax.all_gather(sizes_E, layout.expert_axis)
    me = jax.lax.axis_index(layout.expert_axis)
  cnt = _Counts(sizes_all_XE, me, e_loc, tile)
  # Every row of every source could land here: the static worst case.
  num_recv = gather_lib.dropless_num_rows(x_shards * n, e_loc, tile)
  a2a = functools.partial(ragged_lib.ragged_all_to_all,
                          axis_name=layout.expert_axis, axis_size=x_shards,
                          collective=collective)
  recv_RM = a2a(send_RM, jnp.zeros((num_recv, m), send_RM.dtype),
                cnt.input_offsets, cnt.send_sizes, cnt.output_offsets,
                cnt.recv_sizes, max_rows_per_peer=n)
  gmm_call = functools.partial(gmm_fn, group_sizes_E=cnt.group_sizes_J,
                               tile=tile)
  h_RH = gmm_call(recv_RM, weights.w_in_EMH)
  gate_RH = None if weights.w_gate_EMH is None else gmm_call(
      recv_RM, weights.w_gate_EMH)
  out_RM = gmm_call(ffn_lib.activate(h_RH, gate_RH, activation),
                    weights.w_out_EHM)
  out_RM = _psum_tensor(out_RM, layout)
  back_RM = a2a(out_RM, jnp.zeros((n, m), out_RM.dtype), cnt.recv_offsets,
                cnt.recv_sizes, cnt.back_offsets, cnt.send_sizes,
                max_rows_per_peer=n)
  picked_NM = gather_lib.gather_rows(back_RM, row_N, assignment_R[:, None])
  w_GSK = plan.weight_GSK.astype(back_RM.dtype)
  return jnp.einsum("GSK,GSKM->GSM", w_GSK, picked_NM.reshape(g, s, k, m))


# --- entry ------------------------------------------------------------------


def _plan_specs(plan, spec):
  return jax.tree.map(lambda _: spec, plan)


def run_engine_ep(engine, plan, x_GSM, weights, activation, *, mesh,
                  mode="shard_map", token_axes=None, collective="auto"):
  """Runs an engine object (moejax.layers.engines) with its experts split
  over the mesh's 'expert' axis; equal to engine(plan, x_GSM, weights,
  activation) on one device.

  Call it under jax.jit (or eagerly) with arrays on `mesh` or anywhere;
  shardings are stated here and XLA moves what has to move.

  Args:
    engine: a capacity engine (dispatch/combine: EinsumEngine,
      IndicesEngine) or a dropless one (tile, gmm_fn: DroplessEngine,
      PallasEngine; shard_map only).
    plan: RoutingPlan over all G groups (routed per group, so computing it
      under GSPMD with G split over the token axes routes locally).
    x_GSM: <dtype>[G, S, M]; G a multiple of the token-axis devices.
    weights: ExpertWeights (w_in_EMH [E, M, H], w_out_EHM [E, H, M],
      w_gate_EMH or None).
    activation: relu, gelu, swiglu, geglu.
    mesh: the jax.sharding.Mesh (Auto axes).
    mode: 'shard_map' or 'gspmd'.
    token_axes: see expert_layout.
    collective: dropless all-to-all: 'auto' (ragged_all_to_all on GPU/TPU,
      padded all_to_all on CPU), 'ragged' or 'padded'.
  Returns:
    <dtype>[G, S, M].
  """
  check_engine_mode(engine, mode)
  e = plan.num_experts
  h = weights.w_in_EMH.shape[-1]
  layout = expert_layout(mesh, e, hidden_dim=h, token_axes=token_axes)
  check_groups(x_GSM.shape[0], layout)
  capacity_engine = is_capacity_engine(engine)
  if capacity_engine and plan.is_dropless:
    raise ValueError(f"engine {type(engine).__name__} needs a capacity plan; "
                     f"got a dropless plan (capacity=None)")
  if mode == "gspmd":
    return _capacity_gspmd(engine, plan, x_GSM, weights, activation, layout)
  x_GSM = constrain_groups(x_GSM, layout)
  tok = layout.tokens_spec
  if not capacity_engine:
    if not plan.has_token_view:
      raise ValueError(f"engine {type(engine).__name__} needs a token-choice "
                       f"plan (token view)")
    platform = mesh.devices.flat[0].platform
    body = functools.partial(
        _dropless_shard_map_body, activation, layout, engine.tile,
        engine.gmm_fn(), ragged_lib.resolve_collective(collective, platform))
  else:
    body = functools.partial(_capacity_shard_map_body, engine, activation,
                             layout)
  return jax.shard_map(
      body, mesh=layout.mesh,
      in_specs=(_plan_specs(plan, tok), tok, layout.weight_specs(weights)),
      out_specs=tok, check_vma=capacity_engine)(plan, x_GSM, weights)


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """Expert parallelism for an MoELayer: experts split over the mesh's
  'expert' axis, token groups over `token_axes`, H over 'tensor'.

  The layer is given one (`MoELayer(..., expert_parallel=ep)`) and calls
  `ep.route(router, ...)` and `ep.run(engine, ...)`; results equal the
  unsharded layer's. Hashable (a static part of the layer's graph).

  Args:
    mesh: a jax.sharding.Mesh with Auto axes (moejax.sharding.make_mesh).
    mode: 'shard_map' (jax.shard_map + all_to_all; every engine) or 'gspmd'
      (sharding constraints on the expert buffers; capacity engines).
    token_axes: mesh axes the token groups are split over; None: the
      mesh's data, fsdp and expert axes.
    collective: how the dropless engines move rows: 'auto'
      (ragged_all_to_all on GPU/TPU, padded all_to_all on CPU), 'ragged' or
      'padded'.
  """
  mesh: Mesh
  mode: str = "shard_map"
  token_axes: Optional[Tuple[str, ...]] = None
  collective: str = "auto"

  def __post_init__(self):
    if not isinstance(self.mesh, Mesh):
      raise ValueError(f"mesh must be a jax.sharding.Mesh, got "
                       f"{type(self.mesh).__name__}")
    check_mode(self.mode)
    if self.token_axes is not None:
      object.__setattr__(self, "token_axes", tuple(self.token_axes))
    ragged_lib.resolve_collective(self.collective,
                                  self.mesh.devices.flat[0].platform)

  def layout(self, num_experts, hidden_dim=None) -> ExpertLayout:
    """The ExpertLayout of E experts (and H) on this mesh."""
    return expert_layout(self.mesh, num_experts, hidden_dim=hidden_dim,
                         token_axes=self.token_axes)

  def check(self, *, num_experts, hidden_dim, engine):
    """Raises ValueError for a layer this cannot run: E neither a multiple
    nor a divisor of the expert axis, H not split by 'tensor', an engine
    without a path for this mode."""
    check_engine_mode(engine, self.mode)
    self.layout(num_experts, hidden_dim)

  def constrain_groups(self, x_G, num_experts):
    """Sharding constraint: the leading group axis over the token axes."""
    return constrain_groups(x_G, self.layout(num_experts))

  def route(self, router, x_GSM, *, capacity, padding_mask_GS=None,
            token_ids_GS=None, deterministic=False):
    """router(x_GSM, ...) with the token groups split over the token axes.

    A router with `group_local = True` runs on each device's own groups
    under shard_map (no all-gathers around its top-k and scatters); its
    losses (means over groups) are averaged and its stats (sums over
    groups) summed over the devices. Any other router runs under GSPMD on
    the constrained groups, which is exact for every router (PRNG draws and
    whole-batch losses included).
    """
    kwargs = dict(capacity=capacity, padding_mask_GS=padding_mask_GS,
                  token_ids_GS=token_ids_GS, deterministic=deterministic)
    layout = self.layout(router.num_experts)
    if not getattr(router, "group_local", False):
      return router(constrain_groups(x_GSM, layout), **kwargs)
    from flax import nnx  # the router is an NNX module
    graphdef, state = nnx.split(router)
    grouped = {"x_GSM": x_GSM, "padding_mask_GS": padding_mask_GS,
               "token_ids_GS": token_ids_GS}
    for value in grouped.values():
      if value is not None:
        check_groups(value.shape[0], layout)
    present = {k: v for k, v in grouped.items() if v is not None}
    axes = layout.token_axes

    def body(local, state):
      out = nnx.merge(graphdef, state)(**local, capacity=capacity,
                                      deterministic=deterministic)
      if axes:
        out = out.replace(
            losses=jax.lax.pmean(dict(out.losses), axes),
            stats=jax.lax.psum(dict(out.stats), axes))
      return out

    out_shape = jax.eval_shape(
        lambda: nnx.merge(graphdef, state)(x_GSM, **kwargs))
    tok = layout.tokens_spec
    out_specs = out_shape.replace(
        plan=jax.tree.map(lambda _: tok, out_shape.plan),
        logits_GSE=None if out_shape.logits_GSE is None else tok,
        losses=jax.tree.map(lambda _: P(), out_shape.losses),
        stats=jax.tree.map(lambda _: P(), out_shape.stats))
    in_specs = ({k: tok for k in present}, jax.tree.map(lambda _: P(), state))
    return jax.shard_map(body, mesh=layout.mesh, in_specs=in_specs,
                         out_specs=out_specs, check_vma=False)(present, state)

  def run(self, engine, plan, x_GSM, weights, activation):
    """engine(plan, x_GSM, weights, activation) with the experts split over
    the expert axis (run_engine_ep)."""
    return run_engine_ep(engine, plan, x_GSM, weights, activation,
                         mesh=self.mesh, mode=self.mode,
                         token_axes=self.token_axes,
                         collective=self.collective)


def enable_expert_parallel(model, mesh, mode="shard_map", *, token_axes=None,
                           collective="auto"):
  """Gives every module of `model` that takes expert parallelism (has a
  `set_expert_parallel` method, e.g. MoELayer) an ExpertParallel(mesh, mode,
  ...), in place; `mesh=None, mode=None` turns it off. Returns the number of
  modules changed."""
  from flax import nnx
  if (mesh is None) != (mode is None):
    raise ValueError(f"mesh and mode go together: give both or neither; got "
                     f"mesh={mesh!r}, mode={mode!r}")
  ep = None if mesh is None else ExpertParallel(
      mesh, mode, token_axes=token_axes, collective=collective)
  count = 0
  for _, module in nnx.iter_graph(model):
    if callable(getattr(module, "set_expert_parallel", None)):
      module.set_expert_parallel(ep)
      count += 1
  return count
