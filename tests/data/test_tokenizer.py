"""Tokenizers (moejax.data.tokenizer) and the tokenized LM pipeline."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest

from moejax import data as mdata
from moejax.data import tokenizer as tok_lib

FIXTURE = os.path.join(os.path.dirname(__file__), os.pardir, "models",
                       "fixtures", "tokenizer.json")
TEXT = "def main():\n    return [1, 2]  # done\n"


def test_byte_tokenizer_round_trip():
  tok = tok_lib.ByteTokenizer()
  ids = tok.encode("é!")  # two UTF-8 bytes, then '!'
  np.testing.assert_array_equal(ids, [0xC3, 0xA9, 0x21])
  assert ids.dtype == np.int32
  assert tok.decode(list(ids) + [tok.eos_id]) == "é!"


def test_hf_tokenizer_round_trip_and_specials():
  tok = tok_lib.HFTokenizer(FIXTURE)
  assert (tok.vocab_size, tok.eos_id) == (128, 2)  # </s> of the fixture
  ids = tok.encode(TEXT)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert ids.max() < 128 and 2 not in ids
  assert tok.decode(ids) == TEXT
  # Pickles by path (grain worker processes).
  again = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(again.encode(TEXT), ids)


def test_load_tokenizer_from_a_checkpoint_dir_reads_eos_from_config(tmp_path):
  shutil.copy(FIXTURE, tmp_path / "tokenizer.json")
  (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 3}))
  assert tok_lib.load_tokenizer(str(tmp_path)).eos_id == 3
  assert isinstance(tok_lib.load_tokenizer("bytes"), tok_lib.ByteTokenizer)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="holds no tokenizer.json"):
    tok_lib.load_tokenizer(str(empty))
  with pytest.raises(ValueError, match=r"eos_id=500 is outside the "
                     r"tokenizer's vocabulary \[0, 128\)"):
    tok_lib.HFTokenizer(FIXTURE, eos_id=500)


def test_the_embedded_corpus_tokenized_with_a_model_tokenizer(lm_kwargs):
  tok = tok_lib.HFTokenizer(FIXTURE)
  ds = mdata.make_lm_dataset(seq_len=32, global_batch_size=4, shuffle=False,
                             num_epochs=1, tokenizer=tok, **lm_kwargs)
  batch = next(iter(ds))
  assert batch["inputs"].shape == (4, 32)
  np.testing.assert_array_equal(batch["inputs"][:, 1:],
                                batch["targets"][:, :-1])
  assert 0 <= batch["inputs"].min() and batch["inputs"].max() < 128
  # Unshuffled, the first window is the first document's ids.
  bytes_ds = mdata.make_lm_dataset(seq_len=4096, global_batch_size=1,
                                   shuffle=False, num_epochs=1, **lm_kwargs)
  first_doc = next(iter(bytes_ds))["inputs"][0]
  end = int(np.argmax(first_doc == 256))  # the byte pipeline's EOS
  text = bytes(first_doc[:end].astype(np.uint8)).decode("utf-8")
  want = tok.encode(text)[:32]
  np.testing.assert_array_equal(batch["inputs"][0][:len(want)], want)
  # Documents end with the tokenizer's EOS.
  all_ids = np.concatenate([b["inputs"].reshape(-1) for b in ds])
  assert (all_ids == tok.eos_id).sum() >= 1
