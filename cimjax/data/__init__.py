"""Image classification data on the host, as train / val / test :class:`Splits`.

Everything here is NumPy on the host; the training loop moves one batch at a time to the
device. Modules (one concept each):

* :mod:`~cimjax.data.splits`: :class:`Dataset`, :class:`Splits`, and the public builders:
  :func:`splits_from_indices` (raw arrays + explicit index lists, e.g. another tool's exact
  split), :func:`held_out_split` (cimjax's seeded train/val split), :func:`check_size`,
  :func:`channel_stats`, :func:`normalise`, :func:`pad_images`;
* :mod:`~cimjax.data.builtin`: Fashion-MNIST (Debian IDX files), the committed subset,
  scikit-learn digits;
* :mod:`~cimjax.data.arrays`: ``.npz`` files and folders of ``.npy`` files;
* :mod:`~cimjax.data.folder`: image folders (one subfolder a class, optional
  ``train/``, ``val/``, ``test/``);
* :mod:`~cimjax.data.hub`: Hugging Face ``datasets`` and TFDS, optional and offline;
* :mod:`~cimjax.data.source`: the :class:`Source` protocol (``num_examples``, ``get(i)``),
  the hook for a future streaming loader; :mod:`~cimjax.data.images` (decoding, scaling,
  resizing), :mod:`~cimjax.data.assemble` (parts -> splits, label checks);
* :mod:`~cimjax.data.batches`: the batch iterators (pure functions of seed, epoch, step);
* :mod:`~cimjax.data.load`: :func:`load_dataset`, one entry point for every source;
* :mod:`~cimjax.data.stream`: :func:`open_stream`, the grain pipeline for training data that
  does not fit in memory (:class:`TrainStream`, :class:`StreamOptions`, resumable iterators).

Splits: ``train`` and ``val`` come from the train part, ``val`` (the "search-validation"
split) held out by a seeded permutation; ``test`` is the test part, used only for final
numbers. Normalisation: per-channel mean and standard deviation of the train split, applied to
every split; images become float32 NHWC. The number of classes, the image shape and the
statistics come from the data.

Batching: :func:`epoch_batches` shuffles with a permutation that is a pure function of
``(key, epoch)`` and yields fixed-size batches, **dropping the remainder**, so shapes never
change and nothing recompiles. :func:`eval_batches` covers a split exactly once: the last
batch is **padded** to the fixed size and a boolean mask marks the real images.
"""

from __future__ import annotations

from cimjax.data.arrays import load_arrays, read_arrays
from cimjax.data.assemble import LoadOptions, Part, RawData, assemble, check_labels
from cimjax.data.batches import (
  epoch_batches,
  epoch_permutation,
  eval_batches,
  steps_per_epoch,
  train_batches,
)
from cimjax.data.builtin import (
  DATA_DIR_ENV,
  DATASET_NAMES,
  DEFAULT_FASHION_DIR,
  DEFAULT_VAL,
  DIGITS_TEST,
  FASHION_CLASSES,
  FASHION_FILES,
  SUBSET_FILE,
  fashion_mnist_dir,
  load_builtin,
  load_fashion_mnist_raw,
  load_raw,
  read_idx,
  subset_path,
  write_fashion_subset,
  write_idx,
)
from cimjax.data.folder import FolderSource, load_folder, scan_folder
from cimjax.data.hub import load_hf, load_tfds
from cimjax.data.images import IMAGE_EXTENSIONS, decode_image
from cimjax.data.load import SOURCES, USER_SOURCES, load_dataset
from cimjax.data.source import (
  ON_BAD_IMAGE,
  ArraySource,
  BadImageError,
  Source,
  materialise,
)
from cimjax.data.splits import (
  Dataset,
  Splits,
  channel_stats,
  check_search_images,
  check_size,
  held_out_split,
  normalise,
  pad_images,
  splits_from_indices,
)
from cimjax.data.stream import (
  IMAGENET_MEAN,
  IMAGENET_STD,
  STREAM_SOURCES,
  StreamData,
  StreamIterator,
  StreamOptions,
  TrainStream,
  open_stream,
)
from cimjax.errors import DataError

__all__ = [
  "DATASET_NAMES",
  "DATA_DIR_ENV",
  "DEFAULT_FASHION_DIR",
  "DEFAULT_VAL",
  "DIGITS_TEST",
  "FASHION_CLASSES",
  "FASHION_FILES",
  "IMAGENET_MEAN",
  "IMAGENET_STD",
  "IMAGE_EXTENSIONS",
  "ON_BAD_IMAGE",
  "SOURCES",
  "STREAM_SOURCES",
  "SUBSET_FILE",
  "USER_SOURCES",
  "ArraySource",
  "BadImageError",
  "DataError",
  "Dataset",
  "FolderSource",
  "LoadOptions",
  "Part",
  "RawData",
  "Source",
  "Splits",
  "StreamData",
  "StreamIterator",
  "StreamOptions",
  "TrainStream",
  "assemble",
  "channel_stats",
  "check_labels",
  "check_search_images",
  "check_size",
  "decode_image",
  "epoch_batches",
  "epoch_permutation",
  "eval_batches",
  "fashion_mnist_dir",
  "held_out_split",
  "load_arrays",
  "load_builtin",
  "load_dataset",
  "load_fashion_mnist_raw",
  "load_folder",
  "load_hf",
  "load_raw",
  "load_tfds",
  "materialise",
  "normalise",
  "open_stream",
  "pad_images",
  "read_arrays",
  "read_idx",
  "scan_folder",
  "splits_from_indices",
  "steps_per_epoch",
  "subset_path",
  "train_batches",
  "write_fashion_subset",
  "write_idx",
]
