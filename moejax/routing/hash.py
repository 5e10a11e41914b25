"""Hash routing (Roller et al. 2021, Hash Layers): a fixed random hash of the
token id picks the experts. No router parameters, nothing learned.

The hash is rendezvous (highest-random-weight) hashing: every (token id,
expert) pair gets a pseudo-random 32-bit score from a fixed integer mixer
(`mix32`, the "lowbias32" finaliser) keyed by `seed`, and a token goes to the
k experts with the highest scores. For k = 1 this is a uniform random hash of
the id onto the E experts; for k > 1 it gives k *distinct* experts (a
uniformly random k-subset per id, ordered by score), which independent hash
functions would not guarantee. The same id always gets the same experts, in
every group, position and batch, on every backend.
"""

import jax
import jax.numpy as jnp
import numpy as np

from moejax.routing import validation
from moejax.routing.token_choice import assign_slots

_GOLDEN = np.uint32(0x9E3779B9)
_SEED_SALT = np.uint32(0x5BD1E995)


def mix32(x):
  """A bijective avalanche mix of uint32 values (lowbias32, C. Wellons).

  Args:
    x: <uint32>[...] (other integer dtypes are reinterpreted as uint32).
  Returns:
    <uint32>[...] same shape.
  """
  x = jnp.asarray(x).astype(jnp.uint32)
  x ^= x >> 16
  x *= np.uint32(0x7FEB352D)
  x ^= x >> 15
  x *= np.uint32(0x846CA68B)
  x ^= x >> 16
  return x


def hash_scores(token_ids_GS, num_experts, seed=0):
  """Pseudo-random score of every (token id, expert) pair.

  Args:
    token_ids_GS: <int>[G, S] token ids (any integer dtype; negative ids wrap).
    num_experts: E.
    seed: Python int selecting the hash function family member.
  Returns:
    <uint32>[G, S, E]; a token's experts are its top-k scores.
  """
  seed_key = mix32(np.uint32(seed & 0xFFFFFFFF) ^ _SEED_SALT)
  id_key_GS = mix32(token_ids_GS.astype(jnp.uint32) ^ seed_key)
  expert_E = (jnp.arange(1, num_experts + 1, dtype=jnp.uint32) * _GOLDEN)
  return mix32(id_key_GS[..., None] ^ expert_E)


def hash_experts(token_ids_GS, num_experts, *, k=1, seed=0):
  """The k distinct experts the hash assigns to each token id.

  Args:
    token_ids_GS: <int>[G, S] token ids.
    num_experts: E.
    k: experts per token, 1 <= k <= E.
    seed: Python int.
  Returns:
    <int32>[G, S, K] experts, highest hash score first.
  """
  _, expert_GSK = jax.lax.top_k(hash_scores(token_ids_GS, num_experts, seed),
                                k)
  return expert_GSK.astype(jnp.int32)


def hash_routing(token_ids_GS, num_experts, *, capacity, k=1, probs_GSE=None,
                 padding_mask_GS=None, seed=0):
  """Routes each token to k experts chosen by a fixed hash of its id.

  Combine weights are 1.0 for every kept assignment (Hash Layers use the
  expert output ungated; with k > 1 the k outputs are summed — scale them in
  the layer if a mean is wanted). Slots are claimed as in token choice
  (choice-major, token order); assignments past capacity are dropped.

  Args:
    token_ids_GS: <int>[G, S] token ids.
    num_experts: E (int >= 1).
    capacity: C (int >= 1), or None for a dropless plan.
    k: experts per token, 1 <= k <= E.
    probs_GSE: optional <float>[G, S, E] stored in the plan for losses and
      metrics only; they never affect the choice. None: uniform 1/E.
    padding_mask_GS: <bool>[G, S] or None; padded tokens take no slot.
    seed: Python int; different seeds give independent hashes.
  Returns:
    RoutingPlan (token view, and slot view unless dropless).
  """
  if getattr(token_ids_GS, "ndim", None) != 2:
    raise ValueError(f"token_ids_GS must have rank 2 [G, S], got shape "
                     f"{getattr(token_ids_GS, 'shape', None)}")
  if not jnp.issubdtype(token_ids_GS.dtype, jnp.integer):
    raise ValueError(f"token_ids_GS must have an integer dtype, got "
                     f"{token_ids_GS.dtype}")
  if (isinstance(num_experts, bool) or not isinstance(num_experts, int)
      or num_experts < 1):
    raise ValueError(f"num_experts must be an integer >= 1, got "
                     f"{num_experts!r}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f"seed must be a Python integer, got {seed!r}")
  g, s = token_ids_GS.shape
  e = num_experts
  validation.check_k(k, e)
  validation.check_capacity(capacity, allow_none=True)
  padding_mask_GS = validation.check_padding_mask(padding_mask_GS, (g, s))
  if probs_GSE is None:
    probs_GSE = jnp.full((g, s, e), 1.0 / e, jnp.float32)
  else:
    if tuple(probs_GSE.shape) != (g, s, e):
      raise ValueError(f"probs_GSE must have shape {(g, s, e)} [G, S, E], got "
                       f"{tuple(probs_GSE.shape)}")
    probs_GSE = probs_GSE.astype(jnp.float32)

  expert_GSK = hash_experts(token_ids_GS, e, k=k, seed=int(seed))
  weight_GSK = jnp.ones((g, s, k), jnp.float32)
  return assign_slots(
      expert_GSK, weight_GSK, probs_GSE, capacity=capacity,
      padding_mask_GS=padding_mask_GS)
