"""Routing statistics of a model on a text: what the OLMoE/Mixtral reports show.

`trace_routing(model, tokens_BL)` runs the model once with every MoE layer's
router wrapped in a `TracingRouter`, which records which experts each token
chose and the router probabilities; `layer_stats` turns one layer's record
into the per-layer figures:

  * expert load (fraction of the kept assignments per expert) and the router
    entropy (nats, mean over real tokens);
  * the fraction of assignments that a capacity factor cf would drop:
    per group of S tokens, C = ceil(k * cf * S / E) slots per expert
    (routing.compute_capacity), and an expert asked by n > C tokens drops
    n - C of them;
  * co-activation: P(expert j chosen | expert i chosen) over tokens;
  * the shift between two parts of each sequence (a prompt and its
    continuation): their loads and the total-variation distance between them.

Tokens are counted in the [B, L] layout; padding (mask False) counts nowhere.
"""

import dataclasses
import math
from typing import Optional

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from moejax.layers import transformer as tfm
from moejax.routing import capacity as capacity_lib


class ChosenGSE(nnx.Variable):
  """A routing record: <bool>[G, S, E] experts chosen by each token."""


class ProbsGSE(nnx.Variable):
  """A routing record: <float32>[G, S, E] router probabilities."""


def chosen_from_plan(plan):
  """<bool>[G, S, E]: the experts each token was assigned to (kept or not).

  Token-choice plans read the token view (a variable number of assignments
  per token works too); expert-choice plans read the slot view.
  """
  e = plan.num_experts
  if plan.expert_GSK is not None:
    # The sentinel E (no assignment) falls in the dropped column E.
    one_hot_GSKE = jax.nn.one_hot(plan.expert_GSK, e + 1, dtype=jnp.int32)
    return one_hot_GSKE[..., :e].sum(axis=2) > 0
  g, s = plan.probs_GSE.shape[:2]
  tokens_GEC = plan.token_GEC
  chosen = jnp.zeros((g, s + 1, e), jnp.int32)
  g_idx = jnp.arange(g)[:, None, None]
  e_idx = jnp.arange(e)[None, :, None]
  chosen = chosen.at[g_idx, tokens_GEC, e_idx].add(1)
  return chosen[:, :s] > 0


class TracingRouter(nnx.Module):
  """Wraps a router and records its choices; routes exactly as the router.

  The records are nnx.Variables replaced at every call (`last_chosen`,
  `last_probs`), so they can be read after an eager or nnx.jit call.
  """

  def __init__(self, router):
    self.inner = router
    self.last_chosen = ChosenGSE(jnp.zeros((0,), bool))
    self.last_probs = ProbsGSE(jnp.zeros((0,), jnp.float32))

  # The router contract, forwarded.
  @property
  def num_experts(self):
    return self.inner.num_experts

  @property
  def k(self):
    return self.inner.k

  @property
  def causal(self):
    return self.inner.causal

  def __getattr__(self, name):
    # Optional hooks (capacity_for, token_view, group_local, loss_names, ...):
    # present exactly when the wrapped router has them.
    if name == "inner" or name.startswith("_"):
      raise AttributeError(name)
    return getattr(self.inner, name)

  def __call__(self, x_GSM, **kwargs):
    out = self.inner(x_GSM, **kwargs)
    self.last_chosen.set_value(chosen_from_plan(out.plan))
    self.last_probs.set_value(out.plan.probs_GSE.astype(jnp.float32))
    return out


@dataclasses.dataclass
class LayerTrace:
  """One MoE layer's routing on a [B, L] batch.

  Attributes:
    chosen_BLE: <bool>[B, L, E] experts each token chose.
    probs_BLE: <float32>[B, L, E] router probabilities.
    k: the router's experts per token (for the capacity formula).
    group_size: S of the layer's groups.
  """
  chosen_BLE: np.ndarray
  probs_BLE: np.ndarray
  k: int
  group_size: int


def moe_layers(model):
  """[(index, layer)] for every MoE layer, in model order (blocks' ffn)."""
  found = []
  for _, module in nnx.iter_modules(model):
    if tfm.is_moe_ffn(module) and hasattr(module, "router"):
      found.append(module)
  return list(enumerate(found))


def trace_routing(model, tokens_BL, *, padding_mask_BL=None):
  """Runs `model` once with evaluation routing; returns each MoE layer's trace.

  Args:
    model: a model whose MoE layers are MoELayer (router attribute), called
      as model(tokens_BL, padding_mask_BL=...) -> (logits, aux).
    tokens_BL: <int32>[B, L].
    padding_mask_BL: optional <bool>[B, L].
  Returns:
    (logits_BLV, [LayerTrace] in layer order).
  """
  b, l = tokens_BL.shape
  layers = moe_layers(model)
  if not layers:
    raise ValueError(f"{type(model).__name__} has no MoE layer to trace")
  originals = [(layer.router, getattr(layer, "deterministic", None))
               for _, layer in layers]
  try:
    for _, layer in layers:
      layer.router = TracingRouter(layer.router)
      layer.deterministic = True  # evaluation routing: no noise or jitter
    logits_BLV, _ = model(tokens_BL, padding_mask_BL=padding_mask_BL)
    traces = []
    for _, layer in layers:
      chosen_GSE = np.asarray(layer.router.last_chosen.get_value())
      probs_GSE = np.asarray(layer.router.last_probs.get_value())
      g, s, e = chosen_GSE.shape
      traces.append(LayerTrace(
          chosen_BLE=chosen_GSE.reshape(g * s, e)[:b * l].reshape(b, l, e),
          probs_BLE=probs_GSE.reshape(g * s, e)[:b * l].reshape(b, l, e),
          k=int(layer.router.k), group_size=s))
  finally:
    for (_, layer), (router, deterministic) in zip(layers, originals):
      layer.router = router
      if deterministic is not None:
        layer.deterministic = deterministic
  return logits_BLV, traces


def _load(chosen_TE):
  counts_E = chosen_TE.sum(0).astype(np.float64)
  total = counts_E.sum()
  return counts_E / total if total else counts_E


def _entropy(probs_TE):
  if not len(probs_TE):
    return 0.0
  p = np.clip(probs_TE.astype(np.float64), 1e-30, 1.0)
  return float(-(probs_TE * np.log(p)).sum(-1).mean())


def drop_fraction(chosen_BLE, mask_BL, *, k, capacity_factor, group_size):
  """Fraction of real assignments a capacity factor would drop.

  Groups are consecutive runs of `group_size` tokens of the flattened batch
  (as MoELayer groups them); C = compute_capacity(S, E, k, cf).
  """
  b, l, e = chosen_BLE.shape
  chosen_TE = (chosen_BLE & mask_BL[..., None]).reshape(b * l, e)
  pad = (-len(chosen_TE)) % group_size
  chosen_GSE = np.pad(chosen_TE, ((0, pad), (0, 0))).reshape(
      -1, group_size, e)
  capacity = capacity_lib.compute_capacity(
      group_size, e, k=min(k, e), capacity_factor=capacity_factor)
  demand_GE = chosen_GSE.sum(1)
  total = demand_GE.sum()
  return float(np.maximum(demand_GE - capacity, 0).sum() / total) if total \
      else 0.0


def coactivation(chosen_TE):
  """<float64>[E, E]: row i, column j = P(j chosen | i chosen); diagonal 1
  for experts that were chosen, rows of unchosen experts 0."""
  c = chosen_TE.astype(np.float64)
  both_EE = c.T @ c
  count_E = np.diag(both_EE).copy()
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count_E[:, None] > 0, both_EE / count_E[:, None], 0.0)


def layer_stats(trace, mask_BL, *, capacity_factor=1.0,
                split_BL: Optional[np.ndarray] = None):
  """The per-layer figures of one LayerTrace.

  Args:
    trace: LayerTrace.
    mask_BL: <bool>[B, L] real tokens.
    capacity_factor: cf of the drop estimate.
    split_BL: optional <bool>[B, L], True on the continuation (False on the
      prompt); the shift compares the two parts' loads.
  Returns:
    dict: load_E [E], max_over_mean_load, entropy, drop_fraction,
    coactivation_EE [E, E]; with split_BL also prompt_load_E,
    continuation_load_E and shift_tv (total variation, in [0, 1]).
  """
  mask_BL = np.asarray(mask_BL, bool)
  e = trace.chosen_BLE.shape[-1]
  chosen_TE = trace.chosen_BLE[mask_BL]
  load_E = _load(chosen_TE)
  out = {
      "load_E": load_E,
      "max_over_mean_load": float(e * load_E.max()) if load_E.sum() else 0.0,
      "entropy": _entropy(trace.probs_BLE[mask_BL]),
      "drop_fraction": drop_fraction(
          trace.chosen_BLE, mask_BL, k=trace.k,
          capacity_factor=capacity_factor, group_size=trace.group_size),
      "coactivation_EE": coactivation(chosen_TE),
  }
  if split_BL is not None:
    split_BL = np.asarray(split_BL, bool)
    prompt = _load(trace.chosen_BLE[mask_BL & ~split_BL])
    cont = _load(trace.chosen_BLE[mask_BL & split_BL])
    out.update(prompt_load_E=prompt, continuation_load_E=cont,
               shift_tv=float(0.5 * np.abs(prompt - cont).sum()))
  return out


def max_entropy(num_experts):
  """log E: the entropy of a uniform router, for reading `entropy`."""
  return math.log(num_experts)
