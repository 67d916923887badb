"""The ``Source`` protocol: random access to the examples of one part of a dataset.

Every non-built-in loader reads its part (train, val, test, or one pool) through a
:class:`Source`: ``num_examples`` and ``get(i)``, which decodes example ``i``. Today the loaders
:func:`materialise` a source into host memory (an image folder, an array file, a hub dataset);
a streaming loader for data that does not fit in memory (ImageNet-size folders) can keep the
same sources and decode the examples of each batch on demand instead.

An example that cannot be decoded raises :class:`BadImageError`; :func:`materialise` skips and
counts it (``on_bad_image="skip"``) or re-raises it (``"error"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from cimjax.errors import DataError

ON_BAD_IMAGE = ("skip", "error")
SKIPPED_SHOWN = 5  # paths of skipped images kept in Splits.info["skipped_paths"]


class BadImageError(DataError):
  """One image cannot be read or decoded (the message names its file)."""


@runtime_checkable
class Source(Protocol):
  """Random access to the examples of one part of a dataset."""

  @property
  def num_examples(self) -> int:
    """The number of examples (including any that turn out unreadable)."""
    ...

  def get(self, i: int) -> tuple[np.ndarray, int]:
    """Example ``i``: ``(image [H, W, C] (uint8 or float), label)``.

    Raises:
      BadImageError: the example cannot be decoded.
    """
    ...

  def describe(self, i: int) -> str:
    """Where example ``i`` comes from (a file path, ``file[i]``), for messages."""
    ...


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """A :class:`Source` over in-memory arrays.

  Attributes:
    images: ``[N, H, W, C]`` images, or a list of ``[H, W, C]`` images (sizes may differ).
    labels: ``[N]`` labels (returned as they are; checked when the splits are built).
    where: the file the arrays came from, for messages.
  """

  images: np.ndarray | Sequence[np.ndarray]
  labels: np.ndarray
  where: str = "arrays"

  @property
  def num_examples(self) -> int:
    return int(len(self.labels))

  def get(self, i: int) -> tuple[np.ndarray, int]:
    return np.asarray(self.images[i]), self.labels[i]

  def describe(self, i: int) -> str:
    return f"{self.where}[{i}]"


@dataclasses.dataclass(frozen=True)
class Materialised:
  """The readable examples of a source.

  Attributes:
    images: one ``[H, W, C]`` array per readable example, in source order.
    labels: ``[N]`` labels as the source gives them (checked later).
    origins: ``describe(i)`` of each readable example.
    skipped: ``describe(i)`` of each unreadable example.
  """

  images: list[np.ndarray]
  labels: np.ndarray
  origins: list[str]
  skipped: list[str]


def materialise(source: Source, on_bad_image: str = "skip") -> Materialised:
  """Decodes every example of ``source`` into host memory.

  Args:
    source: the examples.
    on_bad_image: ``"skip"`` (leave unreadable examples out, listed in ``skipped``) or
      ``"error"`` (raise on the first).

  Returns:
    :class:`Materialised`.

  Raises:
    BadImageError: an unreadable example with ``on_bad_image="error"``.
  """
  if on_bad_image not in ON_BAD_IMAGE:
    raise DataError(f"on_bad_image={on_bad_image!r}; allowed: {', '.join(ON_BAD_IMAGE)}")
  images, labels, origins, skipped = [], [], [], []
  for i in range(source.num_examples):
    try:
      img, label = source.get(i)
    except BadImageError as e:
      if on_bad_image == "error":
        raise BadImageError(
          f"{e}; set train.data.on_bad_image=skip to leave unreadable images out"
        ) from None
      skipped.append(source.describe(i))
      continue
    images.append(img)
    labels.append(label)
    origins.append(source.describe(i))
  y = np.asarray(labels).reshape(-1) if labels else np.zeros(0, np.int64)
  return Materialised(images, y, origins, skipped)


__all__ = [
  "ON_BAD_IMAGE",
  "ArraySource",
  "BadImageError",
  "Materialised",
  "Source",
  "materialise",
]
