"""make_lm_dataset: packing, determinism, checkpoint state, sharding, errors."""

import itertools
import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from moejax import data as mdata
from moejax.data import common

L = 32  # seq_len used throughout: (B, L) batches.


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def _stream(source, start, end):
  """The packed token stream of records [start, end): bytes + EOS each."""
  return np.concatenate([
      np.append(source[i]["text"].astype(np.int32), mdata.EOS_ID)
      for i in range(start, end)])


def _source(lm_kwargs, subset_builder, split):
  return tfds.data_source(
      "stdlib_bytes", split=split, data_dir=lm_kwargs["data_dir"],
      download=False, builder_kwargs={"config": subset_builder.builder_config})


def test_batch_shapes_dtypes_and_shifted_targets(lm_kwargs):
  # process_index/process_count default to jax's (0 of 1 here).
  ds = mdata.make_lm_dataset(seq_len=L, global_batch_size=4, **lm_kwargs)
  for batch in _take(iter(ds), 3):
    assert set(batch) == {"inputs", "targets"}
    for k in batch:
      assert batch[k].shape == (4, L) and batch[k].dtype == np.int32
      assert batch[k].min() >= 0 and batch[k].max() < mdata.VOCAB_SIZE
    np.testing.assert_array_equal(batch["inputs"][:, 1:],
                                  batch["targets"][:, :-1])


def test_unshuffled_windows_are_the_packed_document_stream(lm_kwargs,
                                                           subset_builder):
  ds = mdata.make_lm_dataset(
      seq_len=L, global_batch_size=2, split="validation", shuffle=False,
      num_epochs=1, process_index=0, process_count=1, **lm_kwargs)
  windows = [np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
             for b in ds]  # (2, L + 1) each: the windows, in order.
  got = np.concatenate(windows).reshape(-1)
  source = _source(lm_kwargs, subset_builder, "validation")
  expected = _stream(source, 0, len(source))
  # Non-overlapping windows of L + 1; the remainder (< one batch) is dropped.
  assert len(expected) - 2 * (L + 1) < len(got) <= len(expected)
  np.testing.assert_array_equal(got, expected[:len(got)])
  assert (got == mdata.EOS_ID).sum() >= 1


def test_same_seed_same_batches_other_seed_other_batches(lm_kwargs):
  def first(seed):
    ds = mdata.make_lm_dataset(seq_len=L, global_batch_size=4, seed=seed,
                               process_index=0, process_count=1, **lm_kwargs)
    return _take(iter(ds), 4)

  _assert_same(first(7), first(7))
  with pytest.raises(AssertionError):
    _assert_same(first(7), first(8))


@pytest.mark.parametrize("skip", [0, 1, 5, 13])
def test_iterator_state_round_trip(lm_kwargs, skip):
  # A small shuffle buffer (8 windows) so the states cross buffer refills,
  # documents and epoch boundaries (num_epochs=None repeats forever).
  ds = mdata.make_lm_dataset(seq_len=L, global_batch_size=3, seed=3,
                             shuffle_buffer_size=8, process_index=0,
                             process_count=1, **lm_kwargs)
  it = iter(ds)
  _take(it, skip)
  state = json.loads(json.dumps(it.get_state()))  # As a checkpoint stores it.
  expected = _take(it, 6)
  resumed = iter(ds)
  resumed.set_state(state)
  _assert_same(expected, _take(resumed, 6))


def test_state_round_trip_to_the_end_of_a_finite_dataset(lm_kwargs):
  ds = mdata.make_lm_dataset(seq_len=8 * L, global_batch_size=2, seed=1,
                             split="validation", num_epochs=2,
                             shuffle_buffer_size=16, process_index=0,
                             process_count=1, **lm_kwargs)
  it = iter(ds)
  _take(it, 10)
  state = it.get_state()
  rest = list(it)
  resumed = iter(ds)
  resumed.set_state(state)
  _assert_same(rest, list(resumed))
  assert rest


def test_process_shards_are_disjoint_and_cover_the_split(lm_kwargs,
                                                         subset_builder):
  source = _source(lm_kwargs, subset_builder, "train")
  n = len(source)
  count = 3
  intervals = [common.shard_indices(n, p, count, drop_remainder=False)
               for p in range(count)]
  covered = list(itertools.chain.from_iterable(range(*iv) for iv in intervals))
  assert covered == list(range(n))  # Disjoint, in order, nothing dropped.
  for p, (start, end) in enumerate(intervals):
    ds = mdata.make_lm_dataset(
        seq_len=L, global_batch_size=6, shuffle=False, num_epochs=1,
        process_index=p, process_count=count, **lm_kwargs)
    batch = next(iter(ds))
    assert batch["inputs"].shape == (2, L)  # 6 // 3 per process.
    window = np.concatenate([batch["inputs"][0], batch["targets"][0, -1:]])
    # Process p reads its own documents and only those.
    np.testing.assert_array_equal(window, _stream(source, start, end)[:L + 1])


def test_shuffled_shards_differ_between_processes(lm_kwargs):
  firsts = [
      next(iter(mdata.make_lm_dataset(
          seq_len=L, global_batch_size=4, process_index=p, process_count=2,
          **lm_kwargs)))["inputs"]
      for p in range(2)]
  assert not np.array_equal(firsts[0], firsts[1])


def test_make_global_batch_on_an_8_device_mesh(lm_kwargs):
  mesh = jax.make_mesh((8,), ("data",))
  sharding = mdata.batch_sharding(mesh, "data")
  ds = mdata.make_lm_dataset(seq_len=L, global_batch_size=16, process_index=0,
                             process_count=1, **lm_kwargs)
  host = next(iter(ds))
  arrays = mdata.make_global_batch(host, sharding)
  for k in host:
    assert arrays[k].shape == (16, L) and arrays[k].dtype == np.int32
    assert arrays[k].sharding == sharding
    assert [s.data.shape for s in arrays[k].addressable_shards] == [(2, L)] * 8
    np.testing.assert_array_equal(np.asarray(arrays[k]), host[k])
  with pytest.raises(ValueError, match="not in the mesh axes"):
    mdata.batch_sharding(mesh, "model")
  with pytest.raises(ValueError, match="not divisible"):
    mdata.make_global_batch({"x": np.zeros((6, 2))}, sharding)


def test_seq_len_larger_than_the_data(lm_kwargs, subset_builder):
  tokens = subset_builder.info.metadata["num_tokens"]["validation"]
  with pytest.raises(ValueError, match=rf"seq_len={tokens} is larger than the "
                     rf"data.*holds {tokens} tokens"):
    mdata.make_lm_dataset(seq_len=tokens, global_batch_size=1,
                          split="validation", process_index=0,
                          process_count=1, **lm_kwargs)
  # One process's shard can still be too small: caught on the first next().
  ds = mdata.make_lm_dataset(seq_len=tokens - 1, global_batch_size=2,
                             split="validation", num_epochs=1,
                             process_index=1, process_count=2, **lm_kwargs)
  with pytest.raises(ValueError, match="fewer than seq_len"):
    next(iter(ds))


def test_batch_not_divisible_by_process_count(lm_kwargs):
  with pytest.raises(ValueError, match=r"global_batch_size=5 is not divisible "
                     r"by process_count=2"):
    mdata.make_lm_dataset(seq_len=L, global_batch_size=5, process_index=0,
                          process_count=2, **lm_kwargs)
  with pytest.raises(ValueError, match="process_index=2"):
    mdata.make_lm_dataset(seq_len=L, global_batch_size=4, process_index=2,
                          process_count=2, **lm_kwargs)


def test_unknown_dataset_and_split(lm_kwargs):
  with pytest.raises(ValueError, match=r"Unknown dataset 'no_such_corpus_xyz'"
                     r".*'stdlib_bytes'.*TFDS"):
    mdata.make_lm_dataset(dataset="no_such_corpus_xyz", seq_len=L,
                          global_batch_size=1, process_index=0,
                          process_count=1, data_dir=lm_kwargs["data_dir"])
  with pytest.raises(ValueError, match="split='test'.*'train', 'validation'"):
    mdata.make_lm_dataset(split="test", seq_len=L, global_batch_size=1,
                          process_index=0, process_count=1, **lm_kwargs)
  with pytest.raises(ValueError, match="image dataset"):
    mdata.make_lm_dataset(dataset="sklearn_digits", seq_len=L,
                          global_batch_size=1, process_index=0,
                          process_count=1, data_dir=lm_kwargs["data_dir"])


def test_tfds_dataset_not_prepared_is_not_downloaded(tmp_path):
  # A registered TFDS name is accepted, but never downloaded unless asked.
  with pytest.raises(ValueError, match="'tiny_shakespeare' is not prepared.*"
                     "download=True"):
    mdata.make_lm_dataset(dataset="tiny_shakespeare", seq_len=L,
                          global_batch_size=1, process_index=0,
                          process_count=1, data_dir=tmp_path)


def test_grain_checkpoint_handler_round_trip(lm_kwargs, tmp_path):
  # What orbax does with grain's handler: JSON state per process.
  import grain  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top

  ds = mdata.make_lm_dataset(seq_len=L, global_batch_size=2, seed=4,
                             shuffle_buffer_size=8, process_index=0,
                             process_count=1, **lm_kwargs)
  it = iter(ds)
  _take(it, 7)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), it)
  expected = _take(it, 5)
  restored = handler.restore(epath.Path(tmp_path), iter(ds))
  _assert_same(expected, _take(restored, 5))
