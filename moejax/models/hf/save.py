"""save_pretrained: an HFDecoder -> config.json + model.safetensors that
transformers reads (the inverse of from_pretrained's layouts)."""

import json
import os

import jax
import numpy as np
from safetensors.numpy import save_file

from moejax.models.hf import load as load_lib
from moejax.models.hf import mapping


def save_pretrained(model, path):
  """Writes `model` (from from_pretrained) as a HF checkpoint directory.

  Args:
    model: an HFDecoder.
    path: directory (created if needed); config.json and model.safetensors
      are written there, in the parameters' dtype.
  Returns:
    path.
  """
  spec = model.spec
  os.makedirs(path, exist_ok=True)
  tensors = {}
  for entry in mapping.tensor_map(spec):
    arrays = [np.asarray(jax.device_get(
        load_lib.variable_at(model, p).value)) for p in entry.paths]
    for name, value in zip(entry.hf_names, entry.to_hf(arrays)):
      tensors[name] = np.ascontiguousarray(value)
  save_file(tensors, os.path.join(path, "model.safetensors"),
            metadata={"format": "pt"})
  config = dict(spec.hf)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return path
