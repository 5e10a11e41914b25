"""Decoder-only language model with MoE FFNs every N layers."""

from typing import Optional

from flax import nnx
import jax
import jax.numpy as jnp

from moejax import notation as nt
from moejax.layers import build as build_lib
from moejax.layers import params as params_lib
from moejax.layers import transformer as tfm
from moejax.models import common


class DecoderLM(nnx.Module):
  """Causal decoder-only LM: embed -> blocks -> RMSNorm -> logits.

  Blocks are pre-norm (RMSNorm), causal multi-head attention with rotary
  positions, and an FFN that is a DenseFFN, or an MoELayer in the layers
  chosen by `moe_every` / `moe_layers`.

  Example (top-2 of 8 experts every other layer, and its dense twin):
    moe = DecoderLM(256, 128, 4, 4, 512, moe_every=2,
                    moe={"router": {"name": "token_choice", "k": 2},
                         "engine": {"name": "indices"},
                         "experts": {"num_experts": 8},
                         "capacity_factor": 1.25},
                    rngs=nnx.Rngs(0))
    width = flop_matched_dense_mlp_dim(512, 2, moe_every=2, mlp_dim=512)
    dense = DecoderLM(256, 128, 4, 4, width, moe_every=0, rngs=nnx.Rngs(0))
    logits_BLV, aux = moe(tokens_BL)

  Causality: MoE layers are built with causal=True, so routers that read
  later tokens (expert_choice, balanced, batch_prioritized, Soft MoE) raise
  ValueError unless the moe config has allow_non_causal=True. Token choice
  is causal when nothing is dropped (the dropless engine, or capacity >= the
  group size) and for k=1 with any capacity (slots are claimed in token
  order). With k > 1 and a finite capacity, slots are claimed choice-major
  (every token's 1st choice before any 2nd choice), so a later token's 1st
  choice can drop an earlier token's 2nd choice at training time: a small
  leak, as in GShard. Groups longer than one sequence (group_size > L) also
  let earlier sequences of the batch take capacity from later ones.

  Args:
    vocab_size: V.
    model_dim: M.
    num_layers: number of blocks.
    num_heads: N; head_dim D defaults to M // N.
    mlp_dim: width of the dense FFNs, and the default expert width.
    moe_every: MoE replaces the FFN of layer i when (i + 1) % moe_every == 0
      (1 = every layer, 2 = layers 1, 3, ...; 0 = a dense model).
    moe_layers: explicit 0-based MoE layer indices, overriding moe_every.
    moe: the MoE config (moejax.layers.build_moe), e.g. {'router':
      {'name': 'token_choice', 'k': 2}, 'engine': {'name': 'dropless'},
      'experts': {'num_experts': 8}, 'shared': {'num_experts': 1}};
      experts.hidden_dim defaults to mlp_dim and experts.activation to the
      model's; per-layer overrides go in moe['layers'][str(i)]. model_dim,
      causality, dtype, param_dtype and rngs come from the model. Ignored
      when no layer is MoE.
    head_dim: D.
    activation: FFN activation (relu, gelu, swiglu, geglu).
    tie_embeddings: logits = h @ embed^T * M^-0.5 (the T5 scaling); otherwise a
      separate w_unembed_MV.
    rope_max_wavelength: RoPE base.
    norm_eps: RMSNorm epsilon.
    scan_layers: build the blocks as one stack of identical periods
      (nnx.vmap-created parameters with a leading [num_layers / period]
      axis) and run them with nnx.scan, so compile time does not grow with
      depth. The period is 1 for a dense model or MoE in every layer, and
      moe_every for MoE every N layers; explicit moe_layers, per-layer MoE
      overrides, routers that update state (DeepSeek's bias) and a
      num_layers that is not a multiple of moe_every are refused
      (ValueError). `blocks` then holds the `period` blocks of one period,
      each with stacked parameters.
    remat: rematerialisation of each block in the backward pass, one of
      common.REMAT_POLICIES ('none', 'full', 'save_dots',
      'save_moe_outputs': recompute everything but the MoE halves of the
      MoE blocks, 'offload').
    wrappers: {name: options} of moejax.layers.build.WRAPPERS applied to
      the built model (Mixture-of-Depths 'mod', 'attention_experts',
      'lora_experts'), or None; not with scan_layers.
    dtype, param_dtype: compute and parameter dtypes; logits are float32
      (bfloat16 compute with float32 master weights: dtype=jnp.bfloat16,
      param_dtype=jnp.float32; routers and norms compute in float32).
    rngs: nnx.Rngs ('params'; MoE layers may also use 'router').
  Parameters: embed_VM [V, M] (vocab, embed); blocks; final_norm;
    w_unembed_MV [M, V] (embed, vocab) when untied.
  """

  def __init__(self, vocab_size, model_dim, num_layers, num_heads, mlp_dim, *,
               moe_every=0, moe_layers=None, moe=None, head_dim=None, activation="swiglu",
               tie_embeddings=True, rope_max_wavelength=10_000.0,
               norm_eps=1e-6, scan_layers=False, remat="none",
               dtype=jnp.float32, param_dtype=jnp.float32, wrappers=None,
               rngs):
    for name, value in (("vocab_size", vocab_size), ("model_dim", model_dim),
                        ("num_layers", num_layers), ("num_heads", num_heads),
                        ("mlp_dim", mlp_dim)):
      common._check_int(name, value, 1)
    params_lib.check_activation(activation)
    common.check_remat(remat)
    moe_layers_given = moe_layers is not None
    if moe_layers is None:
      moe_layers = common.every_n_placement(num_layers, moe_every)
    else:
      moe_layers = common.check_layer_indices(moe_layers, num_layers)
    if moe_layers:
      moe = common.check_moe_config(moe, num_layers, moe_layers)
    self.vocab_size, self.model_dim = vocab_size, model_dim
    self.num_layers, self.num_heads = num_layers, num_heads
    self.mlp_dim = mlp_dim
    self.moe_every = moe_every
    self.moe_layers = tuple(moe_layers)
    self.activation = activation
    self.tie_embeddings = tie_embeddings
    self.dtype = dtype
    self.remat = remat
    self.scan_layers = bool(scan_layers)
    # Blocks per scan step, and scan steps (1 and num_layers unrolled).
    self.scan_period = (common.scan_period(num_layers, moe_every,
                                           moe_layers_given, moe)
                        if scan_layers else 1)
    self.scan_repeats = num_layers // self.scan_period if scan_layers else 1

    self.embed_VM = params_lib.param(
        rngs, nnx.initializers.normal(1.0), (vocab_size, model_dim),
        (nt.VOCAB, nt.EMBED), param_dtype)
    def make_blocks(first, count, rngs):
      blocks = []
      for i in range(first, first + count):
        ffn = common.build_ffn(
            i, is_moe=i in self.moe_layers, model_dim=model_dim,
            mlp_dim=mlp_dim, activation=activation, moe=moe, causal=True,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # The MoE layer has already checked causality (and honoured its own
        # allow_non_causal); the block need not repeat it.
        blocks.append(tfm.TransformerBlock(
            model_dim, num_heads, ffn=ffn, head_dim=head_dim, causal=True,
            allow_non_causal=True, rope_max_wavelength=rope_max_wavelength,
            norm="rmsnorm", norm_eps=norm_eps, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs))
      return nnx.List(blocks)

    if not scan_layers:
      self.blocks = make_blocks(0, num_layers, rngs)
    else:
      # One period built per scan step; every parameter gets a leading axis
      # [scan_repeats] (logical name None: not sharded).
      @nnx.split_rngs(splits=self.scan_repeats)
      @nnx.vmap(in_axes=(0,), out_axes=0,
                transform_metadata={nnx.PARTITION_NAME: None})
      def make_stack(rngs):
        return make_blocks(num_layers - self.scan_period, self.scan_period,
                           rngs)
      self.blocks = make_stack(rngs)
      for block in self.blocks:
        if block.is_moe and hasattr(getattr(block.ffn, "router", None),
                                    "update"):
          raise ValueError(
              f"scan_layers=True does not support routers that update "
              f"their state after each step "
              f"({type(block.ffn.router).__name__}); use scan_layers=False")
    self.final_norm = tfm.RMSNorm(model_dim, eps=norm_eps, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.w_unembed_MV = (None if tie_embeddings else params_lib.param(
        rngs, nnx.initializers.variance_scaling(1.0, "fan_in",
                                                "truncated_normal"),
        (model_dim, vocab_size), (nt.EMBED, nt.VOCAB), param_dtype))
    if wrappers:
      if scan_layers:
        # The wrappers replace blocks[i] / block.attention one by one; a
        # scanned stack has one block per period position.
        raise ValueError(f"wrappers {sorted(wrappers)} apply to unrolled "
                         f"blocks; use scan_layers=False")
      build_lib.apply_wrappers(self, wrappers, rngs=rngs)

  def init_cache(self, batch, max_length):
    """An empty KV cache for decoding `batch` rows of up to `max_length`
    positions (moejax.inference.generate): one LayerCache per block, or with
    scan_layers one per block of the period, stacked [scan_repeats]."""
    if not self.scan_layers:
      return [block.attention.init_cache(batch, max_length)
              for block in self.blocks]
    stack = lambda x: jnp.broadcast_to(x, (self.scan_repeats,) + x.shape)
    return [jax.tree.map(stack, block.attention.init_cache(batch, max_length))
            for block in self.blocks]

  def __call__(self, tokens_BL, *, padding_mask_BL=None, positions_BL=None,
               segment_ids_BL=None, deterministic: Optional[bool] = None,
               cache=None):
    """Next-token logits.

    Args:
      tokens_BL: <int32>[B, L] token ids in [0, V).
      padding_mask_BL: optional <bool>[B, L], False at padding (not attended,
        takes no expert slot, not in aux losses/metrics).
      positions_BL: optional <int32>[B, L] RoPE positions (default 0..L-1).
      segment_ids_BL: optional <int32>[B, L]; attention stays within equal
        ids (packed documents). MoE groups are not split by segment.
      deterministic: evaluation mode for the MoE layers; None = each layer's
        `deterministic` attribute, which model.eval() / model.train() set.
      cache: optional KV cache (init_cache): the tokens extend the cached
        sequence at positions_BL (required); MoE layers route without
        dropping; no rematerialisation.
    Returns:
      (logits_BLV <float32>[B, L, V], aux): aux is the MoE layers' MoEAux
      stacked along a leading axis [len(self.moe_layers)] in layer order
      (stack_aux), or None for a dense model (no MoE layers); with a cache,
      (logits_BLV, aux, new cache).
    """
    if getattr(tokens_BL, "ndim", None) != 2 or not jnp.issubdtype(
        tokens_BL.dtype, jnp.integer):
      raise ValueError(f"tokens_BL must be an integer array [B, L], got "
                       f"{getattr(tokens_BL, 'dtype', None)}"
                       f"{getattr(tokens_BL, 'shape', None)}")
    x_BLM = jnp.take(self.embed_VM[...], tokens_BL, axis=0).astype(self.dtype)
    def run_block(block, x_BLM, padding_mask_BL, segment_ids_BL,
                  positions_BL, tokens_BL, layer_cache=None):
      if layer_cache is None:
        return block(x_BLM, padding_mask_BL=padding_mask_BL,
                     segment_ids_BL=segment_ids_BL, positions_BL=positions_BL,
                     token_ids_BL=tokens_BL, deterministic=deterministic)
      return block(x_BLM, padding_mask_BL=padding_mask_BL,
                   positions_BL=positions_BL, token_ids_BL=tokens_BL,
                   deterministic=deterministic, cache=layer_cache)
    # Decoding (a cache) takes no gradient: nothing to rematerialise.
    remat_policy = self.remat if cache is None else "none"
    if remat_policy == "save_moe_outputs":
      # MoE blocks: only the attention half is rematerialised; the MoE half
      # runs once and keeps its residuals. Dense blocks: fully.
      remat = lambda f: nnx.remat(f, prevent_cse=not self.scan_layers)

      @remat
      def attend(block, x_BLM, padding_mask_BL, segment_ids_BL,
                 positions_BL):
        return block.attend(x_BLM, padding_mask_BL=padding_mask_BL,
                            segment_ids_BL=segment_ids_BL,
                            positions_BL=positions_BL)
      dense_block = remat(run_block)

      def run_block(block, x_BLM, padding_mask_BL, segment_ids_BL,  # pylint: disable=function-redefined
                    positions_BL, tokens_BL):
        if not block.is_moe:
          return dense_block(block, x_BLM, padding_mask_BL, segment_ids_BL,
                             positions_BL, tokens_BL)
        x_BLM = attend(block, x_BLM, padding_mask_BL, segment_ids_BL,
                       positions_BL)
        return block.feed_forward(x_BLM, padding_mask_BL=padding_mask_BL,
                                  token_ids_BL=tokens_BL,
                                  deterministic=deterministic)
    elif remat_policy != "none":
      run_block = nnx.remat(run_block, policy=common.remat_policy(self.remat),
                            prevent_cse=not self.scan_layers)
    inputs = (padding_mask_BL, segment_ids_BL, positions_BL, tokens_BL)

    def run_blocks(blocks, x_BLM, caches=None):
      auxes, new_caches = [], []
      for i, block in enumerate(blocks):
        if caches is None:
          x_BLM, aux = run_block(block, x_BLM, *inputs)
        else:
          x_BLM, aux, layer_cache = run_block(block, x_BLM, *inputs,
                                              caches[i])
          new_caches.append(layer_cache)
        if aux is not None:
          auxes.append(aux)
      return x_BLM, auxes, new_caches

    if not self.scan_layers:
      x_BLM, auxes, new_cache = run_blocks(self.blocks, x_BLM, cache)
      cache = None if cache is None else new_cache
      aux = tfm.stack_aux(auxes)
    elif cache is None:
      # A period holds at most one MoE block (its last), so the scan's
      # stacked outputs are already stack_aux's [num_moe_layers] layout.
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
      def scan_periods(x_BLM, blocks):
        x_BLM, auxes, _ = run_blocks(blocks, x_BLM)
        return x_BLM, (auxes[0] if auxes else None)
      x_BLM, aux = scan_periods(x_BLM, self.blocks)
    else:
      # Decoding a scanned model: each period's caches are scanned with it.
      @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0, 0))
      def scan_cached(x_BLM, blocks, caches):
        x_BLM, auxes, caches = run_blocks(blocks, x_BLM, caches)
        return x_BLM, (auxes[0] if auxes else None), caches
      x_BLM, aux, cache = scan_cached(x_BLM, self.blocks, cache)
    h_BLM = self.final_norm(x_BLM)
    if self.tie_embeddings:
      logits_BLV = jnp.einsum("BLM,VM->BLV", h_BLM,
                              self.embed_VM[...].astype(self.dtype),
                              preferred_element_type=jnp.float32)
      logits_BLV = logits_BLV.astype(jnp.float32) * self.model_dim ** -0.5
    else:
      logits_BLV = jnp.einsum("BLM,MV->BLV", h_BLM,
                              self.w_unembed_MV[...].astype(self.dtype),
                              preferred_element_type=jnp.float32)
      logits_BLV = logits_BLV.astype(jnp.float32)
    if cache is not None:
      return logits_BLV, aux, cache
    return logits_BLV, aux
