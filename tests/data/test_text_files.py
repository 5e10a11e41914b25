"""A directory of the user's text files as an LM dataset (text_files)."""

import os

import numpy as np
import pytest

from moejax import data as mdata
from moejax.data import text_files
from moejax.data import tokenizer as tok_lib

FIXTURE_TOKENIZER = os.path.join(os.path.dirname(__file__), os.pardir,
                                 "models", "fixtures", "tokenizer.json")


@pytest.fixture
def text_dir(tmp_path):
  # 6 documents (4 suffixes), a skipped suffix, an empty file, a hidden dir.
  for i in range(3):
    (tmp_path / f"notes{i}.txt").write_text(f"def f{i}(x):\n  return x\n" * 30)
  (tmp_path / "README.md").write_text("# title\n\nsome text\n" * 40)
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "a.rst").write_text("A section\n=========\n" * 40)
  (tmp_path / "sub" / "b.py").write_text("import os\n" * 80)
  (tmp_path / "data.bin").write_bytes(b"\x00\x01" * 100)
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / ".git").mkdir()
  (tmp_path / ".git" / "x.txt").write_text("hidden\n")
  return tmp_path


def test_files_are_listed_and_split_by_path(text_dir):
  files = text_files.list_text_files(text_dir)
  assert [f for f, _ in files] == ["README.md", "notes0.txt", "notes1.txt",
                                   "notes2.txt", "sub/a.rst", "sub/b.py"]
  train = text_files.TextFilesSource(text_dir, "train",
                                     validation_fraction=0.3)
  val = text_files.TextFilesSource(text_dir, "validation",
                                   validation_fraction=0.3)
  assert len(train) + len(val) == 6 and len(val) >= 1
  assert not set(train.files) & set(val.files)
  assert train.num_tokens == sum(size + 1 for _, size in train.files)


def test_tokenized_batches_from_the_users_files(text_dir):
  tok = tok_lib.HFTokenizer(FIXTURE_TOKENIZER)
  ds = mdata.make_lm_dataset(dataset="text_files", source_dir=str(text_dir),
                             seq_len=16, global_batch_size=2, shuffle=False,
                             num_epochs=1, tokenizer=tok,
                             validation_fraction=0.3, process_index=0,
                             process_count=1)
  batches = list(ds)
  assert batches and batches[0]["inputs"].shape == (2, 16)
  ids = np.concatenate([b["inputs"].reshape(-1) for b in batches])
  assert ids.max() < 128 and (ids == tok.eos_id).any()


def test_errors_name_the_directory(tmp_path):
  with pytest.raises(ValueError, match="needs source_dir, a directory of "
                     "text files; got source_dir=None"):
    text_files.list_text_files(None)
  (tmp_path / "one.txt").write_text("x")
  with pytest.raises(ValueError, match=r"holds 1 non-empty file\(s\)"):
    text_files.list_text_files(tmp_path)
