"""From the parts a user source provides (train, val, test, or one pool) to :class:`Splits`.

A loader (array file, image folder, hub) hands over a :class:`RawData`: float32 images and raw
labels for a ``"train"`` part and, if the data has them, ``"val"`` and ``"test"`` parts.
:func:`assemble` checks the labels and shapes, splits and builds the splits:

* no ``test`` part: a seeded permutation of ``train`` (``split_seed``) holds out
  ``test_fraction`` of it as the test split (``test_size`` takes a prefix of those);
* no ``val`` part: the next ``val_size`` images of the permutation (default ``val_fraction``
  of the train part) are the validation split, as :func:`cimjax.data.held_out_split` does;
* a given ``val`` / ``test`` part: ``val_size`` / ``test_size`` take seeded subsets of it
  (file order kept);
* ``train_size`` takes a prefix of what remains (all by default).

The number of classes is ``num_classes`` if given, else the number of class names, else the
largest label + 1. The statistics are those of the train split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from cimjax.data.images import prepare_list
from cimjax.data.source import ON_BAD_IMAGE, SKIPPED_SHOWN, Source, materialise
from cimjax.data.splits import Splits, check_size, splits_from_indices
from cimjax.errors import DataError

PART_NAMES = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class LoadOptions:
  """How a non-built-in source becomes splits (the ``train.data`` fields of the same names).

  Attributes:
    train_size: images of the train split (None: all that remain).
    val_size: images of the validation split (None: ``val_fraction`` of the train part, or
      all of a given val part).
    test_size: images of the test split (None: all of the test part or of the held-out ones).
    split_seed: seed of the permutations that split the data.
    image_size: resize every image to this square side (None: keep; sizes must agree).
    channels: repeat a grey channel to this many (None: keep).
    val_fraction: fraction of the train part held out for validation when ``val_size`` is
      None and there is no val part.
    test_fraction: fraction held out for test when there is no test part.
    num_classes: the number of classes (None: from the class names or the labels).
    on_bad_image: ``"skip"`` or ``"error"`` for an unreadable image.
    val_folder: the part an image folder's ``val/`` holds: ``"val"`` or ``"test"``
      (:func:`cimjax.data.scan_folder`).
  """

  train_size: int | None = None
  val_size: int | None = None
  test_size: int | None = None
  split_seed: int = 0
  image_size: int | None = None
  channels: int | None = None
  val_fraction: float = 0.1
  test_fraction: float = 0.2
  num_classes: int | None = None
  on_bad_image: str = "skip"
  val_folder: str = "val"

  def validate(self) -> None:
    """Raises DataError naming the first bad option."""
    if self.val_folder not in ("val", "test"):
      raise DataError(f"val_folder={self.val_folder!r}; allowed: val, test")
    if self.on_bad_image not in ON_BAD_IMAGE:
      raise DataError(f"on_bad_image={self.on_bad_image!r}; allowed: {', '.join(ON_BAD_IMAGE)}")
    for f in ("val_fraction", "test_fraction"):
      v = getattr(self, f)
      if not 0.0 <= v < 1.0:
        raise DataError(f"{f}={v}; allowed: 0 <= {f} < 1")
    if self.val_fraction + self.test_fraction >= 1.0:
      raise DataError(
        f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction}; must be < 1"
      )
    for f in ("image_size", "channels", "num_classes"):
      v = getattr(self, f)
      if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
        raise DataError(f"{f}={v!r}; allowed: an integer >= 1 (or unset)")


@dataclasses.dataclass(frozen=True, eq=False)
class Part:
  """One part of a source.

  Attributes:
    images: float32 ``[N, H, W, C]`` (see :mod:`cimjax.data.images`).
    labels: ``[N]`` labels as read (checked by :func:`assemble`).
    where: the file or folder the part comes from, for messages.
    labels_where: where the labels come from, if not ``where`` (a separate array or file).
  """

  images: np.ndarray
  labels: np.ndarray
  where: str
  labels_where: str = ""


@dataclasses.dataclass(frozen=True, eq=False)
class RawData:
  """What a loader reads: parts, class names and a summary.

  Attributes:
    name: the dataset name for :attr:`Splits.name`.
    parts: ``"train"`` and optionally ``"val"``, ``"test"``.
    class_names: one name a class, or empty.
    info: the source summary (``source``, ``path``, ``skipped``, ``skipped_paths``, ...).
  """

  name: str
  parts: dict[str, Part]
  class_names: tuple[str, ...] = ()
  info: dict[str, Any] = dataclasses.field(default_factory=dict)


def check_labels(labels: np.ndarray, where: str, num_classes: int | None = None) -> np.ndarray:
  """Labels as int64 ``[N]``: integer class indices in ``0 .. num_classes - 1``.

  Args:
    labels: ``[N]`` (or ``[N, 1]``) labels, integer or integral float.
    where: the file for messages.
    num_classes: the allowed range, or None (only non-negative is checked).

  Raises:
    DataError: another shape (e.g. one-hot), non-numeric or non-integer values, a negative
      label or one ``>= num_classes``; the message names the file, the label and its position.
  """
  y = np.asarray(labels)
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1:
    raise DataError(
      f"{where}: labels of shape {y.shape}; expected [N] class indices (one-hot labels are "
      "not supported)"
    )
  if y.dtype == np.bool_ or not (
    np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)
  ):
    raise DataError(f"{where}: labels of dtype {y.dtype}; expected integer class indices")
  if np.issubdtype(y.dtype, np.floating):
    bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
    if len(bad):
      raise DataError(
        f"{where}: non-integer label {float(y[bad[0]])} at position {int(bad[0])}; expected "
        "integer class indices"
      )
  y = y.astype(np.int64)
  if len(y) and int(y.min()) < 0:
    i = int(np.argmin(y))
    raise DataError(f"{where}: negative label {int(y[i])} at position {i}")
  if num_classes is not None and len(y) and int(y.max()) >= num_classes:
    i = int(np.argmax(y))
    raise DataError(
      f"{where}: label {int(y[i])} at position {i} is out of range for {num_classes} classes "
      f"(0..{num_classes - 1})"
    )
  return y


def read_sources(
  sources: Mapping[str, Source], wheres: Mapping[str, str], root: str, opts: LoadOptions
) -> tuple[dict[str, Part], dict[str, Any]]:
  """Decodes the parts of a source into memory, leaving out (or refusing) unreadable images.

  All parts are converted together (:func:`cimjax.data.images.prepare_list`), so they agree on
  the image size and the channels. Skipped images are logged in one warning line.

  Args:
    sources: one :class:`cimjax.data.Source` a part.
    wheres: the folder or file of each part, for messages.
    root: the dataset's folder or name, for messages.
    opts: ``image_size``, ``channels``, ``on_bad_image``.

  Returns:
    ``(parts, info)``; ``info`` holds ``skipped`` (count) and ``skipped_paths`` (the first
    few).

  Raises:
    DataError: an unreadable image with ``on_bad_image="error"``, or images that cannot be
      brought to one shape.
  """
  read = {part: materialise(src, opts.on_bad_image) for part, src in sources.items()}
  skipped = [s for m in read.values() for s in m.skipped]
  if skipped:
    shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    logging.warning("%s: skipped %d unreadable images (%s)", root, len(skipped), shown)
  stacked = prepare_list(
    [img for m in read.values() for img in m.images],
    [o for m in read.values() for o in m.origins],
    root,
    opts.image_size,
    opts.channels,
  )
  parts, lo = {}, 0
  for part, m in read.items():
    hi = lo + len(m.images)
    parts[part] = Part(stacked[lo:hi], m.labels, wheres[part])
    lo = hi
  return parts, {"skipped": len(skipped), "skipped_paths": skipped[:SKIPPED_SHOWN]}


def _fraction(n: int, f: float) -> int:
  return max(1, int(round(f * n))) if f > 0 and n > 1 else 0


def _subset(n: int, size: int | None, seed: int, what: str, where: str) -> np.ndarray:
  """All of ``range(n)``, or ``size`` of them chosen by a seeded permutation (sorted)."""
  k = check_size(n, size, what, where)
  if k == n:
    return np.arange(n)
  return np.sort(np.random.default_rng([seed, 0x7E57]).permutation(n)[:k])


def _shape_str(shape: Sequence[int]) -> str:
  return "x".join(str(int(s)) for s in shape)


def assemble(raw: RawData, opts: LoadOptions) -> Splits:
  """Checks the parts of ``raw``, splits them and builds normalised :class:`Splits`.

  Args:
    raw: the loader's parts.
    opts: sizes, fractions, seed, number of classes.

  Returns:
    :class:`Splits` with ``info`` from ``raw.info`` plus the sizes, class names and statistics.

  Raises:
    DataError: naming the file: bad labels (see :func:`check_labels`), image/label counts that
      disagree, parts with different image shapes, or a split too small for the requested
      sizes.
  """
  if "train" not in raw.parts:
    raise DataError(f"{raw.name}: no train part")
  unknown = set(raw.parts) - set(PART_NAMES)
  if unknown:
    raise DataError(f"{raw.name}: unknown parts {sorted(unknown)}")
  n_cls = opts.num_classes or (len(raw.class_names) if raw.class_names else None)
  if raw.class_names and opts.num_classes and len(raw.class_names) != opts.num_classes:
    raise DataError(
      f"{raw.parts['train'].where if 'train' in raw.parts else raw.name}: "
      f"{len(raw.class_names)} class names but train.data.num_classes={opts.num_classes}"
    )
  parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
  train_part = raw.parts["train"]
  for key, part in raw.parts.items():
    if len(part.images) != len(part.labels):
      raise DataError(
        f"{part.where}: {len(part.images)} images but {len(part.labels)} labels"
        + (f" in {part.labels_where}" if part.labels_where else "")
      )
    got, want = part.images.shape[1:], train_part.images.shape[1:]
    if got != want:
      fix = (
        "set train.data.image_size=S to resize every image to S x S"
        if got[:2] != want[:2]
        else "set train.data.channels to repeat a grey channel"
      )
      raise DataError(
        f"{part.where}: {key} images are {_shape_str(got)} but the train images "
        f"({train_part.where}) are {_shape_str(want)}; {fix}"
      )
    parts[key] = (part.images, check_labels(part.labels, part.labels_where or part.where, n_cls))
  if n_cls is None:
    n_cls = max(1, max((int(y.max()) + 1 for _, y in parts.values() if len(y)), default=1))

  where = train_part.where
  xtr, ytr = parts["train"]
  n = len(ytr)
  if n == 0:
    raise DataError(f"{where}: no train images")
  perm = np.random.default_rng(opts.split_seed).permutation(n)
  seed = opts.split_seed
  if "test" in parts:
    test, test_where = parts["test"], raw.parts["test"].where
    test_idx = _subset(len(test[1]), opts.test_size, seed, "test_size", test_where)
    pool = perm
  else:
    n_test = _fraction(n, opts.test_fraction)
    k = check_size(n_test, opts.test_size, "test_size", f"{where} (test_fraction held out)")
    test, test_idx, pool = (xtr, ytr), perm[:n_test][:k], perm[n_test:]
  if "val" in parts:
    val, val_where = parts["val"], raw.parts["val"].where
    val_idx = _subset(len(val[1]), opts.val_size, seed, "val_size", val_where)
    rest = pool
  else:
    val = None
    n_val = _fraction(n, opts.val_fraction) if opts.val_size is None else opts.val_size
    val_idx = pool[: check_size(len(pool), n_val, "val_size", where)]
    rest = pool[len(val_idx) :]
  train_idx = rest[: check_size(len(rest), opts.train_size, "train_size", where)]
  if len(train_idx) == 0:
    raise DataError(
      f"{where}: the train split is empty ({n} images; val_size={opts.val_size}, "
      f"test_size={opts.test_size}, val_fraction={opts.val_fraction}, "
      f"test_fraction={opts.test_fraction})"
    )
  info = dict(raw.info)
  info["layout"] = (
    "+".join(k for k in PART_NAMES if k in raw.parts) if len(raw.parts) > 1 else "pool"
  )
  return splits_from_indices(
    raw.name,
    parts["train"],
    test,
    train_index=train_idx,
    val_index=val_idx,
    test_index=test_idx,
    val=val,
    num_classes=n_cls,
    class_names=raw.class_names,
    info=info,
  )


__all__ = [
  "PART_NAMES",
  "LoadOptions",
  "Part",
  "RawData",
  "assemble",
  "check_labels",
  "read_sources",
]
