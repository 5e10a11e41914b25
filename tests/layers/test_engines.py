"""Every engine against the slow per-token reference: outputs and gradients."""

import functools

from flax import nnx
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import layers as L
from moejax import routing
from moejax.layers import build as build_lib
from moejax.layers import reference
from moejax.ops import ffn as ffn_lib
from moejax.ops import gather as gather_lib
from moejax.ops import gmm as gmm_lib

G, S, M, H, E = 2, 8, 4, 6, 4


def _engine(name, tile=4):
  """The engine object of a short name; the dropless one with `tile`."""
  if name == "dropless":
    return L.DroplessEngine(tile=tile)
  return {"einsum": L.EinsumEngine, "indices": L.IndicesEngine}[name]()


def _params(key, activation, e=E, m=M, h=H):
  ks = jax.random.split(key, 5)
  w = ffn_lib.ExpertWeights(
      jax.random.normal(ks[0], (e, m, h)) / np.sqrt(m),
      jax.random.normal(ks[1], (e, h, m)) / np.sqrt(h),
      (jax.random.normal(ks[2], (e, m, h)) / np.sqrt(m)
       if activation in ("swiglu", "geglu") else None))
  x = jax.random.normal(ks[3], (G, S, m))
  w_router = jax.random.normal(ks[4], (m, e))
  return x, w, w_router


def _route(router, x, w_router, *, k, capacity):
  logits = jnp.einsum("GSM,ME->GSE", x.astype(jnp.float32), w_router)
  if router == "expert_choice":
    return routing.expert_choice(logits, capacity=capacity)
  return routing.token_choice(logits, k=k, capacity=capacity)


def _loss_fn(engine, router, activation, k, capacity, use_reference):
  def loss(x, w, w_router):
    plan = _route(router, x, w_router, k=k, capacity=capacity)
    if use_reference:
      y = reference.reference_moe(plan, x, w, activation)
    else:
      y = _engine(engine)(plan, x, w, activation)
    # A non-linear read-out so every output element has its own cotangent.
    return jnp.sum(jnp.sin(y.astype(jnp.float32)) * jnp.arange(M)), y
  return loss


CASES = [
    ("einsum", "token_choice", 1, 2), ("einsum", "token_choice", 2, 3),
    ("indices", "token_choice", 1, 2), ("indices", "token_choice", 2, 3),
    ("indices", "token_choice", 3, 4), ("dropless", "token_choice", 2, None),
    ("einsum", "expert_choice", 1, 3), ("indices", "expert_choice", 1, 3),
]


@pytest.mark.parametrize("engine,router,k,capacity,activation", [
    case + (act,) for case in CASES for act in ("relu", "swiglu")] + [
        ("indices", "token_choice", 2, 3, "gelu"),
        ("dropless", "token_choice", 2, None, "geglu")])
def test_engine_matches_reference_f32(engine, router, k, capacity, activation):
  x, w, w_router = _params(jax.random.key(0), activation)
  fast = jax.jit(jax.value_and_grad(
      _loss_fn(engine, router, activation, k, capacity, False),
      argnums=(0, 1, 2), has_aux=True))
  slow = jax.jit(jax.value_and_grad(
      _loss_fn(engine, router, activation, k, capacity, True),
      argnums=(0, 1, 2), has_aux=True))
  (_, y), grads = fast(x, w, w_router)
  (_, y_ref), grads_ref = slow(x, w, w_router)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  if capacity is not None and router == "token_choice":
    # The case must exercise drops, or the capacity path is untested.
    plan = _route(router, x, w_router, k=k, capacity=capacity)
    assert not bool(jnp.all(plan.kept_GSK())), "no assignment dropped"


@pytest.mark.parametrize("engine", ["einsum", "indices", "dropless"])
def test_engine_matches_reference_bf16(engine):
  x, w, w_router = _params(jax.random.key(1), "swiglu")
  cap = None if engine == "dropless" else 3
  plan = _route("token_choice", x, w_router, k=2, capacity=cap)
  cast = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)
  y = jax.jit(functools.partial(_engine(engine), activation="swiglu"))(
      plan, cast(x), weights=cast(w))
  assert y.dtype == jnp.bfloat16
  y_ref = reference.reference_moe(plan, x, w, "swiglu")
  np.testing.assert_allclose(y.astype(jnp.float32), y_ref, atol=5e-2,
                             rtol=5e-2)


def test_one_expert_equals_dense_ffn():
  x, w, w_router = _params(jax.random.key(2), "relu", e=1)
  plan = _route("token_choice", x, w_router, k=1, capacity=S)
  for engine in ("einsum", "indices", "dropless"):
    y = _engine(engine)(plan, x, w, "relu")
    dense = reference.reference_dense_ffn(x.reshape(-1, M), w.w_in_EMH[0],
                                          w.w_out_EHM[0]).reshape(x.shape)
    # One expert, softmax over one logit: weight exactly 1.
    np.testing.assert_allclose(y, dense, atol=1e-5, rtol=1e-5)


@hypothesis.settings(max_examples=10)
@hypothesis.given(seed=st.integers(0, 2**16), k=st.integers(1, 3),
                  cap=st.integers(1, 5))
def test_dropped_assignments_contribute_zero(seed, k, cap):
  x, w, w_router = _params(jax.random.key(seed), "relu")
  plan = _route("token_choice", x, w_router, k=k, capacity=cap)
  engine = L.IndicesEngine()
  y = engine(plan, x, w, "relu")
  # Zeroing the weights of dropped assignments changes nothing...
  kept = plan.kept_GSK()
  y2 = engine(plan.replace(
      weight_GSK=jnp.where(kept, plan.weight_GSK, 0.0)), x, w, "relu")
  np.testing.assert_allclose(y, y2, atol=1e-6)
  # ...and a token with every assignment dropped gets exactly zero output.
  none_kept = ~np.asarray(kept).any(-1)
  assert np.all(np.asarray(y)[none_kept] == 0)


@hypothesis.settings(max_examples=8)
@hypothesis.given(seed=st.integers(0, 2**16), k=st.integers(1, 3),
                  tile=st.sampled_from([1, 3, 4, 16]))
def test_dropless_equals_capacity_when_capacity_covers_worst_case(seed, k,
                                                                  tile):
  x, w, w_router = _params(jax.random.key(seed), "gelu")
  logits = jnp.einsum("GSM,ME->GSE", x, w_router)
  full = routing.token_choice(logits, k=k, capacity=S)  # worst case: C = S
  dropless = routing.token_choice(logits, k=k, capacity=None)
  assert bool(jnp.all(full.kept_GSK()))
  y_cap = L.IndicesEngine()(full, x, w, "gelu")
  y_drop = L.DroplessEngine(tile=tile)(dropless, x, w, "gelu")
  np.testing.assert_allclose(y_cap, y_drop, atol=1e-5, rtol=1e-5)


def test_dropless_ragged_dot_impl_matches_scan():
  x, w, w_router = _params(jax.random.key(3), "relu")
  plan = _route("token_choice", x, w_router, k=2, capacity=None)
  a = L.DroplessEngine(tile=4)(plan, x, w, "relu")
  b = L.DroplessEngine(tile=4, gmm="ragged_dot")(plan, x, w, "relu")
  np.testing.assert_allclose(a, b, atol=1e-5)
  # A gmm callable is used as given (here the same ragged_dot).
  c = L.DroplessEngine(tile=4, gmm=gmm_lib.ragged_dot_gmm)(plan, x, w, "relu")
  np.testing.assert_allclose(c, b, atol=1e-6)


@hypothesis.settings(max_examples=10)
@hypothesis.given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=5),
                  tile=st.sampled_from([1, 2, 4]))
def test_gmm_matches_per_group_matmul(sizes, tile):
  # Groups (including empty ones) padded to the tile, as the engine lays out.
  padded = [-(-n // tile) * tile for n in sizes]
  r = max(tile, -(-sum(padded) // tile) * tile + tile)
  e = len(sizes)
  rng = np.random.default_rng(sum(sizes))
  lhs = np.zeros((r, 3), np.float32)
  rhs = rng.normal(size=(e, 3, 5)).astype(np.float32)
  want = np.zeros((r, 5), np.float32)
  start = 0
  for g, (n, p) in enumerate(zip(sizes, padded)):
    lhs[start:start + n] = rng.normal(size=(n, 3))
    want[start:start + n] = lhs[start:start + n] @ rhs[g]
    start += p
  gs = jnp.asarray(padded, jnp.int32)
  out = gmm_lib.gmm(jnp.asarray(lhs), jnp.asarray(rhs), gs, tile=tile)
  np.testing.assert_allclose(out, want, atol=1e-5)
  # Gradients against the same computation written densely per group.
  def dense(lhs, rhs):
    rows = []
    start = 0
    for g, p in enumerate(padded):
      rows.append(lhs[start:start + p] @ rhs[g])
      start += p
    rows.append(jnp.zeros((r - start, 5)))
    return jnp.concatenate(rows)
  ct = jnp.asarray(rng.normal(size=(r, 5)), jnp.float32)
  g1 = jax.grad(lambda a, b: jnp.sum(gmm_lib.gmm(a, b, gs, tile=tile) * ct),
                argnums=(0, 1))(jnp.asarray(lhs), jnp.asarray(rhs))
  g2 = jax.grad(lambda a, b: jnp.sum(dense(a, b) * ct), argnums=(0, 1))(
      jnp.asarray(lhs), jnp.asarray(rhs))
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_gather_rows_backward_is_the_adjoint():
  # out[i] = table[idx[i]]; inv lists, per row, where it was read.
  table = jnp.arange(12.0).reshape(4, 3)
  idx = jnp.array([2, 0, 4, 2], jnp.int32)          # 4 = N: a zero row
  inv = jnp.array([[1, 4], [4, 4], [0, 3], [4, 4]], jnp.int32)  # 4 = I: unused
  out = gather_lib.gather_rows(table, idx, inv)
  np.testing.assert_array_equal(out[2], 0)
  ct = jnp.arange(12.0).reshape(4, 3) + 1
  g = jax.grad(lambda t: jnp.sum(gather_lib.gather_rows(t, idx, inv) * ct))(
      table)
  want = jax.grad(lambda t: jnp.sum(
      jnp.take(t, idx, axis=0, mode="fill", fill_value=0) * ct))(table)
  np.testing.assert_array_equal(g, want)


def test_combine_rows_backward_matches_autodiff():
  # 3 tokens, k = 2, 4 expert rows (X = 4); the second choices of tokens 1
  # and 2 were dropped (row X). assignment is the inverse map: row x ->
  # assignment n*K + j.
  out = jnp.arange(12.0).reshape(4, 3) - 5.0
  weight = jnp.array([[0.5, 0.25], [1.0, 0.75], [0.3, 0.7]])
  row = jnp.array([[0, 3], [1, 4], [2, 4]], jnp.int32)
  assignment = jnp.array([0, 2, 4, 1], jnp.int32)
  ct = jnp.array([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0], [0.25, 2.0, 1.5]])

  def fast(o, w):
    return jnp.sum(gather_lib.combine_rows(o, w, row, assignment) * ct)

  def slow(o, w):
    picked = jnp.take(o, row, axis=0, mode="fill", fill_value=0)  # [N,K,M]
    return jnp.sum(jnp.einsum("NK,NKM->NM", w, picked) * ct)

  np.testing.assert_allclose(fast(out, weight), slow(out, weight), rtol=1e-6)
  g_fast = jax.grad(fast, argnums=(0, 1))(out, weight)
  g_slow = jax.grad(slow, argnums=(0, 1))(out, weight)
  for a, b in zip(g_fast, g_slow):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # Dropped choices get no gradient.
  assert float(g_fast[1][1, 1]) == 0.0 and float(g_fast[1][2, 1]) == 0.0


def test_engine_errors():
  x, w, w_router = _params(jax.random.key(0), "relu")
  plan = _route("token_choice", x, w_router, k=1, capacity=None)
  # Engine names live in the one registry (build_moe configs).
  with pytest.raises(ValueError, match="unknown engine 'fast'"):
    build_lib.resolve("fast", build_lib.ENGINES, "engine")
  with pytest.raises(ValueError, match="needs a capacity plan"):
    L.IndicesEngine()(plan, x, w, "relu")
  with pytest.raises(ValueError, match="needs a capacity plan"):
    L.EinsumEngine()(plan, x, w, "relu")
  ec = _route("expert_choice", x, w_router, k=1, capacity=2)
  with pytest.raises(ValueError, match="token-choice plan"):
    L.DroplessEngine(tile=4)(ec, x, w, "relu")
  # The dropless engines refuse a router without a token view up front.
  router = L.ExpertChoiceRouter(M, E, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="DroplessEngine needs a router"):
    L.DroplessEngine().check_router(router)
  L.IndicesEngine().check_router(router)   # capacity engines take any
  with pytest.raises(ValueError, match="tile must be an integer >= 1"):
    L.DroplessEngine(tile=0)
  with pytest.raises(ValueError, match="unknown gmm 'fast'"):
    L.DroplessEngine(gmm="fast")
  with pytest.raises(ValueError, match="multiple of tile"):
    gmm_lib.gmm(jnp.zeros((5, 2)), jnp.zeros((1, 2, 2)),
                jnp.array([4]), tile=4)
