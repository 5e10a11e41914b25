"""What the models share: MoE placement, FFN construction, FLOP matching."""

import math

import jax

from moejax.layers import build as build_lib
from moejax.layers import ffn as ffn_lib
from moejax.layers import transformer as tfm


def _check_int(name, value, minimum):
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def every_n_placement(num_layers, every):
  """Indices of the MoE layers when MoE replaces the FFN every `every` layers.

  Layer i (0-based) is MoE when (i + 1) % every == 0: every=1 -> all layers,
  every=2 -> 1, 3, 5, ... (GShard/Switch "every other layer", V-MoE
  "Every-2"), every=0 -> none (a dense model).
  """
  _check_int("num_layers", num_layers, 1)
  _check_int("moe_every", every, 0)
  if every == 0:
    return ()
  return tuple(range(every - 1, num_layers, every))


def vmoe_placement(num_layers, num_moe):
  """V-MoE "Last-n" placement: the last `num_moe` even layers.

  "Even" counts layers from 1 as the V-MoE paper does, so the 0-based
  indices are odd: vmoe_placement(12, 2) == (9, 11), vmoe_placement(8, 2) ==
  (5, 7); num_moe larger than num_layers // 2 gives every other layer.
  """
  _check_int("num_layers", num_layers, 1)
  _check_int("num_moe", num_moe, 0)
  if num_moe == 0:
    return ()
  return tuple(range(1, num_layers, 2))[-num_moe:]


def check_layer_indices(moe_layers, num_layers):
  """Validates explicit MoE layer indices; returns them as a sorted tuple."""
  out = []
  for i in moe_layers:
    if isinstance(i, bool) or not isinstance(i, int) or not (
        0 <= i < num_layers):
      raise ValueError(f"moe_layers entries must be integers in [0, "
                       f"{num_layers}), got {i!r} in {tuple(moe_layers)}")
    out.append(i)
  if len(set(out)) != len(out):
    raise ValueError(f"moe_layers has duplicates: {tuple(moe_layers)}")
  return tuple(sorted(out))


def check_moe_config(moe, num_layers, moe_layers):
  """Returns the MoE config as a dict, checking its per-layer overrides and
  the old flat form (moe.router='x', moe.k=2, ...: an error naming where each
  field moved)."""
  if moe is None:
    raise ValueError("the model has MoE layers but moe is None; pass at "
                     "least {'experts': {'num_experts': E}}")
  if hasattr(moe, "to_dict"):
    moe = moe.to_dict()
  if not isinstance(moe, dict):
    raise ValueError(f"moe must be a dict (the build_moe config), got "
                     f"{type(moe).__name__}")
  build_lib.check_flat_form(moe)
  build_lib.check_layer_overrides(moe, num_layers, moe_layers)
  return dict(moe)


def build_ffn(index, *, is_moe, model_dim, mlp_dim, activation, moe, causal,
              dtype, param_dtype, rngs):
  """DenseFFN, or the MoE layer build_moe makes from block `index`'s config.

  MoE experts default to hidden_dim = mlp_dim and the model's activation.
  """
  kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  if not is_moe:
    return ffn_lib.DenseFFN(model_dim, mlp_dim, activation=activation, **kw)
  try:
    return build_lib.build_moe(
        build_lib.config_for_layer(moe, index), model_dim=model_dim,
        causal=causal, expert_defaults={"hidden_dim": mlp_dim,
                                        "activation": activation}, **kw)
  except build_lib.MoEConfigError as err:
    raise _name_overrides(err, moe, index) from None


def _name_overrides(err, moe, index):
  """err with each field that block `index`'s override sets renamed to
  moe.layers.<index>.<field>, where the bad value was written."""
  override = {}
  for key, value in (moe.get("layers") or {}).items():
    if str(key) == str(index):
      override = value.to_dict() if hasattr(value, "to_dict") else value
  for field, _, _ in err.errors:
    node = override
    for part in field.split(".")[1:]:
      node = node.get(part) if isinstance(node, dict) else None
    if node is not None:
      err = err.prefixed(field, f"moe.layers.{index}{field[len('moe'):]}")
  return err


def flop_matched_dense_mlp_dim(hidden_dim, k, num_shared_experts=0,
                               shared_hidden_dim=None, *,
                               residual_hidden_dim=0, moe_every=1,
                               mlp_dim=None):
  """The dense FFN width whose matmul FLOPs equal an MoE model's active ones.

  Per token an MoE layer runs k experts of width H plus its always-on dense
  parts, so the matched width is k*H + num_shared*H_shared + H_residual
  (activation-independent: gated activations scale both sides by 3/2).
  Router FLOPs (2*M*E per token) are left out; they are small.

  With moe_every = N > 1 the MoE model also has dense layers of width
  mlp_dim; a dense model of uniform width then matches the total FLOPs with
  ((N - 1) * mlp_dim + matched) / N (exact when N divides num_layers).

  For expert choice pass k = capacity_factor (the average number of experts
  per token).

  Args:
    hidden_dim: H, each routed expert's width.
    k: experts per token (may be fractional for expert choice).
    num_shared_experts, shared_hidden_dim: shared experts (width defaults
      to hidden_dim, as build_moe).
    residual_hidden_dim: the residual dense branch width (moe.residual).
    moe_every, mlp_dim: as DecoderLM; mlp_dim is needed when moe_every > 1.
  Returns:
    int width (rounded to nearest).
  """
  _check_int("hidden_dim", hidden_dim, 1)
  if isinstance(k, bool) or not isinstance(k, (int, float)) or not k > 0:
    raise ValueError(f"k must be a number > 0, got {k!r}")
  _check_int("num_shared_experts", num_shared_experts, 0)
  _check_int("moe_every", moe_every, 1)
  matched = (k * hidden_dim + num_shared_experts * (
      shared_hidden_dim or hidden_dim) + residual_hidden_dim)
  if moe_every > 1:
    if mlp_dim is None:
      raise ValueError("moe_every > 1 needs mlp_dim (the dense layers' width)")
    matched = ((moe_every - 1) * mlp_dim + matched) / moe_every
  return int(math.floor(matched + 0.5))


# ------------------------------------------------------------- scale

# Rematerialisation policies for the blocks (a model's `remat` argument):
#   none              keep every activation for the backward pass
#   full              keep only each block's input; recompute the rest
#   save_dots         keep matmul outputs without a batch dimension
#                     (jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
#   save_moe_outputs  keep nothing but the MoE layers' outputs (named
#                     MOE_OUTPUT with jax.ad_checkpoint.checkpoint_name)
#   offload           move the save_dots values to pinned host memory instead
#                     of keeping them on the device (GPU/TPU only)
REMAT_POLICIES = ("none", "full", "save_dots", "save_moe_outputs", "offload")
MOE_OUTPUT = tfm.MOE_OUTPUT


def check_remat(remat):
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}; allowed: {list(REMAT_POLICIES)}")
  return remat


def remat_policy(remat):
  """The jax.checkpoint policy of a REMAT_POLICIES name (None for 'full',
  which saves nothing; not called for 'none')."""
  cp = jax.checkpoint_policies
  check_remat(remat)
  if remat == "full":
    return None
  if remat == "save_dots":
    return cp.dots_with_no_batch_dims_saveable
  if remat == "save_moe_outputs":
    return cp.save_only_these_names(MOE_OUTPUT)
  if remat == "offload":
    return cp.offload_dot_with_no_batch_dims("device", "pinned_host")
  raise ValueError(f"remat={remat!r} has no policy")


def scan_period(num_layers, moe_every, moe_layers_given, moe):
  """The number of consecutive blocks one scan step runs: 1 for a dense
  model or MoE in every layer, moe_every for MoE every N layers (a period of
  N - 1 dense blocks then one MoE block). Raises ValueError (one line) for
  stacks that do not repeat: explicit moe_layers, per-layer MoE overrides,
  or num_layers not a multiple of moe_every."""
  if moe_layers_given:
    raise ValueError("scan_layers=True needs identical repeating layers: "
                     "explicit moe_layers are not supported; use moe_every, "
                     "or scan_layers=False")
  if moe_every and (moe or {}).get("layers"):
    raise ValueError("scan_layers=True needs identical repeating layers: "
                     "per-layer MoE overrides (moe.layers) are not "
                     "supported; remove them, or use scan_layers=False")
  period = max(int(moe_every), 1)
  if num_layers % period:
    raise ValueError(f"scan_layers=True scans over periods of moe_every="
                     f"{moe_every} blocks, so num_layers={num_layers} must be "
                     f"a multiple of {moe_every} (or use scan_layers=False)")
  return period
