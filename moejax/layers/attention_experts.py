"""Attention experts: routed projections over shared keys and values.

* MoA, Mixture of Attention Heads (Zhang et al. 2022): E head experts, each
  with its own query and output projections, over one shared key and value
  projection. Token l picks its top-k heads by a softmax gate g = softmax(x_l
  W_g) and

      y_l = sum_{e in topk(g_l)} g_le * W_o_e^T attn(x_l W_q_e, X W_k, X W_v)

  (weights renormalised over the k picked heads, as in the paper).
* SwitchHead (Csordas et al. 2023): N heads with dense queries and keys;
  each head's value and output projections are mixtures of E experts with
  non-competitive sigmoid gates, top-k per head,

      v_jn = sum_{e in topk(s_jn)} s_jne x_j W_v_ne,   s_jn = sigmoid(x_j W_sv_n)
      y_l  = sum_n sum_{e in topk(s'_ln)} s'_lne attn_ln W_o_ne,
      s'_ln = sigmoid(x_l W_so_n)

Both are drop-in replacements of MultiHeadAttention (same call) and decode
like it (`init_cache`, `cache=`): MoA's KV cache holds the shared rotated
keys and values only, as grouped-query attention's with K heads;
SwitchHead's holds each head's rotated keys and its values already mixed
by the key token's own gates (N heads, not N * E). The experts are computed
densely and masked (E query projections / E value and output projections
per token), which is exact and simple; the FLOP savings of the papers need
a gather-based kernel. They report no auxiliary loss
(SwitchHead trains without one; MoA's balance loss would need the block to
return the attention's aux; MoAAttention.router_logits gives its logits).

JetMoE's attention block (Shen et al. 2024) is MoA with K shared key/value
heads (num_kv_heads=K: each expert has K query heads and a [K, D, M] output
projection), RoPE, top-k softmax gates and an output bias
(output_bias=True); moejax.models.hf.jetmoe.load_jetmoe_attention loads
transformers' JetMoeAttention into it and tests/layers/test_hf_blocks.py
matches its outputs.

`apply_moa(model, ...)`, `apply_switchhead(model, ...)` replace the attention
of a model's blocks in place (DecoderLM(wrappers={'moa': {...}})).
"""

from flax import nnx
import jax
import jax.numpy as jnp

from moejax import notation as nt
from moejax.layers import attention as attention_lib
from moejax.layers import kv_cache
from moejax.layers import params as params_lib
from moejax.layers import transformer as tfm
from moejax.routing import validation


def attention_mask(b, l, *, causal, padding_mask_BL=None, segment_ids_BL=None):
  """<bool>[B, L, L]: which key j query l attends without a cache, as
  MultiHeadAttention: causality by index (positions may restart within a
  packed row), padding keys and other segments never read."""
  index_BL = attention_lib.default_positions(b, l)
  return attention_lib.attention_mask(
      index_BL, index_BL, causal=causal, key_mask_BJ=padding_mask_BL,
      segment_ids_BL=segment_ids_BL)


def top_k_mask(scores_XE, k):
  """<bool>[..., E]: the k largest scores of each row."""
  _, idx = jax.lax.top_k(scores_XE, k)
  return jnp.any(jax.nn.one_hot(idx, scores_XE.shape[-1], dtype=jnp.bool_),
                 axis=-2)


def _softmax_attend(q_BLND, k_BJND, v_BJND, mask_BLJ, head_dim):
  logits = jnp.einsum("BLND,BJND->BNLJ", q_BLND, k_BJND,
                      preferred_element_type=jnp.float32) * head_dim ** -0.5
  logits = jnp.where(mask_BLJ[:, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, -1).astype(v_BJND.dtype)
  return jnp.einsum("BNLJ,BJND->BLND", probs, v_BJND)


class _RoutedAttention(nnx.Module):
  """Common arguments and RoPE."""

  def _init_common(self, model_dim, num_experts, k, head_dim, causal,
                   rope_max_wavelength, dtype):
    validation.check_int("model_dim", model_dim, 1)
    validation.check_int("num_experts", num_experts, 1)
    validation.check_k(k, num_experts)
    validation.check_int("head_dim", head_dim, 1)
    if rope_max_wavelength is not None and head_dim % 2:
      raise validation.OptionError("head_dim", head_dim,
                                   "rotary embeddings need an even head_dim")
    self.model_dim, self.num_experts, self.k = model_dim, num_experts, k
    self.head_dim, self.causal = head_dim, causal
    self.rope_max_wavelength = rope_max_wavelength
    self.dtype = dtype

  def _rope(self, x_BLND, positions_BL):
    if self.rope_max_wavelength is None:
      return x_BLND
    return tfm.apply_rope(x_BLND, positions_BL,
                          max_wavelength=self.rope_max_wavelength)

  def _positions(self, b, l, positions_BL, segment_ids_BL, cache):
    """<int32>[B, L] positions (0..L-1 by default); a cache needs given
    positions and one sequence per row."""
    if cache is not None and (positions_BL is None or
                              segment_ids_BL is not None):
      raise ValueError("decoding with a cache needs positions_BL and no "
                       "segment_ids_BL (one sequence per row)")
    if positions_BL is None:
      return attention_lib.default_positions(b, l)
    return positions_BL

  def _keys(self, k_BJXD, v_BJXD, positions_BL, padding_mask_BL,
            segment_ids_BL, cache):
    """(keys, values, mask_BLJ, cache): without a cache the new tokens and
    attention_mask over them; with one, the cached keys too
    (kv_cache.extend_with_mask) and the cache with the new ones written."""
    if cache is None:
      b, l = k_BJXD.shape[:2]
      return k_BJXD, v_BJXD, attention_mask(
          b, l, causal=self.causal, padding_mask_BL=padding_mask_BL,
          segment_ids_BL=segment_ids_BL), None
    entries, mask_BLJ, cache = kv_cache.extend_with_mask(
        cache, {"k": k_BJXD, "v": v_BJXD}, positions_BL, padding_mask_BL,
        causal=self.causal)
    return entries["k"], entries["v"], mask_BLJ, cache


def _init(rngs, shape, names, param_dtype, in_axis, out_axis):
  init = nnx.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)
  return params_lib.param(rngs, init, shape, names, param_dtype)


class MoAAttention(_RoutedAttention):
  """Mixture of attention heads (MoA): routed query/output projections over
  shared keys and values.

  Args:
    model_dim: M.
    num_experts: E head experts.
    k: heads per token.
    head_dim: D.
    num_kv_heads: None (the paper: one shared key/value head, each expert
      one query head) or K >= 1 shared key/value heads, each expert then
      having K query heads (head j of an expert attends key/value head j) and
      a [K, D, M] output projection: JetMoE's layout.
    output_bias: adds a learned b_out_M [M] to every token's output
      (JetMoE); False keeps the paper's block.
    causal, rope_max_wavelength, dtype, param_dtype, rngs: as
      MultiHeadAttention.
  Parameters: w_gate_ME [M, E] (float32); with num_kv_heads=None w_q_EMD
    [E, M, D], w_o_EDM [E, D, M], w_k_MD, w_v_MD [M, D]; with num_kv_heads=K
    w_q_EMKD [E, M, K, D], w_o_EKDM [E, K, D, M], w_k_MKD, w_v_MKD [M, K, D];
    b_out_M [M] if output_bias.
  num_heads is E * K (every head is computed; accounting reads it).
  """

  def __init__(self, model_dim, *, num_experts=8, k=2, head_dim=16,
               num_kv_heads=None, output_bias=False, causal=True,
               rope_max_wavelength=10_000.0, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs):
    self._init_common(model_dim, num_experts, k, head_dim, causal,
                      rope_max_wavelength, dtype)
    if num_kv_heads is not None:
      validation.check_int("num_kv_heads", num_kv_heads, 1)
    if not isinstance(output_bias, bool):
      raise validation.OptionError(
          "output_bias", output_bias,
          f"output_bias must be True or False, got {output_bias!r}")
    self.num_kv_heads, self.output_bias = num_kv_heads, output_bias
    kv = num_kv_heads or 1
    self.num_heads = num_experts * kv
    m, e, d = model_dim, num_experts, head_dim
    self.w_gate_ME = params_lib.param(
        rngs, nnx.initializers.variance_scaling(0.1, "fan_in",
                                                "truncated_normal"),
        (m, e), (nt.EMBED, nt.EXPERT), jnp.float32)
    if num_kv_heads is None:
      self.w_q_EMD = _init(rngs, (e, m, d), (nt.EXPERT, nt.EMBED, None),
                           param_dtype, 1, 2)
      self.w_o_EDM = _init(rngs, (e, d, m), (nt.EXPERT, None, nt.EMBED),
                           param_dtype, 1, 2)
      self.w_k_MD = _init(rngs, (m, d), (nt.EMBED, None), param_dtype, 0, 1)
      self.w_v_MD = _init(rngs, (m, d), (nt.EMBED, None), param_dtype, 0, 1)
    else:
      self.w_q_EMKD = _init(rngs, (e, m, kv, d),
                            (nt.EXPERT, nt.EMBED, nt.HEADS, None),
                            param_dtype, 1, (2, 3))
      self.w_o_EKDM = _init(rngs, (e, kv, d, m),
                            (nt.EXPERT, nt.HEADS, None, nt.EMBED),
                            param_dtype, (1, 2), 3)
      self.w_k_MKD = _init(rngs, (m, kv, d), (nt.EMBED, nt.HEADS, None),
                           param_dtype, 0, (1, 2))
      self.w_v_MKD = _init(rngs, (m, kv, d), (nt.EMBED, nt.HEADS, None),
                           param_dtype, 0, (1, 2))
    self.b_out_M = (params_lib.param(rngs, nnx.initializers.zeros, (m,),
                                     (nt.EMBED,), param_dtype)
                    if output_bias else None)

  def _weights(self):
    """(w_q_EMKD, w_k_MKD, w_v_MKD, w_o_EKDM) in self.dtype; K = 1 for the
    paper's single shared head."""
    w = lambda p: p[...].astype(self.dtype)
    if self.num_kv_heads is None:
      return (w(self.w_q_EMD)[:, :, None], w(self.w_k_MD)[:, None],
              w(self.w_v_MD)[:, None], w(self.w_o_EDM)[:, None])
    return (w(self.w_q_EMKD), w(self.w_k_MKD), w(self.w_v_MKD),
            w(self.w_o_EKDM))

  def router_logits(self, x_BLM):
    """<float32>[B, L, E]: the gate's logits x W_g (JetMoE returns them for
    its balance loss)."""
    return jnp.einsum("BLM,ME->BLE", x_BLM.astype(jnp.float32),
                      self.w_gate_ME[...])

  def gates(self, x_BLM):
    """<float32>[B, L, E]: renormalised top-k softmax gates (0 elsewhere).

    Equal to a softmax over the k largest logits (JetMoE's, and
    TokenChoiceRouter's gating='topk_softmax')."""
    probs_BLE = jax.nn.softmax(self.router_logits(x_BLM), -1)
    picked_BLE = jnp.where(top_k_mask(probs_BLE, self.k), probs_BLE, 0.0)
    return picked_BLE / jnp.sum(picked_BLE, -1, keepdims=True)

  def init_cache(self, batch, max_length):
    """An empty LayerCache (moejax.layers.kv_cache) of the shared rotated
    keys and values, {'k', 'v': [B, T, K, D]} with T = max_length and
    K = num_kv_heads (1 without): the routed query and output projections
    act on each token alone, so nothing of theirs is cached."""
    shape = ((self.num_kv_heads or 1, self.head_dim), self.dtype)
    return kv_cache.init(batch, max_length, {"k": shape, "v": shape})

  def __call__(self, x_BLM, *, padding_mask_BL=None, segment_ids_BL=None,
               positions_BL=None, cache=None):
    """<float>[B, L, M] -> <dtype>[B, L, M].

    Args as MultiHeadAttention: with a LayerCache (init_cache) the queries
    also read the cached keys (causality then follows positions_BL, which
    is required) and the result is (y_BLM, the cache with the new keys).
    """
    b, l, _ = x_BLM.shape
    x_BLM = x_BLM.astype(self.dtype)
    w_q_EMKD, w_k_MKD, w_v_MKD, w_o_EKDM = self._weights()
    e, kv, d = self.num_experts, w_k_MKD.shape[1], self.head_dim
    positions_BL = self._positions(b, l, positions_BL, segment_ids_BL,
                                   cache)
    # Heads N = K * E, kv-major: head (j, e) reads the shared key/value
    # head j, the attention core's grouped-query layout (E query heads per
    # key/value head), so K/V are never copied per expert.
    q_BLND = self._rope(jnp.einsum("BLM,EMKD->BLKED", x_BLM, w_q_EMKD)
                        .reshape(b, l, kv * e, d), positions_BL)
    k_BJKD = self._rope(jnp.einsum("BJM,MKD->BJKD", x_BLM, w_k_MKD),
                        positions_BL)
    v_BJKD = jnp.einsum("BJM,MKD->BJKD", x_BLM, w_v_MKD)
    k_BJKD, v_BJKD, mask_BLJ, cache = self._keys(
        k_BJKD, v_BJKD, positions_BL, padding_mask_BL, segment_ids_BL, cache)
    o_BLKED = attention_lib.attend(q_BLND, k_BJKD, v_BJKD, mask_BLJ,
                                   scale=d ** -0.5).reshape(b, l, kv, e, d)
    g_BLE = self.gates(x_BLM).astype(self.dtype)
    y_BLM = jnp.einsum("BLKED,EKDM,BLE->BLM", o_BLKED, w_o_EKDM, g_BLE)
    if self.b_out_M is not None:
      y_BLM = y_BLM + self.b_out_M[...].astype(self.dtype)
    return y_BLM if cache is None else (y_BLM, cache)


class SwitchHeadAttention(_RoutedAttention):
  """SwitchHead: per head, value and output projections are mixtures of E
  experts with sigmoid top-k gates; queries and keys are dense.

  Args:
    model_dim: M.
    num_heads: N.
    num_experts: E per head (the paper: 4-5 with N = 2-4).
    k: experts per head and token (the paper: 2).
    head_dim: D.
    causal, rope_max_wavelength, dtype, param_dtype, rngs: as
      MultiHeadAttention.
  Parameters: w_q_MND, w_k_MND [M, N, D]; w_v_NEMD [N, E, M, D]; w_o_NEDM
    [N, E, D, M]; w_sv_MNE, w_so_MNE [M, N, E] gate weights (float32).
  """

  def __init__(self, model_dim, *, num_heads=2, num_experts=4, k=2,
               head_dim=16, causal=True, rope_max_wavelength=10_000.0,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    self._init_common(model_dim, num_experts, k, head_dim, causal,
                      rope_max_wavelength, dtype)
    validation.check_int("num_heads", num_heads, 1)
    self.num_heads = num_heads
    m, n, e, d = model_dim, num_heads, num_experts, head_dim
    self.w_q_MND = _init(rngs, (m, n, d), (nt.EMBED, nt.HEADS, None),
                         param_dtype, 0, (1, 2))
    self.w_k_MND = _init(rngs, (m, n, d), (nt.EMBED, nt.HEADS, None),
                         param_dtype, 0, (1, 2))
    self.w_v_NEMD = _init(rngs, (n, e, m, d),
                          (nt.HEADS, nt.EXPERT, nt.EMBED, None), param_dtype,
                          2, 3)
    self.w_o_NEDM = _init(rngs, (n, e, d, m),
                          (nt.HEADS, nt.EXPERT, None, nt.EMBED), param_dtype,
                          (0, 2), 3)
    gate_init = nnx.initializers.variance_scaling(0.1, "fan_in",
                                                  "truncated_normal",
                                                  in_axis=0, out_axis=(1, 2))
    self.w_sv_MNE = params_lib.param(rngs, gate_init, (m, n, e),
                                     (nt.EMBED, nt.HEADS, nt.EXPERT),
                                     jnp.float32)
    self.w_so_MNE = params_lib.param(rngs, gate_init, (m, n, e),
                                     (nt.EMBED, nt.HEADS, nt.EXPERT),
                                     jnp.float32)

  def gates(self, x_BLM, w_MNE):
    """<float32>[B, L, N, E]: sigmoid gates kept on each head's top-k."""
    s_BLNE = jax.nn.sigmoid(jnp.einsum("BLM,MNE->BLNE",
                                       x_BLM.astype(jnp.float32), w_MNE[...]))
    return jnp.where(top_k_mask(s_BLNE, self.k), s_BLNE, 0.0)

  def init_cache(self, batch, max_length):
    """An empty LayerCache (moejax.layers.kv_cache) of each head's rotated
    keys and *mixed* values, {'k', 'v': [B, T, N, D]} with T = max_length:
    a key token's value mixture depends on that token alone (its own
    sigmoid gates), so it is cached mixed, not per expert; the output
    gates act on each query token alone and need nothing cached."""
    shape = ((self.num_heads, self.head_dim), self.dtype)
    return kv_cache.init(batch, max_length, {"k": shape, "v": shape})

  def __call__(self, x_BLM, *, padding_mask_BL=None, segment_ids_BL=None,
               positions_BL=None, cache=None):
    """<float>[B, L, M] -> <dtype>[B, L, M].

    Args as MultiHeadAttention: with a LayerCache (init_cache) the queries
    also read the cached keys (causality then follows positions_BL, which
    is required) and the result is (y_BLM, the cache with the new keys).
    """
    b, l, _ = x_BLM.shape
    dt = self.dtype
    x_BLM = x_BLM.astype(dt)
    w = lambda p: p[...].astype(dt)
    positions_BL = self._positions(b, l, positions_BL, segment_ids_BL,
                                   cache)
    q_BLND = self._rope(jnp.einsum("BLM,MND->BLND", x_BLM, w(self.w_q_MND)),
                        positions_BL)
    k_BJND = self._rope(jnp.einsum("BJM,MND->BJND", x_BLM, w(self.w_k_MND)),
                        positions_BL)
    sv_BJNE = self.gates(x_BLM, self.w_sv_MNE).astype(dt)
    v_BJND = jnp.einsum("BJM,NEMD,BJNE->BJND", x_BLM, w(self.w_v_NEMD),
                        sv_BJNE)
    k_BJND, v_BJND, mask_BLJ, cache = self._keys(
        k_BJND, v_BJND, positions_BL, padding_mask_BL, segment_ids_BL, cache)
    o_BLND = _softmax_attend(q_BLND, k_BJND, v_BJND, mask_BLJ, self.head_dim)
    so_BLNE = self.gates(x_BLM, self.w_so_MNE).astype(dt)
    y_BLM = jnp.einsum("BLND,NEDM,BLNE->BLM", o_BLND, w(self.w_o_NEDM),
                       so_BLNE)
    return y_BLM if cache is None else (y_BLM, cache)


def _replace_attention(model, make, every):
  validation.check_int("every", every, 1)
  for i, block in enumerate(model.blocks):
    if (i + 1) % every == 0:
      old = block.attention
      block.attention = make(old)
  return model


def apply_moa(model, *, num_experts=8, k=2, head_dim=None, every=1,
              rngs):
  """Replaces the attention of every `every`-th block of `model` by
  MoAAttention (same width, causality, RoPE; head_dim defaults to the old
  one). Returns the model."""
  return _replace_attention(model, lambda old: MoAAttention(
      old.model_dim, num_experts=num_experts, k=k,
      head_dim=head_dim or old.head_dim, causal=old.causal,
      rope_max_wavelength=old.rope_max_wavelength, dtype=old.dtype,
      rngs=rngs), every)


def apply_switchhead(model, *, num_heads=None, num_experts=4, k=2,
                     head_dim=None, every=1, rngs):
  """Replaces the attention of every `every`-th block of `model` by
  SwitchHeadAttention (num_heads and head_dim default to the old ones)."""
  return _replace_attention(model, lambda old: SwitchHeadAttention(
      old.model_dim, num_heads=num_heads or old.num_heads,
      num_experts=num_experts, k=k, head_dim=head_dim or old.head_dim,
      causal=old.causal, rope_max_wavelength=old.rope_max_wavelength,
      dtype=old.dtype, rngs=rngs), every)
