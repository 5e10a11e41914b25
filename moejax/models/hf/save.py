"""save_pretrained: an HFDecoder -> config.json + safetensors that
transformers reads (the inverse of from_pretrained's layouts)."""

import json
import os

import jax
import numpy as np
from safetensors.numpy import save_file

from moejax.models.hf import load as load_lib
from moejax.models.hf import mapping

DEFAULT_MAX_SHARD_BYTES = 5 * 2 ** 30


def _plan(model, entries):
  """[(entry, [(hf name, nbytes)])] from shapes alone (no data copied)."""
  out = []
  for entry in entries:
    variables = [load_lib.variable_at(model, p) for p in entry.paths]
    stand_ins = [np.broadcast_to(np.zeros((), v.dtype), v.shape)
                 for v in variables]
    sizes = [(name, x.size * x.dtype.itemsize)
             for name, x in zip(entry.hf_names, entry.to_hf(stand_ins))]
    out.append((entry, sizes))
  return out


def save_pretrained(model, path, *, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES):
  """Writes `model` (from from_pretrained) as a HF checkpoint directory.

  Args:
    model: an HFDecoder.
    path: directory (created if needed). Gets config.json and
      model.safetensors, or, past max_shard_bytes, shards
      model-0000i-of-0000n.safetensors with model.safetensors.index.json
      (transformers' names). Tensors keep the parameters' dtype.
    max_shard_bytes: shard size limit; only one shard's tensors are held on
      the host at a time.
  Returns:
    path.
  """
  spec = model.spec
  os.makedirs(path, exist_ok=True)
  # A checkpoint saved here before (other shard count) must not leave files
  # that the loader would read instead (a stale index) or beside ours.
  for old in os.listdir(path):
    if old == "model.safetensors.index.json" or (
        old.startswith("model") and old.endswith(".safetensors")):
      os.remove(os.path.join(path, old))
  shards, current, size = [], [], 0
  for entry, sizes in _plan(model, mapping.tensor_map(spec)):
    nbytes = sum(n for _, n in sizes)
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(entry)
    size += nbytes
  shards.append(current)
  names = (["model.safetensors"] if len(shards) == 1 else [
      f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      for i in range(len(shards))])
  weight_map, total = {}, 0
  for fname, entries in zip(names, shards):
    tensors = {}
    for entry in entries:
      arrays = [np.asarray(jax.device_get(
          load_lib.variable_at(model, p).value)) for p in entry.paths]
      for name, value in zip(entry.hf_names, entry.to_hf(arrays)):
        tensors[name] = np.ascontiguousarray(value)
        weight_map[name] = fname
        total += value.nbytes
    save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
    del tensors
  if len(shards) > 1:
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}, f,
                indent=2)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(dict(spec.hf), f, indent=2, sort_keys=True)
  return path
