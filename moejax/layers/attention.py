"""The attention core: softmax(q k^T * scale + masks) v over explicit heads.

Pure functions of arrays, no parameters: the projections (q/k/v, biases,
QK-norm, rotary embeddings, MLA's latent up-projections) belong to the
modules that call this (moejax.layers.transformer.MultiHeadAttention,
moejax.models.hf.attention), so a KV cache can later feed cached keys and
values in without touching them: queries and keys carry their own
positions (`q_positions_BL`, `k_positions_BJ`) instead of assuming 0..L-1.

Computed with `jax.nn.dot_product_attention` (cuDNN flash attention on GPU,
XLA elsewhere) whenever it can express the call; learned attention sinks
(GPT-OSS) add one logit per head to every softmax row, which that function
cannot add, so they take a small explicit path (`_attend_with_sinks`).

Letters: B batch, L query positions, J key positions, N query heads, K
key/value heads (N is a multiple of K: grouped-query attention), D the
query/key head width, F the value head width.
"""

import jax
import jax.numpy as jnp


def attention_mask(q_positions_BL, k_positions_BJ, *, causal=True,
                   key_mask_BJ=None, segment_ids_BL=None,
                   k_segment_ids_BJ=None, sliding_window=None):
  """Which keys each query may read: <bool>[B, L, J].

  Args:
    q_positions_BL: <int>[B, L] positions of the queries.
    k_positions_BJ: <int>[B, J] positions of the keys.
    causal: a query reads keys at positions <= its own.
    key_mask_BJ: optional <bool>[B, J]; False keys (padding) are never read.
    segment_ids_BL, k_segment_ids_BJ: optional <int> segment ids of queries
      and keys (packed sequences): a query reads only keys of its segment.
    sliding_window: W or None; a query at p reads keys at positions > p - W
      (the W latest positions, itself included; Mistral / GPT-OSS).
  Returns:
    <bool>[B, L, J]. A query whose every key is masked (a padded query in a
    left-padded row) is allowed its own position, so no softmax row is empty
    and no NaN reaches the next layer; its output is meaningless.
  """
  qp = q_positions_BL[:, :, None]
  kp = k_positions_BJ[:, None, :]
  mask_BLJ = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), jnp.bool_)
  if causal:
    mask_BLJ = mask_BLJ & (kp <= qp)
  if sliding_window is not None:
    mask_BLJ = mask_BLJ & (kp > qp - sliding_window)
  if key_mask_BJ is not None:
    mask_BLJ = mask_BLJ & key_mask_BJ.astype(jnp.bool_)[:, None, :]
  if segment_ids_BL is not None:
    k_seg = segment_ids_BL if k_segment_ids_BJ is None else k_segment_ids_BJ
    mask_BLJ = mask_BLJ & (segment_ids_BL[:, :, None] == k_seg[:, None, :])
  empty_BL1 = ~jnp.any(mask_BLJ, axis=-1, keepdims=True)
  return mask_BLJ | (empty_BL1 & (kp == qp))


def attend(q_BLND, k_BJKD, v_BJKF, mask_BLJ, *, scale=None, sinks_N=None):
  """Multi-head (grouped-query) attention over given queries, keys, values.

  Args:
    q_BLND: <float>[B, L, N, D] queries (already rotated, normed, ...).
    k_BJKD: <float>[B, J, K, D] keys; N must be a multiple of K (each key
      head serves N / K query heads).
    v_BJKF: <float>[B, J, K, F] values; F may differ from D (MLA).
    mask_BLJ: <bool>[B, L, J] (attention_mask).
    scale: logit scale; None = D ** -0.5.
    sinks_N: optional <float>[N] learned sink logits (GPT-OSS): each softmax
      row gets one more logit that absorbs probability and reads no value.
  Returns:
    <q dtype>[B, L, N, F].
  """
  b, l, n, d = q_BLND.shape
  kh, f = k_BJKD.shape[2], v_BJKF.shape[-1]
  if n % kh:
    raise ValueError(f"query heads N={n} must be a multiple of key/value "
                     f"heads K={kh}")
  scale = d ** -0.5 if scale is None else scale
  if sinks_N is not None:
    return _attend_with_sinks(q_BLND, k_BJKD, v_BJKF, mask_BLJ, scale,
                              sinks_N)
  dt = q_BLND.dtype
  k_BJKD = k_BJKD.astype(dt)
  v_BJKF = v_BJKF.astype(dt)
  if f != d:
    # dot_product_attention wants one head width for q, k and v: pad the
    # values with zero features (which read back as zeros) and cut them off.
    if f < d:
      v_BJKF = jnp.pad(v_BJKF, ((0, 0), (0, 0), (0, 0), (0, d - f)))
    else:
      pad = ((0, 0), (0, 0), (0, 0), (0, f - d))
      # Zero features added to q and k leave every logit unchanged.
      q_BLND, k_BJKD = jnp.pad(q_BLND, pad), jnp.pad(k_BJKD, pad)
  out = jax.nn.dot_product_attention(q_BLND, k_BJKD, v_BJKF,
                                     mask=mask_BLJ[:, None], scale=scale)
  return out[..., :f]


def _attend_with_sinks(q_BLND, k_BJKD, v_BJKF, mask_BLJ, scale, sinks_N):
  """attend() with one extra learned logit per head in each softmax row.

  jax.nn.dot_product_attention normalises over the keys only; a sink needs
  the logit in the normaliser, so this path spells the [B, K, R, L, J]
  logits out in float32 (R = N / K query heads per key head).
  """
  b, l, n, d = q_BLND.shape
  kh = k_BJKD.shape[2]
  r = n // kh
  q_BLKRD = q_BLND.reshape(b, l, kh, r, d)
  logits = jnp.einsum("BLKRD,BJKD->BKRLJ", q_BLKRD, k_BJKD.astype(q_BLND.dtype),
                      preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask_BLJ[:, None, None], logits,
                     jnp.finfo(jnp.float32).min)
  sink_KR = sinks_N.astype(jnp.float32).reshape(kh, r)
  sink = jnp.broadcast_to(sink_KR[None, :, :, None, None],
                          logits.shape[:-1] + (1,))
  probs = jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)
  probs = probs[..., :-1].astype(v_BJKF.dtype)
  out = jnp.einsum("BKRLJ,BJKF->BLKRF", probs, v_BJKF)
  return out.reshape(b, l, n, v_BJKF.shape[-1]).astype(q_BLND.dtype)


def default_positions(batch, length, offset=0):
  """<int32>[B, L] positions offset..offset+L-1 in every row."""
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) + offset,
                          (batch, length))
