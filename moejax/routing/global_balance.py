"""Global-batch load balancing (Qwen, Qiu et al. 2025 "Demons in the Detail";
Megatron-Core's global aux loss).

The classic balance loss (losses.load_balancing_loss) is E * sum_e f_e P_e
per group, averaged over groups: every group (often one sequence) is pushed
to be balanced on its own, which fights expert specialisation by domain.
The global-batch version counts f over the whole global batch:

    f_e = (# assignments to e over all groups, all data-parallel shards and
           all micro-batches so far) / (T_global * K)
    P_e = (sum over the same tokens of p_e(x)) / T_global
    loss = E * sum_e f_e * P_e

Under plain jit (GSPMD) the layer sees every group of the global batch, so
`axis_names=()` is already global over data-parallel shards; inside a
`shard_map` (each device holds its own groups) pass the mesh axes that split
the batch and the counts are psum-ed. Micro-batches (gradient accumulation)
pass the running counts of the earlier micro-batches as `carry`
(GlobalBalanceCarry), Qwen's buffer: f of micro-batch m then counts
micro-batches 1..m. Uniform routing gives exactly 1, as the per-group loss.
"""

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from moejax.routing import losses as losses_lib


@flax.struct.dataclass
class GlobalBalanceCarry:
  """Running sums over earlier micro-batches (all float32).

  counts_E [E] assignments per expert; tokens [] real tokens; probs_E [E]
  summed router probabilities (no gradient flows into the carry)."""
  counts_E: jax.Array
  tokens: jax.Array
  probs_E: jax.Array

  @classmethod
  def zeros(cls, num_experts):
    z = jnp.zeros((num_experts,), jnp.float32)
    return cls(counts_E=z, tokens=jnp.zeros((), jnp.float32), probs_E=z)


def global_balance_sums(probs_GSE, expert_index_GSK, padding_mask_GS=None,
                        *, axis_names: Sequence[str] = ()):
  """(counts_E, tokens, probs_E) of this batch, psum-ed over axis_names.

  Args: as global_load_balancing_loss.
  Returns: GlobalBalanceCarry of this batch's sums (probs_E differentiable).
  """
  probs_GSE = losses_lib._check_float_GSE(probs_GSE, "probs_GSE")  # pylint: disable=protected-access
  g, s, e = probs_GSE.shape
  index_GSK = losses_lib._check_index_GSK(expert_index_GSK, (g, s))  # pylint: disable=protected-access
  mask_GS = losses_lib._mask_GS(padding_mask_GS, (g, s))  # pylint: disable=protected-access
  counts_E = jnp.sum(losses_lib._expert_counts(index_GSK, e, mask_GS), 0)  # pylint: disable=protected-access
  tokens = jnp.sum(mask_GS.astype(jnp.float32))
  probs_E = jnp.sum(jnp.where(mask_GS[..., None], probs_GSE, 0.0), (0, 1))
  axis_names = tuple(axis_names)
  if axis_names:
    counts_E = jax.lax.psum(counts_E, axis_names)
    tokens = jax.lax.psum(tokens, axis_names)
    probs_E = jax.lax.psum(probs_E, axis_names)
  return GlobalBalanceCarry(counts_E=counts_E, tokens=tokens, probs_E=probs_E)


def global_load_balancing_loss(probs_GSE, expert_index_GSK,
                               padding_mask_GS=None, *,
                               axis_names: Sequence[str] = (), carry=None,
                               return_carry=False):
  """The global-batch balance loss E * sum_e f_e P_e (module docstring).

  Args:
    probs_GSE: <float32>[G, S, E] router probabilities.
    expert_index_GSK: <int32>[G, S, K] chosen experts (E: no assignment; it
      still counts in the T*K denominator, as in load_balancing_loss).
    padding_mask_GS: <bool>[G, S] or None.
    axis_names: mesh axes to psum over (inside shard_map); () under jit.
    carry: GlobalBalanceCarry of earlier micro-batches, or None.
    return_carry: also return the carry including this batch.
  Returns:
    <float32>[] loss (and the new GlobalBalanceCarry when return_carry).
    Only P carries a gradient (f is a count).
  """
  k = jnp.shape(expert_index_GSK)[-1]
  now = global_balance_sums(probs_GSE, expert_index_GSK, padding_mask_GS,
                            axis_names=axis_names)
  total = now if carry is None else GlobalBalanceCarry(
      counts_E=now.counts_E + carry.counts_E, tokens=now.tokens + carry.tokens,
      probs_E=now.probs_E + jax.lax.stop_gradient(carry.probs_E))
  e = total.counts_E.shape[0]
  tokens = jnp.maximum(total.tokens, 1.0)
  f_E = jax.lax.stop_gradient(total.counts_E) / (tokens * k)
  loss = (e * jnp.sum(f_E * total.probs_E / tokens)).astype(jnp.float32)
  if return_carry:
    return loss, jax.tree.map(jax.lax.stop_gradient, total)
  return loss
