"""Noisy top-k gating (Shazeer et al. 2017).

H(x)_i = (x W_g)_i + N(0, 1) * softplus((x W_noise)_i) at train time, and
G(x) = softmax(KeepTopK(H(x), k)): the gates are a softmax over the kept k
noisy logits. The caller computes both logit tensors (two router matmuls);
these functions do the rest. The paper's load loss needs the smooth load
estimator P(x, i), `load_probability`; the importance loss needs the gates,
`top_k_gates` (or a plan's weight_GSK, which also zeroes dropped
assignments). Both losses live in losses.py.
"""

import jax
import jax.numpy as jnp

from moejax.routing import validation
from moejax.routing.token_choice import token_choice

# Floor on the noise scale where it divides: softplus can underflow to 0.
_MIN_STD = 1e-9


def _check_pair(clean_logits_GSE, other_GSE, other_name):
  validation.check_logits(clean_logits_GSE, name="clean_logits_GSE")
  if tuple(getattr(other_GSE, "shape", ())) != tuple(clean_logits_GSE.shape):
    raise ValueError(f"{other_name} must have the shape of clean_logits_GSE "
                     f"{tuple(clean_logits_GSE.shape)}, got "
                     f"{getattr(other_GSE, 'shape', None)}")


def _check_train(train):
  if not isinstance(train, bool):
    raise ValueError(f"train must be a Python bool, got {train!r}")


def noisy_logits(clean_logits_GSE, noise_logits_GSE, rng, train):
  """Adds the paper's tunable Gaussian noise to the router logits.

  Args:
    clean_logits_GSE: <float>[G, S, E] x W_g (cast to float32).
    noise_logits_GSE: <float>[G, S, E] x W_noise (cast to float32).
    rng: PRNG key (needed when train; ignored, may be None, at eval).
    train: Python bool; at eval no noise is added.
  Returns:
    (noisy_logits_GSE, noise_std_GSE), both <float32>[G, S, E]:
    noise_std = softplus(noise_logits); noisy = clean + N(0,1) * noise_std
    when train, else clean.
  """
  _check_pair(clean_logits_GSE, noise_logits_GSE, "noise_logits_GSE")
  _check_train(train)
  if train and rng is None:
    raise ValueError("noisy_logits with train=True needs an rng key, got None")
  clean_GSE = clean_logits_GSE.astype(jnp.float32)
  noise_std_GSE = jax.nn.softplus(noise_logits_GSE.astype(jnp.float32))
  if not train:
    return clean_GSE, noise_std_GSE
  eps_GSE = jax.random.normal(rng, clean_GSE.shape, jnp.float32)
  return clean_GSE + eps_GSE * noise_std_GSE, noise_std_GSE


def top_k_gates(logits_GSE, k):
  """The paper's G(x) = softmax(KeepTopK(logits, k)) as a dense tensor.

  Args:
    logits_GSE: <float>[G, S, E] (noisy) logits, cast to float32.
    k: 1 <= k <= E.
  Returns:
    <float32>[G, S, E]: softmax over each token's top-k logits, 0 elsewhere.
  """
  validation.check_logits(logits_GSE)
  e = logits_GSE.shape[-1]
  validation.check_k(k, e)
  logits_GSE = logits_GSE.astype(jnp.float32)
  top_GSK, expert_GSK = jax.lax.top_k(logits_GSE, k)
  gates_GSK = jax.nn.softmax(top_GSK, axis=-1)
  onehot_GSKE = jax.nn.one_hot(expert_GSK, e, dtype=jnp.float32)
  return jnp.einsum("GSK,GSKE->GSE", gates_GSK, onehot_GSKE)


def noisy_top_k(clean_logits_GSE, noise_logits_GSE, *, k, capacity, rng, train,
                padding_mask_GS=None):
  """Noisy top-k routing: token choice with gating='topk_softmax' on H(x).

  Args:
    clean_logits_GSE: <float>[G, S, E] x W_g.
    noise_logits_GSE: <float>[G, S, E] x W_noise.
    k: experts per token, 1 <= k <= E.
    capacity: C (int >= 1), or None for a dropless plan.
    rng: PRNG key (train only).
    train: Python bool; at eval this is plain top-k of the clean logits.
    padding_mask_GS: <bool>[G, S] or None; padded tokens take no slot.
  Returns:
    RoutingPlan whose weights are the softmax over the kept k noisy logits
    and whose probs_GSE is the softmax of the noisy logits over all E.
    The noisy logits and noise scale for `load_probability` come from
    `noisy_logits` (call it with the same rng to get the same noise).
  """
  _check_pair(clean_logits_GSE, noise_logits_GSE, "noise_logits_GSE")
  validation.check_k(k, clean_logits_GSE.shape[-1])
  noisy_GSE, _ = noisy_logits(clean_logits_GSE, noise_logits_GSE, rng, train)
  return token_choice(
      noisy_GSE, k=k, capacity=capacity, padding_mask_GS=padding_mask_GS,
      gating="topk_softmax")


def load_probability(clean_logits_GSE, noisy_logits_GSE, noise_std_GSE, k):
  """The paper's smooth load estimator P(x, i) (eq. 9).

  P(x, i) = Phi((clean_i - kth_excluding(H(x), k, i)) / noise_std_i): the
  probability that expert i stays in the top k if only its own noise were
  redrawn. kth_excluding(H, k, i) is the k-th largest noisy logit among the
  experts other than i: the (k+1)-th largest of all if i is in the top k,
  else the k-th largest. With k == E every expert is always kept (P = 1).

  Args:
    clean_logits_GSE: <float>[G, S, E] x W_g.
    noisy_logits_GSE: <float>[G, S, E] H(x) from `noisy_logits`.
    noise_std_GSE: <float>[G, S, E] softplus(x W_noise) from `noisy_logits`.
    k: 1 <= k <= E.
  Returns:
    <float32>[G, S, E] probabilities in [0, 1]; differentiable w.r.t. the
    clean logits and the noise scale. Summed over tokens it is the load.
  """
  _check_pair(clean_logits_GSE, noisy_logits_GSE, "noisy_logits_GSE")
  _check_pair(clean_logits_GSE, noise_std_GSE, "noise_std_GSE")
  e = clean_logits_GSE.shape[-1]
  validation.check_k(k, e)
  clean_GSE = clean_logits_GSE.astype(jnp.float32)
  noisy_GSE = noisy_logits_GSE.astype(jnp.float32)
  std_GSE = jnp.maximum(noise_std_GSE.astype(jnp.float32), _MIN_STD)
  if k == e:
    return jnp.ones_like(clean_GSE)
  top_GSX, _ = jax.lax.top_k(noisy_GSE, k + 1)
  threshold_if_in_GS1 = top_GSX[..., k:k + 1]      # (k+1)-th largest
  threshold_if_out_GS1 = top_GSX[..., k - 1:k]     # k-th largest
  is_in_GSE = noisy_GSE > threshold_if_in_GS1
  threshold_GSE = jnp.where(is_in_GSE, threshold_if_in_GS1,
                            threshold_if_out_GS1)
  return jax.scipy.stats.norm.cdf((clean_GSE - threshold_GSE) / std_GSE)
