"""Grain loader for byte-level language modelling.

`make_lm_dataset` turns a TFDS text dataset (the embedded `stdlib_bytes` by
default, or any TFDS dataset with a text feature) into a grain `IterDataset`
of fixed-length batches. The pipeline, per process:

1. `tfds.data_source(...)[split]`: random access to the documents.
2. Shard: this process keeps the contiguous record interval
   `even_split(num_docs, ShardOptions(process_index, process_count))` -
   disjoint across processes, none dropped.
3. `shuffle(seed)` (documents; reshuffled differently every epoch), then
   `repeat(num_epochs)` (`None` = forever).
4. Tokenize: the document's UTF-8 bytes as int32 tokens 0..255, then `EOS_ID`.
5. Pack: the token stream is cut into consecutive, non-overlapping windows
   of `seq_len + 1` tokens (documents run across windows; the last partial
   window of a finite stream is dropped).
6. Optional window shuffle (`shuffle_buffer_size` windows, seeded).
7. `{'inputs': window[:-1], 'targets': window[1:]}`, batched to
   `global_batch_size // process_count` with the remainder dropped.

Every stage is checkpointable: `it = iter(ds)`, `state = it.get_state()` (a
small JSON-serialisable dict), later `it.set_state(state)` resumes with exactly
the same batches. Append `.mp_prefetch(...)` for worker processes.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any

import grain
import numpy as np

from moejax.data import common
from moejax.data import corpus
from moejax.data import digits
from moejax.data import integrity
from moejax.data import text_files

EMBEDDED_TEXT_DATASETS = (corpus.STDLIB_BYTES,)
# Text datasets moejax reads without TFDS: the embedded ones and a directory
# of the user's files (text_files; source_dir names it).
OWN_TEXT_DATASETS = EMBEDDED_TEXT_DATASETS + (text_files.TEXT_FILES,)
EMBEDDED_DATASETS = (corpus.STDLIB_BYTES, digits.SKLEARN_DIGITS)


def check_dataset_files(
    dataset: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    source_dir: str | os.PathLike[str] | None = None,
    max_files: int | None = None,
    validation_fraction: float | None = None,
) -> integrity.DatasetFileError | None:
  """Checks the built files of an embedded dataset now (after a read error).

  The same check as opening it (`moejax.data.integrity.verify_files`), but
  it returns what it finds instead of raising, and builds nothing.

  Args:
    dataset: a name of `EMBEDDED_DATASETS`.
    data_dir, source_dir, max_files, validation_fraction: select the build,
      as in `make_lm_dataset` (`validation_fraction` None: the default).
  Returns:
    The `DatasetFileError` naming the first bad file, or None when every
    file matches (or the dataset is not built yet).
  Raises:
    ValueError: `dataset` is not an embedded dataset (TFDS records no
      checksums of the files of other datasets).
  """
  data_dir = common.resolve_data_dir(data_dir)
  if dataset == corpus.STDLIB_BYTES:
    if validation_fraction is None:
      validation_fraction = corpus.DEFAULT_VALIDATION_FRACTION
    config = corpus.stdlib_bytes_config(source_dir, max_files,
                                        validation_fraction)
    version_dir = os.path.join(data_dir, dataset, config.name,
                               str(corpus.StdlibBytes.VERSION))
    rebuild = corpus.rebuild_command(
        data_dir, source_dir=source_dir, max_files=max_files,
        validation_fraction=validation_fraction)
  elif dataset == digits.SKLEARN_DIGITS:
    version_dir = os.path.join(data_dir, dataset,
                               str(digits.SklearnDigits.VERSION))
    rebuild = digits.rebuild_command(data_dir)
  else:
    raise ValueError(
        f"dataset={dataset!r} is not built by moejax: its files have no "
        f"manifest to check; embedded datasets: {list(EMBEDDED_DATASETS)}.")
  if not os.path.exists(os.path.join(version_dir, "dataset_info.json")):
    return None
  try:
    integrity.verify_files(version_dir, rebuild=rebuild)
  except integrity.DatasetFileError as e:
    return e
  return None


def _tokenize(example: dict[str, Any], text_key: str) -> np.ndarray:
  """<int32>[N + 1]: the text's bytes, then EOS."""
  text = example[text_key]
  if isinstance(text, str):
    text = text.encode("utf-8")
  if isinstance(text, np.ndarray) and text.dtype == object:
    text = text.item()
  if isinstance(text, (bytes, bytearray)):
    tokens = np.frombuffer(text, dtype=np.uint8)
  else:
    tokens = np.asarray(text)
    if tokens.dtype != np.uint8 or tokens.ndim != 1:
      raise ValueError(
          f"Feature {text_key!r} must be text, bytes or a uint8 vector; got "
          f"{tokens.dtype}{list(tokens.shape)}.")
  out = np.empty(tokens.shape[0] + 1, dtype=np.int32)
  out[:-1] = tokens
  out[-1] = corpus.EOS_ID
  return out


def _tokenize_with(example: dict[str, Any], text_key: str,
                   tokenizer: Any) -> np.ndarray:
  """<int32>[N (+ 1)]: the text's ids under `tokenizer`, then its EOS (if any)."""
  text = example[text_key]
  if isinstance(text, np.ndarray) and text.dtype == object:
    text = text.item()
  ids = tokenizer.encode(text)
  if tokenizer.eos_id is None:
    return ids.astype(np.int32)
  return np.append(ids, tokenizer.eos_id).astype(np.int32)


def _split_window(window: np.ndarray) -> dict[str, np.ndarray]:
  return {"inputs": window[:-1], "targets": window[1:]}


class PackedWindowsIterDataset(grain.IterDataset):
  """Concatenates 1-D token arrays and yields windows of `window_len` tokens.

  Windows are consecutive and non-overlapping; a document longer than a
  window spans several, a window may span several documents. A finite stream
  drops its last partial window. `<int32>[window_len]` per element.
  """

  def __init__(self, parent: grain.IterDataset, window_len: int):
    super().__init__(parent)
    if window_len < 1:
      raise ValueError(f"window_len={window_len} must be >= 1.")
    self._window_len = window_len

  def __iter__(self) -> grain.DatasetIterator:
    return _PackedWindowsIterator(self._parent.__iter__(), self._window_len)

  def __str__(self) -> str:
    return f"PackedWindowsIterDataset(window_len={self._window_len})"


class _PackedWindowsIterator(grain.DatasetIterator):
  """State: the parent's state before the current document, and the offset.

  The current document is the one the next window starts in; restoring
  re-reads it from the parent and skips `offset` tokens, so the state stays a
  few integers whatever the window length.
  """

  def __init__(self, parent: grain.DatasetIterator, window_len: int):
    super().__init__(parent)
    self._window_len = window_len
    self._doc: np.ndarray | None = None
    self._doc_state = copy.deepcopy(self._parent.get_state())
    self._offset = 0
    self._fresh = True  # No window yet and not restored.

  def _next_doc(self) -> None:
    self._doc_state = copy.deepcopy(self._parent.get_state())
    self._doc = np.asarray(next(self._parent))
    self._offset = 0

  def __next__(self) -> np.ndarray:
    pieces = []
    need = self._window_len
    try:
      while need:
        if self._doc is None or self._offset >= len(self._doc):
          self._next_doc()
        piece = self._doc[self._offset:self._offset + need]
        pieces.append(piece)
        self._offset += len(piece)
        need -= len(piece)
    except StopIteration:
      if self._fresh:
        raise ValueError(
            f"The data holds fewer than seq_len + 1 = {self._window_len} "
            "tokens for this process: not one window can be packed. Use a "
            "smaller seq_len, more data, or fewer processes.") from None
      raise
    self._fresh = False
    return np.concatenate(pieces) if len(pieces) > 1 else pieces[0].copy()

  def get_state(self) -> dict[str, Any]:
    return {
        "doc_state": copy.deepcopy(self._doc_state),
        "has_doc": self._doc is not None,
        "offset": self._offset,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    self._fresh = False
    self._parent.set_state(copy.deepcopy(state["doc_state"]))
    self._doc_state = copy.deepcopy(state["doc_state"])
    self._doc = None
    self._offset = 0
    if state["has_doc"]:
      self._next_doc()
      self._offset = state["offset"]

  def __str__(self) -> str:
    return f"PackedWindowsIterator(window_len={self._window_len})"


class WindowShuffleIterDataset(grain.IterDataset):
  """Reads `window_size` elements, yields them in a seeded random order, repeats.

  Same semantics as `grain.experimental.WindowShuffleIterDataset` (a state
  of parent state at the window start, window index and position), but
  draws each window's permutation with numpy in one call. Grain's calls
  `index_shuffle` once per element (~0.16 ms each alone, ~1.3 ms with the
  reader threads running): 1.3 s per 1024-window fill, which dominated the
  pipeline.
  """

  def __init__(self, parent: grain.IterDataset, *, window_size: int,
               seed: int):
    super().__init__(parent)
    if window_size < 1:
      raise ValueError(f"window_size={window_size} must be >= 1.")
    self._window_size = window_size
    self._seed = seed

  def __iter__(self) -> grain.DatasetIterator:
    return _WindowShuffleIterator(self._parent.__iter__(), self._window_size,
                                  self._seed)

  def __str__(self) -> str:
    return f"WindowShuffleIterDataset(window_size={self._window_size})"


class _WindowShuffleIterator(grain.DatasetIterator):
  """State: parent state at the window start, window index, position in it."""

  def __init__(self, parent: grain.DatasetIterator, window_size: int,
               seed: int):
    super().__init__(parent)
    self._window_size = window_size
    self._seed = seed
    self._window: list[Any] = []
    self._window_index = 0
    self._pos = 0
    self._window_start_state = copy.deepcopy(self._parent.get_state())
    self._exhausted = False

  def _fill(self) -> None:
    self._window_start_state = copy.deepcopy(self._parent.get_state())
    window = []
    try:
      for _ in range(self._window_size):
        window.append(next(self._parent))
    except StopIteration:
      self._exhausted = True
    rng = np.random.default_rng([self._seed, self._window_index])
    self._window = [window[i] for i in rng.permutation(len(window))]
    self._pos = 0

  def __next__(self):
    if self._pos >= len(self._window):
      if self._window:
        self._window_index += 1
      if self._exhausted:
        raise StopIteration
      self._fill()
      if not self._window:
        raise StopIteration
    element = self._window[self._pos]
    self._window[self._pos] = None  # Free it.
    self._pos += 1
    return element

  def get_state(self) -> dict[str, Any]:
    if self._window and self._pos >= len(self._window):
      # The window is used up: state of the next window's start.
      return {"window_start_state": copy.deepcopy(self._parent.get_state()),
              "window_index": self._window_index + 1, "pos": 0}
    return {"window_start_state": copy.deepcopy(self._window_start_state),
            "window_index": self._window_index, "pos": self._pos}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(copy.deepcopy(state["window_start_state"]))
    self._window_index = state["window_index"]
    self._exhausted = False
    self._window = []
    self._pos = 0
    if state["pos"]:
      self._fill()
      self._pos = state["pos"]
      for i in range(min(self._pos, len(self._window))):
        self._window[i] = None

  def __str__(self) -> str:
    return f"WindowShuffleIterator(window_size={self._window_size})"


def _open_text_source(dataset, split, data_dir, source_dir, max_files,
                      validation_fraction, download, text_key):
  """(source, number of tokens in the split or None if unknown)."""
  data_dir = common.resolve_data_dir(data_dir)
  if dataset == corpus.STDLIB_BYTES:
    builder = corpus.prepare_stdlib_bytes(
        data_dir, source_dir=source_dir, max_files=max_files,
        validation_fraction=validation_fraction)
    common.check_split(builder, split)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    with common.quiet_tfds():
      source = tfds.data_source(
          corpus.STDLIB_BYTES, split=split, data_dir=data_dir,
          download=False, builder_kwargs={"config": builder.builder_config})
    num_tokens = builder.info.metadata["num_tokens"].get(split)
    return source, num_tokens
  if dataset == text_files.TEXT_FILES:
    source = text_files.TextFilesSource(
        source_dir, split, validation_fraction=validation_fraction)
    return source, source.num_tokens
  if source_dir is not None or max_files is not None:
    raise ValueError(
        f"source_dir/max_files select the {corpus.STDLIB_BYTES!r} corpus; "
        f"they do not apply to dataset={dataset!r}.")
  if dataset in EMBEDDED_DATASETS:
    raise ValueError(
        f"dataset={dataset!r} is an image dataset; text datasets embedded: "
        f"{list(EMBEDDED_TEXT_DATASETS)} (or any TFDS text dataset).")
  source, builder = common.open_external_source(
      dataset, split, data_dir, download, EMBEDDED_DATASETS)
  features = builder.info.features
  if text_key not in features:
    raise ValueError(
        f"TFDS dataset {dataset!r} has no feature text_key={text_key!r}; its "
        f"features are {sorted(features.keys())}.")
  return source, None


def make_lm_dataset(
    *,
    seq_len: int,
    global_batch_size: int,
    dataset: str = corpus.STDLIB_BYTES,
    split: str = "train",
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    shuffle_buffer_size: int = 1024,
    text_key: str = "text",
    source_dir: str | os.PathLike[str] | None = None,
    max_files: int | None = None,
    validation_fraction: float = corpus.DEFAULT_VALIDATION_FRACTION,
    download: bool = False,
    read_options: grain.ReadOptions | None = None,
    tokenizer: Any = None,
) -> grain.IterDataset:
  """Byte-level LM batches from a TFDS text dataset, as a grain IterDataset.

  Each element (one process's share of a global batch):
    `{'inputs': <int32>[B, L], 'targets': <int32>[B, L]}`, with
    `B = global_batch_size // process_count`, `L = seq_len`, tokens in
    `[0, VOCAB_SIZE)` (bytes 0..255, `EOS_ID` = 256 after each document), and
    `targets[:, t] == inputs[:, t + 1]` within a window.

  Args:
    seq_len: tokens per example (windows of `seq_len + 1` are cut).
    global_batch_size: examples per step over all processes.
    dataset: `'stdlib_bytes'` (embedded, built on first use into `data_dir`),
      `'text_files'` (every .txt/.md/.rst/.py file under `source_dir`, read
      as it is: moejax.data.text_files)
      or any TFDS dataset name with a text feature (`'tiny_shakespeare'`,
      `'lm1b'`, ...), read through `tfds.data_source` from `data_dir`; it must
      be prepared there as array_record, or pass `download=True` (internet).
    split: `'train'`/`'validation'` for stdlib_bytes; any split of a TFDS
      dataset, including slices such as `'train[:1%]'`.
    seed: seeds the document shuffle and the window shuffle.
    shuffle: shuffle documents (per epoch) and windows; `False` reads in
      storage order (deterministic either way).
    num_epochs: passes over the documents; `None` repeats forever.
    process_index, process_count: this process's shard; `None` =
      `jax.process_index()` / `jax.process_count()`.
    data_dir: where datasets are built/read; `None` = `default_data_dir()`.
    shuffle_buffer_size: windows in the window-shuffle buffer (<= 1: off).
    text_key: the text feature of a TFDS dataset.
    source_dir, max_files, validation_fraction: select the stdlib_bytes
      corpus (see `prepare_stdlib_bytes`).
    download: allow TFDS to download/build a non-embedded dataset.
    read_options: grain `ReadOptions` for the document reads (threads,
      prefetch); `None` = `DEFAULT_READ_OPTIONS` (2 threads, 32 ahead).
    tokenizer: None for bytes (the default above), or a tokenizer
      (moejax.data.tokenizer: `encode`, `eos_id`), e.g. a pretrained
      checkpoint's tokenizer.json: each document becomes its ids, then the
      tokenizer's EOS; ids are in [0, tokenizer.vocab_size).

  Raises:
    ValueError: unknown dataset, empty corpus, data_dir not writable,
      `seq_len` larger than the split's tokens, global batch size not
      divisible by the process count, bad split or feature. A process whose
      shard holds fewer than `seq_len + 1` tokens raises ValueError on its
      first `next()`.
  """
  process_index, process_count, local_batch = common.resolve_processes(
      global_batch_size, process_index, process_count)
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 1.")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs={num_epochs} must be >= 1 or None.")
  source, num_tokens = _open_text_source(
      dataset, split, data_dir, source_dir, max_files, validation_fraction,
      download, text_key)
  if tokenizer is not None:
    num_tokens = None  # counted in bytes; a tokenizer's count differs
  if num_tokens is not None and seq_len + 1 > num_tokens:
    raise ValueError(
        f"seq_len={seq_len} is larger than the data: split {split!r} of "
        f"{dataset!r} holds {num_tokens} tokens (bytes + one EOS per "
        f"document), fewer than seq_len + 1 = {seq_len + 1}. Use seq_len <= "
        f"{num_tokens - 1}.")

  ds = grain.MapDataset.source(source)
  start, end = common.shard_indices(len(ds), process_index, process_count,
                                    drop_remainder=False)
  if end <= start:
    raise ValueError(
        f"Split {split!r} of {dataset!r} has {len(ds)} documents, fewer than "
        f"process_count={process_count}: process {process_index} gets none.")
  ds = ds[start:end]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  if tokenizer is None:
    ds = ds.map(functools.partial(_tokenize, text_key=text_key))
  else:
    ds = ds.map(functools.partial(_tokenize_with, text_key=text_key,
                                  tokenizer=tokenizer))
  it = ds.to_iter_dataset(read_options or common.DEFAULT_READ_OPTIONS)
  it = PackedWindowsIterDataset(it, seq_len + 1)
  if shuffle and shuffle_buffer_size > 1:
    it = WindowShuffleIterDataset(it, window_size=shuffle_buffer_size,
                                  seed=seed)
  it = it.map(_split_window)
  return it.batch(local_batch, drop_remainder=True)
