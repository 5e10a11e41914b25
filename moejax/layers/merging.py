"""Expert merging: the router mixes the experts' *parameters*, and one FFN
runs with the merged weights (fully differentiable, no discrete choice).

* SMEAR (Muqeeth et al. 2023, "Soft Merging of Experts with Adaptive
  Routing"): p = softmax(r W_r), W_merged = sum_e p_e W_e, y = FFN(x;
  W_merged). `granularity='sequence'` routes each group on its mean token
  r = mean_s x_s (the paper's per-example routing; reads the whole group, so
  not causal); 'token' routes every token on itself (causal, but merging per
  token costs as much as running all E experts).
* Lory (Zhong et al. 2024): causal segment-level routing. Each sequence is
  cut into segments of `segment_len` tokens; segment z is routed on the mean
  of segment z - 1,

      p_z = softmax(mean_{t in segment z-1} x_t W_r),   W_z = sum_e p_{z,e} W_e

  and all tokens of segment z run FFN(x; W_z). Segment 0 has no previous
  segment and uses the uniform mix (1/E each; Lory's own choice for the
  first segment differs by implementation). A token's output therefore
  never reads a later token, nor a token of its own segment.

Letters: Z segments of a sequence, T tokens of a segment (T = segment_len),
plus moejax.notation's. Both layers return (y, MoEAux) like MoELayer (a
dense "plan" where every token reaches all E experts with weight p, so
losses and metrics work unchanged: load_balance is constant 1 and mean_k is
E) and are built from a config with moe.layer = 'smear' / 'lory'.
"""

from flax import nnx
import jax
import jax.numpy as jnp

from moejax import routing
from moejax.layers import experts as experts_lib
from moejax.layers import moe as moe_lib
from moejax.layers import routers as routers_lib
from moejax.ops import ffn as ffn_ops
from moejax.routing import validation

SMEAR_GRANULARITIES = ("sequence", "token")


class MergeRouter(nnx.Module):
  """The merge weights' router: w_router_ME [M, E] (float32).

  experts_per_token(cf) is the FFN compute per token in units of one
  expert (accounting): 1 for merged weights shared by many tokens, E for
  per-token merging."""

  def __init__(self, model_dim, num_experts, *, per_token_cost, rngs):
    self.num_experts, self.k = num_experts, num_experts
    self.per_token_cost = per_token_cost
    self.w_router_ME = routers_lib.router_weight(rngs, model_dim, num_experts)

  def experts_per_token(self, capacity_factor):
    del capacity_factor
    return self.per_token_cost

  def __call__(self, r_XM):
    """<float>[..., M] -> <float32>[..., E] logits."""
    return jnp.einsum("...M,ME->...E", r_XM.astype(jnp.float32),
                      self.w_router_ME[...])


def _dense_plan_aux(probs_GSE, logits_GSE, mask_GS):
  """MoEAux of a merge: every real token reaches all E experts with weight p."""
  g, s, e = probs_GSE.shape
  expert_GSK = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (g, s, e))
  plan = routing.assign_slots(expert_GSK, probs_GSE, probs_GSE, capacity=None,
                              padding_mask_GS=mask_GS)
  base = routing.plan_losses(plan, logits_GSE)
  return moe_lib.MoEAux(losses={"load_balance": base.load_balance,
                                "z_loss": base.z_loss},
                        metrics=routing.routing_metrics(plan), stats={})


def merged_ffn(x_XTM, p_XE, weights, activation):
  """FFN of merged weights: W_x = sum_e p_xe W_e, then x W_x per row group.

  Args:
    x_XTM: <dtype>[X, T, M] X row groups of T tokens.
    p_XE: <float32>[X, E] merge weights of each group.
    weights: ExpertWeights (w_in_EMH, w_out_EHM, w_gate_EMH or None).
    activation: the experts' activation.
  Returns:
    <dtype>[X, T, M].
  """
  dt = x_XTM.dtype
  merge = lambda w: None if w is None else jnp.einsum(
      "XE,E...->X...", p_XE.astype(dt), w)
  w_in_XMH, w_out_XHM, w_gate_XMH = (merge(w) for w in weights)
  h_XTH = jnp.einsum("XTM,XMH->XTH", x_XTM, w_in_XMH)
  g_XTH = (None if w_gate_XMH is None else
           jnp.einsum("XTM,XMH->XTH", x_XTM, w_gate_XMH))
  h_XTH = ffn_ops.activate(h_XTH, g_XTH, activation)
  return jnp.einsum("XTH,XHM->XTM", h_XTH, w_out_XHM)


class _MergedLayer(nnx.Module):
  """Shared parts: experts, router, the MoELayer-like attributes that
  models and accounting read."""

  returns_aux = True
  loss_names = ("load_balance", "z_loss")
  shared = None
  residual = None
  capacity_factor = 1.0
  CONFIG_KEYS = ("layer", "experts", "allow_non_causal", "layers")

  def _init_parts(self, model_dim, hidden_dim, num_experts, activation,
                  per_token_cost, dtype, param_dtype, rngs):
    self.experts = experts_lib.Experts(
        num_experts, model_dim, hidden_dim, activation=activation,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.router = MergeRouter(model_dim, num_experts,
                              per_token_cost=per_token_cost, rngs=rngs)
    self.deterministic = False

  @property
  def num_experts(self):
    return self.experts.num_experts

  @property
  def model_dim(self):
    return self.experts.model_dim

  @classmethod
  def from_config(cls, config, experts_cfg, *, model_dim, rngs, dtype,
                  param_dtype, causal):
    """The layer from an moe config (build_moe's registry calls this)."""
    opts = {k: v for k, v in config.items() if k not in cls.CONFIG_KEYS}
    return cls(model_dim, experts_cfg.get("hidden_dim"),
               experts_cfg["num_experts"],
               activation=experts_cfg.get("activation", "relu"),
               dtype=dtype, param_dtype=param_dtype, rngs=rngs, **opts)


class SMEARLayer(_MergedLayer):
  """SMEAR: one FFN with the router-weighted mean of the experts' weights.

  Args:
    model_dim, hidden_dim, num_experts: M, H, E.
    granularity: 'sequence' (one merge per group, routed on the group's
      mean token; non-causal) or 'token' (per-token merge; causal).
    group_size: S for 'sequence' (None: each sequence).
    activation, dtype, param_dtype, rngs: as Experts.
  Parameters: experts (w_in_EMH, w_gate_EMH, w_out_EHM); router.w_router_ME.
  """

  CONFIG_KEYS = _MergedLayer.CONFIG_KEYS

  def __init__(self, model_dim, hidden_dim, num_experts, *,
               granularity="sequence", group_size=None, activation="relu",
               dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    validation.check_choice("granularity", granularity, SMEAR_GRANULARITIES)
    if group_size is not None:
      validation.check_int("group_size", group_size, 1)
    self.granularity, self.group_size = granularity, group_size
    self.causal = granularity == "token"
    self._init_parts(model_dim, hidden_dim, num_experts, activation,
                     num_experts if granularity == "token" else 1, dtype,
                     param_dtype, rngs)

  def __call__(self, x_BLM, *, padding_mask_BL=None, token_ids_BL=None,
               deterministic=None):
    """<dtype>[B, L, M] -> (<dtype>[B, L, M], MoEAux)."""
    del token_ids_BL, deterministic
    b, l, m = x_BLM.shape
    s = self.group_size or l
    x_GSM, mask_GS, _ = moe_lib.group_tokens(x_BLM, s, padding_mask_BL)
    g = x_GSM.shape[0]
    real_GS = (jnp.ones((g, s), jnp.bool_) if mask_GS is None else mask_GS)
    x_GSM = x_GSM.astype(self.experts.dtype)
    weights = self.experts.weights()
    act = self.experts.activation
    if self.granularity == "sequence":
      w_GS1 = real_GS[..., None].astype(jnp.float32)
      r_GM = jnp.sum(x_GSM.astype(jnp.float32) * w_GS1, 1) / jnp.maximum(
          jnp.sum(w_GS1, 1), 1.0)
      logits_GE = self.router(r_GM)
      p_GE = jax.nn.softmax(logits_GE, -1)
      y_GSM = merged_ffn(x_GSM, p_GE, weights, act)
      logits_GSE = jnp.broadcast_to(logits_GE[:, None], (g, s, logits_GE.shape[-1]))
    else:
      logits_GSE = self.router(x_GSM)
      p_TE = jax.nn.softmax(logits_GSE, -1).reshape(g * s, -1)
      y_GSM = merged_ffn(x_GSM.reshape(g * s, 1, m), p_TE, weights,
                         act).reshape(g, s, m)
    y_GSM = jnp.where(real_GS[..., None], y_GSM, 0)
    aux = _dense_plan_aux(jax.nn.softmax(logits_GSE, -1), logits_GSE, mask_GS)
    return y_GSM.reshape(g * s, m)[:b * l].reshape(b, l, m), aux


class LoryLayer(_MergedLayer):
  """Lory: segment z of each sequence runs the experts merged with weights
  routed on segment z - 1 (causal).

  Args:
    model_dim, hidden_dim, num_experts: M, H, E.
    segment_len: T tokens per segment (Lory: 256); the sequence is padded
      to a multiple of T.
    activation, dtype, param_dtype, rngs: as Experts.
  Parameters: experts; router.w_router_ME.
  """

  causal = True

  def __init__(self, model_dim, hidden_dim, num_experts, *, segment_len=16,
               activation="relu", dtype=jnp.float32, param_dtype=jnp.float32,
               rngs):
    validation.check_int("segment_len", segment_len, 1)
    self.segment_len = segment_len
    self._init_parts(model_dim, hidden_dim, num_experts, activation, 1,
                     dtype, param_dtype, rngs)

  def __call__(self, x_BLM, *, padding_mask_BL=None, token_ids_BL=None,
               deterministic=None):
    """<dtype>[B, L, M] -> (<dtype>[B, L, M], MoEAux)."""
    del token_ids_BL, deterministic
    b, l, m = x_BLM.shape
    t = self.segment_len
    z = -(-l // t)
    pad = z * t - l
    real_BL = (jnp.ones((b, l), jnp.bool_) if padding_mask_BL is None
               else padding_mask_BL.astype(jnp.bool_))
    x_BLM = jnp.pad(x_BLM.astype(self.experts.dtype), ((0, 0), (0, pad), (0, 0)))
    real_BL = jnp.pad(real_BL, ((0, 0), (0, pad)))
    x_BZTM = x_BLM.reshape(b, z, t, m)
    real_BZT = real_BL.reshape(b, z, t)
    w_BZT1 = real_BZT[..., None].astype(jnp.float32)
    mean_BZM = jnp.sum(x_BZTM.astype(jnp.float32) * w_BZT1, 2) / jnp.maximum(
        jnp.sum(w_BZT1, 2), 1.0)
    logits_BZE = self.router(mean_BZM)
    e = self.num_experts
    # Segment z is routed on segment z - 1; segment 0 mixes uniformly.
    prev_BZE = jnp.concatenate(
        [jnp.zeros((b, 1, e), jnp.float32), logits_BZE[:, :-1]], axis=1)
    p_BZE = jax.nn.softmax(prev_BZE, -1)
    y_XTM = merged_ffn(x_BZTM.reshape(b * z, t, m), p_BZE.reshape(b * z, e),
                       self.experts.weights(), self.experts.activation)
    y_BLM = jnp.where(real_BL[..., None], y_XTM.reshape(b, z * t, m), 0)
    probs_GSE = jnp.broadcast_to(p_BZE.reshape(b * z, 1, e), (b * z, t, e))
    logits_GSE = jnp.broadcast_to(prev_BZE.reshape(b * z, 1, e), (b * z, t, e))
    aux = _dense_plan_aux(probs_GSE, logits_GSE, real_BZT.reshape(b * z, t))
    return y_BLM[:, :l], aux
