"""Attention experts: MoA and SwitchHead (moejax/layers/attention_experts.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import layers as L
from moejax import models
from moejax.layers import attention_experts as ae

M = 8


def test_moa_hand_case_one_token():
  # (B=1, L=1, M=1, E=2, D=1, k=1): one token attends only itself, so the
  # head output is v = x W_v; the gate picks expert 1 (logit 1 > 0), weight
  # renormalised to 1: y = v * W_o_1 = 2 * 3 * 5 = 30.
  moa = ae.MoAAttention(1, num_experts=2, k=1, head_dim=1,
                        rope_max_wavelength=None, rngs=nnx.Rngs(0))
  moa.w_gate_ME[...] = jnp.array([[0.0, 1.0]])
  moa.w_v_MD[...] = jnp.array([[3.0]])
  moa.w_o_EDM[...] = jnp.array([[[7.0]], [[5.0]]])
  np.testing.assert_allclose(moa(jnp.array([[[2.0]]]))[0, 0, 0], 30.0,
                             rtol=1e-6)


def test_switchhead_hand_case_one_token():
  # (B=1, L=1, M=1, N=1, E=2, D=1, k=1): gates sigmoid(x w): value gate
  # logits (0, 1 * x=1) -> expert 1, s = sigmoid(1); output gate logits
  # (2, 0) -> expert 0, s' = sigmoid(2).
  sh = ae.SwitchHeadAttention(1, num_heads=1, num_experts=2, k=1, head_dim=1,
                              rope_max_wavelength=None, rngs=nnx.Rngs(0))
  sh.w_sv_MNE[...] = jnp.array([[[0.0, 1.0]]])
  sh.w_so_MNE[...] = jnp.array([[[2.0, 0.0]]])
  sh.w_v_NEMD[...] = jnp.array([[[[4.0]], [[3.0]]]])
  sh.w_o_NEDM[...] = jnp.array([[[[5.0]], [[9.0]]]])
  sig = lambda z: 1 / (1 + np.exp(-z))
  want = 1.0 * 3.0 * sig(1.0) * 5.0 * sig(2.0)
  np.testing.assert_allclose(sh(jnp.array([[[1.0]]]))[0, 0, 0], want,
                             rtol=1e-5)


def test_moa_one_expert_is_single_head_attention():
  moa = ae.MoAAttention(M, num_experts=1, k=1, head_dim=4, rngs=nnx.Rngs(0))
  mha = L.MultiHeadAttention(M, 1, head_dim=4, rngs=nnx.Rngs(1))
  mha.w_q_MND[...] = moa.w_q_EMD[...][0][:, None]
  mha.w_k_MND[...] = moa.w_k_MD[...][:, None]
  mha.w_v_MND[...] = moa.w_v_MD[...][:, None]
  mha.w_o_NDM[...] = moa.w_o_EDM[...]
  x = jax.random.normal(jax.random.key(0), (2, 6, M))
  np.testing.assert_allclose(moa(x), mha(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: ae.MoAAttention(M, num_experts=4, k=2, head_dim=4,
                            rngs=nnx.Rngs(0)),
    lambda: ae.SwitchHeadAttention(M, num_heads=2, num_experts=3, k=2,
                                   head_dim=4, rngs=nnx.Rngs(0))],
    ids=["moa", "switchhead"])
def test_causal_and_unselected_experts_do_nothing(make):
  attn = make()
  x = jax.random.normal(jax.random.key(1), (1, 6, M))
  y = attn(x)
  jac = jax.jacobian(attn)(x)
  dep = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 5))
  assert np.all(np.triu(dep, 1) == 0)
  # Gradients reach only experts some token picked: zero for the rest.
  if isinstance(attn, ae.MoAAttention):
    g = attn.gates(x)
    unused = np.asarray(jnp.sum(g, (0, 1)) == 0)
    grad = nnx.grad(lambda a: jnp.sum(a(x) ** 2))(attn)
    o = np.abs(np.asarray(grad["w_o_EDM"][...])).sum((1, 2))
    assert np.all(o[unused] == 0) and np.all(o[~unused] > 0)
  assert y.shape == x.shape


@pytest.mark.parametrize("wrappers", [
    {"moa": {"num_experts": 4, "k": 2}},
    {"switchhead": {"num_experts": 3, "k": 2}}], ids=lambda w: list(w)[0])
def test_in_a_decoder_from_config(wrappers):
  model = models.DecoderLM(32, M, 2, 2, 16, wrappers=wrappers,
                           rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 32)
  logits, _ = model(tokens)
  assert logits.shape == (2, 6, 32)
  assert type(model.blocks[0].attention).__name__ in (
      "MoAAttention", "SwitchHeadAttention")
  with pytest.raises(L.MoEConfigError, match="model.wrappers"):
    models.DecoderLM(32, M, 2, 2, 16, wrappers={list(wrappers)[0]: {"kk": 1}},
                     rngs=nnx.Rngs(0))


def test_moa_kv_heads_and_output_bias_hand_case():
  # (B=1, L=2, M=1, E=1, k=1, K=2 kv heads, D=1, no RoPE), x = (1, 2),
  # w_q_EMKD [1, 1, 2, 1] = (0, 1), w_k_MKD [1, 2, 1] = (0, 1),
  # w_v_MKD = (3, 4), w_o_EKDM [1, 2, 1, 1] = (1, 10), b_out_M = 0.25.
  # Head 0: logits 0, uniform over the causal keys: v_0 = (3, 6) -> (3, 4.5).
  # Head 1: token 1's q = 2, keys (1, 2): logits (2, 4), v_1 = (4, 8) ->
  # token 0: 4, token 1: 4 + 4 s, s = e^2 / (1 + e^2) = softmax(2, 4)[1].
  moa = ae.MoAAttention(1, num_experts=1, k=1, head_dim=1, num_kv_heads=2,
                        output_bias=True, rope_max_wavelength=None,
                        rngs=nnx.Rngs(0))
  moa.w_q_EMKD[...] = jnp.array([0.0, 1.0]).reshape(1, 1, 2, 1)
  moa.w_k_MKD[...] = jnp.array([0.0, 1.0]).reshape(1, 2, 1)
  moa.w_v_MKD[...] = jnp.array([3.0, 4.0]).reshape(1, 2, 1)
  moa.w_o_EKDM[...] = jnp.array([1.0, 10.0]).reshape(1, 2, 1, 1)
  moa.b_out_M[...] = jnp.array([0.25])
  s = np.exp(2.0) / (1 + np.exp(2.0))
  want = [3 + 10 * 4 + 0.25, 4.5 + 10 * (4 + 4 * s) + 0.25]
  np.testing.assert_allclose(moa(jnp.array([[[1.0], [2.0]]]))[0, :, 0], want,
                             rtol=1e-6)
  assert moa.num_heads == 2


def test_moa_one_kv_head_equals_the_paper_layout():
  # (B=2, L=6, M=8, E=4, k=2, D=4): num_kv_heads=1 with the same weights
  # (an extra K=1 axis) is the default block; output_bias=False adds none.
  base = ae.MoAAttention(M, num_experts=4, k=2, head_dim=4, rngs=nnx.Rngs(0))
  kv1 = ae.MoAAttention(M, num_experts=4, k=2, head_dim=4, num_kv_heads=1,
                        rngs=nnx.Rngs(1))
  kv1.w_gate_ME[...] = base.w_gate_ME[...]
  kv1.w_q_EMKD[...] = base.w_q_EMD[...][:, :, None]
  kv1.w_k_MKD[...] = base.w_k_MD[...][:, None]
  kv1.w_v_MKD[...] = base.w_v_MD[...][:, None]
  kv1.w_o_EKDM[...] = base.w_o_EDM[...][:, None]
  x = jax.random.normal(jax.random.key(2), (2, 6, M))
  np.testing.assert_allclose(kv1(x), base(x), rtol=1e-5, atol=1e-6)
  assert base.b_out_M is None and kv1.b_out_M is None
  assert not hasattr(base, "w_q_EMKD")


def test_moa_gates_are_token_choice_topk_softmax():
  # (B=2, L=5, M=8, E=4, k=2): MoA's renormalised top-k softmax is the
  # TokenChoiceRouter gating 'topk_softmax' (JetMoE's routing).
  from moejax import routing  # pylint: disable=g-import-not-at-top
  moa = ae.MoAAttention(M, num_experts=4, k=2, head_dim=4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (2, 5, M))
  plan = routing.token_choice(moa.router_logits(x), k=2, capacity=None,
                              gating="topk_softmax")
  dense_BLE = jnp.sum(jax.nn.one_hot(plan.expert_GSK, 4)
                      * plan.weight_GSK[..., None], -2)
  np.testing.assert_allclose(moa.gates(x), dense_BLE, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs, option, words", [
    ({"num_kv_heads": 0}, "num_kv_heads", "integer >= 1, got 0"),
    ({"num_kv_heads": 2.0}, "num_kv_heads", "integer >= 1, got 2.0"),
    ({"num_kv_heads": True}, "num_kv_heads", "integer >= 1, got True"),
    ({"output_bias": "yes"}, "output_bias", "True or False, got 'yes'"),
])
def test_moa_bad_new_options_name_themselves(kwargs, option, words):
  from moejax.routing.validation import OptionError  # pylint: disable=g-import-not-at-top
  with pytest.raises(OptionError, match=words) as err:
    ae.MoAAttention(M, num_experts=4, k=2, head_dim=4, rngs=nnx.Rngs(0),
                    **kwargs)
  assert err.value.option == option and "\n" not in str(err.value)


def _moa(num_kv_heads):
  return ae.MoAAttention(M, num_experts=4, k=2, head_dim=4,
                         num_kv_heads=num_kv_heads, output_bias=True,
                         rngs=nnx.Rngs(0))


def _switchhead():
  return ae.SwitchHeadAttention(M, num_heads=2, num_experts=4, k=2,
                                head_dim=4, rngs=nnx.Rngs(0))


# What each cache holds per slot: MoA's K shared heads (not E * K), and
# SwitchHead's N heads of values already mixed by the key token's gates
# (not N * E).
@pytest.mark.parametrize("make, entry, shape_BTKD", [
    (lambda: _moa(None), "k", (2, 6, 1, 4)),
    (lambda: _moa(2), "k", (2, 6, 2, 4)),
    (_switchhead, "v", (2, 6, 2, 4)),
], ids=["moa", "moa_2_kv_heads", "switchhead"])
def test_cached_steps_equal_the_full_call(make, entry, shape_BTKD):
  # (B=2, L=6, M=8, E=4, k=2, D=4), row 1 left-padded by 2: a prefill of 3
  # tokens, then 3 single-token steps against the cache, equal the full
  # call at every real token.
  from moejax.inference import decoding  # pylint: disable=g-import-not-at-top
  layer = make()
  x = jax.random.normal(jax.random.key(4), (2, 6, M))
  mask_BL = jnp.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], bool)
  pos_BL = decoding.prompt_positions(mask_BL)
  full = layer(x, padding_mask_BL=mask_BL, positions_BL=pos_BL)
  cache = layer.init_cache(2, 6)
  assert cache.entries[entry].shape == shape_BTKD
  steps = []
  for lo, hi in [(0, 3), (3, 4), (4, 5), (5, 6)]:
    y, cache = layer(x[:, lo:hi], padding_mask_BL=mask_BL[:, lo:hi],
                     positions_BL=pos_BL[:, lo:hi], cache=cache)
    steps.append(y)
  got = jnp.concatenate(steps, axis=1)
  np.testing.assert_allclose(np.asarray(got)[np.asarray(mask_BL)],
                             np.asarray(full)[np.asarray(mask_BL)],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(cache.pos_BT, [[0, 1, 2, 3, 4, 5],
                                               [0, 1, 2, 3, -1, -1]])
  with pytest.raises(ValueError, match="needs positions_BL"):
    layer(x, cache=layer.init_cache(2, 6))


@pytest.mark.parametrize("wrapper", ["moa", "switchhead"])
def test_own_lm_with_attention_experts_decodes_as_a_full_recompute(wrapper):
  # DecoderLM (V=13, M=8, 2 layers) with MoA or SwitchHead attention: each
  # greedy step of a left-padded batch is the argmax of one causal
  # recompute.
  from moejax import inference  # pylint: disable=g-import-not-at-top
  from moejax.inference import decoding  # pylint: disable=g-import-not-at-top
  model = models.DecoderLM(13, M, 2, 2, 16, rngs=nnx.Rngs(0),
                           wrappers={wrapper: {"num_experts": 4, "k": 2}})
  prompt_BL = np.array([[3, 1, 4, 1], [0, 0, 9, 2]], np.int32)
  mask_BL = np.array([[1, 1, 1, 1], [0, 0, 1, 1]], bool)
  out_BT = np.asarray(inference.generate(model, prompt_BL, max_new_tokens=6,
                                         padding_mask_BL=mask_BL))
  m_BT = np.concatenate([mask_BL, np.ones((2, 6), bool)], axis=1)
  pos_BT = decoding.prompt_positions(jnp.asarray(m_BT))
  logits_BTV, _ = model(out_BT, padding_mask_BL=m_BT, positions_BL=pos_BT)
  np.testing.assert_array_equal(np.argmax(logits_BTV[:, 3:-1], -1),
                                out_BT[:, 4:])
