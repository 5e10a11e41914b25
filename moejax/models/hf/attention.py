"""The attention forms of the HF families, on moejax.layers.attention's core.

GQAttention: grouped-query attention with optional q/k/v and output biases,
QK-norm per head (Qwen3) or over all heads (OLMoE), OLMoE's clip_qkv,
sliding windows and learned sinks (GPT-OSS). MLAttention: DeepSeek's
multi-head latent attention with its decoupled rotary part. MoAttention:
JetMoE's attention experts (moejax.layers.attention_experts.MoAAttention).

All three take explicit positions and decode with a KV cache
(`init_cache`, moejax.layers.kv_cache) of what rebuilds their keys and
values: GQA's and MoA's rotated keys and values, MLA's latent.
"""

from flax import nnx
import jax.numpy as jnp

from moejax import notation as nt
from moejax.layers import attention as core
from moejax.layers import attention_experts
from moejax.layers import kv_cache
from moejax.layers import params as params_lib
from moejax.layers import transformer as tfm
from moejax.models.hf import rope as rope_lib


def _param(rngs, shape, names, dtype, init=None):
  init = init or nnx.initializers.normal(0.02)
  return params_lib.param(rngs, init, shape, names, dtype)


def _zeros(rngs, shape, names, dtype):
  return params_lib.param(rngs, nnx.initializers.zeros_init(), shape, names,
                          dtype)


class GQAttention(nnx.Module):
  """Grouped-query self-attention (Mixtral, OLMoE, Qwen, GPT-OSS).

  Parameters: w_q_MND [M, N, D], w_k_MKD, w_v_MKD [M, K, D], w_o_NDM
  [N, D, M]; with qkv_bias b_q_ND, b_k_KD, b_v_KD; with o_bias b_o_M;
  qk_norm 'head': q_norm, k_norm RMSNorm [D]; 'full': q_norm [N*D], k_norm
  [K*D]; sinks: sinks_N [N] float32.
  """

  def __init__(self, spec, model_dim, rope, *, norm_eps, window=None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    self.spec = spec
    self.window = window
    self.dtype = dtype
    inv_freq, self.rope_factor = rope_lib.frequencies(rope)
    self.inv_freq = tuple(float(v) for v in inv_freq)  # static, not a param
    self.interleaved = rope.interleaved
    m, n, k, d = model_dim, spec.num_heads, spec.num_kv_heads, spec.head_dim
    pd = param_dtype
    self.w_q_MND = _param(rngs, (m, n, d), (nt.EMBED, nt.HEADS, None), pd)
    self.w_k_MKD = _param(rngs, (m, k, d), (nt.EMBED, nt.HEADS, None), pd)
    self.w_v_MKD = _param(rngs, (m, k, d), (nt.EMBED, nt.HEADS, None), pd)
    self.w_o_NDM = _param(rngs, (n, d, m), (nt.HEADS, None, nt.EMBED), pd)
    qkv = spec.qkv_bias
    self.b_q_ND = _zeros(rngs, (n, d), (nt.HEADS, None), pd) if qkv else None
    self.b_k_KD = _zeros(rngs, (k, d), (nt.HEADS, None), pd) if qkv else None
    self.b_v_KD = _zeros(rngs, (k, d), (nt.HEADS, None), pd) if qkv else None
    self.b_o_M = (_zeros(rngs, (m,), (nt.EMBED,), pd) if spec.o_bias
                  else None)
    norm_kw = dict(eps=norm_eps, dtype=dtype, param_dtype=pd, rngs=rngs)
    if spec.qk_norm == "head":
      self.q_norm = tfm.RMSNorm(d, **norm_kw)
      self.k_norm = tfm.RMSNorm(d, **norm_kw)
    elif spec.qk_norm == "full":
      self.q_norm = tfm.RMSNorm(n * d, **norm_kw)
      self.k_norm = tfm.RMSNorm(k * d, **norm_kw)
    else:
      self.q_norm = self.k_norm = None
    self.sinks_N = (_zeros(rngs, (n,), (nt.HEADS,), jnp.float32)
                    if spec.sinks else None)

  def project(self, x_BLM, positions_BL):
    """<float>[B, L, M] -> (q_BLND, k_BLKD, v_BLKD), rotated and normed."""
    dt = self.dtype
    x = x_BLM.astype(dt)
    w = lambda p: p[...].astype(dt)
    q = jnp.einsum("BLM,MND->BLND", x, w(self.w_q_MND))
    k = jnp.einsum("BLM,MKD->BLKD", x, w(self.w_k_MKD))
    v = jnp.einsum("BLM,MKD->BLKD", x, w(self.w_v_MKD))
    if self.b_q_ND is not None:
      q, k, v = q + w(self.b_q_ND), k + w(self.b_k_KD), v + w(self.b_v_KD)
    clip = self.spec.clip_qkv
    if clip is not None:
      q, k, v = (jnp.clip(t, -clip, clip) for t in (q, k, v))
    if self.spec.qk_norm == "head":
      q, k = self.q_norm(q), self.k_norm(k)
    elif self.spec.qk_norm == "full":
      b, l = x.shape[:2]
      q = self.q_norm(q.reshape(b, l, -1)).reshape(q.shape)
      k = self.k_norm(k.reshape(b, l, -1)).reshape(k.shape)
    return self._rotate(q, positions_BL), self._rotate(k, positions_BL), v

  def _rotate(self, x_BLND, positions_BL):
    """Rotary embedding of the first rope_dim features (all but with a
    partial_rotary_factor < 1, GLM-4-MoE)."""
    r = 2 * len(self.inv_freq)
    rot = rope_lib.apply_rotary(x_BLND[..., :r], positions_BL, self.inv_freq,
                                self.rope_factor,
                                interleaved=self.interleaved)
    if r == x_BLND.shape[-1]:
      return rot
    return jnp.concatenate([rot, x_BLND[..., r:]], axis=-1)

  def init_cache(self, batch, max_length):
    """An empty LayerCache of rotated keys and values: max_length slots, or
    the sliding window's W (a rolling buffer)."""
    s = self.spec
    slots = max_length if self.window is None else min(self.window,
                                                       max_length)
    shape = ((s.num_kv_heads, s.head_dim), self.dtype)
    return kv_cache.init(batch, slots, {"k": shape, "v": shape})

  def __call__(self, x_BLM, positions_BL, *, key_mask_BL=None, cache=None):
    """<float>[B, L, M] -> <dtype>[B, L, M] (causal; keys masked by
    key_mask_BL, the padding mask).

    With a LayerCache (init_cache) the queries also read the cached keys,
    and the result is (y_BLM, cache with the new keys written).
    """
    q, k, v = self.project(x_BLM, positions_BL)
    if cache is None:
      mask_BLJ = core.attention_mask(positions_BL, positions_BL,
                                     key_mask_BJ=key_mask_BL,
                                     sliding_window=self.window)
    else:
      entries, mask_BLJ, cache = kv_cache.extend_with_mask(
          cache, {"k": k, "v": v}, positions_BL, key_mask_BL,
          sliding_window=self.window)
      k, v = entries["k"], entries["v"]
    sinks = None if self.sinks_N is None else self.sinks_N[...]
    out_BLND = core.attend(q, k, v, mask_BLJ, scale=self.spec.scale,
                           sinks_N=sinks)
    y = jnp.einsum("BLND,NDM->BLM", out_BLND, self.w_o_NDM[...].astype(
        self.dtype))
    if self.b_o_M is not None:
      y = y + self.b_o_M[...].astype(self.dtype)
    return y if cache is None else (y, cache)


class MLAttention(nnx.Module):
  """DeepSeek-V2/V3 multi-head latent attention.

  q = W_qb(norm(W_qa x)) (or W_q x when q_lora_rank is None), split into a
  non-rotary part [Dn] and a rotary part [Dr]; the latent c = norm(W_kva x)
  [C] expands through W_kvb into per-head k_nope [Dn] and v [Dv]; one rotary
  key [Dr] (from W_kva x) is shared by all heads.

  Parameters: w_q_a_MR [M, R], q_a_norm [R], w_q_b_RNE [R, N, Dn + Dr] (or
  w_q_MNE [M, N, Dn + Dr]); w_kv_a_MA [M, C + Dr], kv_a_norm [C],
  w_kv_b_CNF [C, N, Dn + Dv]; w_o_NVM [N, Dv, M]; with attention_bias
  b_q_a_R, b_kv_a_A, b_o_M.
  """

  def __init__(self, spec, model_dim, rope, *, norm_eps, window=None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    del window
    self.spec = spec
    self.dtype = dtype
    inv_freq, self.rope_factor = rope_lib.frequencies(rope)
    self.inv_freq = tuple(float(v) for v in inv_freq)  # static, not a param
    self.interleaved = rope.interleaved
    m, n = model_dim, spec.num_heads
    dn, dr, dv = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
    c, r = spec.kv_lora_rank, spec.q_lora_rank
    pd = param_dtype
    norm_kw = dict(eps=norm_eps, dtype=dtype, param_dtype=pd, rngs=rngs)
    bias = spec.qkv_bias
    if r is None:
      self.w_q_MNE = _param(rngs, (m, n, dn + dr), (nt.EMBED, nt.HEADS, None),
                            pd)
      self.w_q_a_MR = self.q_a_norm = self.w_q_b_RNE = self.b_q_a_R = None
    else:
      self.w_q_MNE = None
      self.w_q_a_MR = _param(rngs, (m, r), (nt.EMBED, None), pd)
      self.b_q_a_R = _zeros(rngs, (r,), (None,), pd) if bias else None
      self.q_a_norm = tfm.RMSNorm(r, **norm_kw)
      self.w_q_b_RNE = _param(rngs, (r, n, dn + dr), (None, nt.HEADS, None),
                              pd)
    self.w_kv_a_MA = _param(rngs, (m, c + dr), (nt.EMBED, None), pd)
    self.b_kv_a_A = _zeros(rngs, (c + dr,), (None,), pd) if bias else None
    self.kv_a_norm = tfm.RMSNorm(c, **norm_kw)
    self.w_kv_b_CNF = _param(rngs, (c, n, dn + dv), (None, nt.HEADS, None), pd)
    self.w_o_NVM = _param(rngs, (n, dv, m), (nt.HEADS, None, nt.EMBED), pd)
    self.b_o_M = _zeros(rngs, (m,), (nt.EMBED,), pd) if spec.o_bias else None

  def _rotate(self, x_BLND, positions_BL):
    return rope_lib.apply_rotary(x_BLND, positions_BL, self.inv_freq,
                                 self.rope_factor,
                                 interleaved=self.interleaved)

  def queries(self, x_BLM, positions_BL):
    """<float>[B, L, M] -> q_BLNE, E = Dn + Dr (the rotary part rotated)."""
    dn, dt = self.spec.qk_nope_head_dim, self.dtype
    x = x_BLM.astype(dt)
    w = lambda p: p[...].astype(dt)
    if self.w_q_MNE is not None:
      q = jnp.einsum("BLM,MNE->BLNE", x, w(self.w_q_MNE))
    else:
      qa = jnp.einsum("BLM,MR->BLR", x, w(self.w_q_a_MR))
      if self.b_q_a_R is not None:
        qa = qa + w(self.b_q_a_R)
      q = jnp.einsum("BLR,RNE->BLNE", self.q_a_norm(qa), w(self.w_q_b_RNE))
    return jnp.concatenate([q[..., :dn], self._rotate(q[..., dn:],
                                                      positions_BL)], axis=-1)

  def compress(self, x_BLM, positions_BL):
    """<float>[B, L, M] -> (latent_BLC normed, k_rot_BLR rotated): what a
    KV cache stores per token (C + R numbers instead of N * (Dn + Dr + Dv))."""
    s, dt = self.spec, self.dtype
    kva = jnp.einsum("BLM,MA->BLA", x_BLM.astype(dt),
                     self.w_kv_a_MA[...].astype(dt))
    if self.b_kv_a_A is not None:
      kva = kva + self.b_kv_a_A[...].astype(dt)
    latent_BLC, k_rot_BLR = kva[..., :s.kv_lora_rank], kva[..., s.kv_lora_rank:]
    k_rot_BLR = self._rotate(k_rot_BLR[:, :, None, :], positions_BL)[:, :, 0]
    return self.kv_a_norm(latent_BLC), k_rot_BLR

  def expand(self, latent_BJC, k_rot_BJR):
    """Latents -> (k_BJNE, v_BJNV): per-head keys (the rotary key shared by
    all heads) and values."""
    dn = self.spec.qk_nope_head_dim
    kv = jnp.einsum("BJC,CNF->BJNF", latent_BJC.astype(self.dtype),
                    self.w_kv_b_CNF[...].astype(self.dtype))
    k_nope, v = kv[..., :dn], kv[..., dn:]
    k_rot = jnp.broadcast_to(k_rot_BJR[:, :, None, :].astype(k_nope.dtype),
                             k_nope.shape[:-1] + k_rot_BJR.shape[-1:])
    return jnp.concatenate([k_nope, k_rot], axis=-1), v

  def project(self, x_BLM, positions_BL):
    """-> (q_BLNE, k_BLNE, v_BLNV) with E = Dn + Dr."""
    return (self.queries(x_BLM, positions_BL),
            *self.expand(*self.compress(x_BLM, positions_BL)))

  def init_cache(self, batch, max_length):
    """An empty LayerCache of the compressed latents and rotary keys."""
    s = self.spec
    return kv_cache.init(batch, max_length, {
        "latent": ((s.kv_lora_rank,), self.dtype),
        "k_rot": ((s.qk_rope_head_dim,), self.dtype)})

  def __call__(self, x_BLM, positions_BL, *, key_mask_BL=None, cache=None):
    """<float>[B, L, M] -> <dtype>[B, L, M] (causal); with a LayerCache,
    (y_BLM, cache with the new latents written)."""
    q = self.queries(x_BLM, positions_BL)
    latent, k_rot = self.compress(x_BLM, positions_BL)
    if cache is None:
      mask_BLJ = core.attention_mask(positions_BL, positions_BL,
                                     key_mask_BJ=key_mask_BL)
    else:
      entries, mask_BLJ, cache = kv_cache.extend_with_mask(
          cache, {"latent": latent, "k_rot": k_rot}, positions_BL,
          key_mask_BL)
      latent, k_rot = entries["latent"], entries["k_rot"]
    k, v = self.expand(latent, k_rot)
    out = core.attend(q, k, v, mask_BLJ, scale=self.spec.scale)
    y = jnp.einsum("BLNV,NVM->BLM", out, self.w_o_NVM[...].astype(self.dtype))
    if self.b_o_M is not None:
      y = y + self.b_o_M[...].astype(self.dtype)
    return y if cache is None else (y, cache)


class MoAttention(nnx.Module):
  """JetMoE's attention experts: moejax.layers.attention_experts.
  MoAAttention (num_kv_heads=K, output_bias) under the HF block's call.

  Parameters: moa (MoAAttention: w_gate_ME, w_q_EMKD, w_k_MKD, w_v_MKD,
  w_o_EKDM, b_out_M). Its KV cache is MoAAttention's: the K shared rotated
  key/value heads, as GQA's (the routed projections need nothing cached).
  """

  def __init__(self, spec, model_dim, rope, *, norm_eps, window=None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    del norm_eps  # no QK-norm in this form
    if window is not None:
      raise ValueError(f"the 'moa' attention form has no sliding window, "
                       f"got window={window}")
    if rope.kind != "default" or 2 * (rope.dim // 2) != spec.head_dim:
      raise ValueError(f"the 'moa' attention form needs the default "
                       f"full-width RoPE, got {rope.kind!r} over {rope.dim}")
    self.spec = spec
    self.moa = attention_experts.MoAAttention(
        model_dim, num_experts=spec.moa_experts, k=spec.moa_k,
        head_dim=spec.head_dim, num_kv_heads=spec.num_kv_heads,
        output_bias=spec.o_bias, causal=True, rope_max_wavelength=rope.theta,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def init_cache(self, batch, max_length):
    """An empty LayerCache of the shared rotated keys and values
    ({'k', 'v': [B, T, K, D]}, T = max_length)."""
    return self.moa.init_cache(batch, max_length)

  def __call__(self, x_BLM, positions_BL, *, key_mask_BL=None, cache=None):
    """<float>[B, L, M] -> <dtype>[B, L, M] (causal; keys masked by
    key_mask_BL); with a LayerCache (init_cache), (y_BLM, cache with the
    new keys written)."""
    return self.moa(x_BLM, padding_mask_BL=key_mask_BL,
                    positions_BL=positions_BL, cache=cache)


FORMS = {"gqa": GQAttention, "mla": MLAttention, "moa": MoAttention}
