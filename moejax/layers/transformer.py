"""Transformer building blocks: norms, rotary positions, attention, a block
with a pluggable FFN (dense, MoE or Soft MoE), and helpers for the MoE aux.

The models that stack these blocks (DecoderLM, ViTClassifier) live in
moejax.models.

Letters (moejax.notation): B batch, L query positions, J attended (key/value)
positions, M model width, N heads, D head width.
"""

from typing import Optional

from flax import nnx
import jax
import jax.numpy as jnp

from moejax import notation as nt
from moejax.layers import attention as attention_lib
from moejax.layers import kv_cache
from moejax.layers import moe as moe_lib
from moejax.layers import params as params_lib
from moejax.layers import soft_moe as soft_moe_lib

NORMS = ("rmsnorm", "layernorm")


def _check_int(name, value, minimum):
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32.

  Parameters: scale_M [M] (embed), initialised to 1.
  """

  def __init__(self, dim, *, eps=1e-6, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs):
    _check_int("dim", dim, 1)
    self.eps = eps
    self.dtype = dtype
    self.scale_M = params_lib.param(rngs, nnx.initializers.ones_init(),
                                    (dim,), (nt.EMBED,), param_dtype)

  def __call__(self, x_XM):
    """<any float>[..., M] -> <dtype>[..., M]."""
    x = x_XM.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale_M[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
  """y = (x - mean) / sqrt(var + eps) * scale + bias, computed in float32.

  Parameters: scale_M [M] (init 1), bias_M [M] (init 0), both (embed).
  """

  def __init__(self, dim, *, eps=1e-6, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs):
    _check_int("dim", dim, 1)
    self.eps = eps
    self.dtype = dtype
    self.scale_M = params_lib.param(rngs, nnx.initializers.ones_init(),
                                    (dim,), (nt.EMBED,), param_dtype)
    self.bias_M = params_lib.param(rngs, nnx.initializers.zeros_init(),
                                   (dim,), (nt.EMBED,), param_dtype)

  def __call__(self, x_XM):
    """<any float>[..., M] -> <dtype>[..., M]."""
    x = x_XM.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale_M[...].astype(jnp.float32) + self.bias_M[...].astype(
        jnp.float32)
    return y.astype(self.dtype)


def make_norm(norm, dim, *, eps=1e-6, dtype=jnp.float32,
              param_dtype=jnp.float32, rngs):
  """RMSNorm ('rmsnorm') or LayerNorm ('layernorm')."""
  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r}; allowed: {list(NORMS)}")
  cls = RMSNorm if norm == "rmsnorm" else LayerNorm
  return cls(dim, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def apply_rope(x_BLND, positions_BL, *, max_wavelength=10_000.0):
  """Rotary position embedding (RoFormer), rotate-half convention.

  Pairs feature i with feature i + D/2 and rotates the pair by angle
  position * max_wavelength^(-2i/D). Math in float32.

  Args:
    x_BLND: <float>[B, L, N, D] queries or keys; D must be even.
    positions_BL: <int or float>[B, L] token positions.
    max_wavelength: the RoPE base (10_000 in RoFormer/LLaMA).
  Returns:
    x_BLND's dtype, [B, L, N, D].
  """
  d = x_BLND.shape[-1]
  if d % 2:
    raise ValueError(f"rotary embeddings need an even head width D, got {d}")
  half = d // 2
  inv_freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)
  # angle: [B, L, D/2] -> broadcast over heads.
  angle = positions_BL.astype(jnp.float32)[..., None] * inv_freq
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x = x_BLND.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLND.dtype)


class MultiHeadAttention(nnx.Module):
  """Multi-head self-attention with optional causal mask and RoPE.

  q/k/v: 'BLM,MND->BLND'; then the attention core (moejax.layers.attention:
  jax.nn.dot_product_attention, scale D^-0.5, masked causal j <= l, key
  padding, equal segment ids); output 'BLND,NDM->BLM'.

  Args:
    model_dim: M.
    num_heads: N.
    head_dim: D; None = M // N (then N must divide M).
    causal: mask attention to later positions.
    rope_max_wavelength: RoPE base; None disables rotary embeddings.
    dtype, param_dtype: compute and parameter dtypes (scores and softmax are
      float32).
    rngs: nnx.Rngs with a 'params' stream.
  Parameters: w_q_MND, w_k_MND, w_v_MND [M, N, D] (embed, heads, -);
    w_o_NDM [N, D, M] (heads, -, embed).
  """

  def __init__(self, model_dim, num_heads, *, head_dim=None, causal=True,
               rope_max_wavelength=10_000.0, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs):
    _check_int("model_dim", model_dim, 1)
    _check_int("num_heads", num_heads, 1)
    if head_dim is None:
      if model_dim % num_heads:
        raise ValueError(f"num_heads {num_heads} must divide model_dim "
                         f"{model_dim}, or pass head_dim")
      head_dim = model_dim // num_heads
    _check_int("head_dim", head_dim, 1)
    if rope_max_wavelength is not None and head_dim % 2:
      raise ValueError(f"rotary embeddings need an even head_dim, got "
                       f"{head_dim}; pass rope_max_wavelength=None to disable")
    self.model_dim, self.num_heads = model_dim, num_heads
    self.head_dim = head_dim
    self.causal = causal
    self.rope_max_wavelength = rope_max_wavelength
    self.dtype = dtype
    m, n, d = model_dim, num_heads, head_dim
    in_init = nnx.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))
    out_init = nnx.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
    names_in = (nt.EMBED, nt.HEADS, None)
    self.w_q_MND = params_lib.param(rngs, in_init, (m, n, d), names_in,
                                    param_dtype)
    self.w_k_MND = params_lib.param(rngs, in_init, (m, n, d), names_in,
                                    param_dtype)
    self.w_v_MND = params_lib.param(rngs, in_init, (m, n, d), names_in,
                                    param_dtype)
    self.w_o_NDM = params_lib.param(rngs, out_init, (n, d, m),
                                    (nt.HEADS, None, nt.EMBED), param_dtype)

  def init_cache(self, batch, max_length):
    """An empty LayerCache (moejax.layers.kv_cache) of rotated keys and
    values, max_length slots, for decoding."""
    shape = ((self.num_heads, self.head_dim), self.dtype)
    return kv_cache.init(batch, max_length, {"k": shape, "v": shape})

  def __call__(self, x_BLM, *, padding_mask_BL=None, segment_ids_BL=None,
               positions_BL=None, cache=None):
    """Attends over the sequence.

    Args:
      x_BLM: <float>[B, L, M].
      padding_mask_BL: optional <bool>[B, L]; padded keys are not attended
        (outputs at padded queries are finite but meaningless).
      segment_ids_BL: optional <int>[B, L]; a query attends only to keys with
        the same id (packed sequences).
      positions_BL: optional <int>[B, L] positions for RoPE; default
        0..L-1 in every row.
      cache: optional LayerCache (init_cache): the queries also read the
        cached keys; causality then follows positions_BL (required).
    Returns:
      <dtype>[B, L, M]; with a cache, (y_BLM, the cache with the new keys).
    """
    b, l, _ = x_BLM.shape
    dt = self.dtype
    x_BLM = x_BLM.astype(dt)
    w = lambda p: p[...].astype(dt)
    q_BLND = jnp.einsum("BLM,MND->BLND", x_BLM, w(self.w_q_MND))
    k_BJND = jnp.einsum("BJM,MND->BJND", x_BLM, w(self.w_k_MND))
    v_BJND = jnp.einsum("BJM,MND->BJND", x_BLM, w(self.w_v_MND))
    if self.rope_max_wavelength is not None:
      if positions_BL is None:
        positions_BL = attention_lib.default_positions(b, l)
      q_BLND = apply_rope(q_BLND, positions_BL,
                          max_wavelength=self.rope_max_wavelength)
      k_BJND = apply_rope(k_BJND, positions_BL,
                          max_wavelength=self.rope_max_wavelength)
    if cache is None:
      # Causality by index (positions_BL may restart within a packed row).
      index_BL = attention_lib.default_positions(b, l)
      mask_BLJ = attention_lib.attention_mask(
          index_BL, index_BL, causal=self.causal,
          key_mask_BJ=padding_mask_BL, segment_ids_BL=segment_ids_BL)
    else:
      if positions_BL is None or segment_ids_BL is not None:
        raise ValueError("decoding with a cache needs positions_BL and no "
                         "segment_ids_BL (one sequence per row)")
      entries, mask_BLJ, cache = kv_cache.extend_with_mask(
          cache, {"k": k_BJND, "v": v_BJND}, positions_BL, padding_mask_BL,
          causal=self.causal)
      k_BJND, v_BJND = entries["k"], entries["v"]
    out_BLND = attention_lib.attend(q_BLND, k_BJND, v_BJND, mask_BLJ,
                                    scale=self.head_dim ** -0.5)
    y_BLM = jnp.einsum("BLND,NDM->BLM", out_BLND, w(self.w_o_NDM))
    return y_BLM if cache is None else (y_BLM, cache)


def is_moe_ffn(ffn):
  """True for FFNs that return (y, MoEAux): MoELayer, SoftMoELayer, or any
  module that declares `returns_aux = True`."""
  return isinstance(ffn, (moe_lib.MoELayer, soft_moe_lib.SoftMoELayer)) or (
      bool(getattr(ffn, "returns_aux", False)))


def non_causal_reason(ffn):
  """Why `ffn` would leak future tokens in a causal model, or None."""
  if not is_moe_ffn(ffn) or getattr(ffn, "causal", True):
    return None
  if isinstance(ffn, soft_moe_lib.SoftMoELayer):
    return "Soft MoE mixes every token of a group into every slot"
  router = getattr(ffn, "router", None)
  return (f"router {type(router).__name__} reads later tokens of its group"
          if router is not None else
          f"{type(ffn).__name__} reads later tokens of its group")


class TransformerBlock(nnx.Module):
  """Pre-norm block: x += attn(norm(x)); x += ffn(norm(x)).

  The FFN is a module built by the caller: DenseFFN, MoELayer (any router or
  engine) or SoftMoELayer (non-causal blocks only).

  Args:
    model_dim, num_heads, head_dim: M, N, D (see MultiHeadAttention).
    ffn: the FFN module; DenseFFN returns y, MoE layers return (y, MoEAux).
    causal: causal attention; with causal=True an FFN that reads later tokens
      (Soft MoE, expert choice, BASE, batch-prioritized routing) raises
      ValueError unless allow_non_causal=True.
    rope_max_wavelength: RoPE base, None for no rotary embeddings.
    norm: 'rmsnorm' or 'layernorm'; norm_eps its epsilon.
    dtype, param_dtype, rngs: as the layers.
  """

  def __init__(self, model_dim, num_heads, *, ffn, head_dim=None, causal=True,
               allow_non_causal=False, rope_max_wavelength=10_000.0,
               norm="rmsnorm", norm_eps=1e-6, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs):
    if not isinstance(ffn, nnx.Module):
      raise ValueError(f"ffn must be an nnx.Module (DenseFFN, MoELayer or "
                       f"SoftMoELayer), got {type(ffn).__name__}")
    reason = non_causal_reason(ffn) if causal else None
    if reason and not allow_non_causal:
      raise ValueError(
          f"{reason}, so in a causal block a token's output would depend on "
          f"future tokens. Use a token-choice router, or pass "
          f"allow_non_causal=True to accept the leak knowingly.")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attention_norm = make_norm(norm, model_dim, eps=norm_eps, **kw)
    self.attention = MultiHeadAttention(
        model_dim, num_heads, head_dim=head_dim, causal=causal,
        rope_max_wavelength=rope_max_wavelength, **kw)
    self.ffn_norm = make_norm(norm, model_dim, eps=norm_eps, **kw)
    self.ffn = ffn
    self.is_moe = is_moe_ffn(ffn)
    self.dtype = dtype

  def __call__(self, x_BLM, *, padding_mask_BL=None, segment_ids_BL=None,
               positions_BL=None, token_ids_BL=None,
               deterministic: Optional[bool] = None, cache=None):
    """Applies the block.

    Args:
      x_BLM: <float>[B, L, M] residual stream.
      padding_mask_BL: optional <bool>[B, L] (attention keys and MoE slots).
      segment_ids_BL, positions_BL: see MultiHeadAttention.
      token_ids_BL: <int32>[B, L], passed to MoELayer (hash router).
      deterministic: passed to the MoE layer; None = its own attribute.
      cache: optional attention LayerCache (decoding): the MoE layer then
        routes without dropping (MoELayer no_drop).
    Returns:
      (<dtype>[B, L, M], MoEAux of the FFN, or None for a dense FFN), and
      the new cache when given one.
    """
    x_BLM = self.attend(x_BLM, padding_mask_BL=padding_mask_BL,
                        segment_ids_BL=segment_ids_BL,
                        positions_BL=positions_BL, cache=cache)
    if cache is not None:
      x_BLM, cache = x_BLM
    out = self.feed_forward(x_BLM, padding_mask_BL=padding_mask_BL,
                            token_ids_BL=token_ids_BL,
                            deterministic=deterministic,
                            no_drop=cache is not None)
    return out if cache is None else (*out, cache)

  def attend(self, x_BLM, *, padding_mask_BL=None, segment_ids_BL=None,
             positions_BL=None, cache=None):
    """The attention half: x + attention(norm(x)), <dtype>[B, L, M]; with a
    LayerCache, (that, the cache with the new keys)."""
    x_BLM = x_BLM.astype(self.dtype)
    # Only decoding passes a cache: an attention that cannot decode (a
    # user's wrapper without init_cache) still trains.
    decode = {} if cache is None else {"cache": cache}
    h_BLM = self.attention(
        self.attention_norm(x_BLM), padding_mask_BL=padding_mask_BL,
        segment_ids_BL=segment_ids_BL, positions_BL=positions_BL, **decode)
    if cache is None:
      return x_BLM + h_BLM
    h_BLM, cache = h_BLM
    return x_BLM + h_BLM, cache

  def feed_forward(self, x_BLM, *, padding_mask_BL=None, token_ids_BL=None,
                   deterministic: Optional[bool] = None, no_drop=False):
    """The FFN half: (x + ffn(norm(x)) <dtype>[B, L, M], MoEAux or None).
    Separate from attend() so a remat policy can recompute one half and
    keep the other (DecoderLM's remat='save_moe_outputs'). no_drop: decoding
    (MoELayer routes each sequence alone, with capacity for every token)."""
    x_BLM = x_BLM.astype(self.dtype)
    h_BLM = self.ffn_norm(x_BLM)
    aux = None
    if isinstance(self.ffn, soft_moe_lib.SoftMoELayer):
      y_BLM, aux = self.ffn(h_BLM, padding_mask_BL=padding_mask_BL,
                            deterministic=deterministic)
    elif self.is_moe:
      decode = {"no_drop": True} if no_drop else {}
      y_BLM, aux = self.ffn(h_BLM, padding_mask_BL=padding_mask_BL,
                            token_ids_BL=token_ids_BL,
                            deterministic=deterministic, **decode)
    else:
      y_BLM = self.ffn(h_BLM)
    return x_BLM + y_BLM.astype(self.dtype), aux


def _pad_to(x, shape):
  if tuple(x.shape) == tuple(shape):
    return x
  return jnp.pad(x, [(0, t - n) for n, t in zip(x.shape, shape)])


def stack_aux(auxes):
  """Stacks per-layer MoEAux structs along a new leading axis.

  Layers may differ: the losses and stats of all layers are united (a layer
  without a name gets 0 there), and arrays of different sizes (expert_load_E
  of a pyramid with more experts in later layers) are zero-padded to the
  largest, so expert e of a smaller layer keeps index e.

  Args:
    auxes: a sequence of MoEAux (one per MoE layer).
  Returns:
    MoEAux whose every leaf has a leading axis [num_moe_layers] (e.g.
    aux.losses['load_balance'] <float32>[num_moe_layers],
    aux.metrics.expert_load_E <float32>[num_moe_layers, E]), or None when
    `auxes` is empty (a dense model).
  """
  auxes = list(auxes)
  if not auxes:
    return None

  def unite(field):
    names = sorted(set().union(*(getattr(a, field) for a in auxes)))
    out = []
    for a in auxes:
      d = dict(getattr(a, field))
      for n in names:
        if n not in d:
          ref = next(getattr(b, field)[n] for b in auxes
                     if n in getattr(b, field))
          d[n] = jnp.zeros(ref.shape, ref.dtype)
      out.append(d)
    return out

  losses, stats = unite("losses"), unite("stats")
  auxes = [a.replace(losses=l, stats=st)
           for a, l, st in zip(auxes, losses, stats)]

  def stack(*xs):
    shape = tuple(max(d) for d in zip(*(x.shape for x in xs)))
    return jnp.stack([_pad_to(x, shape) for x in xs])

  return jax.tree.map(stack, *auxes)


def total_aux_loss(aux, weights):
  """sum over MoE layers of sum_name weights[name] * aux.losses[name].

  Args:
    aux: a stacked MoEAux (stack_aux) or None (dense model: returns 0).
    weights: {loss name: weight}; with MoE layers, a non-zero weight on a
      loss no layer reports raises ValueError (moe_lib.weighted_sum).
  Returns:
    <float32>[] scalar.
  """
  if aux is None:  # a dense model: nothing to weight
    return jnp.zeros((), jnp.float32)
  return moe_lib.weighted_sum(aux.losses, weights)
