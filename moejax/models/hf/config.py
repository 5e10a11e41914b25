"""Hugging Face config.json -> ModelSpec, a typed description of the decoder.

One parser per model_type (FAMILIES). Each reads the fields it honours
through `Fields`, which refuses a value the model cannot honour by name, and
at the end refuses every field it did not read that is not known to be inert
for a forward pass (INERT): no field is silently ignored.
"""

import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple

from moejax.routing.validation import OptionError

# Fields that do not change what a forward pass computes (training, tokenizer,
# generation or bookkeeping metadata).
INERT = frozenset({
    "architectures", "model_type", "transformers_version", "dtype",
    "torch_dtype", "_name_or_path", "initializer_range", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "output_router_logits",
    "router_aux_loss_coef", "aux_loss_alpha", "seq_aux", "attention_dropout",
    "router_jitter_noise", "max_position_embeddings", "num_mtp_layers",
    "num_nextn_predict_layers", "ep_size", "output_hidden_states",
    "output_attentions", "return_dict", "id2label", "label2id",
    "tokenizer_class", "chunk_size_feed_forward", "is_encoder_decoder",
    "problem_type", "task_specific_params", "max_window_layers",
    # trust_remote_code bookkeeping; GPT-OSS's pre-YaRN context (its
    # rope_scaling carries original_max_position_embeddings itself).
    "auto_map", "initial_context_length",
})


class UnsupportedConfig(OptionError):
  """A config.json field whose value moejax cannot honour."""


@dataclasses.dataclass(frozen=True)
class RopeSpec:
  """Rotary embedding: kind 'default' | 'linear' | 'yarn' (see rope.py)."""
  dim: int
  theta: float
  kind: str = "default"
  factor: float = 1.0
  original_max_position: Optional[int] = None
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: Optional[float] = None
  mscale_all_dim: Optional[float] = None
  attention_factor: Optional[float] = None
  truncate: bool = True
  interleaved: bool = False   # rotate pairs (2i, 2i+1) (DeepSeek), not halves


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """Attention form: 'gqa' (grouped-query), 'mla' (DeepSeek latent) or
  'moa' (JetMoE's attention experts: num_heads = moa_k * num_kv_heads
  active heads)."""
  form: str
  num_heads: int
  num_kv_heads: int = 0
  head_dim: int = 0
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: Optional[str] = None       # None, 'head' (Qwen3) or 'full' (OLMoE)
  clip_qkv: Optional[float] = None    # OLMoE
  sinks: bool = False                 # GPT-OSS
  q_lora_rank: Optional[int] = None   # MLA (None: V2-Lite's direct q_proj)
  kv_lora_rank: int = 0
  qk_nope_head_dim: int = 0
  qk_rope_head_dim: int = 0
  v_head_dim: int = 0
  scale: Optional[float] = None       # None: qk head width ** -0.5
  moa_experts: int = 0                # 'moa' (JetMoE): attention experts E
  moa_k: int = 0                      # 'moa': experts per token


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything the decoder needs, parsed from config.json.

  moe: the moejax.layers.build_moe config of the sparse layers;
  ffn_kinds: 'moe' or 'dense' per layer; windows: sliding window per layer
  (None: full attention); hf: the config dict as read (save_pretrained
  writes it back).
  """
  model_type: str
  vocab_size: int
  model_dim: int
  num_layers: int
  norm_eps: float
  tie_embeddings: bool
  attention: AttentionSpec
  rope: RopeSpec
  dense_hidden_dim: int
  moe: Mapping[str, Any]
  ffn_kinds: Tuple[str, ...]
  windows: Tuple[Optional[int], ...]
  hf: Mapping[str, Any]
  embed_scale: float = 1.0      # Granite: embeddings x embedding_multiplier
  residual_scale: float = 1.0   # Granite: x += branch * residual_multiplier
  logits_scale: float = 1.0     # Granite: logits / logits_scaling

  @property
  def num_experts(self):
    return self.moe["experts"]["num_experts"]


class Fields:
  """Reads a config dict, remembering which fields were read."""

  def __init__(self, config):
    self.config = dict(config)
    self.model_type = self.config.get("model_type")
    self.used = set()

  def __contains__(self, name):
    return name in self.config

  def get(self, name, default=None):
    self.used.add(name)
    value = self.config.get(name, default)
    return default if value is None and default is not None else value

  def need(self, name):
    self.used.add(name)
    if name not in self.config:
      raise UnsupportedConfig(name, None, f"{self.model_type} config.json "
                              f"has no {name!r}, which it needs")
    return self.config[name]

  def first(self, *names):
    """The value of the first of `names` present (aliases such as
    num_experts / num_local_experts); every alias counts as read."""
    for name in names:
      self.used.add(name)
    for name in names:
      if self.config.get(name) is not None:
        return self.config[name]
    raise UnsupportedConfig(names[0], None, f"{self.model_type} config.json "
                            f"has none of {list(names)}, which it needs")

  def only(self, name, allowed, default=None):
    """The value, which must be one of `allowed` (else refused by name)."""
    value = self.get(name, default)
    if value not in allowed:
      raise UnsupportedConfig(name, value, f"config field {name}={value!r} "
                              f"is not supported for {self.model_type}; "
                              f"supported: {list(allowed)}")
    return value

  def check_all_read(self):
    left = sorted(set(self.config) - self.used - INERT)
    if left:
      raise UnsupportedConfig(left[0], self.config[left[0]], (
          f"config field(s) {left} of {self.model_type} are not supported "
          f"by moejax (not honoured, so refused rather than ignored)"))


def _rope(f, dim, *, interleaved=False):
  """RopeSpec from `rope_parameters` (transformers 5) or `rope_theta` +
  `rope_scaling` (transformers 4 configs on the Hub)."""
  params = dict(f.get("rope_parameters") or {})
  scaling = f.get("rope_scaling")
  if scaling:
    params.update(scaling)
  theta = params.pop("rope_theta", None) or f.get("rope_theta", 10000.0)
  kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
  if kind not in ("default", "linear", "yarn"):
    raise UnsupportedConfig("rope_type", kind, f"rope_type={kind!r} is not "
                            f"supported; supported: default, linear, yarn")
  # Partial rotary (GLM-4-MoE): only the first dim * factor features of
  # each head rotate.
  partial = (params.pop("partial_rotary_factor", None)
             or f.get("partial_rotary_factor") or 1.0)
  if not 0 < partial <= 1 or int(dim * partial) % 2:
    raise UnsupportedConfig("partial_rotary_factor", partial, (
        f"partial_rotary_factor must be in (0, 1] and leave an even rotary "
        f"width of the head's {dim}, got {partial}"))
  dim = int(dim * partial)
  allowed = {"default": set(), "linear": {"factor"},
             "yarn": {"factor", "original_max_position_embeddings",
                      "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                      "attention_factor", "truncate"}}[kind]
  unknown = sorted(set(params) - allowed)
  if unknown:
    raise UnsupportedConfig(f"rope_parameters.{unknown[0]}",
                            params[unknown[0]],
                            f"rope_parameters {unknown} not supported for "
                            f"rope type {kind!r}")
  orig = params.get("original_max_position_embeddings")
  if kind == "yarn" and orig is None:
    orig = f.get("max_position_embeddings")
  return RopeSpec(
      dim=dim, theta=float(theta), kind=kind,
      factor=float(params.get("factor", 1.0) or 1.0),
      original_max_position=orig,
      beta_fast=float(params.get("beta_fast") or 32.0),
      beta_slow=float(params.get("beta_slow") or 1.0),
      mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
      attention_factor=params.get("attention_factor"),
      truncate=bool(params.get("truncate", True)), interleaved=interleaved)


def _common(f):
  f.only("hidden_act", ("silu",), "silu")
  f.only("pretraining_tp", (1,), 1)
  return dict(vocab_size=f.need("vocab_size"), model_dim=f.need("hidden_size"),
              num_layers=f.need("num_hidden_layers"),
              norm_eps=float(f.get("rms_norm_eps", 1e-6)),
              tie_embeddings=bool(f.get("tie_word_embeddings", False)))


def _full_attention_only(f):
  """Qwen-style sliding-window fields: only full attention is supported."""
  f.only("use_sliding_window", (False,), False)
  f.get("sliding_window")  # read only with use_sliding_window
  types = f.get("layer_types")
  if types is not None and set(types) != {"full_attention"}:
    raise UnsupportedConfig("layer_types", types, "only full_attention "
                            "layers are supported for this family")


def _gqa(f, *, qkv_bias=False, o_bias=False, qk_norm=None, sinks=False):
  n = f.need("num_attention_heads")
  m = f.need("hidden_size")
  return AttentionSpec(form="gqa", num_heads=n,
                       num_kv_heads=f.get("num_key_value_heads", n),
                       head_dim=f.get("head_dim") or m // n,
                       qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=qk_norm,
                       sinks=sinks)


def _k(f):
  """Experts per token (GPT-OSS checkpoints also carry experts_per_token;
  both present must agree)."""
  k = f.first("num_experts_per_tok", "experts_per_token")
  other = f.get("experts_per_token")
  if other is not None and other != k:
    raise UnsupportedConfig("experts_per_token", other, (
        f"experts_per_token={other} disagrees with num_experts_per_tok={k}"))
  return k


def _moe(num_experts, k, hidden, router, *, shared=None, activation="swiglu",
         use_bias=False, **experts_extra):
  experts = dict(num_experts=num_experts, hidden_dim=hidden,
                 activation=activation, **experts_extra)
  if use_bias:
    experts["use_bias"] = True
  cfg = {"router": dict(router, k=k), "engine": {"name": "dropless"},
         "experts": experts}
  if shared:
    cfg["shared"] = shared
  return cfg


def _sparse_layers(f, num_layers):
  """Qwen's decoder_sparse_step / mlp_only_layers -> per-layer kinds."""
  step = f.get("decoder_sparse_step", 1)
  dense = set(f.get("mlp_only_layers") or [])
  bad = sorted(i for i in dense if not 0 <= i < num_layers)
  if bad:
    raise UnsupportedConfig("mlp_only_layers", sorted(dense),
                            f"mlp_only_layers names layers {bad} outside "
                            f"0..{num_layers - 1}")
  return tuple("moe" if i not in dense and step > 0 and (i + 1) % step == 0
               else "dense" for i in range(num_layers))


def parse_mixtral(f):
  c = _common(f)
  att = _gqa(f)
  window = f.get("sliding_window")
  e = f.first("num_local_experts", "num_experts")
  moe = _moe(e, _k(f), f.need("intermediate_size"),
             {"name": "token_choice", "gating": "topk_softmax"})
  return dict(c, attention=att, rope=_rope(f, att.head_dim),
              dense_hidden_dim=0, moe=moe,
              ffn_kinds=("moe",) * c["num_layers"],
              windows=(window,) * c["num_layers"])


def parse_olmoe(f):
  c = _common(f)
  bias = bool(f.get("attention_bias", False))
  att = dataclasses.replace(_gqa(f, qkv_bias=bias, o_bias=bias,
                                 qk_norm="full"), clip_qkv=f.get("clip_qkv"))
  moe = _moe(f.first("num_experts", "num_local_experts"),
             _k(f),
             f.need("intermediate_size"),
             {"name": "token_choice", "gating": "softmax",
              "renormalize": bool(f.get("norm_topk_prob", False))})
  return dict(c, attention=att, rope=_rope(f, att.head_dim),
              dense_hidden_dim=0, moe=moe,
              ffn_kinds=("moe",) * c["num_layers"],
              windows=(None,) * c["num_layers"])


def parse_qwen2_moe(f):
  c = _common(f)
  _full_attention_only(f)
  att = _gqa(f, qkv_bias=bool(f.get("qkv_bias", True)))
  shared_h = f.get("shared_expert_intermediate_size", 0)
  shared = ({"num_experts": 1, "hidden_dim": shared_h, "gated": True}
            if shared_h else None)
  moe = _moe(f.first("num_experts", "num_local_experts"),
             _k(f),
             f.need("moe_intermediate_size"),
             {"name": "token_choice", "gating": "softmax",
              "renormalize": bool(f.get("norm_topk_prob", False))},
             shared=shared)
  return dict(c, attention=att, rope=_rope(f, att.head_dim),
              dense_hidden_dim=f.need("intermediate_size"), moe=moe,
              ffn_kinds=_sparse_layers(f, c["num_layers"]),
              windows=(None,) * c["num_layers"])


def parse_qwen3_moe(f):
  c = _common(f)
  _full_attention_only(f)
  bias = bool(f.get("attention_bias", False))
  att = _gqa(f, qkv_bias=bias, o_bias=bias, qk_norm="head")
  moe = _moe(f.first("num_experts", "num_local_experts"),
             _k(f),
             f.need("moe_intermediate_size"),
             {"name": "token_choice", "gating": "softmax",
              "renormalize": bool(f.get("norm_topk_prob", False))})
  return dict(c, attention=att, rope=_rope(f, att.head_dim),
              dense_hidden_dim=f.need("intermediate_size"), moe=moe,
              ffn_kinds=_sparse_layers(f, c["num_layers"]),
              windows=(None,) * c["num_layers"])


def _mla(f, c, *, v3):
  n = f.need("num_attention_heads")
  kv = f.get("num_key_value_heads", n)
  if kv != n:
    raise UnsupportedConfig("num_key_value_heads", kv, f"MLA expands the "
                            f"latent to every head: num_key_value_heads must "
                            f"equal num_attention_heads ({n})")
  f.get("head_dim")  # transformers sets it to qk_rope_head_dim
  bias = bool(f.get("attention_bias", False))
  nope, rope_d = f.need("qk_nope_head_dim"), f.need("qk_rope_head_dim")
  f.only("qk_head_dim", (None, nope + rope_d))  # derived by transformers
  interleave = bool(f.get("rope_interleave", True)) if v3 else True
  rope = _rope(f, rope_d, interleaved=interleave)
  if rope.dim != rope_d:
    raise UnsupportedConfig("partial_rotary_factor", rope.dim / rope_d,
                            "MLA rotates all qk_rope_head_dim features; "
                            "partial_rotary_factor must be 1")
  scale = (nope + rope_d) ** -0.5
  if rope.kind != "default" and rope.mscale_all_dim:
    m = 1.0 if rope.factor <= 1 else 0.1 * rope.mscale_all_dim * math.log(
        rope.factor) + 1.0
    scale = scale * m * m
  att = AttentionSpec(form="mla", num_heads=n, qkv_bias=bias, o_bias=bias,
                      q_lora_rank=f.get("q_lora_rank"),
                      kv_lora_rank=f.need("kv_lora_rank"),
                      qk_nope_head_dim=nope, qk_rope_head_dim=rope_d,
                      v_head_dim=f.need("v_head_dim"), scale=scale)
  first_dense = f.get("first_k_dense_replace", 0) or 0
  f.only("moe_layer_freq", (1,), 1)
  kinds = tuple("dense" if i < first_dense else "moe"
                for i in range(c["num_layers"]))
  return att, rope, kinds


def parse_deepseek_v3(f):
  c = _common(f)
  att, rope, kinds = _mla(f, c, v3=True)
  f.only("topk_method", ("noaux_tc",), "noaux_tc")
  f.only("scoring_func", ("sigmoid",), "sigmoid")
  e = f.first("n_routed_experts", "num_local_experts")
  h = f.need("moe_intermediate_size")
  n_shared = f.get("n_shared_experts", 0) or 0
  moe = _moe(e, _k(f), h,
             {"name": "deepseek", "gating": "sigmoid",
              "renormalize": bool(f.get("norm_topk_prob", True)),
              "num_expert_groups": f.get("n_group", 1) or 1,
              "topk_groups": f.get("topk_group", 1) or 1,
              "group_score": "top2_sum",
              "routed_scaling_factor": float(
                  f.get("routed_scaling_factor", 1.0))},
             shared={"num_experts": n_shared, "hidden_dim": h}
             if n_shared else None)
  return dict(c, attention=att, rope=rope,
              dense_hidden_dim=f.need("intermediate_size"), moe=moe,
              ffn_kinds=kinds, windows=(None,) * c["num_layers"])


def parse_deepseek_v2(f):
  c = _common(f)
  att, rope, kinds = _mla(f, c, v3=False)
  f.only("mlp_bias", (False,), False)
  f.only("scoring_func", ("softmax",), "softmax")
  method = f.only("topk_method", ("greedy", "group_limited_greedy"),
                  "greedy")
  groups = f.get("n_group") or 1
  topk_groups = f.get("topk_group") or 1
  if method == "greedy":
    groups = topk_groups = 1
  e = f.first("n_routed_experts", "num_local_experts")
  h = f.need("moe_intermediate_size")
  n_shared = f.get("n_shared_experts", 0) or 0
  moe = _moe(e, _k(f), h,
             {"name": "deepseek", "gating": "softmax",
              "renormalize": bool(f.get("norm_topk_prob", False)),
              "num_expert_groups": groups, "topk_groups": topk_groups,
              "group_score": "max",
              "routed_scaling_factor": float(
                  f.get("routed_scaling_factor", 1.0))},
             shared={"num_experts": n_shared, "hidden_dim": h}
             if n_shared else None)
  return dict(c, attention=att, rope=rope,
              dense_hidden_dim=f.need("intermediate_size"), moe=moe,
              ffn_kinds=kinds, windows=(None,) * c["num_layers"])


def parse_gpt_oss(f):
  c = _common(f)
  bias = bool(f.get("attention_bias", True))
  att = _gqa(f, qkv_bias=bias, o_bias=bias, sinks=True)
  n = c["num_layers"]
  types = f.get("layer_types") or [
      "sliding_attention" if i % 2 == 0 else "full_attention"
      for i in range(n)]
  bad = sorted(set(types) - {"sliding_attention", "full_attention"})
  if bad or len(types) != n:
    raise UnsupportedConfig("layer_types", types, f"layer_types must list "
                            f"{n} of sliding_attention / full_attention")
  window = f.need("sliding_window")
  windows = tuple(window if t == "sliding_attention" else None for t in types)
  moe = _moe(f.first("num_local_experts", "num_experts"),
             _k(f), f.need("intermediate_size"),
             {"name": "token_choice", "gating": "topk_softmax",
              "use_bias": True},
             activation="clamped_swiglu", use_bias=True,
             swiglu_alpha=float(f.get("swiglu_alpha", 1.702)),
             swiglu_limit=float(f.get("swiglu_limit", 7.0)))
  return dict(c, attention=att, rope=_rope(f, att.head_dim),
              dense_hidden_dim=0, moe=moe, ffn_kinds=("moe",) * n,
              windows=windows)


def parse_granitemoe(f):
  c = _common(f)
  bias = bool(f.get("attention_bias", False))
  att = dataclasses.replace(_gqa(f, qkv_bias=bias, o_bias=bias),
                            scale=float(f.get("attention_multiplier", 1.0)))
  moe = _moe(f.first("num_local_experts", "num_experts"), _k(f),
             f.need("intermediate_size"),
             {"name": "token_choice", "gating": "topk_softmax"})
  return dict(c, attention=att, rope=_rope(f, att.head_dim),
              dense_hidden_dim=0, moe=moe,
              ffn_kinds=("moe",) * c["num_layers"],
              windows=(None,) * c["num_layers"],
              embed_scale=float(f.get("embedding_multiplier", 1.0)),
              residual_scale=float(f.get("residual_multiplier", 1.0)),
              logits_scale=float(f.get("logits_scaling", 1.0)))


def parse_glm4_moe(f):
  c = _common(f)
  qk_norm = "head" if f.get("use_qk_norm", False) else None
  att = _gqa(f, qkv_bias=bool(f.get("attention_bias", False)),
             qk_norm=qk_norm)
  first_dense = f.get("first_k_dense_replace", 0) or 0
  kinds = tuple("dense" if i < first_dense else "moe"
                for i in range(c["num_layers"]))
  h = f.need("moe_intermediate_size")
  n_shared = f.get("n_shared_experts", 0) or 0
  moe = _moe(f.first("n_routed_experts", "num_local_experts"), _k(f), h,
             {"name": "deepseek", "gating": "sigmoid",
              "renormalize": bool(f.get("norm_topk_prob", True)),
              "num_expert_groups": f.get("n_group", 1) or 1,
              "topk_groups": f.get("topk_group", 1) or 1,
              "group_score": "top2_sum",
              "routed_scaling_factor": float(
                  f.get("routed_scaling_factor", 1.0))},
             shared={"num_experts": n_shared, "hidden_dim": h}
             if n_shared else None)
  return dict(c, attention=att, rope=_rope(f, att.head_dim),
              dense_hidden_dim=f.need("intermediate_size"), moe=moe,
              ffn_kinds=kinds, windows=(None,) * c["num_layers"])


def jetmoe_attention(f):
  """(AttentionSpec, RopeSpec) of JetMoE's MoA attention: top-k of E
  experts' query/output projections over K shared key/value heads, an
  output bias, the default full-width RoPE (anything else is refused)."""
  e, k = f.need("num_local_experts"), _k(f)
  kv, d = f.need("num_key_value_heads"), f.need("kv_channels")
  n = f.get("num_attention_heads", kv * k)
  if n != kv * k:
    raise UnsupportedConfig("num_attention_heads", n, (
        f"num_attention_heads={n} must be num_key_value_heads x "
        f"num_experts_per_tok = {kv * k} for jetmoe"))
  att = AttentionSpec(form="moa", num_heads=n, num_kv_heads=kv, head_dim=d,
                      o_bias=True, moa_experts=e, moa_k=k)
  rope = _rope(f, d)
  if rope.kind != "default" or rope.dim != d:
    raise UnsupportedConfig("rope_type", rope.kind, (
        f"jetmoe attention supports only the default full-width RoPE, got "
        f"{rope.kind!r} over {rope.dim} of {d} features"))
  return att, rope


def parse_jetmoe(f):
  """JetMoE: MoA attention (jetmoe_attention) and a MoE FFN with fused
  gate/up experts and an output bias."""
  f.only("activation_function", ("silu",), "silu")
  c = _common(f)
  f.get("aux_loss_coef")  # training only
  att, rope = jetmoe_attention(f)
  moe = dict(_moe(att.moa_experts, att.moa_k, f.need("intermediate_size"),
                  {"name": "token_choice", "gating": "topk_softmax"}),
             output_bias=True)
  n_layers = c["num_layers"]
  return dict(c, attention=att, rope=rope, dense_hidden_dim=0, moe=moe,
              ffn_kinds=("moe",) * n_layers, windows=(None,) * n_layers)


def _dense_only(c, att, f, rope):
  n = c["num_layers"]
  return dict(c, attention=att, rope=rope,
              dense_hidden_dim=f.need("intermediate_size"), moe={},
              ffn_kinds=("dense",) * n, windows=(None,) * n)


def parse_qwen3(f):
  """Dense Qwen3 (an upcycling source): Qwen3-MoE's attention, SwiGLU FFNs."""
  c = _common(f)
  _full_attention_only(f)
  f.get("max_window_layers")  # only with use_sliding_window
  bias = bool(f.get("attention_bias", False))
  att = _gqa(f, qkv_bias=bias, o_bias=bias, qk_norm="head")
  return _dense_only(c, att, f, _rope(f, att.head_dim))


def parse_llama(f):
  """Dense Llama (an upcycling source): GQA, SwiGLU FFNs without biases."""
  c = _common(f)
  f.only("mlp_bias", (False,), False)
  bias = bool(f.get("attention_bias", False))
  att = _gqa(f, qkv_bias=bias, o_bias=bias)
  return _dense_only(c, att, f, _rope(f, att.head_dim))


FAMILIES = {
    "qwen3": parse_qwen3,
    "llama": parse_llama,
    "mixtral": parse_mixtral,
    "olmoe": parse_olmoe,
    "qwen2_moe": parse_qwen2_moe,
    "qwen3_moe": parse_qwen3_moe,
    "deepseek_v3": parse_deepseek_v3,
    "deepseek_v2": parse_deepseek_v2,
    "gpt_oss": parse_gpt_oss,
    "granitemoe": parse_granitemoe,
    "glm4_moe": parse_glm4_moe,
    "jetmoe": parse_jetmoe,
}


def parse_config(config):
  """A config.json dict -> ModelSpec.

  Raises UnsupportedConfig (an OptionError) naming the field for an unknown
  model_type, a missing field, or a value moejax cannot honour.
  """
  model_type = config.get("model_type")
  if model_type not in FAMILIES:
    raise UnsupportedConfig("model_type", model_type, (
        f"unknown model_type {model_type!r}; supported: {sorted(FAMILIES)}"))
  f = Fields(config)
  fields = FAMILIES[model_type](f)
  f.check_all_read()
  return ModelSpec(model_type=model_type, hf=dict(config), **fields)
