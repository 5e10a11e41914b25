"""A fresh data build says one line per dataset and nothing else: no TFDS
progress bars, "Downloading and preparing", dataset_info warnings or
"Using custom data configuration" lines (issue 17).

The build runs in a fresh interpreter, as `make run` does, with absl's
logging at its defaults, so every line TFDS would print reaches the pipes.
"""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

_SCRIPT = textwrap.dedent("""
    import sys
    from absl import logging
    logging.set_verbosity(logging.INFO)  # what --verbosity=0 shows
    from moejax import data
    data_dir = sys.argv[1]
    for _ in range(2):  # the second time: built already, so silent
      data.prepare_stdlib_bytes(data_dir, max_files=6)
      data.prepare_sklearn_digits(data_dir)
      for split in ("train", "validation"):
        ds = data.make_lm_dataset(seq_len=16, global_batch_size=2,
                                  data_dir=data_dir, max_files=6, split=split,
                                  process_index=0, process_count=1)
        next(iter(ds))
      ds = data.make_image_dataset(global_batch_size=2, data_dir=data_dir,
                                   process_index=0, process_count=1)
      next(iter(ds))
    print("done")
    """)


def test_a_fresh_build_prints_one_line_per_dataset(tmp_path):
  data_dir = tmp_path / "data"
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(data_dir)],
                        env=env, capture_output=True, text=True, timeout=300,
                        cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  from moejax import data  # pylint: disable=g-import-not-at-top
  config = data.stdlib_bytes_config(None, 6)
  corpus_dir = data_dir / "stdlib_bytes" / config.name / "1.0.0"
  assert proc.stdout.splitlines() == [
      f"building the stdlib corpus into {corpus_dir} (6 files)",
      f"building the sklearn digits into {data_dir}/sklearn_digits/1.0.0 "
      "(1797 images)",
      "done"]
  # Nothing from TFDS on stderr, even with absl at INFO; other libraries'
  # lines (none expected here) would be allowed.
  assert "tensorflow_datasets" not in proc.stderr
  for chatter in ("Downloading and preparing", "Using custom data",
                  "dataset_info", "Generating", "Shuffling", "\r", "\x1b"):
    assert chatter not in proc.stdout + proc.stderr, proc.stderr[-3000:]


def test_quiet_tfds_restores_what_it_changes():
  import logging  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  from moejax.data import common  # pylint: disable=g-import-not-at-top
  absl_logger = logging.getLogger("absl")
  filters, bars = list(absl_logger.filters), tqdm_utils._active  # pylint: disable=protected-access
  stdout = sys.stdout
  with common.quiet_tfds():
    assert not tqdm_utils._active  # pylint: disable=protected-access
    print("held back")
  assert sys.stdout is stdout
  assert absl_logger.filters == filters
  assert tqdm_utils._active == bars  # pylint: disable=protected-access


def test_digits_without_scikit_learn_names_the_extra(tmp_path, monkeypatch):
  import pytest  # pylint: disable=g-import-not-at-top
  from moejax import data  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, "sklearn", None)  # as if not installed
  with pytest.raises(ImportError, match=r"pip install 'moejax\[digits\]'"):
    data.prepare_sklearn_digits(str(tmp_path / "data"))
  assert not (tmp_path / "data" / "sklearn_digits" / "1.0.0").exists()
