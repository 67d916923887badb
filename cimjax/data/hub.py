"""Hub datasets, offline: Hugging Face ``datasets`` and TensorFlow Datasets (both optional).

Neither package is a dependency of cimjax; each is imported only when its source is used, and
only local copies are read (no download):

* ``source="hf"``: ``path`` is a folder written by ``datasets.Dataset(Dict).save_to_disk``, or
  a hub name (``"mnist"``, ``"cifar10"``, ``"name:config"``) already in the local cache
  (``data_dir``: the cache folder, default Hugging Face's). ``HF_DATASETS_OFFLINE=1`` is set
  before ``datasets`` is imported, unless the environment says otherwise. The image column is
  the first ``Image`` feature (or ``image``, ``img``), the label column the first
  ``ClassLabel`` (or ``label``, ``labels``); the class names are the ``ClassLabel``'s.
* ``source="tfds"``: ``path`` is a prepared TFDS dataset name (``"mnist"``, ``"name:version"``)
  under ``data_dir`` (default TFDS's, ``~/tensorflow_datasets``); it is read with
  ``as_supervised=True``, never downloaded.

Splits named ``train``, ``validation`` (or ``valid``, ``val``) and ``test`` become the parts of
the same names; a dataset with only ``train`` is split by ``val_fraction`` / ``test_fraction``.
Images go through the same checks as an image folder (:mod:`cimjax.data.images`); an image
that cannot be decoded is skipped and counted, or refused (``on_bad_image``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cimjax.data.assemble import LoadOptions, RawData, assemble, read_sources
from cimjax.data.images import image_from_pil
from cimjax.data.source import ArraySource, BadImageError, Source
from cimjax.data.splits import Splits
from cimjax.errors import DataError

HF_OFFLINE_ENV = "HF_DATASETS_OFFLINE"
HUB_SPLITS = {"train": ("train",), "val": ("validation", "valid", "val"), "test": ("test",)}
_IMAGE_COLUMNS = ("image", "img", "images", "pixel_values")
_LABEL_COLUMNS = ("label", "labels", "fine_label", "target")


def _import_hf() -> Any:
  os.environ.setdefault(HF_OFFLINE_ENV, "1")
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError(
      "source=hf needs the Hugging Face `datasets` package (pip install datasets); cimjax "
      f"reads only its local copies ({HF_OFFLINE_ENV}=1)"
    ) from None
  return datasets


def _hub_parts(available: list[str], where: str) -> dict[str, str]:
  """``{part: hub split name}`` for the splits a hub dataset has."""
  out = {}
  for part, names in HUB_SPLITS.items():
    for n in names:
      if n in available:
        out[part] = n
        break
  if "train" not in out:
    raise DataError(f"{where}: no train split (it has {', '.join(available) or 'none'})")
  return out


def hf_columns(features: Mapping[str, Any], where: str) -> tuple[str, str, tuple[str, ...]]:
  """The image column, the label column and the class names of a Hugging Face dataset.

  Raises:
    DataError: no image or no label column (the message lists the columns).
  """
  kind = {k: type(f).__name__ for k, f in features.items()}
  image = next((k for k, t in kind.items() if t == "Image"), None)
  image = image or next((k for k in _IMAGE_COLUMNS if k in features), None)
  label = next((k for k, t in kind.items() if t == "ClassLabel"), None)
  label = label or next((k for k in _LABEL_COLUMNS if k in features), None)
  if image is None or label is None:
    raise DataError(
      f"{where}: needs an image column (an Image feature, or one of {', '.join(_IMAGE_COLUMNS)}) "
      f"and a label column (a ClassLabel, or one of {', '.join(_LABEL_COLUMNS)}); it has "
      f"{', '.join(features) or 'none'}"
    )
  names = getattr(features[label], "names", None) or ()
  return image, label, tuple(str(n) for n in names)


@dataclasses.dataclass(frozen=True, eq=False)
class HfSource:
  """A :class:`cimjax.data.Source` over one split of a Hugging Face dataset.

  Attributes:
    dataset: the split (a ``datasets.Dataset``: ``len`` and ``dataset[i]``).
    image: the image column.
    label: the label column.
    where: ``"<path>[<split>]"``, for messages.
  """

  dataset: Any
  image: str
  label: str
  where: str

  @property
  def num_examples(self) -> int:
    return len(self.dataset)

  def get(self, i: int) -> tuple[np.ndarray, int]:
    try:
      row = self.dataset[i]
      img = row[self.image]
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's errors while decoding
      raise BadImageError(f"{self.describe(i)}: cannot decode the image ({e})") from None
    arr = np.asarray(img) if isinstance(img, (np.ndarray, list)) else None
    if arr is None:
      arr = image_from_pil(img, self.describe(i))
    return arr, row[self.label]

  def describe(self, i: int) -> str:
    return f"{self.where}[{i}]"


def load_hf(path: str, opts: LoadOptions, data_dir: str | None = None) -> Splits:
  """A Hugging Face dataset (local copy) as :class:`Splits`; see the module docstring.

  Raises:
    DataError: ``datasets`` not installed, the dataset not on disk or in the cache, no image
      or label column, bad images (``on_bad_image="error"``) or labels, impossible sizes.
  """
  datasets = _import_hf()
  where = f"hf:{path}"
  try:
    if Path(path).is_dir():
      loaded = datasets.load_from_disk(path)
    else:
      name, _, config = path.partition(":")
      loaded = datasets.load_dataset(name, config or None, cache_dir=data_dir or None)
  except Exception as e:  # pylint: disable=broad-except  (datasets raises many kinds)
    raise DataError(
      f"{where}: cannot load it from a local copy ({type(e).__name__}: {e}); cimjax reads "
      f"Hugging Face datasets offline ({HF_OFFLINE_ENV}=1): give a folder written by "
      "save_to_disk, or fill the cache once on a machine with network access"
    ) from None
  splits = dict(loaded) if hasattr(loaded, "keys") else {"train": loaded}
  names = _hub_parts(list(splits), where)
  image, label, classes = hf_columns(splits[names["train"]].features, where)
  sources: dict[str, Source] = {
    part: HfSource(splits[s], image, label, f"{where}[{s}]") for part, s in names.items()
  }
  wheres = {p: f"{where}[{s}]" for p, s in names.items()}
  parts, skipped = read_sources(sources, wheres, where, opts)
  info = {"source": "hf", "path": path, **skipped, "splits": names}
  return assemble(RawData(where, parts, classes, info), opts)


def load_tfds(path: str, opts: LoadOptions, data_dir: str | None = None) -> Splits:
  """A prepared TensorFlow Datasets dataset as :class:`Splits`; see the module docstring.

  Raises:
    DataError: ``tensorflow_datasets`` not installed, the dataset not prepared under
      ``data_dir``, bad labels, impossible sizes.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError(
      "source=tfds needs the `tensorflow-datasets` package (pip install tensorflow-datasets)"
    ) from None
  where = f"tfds:{path}"
  try:
    builder = tfds.builder(path, data_dir=data_dir or None)
    names = _hub_parts(list(builder.info.splits.keys()), where)
    feature = builder.info.features["label"] if "label" in builder.info.features else None
    classes = tuple(str(n) for n in (getattr(feature, "names", None) or ()))
    sources: dict[str, Source] = {}
    for part, s in names.items():
      pairs = list(tfds.as_numpy(builder.as_dataset(split=s, as_supervised=True)))
      images = [np.asarray(x) for x, _ in pairs]
      labels = np.asarray([y for _, y in pairs]).reshape(-1)
      sources[part] = ArraySource(images, labels, f"{where}[{s}]")
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (TFDS and TF raise many kinds)
    raise DataError(
      f"{where}: cannot read the prepared dataset under {data_dir or 'the TFDS data dir'} "
      f"({type(e).__name__}: {e}); cimjax never downloads: prepare it once with `tfds build`"
    ) from None
  wheres = {p: f"{where}[{s}]" for p, s in names.items()}
  parts, skipped = read_sources(sources, wheres, where, opts)
  info = {"source": "tfds", "path": path, **skipped, "splits": names}
  return assemble(RawData(where, parts, classes, info), opts)


__all__ = ["HF_OFFLINE_ENV", "HUB_SPLITS", "HfSource", "hf_columns", "load_hf", "load_tfds"]
