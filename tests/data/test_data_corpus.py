"""The stdlib_bytes TFDS builder: file selection, split, build, read, errors."""

import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from moejax import data as mdata
from moejax.data import corpus


def test_corpus_files_exclude_tests_and_site_packages():
  files = mdata.list_corpus_files()
  paths = [p for p, _ in files]
  assert len(files) > 100
  assert paths == sorted(paths)
  assert all(p.endswith(".py") and size > 0 for p, size in files)
  for p in paths:
    parts = p.split("/")
    assert not set(parts[:-1]) & corpus.EXCLUDED_DIRS, p
    assert not parts[-1].startswith("_sysconfigdata_"), p
  assert "os.py" in paths and "json/decoder.py" in paths


def test_subset_is_deterministic_and_part_of_the_corpus():
  full = mdata.list_corpus_files()
  sub = mdata.list_corpus_files(max_files=24)
  assert sub == mdata.list_corpus_files(max_files=24)
  assert len(sub) == 24
  assert set(sub) <= set(full)
  # Spread over the library, not the first files in sorted order.
  assert sub != full[:24]


def test_split_is_deterministic_disjoint_and_by_path_hash():
  files = mdata.list_corpus_files()
  splits = corpus.split_files(files, 0.02)
  assert splits == corpus.split_files(list(reversed(files)), 0.02)
  train = {p for p, _ in splits["train"]}
  val = {p for p, _ in splits["validation"]}
  assert not train & val and train | val == {p for p, _ in files}
  # A file's split depends on its path only (no fallback needed here).
  for p in val:
    assert corpus.unit_hash(p, "stdlib_bytes/split") < 0.02
  for p in train:
    assert corpus.unit_hash(p, "stdlib_bytes/split") >= 0.02
  assert 0.005 < len(val) / len(files) < 0.05


def test_split_never_empty():
  files = [("a.py", 1), ("b.py", 1)]
  for fraction in (1e-9, 0.5, 1 - 1e-9):
    splits = corpus.split_files(files, fraction)
    assert len(splits["train"]) == 1 and len(splits["validation"]) == 1


def test_builds_subset_and_reads_through_tfds_data_source(data_dir, subset,
                                                          subset_builder):
  config = subset_builder.builder_config
  version = ".".join(map(str, sys.version_info[:3]))
  assert config.name == (f"py{version}-max{subset['max_files']}"
                         f"-val{subset['validation_fraction']:g}")
  sources = tfds.data_source("stdlib_bytes", data_dir=data_dir, download=False,
                             builder_kwargs={"config": config})
  files = mdata.list_corpus_files(max_files=subset["max_files"])
  expected = corpus.split_files(files, subset["validation_fraction"])
  root = mdata.stdlib_source_dir()
  meta = subset_builder.info.metadata
  for split in ("train", "validation"):
    source = sources[split]
    assert len(source) == len(expected[split]) == meta["num_files"][split]
    got = {}
    for i in range(len(source)):
      example = source[i]
      assert example["text"].dtype == np.uint8 and example["text"].ndim == 1
      got[example["path"].decode()] = example["text"].tobytes()
    assert sorted(got) == [p for p, _ in expected[split]]
    for path, text in got.items():
      with open(os.path.join(root, path), "rb") as f:
        assert text == f.read()
    assert meta["num_tokens"][split] == sum(s + 1 for _, s in expected[split])
  assert meta["python_version"] == version
  assert meta["file_list_sha256"] == corpus.file_list_sha256(files)
  assert f"Python {meta['python_version']}" in subset_builder.info.description
  assert subset_builder.info.file_format.value == "array_record"
  assert "tensorflow" not in sys.modules  # TF stays optional.


def test_full_stdlib_default_config_builds_via_data_source(tmp_path):
  # The real default corpus, built on first use by tfds.data_source itself.
  sources = tfds.data_source("stdlib_bytes", data_dir=str(tmp_path))
  files = mdata.list_corpus_files()
  assert len(sources["train"]) + len(sources["validation"]) == len(files)
  builder = mdata.prepare_stdlib_bytes(tmp_path)  # Reuses, checks file list.
  assert builder.builder_config.name.startswith("py3.")
  assert builder.info.metadata["num_bytes"]["train"] > 1_000_000
  assert "tensorflow" not in sys.modules


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def test_custom_source_dir_changed_needs_rebuild(tmp_path):
  src = tmp_path / "src"
  _write(src / "a.py", "x = 1\n")
  _write(src / "pkg" / "b.py", "y = 2\n")
  _write(src / "tests" / "test_c.py", "skipped\n")
  _write(src / "notes.txt", "skipped\n")
  out = str(tmp_path / "out")
  builder = mdata.prepare_stdlib_bytes(out, source_dir=src)
  assert sum(builder.info.metadata["num_files"].values()) == 2
  _write(src / "d.py", "z = 3\n")
  with pytest.raises(ValueError, match="rebuild=True"):
    mdata.prepare_stdlib_bytes(out, source_dir=src)
  builder = mdata.prepare_stdlib_bytes(out, source_dir=src, rebuild=True)
  assert sum(builder.info.metadata["num_files"].values()) == 3


def test_empty_corpus_errors(tmp_path):
  empty = tmp_path / "empty"
  _write(empty / "README.txt", "no python here\n")
  _write(empty / "test" / "test_x.py", "excluded\n")
  with pytest.raises(ValueError, match="Empty corpus.*empty"):
    mdata.prepare_stdlib_bytes(tmp_path / "out", source_dir=empty)
  with pytest.raises(ValueError, match="Empty corpus"):
    mdata.make_lm_dataset(seq_len=8, global_batch_size=1, source_dir=empty,
                          data_dir=tmp_path / "out", process_count=1,
                          process_index=0)
  one = tmp_path / "one"
  _write(one / "a.py", "x = 1\n")
  with pytest.raises(ValueError, match="at least 2"):
    mdata.prepare_stdlib_bytes(tmp_path / "out", source_dir=one)
  with pytest.raises(ValueError, match="not a directory"):
    mdata.prepare_stdlib_bytes(tmp_path / "out", source_dir=tmp_path / "nope")


def test_data_dir_not_writable(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  bad = str(blocker / "data")  # A file where a directory is needed.
  with pytest.raises(ValueError, match="not writable"):
    mdata.prepare_stdlib_bytes(bad, max_files=4)
  with pytest.raises(ValueError, match=r"data_dir=.*a_file/data.*not writable"):
    mdata.make_lm_dataset(seq_len=8, global_batch_size=1, data_dir=bad,
                          max_files=4, process_count=1, process_index=0)
  with pytest.raises(ValueError, match="not writable"):
    mdata.make_image_dataset(global_batch_size=1, data_dir=bad,
                             process_count=1, process_index=0)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root can write into read-only directories")
def test_read_only_data_dir(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o500)
  try:
    with pytest.raises(ValueError, match="not writable"):
      mdata.prepare_stdlib_bytes(ro, max_files=4)
  finally:
    ro.chmod(0o700)


def test_bad_config_values():
  with pytest.raises(ValueError, match="max_files=1"):
    mdata.stdlib_bytes_config(max_files=1)
  with pytest.raises(ValueError, match="validation_fraction=0"):
    mdata.stdlib_bytes_config(validation_fraction=0)
