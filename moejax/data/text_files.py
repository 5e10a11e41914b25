"""A directory of the user's own text files as an LM dataset (no build).

`make_lm_dataset(dataset='text_files', source_dir=DIR, ...)` reads every
non-empty file under DIR whose name ends with one of `suffixes` (default
.txt, .md, .rst, .py), one document per file, as UTF-8 bytes; the
tokenizer (bytes, or a model's tokenizer.json) then makes the ids. Files are
split into train/validation by the same path hash as the embedded corpus
(corpus.split_files), so a file is always in the same split. Files are read
when a batch needs them; nothing is built or copied.
"""

import os

from moejax.data import corpus

TEXT_FILES = "text_files"
DEFAULT_SUFFIXES = (".txt", ".md", ".rst", ".py")


def list_text_files(source_dir, suffixes=DEFAULT_SUFFIXES):
  """Sorted (relative path, size) of the non-empty text files under
  source_dir (symlinks and hidden directories skipped)."""
  root = os.fspath(source_dir) if source_dir is not None else None
  if root is None or not os.path.isdir(root):
    raise ValueError(f"dataset={TEXT_FILES!r} needs source_dir, a directory "
                     f"of text files; got source_dir={root!r}")
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for name in sorted(filenames):
      full = os.path.join(dirpath, name)
      if not name.endswith(tuple(suffixes)) or os.path.islink(full):
        continue
      size = os.stat(full).st_size
      if size:
        files.append((os.path.relpath(full, root).replace(os.sep, "/"),
                      size))
  if len(files) < 2:
    raise ValueError(f"source_dir={root!r} holds {len(files)} non-empty "
                     f"file(s) ending in {list(suffixes)}; at least 2 are "
                     f"needed (one per split)")
  return sorted(files)


class TextFilesSource:
  """A grain random-access source: one {'text': bytes} per file of a split."""

  def __init__(self, source_dir, split, *, validation_fraction=None,
               suffixes=DEFAULT_SUFFIXES):
    fraction = (corpus.DEFAULT_VALIDATION_FRACTION
                if validation_fraction is None else validation_fraction)
    splits = corpus.split_files(list_text_files(source_dir, suffixes),
                                fraction)
    if split not in splits:
      raise ValueError(f"split={split!r} of dataset {TEXT_FILES!r}; allowed: "
                       f"{sorted(splits)}")
    self.root = os.fspath(source_dir)
    self.files = splits[split]
    # Bytes plus one EOS per document (the byte tokenizer's count).
    self.num_tokens = sum(size + 1 for _, size in self.files)

  def __len__(self):
    return len(self.files)

  def __getitem__(self, index):
    rel, _ = self.files[index]
    with open(os.path.join(self.root, rel), "rb") as f:
      return {"text": f.read()}

  def __repr__(self):
    return f"TextFilesSource({self.root!r}, {len(self.files)} files)"
