"""``load_dataset``: one entry point for every source (built-in, arrays, folder, hubs)."""

from __future__ import annotations

import os

from cimjax.data.arrays import load_arrays
from cimjax.data.assemble import LoadOptions
from cimjax.data.builtin import DATASET_NAMES, load_builtin
from cimjax.data.folder import load_folder
from cimjax.data.hub import load_hf, load_tfds
from cimjax.data.splits import Splits
from cimjax.errors import DataError

USER_SOURCES = ("npz", "npy", "folder", "hf", "tfds")
SOURCES = (*DATASET_NAMES, *USER_SOURCES)


def load_dataset(
  name: str,
  *,
  path: str | os.PathLike[str] | None = None,
  data_dir: str | os.PathLike[str] | None = None,
  train_size: int | None = None,
  val_size: int | None = None,
  test_size: int | None = None,
  split_seed: int = 0,
  image_size: int | None = None,
  channels: int | None = None,
  val_fraction: float = 0.1,
  test_fraction: float = 0.2,
  num_classes: int | None = None,
  on_bad_image: str = "skip",
  val_folder: str = "val",
) -> Splits:
  """Loads a dataset as normalised float32 NHWC train/val/test splits.

  Args:
    name: the source: a built-in dataset (``"fashion_mnist"``, ``"fashion_mnist_subset"``,
      ``"digits"``), ``"npz"`` / ``"npy"`` (array files, :mod:`cimjax.data.arrays`),
      ``"folder"`` (an image folder, :mod:`cimjax.data.folder`), ``"hf"`` or ``"tfds"``
      (local copies of hub datasets, :mod:`cimjax.data.hub`).
    path: the file or folder (``npz``, ``npy``, ``folder``) or the hub dataset (``hf``,
      ``tfds``); unused by the built-ins.
    data_dir: the Fashion-MNIST directory (default ``$CIMJAX_DATA_DIR`` or the Debian path),
      or the hub's cache / data folder.
    train_size: images in the train split (None or negative: all that remain after val).
    val_size: images of the validation split (None: 5,000 for the full Fashion-MNIST, 400 for
      the subset, 200 for digits, ``val_fraction`` of the train part otherwise; 0 gives an
      empty val split).
    test_size: images of the test split (None: all; built-ins: a prefix in file order).
    split_seed: seed of the permutations that separate the splits.
    image_size: built-ins: pad (centred, with the background value 0) to this square size;
      other sources: resize every image to it (bilinear).
    channels: repeat a grey channel this many times (e.g. 3).
    val_fraction: other sources: the share of the train part held out for validation.
    test_fraction: other sources without a test part: the share held out for test.
    num_classes: other sources: the number of classes (None: from the class names or labels).
    on_bad_image: other sources: ``"skip"`` (leave unreadable images out, counted in
      ``Splits.info["skipped"]``) or ``"error"``.
    val_folder: image folders: the part ``val/`` holds, ``"val"`` or ``"test"`` (ImageNet's
      ``train/`` + ``val/`` layout: ``val/`` is the test split; :func:`scan_folder`).

  Returns:
    :class:`Splits`.

  Raises:
    DataError: missing or malformed data (the message names the file and the problem) or
      impossible sizes.
    ValueError: unknown source name.
  """
  if name in DATASET_NAMES:
    return load_builtin(
      name,
      data_dir=data_dir,
      train_size=train_size,
      val_size=val_size,
      test_size=test_size,
      split_seed=split_seed,
      image_size=image_size,
      channels=channels,
    )
  if name not in USER_SOURCES:
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(SOURCES)}")
  if not path:
    raise DataError(f"source {name!r} needs a path (train.data.path)")
  opts = LoadOptions(
    train_size=None if train_size is None or train_size < 0 else train_size,
    val_size=None if val_size is None or val_size < 0 else val_size,
    test_size=None if test_size is None or test_size < 0 else test_size,
    split_seed=split_seed,
    image_size=image_size or None,
    channels=channels or None,
    val_fraction=val_fraction,
    test_fraction=test_fraction,
    num_classes=num_classes or None,
    on_bad_image=on_bad_image,
    val_folder=val_folder,
  )
  opts.validate()
  if name in ("npz", "npy"):
    return load_arrays(path, opts)
  if name == "folder":
    return load_folder(path, opts)
  loader = load_hf if name == "hf" else load_tfds
  return loader(str(path), opts, str(data_dir) if data_dir else None)


__all__ = ["SOURCES", "USER_SOURCES", "load_dataset"]
