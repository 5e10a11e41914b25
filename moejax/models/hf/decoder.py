"""The decoder of the HF MoE families, built from a ModelSpec.

embed -> [x += attn(norm(x)); x += ffn(norm(x))] x layers -> norm -> lm_head.
The attention form comes from moejax.models.hf.attention (GQA or MLA), the
sparse FFN from moejax.layers.build_moe (every routing/expert option is a
router or Experts option there), dense layers are DenseFFN (SwiGLU).
"""

from typing import Optional

from flax import nnx
import jax.numpy as jnp

from moejax import notation as nt
from moejax.layers import attention as attention_core
from moejax.layers import build as build_lib
from moejax.layers import ffn as ffn_lib
from moejax.layers import params as params_lib
from moejax.layers import transformer as tfm
from moejax.models.hf import attention as attention_lib


class HFBlock(nnx.Module):
  """Pre-norm block: input_norm, attention, post_attention_norm, ffn."""

  def __init__(self, spec, index, *, dtype, param_dtype, rngs):
    m = spec.model_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_norm = tfm.RMSNorm(m, eps=spec.norm_eps, **kw)
    self.attention = attention_lib.FORMS[spec.attention.form](
        spec.attention, m, spec.rope, norm_eps=spec.norm_eps,
        window=spec.windows[index], **kw)
    self.post_attention_norm = tfm.RMSNorm(m, eps=spec.norm_eps, **kw)
    self.is_moe = spec.ffn_kinds[index] == "moe"
    if self.is_moe:
      self.ffn = build_lib.build_moe(dict(spec.moe), model_dim=m, rngs=rngs,
                                     dtype=dtype, param_dtype=param_dtype)
    else:
      self.ffn = ffn_lib.DenseFFN(m, spec.dense_hidden_dim,
                                  activation="swiglu", **kw)
    self.dtype = dtype
    self.residual_scale = spec.residual_scale

  def __call__(self, x_BLM, positions_BL, padding_mask_BL, deterministic,
               cache=None):
    """-> (x_BLM, aux or None), and the block's new LayerCache when given one."""
    h = self.attention(self.input_norm(x_BLM), positions_BL,
                       key_mask_BL=padding_mask_BL, cache=cache)
    if cache is not None:
      h, cache = h
    x_BLM = x_BLM + h.astype(self.dtype) * self.residual_scale
    h = self.post_attention_norm(x_BLM)
    aux = None
    if self.is_moe:
      decode = {} if cache is None else {"no_drop": True}
      y, aux = self.ffn(h, padding_mask_BL=padding_mask_BL,
                        deterministic=deterministic, **decode)
    else:
      y = self.ffn(h)
    out = x_BLM + y.astype(self.dtype) * self.residual_scale
    return (out, aux) if cache is None else (out, aux, cache)


class HFDecoder(nnx.Module):
  """A decoder-only MoE LM of one of the HF families (see config.FAMILIES).

  Parameters: embed_VM [V, M]; blocks[i] (input_norm, attention,
  post_attention_norm, ffn); final_norm; w_unembed_MV [M, V] unless the
  embeddings are tied.
  """

  def __init__(self, spec, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs):
    self.spec = spec
    self.dtype = dtype
    self.embed_VM = params_lib.param(
        rngs, nnx.initializers.normal(0.02), (spec.vocab_size,
                                              spec.model_dim),
        (nt.VOCAB, nt.EMBED), param_dtype)
    self.blocks = nnx.List([
        HFBlock(spec, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for i in range(spec.num_layers)])
    self.final_norm = tfm.RMSNorm(spec.model_dim, eps=spec.norm_eps,
                                  dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
    self.w_unembed_MV = (None if spec.tie_embeddings else params_lib.param(
        rngs, nnx.initializers.normal(0.02), (spec.model_dim,
                                              spec.vocab_size),
        (nt.EMBED, nt.VOCAB), param_dtype))

  @property
  def moe_layers(self):
    """0-based indices of the MoE blocks (aux is stacked in this order)."""
    return tuple(i for i, block in enumerate(self.blocks) if block.is_moe)

  def flops_per_token(self, seq_len):
    """Forward matmul FLOPs per token (multiply-add = 2): 2 x the active
    non-embedding parameters (k routed experts per MoE layer), the attention
    scores and values over seq_len keys, and the logits."""
    from moejax.models import accounting  # pylint: disable=g-import-not-at-top
    active = accounting.count_params(self)["active"]
    s, att = self.spec, self.spec.attention
    qk = att.head_dim or (att.qk_nope_head_dim + att.qk_rope_head_dim)
    v = att.head_dim or att.v_head_dim
    attention = 2 * seq_len * att.num_heads * (qk + v) * s.num_layers
    embed = s.vocab_size * s.model_dim
    logits = 2 * embed
    # The embedding is a gather; tied, its matrix also makes the logits.
    matmul_params = active - embed - (0 if s.tie_embeddings else embed)
    return float(2 * matmul_params + attention + logits)

  def describe(self, seq_len=None):
    """A few lines: family, shape, parameters, routing, attention form."""
    from moejax.models import hf  # pylint: disable=g-import-not-at-top
    text = hf.describe(self)  # the function (hf/describe.py)
    if seq_len:
      text += (f"\n  forward FLOPs/token at L={seq_len}: "
               f"{self.flops_per_token(seq_len):,.0f}")
    return text

  def init_cache(self, batch, max_length):
    """[LayerCache per block]: an empty KV cache for `batch` rows of up to
    `max_length` positions (moejax.inference.generate)."""
    return [block.attention.init_cache(batch, max_length)
            for block in self.blocks]

  def __call__(self, tokens_BL, *, padding_mask_BL=None,
               positions_BL: Optional[jnp.ndarray] = None,
               deterministic: Optional[bool] = True, cache=None):
    """Next-token logits.

    Args:
      tokens_BL: <int32>[B, L] token ids.
      padding_mask_BL: optional <bool>[B, L], False at padding: padded keys
        are not attended and padded tokens take no expert slot. Outputs at
        padded positions are meaningless.
      positions_BL: optional <int32>[B, L] positions (default 0..L-1 in
        every row, as transformers gives a right-padded batch).
      deterministic: passed to the MoE layers (True: evaluation; None:
        each layer's own attribute, for fine-tuning after model.train()).
      cache: optional [LayerCache] (init_cache): the tokens extend the
        cached sequence (pass their positions); padding is not cached.
    Returns:
      (logits_BLV <float32>[B, L, V], aux): the MoE layers' MoEAux stacked
      along a leading axis in layer order, or None without MoE layers; with
      a cache, (logits_BLV, aux, new cache).
    """
    if getattr(tokens_BL, "ndim", None) != 2 or not jnp.issubdtype(
        tokens_BL.dtype, jnp.integer):
      raise ValueError(f"tokens_BL must be an integer array [B, L], got "
                       f"{getattr(tokens_BL, 'dtype', None)}"
                       f"{getattr(tokens_BL, 'shape', None)}")
    b, l = tokens_BL.shape
    if positions_BL is None:
      positions_BL = attention_core.default_positions(b, l)
    if padding_mask_BL is not None:
      padding_mask_BL = padding_mask_BL.astype(jnp.bool_)
    x_BLM = jnp.take(self.embed_VM[...], tokens_BL, axis=0).astype(self.dtype)
    if self.spec.embed_scale != 1.0:
      x_BLM = x_BLM * self.spec.embed_scale
    auxes, new_cache = [], []
    for i, block in enumerate(self.blocks):
      if cache is None:
        x_BLM, aux = block(x_BLM, positions_BL, padding_mask_BL, deterministic)
      else:
        x_BLM, aux, layer_cache = block(x_BLM, positions_BL, padding_mask_BL,
                                        deterministic, cache[i])
        new_cache.append(layer_cache)
      if aux is not None:
        auxes.append(aux)
    h_BLM = self.final_norm(x_BLM)
    w_MV = (self.embed_VM[...].T if self.w_unembed_MV is None
            else self.w_unembed_MV[...])
    logits_BLV = jnp.einsum("BLM,MV->BLV", h_BLM, w_MV.astype(self.dtype),
                            preferred_element_type=jnp.float32)
    logits_BLV = logits_BLV.astype(jnp.float32)
    if self.spec.logits_scale != 1.0:
      logits_BLV = logits_BLV / self.spec.logits_scale
    if cache is not None:
      return logits_BLV, tfm.stack_aux(auxes), new_cache
    return logits_BLV, tfm.stack_aux(auxes)
