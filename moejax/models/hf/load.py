"""from_pretrained: a HF checkpoint directory (config.json + safetensors) ->
an HFDecoder with the checkpoint's weights.

The model is first built abstractly (nnx.eval_shape: no parameter memory);
then each checkpoint tensor is read on its own (safetensors memory-maps the
file), laid out (mapping.py), cast, and put on its device or mesh sharding
before the next one is read, so the host never holds the model twice.
"""

import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from moejax.layers import build as build_lib
from moejax.models.hf import config as config_lib
from moejax.models.hf import decoder as decoder_lib
from moejax.models.hf import mapping
from moejax.sharding import rules as sharding_rules


class CheckpointError(ValueError):
  """A checkpoint tensor is missing, unexpected or mis-shaped."""


def read_config(path):
  """The config.json dict of a checkpoint directory."""
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


def checkpoint_files(path):
  """{tensor name: safetensors file} of a directory: one model.safetensors,
  or the shards that model.safetensors.index.json names."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {k: os.path.join(path, v) for k, v in weight_map.items()}
  single = os.path.join(path, "model.safetensors")
  if not os.path.exists(single):
    raise CheckpointError(f"{path} has neither model.safetensors nor "
                          f"model.safetensors.index.json")
  with safe_open(single, "np") as f:
    return {k: single for k in f.keys()}


def variable_at(model, path):
  """The nnx.Variable at a dotted path ('blocks.0.attention.w_q_MND')."""
  obj = model
  for part in path.split("."):
    obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
  if not isinstance(obj, nnx.Variable):
    raise CheckpointError(f"{path} is not a variable of the model (got "
                          f"{type(obj).__name__})")
  return obj


def _sharding(variable, mesh):
  if mesh is None:
    return jax.devices()[0]
  return jax.sharding.NamedSharding(
      mesh, sharding_rules.variable_spec(variable, mesh=mesh))


def architecture(path, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 wrappers=None):
  """The HFDecoder that path's config.json describes, freshly initialised
  (no weights read): the trainer builds it, then fills it from the
  checkpoint (moejax.train.init_from). `wrappers` ({name: options} of
  moejax.layers.build.WRAPPERS, e.g. {'lora_experts': {'rank': 8}}) are
  applied to it as DecoderLM applies them (config.model.wrappers)."""
  spec = config_lib.parse_config(read_config(path))
  model = decoder_lib.HFDecoder(spec, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)
  if wrappers:
    build_lib.apply_wrappers(model, wrappers, rngs=rngs)
  return model


def from_pretrained(path, *, dtype=None, mesh=None):
  """Loads a HF MoE checkpoint (see moejax.models.hf.config.FAMILIES).

  Args:
    path: directory with config.json and model.safetensors (or sharded
      model-*.safetensors with model.safetensors.index.json).
    dtype: parameter and compute dtype (e.g. jnp.bfloat16); None = float32.
      Routers, norms' math and softmaxes stay float32.
    mesh: a jax.sharding.Mesh to place each tensor on by its logical axis
      names, or None for the default device.
  Returns:
    HFDecoder; `logits_BLV, aux = model(ids_BL, padding_mask_BL=mask)`.
  Raises:
    UnsupportedConfig naming a config field; CheckpointError naming a
    missing, unexpected or mis-shaped tensor.
  """
  spec = config_lib.parse_config(read_config(path))
  dtype = jnp.dtype(dtype or jnp.float32)
  model = nnx.eval_shape(lambda: decoder_lib.HFDecoder(
      spec, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
  files = checkpoint_files(path)
  entries = mapping.tensor_map(spec)
  wanted = {n for e in entries for n in e.hf_names}
  missing = [n for n in sorted(wanted) if n not in files]
  if missing:
    raise CheckpointError(f"checkpoint {path} lacks tensor {missing[0]!r}"
                          + (f" (and {len(missing) - 1} more)"
                             if len(missing) > 1 else ""))
  unexpected = sorted(n for n in set(files) - wanted
                      if not _is_mtp(spec, n))
  if unexpected:
    raise CheckpointError(f"checkpoint {path} has unexpected tensor "
                          f"{unexpected[0]!r}" + (
                              f" (and {len(unexpected) - 1} more)"
                              if len(unexpected) > 1 else "")
                          + f"; moejax's {spec.model_type} has no place "
                          f"for it")
  for entry in entries:
    arrays = _LazyTensors(entry.hf_names, files)
    _check_shapes(entry, arrays, model)
    values = entry.to_jax(arrays)
    for p, value in zip(entry.paths, values):
      var = variable_at(model, p)
      if tuple(value.shape) != tuple(var.shape):
        raise CheckpointError(
            f"tensor {entry.hf_names[0]!r} lays out to {tuple(value.shape)},"
            f" which does not fit {p} {tuple(var.shape)} of this config")
      # The abstract model holds each variable's dtype (routers and sinks
      # stay float32 whatever `dtype` is).
      var.value = jax.device_put(
          np.asarray(value).astype(var.dtype, copy=False),
          _sharding(var, mesh))
    del values
  _fill_unmapped(model, mesh)
  return model


def _is_mtp(spec, name):
  """DeepSeek-V3's and GLM-4-MoE's multi-token-prediction layers follow the
  decoder's
  (model.layers.{L + i}); a forward pass does not use them and transformers
  skips them too."""
  extra = (spec.hf.get("num_nextn_predict_layers")
           or spec.hf.get("num_mtp_layers") or 0)
  if spec.model_type not in ("deepseek_v3", "glm4_moe") or not extra:
    return False
  parts = name.split(".")
  return (len(parts) > 2 and parts[:2] == ["model", "layers"]
          and parts[2].isdigit()
          and spec.num_layers <= int(parts[2]) < spec.num_layers + extra)


def _fill_unmapped(model, mesh):
  """Variables that no checkpoint tensor fills: state a family's checkpoint
  does not carry (DeepSeek-V2's zero selection bias, RouterBias) starts at
  zero; an unfilled nnx.Param is a gap in mapping.py and an error."""
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Variable) or not isinstance(
        var.value, jax.ShapeDtypeStruct):
      continue
    name = ".".join(str(p) for p in path)
    if isinstance(var, nnx.Param):
      raise CheckpointError(f"no checkpoint tensor maps to parameter {name}")
    var.value = jax.device_put(np.zeros(var.shape, var.dtype),
                               _sharding(var, mesh))


class _LazyTensors:
  """The checkpoint tensors of one entry, read only when indexed.

  Shapes come from the safetensors headers; each read opens a short-lived
  memory map (one held open for the whole load would keep every page read
  so far resident), so stacking E experts holds one expert beside the stack.
  """

  def __init__(self, names, files):
    self.names, self.files = list(names), files
    self.shapes = []
    for name in self.names:
      with safe_open(files[name], "np") as f:
        self.shapes.append(tuple(f.get_slice(name).get_shape()))

  def __len__(self):
    return len(self.names)

  def __getitem__(self, i):
    name = self.names[i]
    with safe_open(self.files[name], "np") as f:
      return f.get_tensor(name)


def _check_shapes(entry, arrays, model):
  """Names a checkpoint tensor whose shape is not the one this config's
  model needs (found by laying zero-stride stand-ins of the variables out
  as transformers does), before any reshape could hide it."""
  stand_ins = [np.broadcast_to(np.zeros((), np.float32),
                               variable_at(model, p).shape)
               for p in entry.paths]
  expected = [tuple(x.shape) for x in entry.to_hf(stand_ins)]
  for name, shape, want in zip(entry.hf_names, arrays.shapes, expected):
    if shape != want:
      raise CheckpointError(f"tensor {name!r} has shape {shape}; this "
                            f"config needs {want}")
