"""Tokenizers: the byte-level default and a model's own tokenizer.json.

A tokenizer here is an object with `encode(text) -> <int32>[N]`,
`decode(ids) -> str`, `vocab_size` and `eos_id`. `ByteTokenizer` is what
moejax's own LMs read (UTF-8 bytes 0..255, EOS = 256); `HFTokenizer` reads a
Hugging Face tokenizer.json with the `tokenizers` package (no transformers),
so a pretrained checkpoint's text pipeline needs no download.

`load_tokenizer(path)` takes a tokenizer.json, or a checkpoint directory
holding one (its config.json's eos_token_id then names the EOS id).
"""

import json
import os

import numpy as np

from moejax.data import corpus


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; `eos_id` = 256 (moejax's own LMs)."""

  vocab_size = corpus.VOCAB_SIZE
  eos_id = corpus.EOS_ID

  def encode(self, text):
    """str or bytes -> <int32>[N]."""
    if isinstance(text, str):
      text = text.encode("utf-8")
    return np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int32)

  def decode(self, ids):
    """ids (ints) -> str; EOS and ids above 255 are dropped."""
    return bytes(int(i) for i in np.asarray(ids).reshape(-1)
                 if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def __repr__(self):
    return "ByteTokenizer()"


class HFTokenizer:
  """A tokenizer.json read with the `tokenizers` package.

  Args:
    path: the tokenizer.json file.
    eos_id: the end-of-document id appended after each document; None reads
      the tokenizer's `</s>`, `<|endoftext|>` or `<eos>` token, if any.
    add_special_tokens: let the tokenizer's post-processor add its BOS/EOS
      when encoding (off by default: the pipeline adds EOS itself).
  """

  def __init__(self, path, *, eos_id=None, add_special_tokens=False):
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError as e:  # pragma: no cover - a dependency of moejax
      raise ImportError("reading tokenizer.json needs the `tokenizers` "
                        "package: pip install tokenizers") from e
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
    self.path = str(path)
    self._tok = tokenizers.Tokenizer.from_file(self.path)
    self.add_special_tokens = bool(add_special_tokens)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    if eos_id is None:
      for name in ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>"):
        eos_id = self._tok.token_to_id(name)
        if eos_id is not None:
          break
    if eos_id is not None and not 0 <= int(eos_id) < self.vocab_size:
      raise ValueError(f"eos_id={eos_id} is outside the tokenizer's "
                       f"vocabulary [0, {self.vocab_size})")
    self.eos_id = None if eos_id is None else int(eos_id)

  def encode(self, text):
    """str or bytes -> <int32>[N]."""
    if isinstance(text, np.ndarray) and text.dtype == object:
      text = text.item()
    if isinstance(text, (bytes, bytearray, np.ndarray)):
      text = bytes(text).decode("utf-8", errors="replace")
    if not isinstance(text, str):
      raise TypeError(f"encode takes str or bytes, got {type(text).__name__}")
    ids = self._tok.encode(text,
                           add_special_tokens=self.add_special_tokens).ids
    return np.asarray(ids, np.int32)

  def decode(self, ids):
    """ids -> str (special tokens skipped)."""
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                            skip_special_tokens=True)

  def __getstate__(self):
    # grain may pickle the pipeline into worker processes.
    return {"path": self.path, "eos_id": self.eos_id,
            "add_special_tokens": self.add_special_tokens}

  def __setstate__(self, state):
    self.__init__(state["path"], eos_id=state["eos_id"],
                  add_special_tokens=state["add_special_tokens"])

  def __repr__(self):
    return f"HFTokenizer({self.path!r}, eos_id={self.eos_id})"


def load_tokenizer(path):
  """A tokenizer from a tokenizer.json, or a checkpoint directory with one.

  'bytes' gives the ByteTokenizer. In a directory, config.json's
  eos_token_id (when an int) is the EOS id.
  """
  if path in (None, "bytes"):
    return ByteTokenizer()
  path = os.fspath(path)
  eos_id = None
  if os.path.isdir(path):
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
      with open(config_path) as f:
        eos = json.load(f).get("eos_token_id")
      eos_id = eos if isinstance(eos, int) else (
          eos[0] if isinstance(eos, list) and eos else None)
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{path!r} holds no tokenizer.json; pass the "
                              f"tokenizer file, or 'bytes'")
    path = file
  return HFTokenizer(path, eos_id=eos_id)
