"""sklearn_digits builder and make_image_dataset."""

import json
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from moejax import data as mdata
from moejax.data import common


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_builder_split_is_deterministic_and_complete(data_dir, digits_builder,
                                                     tmp_path):
  sources = tfds.data_source("sklearn_digits", data_dir=data_dir,
                             download=False)
  index = {s: sorted(int(sources[s][i]["index"])
                     for i in range(len(sources[s])))
           for s in ("train", "test")}
  assert not set(index["train"]) & set(index["test"])
  assert sorted(index["train"] + index["test"]) == list(range(1797))
  assert 0.07 < len(index["test"]) / 1797 < 0.13
  for i in index["test"]:  # By a stable hash of the row index.
    assert common.unit_hash(str(i), "sklearn_digits/split") < 0.1
  example = sources["test"][0]
  assert example["image"].shape == (8, 8, 1)
  assert example["image"].dtype == np.uint8 and example["image"].max() <= 16
  assert 0 <= example["label"] < 10
  assert digits_builder.info.metadata["max_pixel_value"] == 16
  assert "tensorflow" not in sys.modules


def test_image_batches(data_dir, digits_builder):
  del digits_builder
  ds = mdata.make_image_dataset(global_batch_size=16, data_dir=data_dir,
                                process_index=0, process_count=1)
  batch = next(iter(ds))
  assert batch["image"].shape == (16, 8, 8, 1)
  assert batch["image"].dtype == np.float32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["image"].max() == 1.0
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert set(batch["label"]) <= set(range(10))


def test_one_epoch_unshuffled_is_the_split_in_order(data_dir, digits_builder):
  del digits_builder
  source = tfds.data_source("sklearn_digits", split="test", data_dir=data_dir,
                            download=False)
  ds = mdata.make_image_dataset(global_batch_size=10, split="test",
                                shuffle=False, num_epochs=1, data_dir=data_dir,
                                process_index=0, process_count=1)
  labels = np.concatenate([b["label"] for b in ds])
  assert len(labels) == len(source) // 10 * 10  # Remainder dropped.
  np.testing.assert_array_equal(
      labels, [source[i]["label"] for i in range(len(labels))])


def test_determinism_and_state_round_trip(data_dir, digits_builder):
  del digits_builder

  def make(seed):
    return mdata.make_image_dataset(global_batch_size=32, seed=seed,
                                    data_dir=data_dir, process_index=0,
                                    process_count=1)

  _assert_same(_take(iter(make(5)), 3), _take(iter(make(5)), 3))
  with pytest.raises(AssertionError):
    _assert_same(_take(iter(make(5)), 3), _take(iter(make(6)), 3))
  it = iter(make(5))
  _take(it, 60)  # Past the end of the first epoch (1609 // 32 = 50 batches).
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 4)
  resumed = iter(make(5))
  resumed.set_state(state)
  _assert_same(expected, _take(resumed, 4))


def test_process_shards_are_disjoint_and_equal_sized(data_dir,
                                                     digits_builder):
  del digits_builder
  n = len(tfds.data_source("sklearn_digits", split="train", data_dir=data_dir,
                           download=False))
  intervals = [common.shard_indices(n, p, 4, drop_remainder=True)
               for p in range(4)]
  sizes = {end - start for start, end in intervals}
  assert len(sizes) == 1  # Same number of batches on every process.
  for (_, end), (start, _) in zip(intervals, intervals[1:]):
    assert end <= start  # Disjoint.
  counts = []
  for p in range(4):
    ds = mdata.make_image_dataset(global_batch_size=8, num_epochs=1,
                                  data_dir=data_dir, process_index=p,
                                  process_count=4)
    batches = list(ds)
    assert batches[0]["image"].shape == (2, 8, 8, 1)
    counts.append(len(batches))
  assert len(set(counts)) == 1


def test_errors(data_dir, digits_builder, tmp_path):
  del digits_builder
  with pytest.raises(ValueError, match="global_batch_size=6 is not divisible"
                     " by process_count=4"):
    mdata.make_image_dataset(global_batch_size=6, data_dir=data_dir,
                             process_index=0, process_count=4)
  with pytest.raises(ValueError, match=r"Unknown dataset 'no_such_images_xyz'"
                     r".*'sklearn_digits'"):
    mdata.make_image_dataset(dataset="no_such_images_xyz", global_batch_size=2,
                             data_dir=data_dir, process_index=0,
                             process_count=1)
  with pytest.raises(ValueError, match="split='validation'.*'test', 'train'"):
    mdata.make_image_dataset(split="validation", global_batch_size=2,
                             data_dir=data_dir, process_index=0,
                             process_count=1)
  with pytest.raises(ValueError, match="text dataset"):
    mdata.make_image_dataset(dataset="stdlib_bytes", global_batch_size=2,
                             data_dir=data_dir, process_index=0,
                             process_count=1)
  with pytest.raises(ValueError, match="'mnist' is not prepared"):
    mdata.make_image_dataset(dataset="mnist", global_batch_size=2,
                             data_dir=tmp_path, process_index=0,
                             process_count=1)
  with pytest.raises(ValueError, match="fewer than its batch"):
    mdata.make_image_dataset(global_batch_size=512, split="test",
                             data_dir=data_dir, process_index=0,
                             process_count=1)
