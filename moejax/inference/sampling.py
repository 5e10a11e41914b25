"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Pure functions of arrays; `moejax.inference.generate` calls `next_token`
once per step with a fresh key split from the caller's seed, so a run is
reproducible from (prompt, seed).
"""

import jax
import jax.numpy as jnp


def check_sampling(temperature, top_k, top_p, vocab_size):
  """Raises ValueError, naming the bad value, before anything compiles."""
  if isinstance(temperature, bool) or not isinstance(
      temperature, (int, float)) or temperature < 0:
    raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got "
                     f"{temperature!r}")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(
      top_k, int) or not 1 <= top_k <= vocab_size):
    raise ValueError(f"top_k must be None or an integer in [1, {vocab_size}]"
                     f", got {top_k!r}")
  if top_p is not None and (isinstance(top_p, bool) or not isinstance(
      top_p, (int, float)) or not 0 < top_p <= 1):
    raise ValueError(f"top_p must be None or a number in (0, 1], got "
                     f"{top_p!r}")


def filter_logits(logits_BV, *, top_k=None, top_p=None):
  """<float32>[B, V] with the excluded tokens at -inf.

  top_k keeps the k largest logits (ties at the k-th value are kept);
  top_p keeps the smallest set of most probable tokens whose probability
  reaches p (the token that crosses p is kept; at least one token stays).
  """
  logits_BV = logits_BV.astype(jnp.float32)
  if top_k is not None:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p is not None:
    order_BV = jnp.argsort(-logits_BV, axis=-1)
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Mass strictly before each token: it is kept while that is < p.
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_sorted_BV = before_BV < top_p
    keep_BV = jnp.zeros_like(keep_sorted_BV).at[
        jnp.arange(logits_BV.shape[0])[:, None], order_BV].set(keep_sorted_BV)
    logits_BV = jnp.where(keep_BV, logits_BV, -jnp.inf)
  return logits_BV


def next_token(logits_BV, key, *, temperature=0.0, top_k=None, top_p=None):
  """<int32>[B]: argmax when temperature == 0, else a draw from
  softmax(filtered logits / temperature)."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = filter_logits(logits_BV / temperature, top_k=top_k,
                            top_p=top_p)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)
