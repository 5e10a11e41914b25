"""Auxiliary router losses: load balance, z-loss, importance/load CV^2.

All losses are pure functions of float32 arrays and return a float32 scalar.
A token whose padding mask is 0 adds nothing to any loss: it is left out of
every count and every mean, and its values are replaced by zeros before any
arithmetic, so even NaN or inf in padded rows cannot leak into the value or
the gradient.

Conventions (the ones every function here shares):

* Balance losses (`load_balancing_loss`, `sequence_balance_loss`) are
  normalised so that perfectly uniform routing gives exactly 1, whatever K:
  f_e = (# assignments to e) / (T * K), P_e = mean router probability of e,
  loss = E * sum_e f_e * P_e. This is Switch (eq. 4-6) and GShard for K = 1;
  for K > 1 it is flaxformer's value divided by K (flaxformer counts tokens,
  not assignments, and gives K under uniform top-K routing). They are
  computed per group (or per sequence) and averaged over the groups that hold
  at least one real token.
* CV^2 losses (`importance_loss`, `load_loss`) sum over the whole batch
  (all G groups and S tokens), as Shazeer et al. 2017 and V-MoE do, and use
  the population variance: CV^2 = var(x) / (mean(x)^2 + 1e-10).
* `router_z_loss` is the mean over all real tokens of the batch.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from moejax.routing import plan as plan_lib

_CV_EPS = 1e-10


# ---------------------------------------------------------------- checks


def _check_float_GSE(x, name):
  """Returns x as a float32 jax array after checking it is [G, S, E]."""
  shape = np.shape(x)
  if len(shape) != 3:
    raise ValueError(f"{name} must have rank 3 [G, S, E], got shape {shape}")
  if shape[-1] < 1:
    raise ValueError(f"{name} must have at least one expert (last axis >= 1), "
                     f"got shape {tuple(shape)}")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating array, got dtype {x.dtype}")
  return x.astype(jnp.float32)


def _check_index_GSK(expert_index_GSK, group_shape, name="expert_index_GSK"):
  shape = np.shape(expert_index_GSK)
  if len(shape) != 3:
    raise ValueError(f"{name} must have rank 3 [G, S, K], got shape {shape}")
  if tuple(shape[:2]) != tuple(group_shape):
    raise ValueError(f"{name} must have shape [G, S, K] with [G, S] = "
                     f"{tuple(group_shape)}, got {tuple(shape)}")
  if shape[-1] < 1:
    raise ValueError(f"{name} must have K >= 1 (last axis), got shape "
                     f"{tuple(shape)}")
  expert_index_GSK = jnp.asarray(expert_index_GSK)
  if not jnp.issubdtype(expert_index_GSK.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array, got dtype "
                     f"{expert_index_GSK.dtype}")
  return expert_index_GSK.astype(jnp.int32)


def _mask_GS(padding_mask_GS, group_shape):
  """<bool>[G, S]: the padding mask checked against [G, S]; all True if None."""
  if padding_mask_GS is None:
    return jnp.ones(group_shape, jnp.bool_)
  shape = np.shape(padding_mask_GS)
  if tuple(shape) != tuple(group_shape):
    raise ValueError(f"padding_mask_GS must have shape {tuple(group_shape)} "
                     f"[G, S], got {tuple(shape)}")
  return jnp.asarray(padding_mask_GS).astype(jnp.bool_)


# ----------------------------------------------------------- shared pieces


def expert_counts(expert_index_GSK, num_experts, padding_mask_GS=None):
  """Number of real assignments per expert and group.

  Args:
    expert_index_GSK: <int32>[G, S, K]; values outside [0, E) (the padding
      sentinel E, a skipped choice) count for nothing.
    num_experts: E (int >= 1).
    padding_mask_GS: <bool>[G, S] or None (all real); tokens with False count
      for nothing.
  Returns:
    <float32>[G, E] counts (exact integers).
  """
  if (isinstance(num_experts, bool) or not isinstance(num_experts, int)
      or num_experts < 1):
    raise ValueError(f"num_experts must be an integer >= 1, got "
                     f"{num_experts!r}")
  shape = np.shape(expert_index_GSK)
  if len(shape) != 3:
    raise ValueError(f"expert_index_GSK must have rank 3 [G, S, K], got shape "
                     f"{shape}")
  expert_index_GSK = _check_index_GSK(expert_index_GSK, shape[:2])
  mask_GS = _mask_GS(padding_mask_GS, shape[:2])
  return _expert_counts(expert_index_GSK, num_experts, mask_GS)


def _expert_counts(expert_index_GSK, num_experts, mask_GS):
  """<float32>[G, E] counts; arguments already checked."""
  g = expert_index_GSK.shape[0]
  e = num_experts
  valid_GSK = ((expert_index_GSK >= 0) & (expert_index_GSK < e)
               & mask_GS[..., None])
  # Invalid assignments go to a dump column E that is cut off; a scatter-add
  # keeps memory O(G*S*K) rather than a [G, S, K, E] one-hot.
  index_GSK = jnp.where(valid_GSK, expert_index_GSK, e)
  g_idx = jnp.arange(g)[:, None, None]
  counts_GX = jnp.zeros((g, e + 1), jnp.float32).at[g_idx, index_GSK].add(
      valid_GSK.astype(jnp.float32))
  return counts_GX[:, :e]


def _balance_per_group(probs_GSE, expert_index_GSK, mask_GS):
  """(loss_G <float32>[G], has_tokens_G <bool>[G]): E * sum_e f_e * P_e."""
  e = probs_GSE.shape[-1]
  k = expert_index_GSK.shape[-1]
  tokens_G = jnp.sum(mask_GS, axis=-1).astype(jnp.float32)
  safe_tokens_G = jnp.maximum(tokens_G, 1.0)
  counts_GE = _expert_counts(expert_index_GSK, e, mask_GS)
  fraction_GE = counts_GE / (safe_tokens_G[:, None] * k)
  probs_GSE = jnp.where(mask_GS[..., None], probs_GSE, 0.0)
  mean_prob_GE = jnp.sum(probs_GSE, axis=1) / safe_tokens_G[:, None]
  loss_G = e * jnp.sum(fraction_GE * mean_prob_GE, axis=-1)
  return loss_G, tokens_G > 0


def _mean_over_real_groups(loss_G, has_tokens_G):
  """Mean of loss_G over groups with a real token; 0 if there are none."""
  num = jnp.sum(jnp.where(has_tokens_G, loss_G, 0.0))
  den = jnp.sum(has_tokens_G.astype(jnp.float32))
  return (num / jnp.maximum(den, 1.0)).astype(jnp.float32)


def _cv_squared(x_E):
  """CV^2 = population variance / (mean^2 + 1e-10) of a [E] vector."""
  mean = jnp.mean(x_E)
  var = jnp.mean(jnp.square(x_E - mean))
  return (var / (jnp.square(mean) + _CV_EPS)).astype(jnp.float32)


# ------------------------------------------------------------------ losses


def load_balancing_loss(probs_GSE, expert_index_GSK, padding_mask_GS=None):
  """Switch Transformer / GShard auxiliary load-balancing loss (eq. 4-6).

  Per group g with T real tokens:
    f_e = (# of the T*K real assignments whose expert is e) / (T * K)
    P_e = (1 / T) * sum over real tokens of probs_GSE[g, s, e]
    loss_g = E * sum_e f_e * P_e
  and the result is the mean of loss_g over the groups holding at least one
  real token (0 if there is none). Perfectly uniform routing (f_e = 1/E, or
  P_e = 1/E with every assignment real) gives exactly 1. Counting all K
  choices and dividing by T*K makes the uniform value 1 for every K
  (flaxformer's version, which counts tokens, gives K). The counts are those
  the router *chose*, dropped assignments included, as in Switch. Only P_e
  carries a gradient.

  Args:
    probs_GSE: <float32>[G, S, E] router probabilities (rows summing to 1).
    expert_index_GSK: <int32>[G, S, K] chosen experts; values outside [0, E)
      (the padding sentinel E, or a choice skipped by GShard's random policy)
      count for nothing but still belong to the T*K denominator.
    padding_mask_GS: <bool>[G, S] True for real tokens, or None (all real).
  Returns:
    <float32>[] the loss.
  """
  probs_GSE = _check_float_GSE(probs_GSE, "probs_GSE")
  group_shape = probs_GSE.shape[:2]
  expert_index_GSK = _check_index_GSK(expert_index_GSK, group_shape)
  mask_GS = _mask_GS(padding_mask_GS, group_shape)
  loss_G, has_tokens_G = _balance_per_group(probs_GSE, expert_index_GSK,
                                            mask_GS)
  return _mean_over_real_groups(loss_G, has_tokens_G)


def sequence_balance_loss(probs_GSE, expert_index_GSK, padding_mask_GS=None,
                          *, sequence_length=None):
  """DeepSeek-V2/V3 sequence-wise balance loss, averaged over sequences.

  For each sequence of T real tokens (DeepSeek-V3 eq. 17-20, without alpha):
    f_i = E / (K * T) * (# tokens of the sequence that selected expert i)
    P_i = (1 / T) * sum_t s'_{i,t}, s' the scores normalised to sum to 1
    loss_seq = sum_i f_i * P_i
  and the result is the mean over sequences with at least one real token.
  Uniform routing gives 1. This is exactly `load_balancing_loss` computed per
  sequence instead of per group: the E / (K * T) in f_i is the same
  normalisation as that loss's E * (count / (T * K)). With
  `sequence_length=None` every group is one sequence (the layer groups by
  sequence, group_size = L) and the two functions agree. Pass the normalised
  scores as probs_GSE (`gate_probs(logits, 'sigmoid')` for DeepSeek-V3
  sigmoid gating, softmax probabilities for DeepSeek-V2); the coefficient
  alpha is applied by the caller.

  Args:
    probs_GSE: <float32>[G, S, E] normalised router scores.
    expert_index_GSK: <int32>[G, S, K] chosen experts; values outside [0, E)
      count for nothing.
    padding_mask_GS: <bool>[G, S] True for real tokens, or None (all real).
    sequence_length: None (each group is one sequence) or an int L >= 1 that
      divides S: each group then holds S / L consecutive sequences.
  Returns:
    <float32>[] the loss.
  """
  probs_GSE = _check_float_GSE(probs_GSE, "probs_GSE")
  g, s, e = probs_GSE.shape
  expert_index_GSK = _check_index_GSK(expert_index_GSK, (g, s))
  mask_GS = _mask_GS(padding_mask_GS, (g, s))
  if sequence_length is not None:
    if (isinstance(sequence_length, bool)
        or not isinstance(sequence_length, int) or sequence_length < 1
        or s % sequence_length):
      raise ValueError(f"sequence_length must be None or an integer >= 1 that "
                       f"divides the group size S={s}, got {sequence_length!r}")
    n = s // sequence_length
    k = expert_index_GSK.shape[-1]
    probs_GSE = probs_GSE.reshape(g * n, sequence_length, e)
    expert_index_GSK = expert_index_GSK.reshape(g * n, sequence_length, k)
    mask_GS = mask_GS.reshape(g * n, sequence_length)
  loss_G, has_tokens_G = _balance_per_group(probs_GSE, expert_index_GSK,
                                            mask_GS)
  return _mean_over_real_groups(loss_G, has_tokens_G)


def router_z_loss(logits_GSE, padding_mask_GS=None):
  """ST-MoE router z-loss: mean over real tokens of logsumexp(logits)^2.

  Args:
    logits_GSE: <float32>[G, S, E] router logits (cast to float32).
    padding_mask_GS: <bool>[G, S] True for real tokens, or None (all real).
  Returns:
    <float32>[] the loss; 0 if there is no real token.
  """
  logits_GSE = _check_float_GSE(logits_GSE, "logits_GSE")
  mask_GS = _mask_GS(padding_mask_GS, logits_GSE.shape[:2])
  logits_GSE = jnp.where(mask_GS[..., None], logits_GSE, 0.0)
  z_GS = jax.nn.logsumexp(logits_GSE, axis=-1)
  total = jnp.sum(jnp.where(mask_GS, jnp.square(z_GS), 0.0))
  count = jnp.sum(mask_GS.astype(jnp.float32))
  return (total / jnp.maximum(count, 1.0)).astype(jnp.float32)


def importance_loss(gates_GSE, padding_mask_GS=None):
  """Shazeer et al. 2017 importance loss: CV^2 of per-expert importance.

  Importance_e = sum over the real tokens of the whole batch (all G, S) of
  gates_GSE[..., e]; the loss is var(Importance) / (mean(Importance)^2 +
  1e-10), population variance over the E experts (0 when E = 1 or when the
  importances are equal). The paper's coefficient w_importance is applied by
  the caller.

  Args:
    gates_GSE: <float32>[G, S, E] gate values: the sparse gates G(x) of the
      paper, or the dense router probabilities (V-MoE).
    padding_mask_GS: <bool>[G, S] True for real tokens, or None (all real).
  Returns:
    <float32>[] the loss.
  """
  gates_GSE = _check_float_GSE(gates_GSE, "gates_GSE")
  mask_GS = _mask_GS(padding_mask_GS, gates_GSE.shape[:2])
  gates_GSE = jnp.where(mask_GS[..., None], gates_GSE, 0.0)
  return _cv_squared(jnp.sum(gates_GSE, axis=(0, 1)))


def load_loss(load_probability_GSE, padding_mask_GS=None):
  """Shazeer et al. 2017 load loss: CV^2 of the smooth load estimate.

  Load_e = sum over the real tokens of the whole batch of P(x, e), the
  probability that noisy top-k would pick expert e for token x (see
  `load_probability` in routing/noisy.py); the loss is var(Load) /
  (mean(Load)^2 + 1e-10) over the E experts, population variance.

  Args:
    load_probability_GSE: <float32>[G, S, E] P(x, e) in [0, 1].
    padding_mask_GS: <bool>[G, S] True for real tokens, or None (all real).
  Returns:
    <float32>[] the loss.
  """
  load_probability_GSE = _check_float_GSE(load_probability_GSE,
                                          "load_probability_GSE")
  mask_GS = _mask_GS(padding_mask_GS, load_probability_GSE.shape[:2])
  load_probability_GSE = jnp.where(mask_GS[..., None], load_probability_GSE,
                                   0.0)
  return _cv_squared(jnp.sum(load_probability_GSE, axis=(0, 1)))


# ------------------------------------------------------------ plan helper


@flax.struct.dataclass
class RoutingLosses:
  """The auxiliary losses of one routing plan (a pytree; stack with tree.map).

  Attributes:
    load_balance: <float32>[] `load_balancing_loss` of the plan (0 for a plan
      with no token view, i.e. expert choice).
    z_loss: <float32>[] `router_z_loss` of the logits (0 if none were given).
  """
  load_balance: jax.Array
  z_loss: jax.Array


def plan_losses(plan, logits_GSE=None):
  """Load-balance and z-loss of a plan, honouring its padding mask.

  load_balance is `load_balancing_loss(plan.probs_GSE, plan.expert_GSK,
  plan.padding_mask_GS)`. An expert-choice plan has no token view: every
  expert fills its C slots, so it is balanced by construction and its
  load_balance is 0 (a constant; add it freely). z_loss is
  `router_z_loss(logits_GSE, plan.padding_mask_GS)`, or 0 when logits_GSE is
  None (routers without logits, e.g. hash routing).

  Args:
    plan: a RoutingPlan.
    logits_GSE: <float32>[G, S, E] the router logits the plan came from, or
      None.
  Returns:
    RoutingLosses of float32 scalars.
  """
  if not isinstance(plan, plan_lib.RoutingPlan):
    raise ValueError(f"plan must be a RoutingPlan, got {type(plan).__name__}")
  probs_GSE = _check_float_GSE(plan.probs_GSE, "plan.probs_GSE")
  if plan.has_token_view:
    load_balance = load_balancing_loss(probs_GSE, plan.expert_GSK,
                                       plan.padding_mask_GS)
  else:
    load_balance = jnp.zeros((), jnp.float32)
  if logits_GSE is None:
    z_loss = jnp.zeros((), jnp.float32)
  else:
    shape = np.shape(logits_GSE)
    if tuple(shape) != tuple(probs_GSE.shape):
      raise ValueError(f"logits_GSE must have the plan's shape "
                       f"{tuple(probs_GSE.shape)} [G, S, E], got {shape}")
    z_loss = router_z_loss(logits_GSE, plan.padding_mask_GS)
  return RoutingLosses(load_balance=load_balance, z_loss=z_loss)
