"""Balanced assignment routing: BASE layers (Lewis et al. 2021) and S-BASE
(Clark et al. 2022).

BASE casts top-1 routing as a linear assignment problem (maximise the summed
token-expert affinity subject to every expert getting S/E tokens) and solves
it exactly with an auction algorithm. S-BASE replaces the exact solver with a
few Sinkhorn iterations of entropic optimal transport, which is what this
module does: `sinkhorn` balances exp(scores) to uniform expert marginals in
the log domain, and at train time each token takes the top-1 expert of the
balanced plan. Sinkhorn with finitely many iterations is only approximately
balanced, so the selection can still overflow an expert; `capacity` drops the
overflow as in token choice.

The balanced plan is used for *selection only* (under stop_gradient); the
combine weight is the gate of the chosen expert computed from the original
logits, so the router still gets gradients. The default gate is the sigmoid
of the logit, as in BASE (h + sigmoid(h . w_e) f_e(h)) and Megatron's S-BASE
("sinkhorn") router; 'softmax' is available too. At eval time the router is
plain top-1 on the same gate (no balancing), as in both papers.
"""

import jax
import jax.numpy as jnp

from moejax.routing import validation
from moejax.routing.token_choice import token_choice

BALANCED_GATINGS = ("sigmoid", "softmax")

# Log-weight of padded rows: finite so that no -inf - -inf NaN can appear.
_NEG = -1e30


def _check_num_iters(num_iters):
  if isinstance(num_iters, bool) or not isinstance(num_iters, int) or (
      num_iters < 1):
    raise ValueError(f"num_iters must be an integer >= 1, got {num_iters!r}")


def sinkhorn_log(scores_GSE, num_iters, *, padding_mask_GS=None):
  """Log-domain Sinkhorn; returns the log of the balanced plan.

  Same contract as `sinkhorn`, but returns log P <float32>[G, S, E]
  (padded rows hold a very negative finite number). Use this for selection:
  argmax over E of log P never underflows.
  """
  validation.check_logits(scores_GSE, name="scores_GSE")
  _check_num_iters(num_iters)
  g, s, e = scores_GSE.shape
  padding_mask_GS = validation.check_padding_mask(padding_mask_GS, (g, s))
  scores_GSE = scores_GSE.astype(jnp.float32)
  if padding_mask_GS is None:
    real_GS = jnp.ones((g, s), jnp.bool_)
  else:
    real_GS = padding_mask_GS
  num_real_G = jnp.sum(real_GS, axis=-1).astype(jnp.float32)
  has_real_G = num_real_G > 0
  # Each expert's column should carry num_real / E of the mass.
  log_col_G = jnp.where(has_real_G,
                        jnp.log(jnp.maximum(num_real_G, 1.0)) - jnp.log(e),
                        0.0)

  def row_step(v_GE):
    # Every real token (row) gets total mass 1.
    u_GS = -jax.nn.logsumexp(scores_GSE + v_GE[:, None, :], axis=-1)
    return jnp.where(real_GS, u_GS, _NEG)

  def col_step(u_GS):
    v_GE = log_col_G[:, None] - jax.nn.logsumexp(
        scores_GSE + u_GS[:, :, None], axis=1)
    return jnp.where(has_real_G[:, None], v_GE, 0.0)

  def body(_, v_GE):
    return col_step(row_step(v_GE))

  v_GE = jax.lax.fori_loop(0, num_iters - 1, body,
                           jnp.zeros((g, e), jnp.float32))
  u_GS = row_step(v_GE)
  v_GE = col_step(u_GS)
  return scores_GSE + u_GS[:, :, None] + v_GE[:, None, :]


def sinkhorn(scores_GSE, num_iters, *, padding_mask_GS=None):
  """Sinkhorn balancing of exp(scores) to uniform expert marginals.

  Finds P = diag(exp u) exp(scores) diag(exp v) per group by alternately
  normalising rows (each real token carries mass 1) and columns (each expert
  carries num_real_tokens / E), in the log domain. Ends on a column step, so
  column sums are exact and row sums approach 1 as num_iters grows. Padded
  tokens carry no mass (their rows are 0).

  Args:
    scores_GSE: <float>[G, S, E] log-affinities, e.g. router logits (cast to
      float32).
    num_iters: number of (row, column) normalisation rounds, int >= 1.
    padding_mask_GS: <bool>[G, S] True for real tokens, or None (all real).
  Returns:
    <float32>[G, S, E] the balanced plan P.
  """
  return jnp.exp(sinkhorn_log(scores_GSE, num_iters,
                              padding_mask_GS=padding_mask_GS))


def balanced_assignment(logits_GSE, *, capacity, train, num_iters=20,
                        padding_mask_GS=None, gating="sigmoid"):
  """S-BASE top-1 routing.

  Train: each token takes the top-1 expert of the Sinkhorn-balanced plan of
  its group (selection only, under stop_gradient). Eval: plain top-1 of the
  gate. In both, the combine weight is the gate of the chosen expert from
  the original logits (sigmoid(logit) by default, or its softmax
  probability), so gradients reach the router through the weight.

  Args:
    logits_GSE: <float>[G, S, E] router logits (cast to float32).
    capacity: C (int >= 1), or None for a dropless plan.
    train: Python bool; balance only when True.
    num_iters: Sinkhorn rounds (int >= 1) at train time.
    padding_mask_GS: <bool>[G, S] or None; padded tokens take no slot and
      carry no mass in the balancing.
    gating: 'sigmoid' (BASE / S-BASE; probs_GSE for losses are the sigmoids
      normalised to sum to 1) or 'softmax'.
  Returns:
    RoutingPlan with K = 1 (token view, and slot view unless dropless).
  """
  validation.check_logits(logits_GSE)
  g, s, _ = logits_GSE.shape
  validation.check_capacity(capacity, allow_none=True)
  validation.check_choice("gating", gating, BALANCED_GATINGS)
  if not isinstance(train, bool):
    raise ValueError(f"train must be a Python bool, got {train!r}")
  _check_num_iters(num_iters)
  padding_mask_GS = validation.check_padding_mask(padding_mask_GS, (g, s))
  logits_GSE = logits_GSE.astype(jnp.float32)
  selection_GSE = None
  if train:
    selection_GSE = sinkhorn_log(jax.lax.stop_gradient(logits_GSE), num_iters,
                                 padding_mask_GS=padding_mask_GS)
  return token_choice(
      logits_GSE, k=1, capacity=capacity, padding_mask_GS=padding_mask_GS,
      gating=gating, selection_scores_GSE=selection_GSE)
