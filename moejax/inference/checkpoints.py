"""One loader for the apps: a pretrained directory or a training workdir.

`load_checkpoint(path)` returns (model, tokenizer):
  * a directory with model.safetensors (or its sharded index) is a
    pretrained checkpoint: moejax.models.from_pretrained, and the
    tokenizer.json beside it;
  * otherwise it is a moejax training workdir: moejax.train.load_model
    (the latest step, or `step`), and the byte-level tokenizer its LMs read.
"""

import os

from moejax.data import tokenizer as tokenizer_lib

PRETRAINED_FILES = ("model.safetensors", "model.safetensors.index.json")


def is_pretrained(path):
  """Whether `path` is a pretrained (safetensors) checkpoint directory."""
  return any(os.path.isfile(os.path.join(path, name))
             for name in PRETRAINED_FILES)


def load_checkpoint(path, *, step=None, dtype=None):
  """(model, tokenizer) from a pretrained directory or a training workdir.

  Raises:
    FileNotFoundError: `path` is not a directory, or a pretrained directory
      has no tokenizer.json.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path!r} is not a directory; pass a "
                            f"pretrained checkpoint directory or a training "
                            f"workdir")
  if is_pretrained(path):
    # pylint: disable=g-import-not-at-top
    from moejax.models import from_pretrained
    if step is not None:
      raise ValueError(f"step={step} applies to training workdirs; {path!r} "
                       f"is a pretrained checkpoint")
    model = from_pretrained(path, dtype=dtype)
    return model, tokenizer_lib.load_tokenizer(path)
  from moejax.train import load_model  # pylint: disable=g-import-not-at-top
  return load_model(path, step=step), tokenizer_lib.ByteTokenizer()
