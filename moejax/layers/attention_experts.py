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

Both are drop-in replacements of MultiHeadAttention (same call); the
experts are computed densely and masked (E query projections / E value and
output projections per token), which is exact and simple; the FLOP savings
of the papers need a gather-based kernel. They report no auxiliary loss
(SwitchHead trains without one; MoA's balance loss would need the block to
return the attention's aux). JetMoE's attention is the SwitchHead/MoA family;
loading its checkpoints is the pretrained-models issue's.

`apply_moa(model, ...)`, `apply_switchhead(model, ...)` replace the attention
of a model's blocks in place (DecoderLM(wrappers={'moa': {...}})).
"""

from typing import Optional

from flax import nnx
import jax
import jax.numpy as jnp

from moejax import notation as nt
from moejax.layers import params as params_lib
from moejax.layers import transformer as tfm
from moejax.routing import validation


def attention_mask(b, l, *, causal, padding_mask_BL=None, segment_ids_BL=None):
  """<bool>[B, L, J]: which key j query l attends (as MultiHeadAttention)."""
  mask_BLJ = jnp.ones((b, l, l), jnp.bool_)
  if causal:
    mask_BLJ = mask_BLJ & jnp.tril(jnp.ones((l, l), jnp.bool_))[None]
  if padding_mask_BL is not None:
    mask_BLJ = mask_BLJ & padding_mask_BL.astype(jnp.bool_)[:, None, :]
  if segment_ids_BL is not None:
    mask_BLJ = mask_BLJ & (segment_ids_BL[:, :, None] ==
                           segment_ids_BL[:, None, :])
  return mask_BLJ


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


def _init(rngs, shape, names, param_dtype, in_axis, out_axis):
  init = nnx.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)
  return params_lib.param(rngs, init, shape, names, param_dtype)


class MoAAttention(_RoutedAttention):
  """Mixture of attention heads (MoA): routed query/output projections over
  one shared key/value head.

  Args:
    model_dim: M.
    num_experts: E head experts.
    k: heads per token.
    head_dim: D.
    causal, rope_max_wavelength, dtype, param_dtype, rngs: as
      MultiHeadAttention.
  Parameters: w_gate_ME [M, E] (float32); w_q_EMD [E, M, D]; w_o_EDM
    [E, D, M]; w_k_MD, w_v_MD [M, D].
  num_heads is E (every head is computed; accounting reads it).
  """

  def __init__(self, model_dim, *, num_experts=8, k=2, head_dim=16,
               causal=True, rope_max_wavelength=10_000.0, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs):
    self._init_common(model_dim, num_experts, k, head_dim, causal,
                      rope_max_wavelength, dtype)
    self.num_heads = num_experts
    m, e, d = model_dim, num_experts, head_dim
    self.w_gate_ME = params_lib.param(
        rngs, nnx.initializers.variance_scaling(0.1, "fan_in",
                                                "truncated_normal"),
        (m, e), (nt.EMBED, nt.EXPERT), jnp.float32)
    self.w_q_EMD = _init(rngs, (e, m, d), (nt.EXPERT, nt.EMBED, None),
                         param_dtype, 1, 2)
    self.w_o_EDM = _init(rngs, (e, d, m), (nt.EXPERT, None, nt.EMBED),
                         param_dtype, 1, 2)
    self.w_k_MD = _init(rngs, (m, d), (nt.EMBED, None), param_dtype, 0, 1)
    self.w_v_MD = _init(rngs, (m, d), (nt.EMBED, None), param_dtype, 0, 1)

  def gates(self, x_BLM):
    """<float32>[B, L, E]: renormalised top-k softmax gates (0 elsewhere)."""
    probs_BLE = jax.nn.softmax(jnp.einsum(
        "BLM,ME->BLE", x_BLM.astype(jnp.float32), self.w_gate_ME[...]), -1)
    picked_BLE = jnp.where(top_k_mask(probs_BLE, self.k), probs_BLE, 0.0)
    return picked_BLE / jnp.sum(picked_BLE, -1, keepdims=True)

  def __call__(self, x_BLM, *, padding_mask_BL=None, segment_ids_BL=None,
               positions_BL=None):
    """<float>[B, L, M] -> <dtype>[B, L, M]."""
    b, l, _ = x_BLM.shape
    dt = self.dtype
    x_BLM = x_BLM.astype(dt)
    w = lambda p: p[...].astype(dt)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(l), (b, l))
    q_BLED = self._rope(jnp.einsum("BLM,EMD->BLED", x_BLM, w(self.w_q_EMD)),
                        positions_BL)
    k_BJ1D = self._rope(jnp.einsum("BJM,MD->BJD", x_BLM, w(self.w_k_MD))
                        [:, :, None], positions_BL)
    v_BJ1D = jnp.einsum("BJM,MD->BJD", x_BLM, w(self.w_v_MD))[:, :, None]
    mask_BLJ = attention_mask(b, l, causal=self.causal,
                              padding_mask_BL=padding_mask_BL,
                              segment_ids_BL=segment_ids_BL)
    e = self.num_experts
    # Shared K/V: every expert head attends the same single key/value head.
    o_BLED = _softmax_attend(q_BLED, jnp.broadcast_to(k_BJ1D, (b, l, e, self.head_dim)),
                             jnp.broadcast_to(v_BJ1D, (b, l, e, self.head_dim)),
                             mask_BLJ, self.head_dim)
    g_BLE = self.gates(x_BLM).astype(dt)
    return jnp.einsum("BLED,EDM,BLE->BLM", o_BLED, w(self.w_o_EDM), g_BLE)


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

  def __call__(self, x_BLM, *, padding_mask_BL=None, segment_ids_BL=None,
               positions_BL=None):
    """<float>[B, L, M] -> <dtype>[B, L, M]."""
    b, l, _ = x_BLM.shape
    dt = self.dtype
    x_BLM = x_BLM.astype(dt)
    w = lambda p: p[...].astype(dt)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(l), (b, l))
    q_BLND = self._rope(jnp.einsum("BLM,MND->BLND", x_BLM, w(self.w_q_MND)),
                        positions_BL)
    k_BJND = self._rope(jnp.einsum("BJM,MND->BJND", x_BLM, w(self.w_k_MND)),
                        positions_BL)
    sv_BJNE = self.gates(x_BLM, self.w_sv_MNE).astype(dt)
    v_BJND = jnp.einsum("BJM,NEMD,BJNE->BJND", x_BLM, w(self.w_v_NEMD),
                        sv_BJNE)
    mask_BLJ = attention_mask(b, l, causal=self.causal,
                              padding_mask_BL=padding_mask_BL,
                              segment_ids_BL=segment_ids_BL)
    o_BLND = _softmax_attend(q_BLND, k_BJND, v_BJND, mask_BLJ, self.head_dim)
    so_BLNE = self.gates(x_BLM, self.w_so_MNE).astype(dt)
    return jnp.einsum("BLND,NEDM,BLNE->BLM", o_BLND, w(self.w_o_NEDM),
                      so_BLNE)


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
