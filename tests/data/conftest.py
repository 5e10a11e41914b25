"""Shared fixtures: small datasets built once per session in tmp dirs."""

import pytest

from moejax import data as mdata

# A small, deterministic subset of the real stdlib corpus; a large validation
# fraction so both splits hold several files.
SUBSET_FILES = 24
SUBSET_VAL_FRACTION = 0.25


@pytest.fixture(scope="session")
def subset():
  """The subset's selection arguments (max_files, validation_fraction)."""
  return dict(max_files=SUBSET_FILES, validation_fraction=SUBSET_VAL_FRACTION)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds_data"))


@pytest.fixture(scope="session")
def subset_builder(data_dir):
  return mdata.prepare_stdlib_bytes(
      data_dir, max_files=SUBSET_FILES, validation_fraction=SUBSET_VAL_FRACTION)


@pytest.fixture(scope="session")
def lm_kwargs(data_dir, subset_builder):
  del subset_builder  # Built once; the loaders reuse it.
  return dict(data_dir=data_dir, max_files=SUBSET_FILES,
              validation_fraction=SUBSET_VAL_FRACTION)


@pytest.fixture(scope="session")
def digits_builder(data_dir):
  return mdata.prepare_sklearn_digits(data_dir)
