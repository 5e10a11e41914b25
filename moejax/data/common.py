"""Shared helpers of the data package: data dirs, hashing, sharding, sources.

Nothing here holds global state: every function takes what it needs as
arguments. TensorFlow is never imported; TFDS datasets are written as
`array_record` files and read back through `tfds.data_source`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tempfile
from typing import Any, Iterator

import grain
import tensorflow_datasets as tfds

#: The environment variable that overrides the default data dir.
DATA_DIR_ENV = "MOEJAX_DATA_DIR"

#: Read threads and prefetch depth of the loaders when none are passed.
#: Grain's own default (16 threads, 500 elements) costs ~0.7 s before the
#: first batch on a 2-core machine and is no faster afterwards for these
#: datasets; pass `read_options=` (or append `.mp_prefetch`) to scale up.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2,
                                         prefetch_buffer_size=32)


class _DropTfdsChatter(logging.Filter):
  """Drops TFDS's log records below ERROR ("Using custom data
  configuration", "Variant folder ... has no dataset_info.json", INFO)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return (record.levelno >= logging.ERROR
            or f"{os.sep}tensorflow_datasets{os.sep}" not in record.pathname)


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
  """Within: no TFDS progress bars, no TFDS log lines below ERROR, and no
  TFDS prints ("Downloading and preparing dataset ...", "Dataset ...
  downloaded and prepared to ..."). Everything is restored on exit.

  TFDS logs through absl (the Python logger "absl") and prints its
  download messages with termcolor to stdout; only those prints are held
  back: stdout is swapped for a buffer only around TFDS calls made here,
  and the buffer is dropped.
  """
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top

  bars = tqdm_utils._active  # pylint: disable=protected-access
  tqdm_utils.display_progress_bar(False)
  chatter = _DropTfdsChatter()
  loggers = [logging.getLogger("absl")]
  for logger in loggers:
    logger.addFilter(chatter)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    for logger in loggers:
      logger.removeFilter(chatter)
    tqdm_utils.display_progress_bar(bars)


def announce(message: str) -> None:
  """The one line a data build prints (stdout, flushed)."""
  print(message, flush=True)


def default_data_dir() -> str:
  """Where datasets are built and read when no `data_dir` is passed.

  `$MOEJAX_DATA_DIR` if set, else `$TFDS_DATA_DIR` if set, else
  `~/tensorflow_datasets` (the TFDS default), user-expanded.
  """
  path = os.environ.get(DATA_DIR_ENV) or os.environ.get("TFDS_DATA_DIR")
  return os.path.expanduser(path or os.path.join("~", "tensorflow_datasets"))


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> str:
  """`data_dir` as an absolute, user-expanded path (default: `default_data_dir()`)."""
  if data_dir is None:
    return os.path.abspath(default_data_dir())
  return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def ensure_writable_dir(data_dir: str) -> None:
  """Creates `data_dir` if needed and checks a file can be written into it.

  Raises:
    ValueError: naming the directory, when it cannot be created or written.
  """
  try:
    os.makedirs(data_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".moejax_write_test"):
      pass
  except OSError as e:
    raise ValueError(
        f"data_dir={data_dir!r} is not writable ({e.strerror or e}); the "
        "dataset is not built there yet and building needs a writable "
        f"directory. Pass a writable data_dir= or set ${DATA_DIR_ENV}."
    ) from e


def unit_hash(key: str, salt: str) -> float:
  """A stable hash of `key` mapped to [0, 1): the same on every machine and run."""
  digest = hashlib.sha256(f"{salt}\0{key}".encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def resolve_processes(
    global_batch_size: int,
    process_index: int | None,
    process_count: int | None,
) -> tuple[int, int, int]:
  """Validates the batch/process arguments; returns (index, count, local batch).

  `None` means `jax.process_index()` / `jax.process_count()`.

  Raises:
    ValueError: batch size not positive, process index out of range, or
      `global_batch_size` not divisible by `process_count`.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1:
    raise ValueError(f"process_count={process_count} must be >= 1.")
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index} must be in [0, process_count - 1] = "
        f"[0, {process_count - 1}].")
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size={global_batch_size} must be >= 1.")
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} is not divisible by "
        f"process_count={process_count}; every process loads "
        "global_batch_size // process_count examples, so pick a multiple of "
        f"{process_count}.")
  return process_index, process_count, global_batch_size // process_count


def shard_indices(num_records: int, process_index: int, process_count: int,
                  drop_remainder: bool) -> tuple[int, int]:
  """The [start, end) record interval of this process.

  The same even split as grain's `ShardOptions`: contiguous, disjoint
  intervals; with `drop_remainder` all have `num_records // process_count`
  records, else the first `num_records % process_count` get one more.
  """
  if drop_remainder:
    size = num_records // process_count
    start = process_index * size
    return start, start + size
  size, rem = divmod(num_records, process_count)
  start = process_index * size + min(process_index, rem)
  return start, start + size + (process_index < rem)


def open_external_source(
    name: str,
    split: str,
    data_dir: str,
    download: bool,
    embedded: tuple[str, ...],
) -> tuple[Any, tfds.core.DatasetBuilder]:
  """Opens any registered TFDS dataset as a random-access array_record source.

  Raises:
    ValueError: unknown name (listing the embedded ones), or a dataset not
      prepared in `data_dir` while `download=False`.
  """
  try:
    with quiet_tfds():
      builder = tfds.builder(name, data_dir=data_dir,
                             file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"Unknown dataset {name!r}. Embedded datasets (built locally, no "
        f"download): {list(embedded)}. Any other name must be a TFDS dataset "
        "registered in tensorflow_datasets (see "
        "tfds.list_builders(with_community_datasets=False)) that is already "
        "prepared as array_record in data_dir or downloadable (pass "
        "download=True on a machine with internet).") from e
  with quiet_tfds():
    prepared = builder.is_prepared()
  if not prepared:
    if not download:
      raise ValueError(
          f"TFDS dataset {name!r} is not prepared in data_dir={data_dir!r}. "
          "Pass download=True to download and build it (needs internet; some "
          "TFDS builders also need TensorFlow: pip install moejax[tf]), or "
          f"use an embedded dataset: {list(embedded)}.")
    ensure_writable_dir(data_dir)
    announce(f"downloading and building the TFDS dataset {name} into "
             f"{data_dir}")
    with quiet_tfds():
      builder.download_and_prepare(file_format="array_record")
  check_split(builder, split)
  with quiet_tfds():
    source = tfds.data_source(name, split=split, data_dir=data_dir,
                              download=False)
  return source, builder


def check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
  """Raises ValueError naming the split and the available ones if absent."""
  splits = sorted(builder.info.splits.keys())
  # TFDS split strings may slice a split: 'train[:10%]', 'train[10:20]'.
  if split.split("[", 1)[0] not in splits:
    raise ValueError(
        f"split={split!r} is not a split of {builder.name!r}; available: "
        f"{splits}.")
