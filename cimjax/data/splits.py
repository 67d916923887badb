"""The split types and the public functions that build them from arrays and index lists.

A dataset on the host is a :class:`Splits`: ``train``, ``val`` (the search-validation split,
held out from the train part) and ``test`` (final numbers only), each a :class:`Dataset` of
normalised float32 NHWC images and int32 labels. Every source (built-in, array files, image
folders, hubs) ends here, through :func:`splits_from_indices`.

To reproduce another tool's exact train/validation split, give its index lists to
:func:`splits_from_indices`; to get cimjax's own split of a train part, call
:func:`held_out_split` (a seeded permutation: ``val`` is its first ``val_size`` entries, ``train``
the next ``train_size``). Normalisation (:func:`channel_stats`, :func:`normalise`) uses the
per-channel mean and standard deviation of the train split only, applied to every split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from cimjax.errors import DataError

STD_FLOOR = 1e-6  # a constant channel gets this standard deviation, not 0


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """One split held on the host.

  Attributes:
    images: float32 ``[N, H, W, C]`` normalised images.
    labels: int32 ``[N]`` class labels.
    index: int64 ``[N]`` position of each image in its source part (the train, val or test
      file; for a source with one pool of images, the position in that pool).
  """

  images: np.ndarray
  labels: np.ndarray
  index: np.ndarray

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  @property
  def shape(self) -> tuple[int, int, int]:
    """One image's shape ``(H, W, C)``."""
    return tuple(self.images.shape[1:])  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
  """Train, search-validation and test splits of one dataset.

  Attributes:
    name: dataset name (a built-in name, or ``"<source>:<file or folder name>"``).
    train: training split.
    val: search-validation split, held out from the train part (the search and model
      selection use only this one).
    test: the test part, for final numbers only.
    num_classes: number of classes (labels are ``0 .. num_classes - 1``).
    mean: float32 ``[C]`` per-channel mean of the raw train split (0..255 scale for the
      built-ins, 0..1 for integer images of the other sources, as given for float images).
    std: float32 ``[C]`` per-channel standard deviation of the raw train split.
    class_names: one name a class (folder names, a hub's label names; may be empty).
    info: a JSON-able summary of the source for logs and the report: ``source``, ``path``,
      ``skipped`` (unreadable images left out), ``skipped_paths`` (the first few), ...
    stream: the streamed train split (a :class:`cimjax.data.TrainStream`) of streamed data
      (:func:`cimjax.data.open_stream`; ``train`` is then a fixed sample of it), else None.
  """

  name: str
  train: Dataset
  val: Dataset
  test: Dataset
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  class_names: tuple[str, ...] = ()
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  stream: Any = None

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """One image's shape ``(H, W, C)``."""
    return self.train.shape

  def __getitem__(self, split: str) -> Dataset:
    """``splits["train" | "val" | "validation" | "test"]``."""
    key = {"validation": "val", "search_val": "val"}.get(split, split)
    if key not in ("train", "val", "test"):
      raise KeyError(f"unknown split {split!r}; choose train, val or test")
    return getattr(self, key)


def check_size(n_avail: int, size: int | None, what: str, name: str) -> int:
  """The number of images a split request takes, checked against what is available.

  Args:
    n_avail: images available.
    size: images requested (None or negative: all).
    what: the request's name for the message (``"val_size"``).
    name: the dataset (file or folder) for the message.

  Returns:
    ``n_avail`` for None or a negative size, else ``size``.

  Raises:
    DataError: ``size > n_avail``; the message names ``name``, ``what`` and both counts.
  """
  if size is None or size < 0:
    return n_avail
  if size > n_avail:
    raise DataError(f"{name}: {what}={size} but only {n_avail} images are available")
  return int(size)


def held_out_split(
  n: int,
  val_size: int,
  train_size: int | None = None,
  *,
  seed: int = 0,
  name: str = "data",
) -> tuple[np.ndarray, np.ndarray]:
  """cimjax's train/validation split of a train part of ``n`` images.

  A permutation of ``range(n)`` seeded by ``seed``: ``val`` is its first ``val_size``
  entries, ``train`` the next ``train_size`` (None or negative: all the rest). Smaller sizes
  give prefixes of larger ones, and the two never overlap.

  Args:
    n: images in the train part.
    val_size: images held out for validation (0: none).
    train_size: images of the train split (None or negative: all that remain).
    seed: permutation seed (``train.data.split_seed``).
    name: the dataset for error messages.

  Returns:
    ``(train_index int64 [n_train], val_index int64 [n_val])``, positions in the train part
    in permutation order.

  Raises:
    DataError: a size larger than what is available.
  """
  n_val = check_size(n, val_size, "val_size", name)
  perm = np.random.default_rng(seed).permutation(n)
  val_idx = perm[:n_val]
  rest = perm[n_val:]
  train_idx = rest[: check_size(len(rest), train_size, "train_size", name)]
  return train_idx, val_idx


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation (float64) of images ``x [N, H, W, C]``.

  The standard deviation is floored at :data:`STD_FLOOR` so a constant channel stays finite.
  """
  flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
  return flat.mean(axis=0), np.maximum(flat.std(axis=0), STD_FLOOR)


def normalise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """``(x - mean) / std`` in float32, per channel: ``[N, H, W, C]`` -> float32, same shape."""
  out = (x.astype(np.float32) - np.asarray(mean).astype(np.float32)) / np.asarray(std).astype(
    np.float32
  )
  return np.ascontiguousarray(out, np.float32)


def pad_images(x: np.ndarray, image_size: int | None, channels: int | None) -> np.ndarray:
  """Pads images centred to a square with 0 (the background) and repeats a grey channel.

  Args:
    x: ``[N, H, W]`` (gets ``C = 1``) or ``[N, H, W, C]`` images, any dtype.
    image_size: the square side to pad to (None or 0: unchanged).
    channels: repeat a single channel this many times (None, 0 or 1: unchanged).

  Returns:
    ``[N, S, S, C']`` images of ``x``'s dtype.

  Raises:
    DataError: ``image_size`` smaller than the images.
  """
  if x.ndim == 3:
    x = x[..., None]
  h, w = x.shape[1:3]
  if image_size:
    if image_size < max(h, w):
      raise DataError(
        f"image_size={image_size} is smaller than the images ({h}x{w}); only padding is supported"
      )
    top, left = (image_size - h) // 2, (image_size - w) // 2
    x = np.pad(x, ((0, 0), (top, image_size - h - top), (left, image_size - w - left), (0, 0)))
  if channels and channels != 1:
    x = np.repeat(x, channels, axis=-1)
  return x


def _index(idx: Sequence[int] | np.ndarray, n: int, what: str, name: str) -> np.ndarray:
  arr = np.asarray(idx)
  if arr.size == 0:
    return np.zeros(0, np.int64)
  if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
    raise DataError(f"{name}: {what} must be a 1-D list of integers, got {arr.dtype} {arr.shape}")
  if arr.min() < 0 or arr.max() >= n:
    raise DataError(f"{name}: {what} holds positions outside 0..{n - 1}")
  return arr


def splits_from_indices(
  name: str,
  train: tuple[np.ndarray, np.ndarray],
  test: tuple[np.ndarray, np.ndarray],
  *,
  train_index: Sequence[int] | np.ndarray,
  val_index: Sequence[int] | np.ndarray,
  test_index: Sequence[int] | np.ndarray | None = None,
  val: tuple[np.ndarray, np.ndarray] | None = None,
  num_classes: int | None = None,
  image_size: int | None = None,
  channels: int | None = None,
  class_names: Sequence[str] = (),
  info: dict[str, Any] | None = None,
) -> Splits:
  """Builds normalised :class:`Splits` from raw arrays and explicit index lists.

  The images the indices pick are padded (``image_size``, ``channels``: see
  :func:`pad_images`), the per-channel statistics come from the train split alone, and every
  split is normalised with them. Indices are kept as given (their order is the split's order),
  so any tool's exact split can be reproduced.

  Args:
    name: the dataset's name (for :attr:`Splits.name` and error messages).
    train: ``(images [N, H, W] or [N, H, W, C], labels [N])`` of the train part, raw (uint8
      0..255 or float).
    test: the test part, likewise (may be the same arrays as ``train`` with disjoint indices).
    train_index: positions in ``train`` of the train split.
    val_index: positions of the validation split in ``val`` if given, else in ``train``.
    test_index: positions in ``test`` of the test split (None: all, in order).
    val: a separate validation part, or None (validation is held out from ``train``).
    num_classes: the number of classes (None: ``max label + 1`` over the parts, at least 1).
    image_size: pad to this square size (see :func:`pad_images`).
    channels: repeat a grey channel (see :func:`pad_images`).
    class_names: names of the classes (empty or ``num_classes`` names).
    info: the source summary for :attr:`Splits.info` (the class names, shape and statistics
      are added).

  Returns:
    :class:`Splits`; images float32 ``[n, S, S, C]``, labels int32, index int64.

  Raises:
    DataError: an index outside its part, an empty train split, labels outside
      ``0 .. num_classes - 1``.
  """
  xtr, ytr = train
  xte, yte = test
  xva, yva = val if val is not None else train
  train_idx = _index(train_index, len(ytr), "train_index", name)
  val_idx = _index(val_index, len(yva), "val_index", name)
  if test_index is None:
    test_idx = np.arange(len(yte))
  else:
    test_idx = _index(test_index, len(yte), "test_index", name)
  if len(train_idx) == 0:
    raise DataError(f"{name}: the train split is empty")
  if num_classes is None:
    tops = [int(y.max()) for y in (ytr, yva, yte) if len(y)]
    num_classes = max(max(tops, default=0) + 1, 1)
  for what, y, idx in (("train", ytr, train_idx), ("val", yva, val_idx), ("test", yte, test_idx)):
    picked = y[idx]
    if len(picked) and (int(picked.min()) < 0 or int(picked.max()) >= num_classes):
      raise DataError(
        f"{name}: {what} labels span {int(picked.min())}..{int(picked.max())}, outside "
        f"0..{num_classes - 1}"
      )
  if class_names and len(class_names) != num_classes:
    raise DataError(f"{name}: {len(class_names)} class names for {num_classes} classes")

  xtr_p = pad_images(xtr[train_idx], image_size, channels)
  mean, std = channel_stats(xtr_p)

  def make(x: np.ndarray, y: np.ndarray, idx: np.ndarray, padded: np.ndarray | None = None):
    xp = pad_images(x[idx], image_size, channels) if padded is None else padded
    return Dataset(
      images=normalise(xp, mean, std), labels=y[idx].astype(np.int32), index=idx.astype(np.int64)
    )

  mean32, std32 = mean.astype(np.float32), std.astype(np.float32)
  summary = dict(info or {})
  summary.update(
    num_classes=int(num_classes),
    class_names=list(class_names),
    image_shape=list(xtr_p.shape[1:]),
    mean=[float(v) for v in mean32],
    std=[float(v) for v in std32],
  )
  summary.setdefault("skipped", 0)
  out_train = make(xtr, ytr, train_idx, xtr_p)
  summary["sizes"] = {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)}
  return Splits(
    name=name,
    train=out_train,
    val=make(xva, yva, val_idx),
    test=make(xte, yte, test_idx),
    num_classes=int(num_classes),
    mean=mean32,
    std=std32,
    class_names=tuple(class_names),
    info=summary,
  )


def check_search_images(splits: Splits, search_images: int) -> None:
  """Checks that the validation split can hold the search's images and the re-evaluation.

  The run's search takes the first ``search_images`` validation images (0: half) and
  re-evaluates its best candidates on the rest, so the split needs ``search_images + 1``
  images (2 for half).

  Raises:
    DataError: the split is too small; the message names the data and both sizes.
  """
  n = len(splits.val)
  need = max(int(search_images), 1) + 1
  if n < need:
    where = splits.info.get("path") or splits.name
    raise DataError(
      f"{where}: the validation split has {n} images; search.search_images={search_images} "
      f"needs at least {need} (the rest re-evaluates the best candidates): lower "
      "search.search_images or raise train.data.val_size (or val_fraction)"
    )


__all__ = [
  "STD_FLOOR",
  "Dataset",
  "Splits",
  "channel_stats",
  "check_search_images",
  "check_size",
  "held_out_split",
  "normalise",
  "pad_images",
  "splits_from_indices",
]
