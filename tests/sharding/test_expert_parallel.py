"""Expert parallelism equals the single-device engines (8 CPU devices).

Every case routes (G=8, S=8, M=8, H=16, K=2) tokens with token choice and
compares the expert-parallel engine's output and gradients (w.r.t. the
tokens, the router weights and the expert weights) with the single-device
engine on the same plan, float32.

Grid: the issue asks for every engine x mesh (data, expert) in (8,1), (4,2),
(2,4), (1,8) x E in {4, 8, 16}. Each case is one XLA compile of the forward
and backward program (seconds on a shared CPU), so by default a subset runs
(_default_grid): every engine on every mesh, every engine with E below, equal
to and above the expert axis size, and four GSPMD cases.
MOEJAX_FULL_GRID=1 runs all 36 shard_map and 24 GSPMD cases (all pass;
about 2.5 minutes on 2 busy cores).
"""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing
from moejax.layers import engines
from moejax.ops import ffn as ffn_lib
from moejax.sharding import expert_parallel as ep
from moejax.sharding import make_mesh
from moejax.sharding import ragged as ragged_lib

G, S, M, H, K = 8, 8, 8, 16, 2
TILE = 8
MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
NUM_EXPERTS = (4, 8, 16)
ACTIVATION = {"einsum": "relu", "indices": "swiglu", "dropless": "gelu"}
FULL_GRID = os.environ.get("MOEJAX_FULL_GRID") == "1"
# Compile with less optimisation: same numbers, about half the compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}
RTOL = ATOL = 2e-5


def _engine(name):
  """The engine object of a grid name (the dropless one with TILE)."""
  if name == "dropless":
    return engines.DroplessEngine(tile=TILE)
  return {"einsum": engines.EinsumEngine,
          "indices": engines.IndicesEngine}[name]()


def _inputs(e, gated):
  rng = np.random.default_rng(e)
  f = lambda *shape, scale=1.0: jnp.asarray(
      rng.normal(size=shape) * scale, jnp.float32)
  x = f(G, S, M)
  w_router = f(M, e)
  weights = ffn_lib.ExpertWeights(
      f(e, M, H, scale=0.3), f(e, H, M, scale=0.3),
      f(e, M, H, scale=0.3) if gated else None)
  return x, w_router, weights


def _loss_fn(engine, e, activation, layout=None, mode=None, mesh=None,
             collective="auto"):
  capacity = None if engine == "dropless" else routing.compute_capacity(
      S, e, k=K)
  engine = _engine(engine)

  def loss(x, w_router, weights):
    logits_GSE = jnp.einsum("GSM,ME->GSE", x, w_router)
    route = routing.token_choice
    if layout is not None:
      # Each device routes its own groups: logits_GSE is split over G.
      route = ep.group_local(route, layout, grouped=("logits_GSE",))
    plan = route(logits_GSE=logits_GSE, k=K, capacity=capacity)
    if mesh is None:
      y = engine(plan, x, weights, activation)
    else:
      y = ep.run_engine_ep(engine, plan, x, weights, activation, mesh=mesh,
                           mode=mode, collective=collective)
    return jnp.sum(y * jnp.cos(y)), y

  return loss


def _compile(fn, *args, grad=True):
  f = jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True) if grad else fn
  return jax.jit(f).lower(*args).compile(FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def _reference(engine, e):
  activation = ACTIVATION[engine]
  args = _inputs(e, activation == "swiglu")
  out = _compile(_loss_fn(engine, e, activation), *args)(*args)
  return args, jax.tree.map(np.asarray, out)


def _sharded(engine, e, axes, mode):
  return _sharded_cached(engine, e, tuple(axes.items()), mode)


@functools.lru_cache(maxsize=None)
def _sharded_cached(engine, e, axes, mode):
  activation = ACTIVATION[engine]
  mesh = make_mesh(axes)
  layout = ep.expert_layout(mesh, e)
  args, ref = _reference(engine, e)
  compiled = _compile(_loss_fn(engine, e, activation, layout, mode, mesh),
                      *args)
  return compiled, compiled(*args), ref


def _assert_close(got, ref):
  (loss, y), grads = got
  (ref_loss, ref_y), ref_grads = ref
  np.testing.assert_allclose(np.asarray(y), ref_y, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=RTOL,
                             atol=ATOL)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(g), r, rtol=RTOL, atol=ATOL)


def _default_grid(engines):
  """Every engine on every mesh, and with E below (8-way expert axis, E=4),
  equal to (4-way, E=4) and above the expert axis size; the dropless engine,
  whose bookkeeping is the most involved, gets two more E > X cases."""
  cases = []
  for i, engine in enumerate(engines):
    big = (8, 16) if i % 2 == 0 else (16, 8)
    cases += [(engine, (8, 1), big[0]), (engine, (4, 2), big[1]),
              (engine, (2, 4), 4), (engine, (1, 8), 4)]
  if "dropless" in engines:
    cases += [("dropless", (2, 4), 8), ("dropless", (1, 8), 16)]
  return cases


def _full(engines):
  return [(en, sh, e) for en in engines for sh in MESHES for e in NUM_EXPERTS]


SHARD_MAP_CASES = (_full if FULL_GRID else _default_grid)(
    ("einsum", "indices", "dropless"))
GSPMD_CASES = _full(("einsum", "indices")) if FULL_GRID else [
    ("einsum", (4, 2), 16), ("einsum", (1, 8), 4),
    ("indices", (2, 4), 8), ("indices", (1, 8), 16)]


@pytest.mark.parametrize("engine, shape, e", SHARD_MAP_CASES)
def test_shard_map_matches_single_device(engine, shape, e):
  _, got, ref = _sharded(engine, e, {"data": shape[0], "expert": shape[1]},
                         "shard_map")
  _assert_close(got, ref)


@pytest.mark.parametrize("engine, shape, e", GSPMD_CASES)
def test_gspmd_matches_single_device(engine, shape, e):
  _, got, ref = _sharded(engine, e, {"data": shape[0], "expert": shape[1]},
                         "gspmd")
  _assert_close(got, ref)


@pytest.mark.parametrize("engine, mode, e", [
    ("einsum", "gspmd", 8), ("indices", "shard_map", 4),
    ("dropless", "shard_map", 8)])
def test_tensor_parallel_hidden(engine, mode, e):
  """Expert x tensor parallel: H split over 'tensor', psum after w_out."""
  axes = {"data": 2, "expert": 2, "tensor": 2}
  _, got, ref = _sharded(engine, e, axes, mode)
  _assert_close(got, ref)


# --- compiled HLO ------------------------------------------------------------


_COLLECTIVE = re.compile(
    r"= (\([^=]*\)|\S+) (all-to-all|all-gather|all-reduce|"
    r"collective-permute)(-start)?\(")


def _collectives(hlo):
  """[(op, result shape text)] of the collectives in compiled HLO text."""
  return [(m.group(2), m.group(1)) for m in map(_COLLECTIVE.search,
                                                hlo.splitlines()) if m]


def _forward_hlo(engine, e, axes, mode):
  activation = ACTIVATION[engine]
  mesh = make_mesh(axes)
  args, _ = _reference(engine, e)
  fn = _loss_fn(engine, e, activation, ep.expert_layout(mesh, e), mode, mesh)
  return _compile(lambda *a: fn(*a)[1], *args, grad=False).as_text()


def _full_weight_gathered(ops, e):
  shapes = (f"f32[{e},{M},{H}]", f"f32[{e},{H},{M}]")
  return [(op, shape) for op, shape in ops
          if op == "all-gather" and any(s in shape for s in shapes)]


@pytest.mark.parametrize("engine, e, axes, mode", [
    ("einsum", 8, {"data": 2, "expert": 4}, "gspmd"),
    ("indices", 4, {"data": 1, "expert": 8}, "gspmd"),   # E < X
    ("indices", 16, {"data": 2, "expert": 4}, "shard_map"),
])
def test_hlo_all_to_all_for_dispatch_and_combine(engine, e, axes, mode):
  """The forward program moves tokens with exactly two all-to-alls (to the
  experts and back) and never all-gathers the expert weights; routing is
  local (no all-gather at all)."""
  ops = _collectives(_forward_hlo(engine, e, axes, mode))
  names = [op for op, _ in ops]
  assert names.count("all-to-all") == 2, ops
  assert "all-gather" not in names, ops


def test_hlo_backward_no_weight_all_gather():
  compiled, _, _ = _sharded("einsum", 16, {"data": 4, "expert": 2}, "gspmd")
  ops = _collectives(compiled.as_text())
  assert [op for op, _ in ops].count("all-to-all") >= 4, ops
  assert not _full_weight_gathered(ops, 16), ops


def test_hlo_dropless_padded_collectives():
  compiled, _, _ = _sharded("dropless", 8, {"data": 2, "expert": 4},
                            "shard_map")   # a grid case: compiled once
  ops = _collectives(compiled.as_text())
  assert "all-to-all" in [op for op, _ in ops]
  assert not _full_weight_gathered(ops, 8), ops


# --- layouts and errors ------------------------------------------------------


def test_layout_experts_per_device_and_replicas():
  mesh = make_mesh({"data": 2, "expert": 4})
  lay = ep.expert_layout(mesh, 16)
  assert (lay.expert_shards, lay.experts_per_shard, lay.replicas) == (4, 4, 1)
  assert lay.token_axes == ("data", "expert")
  lay = ep.expert_layout(mesh, 2)
  assert (lay.expert_shards, lay.experts_per_shard, lay.replicas) == (2, 1, 2)
  assert lay.token_axes == ("data", "expert_replica", "expert")
  # Same devices in the same order: only the view of 'expert' changes.
  assert list(lay.mesh.devices.flat) == list(mesh.devices.flat)
  assert dict(lay.mesh.shape) == {"data": 2, "expert_replica": 2,
                                  "expert": 2}


@pytest.mark.parametrize("e, axes, kwargs, match", [
    (6, {"data": 2, "expert": 4}, {}, "num_experts=6 does not fit"),
    (3, {"data": 1, "expert": 8}, {}, "does not fit the expert axis"),
    (8, {"data": 2, "expert": 2, "tensor": 2}, {"hidden_dim": 15},
     "not divisible by the tensor axis"),
    (8, {"data": 2, "expert": 4}, {"token_axes": ("data",)},
     "must include 'expert'"),
    (8, {"data": 2, "expert": 2, "tensor": 2},
     {"token_axes": ("data", "expert", "tensor")}, "must not include"),
    (8, {"data": 2, "expert": 4}, {"token_axes": ("fsdp",)},
     "not a mesh axis"),
])
def test_layout_errors(e, axes, kwargs, match):
  with pytest.raises(ValueError, match=match):
    ep.expert_layout(make_mesh(axes), e, **kwargs)


def test_explicit_axes_rejected():
  mesh = make_mesh({"data": 2, "expert": 4}, axis_types="explicit")
  with pytest.raises(ValueError, match="not AxisType.Auto"):
    ep.expert_layout(mesh, 8)


class _NoProtocol(engines.Engine):
  """A capacity engine without dispatch/combine (runs only unsharded)."""

  def __call__(self, plan, x_GSM, weights, activation):
    return x_GSM


class _NoTile(engines.Engine):
  """A dropless engine without tile / gmm_fn."""
  uses_capacity = False

  def __call__(self, plan, x_GSM, weights, activation):
    return x_GSM


def test_mode_errors():
  with pytest.raises(ValueError, match="DroplessEngine .* no GSPMD "
                     "expert-parallel path"):
    ep.check_engine_mode(engines.DroplessEngine(), "gspmd")
  with pytest.raises(ValueError, match="no GSPMD expert-parallel path"):
    ep.check_engine_mode(engines.PallasEngine(), "gspmd")
  with pytest.raises(ValueError, match="unknown expert_parallel mode 'pjit'"):
    ep.check_engine_mode(engines.EinsumEngine(), "pjit")
  with pytest.raises(ValueError, match="_NoProtocol has no expert-parallel "
                     "path: a capacity engine needs dispatch"):
    ep.check_engine_mode(_NoProtocol(), "shard_map")
  with pytest.raises(ValueError, match="_NoTile has no expert-parallel "
                     "path: a dropless engine needs `tile`"):
    ep.check_engine_mode(_NoTile(), "shard_map")
  for engine in (engines.EinsumEngine(), engines.IndicesEngine()):
    for mode in ep.EP_MODES:
      ep.check_engine_mode(engine, mode)
  ep.check_engine_mode(engines.DroplessEngine(), "shard_map")


def test_expert_parallel_errors():
  mesh = make_mesh({"data": 2, "expert": 4})
  with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh, "
                     "got NoneType"):
    ep.ExpertParallel(None)
  with pytest.raises(ValueError, match="unknown expert_parallel mode 'pjit'"):
    ep.ExpertParallel(mesh, "pjit")
  with pytest.raises(ValueError, match="unknown dropless collective"):
    ep.ExpertParallel(mesh, collective="nccl")
  with pytest.raises(ValueError, match="not implemented by XLA on 'cpu'"):
    ep.ExpertParallel(mesh, collective="ragged")
  par = ep.ExpertParallel(mesh, "gspmd", token_axes=["data", "expert"])
  assert par.token_axes == ("data", "expert")
  assert hash(par) == hash(ep.ExpertParallel(mesh, "gspmd",
                                             ("data", "expert")))
  with pytest.raises(ValueError, match="no GSPMD expert-parallel path"):
    par.check(num_experts=8, hidden_dim=H, engine=engines.DroplessEngine())
  with pytest.raises(ValueError, match="num_experts=6 does not fit"):
    par.check(num_experts=6, hidden_dim=H, engine=engines.EinsumEngine())
  par.check(num_experts=8, hidden_dim=H, engine=engines.EinsumEngine())


def test_group_local_splits_only_the_named_arguments():
  mesh = make_mesh({"data": 2, "expert": 4})
  layout = ep.expert_layout(mesh, 8)
  x, w_router, _ = _inputs(8, False)
  logits_GSE = jnp.einsum("GSM,ME->GSE", x, w_router)
  mask_GS = jnp.asarray(np.random.default_rng(0).random((G, S)) > 0.3)
  want = routing.token_choice(logits_GSE, k=K, capacity=3,
                              padding_mask_GS=mask_GS)
  route = ep.group_local(routing.token_choice, layout,
                         grouped=("logits_GSE", "padding_mask_GS"))
  got = jax.jit(lambda l, m: route(logits_GSE=l, padding_mask_GS=m, k=K,
                                   capacity=3))(logits_GSE, mask_GS)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="6 token groups do not split evenly"):
    route(logits_GSE=logits_GSE[:6], k=K, capacity=3)
  with pytest.raises(TypeError):   # keyword arguments only
    route(logits_GSE, k=K, capacity=3)


def test_groups_must_split_evenly():
  mesh = make_mesh({"data": 2, "expert": 4})
  x, w_router, weights = _inputs(8, False)

  def f(x):
    plan = routing.token_choice(jnp.einsum("GSM,ME->GSE", x, w_router),
                                k=K, capacity=4)
    return ep.run_engine_ep(engines.EinsumEngine(), plan, x, weights, "relu",
                            mesh=mesh)

  with pytest.raises(ValueError, match="6 token groups do not split evenly"):
    jax.eval_shape(f, x[:6])


def test_collective_choice():
  assert ragged_lib.resolve_collective("auto", "cpu") == "padded"
  assert ragged_lib.resolve_collective("auto", "gpu") == "ragged"
  assert ragged_lib.resolve_collective("auto", "tpu") == "ragged"
  with pytest.raises(ValueError, match="not implemented by XLA on 'cpu'"):
    ragged_lib.resolve_collective("ragged", "cpu")
  with pytest.raises(ValueError, match="unknown dropless collective"):
    ragged_lib.resolve_collective("nccl", "gpu")


# --- the padded ragged_all_to_all against the documented semantics ---------


def _ragged_reference(operands, outputs, in_off, send, out_off, recv):
  """numpy ragged_all_to_all over X devices (jax.lax docstring pseudo-code)."""
  x = len(operands)
  q = len(send[0]) // x
  results = [o.copy() for o in outputs]
  for src in range(x):
    for i in range(x * q):
      dst = i // q
      rows = operands[src][in_off[src][i]:in_off[src][i] + send[src][i]]
      # The receiver's slice index for (src, i % q):
      j = src * q + i % q
      assert recv[dst][j] == send[src][i]
      results[dst][out_off[src][i]:out_off[src][i] + len(rows)] = rows
  return results


@pytest.mark.parametrize("slices_per_peer", [1, 2])
def test_padded_ragged_all_to_all_matches_semantics(slices_per_peer):
  x, q, n, r, d = 4, slices_per_peer, 10, 24, 3
  rng = np.random.default_rng(slices_per_peer)
  # Random send sizes per (src, dst, slice) that fit in n rows per source.
  send = np.zeros((x, x * q), np.int32)
  for src in range(x):
    cuts = np.sort(rng.integers(0, n + 1, size=x * q))
    send[src] = np.diff(np.concatenate([[0], cuts]))
  in_off = np.cumsum(send, axis=1) - send
  # recv[dst][src*q + s] = send[src][dst*q + s]; receivers pack slices
  # from different sources in reverse source order (any layout works).
  recv = np.zeros_like(send)
  out_off = np.zeros_like(send)
  for dst in range(x):
    pos = 0
    for src in reversed(range(x)):
      for s in range(q):
        size = send[src][dst * q + s]
        recv[dst][src * q + s] = size
        out_off[src][dst * q + s] = pos
        pos += size
    assert pos <= r
  operands = rng.normal(size=(x, n, d)).astype(np.float32)
  outputs = np.full((x, r, d), -1.0, np.float32)
  expect = np.stack(_ragged_reference(list(operands), list(outputs), in_off,
                                      send, out_off, recv))
  mesh = make_mesh({"expert": 4, "data": 2})

  def body(op, out, a, b, c, e):
    return ragged_lib.padded_ragged_all_to_all(
        op[0], out[0], a[0], b[0], c[0], e[0], axis_name="expert",
        axis_size=x)[None]

  spec = jax.sharding.PartitionSpec("expert")
  got = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 6,
                              out_specs=spec))(
      operands, outputs, in_off, send, out_off, recv)
  np.testing.assert_array_equal(np.asarray(got), expect)


@pytest.mark.gpu
@pytest.mark.skipif(not ragged_lib.backend_has_ragged_all_to_all(
    jax.default_backend()), reason="XLA:CPU has no ragged_all_to_all")
def test_ragged_equals_padded_on_accelerators():  # pragma: no cover (GPU/TPU)
  n_dev = len(jax.devices())
  e = 2 * n_dev
  mesh = make_mesh({"expert": n_dev})
  args, _ = _reference("dropless", e) if G % n_dev == 0 else pytest.skip(
      "groups do not split over the devices")
  outs = []
  for collective in ("ragged", "padded"):
    fn = _loss_fn("dropless", e, "gelu", ep.expert_layout(mesh, e),
                  "shard_map", mesh, collective)
    outs.append(jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2),
                                           has_aux=True))(*args))
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-5)
