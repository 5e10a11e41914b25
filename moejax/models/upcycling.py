"""Sparse upcycling: turn a dense model's FFNs into experts (survey §4.4.1).

Sparse Upcycling (Komatsuzaki et al. 2023) copies each dense FFN into all E
experts of an MoE layer and initialises the router afresh; the upcycled
model starts where the dense one stopped. Drop-Upcycling (Nakamura et al.
2025) re-initialises a random fraction r of each expert's intermediate
units (the same units in w_in, w_gate and w_out, a different draw per
expert), from a normal with the mean and standard deviation of the dense
matrix, so that the experts can diverge:

  W_e[:, S_e] ~ N(mean(W), std(W)),  |S_e| = round(r * H), S_e random per e.

Two entry points:
  * `upcycle_params(moe_model, dense_model, ...)` copies the weights of a
    dense model into an MoE model already built with the same structure
    (the trainer builds the MoE model from its config, then fills it from a
    dense checkpoint). It matches parameters by path: equal paths and shapes
    are copied; an expert tensor `.../ffn/experts/w_in_EMH` takes the dense
    `.../ffn/w_in_MH`, broadcast over its expert axis (the letters after the
    last underscore say where E sits, so layer-stacked [Y, E, M, H] works).
  * `upcycle(dense_model, moe=...)` makes the MoE model itself: every dense
    FFN (DenseFFN) of a transformer block becomes the MoE layer that
    `moejax.layers.build_moe(moe)` builds, with the dense weights copied in.

At step 0, with a renormalised top-k router and no token dropped (a
dropless engine, or capacity to spare), every token's k weights sum to 1
over k identical experts, so the upcycled model gives the dense model's
outputs (tests/models/test_upcycle.py). With drop_ratio > 0 it does not.
"""

import copy
import re

from flax import nnx
import jax
import jax.numpy as jnp

from moejax.layers import build as build_lib
from moejax.layers import ffn as ffn_lib

_SHAPE_SUFFIX = re.compile(r"^(?P<stem>.+)_(?P<axes>[A-Z]+)$")


def _path_str(path):
  return "/".join(str(p) for p in path)


def _dense_twin(path):
  """(dense path, expert axis letters) for an expert tensor path, else None.

  `.../ffn/experts/w_in_EMH` -> (`.../ffn/w_in_MH`, 'EMH').
  """
  if len(path) < 2 or path[-2] != "experts":
    return None
  match = _SHAPE_SUFFIX.match(str(path[-1]))
  if match is None or "E" not in match["axes"]:
    return None
  axes = match["axes"]
  dense_name = f"{match['stem']}_{axes.replace('E', '')}"
  return path[:-2] + (dense_name,), axes


def _drop_masks(key, lead_shape, num_experts, hidden, ratio):
  """<bool>[*lead, E, H]: round(ratio * H) units per expert, drawn per expert."""
  num_drop = int(round(ratio * hidden))
  scores = jax.random.uniform(key, (*lead_shape, num_experts, hidden))
  ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  return ranks < num_drop


def _broadcast_expert(dense, axes, num_experts):
  """Inserts the expert axis into a dense tensor: [*lead, M, H] -> [*lead, E, M, H]."""
  axis = dense.ndim - (len(axes) - 1) + axes.index("E")
  return jnp.repeat(jnp.expand_dims(dense, axis), num_experts, axis=axis)


def upcycle_params(moe_model, dense_model, *, drop_ratio=0.0, seed=0,
                   variables=nnx.Param):
  """Fills `moe_model`'s parameters from `dense_model`'s, in place.

  Args:
    moe_model: an NNX model whose MoE layers hold Experts under the path of
      the dense FFN they replace (`blocks/3/ffn/experts/w_in_EMH` for the
      dense `blocks/3/ffn/w_in_MH`); every other parameter present in both
      with equal shape is copied; parameters absent from the dense model
      (routers, shared experts) keep their initialisation.
    dense_model: the dense NNX model (same vocabulary, widths and depth).
    drop_ratio: Drop-Upcycling's r in [0, 1]: the fraction of each expert's
      hidden units re-initialised (0 = plain sparse upcycling).
    seed: PRNG seed of the Drop-Upcycling draws.
    variables: an nnx filter of the variables matched (default the Params;
      the trainer passes everything but RNG state, so frozen parameters and
      router state such as DeepSeek's bias come along).
  Returns:
    dict with 'copied', 'broadcast' and 'initialised' parameter paths.
  Raises:
    ValueError: a dense parameter that has no place in the MoE model, or a
      shape that does not match (named).
  """
  if isinstance(drop_ratio, bool) or not isinstance(
      drop_ratio, (int, float)) or not 0.0 <= drop_ratio <= 1.0:
    raise ValueError(f"drop_ratio must be a number in [0, 1], got "
                     f"{drop_ratio!r}")
  dense = dict(nnx.to_flat_state(nnx.state(dense_model, variables)))
  target = dict(nnx.to_flat_state(nnx.state(moe_model, variables)))
  used, report = set(), {"copied": [], "broadcast": [], "initialised": []}
  masks = {}  # FFN path -> <bool>[*lead, E, H], shared by its w_in/gate/out
  key = jax.random.key(seed)
  for path, var in target.items():
    value = var.get_value() if hasattr(var, "get_value") else var.value
    if path in dense:
      src = dense[path]
      src_value = src.get_value() if hasattr(src, "get_value") else src.value
      if src_value.shape != value.shape:
        raise ValueError(
            f"{_path_str(path)}: dense shape {tuple(src_value.shape)} != MoE "
            f"shape {tuple(value.shape)}; upcycle needs the same widths")
      var.set_value(jnp.asarray(src_value, value.dtype))
      used.add(path)
      report["copied"].append(_path_str(path))
      continue
    twin = _dense_twin(path)
    if twin is None or twin[0] not in dense:
      report["initialised"].append(_path_str(path))
      continue
    dense_path, axes = twin
    src = dense[dense_path]
    src_value = jnp.asarray(
        src.get_value() if hasattr(src, "get_value") else src.value)
    num_experts = value.shape[value.ndim - len(axes) + axes.index("E")]
    new = _broadcast_expert(src_value, axes, num_experts)
    if new.shape != value.shape:
      raise ValueError(
          f"{_path_str(path)}: dense {_path_str(dense_path)} "
          f"{tuple(src_value.shape)} broadcast to {tuple(new.shape)}, but "
          f"the expert tensor is {tuple(value.shape)}; upcycle needs the "
          f"dense FFN width as the expert width")
    if drop_ratio > 0 and "H" in axes:
      lead = value.shape[:value.ndim - len(axes)]
      h_axis = value.ndim - len(axes) + axes.index("H")
      e_axis = value.ndim - len(axes) + axes.index("E")
      ffn_path = path[:-2]
      if ffn_path not in masks:
        key, sub = jax.random.split(key)
        masks[ffn_path] = _drop_masks(sub, lead, num_experts,
                                      value.shape[h_axis], drop_ratio)
      # [*lead, E, H] -> the tensor's layout, size 1 on its other axes.
      mask = masks[ffn_path]
      shape = [1] * value.ndim
      for i, size in enumerate(lead):
        shape[i] = size
      shape[e_axis], shape[h_axis] = num_experts, value.shape[h_axis]
      mask = mask.reshape(shape) if e_axis < h_axis else jnp.swapaxes(
          mask, -1, -2).reshape(shape)
      # Statistics of each dense matrix (per layer when layer-stacked).
      mat_axes = tuple(range(src_value.ndim - (len(axes) - 1), src_value.ndim))
      mean = jnp.expand_dims(src_value.mean(axis=mat_axes, keepdims=True),
                             e_axis)
      std = jnp.expand_dims(src_value.std(axis=mat_axes, keepdims=True),
                            e_axis)
      key, sub = jax.random.split(key)
      fresh = mean + std * jax.random.normal(sub, value.shape, jnp.float32)
      new = jnp.where(mask, fresh, new)
    var.set_value(new.astype(value.dtype))
    used.add(dense_path)
    report["broadcast"].append(_path_str(path))
  unused = sorted(_path_str(p) for p in dense if p not in used)
  if unused:
    raise ValueError(f"dense parameters with no place in the MoE model: "
                     f"{unused[:4]}{' ...' if len(unused) > 4 else ''}")
  return report


def _block_ffns(model):
  """[(index, block)] for the blocks whose `ffn` is a DenseFFN."""
  blocks = getattr(model, "blocks", None)
  if blocks is None:
    raise ValueError(f"upcycle needs a model with `blocks` (a list of "
                     f"transformer blocks with an `ffn`), got "
                     f"{type(model).__name__}")
  return [(i, b) for i, b in enumerate(blocks)
          if isinstance(getattr(b, "ffn", None), ffn_lib.DenseFFN)]


def upcycle(dense_model, *, moe, layers=None, drop_ratio=0.0, seed=0,
            rngs):
  """A new MoE model: `dense_model` with its block FFNs turned into experts.

  Args:
    dense_model: a model with `blocks[i].ffn` DenseFFN modules (DecoderLM,
      ViTClassifier); it is not modified.
    moe: the build_moe config of the new layers, e.g. {'router': {'name':
      'token_choice', 'k': 2, 'renormalize': True}, 'engine': {'name':
      'dropless'}, 'experts': {'num_experts': 8}}; experts.hidden_dim and
      activation default to the dense FFN's.
    layers: block indices to upcycle (default: every block with a dense FFN).
    drop_ratio, seed: Drop-Upcycling (see upcycle_params).
    rngs: nnx.Rngs for the new routers (and any part not in the dense model).
  Returns:
    The MoE model (a copy; its `moe_layers` lists the upcycled blocks).
  """
  candidates = dict(_block_ffns(dense_model))
  if layers is None:
    layers = sorted(candidates)
  bad = [i for i in layers if i not in candidates]
  if bad or not layers:
    raise ValueError(f"layers {list(layers)}: blocks {bad or '[]'} have no "
                     f"dense FFN to upcycle; allowed: {sorted(candidates)}")
  model = copy.deepcopy(dense_model)
  for i in layers:
    dense_ffn = model.blocks[i].ffn
    in_MH = dense_ffn.w_in_MH[...]
    model.blocks[i].ffn = build_lib.build_moe(
        build_lib.config_for_layer(moe, i), model_dim=in_MH.shape[0],
        causal=bool(getattr(model.blocks[i].attention, "causal", True)),
        expert_defaults={"hidden_dim": in_MH.shape[1],
                         "activation": dense_ffn.activation},
        dtype=dense_ffn.dtype, param_dtype=in_MH.dtype, rngs=rngs)
    model.blocks[i].is_moe = True
  # A stored list (DecoderLM) is updated; a computed one (HFDecoder's
  # property over the blocks' is_moe) follows by itself.
  if "moe_layers" in vars(model):
    model.moe_layers = tuple(sorted(set(model.moe_layers) | set(layers)))
  upcycle_params(model, dense_model, drop_ratio=drop_ratio, seed=seed)
  return model
