"""A fixed-shape per-layer cache of attention entries, for decoding.

An attention layer caches what it needs to rebuild its keys and values:
GQA its rotated keys and its values ({'k': [B, T, K, D], 'v': [B, T, K, F]}),
MLA its compressed latent and shared rotary key ({'latent': [B, T, C],
'k_rot': [B, T, R]}). `LayerCache` holds those entries under their names,
with the position of each slot (`pos_BT`, -1 while empty), so the mask is
built from positions exactly as without a cache.

A layer of T slots writes a token at position p into slot p mod T: with T
the maximum length that is slot p; with T a sliding window W it is a rolling
buffer that keeps the last W positions, all that such a layer reads. One call
`extend(cache, entries, positions_BL, valid_BL)` gives the keys a layer
attends to (the cached ones, then the new ones) and the cache with the new
ones written; padding (valid False) is never written. `extend_with_mask`
also gives the mask of the new queries over those keys, built from positions
as without a cache: what every attention layer does at decode.

Letters: B batch, T cache slots, L new tokens, J = T + L keys.
"""

import flax.struct
import jax
import jax.numpy as jnp

from moejax.layers import attention


@flax.struct.dataclass
class LayerCache:
  """One attention layer's cache.

  Attributes:
    entries: {name: <dtype>[B, T, ...]} cached per-token tensors.
    pos_BT: <int32>[B, T] position held by each slot; -1 = empty.
  """
  entries: dict
  pos_BT: jax.Array

  @property
  def num_slots(self):
    return self.pos_BT.shape[1]

  def nbytes(self):
    """Bytes held (entries and positions)."""
    leaves = list(self.entries.values()) + [self.pos_BT]
    return int(sum(x.size * x.dtype.itemsize for x in leaves))


def init(batch, slots, shapes):
  """An empty LayerCache.

  Args:
    batch: B.
    slots: T (the maximum length, or a sliding window's W).
    shapes: {name: (trailing shape tuple, dtype)} of the cached entries.
  """
  entries = {name: jnp.zeros((batch, slots) + tuple(shape), dtype)
             for name, (shape, dtype) in shapes.items()}
  return LayerCache(entries=entries,
                    pos_BT=jnp.full((batch, slots), -1, jnp.int32))


def extend(cache, entries, positions_BL, valid_BL=None):
  """The keys to attend to, and the cache with the new tokens written.

  Args:
    cache: LayerCache with T slots.
    entries: {name: <dtype>[B, L, ...]} the new tokens' entries (the same
      names as the cache).
    positions_BL: <int32>[B, L] the new tokens' positions.
    valid_BL: optional <bool>[B, L]; False (padding) tokens are neither
      attended nor written.
  Returns:
    (all_entries {name: [B, T + L, ...]}, k_positions_BJ <int32>[B, T + L]
    (-1 for empty slots and padding), new cache). Of the new tokens, only
    the last T positions of each row are written (a rolling window).
  """
  b, l = positions_BL.shape
  t = cache.num_slots
  valid_BL = (jnp.ones((b, l), bool) if valid_BL is None
              else valid_BL.astype(bool))
  new_pos_BL = jnp.where(valid_BL, positions_BL, -1).astype(jnp.int32)
  all_entries = {name: jnp.concatenate(
      [cache.entries[name], value.astype(cache.entries[name].dtype)], axis=1)
                 for name, value in entries.items()}
  k_positions_BJ = jnp.concatenate([cache.pos_BT, new_pos_BL], axis=1)
  # Keep the newest T positions of the row: their slots p mod T are
  # distinct, so the scatter below writes each slot at most once.
  last_B1 = jnp.max(new_pos_BL, axis=1, keepdims=True)
  keep_BL = valid_BL & (new_pos_BL > last_B1 - t)
  slot_BL = jnp.where(keep_BL, new_pos_BL % t, t)  # t: out of range, dropped
  rows_BL = jnp.broadcast_to(jnp.arange(b)[:, None], (b, l))
  written = {name: cache.entries[name].at[rows_BL, slot_BL].set(
      value.astype(cache.entries[name].dtype), mode="drop")
             for name, value in entries.items()}
  pos_BT = cache.pos_BT.at[rows_BL, slot_BL].set(new_pos_BL, mode="drop")
  return all_entries, k_positions_BJ, LayerCache(entries=written,
                                                 pos_BT=pos_BT)


def extend_with_mask(cache, entries, positions_BL, valid_BL=None, *,
                     causal=True, sliding_window=None):
  """extend(), then which cached and new keys each new query may read.

  Args:
    as extend(); causal and sliding_window as attention.attention_mask.
  Returns:
    (all_entries {name: [B, T + L, ...]}, mask_BLJ <bool>[B, L, T + L]
    (empty slots and padding never read), new cache).
  """
  all_entries, k_positions_BJ, cache = extend(cache, entries, positions_BL,
                                              valid_BL)
  mask_BLJ = attention.attention_mask(
      positions_BL, k_positions_BJ, causal=causal,
      key_mask_BJ=k_positions_BJ >= 0, sliding_window=sliding_window)
  return all_entries, mask_BLJ, cache
