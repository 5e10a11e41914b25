"""Sparse upcycling and Drop-Upcycling (moejax.models.upcycle)."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import models
from moejax.layers import ffn as ffn_lib
from moejax.models import upcycling as upcycle_lib

# A tiny LM: V=13, M=8, 2 layers, 2 heads, dense width H=16, L=6, B=2.
V, M, LAYERS, HEADS, H, L, B = 13, 8, 2, 2, 16, 6, 2
E = 4


def _moe(engine="dropless", renormalize=True, k=2, **fields):
  config = {"router": {"name": "token_choice", "k": k,
                       "renormalize": renormalize},
            "engine": {"name": engine}, "experts": {"num_experts": E}}
  config.update(fields)
  return config


def _dense(activation="swiglu", seed=0):
  return models.DecoderLM(V, M, LAYERS, HEADS, H, moe_every=0,
                          activation=activation, rngs=nnx.Rngs(seed))


def _tokens():
  return jax.random.randint(jax.random.key(1), (B, L), 0, V)  # [B, L]


@pytest.mark.parametrize("engine,fields", [
    ("dropless", {}),
    # Capacity to spare: C = S * k * 4 / E >= S, so nothing is dropped.
    ("indices", {"capacity_factor": 4.0}),
    ("einsum", {"capacity_factor": 4.0}),
])
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_upcycled_model_equals_dense_at_step_0(engine, fields, activation):
  # Renormalised top-2 over 4 copies of one FFN: weights sum to 1 per token.
  dense = _dense(activation)
  moe = upcycle_lib.upcycle(dense, moe=_moe(engine, **fields),
                            rngs=nnx.Rngs(7))
  tokens_BL = _tokens()
  want_BLV, _ = dense(tokens_BL)
  got_BLV, aux = moe(tokens_BL)
  np.testing.assert_allclose(got_BLV, want_BLV, rtol=1e-5, atol=1e-5)
  assert moe.moe_layers == (0, 1)
  assert aux.metrics.expert_load_E.shape == (LAYERS, E)
  # The dense model is left as it was.
  assert dense.moe_layers == ()
  assert isinstance(dense.blocks[0].ffn, ffn_lib.DenseFFN)


def test_without_renormalisation_the_outputs_differ():
  # Softmax top-2 weights sum to < 1: a check that the test above can fail.
  dense = _dense()
  moe = upcycle_lib.upcycle(dense, moe=_moe(renormalize=False),
                            rngs=nnx.Rngs(7))
  tokens_BL = _tokens()
  assert not np.allclose(moe(tokens_BL)[0], dense(tokens_BL)[0], atol=1e-3)


def test_experts_are_copies_and_the_rest_is_copied():
  dense = _dense()
  moe = upcycle_lib.upcycle(dense, moe=_moe(), layers=[1], rngs=nnx.Rngs(7))
  experts = moe.blocks[1].experts if hasattr(moe.blocks[1], "experts") else (
      moe.blocks[1].ffn.experts)
  for e in range(E):
    np.testing.assert_array_equal(experts.w_in_EMH[...][e],
                                  dense.blocks[1].ffn.w_in_MH[...])
    np.testing.assert_array_equal(experts.w_out_EHM[...][e],
                                  dense.blocks[1].ffn.w_out_HM[...])
  # Block 0 stays dense; attention and embeddings are copied bitwise.
  assert moe.moe_layers == (1,)
  np.testing.assert_array_equal(moe.blocks[0].ffn.w_in_MH[...],
                                dense.blocks[0].ffn.w_in_MH[...])
  np.testing.assert_array_equal(moe.embed_VM[...], dense.embed_VM[...])


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_drop_upcycling_reinitialises_the_same_units_in_each_matrix(ratio):
  dense = _dense()
  moe = upcycle_lib.upcycle(dense, moe=_moe(), drop_ratio=ratio, seed=3,
                            rngs=nnx.Rngs(7))
  ffn = moe.blocks[0].ffn
  src = dense.blocks[0].ffn
  # Changed hidden units per expert, read from each matrix:
  # w_in/w_gate [E, M, H] changed on columns, w_out [E, H, M] on rows.
  changed_in_EH = np.asarray(np.any(ffn.experts.w_in_EMH[...] != src.w_in_MH[...], 1))
  changed_gate_EH = np.any(ffn.experts.w_gate_EMH[...] != src.w_gate_MH[...],
                           1)
  changed_out_EH = np.any(ffn.experts.w_out_EHM[...] != src.w_out_HM[...], 2)
  np.testing.assert_array_equal(changed_in_EH, changed_gate_EH)
  np.testing.assert_array_equal(changed_in_EH, changed_out_EH)
  assert changed_in_EH.shape == (E, H)
  # Exactly round(r * H) units per expert.
  np.testing.assert_array_equal(changed_in_EH.sum(1), [round(ratio * H)] * E)
  if ratio < 1.0:
    # A different draw per expert.
    assert len({tuple(row) for row in changed_in_EH}) > 1
  # Fresh values follow the dense matrix's statistics (loosely: 8 x 16 draws).
  fresh = np.asarray(ffn.experts.w_in_EMH[...])[
      np.broadcast_to(changed_in_EH[:, None, :], (E, M, H))]
  w = np.asarray(src.w_in_MH[...])
  assert abs(fresh.mean() - w.mean()) < 3 * w.std() / np.sqrt(fresh.size) + 0.05
  assert 0.7 < fresh.std() / w.std() < 1.3


def test_drop_upcycling_is_seeded():
  dense = _dense()
  a = upcycle_lib.upcycle(dense, moe=_moe(), drop_ratio=0.5, seed=3,
                          rngs=nnx.Rngs(7))
  b = upcycle_lib.upcycle(dense, moe=_moe(), drop_ratio=0.5, seed=3,
                          rngs=nnx.Rngs(7))
  np.testing.assert_array_equal(a.blocks[0].ffn.experts.w_in_EMH[...],
                                b.blocks[0].ffn.experts.w_in_EMH[...])


def test_upcycle_params_fills_a_model_built_from_its_config():
  # The trainer's path: the MoE model is built from the config, then filled.
  dense = _dense()
  moe = models.DecoderLM(V, M, LAYERS, HEADS, H, moe_every=1,
                         activation="swiglu", moe=_moe(),
                         rngs=nnx.Rngs(11))
  report = upcycle_lib.upcycle_params(moe, dense)
  assert sorted(report["initialised"]) == [
      "blocks/0/ffn/router/w_router_ME", "blocks/1/ffn/router/w_router_ME"]
  assert "blocks/0/ffn/experts/w_gate_EMH" in report["broadcast"]
  tokens_BL = _tokens()
  np.testing.assert_allclose(moe(tokens_BL)[0], dense(tokens_BL)[0],
                             rtol=1e-5, atol=1e-5)


def test_layer_stacked_tensors_take_the_expert_axis_after_the_layer_axis():
  # A scanned model stores [Y, E, M, H] for a dense [Y, M, H].
  class Stacked(nnx.Module):
    def __init__(self, num_experts):
      shape = (3, 4, 5) if num_experts is None else (3, num_experts, 4, 5)
      self.value = nnx.Param(jnp.arange(np.prod(shape), dtype=jnp.float32)
                             .reshape(shape))

  class Dense(nnx.Module):
    def __init__(self):
      self.ffn = nnx.Dict(w_in_MH=nnx.Param(
          jnp.arange(60, dtype=jnp.float32).reshape(3, 4, 5)))  # [Y, M, H]

  class Moe(nnx.Module):
    def __init__(self):
      self.ffn = nnx.Dict(experts=nnx.Dict(w_in_EMH=nnx.Param(
          jnp.zeros((3, 2, 4, 5)))))  # [Y, E, M, H]

  dense, moe = Dense(), Moe()
  upcycle_lib.upcycle_params(moe, dense)
  got = moe.ffn["experts"]["w_in_EMH"][...]
  for e in range(2):
    np.testing.assert_array_equal(got[:, e], dense.ffn["w_in_MH"][...])


def test_errors_name_the_bad_value():
  dense = _dense()
  with pytest.raises(ValueError, match=r"drop_ratio must be a number in "
                     r"\[0, 1\], got 1.5"):
    upcycle_lib.upcycle(dense, moe=_moe(), drop_ratio=1.5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"layers \[5\]: blocks \[5\] have no "
                     r"dense FFN to upcycle; allowed: \[0, 1\]"):
    upcycle_lib.upcycle(dense, moe=_moe(), layers=[5], rngs=nnx.Rngs(0))
  # Experts narrower than the dense FFN cannot hold a copy of it.
  narrow = models.DecoderLM(V, M, LAYERS, HEADS, H, moe_every=1,
                            activation="swiglu",
                            moe=_moe(experts={"num_experts": E,
                                              "hidden_dim": 8}),
                            rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"blocks/0/ffn/experts/w_gate_EMH: "
                     r"dense blocks/0/ffn/w_gate_MH \(8, 16\) broadcast to \(4, 8, 16\), but "
                     r"the expert tensor is \(4, 8, 8\)"):
    upcycle_lib.upcycle_params(narrow, dense)
  # A dense model with parts the MoE model lacks (untied unembedding).
  untied = models.DecoderLM(V, M, LAYERS, HEADS, H, moe_every=0,
                            activation="swiglu", tie_embeddings=False,
                            rngs=nnx.Rngs(0))
  moe = models.DecoderLM(V, M, LAYERS, HEADS, H, moe_every=1,
                         activation="swiglu", moe=_moe(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="dense parameters with no place in "
                     "the MoE model: \\['w_unembed_MV'\\]"):
    upcycle_lib.upcycle_params(moe, untied)


@pytest.mark.parametrize("name", ["qwen3", "llama"])
def test_a_pretrained_dense_checkpoint_upcycles_to_its_own_outputs(name):
  # Tiny dense Qwen3 / Llama written by transformers (tests/models/fixtures):
  # every SwiGLU FFN becomes 4 experts, renormalised top-2, dropless.
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), "fixtures", name)
  dense = models.from_pretrained(path)
  d = np.load(os.path.join(path, "inputs.npz"))
  moe = upcycle_lib.upcycle(dense, moe=_moe(), rngs=nnx.Rngs(1))
  assert moe.moe_layers == (0, 1) and dense.moe_layers == ()
  mask_BL = d["mask_BL"]
  want_BLV = dense(d["ids_BL"], padding_mask_BL=mask_BL)[0]
  got_BLV, aux = moe(d["ids_BL"], padding_mask_BL=mask_BL)
  np.testing.assert_allclose(np.asarray(got_BLV)[mask_BL],
                             np.asarray(want_BLV)[mask_BL], atol=2e-5)
  assert aux.metrics.expert_load_E.shape == (2, E)
