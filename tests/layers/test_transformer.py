"""Tests for the transformer blocks and the models (moejax.models)."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax import layers
from moejax import models

# A tiny LM: V=13, M=8, 2 layers, 2 heads (D=4), dense width 16, L=6.
V, M, LAYERS, HEADS, MLP, L = 13, 8, 2, 2, 16, 6


def _moe(num_experts=4, router=None, engine="indices", **kwargs):
  """A build_moe config: E experts (width and activation from the model),
  `router` a dict (default top-2 token choice), `engine` a registry name;
  kwargs are other top-level fields (capacity_factor, ...)."""
  config = {"router": router or {"name": "token_choice", "k": 2},
            "engine": {"name": engine},
            "experts": {"num_experts": num_experts}}
  config.update(kwargs)
  return config


DROPLESS_TOP2 = _moe(engine="dropless")


def _lm(moe_every=1, rngs_seed=0, **kwargs):
  kwargs.setdefault("activation", "relu")
  return models.DecoderLM(V, M, LAYERS, HEADS, MLP, moe_every=moe_every,
                          rngs=nnx.Rngs(rngs_seed), **kwargs)


def _abstract_lm(**kwargs):
  """The model's structure and shapes only (nnx.eval_shape): no compute."""
  return nnx.eval_shape(lambda: _lm(**kwargs))


@nnx.jit
def _forward(model, tokens_BL):
  return model(tokens_BL)


def _rng(seed):
  # Test data from numpy: eager jax.random would compile per shape.
  return np.random.default_rng(seed)


def _tokens(b=L, l=L, seed=0):
  """<int32>[b, l]; every forward here uses [L, L] so jit caches are shared."""
  return jnp.asarray(_rng(seed).integers(0, V, (b, l)), jnp.int32)


# ---------------------------------------------------------------- blocks


def test_rope_depends_only_on_relative_position():
  q, k = (jnp.asarray(_rng(i).normal(size=(1, 1, 2, 8)), jnp.float32)
          for i in (1, 2))

  @jax.jit
  def dot(pq, pk):  # <q at pq, k at pk> per head
    pos = lambda p: jnp.full((1, 1), p)
    return jnp.sum(layers.apply_rope(q, pos(pq)) *
                   layers.apply_rope(k, pos(pk)), -1)

  np.testing.assert_allclose(dot(5, 2), dot(13, 10), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dot(0, 0), jnp.sum(q * k, -1), rtol=1e-5,
                             atol=1e-5)


def test_attention_segments_and_padding_isolate_keys():
  attn = layers.MultiHeadAttention(M, HEADS, causal=False, rngs=nnx.Rngs(0))
  x = jnp.asarray(_rng(0).normal(size=(1, 4, M)), jnp.float32)
  x2 = x.at[:, 2:].set(7.0)  # change segment 1 (positions 2, 3)
  seg = jnp.array([[0, 0, 1, 1]])
  pad = jnp.array([[True, True, False, False]])

  @nnx.jit
  def run(attn, x):
    return (attn(x, segment_ids_BL=seg), attn(x, padding_mask_BL=pad))

  for y, y2 in zip(run(attn, x), run(attn, x2)):
    np.testing.assert_allclose(y[:, :2], y2[:, :2], atol=1e-6)


def test_causal_block_rejects_non_causal_ffns():
  # nnx.eval_shape: the checks run on shapes, nothing is computed.
  def soft_moe(rngs):
    return layers.SoftMoELayer(M, MLP, 4, rngs=rngs)

  def expert_choice(rngs):
    return layers.MoELayer(router=layers.ExpertChoiceRouter(M, 4, rngs=rngs),
                           experts=layers.Experts(4, M, MLP, rngs=rngs),
                           engine=layers.IndicesEngine())

  def block(make_ffn, causal, **kwargs):
    def make():
      rngs = nnx.Rngs(0)
      return layers.TransformerBlock(M, HEADS, ffn=make_ffn(rngs),
                                     causal=causal, rngs=rngs, **kwargs)
    return nnx.eval_shape(make)

  with pytest.raises(ValueError, match="future tokens"):
    block(soft_moe, True)
  with pytest.raises(ValueError, match="router ExpertChoiceRouter reads "
                     "later tokens.*future tokens"):
    block(expert_choice, True)
  assert block(expert_choice, False).is_moe
  assert block(expert_choice, True, allow_non_causal=True).is_moe


# ------------------------------------------------------------ decoder LM


def test_decoder_shapes_and_stacked_aux():
  logits, aux = _forward(_lm(moe_every=1, moe=DROPLESS_TOP2), _tokens())
  assert logits.shape == (L, L, V) and logits.dtype == jnp.float32
  # One leading entry per MoE layer (both layers are MoE).
  assert set(aux.losses) == {"load_balance", "z_loss"}
  assert aux.losses["load_balance"].shape == (LAYERS,)
  assert aux.metrics.expert_load_E.shape == (LAYERS, 4)
  assert float(layers.total_aux_loss(aux, {"load_balance": 1.0})) > 0
  np.testing.assert_allclose(
      layers.total_aux_loss(aux, {"load_balance": 1.0, "z_loss": 0.5}),
      jnp.sum(aux.losses["load_balance"]) + 0.5 * jnp.sum(aux.losses[
          "z_loss"]), rtol=1e-6)
  # A non-zero weight on a loss no layer reports would silently do nothing.
  with pytest.raises(ValueError, match=r"aux loss weights name "
                     r"\['sequence_balance'\], which no MoE layer reports"):
    layers.total_aux_loss(aux, {"sequence_balance": 1.0})
  logits, aux = _forward(_lm(moe_every=0), _tokens())
  assert logits.shape == (L, L, V) and aux is None
  # A dense model has no aux losses: every weight multiplies nothing.
  assert float(layers.total_aux_loss(None, {"load_balance": 1e-2})) == 0.0


def _perturbed_batch(seed=3):
  """Row 0 is a base sequence; row 1 + t changes every token after t."""
  base = _rng(seed).integers(0, V, (L,))
  rows = [base]
  for t in range(L - 1):
    noise = _rng(seed + 1 + t).integers(1, V, (L,))
    changed = (base + noise) % V  # differs from base at every position
    rows.append(np.where(np.arange(L) > t, changed, base))
  return jnp.asarray(np.stack(rows), jnp.int32)


def _max_leak(model):
  """max over t of |logits[<= t] change| when tokens > t change."""
  logits, _ = _forward(model, _perturbed_batch())
  return max(float(jnp.max(jnp.abs(logits[1 + t, :t + 1] - logits[0, :t + 1])))
             for t in range(L - 1))


@pytest.mark.parametrize("name, kwargs", [
    ("dense", None),
    ("top2_dropless", DROPLESS_TOP2),
    # capacity_factor E/k makes C = S: nothing can be dropped.
    ("top2_ample_capacity", _moe(engine="indices", capacity_factor=2.0)),
    # k=1 claims slots in token order, so even tight capacity is causal.
    ("top1_tight_capacity", _moe(router={"name": "token_choice", "k": 1},
                                 engine="einsum", capacity_factor=0.5)),
])
def test_decoder_is_causal(name, kwargs):
  # Dropless: both layers MoE; the others: MoE in layer 1 only (cheaper).
  every = 0 if kwargs is None else 1 if kwargs is DROPLESS_TOP2 else 2
  model = _lm(moe_every=every, moe=kwargs)
  assert _max_leak(model) < 1e-5, name


def test_causality_check_detects_a_non_causal_router():
  # Sanity check of the test itself: expert choice (allowed knowingly) leaks.
  model = _lm(moe_every=2, moe=_moe(
      router={"name": "expert_choice"}, capacity_factor=1.0,
      allow_non_causal=True))
  assert _max_leak(model) > 1e-4


def test_causal_model_rejects_non_causal_routers():
  with pytest.raises(layers.MoEConfigError, match="ExpertChoiceRouter reads "
                     "later tokens.*see the future"):
    _abstract_lm(moe=_moe(router={"name": "expert_choice"}))
  with pytest.raises(layers.MoEConfigError, match="see the future"):
    _abstract_lm(moe=_moe(router={"name": "token_choice", "k": 1,
                                  "batch_prioritized": True}))
  with pytest.raises(layers.MoEConfigError, match="future tokens"):
    _abstract_lm(moe={"layer": "soft_moe", "experts": {"num_experts": 4}})


def test_moe_kwargs_are_validated():
  with pytest.raises(ValueError, match="moe is None"):
    _abstract_lm(moe_every=1)
  # The model sets causality: the config may not.
  with pytest.raises(layers.MoEConfigError, match=r"moe.causal=False: moved "
                     r"to the model"):
    _abstract_lm(moe=_moe(causal=False))
  with pytest.raises(layers.MoEConfigError, match=r"moe.capacity_facter=2.0: "
                     r"unknown field \(did you mean moe.capacity_factor\?\)"):
    _abstract_lm(moe=_moe(capacity_facter=2.0))
  with pytest.raises(layers.MoEConfigError,
                     match=r"moe.router.kk=2: TokenChoiceRouter does not "
                     r"take option 'kk'"):
    _abstract_lm(moe=_moe(router={"name": "token_choice", "kk": 2}))
  # The old flat form names where each field moved.
  with pytest.raises(layers.MoEConfigError, match=r"moe.k=2: moved to "
                     r"moe.router.k"):
    _abstract_lm(moe={"experts": {"num_experts": 4}, "k": 2})
  with pytest.raises(layers.MoEConfigError, match=r"moe.router='hash': "
                     r"moved to moe.router.name"):
    _abstract_lm(moe={"experts": {"num_experts": 4}, "router": "hash"})
  with pytest.raises(ValueError, match="moe_layers"):
    _abstract_lm(moe_layers=(0, 2), moe=_moe())
  with pytest.raises(layers.MoEConfigError, match="moe.layers.0=.*: not an MoE "
                     "layer"):
    _abstract_lm(moe_every=2, moe=_moe(layers={"0": {"capacity_factor": 2}}))


def _copy_shared_parts(src, dst):
  """Copies embedding, norms and attention of one LM into another."""
  dst.embed_VM[...] = src.embed_VM[...]
  nnx.update(dst.final_norm, nnx.state(src.final_norm))
  for s, d in zip(src.blocks, dst.blocks):
    for part in ("attention_norm", "attention", "ffn_norm"):
      nnx.update(getattr(d, part), nnx.state(getattr(s, part)))


def _zeros_model(abstract):
  """A concrete model of zeros from an nnx.eval_shape one. Filling it by hand
  skips random init, whose XLA:CPU compile costs ~1 s per new shape."""
  graphdef, state = nnx.split(abstract)
  return nnx.merge(graphdef, jax.tree.map(
      lambda x: jnp.zeros(x.shape, x.dtype), state))


def test_one_expert_top1_dropless_equals_dense_ffn():
  dense = _lm(moe_every=0)
  # The same model with layer 1's FFN as an MoE layer of one expert, k=1.
  moe = _zeros_model(_abstract_lm(moe_every=2, moe=_moe(
      1, router={"name": "token_choice", "k": 1}, engine="dropless")))
  _copy_shared_parts(dense, moe)
  nnx.update(moe.blocks[0].ffn, nnx.state(dense.blocks[0].ffn))
  experts, ffn = moe.blocks[1].ffn.experts, dense.blocks[1].ffn
  # The only expert holds the dense weights; its softmax gate over E=1 is 1
  # whatever the (zero) router weights.
  experts.w_in_EMH[...] = ffn.w_in_MH[...][None]
  experts.w_out_EHM[...] = ffn.w_out_HM[...][None]
  tokens = _tokens()
  np.testing.assert_allclose(_forward(moe, tokens)[0],
                             _forward(dense, tokens)[0], rtol=1e-5, atol=1e-5)


def test_tie_embeddings_shares_the_table():
  tied = _lm(moe_every=0)
  untied = _zeros_model(_abstract_lm(moe_every=0, tie_embeddings=False))
  _copy_shared_parts(tied, untied)
  for s, d in zip(tied.blocks, untied.blocks):
    nnx.update(d.ffn, nnx.state(s.ffn))
  untied.w_unembed_MV[...] = jnp.asarray(
      np.random.default_rng(0).normal(size=(M, V)), jnp.float32)
  assert tied.w_unembed_MV is None
  assert (models.count_params(untied)["total"] -
          models.count_params(tied)["total"]) == M * V
  tokens = _tokens() % (V - 1)  # token V-1 does not occur
  for model, expect_change in ((tied, True), (untied, False)):
    before = _forward(model, tokens)[0]
    model.embed_VM[...] = model.embed_VM[...].at[V - 1].add(1.0)
    delta = jnp.abs(_forward(model, tokens)[0] - before)
    assert float(jnp.max(delta[..., :V - 1])) < 1e-6
    assert (float(jnp.max(delta[..., V - 1])) > 1e-3) == expect_change


def test_param_and_flop_counts_by_hand():
  # V=11, M=8, 2 layers, 2 heads x D=4, dense width 16, relu, tied;
  # layer 1 is MoE (moe_every=2): E=4, k=2, H=6.
  #   embedding          11*8                         =   88
  #   per block: norms   2*8 = 16; attention 4*8*2*4  =  256   (x2 = 544)
  #   layer 0 dense FFN  8*16 + 16*8                  =  256
  #   layer 1 router     8*4 = 32; experts 4*(8*6+6*8) = 384
  #   final norm         8
  #   total = 88 + 544 + 256 + 32 + 384 + 8           = 1312
  #   active = 1312 - 384 * (1 - 2/4)                 = 1120
  # FLOPs/token at L=5: attention proj 2*256*2 = 1024; scores 4*5*2*4*2 = 320;
  # dense 2*256 = 512; MoE router 2*32 + experts 2*192 = 448; logits 2*8*11
  # = 176; total 2480.
  make = lambda: models.DecoderLM(
      11, 8, 2, 2, 16, moe_every=2, activation="relu",
      moe={"router": {"name": "token_choice", "k": 2},
           "experts": {"num_experts": 4, "hidden_dim": 6}},
      rngs=nnx.Rngs(0))
  model = nnx.eval_shape(make)  # shapes only: nothing is allocated
  counts = models.count_params(model)
  assert (counts["total"], counts["active"], counts["embedding"],
          counts["experts"], counts["num_moe_layers"]) == (1312, 1120, 88,
                                                           384, 1)
  assert models.flops_per_token(model, seq_len=5) == 2480
  text = models.describe(model, seq_len=5)
  assert "1,312" in text and "1,120" in text and "MoE at layers [1]" in text


def test_flop_matched_dense_variant():
  # E=4, k=2, H=6 in every layer -> dense width k*H = 12 runs the same FFN
  # FLOPs; the MoE model adds only its routers (2 layers x 2*M*E = 128).
  assert models.flop_matched_dense_mlp_dim(6, 2) == 12
  assert models.flop_matched_dense_mlp_dim(6, 2, 1, 4) == 16
  assert models.flop_matched_dense_mlp_dim(6, 2, moe_every=2, mlp_dim=16) == 14
  moe = nnx.eval_shape(lambda: _lm(moe_every=1, moe=_moe(
      experts={"num_experts": 4, "hidden_dim": 6})))
  dense = nnx.eval_shape(lambda: models.DecoderLM(
      V, M, LAYERS, HEADS, 12, activation="relu", rngs=nnx.Rngs(0)))
  assert (models.flops_per_token(moe, L) - models.flops_per_token(dense, L)
          == 2 * 2 * M * 4)
  assert models.matched_dense_mlp_dim(moe) == 12
  assert "mlp_dim=12" in models.describe(moe, L)


def test_eval_and_train_set_nested_moe_layers():
  model = _abstract_lm(moe_every=1, moe=_moe())
  moe_layers = [b.ffn for b in model.blocks]
  assert not any(layer.deterministic for layer in moe_layers)
  model.eval()
  assert all(layer.deterministic for layer in moe_layers)
  model.train()
  assert not any(layer.deterministic for layer in moe_layers)


def test_jit_grad_and_sgd_reduce_the_loss():
  model = _lm(moe_every=2, moe=_moe(engine="indices", capacity_factor=1.5))
  tokens = _tokens(L, L + 1, seed=5)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params):
    logits, aux = nnx.merge(graphdef, params, rest)(inputs)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.mean(ce) + layers.total_aux_loss(aux, {"load_balance": 1e-2})

  @jax.jit
  def step(params):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return loss, jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)

  losses = []
  for _ in range(6):
    loss, params = step(params)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.1, losses


# ------------------------------------------------------------------- ViT


def test_vmoe_placement():
  assert models.vmoe_placement(12, 2) == (9, 11)
  assert models.vmoe_placement(8, 2) == (5, 7)
  assert models.vmoe_placement(4, 5) == (1, 3)
  assert models.every_n_placement(6, 2) == (1, 3, 5)
  assert models.every_n_placement(3, 1) == (0, 1, 2)
  assert models.every_n_placement(3, 0) == ()


@nnx.jit
def _vit_forward(model, images):
  return model(images)


@pytest.mark.parametrize("soft, pool", [(False, "gap"), (True, "token")])
def test_vit_forward(soft, pool):
  # 8x8x1 images, 4x4 patches -> 4 patches; 2 blocks; Last-2 -> (1,).
  moe = ({"layer": "soft_moe", "slots_per_expert": 2,
          "experts": {"num_experts": 4}} if soft else
         _moe(capacity_factor=1.0))
  vit = models.ViTClassifier(8, 4, 1, 10, M, 2, HEADS, MLP, pool=pool,
                             moe=moe, rngs=nnx.Rngs(0))
  assert vit.moe_layers == (1,)
  images = jnp.asarray(_rng(0).uniform(size=(3, 8, 8, 1)), jnp.float32)
  logits, aux = _vit_forward(vit, images)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32
  assert aux.metrics.expert_load_E.shape == (1, 4)
  counts = models.count_params(vit)
  assert (counts["active"] == counts["total"]) == soft
  assert vit.num_tokens == 4 + (pool == "token")
  assert models.flops_per_token(vit) > 0
