"""Parameter and FLOP accounting for the models: total vs active, per token.

Everything reads shapes and attributes only, so an abstract model works and
allocates nothing:

  abstract = nnx.eval_shape(lambda: DecoderLM(..., rngs=nnx.Rngs(0)))
  print(describe(abstract, seq_len=256))
"""

import math

from flax import nnx
import jax

from moejax.layers import ffn as ffn_lib
from moejax.layers import params as params_lib
from moejax.layers import soft_moe as soft_moe_lib
from moejax.layers import transformer as tfm
from moejax.models import decoder as decoder_lib
from moejax.models import vit as vit_lib


def _size(x):
  return int(math.prod(x.shape))


def num_params(module):
  """Number of scalars in the weights (nnx.Param and FrozenParam) of `module` (a module, a
  single variable, or None); RouterBias and other non-Param state are not
  parameters."""
  if module is None:
    return 0
  if isinstance(module, nnx.Variable):
    return _size(module) if isinstance(module, params_lib.WEIGHTS) else 0
  return sum(_size(x) for x in jax.tree.leaves(
      nnx.state(module, params_lib.WEIGHTS)))


def active_experts_per_token(layer):
  """How many routed experts an average token runs through in `layer`.

  The router's `experts_per_token(capacity_factor)` where it has one (expert
  choice: the capacity factor, as each expert takes cf * S / E tokens, at
  most E), else its k; E for Soft MoE (every expert sees every token,
  through slots).
  """
  if isinstance(layer, soft_moe_lib.SoftMoELayer):
    return layer.num_experts
  per_token = getattr(layer.router, "experts_per_token", None)
  if per_token is None:
    return layer.router.k
  return per_token(layer.capacity_factor)


def _moe_layers(model):
  return [m for _, m in nnx.iter_modules(model) if tfm.is_moe_ffn(m)]


def _embedding_params(model):
  if isinstance(model, decoder_lib.DecoderLM):
    return _size(model.embed_VM)
  if isinstance(model, vit_lib.ViTClassifier):
    return _size(model.pos_LM)
  return 0


def count_params(model):
  """Total and active parameter counts.

  active = total minus the routed experts a token does not use: in each
  MoELayer only active_experts_per_token(layer) of its E experts count;
  routers, shared experts, residual branches, attention, norms and
  embeddings count in full. Soft MoE: all experts are active (on slots).

  Returns:
    dict(total, active, embedding (token embedding table or ViT position
    table, included in total and active), experts (routed expert
    parameters, all layers), experts_active, num_moe_layers). Counts are
    ints (active rounded for a fractional expert-choice capacity factor).
  """
  total = num_params(model)
  experts = experts_active = 0.0
  moe_layers = _moe_layers(model)
  for layer in moe_layers:
    n = num_params(layer.experts)
    experts += n
    experts_active += n * active_experts_per_token(layer) / layer.num_experts
  return dict(total=total,
              active=int(round(total - experts + experts_active)),
              embedding=_embedding_params(model), experts=int(experts),
              experts_active=int(round(experts_active)),
              num_moe_layers=len(getattr(model, "moe_layers", moe_layers)))


def _attention_flops(attn, seq_len):
  """(projection FLOPs, score+value FLOPs) per token."""
  proj = 2 * num_params(attn)
  # Scores 'BLND,BJND->BNLJ' and values 'BNLJ,BJND->BLND': 2*J*N*D each per
  # query; the full L x L matrix is computed (causal masking saves nothing).
  scores = 4 * seq_len * attn.num_heads * attn.head_dim
  return proj, scores


def _moe_flops(layer, seq_len):
  """Forward matmul FLOPs per token of an MoE or Soft MoE layer."""
  e = layer.num_experts
  expert_params = num_params(layer.experts)
  if isinstance(layer, soft_moe_lib.SoftMoELayer):
    p, m = layer.slots_per_expert, layer.model_dim
    s = layer.group_size or seq_len
    # logits 'GSM,MEP', dispatch 'GSEP,GSM->EGPM', combine 'GSEP,EGPM->GSM':
    # 2*M*E*P each per token; E*P slots per group of S tokens each run one
    # expert row.
    return 6 * m * e * p + 2 * expert_params * p / s
  # Every weight a token goes through besides the routed experts: the
  # router's, the shared experts' and the residual branch's.
  flops = 2 * expert_params * active_experts_per_token(layer) / e
  for part in (layer.router, layer.shared, layer.residual):
    flops += 2 * num_params(part)
  return flops


def flops_breakdown(model, seq_len=None):
  """Forward matmul FLOPs per token by part (see flops_per_token)."""
  if isinstance(model, vit_lib.ViTClassifier):
    seq_len = model.num_tokens if seq_len is None else seq_len
  elif seq_len is None:
    raise ValueError("seq_len is needed for the attention FLOPs")
  parts = dict(attention_proj=0.0, attention_scores=0.0, dense_ffn=0.0,
               moe=0.0, embed_and_head=0.0)
  # Scanned blocks (scan_layers) hold stacked parameters, so num_params
  # already counts every repeat; the scores term is per block.
  repeats = getattr(model, "scan_repeats", 1)
  for block in model.blocks:
    proj, scores = _attention_flops(block.attention, seq_len)
    parts["attention_proj"] += proj
    parts["attention_scores"] += scores * repeats
    if isinstance(block.ffn, ffn_lib.DenseFFN):
      parts["dense_ffn"] += 2 * num_params(block.ffn)
    else:
      parts["moe"] += _moe_flops(block.ffn, seq_len)
  if isinstance(model, decoder_lib.DecoderLM):
    # The lookup is free; the logits matmul is 2*M*V, tied or not.
    parts["embed_and_head"] = 2 * model.model_dim * model.vocab_size
  elif isinstance(model, vit_lib.ViTClassifier):
    # Patch embedding per patch; the head once per image, spread over tokens.
    parts["embed_and_head"] = (
        2 * _size(model.w_patch_FM) * model.num_patches
        + 2 * _size(model.w_head_MY)) / model.num_tokens
  parts["total"] = sum(parts.values())
  return parts


def flops_per_token(model, seq_len=None):
  """Forward-pass matmul FLOPs per token (multiply-add = 2 FLOPs).

  2 x parameters for every weight matmul a token goes through (MoE: only
  its active experts, plus router, shared and residual parts), plus the
  attention scores and values (4 * seq_len * N * D per layer: the full
  L x L matrix is computed), plus the logits (2*M*V) for the LM, or the
  patch embedding and head (amortised over tokens) for the ViT. Norms,
  softmaxes and the dispatch/combine bookkeeping of the capacity engines
  (and their padded slots) are not counted; a training step is about 3x
  this.

  Args:
    model: a DecoderLM or ViTClassifier (or an nnx.eval_shape of one).
    seq_len: L for the attention term; the ViT defaults to its token count.
  Returns:
    float FLOPs per token.
  """
  own = getattr(model, "flops_per_token", None)
  if callable(own):  # a model that counts its own (HFDecoder)
    return own(seq_len)
  if not isinstance(model, (decoder_lib.DecoderLM, vit_lib.ViTClassifier)):
    raise ValueError(f"flops_per_token supports DecoderLM, ViTClassifier and "
                     f"models with a flops_per_token method, got "
                     f"{type(model).__name__}")
  return flops_breakdown(model, seq_len)["total"]


def _fmt(n):
  for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{unit}"
  return f"{n:.0f}"


def _moe_summary(model):
  if not model.moe_layers:
    return "dense (no MoE layers)"
  period = (model.scan_period if getattr(model, "scan_layers", False)
            else None)  # scanned: the blocks of one period
  first = model.moe_layers[0]
  layer = model.blocks[first % period if period else first].ffn
  if isinstance(layer, soft_moe_lib.SoftMoELayer):
    desc = (f"Soft MoE E={layer.num_experts} slots/expert="
            f"{layer.slots_per_expert} H={layer.experts.hidden_dim}")
  else:
    # Layers without an engine (merged experts) name their class instead.
    engine = getattr(layer, "engine", None)
    desc = (f"router={type(layer.router).__name__} k={layer.router.k} "
            f"E={layer.num_experts} H={layer.experts.hidden_dim} " +
            (f"engine={type(engine).__name__}" if engine is not None
             else f"layer={type(layer).__name__}"))
    if engine is not None and engine.uses_capacity:
      desc += f" capacity_factor={layer.capacity_factor}"
    if layer.shared is not None:
      desc += f" shared_width={_ffn_width(layer.shared)}"
  return (f"MoE at layers {list(model.moe_layers)} "
          f"({len(model.moe_layers)} of {model.num_layers}): {desc}")


def _ffn_width(module):
  """Hidden width of a dense branch: a DenseFFN, or a module holding one in
  `ffn` (ResidualBranch); None for None."""
  if module is None:
    return 0
  if isinstance(module, ffn_lib.DenseFFN):
    return module.w_in_MH.shape[-1]
  return _ffn_width(getattr(module, "ffn", None))


def matched_dense_mlp_dim(model):
  """Uniform dense FFN width giving `model` the same total FFN matmul FLOPs
  (routers excluded), or None when it has Soft MoE layers (their FLOPs depend
  on slots, not a width). Dense layers count mlp_dim; MoE layers count
  active experts x H + shared + residual widths (flop_matched_dense_mlp_dim)."""
  widths = []
  for block in model.blocks:
    ffn = block.ffn
    if isinstance(ffn, ffn_lib.DenseFFN):
      widths.append(ffn.w_in_MH.shape[-1])
    elif tfm.is_moe_ffn(ffn) and not isinstance(
        ffn, soft_moe_lib.SoftMoELayer):
      widths.append(active_experts_per_token(ffn) * ffn.experts.hidden_dim
                    + _ffn_width(ffn.shared) + _ffn_width(ffn.residual))
    else:
      return None
  return int(math.floor(sum(widths) / len(widths) + 0.5))


def describe(model, seq_len=None):
  """A few lines for the start of a run: shape, MoE, params, FLOPs/token.

  Args:
    model: a DecoderLM or ViTClassifier (or an nnx.eval_shape of one).
    seq_len: L for the attention FLOPs (needed for the LM; the ViT defaults
      to its token count).
  Returns:
    str, several lines.
  """
  own = getattr(model, "describe", None)
  if callable(own):  # a model that describes itself (HFDecoder)
    return own(seq_len)
  counts = count_params(model)
  parts = flops_breakdown(model, seq_len)
  attn = model.blocks[0].attention
  if isinstance(model, decoder_lib.DecoderLM):
    head = (f"DecoderLM: V={model.vocab_size} M={model.model_dim} "
            f"layers={model.num_layers} heads={attn.num_heads}x"
            f"{attn.head_dim} mlp={model.mlp_dim} act={model.activation} "
            f"tied={model.tie_embeddings}")
  else:
    seq_len = model.num_tokens if seq_len is None else seq_len
    head = (f"ViTClassifier: image={model.image_size} patch="
            f"{model.patch_size} tokens={model.num_tokens} classes="
            f"{model.num_classes} M={model.model_dim} layers="
            f"{model.num_layers} heads={attn.num_heads}x{attn.head_dim} "
            f"mlp={model.mlp_dim} pool={model.pool}")
  share = counts["active"] / max(counts["total"], 1)
  lines = [
      head,
      "  " + _moe_summary(model),
      f"  params: total {counts['total']:,} | active {counts['active']:,} "
      f"({share:.1%}) | embedding {counts['embedding']:,} | routed experts "
      f"{counts['experts']:,}",
      f"  forward FLOPs/token at L={seq_len}: {_fmt(parts['total'])} "
      f"(attention proj {_fmt(parts['attention_proj'])}, scores "
      f"{_fmt(parts['attention_scores'])}, dense FFN "
      f"{_fmt(parts['dense_ffn'])}, MoE {_fmt(parts['moe'])}, embed/head "
      f"{_fmt(parts['embed_and_head'])})",
  ]
  matched = matched_dense_mlp_dim(model) if model.moe_layers else None
  if matched is not None:
    lines.append(f"  FLOP-matched dense baseline: mlp_dim={matched} "
                 f"(moe_every=0)")
  return "\n".join(lines)
