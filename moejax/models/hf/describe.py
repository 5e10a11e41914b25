"""A one-screen description of a pretrained model: parameters total and
active per token, experts, routing rule, attention form. Reads shapes and
attributes only (works on an abstract model too)."""

import math

from flax import nnx
import jax

from moejax.layers import build as build_lib
from moejax.layers import params as params_lib


def _params(module):
  return sum(int(math.prod(x.shape))
             for x in jax.tree.leaves(nnx.state(module, params_lib.WEIGHTS)))


def _routing_rule(router):
  name = type(router).__name__
  opts = [f"k={router.k}", f"gating={router.gating}"]
  if getattr(router, "renormalize", False):
    opts.append("renormalized")
  groups = getattr(router, "num_expert_groups", 1)
  if groups > 1:
    opts.append(f"groups {router.topk_groups}/{groups} by "
                f"{router.group_score}")
  scale = getattr(router, "routed_scaling_factor", 1.0)
  if scale != 1.0:
    opts.append(f"scaled x{scale:g}")
  if getattr(router, "b_router_E", None) is not None:
    opts.append("logit bias")
  if getattr(router, "bias_E", None) is not None:
    opts.append("selection bias")
  return f"{name}({', '.join(opts)})"


def _attention_form(spec):
  a = spec.attention
  if a.form == "mla":
    q = ("q direct" if a.q_lora_rank is None
         else f"q latent {a.q_lora_rank}")
    form = (f"MLA {a.num_heads} heads, {q}, kv latent {a.kv_lora_rank}, "
            f"qk {a.qk_nope_head_dim}+{a.qk_rope_head_dim} rope, v "
            f"{a.v_head_dim}")
  elif a.form == "moa":
    form = (f"MoA {a.moa_experts} experts top-{a.moa_k}, {a.num_kv_heads} "
            f"shared kv heads x {a.head_dim}, o bias")
  else:
    form = f"GQA {a.num_heads}q/{a.num_kv_heads}kv x {a.head_dim}"
    extras = [n for n, on in (("qkv bias", a.qkv_bias), ("o bias", a.o_bias),
                              (f"qk-norm {a.qk_norm}", a.qk_norm),
                              ("sinks", a.sinks)) if on]
    form += (", " + ", ".join(extras)) if extras else ""
  windows = sorted({w for w in spec.windows if w is not None})
  if windows:
    n = sum(w is not None for w in spec.windows)
    form += f"; sliding window {windows} on {n}/{spec.num_layers} layers"
  rope = spec.rope
  form += f"; rope {rope.kind} theta={rope.theta:g}"
  if rope.kind != "default":
    form += f" x{rope.factor:g}"
  return form


def _trainable_line(model, total):
  """'  trainable: ...' when some weights are frozen (LoRA experts,
  config.trainable), else None."""
  trainable = sum(int(math.prod(x.shape))
                  for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  if trainable == total:
    return None
  wrapped = {}
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and getattr(node, "wraps", None):
      name = type(node).__name__
      wrapped[name] = wrapped.get(name, 0) + 1
  return (f"  trainable: {trainable:,} of {total:,} ({trainable / total:.2%})"
          + "".join(f"; {n} x{c}" for n, c in wrapped.items()))


def describe(model):
  """A few lines describing an HFDecoder (str)."""
  spec = model.spec
  total = _params(model)
  inactive = 0
  moe_blocks = [b for b in model.blocks if b.is_moe]
  for blk in model.blocks:  # attention experts (JetMoE): k of E per token
    moa = getattr(blk.attention, "moa", None)
    if moa is not None:
      per_expert = (math.prod(moa.w_q_EMKD.shape)
                    + math.prod(moa.w_o_EKDM.shape)) // moa.num_experts
      inactive += (moa.num_experts - moa.k) * per_expert
  for blk in moe_blocks:
    layer = build_lib.wrapped_base(blk.ffn)
    experts = layer.experts
    per_expert = _params(experts) // experts.num_experts
    inactive += (experts.num_experts - layer.router.k) * per_expert
  lines = [f"{spec.model_type}: V={spec.vocab_size} M={spec.model_dim} "
           f"layers={spec.num_layers} ({len(moe_blocks)} MoE, "
           f"{spec.num_layers - len(moe_blocks)} dense) tied="
           f"{spec.tie_embeddings}",
           f"  params: total {total:,} | active per token "
           f"{total - inactive:,} ({(total - inactive) / max(total, 1):.1%})",
           f"  attention: {_attention_form(spec)}"]
  if moe_blocks:
    layer = build_lib.wrapped_base(moe_blocks[0].ffn)
    ex = layer.experts
    shared = "" if layer.shared is None else (
        f", shared {type(layer.shared).__name__}")
    lines += [f"  experts: {ex.num_experts} x (M={ex.model_dim}, "
              f"H={ex.hidden_dim}, {ex.activation}"
              f"{', biases' if getattr(ex, 'use_bias', False) else ''})"
              f"{shared}",
              f"  routing: {_routing_rule(layer.router)}, engine "
              f"{type(layer.engine).__name__}"]
  trainable = _trainable_line(model, total)
  if trainable:
    lines.append(trainable)
  return "\n".join(lines)
