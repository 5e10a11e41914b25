"""The embedded default text corpus: the Python standard library, as bytes.

Every machine that runs moejax has a Python interpreter, so its standard
library's source files are a text corpus that needs no download. `StdlibBytes`
wraps it as a real TFDS dataset builder (`tfds.core.GeneratorBasedBuilder`,
registered as `stdlib_bytes`, written as `array_record`) that is built on first
use into a data dir and read back through `tfds.data_source`, with no
TensorFlow installed.

Corpus (documented contract, changed only with a new builder VERSION):

- Files: every `*.py` file under `sysconfig.get_paths()['stdlib']` (or under a
  `source_dir` you pass), walked in sorted order, skipping directories named
  `site-packages`, `dist-packages`, `test`, `tests`, `idle_test`,
  `__pycache__` and `config-*` (build configuration), the machine-specific
  `_sysconfigdata_*.py` files, symlinks and empty files.
- Example: `{'text': <uint8>[N] (the file's raw bytes), 'path': the file's
  path relative to the source dir, '/'-separated}`. Read back, `path` is
  `bytes` (TFDS decodes text features to bytes without TensorFlow).
- Split: a file is in `validation` when the stable hash
  `unit_hash(path, 'stdlib_bytes/split')` is below `validation_fraction`
  (default 0.02), else in `train`. TFDS cannot write an empty split, so when
  the hash leaves one empty the file with the lowest hash moves to validation
  (or the one with the highest to train); a corpus needs at least 2 files.
- Subset (`max_files=N`): the N files with the lowest
  `unit_hash(path, 'stdlib_bytes/subset')`, a spread over the whole library.
- Version: builder `VERSION`; the dataset's `metadata.json` records the Python
  version, file count, bytes and tokens per split, a sha256 of the file list
  (paths and sizes) and a sha256 of the contents.
- Tokens: bytes are tokens 0..255; `EOS_ID = 256` ends each document in the
  packed stream, so `VOCAB_SIZE = 257`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import sysconfig

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from moejax.data import common
from moejax.data import integrity

#: Byte values 0..255 are tokens 0..255.
BYTE_VOCAB_SIZE = 256
#: End-of-document token, appended after every document in the packed stream.
EOS_ID = 256
#: Size of the byte-level vocabulary: 256 bytes + EOS.
VOCAB_SIZE = 257

STDLIB_BYTES = "stdlib_bytes"
DEFAULT_VALIDATION_FRACTION = 0.02

EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test",
    "__pycache__"})
_SPLIT_SALT = "stdlib_bytes/split"
_SUBSET_SALT = "stdlib_bytes/subset"

unit_hash = common.unit_hash


def stdlib_source_dir() -> str:
  """The running interpreter's standard library directory."""
  return sysconfig.get_paths()["stdlib"]


def _python_version() -> str:
  return ".".join(map(str, sys.version_info[:3]))


def _excluded_dir(name: str) -> bool:
  return name in EXCLUDED_DIRS or name.startswith("config-")


def _excluded_file(name: str) -> bool:
  return not name.endswith(".py") or name.startswith("_sysconfigdata_")


def list_corpus_files(
    source_dir: str | os.PathLike[str] | None = None,
    max_files: int | None = None,
) -> list[tuple[str, int]]:
  """The corpus files as sorted `(relative '/'-path, size in bytes)` pairs.

  Args:
    source_dir: directory to walk; `None` is the interpreter's stdlib.
    max_files: keep only this many files (the deterministic subset described
      in the module docstring); `None` keeps all.

  Raises:
    ValueError: `source_dir` missing, or no corpus file found under it, or
      `max_files < 2`.
  """
  root = stdlib_source_dir() if source_dir is None else os.fspath(source_dir)
  if max_files is not None and max_files < 2:
    raise ValueError(
        f"max_files={max_files} must be >= 2 (one file per split) or None.")
  if not os.path.isdir(root):
    raise ValueError(f"source_dir={root!r} is not a directory.")
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not _excluded_dir(d))
    for name in sorted(filenames):
      full = os.path.join(dirpath, name)
      if _excluded_file(name) or os.path.islink(full):
        continue
      size = os.stat(full).st_size
      if size:
        rel = os.path.relpath(full, root).replace(os.sep, "/")
        files.append((rel, size))
  if not files:
    raise ValueError(
        f"Empty corpus: no non-empty *.py file under source_dir={root!r} "
        f"(excluding directories {sorted(EXCLUDED_DIRS)} and config-*). Pass "
        "a directory that holds Python source files, or source_dir=None for "
        "the interpreter's standard library.")
  if max_files is not None and max_files < len(files):
    files = sorted(files, key=lambda f: unit_hash(f[0], _SUBSET_SALT))
    files = sorted(files[:max_files])
  else:
    files.sort()
  return files



def split_files(
    files: list[tuple[str, int]], validation_fraction: float,
) -> dict[str, list[tuple[str, int]]]:
  """Deterministic train/validation split of `files` by path hash (see module doc)."""
  if len(files) < 2:
    raise ValueError(
        f"The corpus has {len(files)} file(s): {[f for f, _ in files]}; "
        "building needs at least 2 (one per split).")
  ranked = sorted(files, key=lambda f: unit_hash(f[0], _SPLIT_SALT))
  n_val = sum(unit_hash(f[0], _SPLIT_SALT) < validation_fraction
              for f in ranked)
  n_val = min(max(n_val, 1), len(ranked) - 1)
  return {"train": sorted(ranked[n_val:]), "validation": sorted(ranked[:n_val])}


def file_list_sha256(files: list[tuple[str, int]]) -> str:
  """sha256 of the file list (paths and sizes): identifies a corpus cheaply."""
  h = hashlib.sha256()
  for rel, size in files:
    h.update(f"{rel}\0{size}\n".encode("utf-8"))
  return h.hexdigest()


@dataclasses.dataclass(eq=False)
class StdlibBytesConfig(tfds.core.BuilderConfig):
  """Which corpus to build. Make one with `stdlib_bytes_config(...)`.

  Attributes:
    source_dir: directory of `*.py` files; `None` = the interpreter's stdlib.
    max_files: deterministic subset size (for tests and quick runs); `None`
      = all files.
    validation_fraction: expected fraction of files in `validation`.
  """

  source_dir: str | None = None
  max_files: int | None = None
  validation_fraction: float = DEFAULT_VALIDATION_FRACTION


def _default_config_name() -> str:
  return f"py{_python_version()}"


def stdlib_bytes_config(
    source_dir: str | os.PathLike[str] | None = None,
    max_files: int | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
) -> StdlibBytesConfig:
  """The builder config for a corpus; its name is its directory under data_dir.

  Names: `py3.11.7` for the full stdlib of Python 3.11.7 (the default config),
  `py3.11.7-max64` for a 64-file subset, `dir-<sha of abs path>[-maxN]` for a
  custom `source_dir`; `-val0.1` is appended for a non-default
  `validation_fraction`.
  """
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(
        f"validation_fraction={validation_fraction} must be in (0, 1).")
  if max_files is not None and max_files < 2:
    raise ValueError(
        f"max_files={max_files} must be >= 2 (one file per split) or None.")
  if source_dir is None:
    name = _default_config_name()
  else:
    source_dir = os.path.abspath(os.fspath(source_dir))
    name = "dir-" + hashlib.sha256(source_dir.encode("utf-8")).hexdigest()[:12]
  if max_files is not None:
    name += f"-max{max_files}"
  if validation_fraction != DEFAULT_VALIDATION_FRACTION:
    name += f"-val{validation_fraction:g}"
  if name == _default_config_name():
    return StdlibBytes.BUILDER_CONFIGS[0]
  return StdlibBytesConfig(
      name=name, source_dir=source_dir, max_files=max_files,
      validation_fraction=validation_fraction,
      description=_config_description(source_dir, max_files))


def _config_description(source_dir: str | None, max_files: int | None) -> str:
  what = (f"the Python {_python_version()} standard library" if source_dir is None
          else f"{source_dir}")
  subset = "" if max_files is None else f", a {max_files}-file subset"
  return f"Byte-level corpus of the *.py files of {what}{subset}."


class StdlibBytes(tfds.core.GeneratorBasedBuilder):
  """TFDS builder `stdlib_bytes`: Python source files as a byte corpus.

  Examples: `{'text': <uint8>[N], 'path': str}`; splits `train`, `validation`.
  See the module docstring for the file selection, split and version rules.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # TFDS infers this through `importlib_resources` (absent on Python >= 3.9
  # unless installed) when preparing a builder defined inside a package.
  code_path = epath.Path(__file__)
  BUILDER_CONFIGS = [
      StdlibBytesConfig(
          name=_default_config_name(),
          description=_config_description(None, None)),
  ]

  def __init__(self, *, file_format=None, **kwargs):
    # array_record by default: TFDS's default (tfrecord) needs TensorFlow to
    # write, and `tfds.data_source(name, data_dir=...)` keeps the builder's
    # default when it builds.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            f"{config.description} Built with Python {_python_version()}; "
            "tokens are bytes 0..255 (vocab 257 with EOS=256 in the packed "
            "stream). metadata.json records the file list sha256 (the corpus "
            "version)."),
        features=tfds.features.FeaturesDict({
            # Raw file bytes, stored without the per-element protobuf list.
            "text": tfds.features.Tensor(
                shape=(None,), dtype=np.uint8, encoding="bytes"),
            "path": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
        homepage="https://docs.python.org/3/library/",
        license="PSF-2.0 (the Python standard library's license)",
    )

  def _source_root(self) -> str:
    config = self.builder_config
    return stdlib_source_dir() if config.source_dir is None else config.source_dir

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    files = list_corpus_files(config.source_dir, config.max_files)
    splits = split_files(files, config.validation_fraction)
    root = self._source_root()
    content = hashlib.sha256()
    for rel, _ in files:
      with open(os.path.join(root, rel), "rb") as f:
        content.update(f.read())
    self.info.metadata.update({
        "python_version": _python_version(),
        "source_dir": "stdlib" if config.source_dir is None else root,
        "max_files": config.max_files,
        "validation_fraction": config.validation_fraction,
        "num_files": {k: len(v) for k, v in splits.items()},
        "num_bytes": {k: sum(s for _, s in v) for k, v in splits.items()},
        # Tokens in the packed stream: bytes plus one EOS per document.
        "num_tokens": {k: sum(s + 1 for _, s in v) for k, v in splits.items()},
        "file_list_sha256": file_list_sha256(files),
        "content_sha256": content.hexdigest(),
    })
    return {name: self._generate_examples(root, split)
            for name, split in splits.items()}

  def _generate_examples(self, root, files):
    for rel, _ in files:
      with open(os.path.join(root, rel), "rb") as f:
        text = f.read()
      yield rel, {"text": np.frombuffer(text, dtype=np.uint8), "path": rel}


def prepare_stdlib_bytes(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    source_dir: str | os.PathLike[str] | None = None,
    max_files: int | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    rebuild: bool = False,
) -> StdlibBytes:
  """Builds the corpus into `data_dir` on first use; returns the prepared builder.

  Layout: `<data_dir>/stdlib_bytes/<config name>/1.0.0/` (see
  `stdlib_bytes_config`). Read it with
  `tfds.data_source('stdlib_bytes', data_dir=..., builder_kwargs={'config':
  builder.builder_config})`, or just `tfds.data_source('stdlib_bytes',
  data_dir=...)` for the full stdlib (default config).

  Args:
    data_dir: where to build/read; `None` = `default_data_dir()`.
    source_dir: directory of `*.py` files; `None` = the interpreter's stdlib.
    max_files: deterministic subset size; `None` = every file.
    validation_fraction: expected fraction of files in `validation`.
    rebuild: rebuild even if already built (e.g. after the source changed).

  An existing build is verified first (`moejax.data.integrity`): the size
  and SHA-256 of every file against `moejax_manifest.json`, which each build
  writes; a build without one is read in full once, then recorded.

  Raises:
    ValueError: empty corpus, data_dir not writable when a build is needed,
      or an existing build whose file list differs from the source's now.
    DatasetFileError (a ValueError): a file of the existing build is
      missing, truncated or changed; names it and the rebuild command.
  """
  data_dir = common.resolve_data_dir(data_dir)
  config = stdlib_bytes_config(source_dir, max_files, validation_fraction)
  files = list_corpus_files(config.source_dir, config.max_files)
  version_dir = os.path.join(data_dir, STDLIB_BYTES, config.name,
                             str(StdlibBytes.VERSION))
  if not rebuild and os.path.exists(
      os.path.join(version_dir, "dataset_info.json")):
    # Before TFDS reads the JSON files: they are checked too.
    integrity.verify_files(version_dir, rebuild=rebuild_command(
        data_dir, source_dir=source_dir, max_files=max_files,
        validation_fraction=validation_fraction))
  if rebuild:
    integrity.remove_for_rebuild(version_dir, data_dir)
  with common.quiet_tfds():
    builder = StdlibBytes(data_dir=data_dir, config=config,
                          file_format="array_record")
  with common.quiet_tfds():
    prepared = builder.is_prepared()
  if prepared and not rebuild:
    built = builder.info.metadata.get("file_list_sha256")
    if built != file_list_sha256(files):
      raise ValueError(
          f"The stdlib_bytes corpus in {builder.data_dir} was built from a "
          f"different file list (sha256 {built}) than the source has now "
          f"({file_list_sha256(files)}). Pass rebuild=True to rebuild it, or "
          "use another data_dir.")
    return builder
  common.ensure_writable_dir(data_dir)
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if rebuild
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  common.announce(f"building the stdlib corpus into {builder.data_dir} "
                  f"({len(files)} files)")
  # The builder's file format (array_record) is set at construction; passing
  # it again here fails on a rebuild ("already fully initialized").
  with common.quiet_tfds():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False, download_mode=mode))
  integrity.write_manifest(os.fspath(builder.data_dir))
  return builder


def rebuild_command(
    data_dir: str,
    *,
    source_dir: str | os.PathLike[str] | None = None,
    max_files: int | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
) -> str:
  """The shell command that rebuilds this corpus in `data_dir`."""
  args = [json.dumps(os.fspath(data_dir))]
  if source_dir is not None:
    args.append(f"source_dir={json.dumps(os.path.abspath(source_dir))}")
  if max_files is not None:
    args.append(f"max_files={int(max_files)}")
  if validation_fraction != DEFAULT_VALIDATION_FRACTION:
    args.append(f"validation_fraction={float(validation_fraction)!r}")
  return integrity.python_command(
      "from moejax import data; data.prepare_stdlib_bytes("
      f"{', '.join(args)}, rebuild=True)")
