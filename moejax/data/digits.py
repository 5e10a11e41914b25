"""The embedded default image dataset: scikit-learn's bundled 8x8 digits.

scikit-learn ships the UCI optical digits test set (1797 grey 8x8 images of
the digits 0..9, pixel values 0..16) inside its wheel, so it needs no
download. `SklearnDigits` wraps it as a TFDS builder (`sklearn_digits`,
written as `array_record`, read through `tfds.data_source`) so that it is read
exactly like `mnist` or `cifar10`.

- Example: `{'image': <uint8>[8, 8, 1] (values 0..16), 'label': int 0..9,
  'index': int (row in `sklearn.datasets.load_digits()`)}`.
- Split: row i is in `test` when `unit_hash(str(i), 'sklearn_digits/split')
  < 0.1`, else in `train` (188 test / 1609 train).
- `metadata.json` records `max_pixel_value` (16), used to scale images to
  [0, 1], and the scikit-learn version.
"""

from __future__ import annotations

import json
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from moejax.data import common
from moejax.data import integrity

SKLEARN_DIGITS = "sklearn_digits"
DIGITS_MAX_PIXEL_VALUE = 16
DIGITS_NUM_CLASSES = 10
DIGITS_TEST_FRACTION = 0.1
_SPLIT_SALT = "sklearn_digits/split"


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """TFDS builder `sklearn_digits`: 8x8 digits; splits `train` and `test`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # See corpus.StdlibBytes.code_path.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format=None, **kwargs):
    # array_record by default: TFDS's default (tfrecord) needs TensorFlow to
    # write, and `tfds.data_source(name, data_dir=...)` keeps the builder's
    # default when it builds.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "scikit-learn's bundled copy of the UCI ML hand-written digits "
            "(optical recognition) test set: 1797 8x8 grey images, pixel "
            "values 0..16, labels 0..9."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=DIGITS_NUM_CLASSES),
            "index": tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=("image", "label"),
        metadata=tfds.core.MetadataDict(),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        license="CC BY 4.0 (UCI ML repository)",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Bundled with scikit-learn: nothing to download.
    import sklearn  # pylint: disable=g-import-not-at-top
    from sklearn import datasets  # pylint: disable=g-import-not-at-top

    digits = datasets.load_digits()
    images = np.asarray(digits.images)
    labels = np.asarray(digits.target)
    test = np.array([common.unit_hash(str(i), _SPLIT_SALT) < DIGITS_TEST_FRACTION
                     for i in range(len(labels))])
    self.info.metadata.update({
        "max_pixel_value": DIGITS_MAX_PIXEL_VALUE,
        "sklearn_version": sklearn.__version__,
        "test_fraction": DIGITS_TEST_FRACTION,
    })
    return {
        "train": self._generate_examples(images, labels, np.flatnonzero(~test)),
        "test": self._generate_examples(images, labels, np.flatnonzero(test)),
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {
          "image": images[i].astype(np.uint8)[:, :, None],
          "label": int(labels[i]),
          "index": int(i),
      }


def prepare_sklearn_digits(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    rebuild: bool = False,
) -> SklearnDigits:
  """Builds `sklearn_digits` into `data_dir` on first use; returns the builder.

  Layout: `<data_dir>/sklearn_digits/1.0.0/`. Read it with
  `tfds.data_source('sklearn_digits', data_dir=...)`.

  An existing build is verified first, as in
  `corpus.prepare_stdlib_bytes` (`moejax.data.integrity`).

  Raises:
    ValueError: `data_dir` not writable when a build is needed.
    DatasetFileError (a ValueError): a file of the existing build is
      missing, truncated or changed; names it and the rebuild command.
  """
  data_dir = common.resolve_data_dir(data_dir)
  version_dir = os.path.join(data_dir, SKLEARN_DIGITS,
                             str(SklearnDigits.VERSION))
  if not rebuild and os.path.exists(
      os.path.join(version_dir, "dataset_info.json")):
    integrity.verify_files(version_dir, rebuild=rebuild_command(data_dir))
  if rebuild:
    integrity.remove_for_rebuild(version_dir, data_dir)
  with common.quiet_tfds():
    builder = SklearnDigits(data_dir=data_dir, file_format="array_record")
  with common.quiet_tfds():
    prepared = builder.is_prepared()
  if prepared and not rebuild:
    return builder
  common.ensure_writable_dir(data_dir)
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if rebuild
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  _require_sklearn()
  common.announce(f"building the sklearn digits into {builder.data_dir} "
                  "(1797 images)")
  # The builder's file format (array_record) is set at construction; passing
  # it again here fails on a rebuild ("already fully initialized").
  with common.quiet_tfds():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False, download_mode=mode))
  integrity.write_manifest(os.fspath(builder.data_dir))
  return builder


def _require_sklearn() -> None:
  """Raises ImportError naming the extra when scikit-learn is missing (only
  a build needs it; a prepared dataset is read without it)."""
  try:
    import sklearn  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ImportError(
        f"building the {SKLEARN_DIGITS} dataset needs scikit-learn (it "
        "bundles the digits): pip install 'moejax[digits]' (or pip install "
        "scikit-learn)") from e


def rebuild_command(data_dir: str) -> str:
  """The shell command that rebuilds sklearn_digits in `data_dir`."""
  return integrity.python_command(
      "from moejax import data; data.prepare_sklearn_digits("
      f"{json.dumps(os.fspath(data_dir))}, rebuild=True)")
