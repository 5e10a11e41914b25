"""Integrity of built dataset files: a manifest of sizes and SHA-256s.

TFDS records the number of examples of each shard, but nothing that tells a
damaged file from a good one: a truncated array_record file fails with
"ArrayRecord file should be at least 64KB big" and a flipped bit with
riegeli's "chunk data hash mismatch" only when that record is read, maybe
hours into a run, and neither names the file.

So every build of an embedded dataset (`prepare_stdlib_bytes`,
`prepare_sklearn_digits`) writes `moejax_manifest.json` next to the files:
the size and SHA-256 of every file in the dataset's version directory.
Opening the dataset again checks the sizes, then the hashes (2 ms for the
3.6 MB of files of the full stdlib corpus, from the page cache), and raises
`DatasetFileError` naming the first file that differs and the command that
rebuilds the dataset.

A dataset built before the manifest existed is verified once by reading
every record of every array_record shard (riegeli checks each chunk's hash;
each shard must hold the number of records dataset_info.json lists); only
then is its manifest written, so a damaged file is never recorded as good.
If the directory is read-only the manifest is not written and the full read
repeats on every open.

TFDS datasets that moejax does not build have no manifest and are not
checked here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil

from absl import logging

from moejax.data import common

#: The manifest's file name, in the dataset's version directory.
MANIFEST_NAME = "moejax_manifest.json"
MANIFEST_FORMAT = 1
_BLOCK = 1 << 20
_SHARD = re.compile(r"^(?P<name>.+)-(?P<split>[^-.]+)\.array_record-"
                    r"(?P<index>\d{5})-of-(?P<count>\d{5})$")


class DatasetFileError(ValueError):
  """A file of a built dataset is missing, has changed or does not read.

  Attributes:
    path: the file.
    problem: what is wrong with it (one line, starts with 'dataset file
      <path> ').
    rebuild: a shell command that rebuilds the dataset.
  """

  def __init__(self, path, problem, rebuild):
    self.path = path
    self.problem = problem
    self.rebuild = rebuild
    super().__init__(f"{problem}. To rebuild it, run: {rebuild}")


def file_record(path: str) -> dict[str, int | str]:
  """{'size': bytes, 'sha256': hex digest} of the file at `path`."""
  h = hashlib.sha256()
  size = 0
  with open(path, "rb") as f:
    while True:
      block = f.read(_BLOCK)
      if not block:
        break
      h.update(block)
      size += len(block)
  return {"size": size, "sha256": h.hexdigest()}


def _data_files(version_dir: str) -> list[str]:
  return sorted(
      n for n in os.listdir(version_dir)
      if not n.startswith(MANIFEST_NAME)
      and os.path.isfile(os.path.join(version_dir, n)))


def write_manifest(version_dir: str) -> str:
  """Records every file of `version_dir` in its manifest (atomically);
  returns the manifest's path."""
  manifest = {
      "format": MANIFEST_FORMAT,
      "files": {n: file_record(os.path.join(version_dir, n))
                for n in _data_files(version_dir)},
  }
  path = os.path.join(version_dir, MANIFEST_NAME)
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)
      f.write("\n")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def verify_files(version_dir: str, *, rebuild: str) -> None:
  """Checks the files of a built dataset against its manifest.

  Without a manifest (built before manifests existed): reads every record
  of every shard (`verify_by_reading`), then writes the manifest.

  Raises:
    DatasetFileError: naming the first file that is missing, has another
      size or SHA-256 than recorded, or (no manifest) does not read.
  """
  path = os.path.join(version_dir, MANIFEST_NAME)
  try:
    with open(path) as f:
      manifest = json.load(f)
    files = manifest["files"]
    if not all(isinstance(r.get("size"), int) and isinstance(
        r.get("sha256"), str) for r in files.values()):
      raise ValueError("an entry lacks its size or sha256")
  except FileNotFoundError:
    verify_by_reading(version_dir, rebuild=rebuild)
    try:
      write_manifest(version_dir)
    except OSError as e:
      logging.warning(
          "dataset %s verified by reading every record, but its manifest "
          "could not be written (%s); the full read repeats on every open",
          version_dir, e)
    return
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise DatasetFileError(
        path, f"dataset file {path} (the manifest of sizes and checksums "
        f"recorded at build time) does not read: {type(e).__name__}: {e}",
        rebuild) from e
  # Sizes first (cheap; a truncated file is the common case), then hashes.
  for name in sorted(files):
    file = os.path.join(version_dir, name)
    want = files[name]["size"]
    try:
      size = os.path.getsize(file)
    except OSError as e:
      raise DatasetFileError(
          file, f"dataset file {file} is missing or unreadable "
          f"({e.strerror or e}); it is listed in {path}", rebuild) from e
    if size != want:
      raise DatasetFileError(
          file, f"dataset file {file} is {size:,} bytes; it was {want:,} "
          f"bytes when built (recorded in {path})", rebuild)
  for name in sorted(files):
    file = os.path.join(version_dir, name)
    want = files[name]["sha256"]
    try:
      got = file_record(file)["sha256"]
    except OSError as e:
      raise DatasetFileError(
          file, f"dataset file {file} does not read ({e.strerror or e})",
          rebuild) from e
    if got != want:
      raise DatasetFileError(
          file, f"dataset file {file} has changed since it was built: its "
          f"sha256 is {got[:16]}..., {want[:16]}... is recorded in {path}",
          rebuild)


def verify_by_reading(version_dir: str, *, rebuild: str) -> None:
  """Reads every record of every array_record shard of a built dataset.

  Riegeli checks the hash of every chunk it reads, and each shard must hold
  the number of records dataset_info.json lists for it.

  Raises:
    DatasetFileError: naming the first file that is missing or fails.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  info_path = os.path.join(version_dir, "dataset_info.json")
  try:
    with open(info_path) as f:
      info = json.load(f)
    lengths = {s["name"]: [int(n) for n in s.get("shardLengths", [])]
               for s in info["splits"]}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DatasetFileError(
        info_path, f"dataset file {info_path} does not read: "
        f"{type(e).__name__}: {e}", rebuild) from e
  shards = {}
  for name in _data_files(version_dir):
    m = _SHARD.match(name)
    if m:
      shards[(m["split"], int(m["index"]))] = name
  prefix = next(iter(shards.values()), "").split("-")[0] if shards else ""
  for split, counts in sorted(lengths.items()):
    for index, want in enumerate(counts):
      name = shards.get((split, index))
      file = os.path.join(
          version_dir, name or f"{prefix}-{split}.array_record-"
          f"{index:05d}-of-{len(counts):05d}")
      if name is None:
        raise DatasetFileError(
            file, f"dataset file {file} is missing (listed in {info_path})",
            rebuild)
      try:
        reader = array_record_module.ArrayRecordReader(
            file, "readahead_buffer_size:0")
        try:
          got = reader.num_records()
          for start in range(0, got, 256):
            reader.read(start, min(got, start + 256))
        finally:
          reader.close()
      except Exception as e:  # pylint: disable=broad-except
        raise DatasetFileError(
            file, f"dataset file {file} does not read: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}", rebuild) from e
      if got != want:
        raise DatasetFileError(
            file, f"dataset file {file} holds {got} records; "
            f"{info_path} lists {want}", rebuild)


def remove_for_rebuild(version_dir: str, data_dir: str) -> None:
  """Deletes the old build in `version_dir` before a rebuild opens it.

  TFDS deletes it too (FORCE_REDOWNLOAD), but only after parsing its
  dataset_info.json, which fails when that file is damaged: the rebuild
  command a DatasetFileError prints must work whatever the damage.

  Raises:
    ValueError: `data_dir` is not writable (nothing is deleted then).
  """
  if os.path.isdir(version_dir):
    common.ensure_writable_dir(data_dir)
    shutil.rmtree(version_dir)


def python_command(code: str) -> str:
  """`python -c '<code>'`, quoted for a POSIX shell."""
  return "python -c " + shlex.quote(code)
