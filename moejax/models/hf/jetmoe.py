"""JetMoE's attention block (transformers' JetMoeAttention) as moejax's
MoAAttention.

JetMoE (Shen et al. 2024) routes each token to top-k of E attention experts;
expert e owns a query projection [M, K*D] and an output projection [K*D, M]
over K key/value heads shared by all experts (kv_proj), with RoPE, a softmax
over the k largest router logits and an output bias: MoAAttention with
num_kv_heads=K and output_bias=True. `load_jetmoe_attention` builds that
module from a JetMoeConfig's fields and fills it from the block's tensors
(mapping.jetmoe_attention gives the names and layouts).
"""

import jax.numpy as jnp
from flax import nnx
import numpy as np

from moejax.layers import attention_experts
from moejax.models.hf import config as config_lib
from moejax.models.hf import load as load_lib
from moejax.models.hf import mapping


def moa_kwargs(fields):
  """MoAAttention keyword arguments for a JetMoeConfig's fields (a dict as
  in config.json), read by config.jetmoe_attention as from_pretrained reads
  them. Raises UnsupportedConfig for a RoPE other than the default one over
  the whole head (MoAAttention's RoPE is the plain RoFormer one)."""
  f = config_lib.Fields(dict(fields, model_type="jetmoe"))
  att, rope = config_lib.jetmoe_attention(f)
  return dict(model_dim=f.need("hidden_size"), num_experts=att.moa_experts,
              k=att.moa_k, head_dim=att.head_dim,
              num_kv_heads=att.num_kv_heads, output_bias=True, causal=True,
              rope_max_wavelength=rope.theta)


def load_jetmoe_attention(fields, tensors, *, prefix="", dtype=jnp.float32,
                          rngs=None):
  """MoAAttention equal to transformers' JetMoeAttention.

  Args:
    fields: the JetMoeConfig fields (dict).
    tensors: {name: numpy array} holding the block's state_dict under
      `prefix` (e.g. 'model.layers.0.self_attention' for a full checkpoint,
      '' for the block's own state_dict).
    dtype: parameter and compute dtype (the router stays float32).
    rngs: nnx.Rngs for the throwaway initial values (default Rngs(0)).
  Returns:
    MoAAttention; y_BLM = attn(x_BLM, padding_mask_BL=..., positions_BL=...)
    matches the block's first output on the unpadded positions, and
    attn.router_logits(x_BLM) its router logits.
  Raises:
    CheckpointError naming a missing or mis-shaped tensor.
  """
  kw = moa_kwargs(fields)
  attn = attention_experts.MoAAttention(
      **kw, dtype=dtype, param_dtype=dtype, rngs=rngs or nnx.Rngs(0))
  entries = mapping.jetmoe_attention("", prefix.rstrip("."),
                                     kw["num_kv_heads"], kw["head_dim"])
  for entry in entries:
    missing = [n for n in entry.hf_names if n not in tensors]
    if missing:
      raise load_lib.CheckpointError(f"JetMoE attention lacks tensor "
                                     f"{missing[0]!r}")
    arrays = [np.asarray(tensors[n]) for n in entry.hf_names]
    variables = [load_lib.variable_at(attn, p) for p in entry.paths]
    # The HF shapes this config needs: the variables laid out as HF does.
    wanted = entry.to_hf([np.zeros(v.shape, np.float32) for v in variables])
    for name, array, want in zip(entry.hf_names, arrays, wanted):
      if array.shape != want.shape:
        raise load_lib.CheckpointError(
            f"tensor {name!r} has shape {array.shape}; this config needs "
            f"{want.shape}")
    for var, value in zip(variables, entry.to_jax(arrays)):
      var[...] = jnp.asarray(value, var.dtype)
  return attn
