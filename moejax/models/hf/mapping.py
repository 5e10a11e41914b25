"""Checkpoint tensor names and layouts <-> moejax parameters, per family.

`tensor_map(spec)` lists Entry objects: which HF tensors make which moejax
variables (by dotted path in HFDecoder), and the two pure layout functions
between them (transposes, head reshapes, per-expert stacking, GPT-OSS's
interleaved gate/up). Every function is an exact permutation of elements,
so a load -> save -> load round trip is bitwise.
"""

import dataclasses
from typing import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Entry:
  """hf_names (HF tensors) <-> paths (moejax variables).

  to_jax: sequence of HF arrays -> list of arrays, one per path (the
    sequence may read each array only when indexed: see load.py).
  to_hf: list of moejax arrays -> list of HF arrays, one per hf name.
  """
  paths: Sequence[str]
  hf_names: Sequence[str]
  to_jax: Callable
  to_hf: Callable


def _same(path, name):
  return Entry([path], [name], lambda a: [a[0]], lambda a: [a[0]])


def _linear(path, name, out_shape):
  """HF Linear weight [out, in] <-> moejax [in, *out_shape]."""
  return Entry([path], [name],
               lambda a: [a[0].T.reshape((a[0].shape[1],) + out_shape)],
               lambda a: [a[0].reshape(a[0].shape[0], -1).T])


def _linear_out(path, name, in_shape):
  """HF Linear weight [M, prod(in_shape)] <-> moejax [*in_shape, M]."""
  return Entry([path], [name],
               lambda a: [a[0].T.reshape(in_shape + (a[0].shape[0],))],
               lambda a: [a[0].reshape(-1, a[0].shape[-1]).T])


def _vector(path, name, shape):
  return Entry([path], [name], lambda a: [a[0].reshape(shape)],
               lambda a: [a[0].reshape(-1)])


def _stack_transposed(a):
  """[E, in, out] from E arrays [out, in], reading a[i] one at a time (a may
  be a lazy sequence: only one expert's tensor is held beside the stack)."""
  out = None
  for i in range(len(a)):
    w = a[i]
    if out is None:
      out = np.empty((len(a),) + w.T.shape, w.dtype)
    out[i] = w.T
  return out


def _stacked(path, names):
  """E per-expert HF Linear weights [out, in] <-> moejax [E, in, out]."""
  return Entry([path], names,
               lambda a: [_stack_transposed(a)],
               lambda a: [np.ascontiguousarray(w.T) for w in a[0]])


def _gqa(p, hf, att):
  n, k, d = att.num_heads, att.num_kv_heads, att.head_dim
  out = [_linear(f"{p}.w_q_MND", f"{hf}.q_proj.weight", (n, d)),
         _linear(f"{p}.w_k_MKD", f"{hf}.k_proj.weight", (k, d)),
         _linear(f"{p}.w_v_MKD", f"{hf}.v_proj.weight", (k, d)),
         _linear_out(f"{p}.w_o_NDM", f"{hf}.o_proj.weight", (n, d))]
  if att.qkv_bias:
    out += [_vector(f"{p}.b_q_ND", f"{hf}.q_proj.bias", (n, d)),
            _vector(f"{p}.b_k_KD", f"{hf}.k_proj.bias", (k, d)),
            _vector(f"{p}.b_v_KD", f"{hf}.v_proj.bias", (k, d))]
  if att.o_bias:
    out.append(_same(f"{p}.b_o_M", f"{hf}.o_proj.bias"))
  if att.qk_norm:
    out += [_same(f"{p}.q_norm.scale_M", f"{hf}.q_norm.weight"),
            _same(f"{p}.k_norm.scale_M", f"{hf}.k_norm.weight")]
  if att.sinks:
    out.append(_same(f"{p}.sinks_N", f"{hf}.sinks"))
  return out


def _mla(p, hf, att):
  n = att.num_heads
  e = att.qk_nope_head_dim + att.qk_rope_head_dim
  f = att.qk_nope_head_dim + att.v_head_dim
  out = []
  if att.q_lora_rank is None:
    out.append(_linear(f"{p}.w_q_MNE", f"{hf}.q_proj.weight", (n, e)))
  else:
    out += [_linear(f"{p}.w_q_a_MR", f"{hf}.q_a_proj.weight",
                    (att.q_lora_rank,)),
            _same(f"{p}.q_a_norm.scale_M", f"{hf}.q_a_layernorm.weight"),
            _linear(f"{p}.w_q_b_RNE", f"{hf}.q_b_proj.weight", (n, e))]
    if att.qkv_bias:
      out.append(_same(f"{p}.b_q_a_R", f"{hf}.q_a_proj.bias"))
  out += [_linear(f"{p}.w_kv_a_MA", f"{hf}.kv_a_proj_with_mqa.weight",
                  (att.kv_lora_rank + att.qk_rope_head_dim,)),
          _same(f"{p}.kv_a_norm.scale_M", f"{hf}.kv_a_layernorm.weight"),
          _linear(f"{p}.w_kv_b_CNF", f"{hf}.kv_b_proj.weight", (n, f)),
          _linear_out(f"{p}.w_o_NVM", f"{hf}.o_proj.weight",
                      (n, att.v_head_dim))]
  if att.qkv_bias:
    out.append(_same(f"{p}.b_kv_a_A", f"{hf}.kv_a_proj_with_mqa.bias"))
  if att.o_bias:
    out.append(_same(f"{p}.b_o_M", f"{hf}.o_proj.bias"))
  return out


def _dense(p, hf, gate="gate_proj", up="up_proj", down="down_proj"):
  """A SwiGLU DenseFFN: w_gate_MH = gate, w_in_MH = up, w_out_HM = down."""
  return [_linear(f"{p}.w_gate_MH", f"{hf}.{gate}.weight", (-1,)),
          _linear(f"{p}.w_in_MH", f"{hf}.{up}.weight", (-1,)),
          _linear(f"{p}.w_out_HM", f"{hf}.{down}.weight", (-1,))]


def _experts(p, hf, e, gate, up, down):
  names = lambda w: [f"{hf}.{i}.{w}.weight" for i in range(e)]
  return [_stacked(f"{p}.w_gate_EMH", names(gate)),
          _stacked(f"{p}.w_in_EMH", names(up)),
          _stacked(f"{p}.w_out_EHM", names(down))]


def _router(p, hf):
  return Entry([p], [hf], lambda a: [a[0].T], lambda a: [
      np.ascontiguousarray(a[0].T)])


def _gpt_oss_experts(p, hf):
  """Fused, interleaved gate/up ([E, M, 2H]: gate at even, up at odd
  columns), in x @ W layout, with biases."""
  def split(a):
    gu, gub, down, db = a
    return [np.ascontiguousarray(gu[..., ::2]),
            np.ascontiguousarray(gu[..., 1::2]),
            np.ascontiguousarray(gub[..., ::2]),
            np.ascontiguousarray(gub[..., 1::2]), down, db]

  def fuse(a):
    wg, wi, bg, bi, down, db = a
    gu = np.stack([wg, wi], axis=-1).reshape(wg.shape[:-1] + (-1,))
    gub = np.stack([bg, bi], axis=-1).reshape(bg.shape[:-1] + (-1,))
    return [gu, gub, down, db]

  return Entry([f"{p}.w_gate_EMH", f"{p}.w_in_EMH", f"{p}.b_gate_EH",
                f"{p}.b_in_EH", f"{p}.w_out_EHM", f"{p}.b_out_EM"],
               [f"{hf}.gate_up_proj", f"{hf}.gate_up_proj_bias",
                f"{hf}.down_proj", f"{hf}.down_proj_bias"], split, fuse)


def _fused_halves(p, hf):
  """Granite's input_linear [E, 2H, M] (gate rows first, then up) and
  output_linear [E, M, H], in HF Linear layout."""
  def split(a):
    w, down = a
    h = w.shape[1] // 2
    return [np.ascontiguousarray(np.swapaxes(w[:, :h], 1, 2)),
            np.ascontiguousarray(np.swapaxes(w[:, h:], 1, 2)),
            np.ascontiguousarray(np.swapaxes(down, 1, 2))]

  def fuse(a):
    wg, wi, wo = a
    return [np.concatenate([np.swapaxes(wg, 1, 2), np.swapaxes(wi, 1, 2)],
                           axis=1), np.swapaxes(wo, 1, 2)]

  return Entry([f"{p}.w_gate_EMH", f"{p}.w_in_EMH", f"{p}.w_out_EHM"],
               [f"{hf}.input_linear.weight", f"{hf}.output_linear.weight"],
               split, fuse)


def jetmoe_attention(p, hf, num_kv_heads, head_dim):
  """Entries of transformers' JetMoeAttention (prefix hf) <-> MoAAttention
  (path p, num_kv_heads=K, output_bias=True); an empty prefix or path means
  the block itself.

  experts.input_linear [E, K*D, M] -> w_q_EMKD [E, M, K, D];
  experts.output_linear [E, M, K*D] -> w_o_EKDM [E, K, D, M];
  kv_proj [2*K*D, M] (key rows, then value rows) -> w_k_MKD, w_v_MKD
  [M, K, D]; experts.router.layer [E, M] -> w_gate_ME; experts.bias ->
  b_out_M. Within K*D the key/value head is the slower axis.
  """
  k, d = num_kv_heads, head_dim
  at = lambda prefix, name: f"{prefix}.{name}" if prefix else name

  def q_to_jax(a):
    e, _, m = a[0].shape
    return [np.ascontiguousarray(np.swapaxes(a[0], 1, 2)).reshape(e, m, k, d)]

  def o_to_jax(a):
    e, m, _ = a[0].shape
    return [np.ascontiguousarray(np.swapaxes(a[0], 1, 2)).reshape(e, k, d, m)]

  def kv_to_jax(a):
    m = a[0].shape[1]
    w_MF = a[0].T
    return [np.ascontiguousarray(w_MF[:, :k * d]).reshape(m, k, d),
            np.ascontiguousarray(w_MF[:, k * d:]).reshape(m, k, d)]

  def kv_to_hf(a):
    m = a[0].shape[0]
    return [np.ascontiguousarray(np.concatenate(
        [a[0].reshape(m, -1), a[1].reshape(m, -1)], axis=1).T)]

  return [
      _router(at(p, "w_gate_ME"), at(hf, "experts.router.layer.weight")),
      Entry([at(p, "w_q_EMKD")], [at(hf, "experts.input_linear.weight")],
            q_to_jax, lambda a: [np.ascontiguousarray(np.swapaxes(
                a[0].reshape(a[0].shape[:2] + (-1,)), 1, 2))]),
      Entry([at(p, "w_o_EKDM")], [at(hf, "experts.output_linear.weight")],
            o_to_jax, lambda a: [np.ascontiguousarray(np.swapaxes(
                a[0].reshape((a[0].shape[0], -1, a[0].shape[-1])), 1, 2))]),
      Entry([at(p, "w_k_MKD"), at(p, "w_v_MKD")], [at(hf, "kv_proj.weight")],
            kv_to_jax, kv_to_hf),
      _same(at(p, "b_out_M"), at(hf, "experts.bias"))]


def _moe(spec, p, hf):
  e = spec.num_experts
  t = spec.model_type
  if t == "mixtral":
    hf = hf.replace(".mlp", ".block_sparse_moe")
    return ([_router(f"{p}.router.w_router_ME", f"{hf}.gate.weight")]
            + _experts(f"{p}.experts", f"{hf}.experts", e, "w1", "w3", "w2"))
  if t == "granitemoe":
    hf = hf.replace(".mlp", ".block_sparse_moe")
    return [_router(f"{p}.router.w_router_ME", f"{hf}.router.layer.weight"),
            _fused_halves(f"{p}.experts", hf)]
  if t == "jetmoe":
    return [_router(f"{p}.router.w_router_ME", f"{hf}.router.layer.weight"),
            _fused_halves(f"{p}.experts", hf),
            _same(f"{p}.b_out_M", f"{hf}.bias")]
  if t == "gpt_oss":
    return [_router(f"{p}.router.w_router_ME", f"{hf}.router.weight"),
            _same(f"{p}.router.b_router_E", f"{hf}.router.bias"),
            _gpt_oss_experts(f"{p}.experts", f"{hf}.experts")]
  out = [_router(f"{p}.router.w_router_ME", f"{hf}.gate.weight")]
  out += _experts(f"{p}.experts", f"{hf}.experts", e, "gate_proj",
                  "up_proj", "down_proj")
  if t in ("deepseek_v3", "glm4_moe"):
    out.append(_same(f"{p}.router.bias_E",
                     f"{hf}.gate.e_score_correction_bias"))
  shared = spec.moe.get("shared")
  if shared and t == "qwen2_moe":
    out += _dense(f"{p}.shared.ffn", f"{hf}.shared_expert")
    out.append(Entry([f"{p}.shared.w_shared_gate_M1"],
                     [f"{hf}.shared_expert_gate.weight"],
                     lambda a: [a[0].T], lambda a: [
                         np.ascontiguousarray(a[0].T)]))
  elif shared:
    out += _dense(f"{p}.shared", f"{hf}.shared_experts")
  return out


def _moa(p, hf, att):
  """JetMoE's attention (module self_attention) <-> MoAttention.moa."""
  return jetmoe_attention(f"{p}.moa",
                          hf.replace(".self_attn", ".self_attention"),
                          att.num_kv_heads, att.head_dim)


_ATTENTION = {"gqa": _gqa, "mla": _mla, "moa": _moa}


def tensor_map(spec):
  """All Entry objects of a ModelSpec's model, embeddings first."""
  out = [_same("embed_VM", "model.embed_tokens.weight"),
         _same("final_norm.scale_M", "model.norm.weight")]
  if not spec.tie_embeddings:
    out.append(_router("w_unembed_MV", "lm_head.weight"))
  att = spec.attention
  for i in range(spec.num_layers):
    p, hf = f"blocks.{i}", f"model.layers.{i}"
    out += [_same(f"{p}.input_norm.scale_M", f"{hf}.input_layernorm.weight"),
            _same(f"{p}.post_attention_norm.scale_M",
                  f"{hf}.post_attention_layernorm.weight")]
    out += _ATTENTION[att.form](f"{p}.attention", f"{hf}.self_attn", att)
    if spec.ffn_kinds[i] == "moe":
      out += _moe(spec, f"{p}.ffn", f"{hf}.mlp")
    else:
      out += _dense(f"{p}.ffn", f"{hf}.mlp")
  return out
