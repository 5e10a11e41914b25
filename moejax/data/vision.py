"""Grain loader for image classification.

`make_image_dataset` reads a TFDS image dataset (the embedded
`sklearn_digits` by default, or `mnist`, `cifar10`, ... for users with
internet) and yields batches `{'image': <float32>[B, H, W, C] in [0, 1],
'label': <int32>[B]}`. Same shape of pipeline as `make_lm_dataset`: shard by
process (even split, the remainder dropped so every process yields the same
number of batches per epoch), shuffle per epoch, repeat, map, batch with the
remainder dropped. Checkpointable with `get_state()`/`set_state()`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import grain
import numpy as np

from moejax.data import common
from moejax.data import digits
from moejax.data import lm

EMBEDDED_IMAGE_DATASETS = (digits.SKLEARN_DIGITS,)
#: Pixel scale of uint8 images from other TFDS datasets.
UINT8_MAX_PIXEL_VALUE = 255


def _to_float(example: dict[str, Any], image_key: str, label_key: str,
              max_pixel_value: float) -> dict[str, np.ndarray]:
  image = np.asarray(example[image_key])
  if image.ndim == 2:
    image = image[:, :, None]
  return {
      "image": image.astype(np.float32) / np.float32(max_pixel_value),
      "label": np.asarray(example[label_key], dtype=np.int32),
  }


def make_image_dataset(
    *,
    global_batch_size: int,
    dataset: str = digits.SKLEARN_DIGITS,
    split: str = "train",
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    image_key: str = "image",
    label_key: str = "label",
    download: bool = False,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
  """Image classification batches from a TFDS dataset, as a grain IterDataset.

  Each element (one process's share of a global batch):
    `{'image': <float32>[B, H, W, C], 'label': <int32>[B]}` with
    `B = global_batch_size // process_count`; pixels scaled to [0, 1]
    (divided by 16 for sklearn_digits, whose H = W = 8, C = 1; by 255 for
    other datasets' uint8 images).

  Args:
    global_batch_size: examples per step over all processes.
    dataset: `'sklearn_digits'` (embedded, built on first use into
      `data_dir`) or any TFDS image dataset (`'mnist'`, `'cifar10'`, ...),
      read through `tfds.data_source`; it must be prepared in `data_dir` as
      array_record, or pass `download=True` (internet).
    split: `'train'`/`'test'` for sklearn_digits (and mnist, cifar10); TFDS
      slices such as `'train[:90%]'` work.
    seed: seeds the per-epoch shuffle.
    shuffle: shuffle examples (differently every epoch).
    num_epochs: passes over the data; `None` repeats forever.
    process_index, process_count: this process's shard; `None` = jax's.
    data_dir: where datasets are built/read; `None` = `default_data_dir()`.
    image_key, label_key: feature names of a TFDS dataset.
    download: allow TFDS to download/build a non-embedded dataset.
    read_options: grain `ReadOptions`; `None` = `DEFAULT_READ_OPTIONS`
      (2 threads, 32 ahead).

  Raises:
    ValueError: unknown dataset, data_dir not writable, batch size not
      divisible by the process count, bad split or feature names, or a shard
      smaller than one batch.
  """
  process_index, process_count, local_batch = common.resolve_processes(
      global_batch_size, process_index, process_count)
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs={num_epochs} must be >= 1 or None.")
  data_dir = common.resolve_data_dir(data_dir)
  if dataset == digits.SKLEARN_DIGITS:
    builder = digits.prepare_sklearn_digits(data_dir)
    common.check_split(builder, split)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    with common.quiet_tfds():
      source = tfds.data_source(dataset, split=split, data_dir=data_dir,
                                download=False)
    max_pixel_value = builder.info.metadata["max_pixel_value"]
  else:
    if dataset in lm.EMBEDDED_TEXT_DATASETS:
      raise ValueError(
          f"dataset={dataset!r} is a text dataset; image datasets embedded: "
          f"{list(EMBEDDED_IMAGE_DATASETS)} (or any TFDS image dataset).")
    source, builder = common.open_external_source(
        dataset, split, data_dir, download, lm.EMBEDDED_DATASETS)
    features = builder.info.features
    missing = [k for k in (image_key, label_key) if k not in features]
    if missing:
      raise ValueError(
          f"TFDS dataset {dataset!r} has no feature(s) {missing}; its "
          f"features are {sorted(features.keys())}. Set image_key/label_key.")
    max_pixel_value = UINT8_MAX_PIXEL_VALUE

  ds = grain.MapDataset.source(source)
  start, end = common.shard_indices(len(ds), process_index, process_count,
                                    drop_remainder=True)
  if end - start < local_batch:
    raise ValueError(
        f"Split {split!r} of {dataset!r} has {len(ds)} examples: process "
        f"{process_index} of {process_count} gets {end - start}, fewer than "
        f"its batch of {local_batch}.")
  ds = ds[start:end]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.map(functools.partial(
      _to_float, image_key=image_key, label_key=label_key,
      max_pixel_value=max_pixel_value))
  it = ds.to_iter_dataset(read_options or common.DEFAULT_READ_OPTIONS)
  return it.batch(local_batch, drop_remainder=True)
