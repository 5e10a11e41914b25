"""ViT encoder classifier with V-MoE blocks (sparse MoE or Soft MoE)."""

from typing import Optional

from flax import nnx
import jax.numpy as jnp

from moejax import notation as nt
from moejax.layers import params as params_lib
from moejax.layers import transformer as tfm
from moejax.models import common

POOLS = ("gap", "token")


def _pair(name, value):
  pair = (value, value) if isinstance(value, int) else tuple(value)
  if len(pair) != 2:
    raise ValueError(f"{name} must be an int or a pair, got {value!r}")
  for v in pair:
    common._check_int(name, v, 1)
  return pair


def patchify(images, patch_size):
  """Cuts images into flattened, non-overlapping patches.

  Args:
    images: <float>[B, height, width, channels].
    patch_size: (ph, pw), dividing height and width.
  Returns:
    patches_BLF [B, L, F] with L = (height/ph) * (width/pw) in row-major
    patch order and F = ph * pw * channels.
  """
  b, h, w, c = images.shape
  ph, pw = patch_size
  x = images.reshape(b, h // ph, ph, w // pw, pw, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // ph) * (w // pw), ph * pw * c)


class ViTClassifier(nnx.Module):
  """Vision Transformer encoder + classifier head, with MoE blocks.

  patches -> 'BLF,FM->BLM' + learned positions (+ a class token for
  pool='token') -> non-causal pre-norm blocks -> norm -> pool -> 'BM,MY->BY'.

  Example (V-MoE Last-2, top-2 of 8 experts; and a Soft MoE variant):
    vit = ViTClassifier(32, 4, 3, 10, 128, 8, 4, 512,
                        moe={"router": {"name": "token_choice", "k": 2},
                             "experts": {"num_experts": 8},
                             "capacity_factor": 1.05},
                        rngs=nnx.Rngs(0))                # MoE at (5, 7)
    soft = ViTClassifier(32, 4, 3, 10, 128, 8, 4, 512,
                         moe={"layer": "soft_moe", "slots_per_expert": 2,
                              "experts": {"num_experts": 8}},
                         rngs=nnx.Rngs(0))
    logits_BY, aux = vit(images)

  Args:
    image_size: int or (height, width).
    patch_size: int or (ph, pw), dividing the image size.
    num_channels: channels of the input images.
    num_classes: Y.
    model_dim, num_layers, num_heads, mlp_dim: M, blocks, N, dense FFN width
      (and default expert width).
    moe_layers: 0-based MoE block indices; None = vmoe_placement(num_layers,
      num_moe) when moe is given, else no MoE (a dense ViT).
    num_moe: how many MoE blocks the default placement uses (V-MoE Last-n).
    moe: the MoE config (moejax.layers.build_moe), as in DecoderLM;
      layer='soft_moe' builds Soft MoE layers (all experts active, on
      slots). Layers are built with causal=False.
    pool: 'gap' (mean over patch tokens) or 'token' (a learned class token).
    head_dim, activation, norm ('layernorm' or 'rmsnorm'), norm_eps,
    dtype, param_dtype, rngs: as DecoderLM. No rotary embeddings: positions
    are learned, one per patch.
  Parameters: w_patch_FM [F, M] (-, embed), b_patch_M; pos_LM [L, M]
    (-, embed); cls_M (pool='token'); blocks; final_norm; w_head_MY [M, Y]
    (embed, -), b_head_Y (both zero-initialised, as in ViT).
  """

  def __init__(self, image_size, patch_size, num_channels, num_classes,
               model_dim, num_layers, num_heads, mlp_dim, *, moe_layers=None,
               num_moe=2, moe=None, pool="gap",
               head_dim=None, activation="gelu", norm="layernorm",
               norm_eps=1e-6, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs):
    self.image_size = _pair("image_size", image_size)
    self.patch_size = _pair("patch_size", patch_size)
    for s, p in zip(self.image_size, self.patch_size):
      if s % p:
        raise ValueError(f"patch_size {self.patch_size} must divide "
                         f"image_size {self.image_size}")
    for name, value in (("num_channels", num_channels),
                        ("num_classes", num_classes), ("model_dim", model_dim),
                        ("num_layers", num_layers), ("num_heads", num_heads),
                        ("mlp_dim", mlp_dim)):
      common._check_int(name, value, 1)
    if pool not in POOLS:
      raise ValueError(f"unknown pool {pool!r}; allowed: {list(POOLS)}")
    params_lib.check_activation(activation)
    if moe_layers is None:
      moe_layers = (common.vmoe_placement(num_layers, num_moe)
                    if moe is not None else ())
    else:
      moe_layers = common.check_layer_indices(moe_layers, num_layers)
    if moe_layers:
      moe = common.check_moe_config(moe, num_layers, moe_layers)
    self.num_channels, self.num_classes = num_channels, num_classes
    self.model_dim, self.num_layers = model_dim, num_layers
    self.num_heads, self.mlp_dim = num_heads, mlp_dim
    self.moe_layers = tuple(moe_layers)
    self.pool = pool
    self.activation = activation
    self.dtype = dtype
    ph, pw = self.patch_size
    self.num_patches = (self.image_size[0] // ph) * (self.image_size[1] // pw)
    self.num_tokens = self.num_patches + (pool == "token")
    f, m = ph * pw * num_channels, model_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    self.w_patch_FM = params_lib.param(
        rngs, nnx.initializers.lecun_normal(), (f, m), (None, nt.EMBED),
        param_dtype)
    self.b_patch_M = params_lib.param(rngs, nnx.initializers.zeros_init(),
                                      (m,), (nt.EMBED,), param_dtype)
    self.pos_LM = params_lib.param(rngs, nnx.initializers.normal(0.02),
                                   (self.num_tokens, m), (None, nt.EMBED),
                                   param_dtype)
    self.cls_M = (params_lib.param(rngs, nnx.initializers.zeros_init(), (m,),
                                   (nt.EMBED,), param_dtype)
                  if pool == "token" else None)
    blocks = []
    for i in range(num_layers):
      ffn = common.build_ffn(
          i, is_moe=i in self.moe_layers, model_dim=m, mlp_dim=mlp_dim,
          activation=activation, moe=moe, causal=False, **kw)
      blocks.append(tfm.TransformerBlock(
          m, num_heads, ffn=ffn, head_dim=head_dim, causal=False,
          rope_max_wavelength=None, norm=norm, norm_eps=norm_eps, **kw))
    self.blocks = nnx.List(blocks)
    self.final_norm = tfm.make_norm(norm, m, eps=norm_eps, **kw)
    self.w_head_MY = params_lib.param(
        rngs, nnx.initializers.zeros_init(), (m, num_classes),
        (nt.EMBED, None), param_dtype)
    self.b_head_Y = params_lib.param(rngs, nnx.initializers.zeros_init(),
                                     (num_classes,), (None,), param_dtype)

  def __call__(self, images, *, deterministic: Optional[bool] = None):
    """Class logits.

    Args:
      images: <float>[B, height, width, channels] (e.g. the vision loader's
        'image', pixels in [0, 1]).
      deterministic: evaluation mode for the MoE layers; None = each layer's
        attribute (model.eval() / model.train()).
    Returns:
      (logits_BY <float32>[B, Y], aux): the MoE layers' MoEAux stacked along
      a leading axis [len(self.moe_layers)], or None without MoE layers.
    """
    expected = (*self.image_size, self.num_channels)
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4 or shape[1:] != expected:
      raise ValueError(f"images must have shape [B, {expected[0]}, "
                       f"{expected[1]}, {expected[2]}], got "
                       f"{getattr(images, 'shape', None)}")
    dt = self.dtype
    patches_BLF = patchify(images.astype(dt), self.patch_size)
    x_BLM = jnp.einsum("BLF,FM->BLM", patches_BLF,
                       self.w_patch_FM[...].astype(dt))
    x_BLM = x_BLM + self.b_patch_M[...].astype(dt)
    if self.cls_M is not None:
      cls_B1M = jnp.broadcast_to(self.cls_M[...].astype(dt),
                                 (x_BLM.shape[0], 1, self.model_dim))
      x_BLM = jnp.concatenate([cls_B1M, x_BLM], axis=1)
    x_BLM = x_BLM + self.pos_LM[...].astype(dt)[None]
    auxes = []
    for block in self.blocks:
      x_BLM, aux = block(x_BLM, deterministic=deterministic)
      if aux is not None:
        auxes.append(aux)
    h_BLM = self.final_norm(x_BLM)
    h_BM = h_BLM[:, 0] if self.pool == "token" else jnp.mean(h_BLM, axis=1)
    logits_BY = jnp.einsum("BM,MY->BY", h_BM, self.w_head_MY[...].astype(dt),
                           preferred_element_type=jnp.float32)
    logits_BY = logits_BY.astype(jnp.float32) + self.b_head_Y[...].astype(
        jnp.float32)
    return logits_BY, tfm.stack_aux(auxes)
