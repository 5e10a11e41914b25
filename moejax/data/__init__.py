"""moejax.data: TFDS builders (array_record) and grain loaders, no download needed.

Embedded datasets (built on first use into a data dir, read back through
`tfds.data_source`, no TensorFlow needed):

- `stdlib_bytes` (`StdlibBytes`): the running interpreter's standard library
  `*.py` files as a byte corpus; examples `{'text': <uint8>[N], 'path':
  bytes}`; splits `train`/`validation` (~2% of files, by a stable path hash).
  Tokens: bytes 0..255 and `EOS_ID` = 256, `VOCAB_SIZE` = 257.
- `sklearn_digits` (`SklearnDigits`): scikit-learn's bundled 8x8 digits;
  examples `{'image': <uint8>[8, 8, 1] (0..16), 'label': int, 'index': int}`;
  splits `train`/`test` (~10% test, by a stable index hash).

Loaders (any other TFDS dataset name works too, when prepared or
downloadable):

    ds = make_lm_dataset(seq_len=256, global_batch_size=32)
    # {'inputs': <int32>[B, 256], 'targets': <int32>[B, 256]}, B = 32 // process_count
    ds = make_image_dataset(global_batch_size=64)
    # {'image': <float32>[B, 8, 8, 1], 'label': <int32>[B]}
    it = iter(ds); batch = next(it); state = it.get_state(); it.set_state(state)
    sharding = batch_sharding(mesh, 'data')
    global_batch = make_global_batch(batch, sharding)   # jax.Arrays [32, ...]

Data dir: the `data_dir` argument, else `$MOEJAX_DATA_DIR`, else
`$TFDS_DATA_DIR`, else `~/tensorflow_datasets`. See docs/data.md.
"""

from moejax.data.common import default_data_dir
from moejax.data.corpus import BYTE_VOCAB_SIZE
from moejax.data.corpus import EOS_ID
from moejax.data.corpus import list_corpus_files
from moejax.data.corpus import prepare_stdlib_bytes
from moejax.data.corpus import STDLIB_BYTES
from moejax.data.corpus import stdlib_bytes_config
from moejax.data.corpus import stdlib_source_dir
from moejax.data.corpus import StdlibBytes
from moejax.data.corpus import StdlibBytesConfig
from moejax.data.corpus import VOCAB_SIZE
from moejax.data.digits import prepare_sklearn_digits
from moejax.data.digits import SKLEARN_DIGITS
from moejax.data.digits import SklearnDigits
from moejax.data.global_batch import batch_sharding
from moejax.data.global_batch import make_global_batch
from moejax.data.integrity import DatasetFileError
from moejax.data.lm import check_dataset_files
from moejax.data.lm import EMBEDDED_DATASETS
from moejax.data.lm import EMBEDDED_TEXT_DATASETS
from moejax.data.lm import OWN_TEXT_DATASETS
from moejax.data.lm import make_lm_dataset
from moejax.data.lm import PackedWindowsIterDataset
from moejax.data.vision import EMBEDDED_IMAGE_DATASETS
from moejax.data.vision import make_image_dataset

__all__ = [
    "BYTE_VOCAB_SIZE",
    "EMBEDDED_DATASETS",
    "EMBEDDED_IMAGE_DATASETS",
    "EMBEDDED_TEXT_DATASETS",
    "OWN_TEXT_DATASETS",
    "DatasetFileError",
    "EOS_ID",
    "PackedWindowsIterDataset",
    "SKLEARN_DIGITS",
    "STDLIB_BYTES",
    "SklearnDigits",
    "StdlibBytes",
    "StdlibBytesConfig",
    "VOCAB_SIZE",
    "batch_sharding",
    "check_dataset_files",
    "default_data_dir",
    "list_corpus_files",
    "make_global_batch",
    "make_image_dataset",
    "make_lm_dataset",
    "prepare_sklearn_digits",
    "prepare_stdlib_bytes",
    "stdlib_bytes_config",
    "stdlib_source_dir",
]
